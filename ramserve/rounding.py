"""A plan's weights rounded with error compensation, layer by layer, from sequences the model writes.

Compensated rounding (ramserve/compensate.py) needs each module's input second moments H = XᵀX. There is
no data, so the inputs come from the model itself: ``sequences`` sequences of ``tokens`` tokens from its
own parallel sampling sweeps (fisher.sampled_sequences, seeded, so the same plan always gets the same
weights). One streamed pass then runs the layers in order with one layer's weights resident: each
layer's linear modules record their inputs (fisher.Probe), each planned module is rounded under its own
H (stacked experts: each expert under the H of the tokens routed to it, or to nearest when fewer than
``min_expert_tokens`` reached it), and with ``sequential`` the next layer's input is computed with
this layer's rounded weights, so later layers compensate what earlier ones got wrong, as GPTQ does.

Modules outside the decoder layers (embedding, head) and any module no probe covers are rounded to
nearest by the caller. ``quantize`` writes what this yields; ``evaluate`` simulates it, so the
simulated and the stored model are the same weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from . import affine
from .compensate import compensated, inverse_cholesky
from .device import runtime_dtype
from .fisher import Probe, StreamedModel, probe_modules, sampled_sequences, start_token
from .settings import RoundingSettings

Packed = tuple[mx.array, mx.array, mx.array]  # MLX's packed weight, scales, biases


def is_compensated(rounding: dict[str, Any]) -> bool:
    return bool(rounding.get("method", "nearest") == "compensated")


@dataclass
class Gain:
    """What compensation did, summed over modules: the error under H kept, and rounding to
    nearest's; experts that fell back to nearest for want of tokens."""

    error: float = 0.0
    nearest_error: float = 0.0
    modules: int = 0
    experts_nearest: int = 0
    seconds: float = 0.0
    per_module: dict[str, float] = field(default_factory=dict)  # error / nearest error

    @property
    def ratio(self) -> float:
        return self.error / self.nearest_error if self.nearest_error > 0 else 1.0


class SharedInputs:
    """Each distinct input of a layer's planned modules as float32 rows, and per expert its rows, H
    and H's inverse Cholesky factor, computed once for every module that reads it (q, k and v read
    one input; gate and up another)."""

    def __init__(self, damp: float) -> None:
        self.damp = damp
        self.rows: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.factors: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, probe: Probe) -> int:
        key = id(probe.x)
        if key not in self.rows:
            inputs, experts = probe.rows()
            self.rows[key] = (np.asarray(inputs.astype(mx.float32)),
                              None if experts is None else np.asarray(experts))  # fmt: skip
        return key

    def experts(self, key: int) -> np.ndarray | None:
        return self.rows[key][1]

    def of(self, key: int, expert: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of input ``key`` (those routed to ``expert``, unless -1), their H and its factor."""
        if (key, expert) not in self.factors:
            x, routed = self.rows[key]
            if expert >= 0 and routed is not None:
                x = x[routed == expert]
            h = x.T @ x
            self.factors[key, expert] = (x, h, inverse_cholesky(h, self.damp) if len(x) else h)
        return self.factors[key, expert]


def round_module(
    w: mx.array,
    inputs: SharedInputs,
    key: int,
    q: dict[str, Any],
    quantizer: dict[str, Any],
    r: RoundingSettings,
    gain: Gain,
    path: str,
) -> Packed:
    """One planned module (2-D, or stacked experts (experts, out, in)) rounded under the H of its
    input ``key`` (for stacked experts, each expert under the H of the rows routed to it)."""
    bits, g = q["bits"], q["group_size"]
    opts = {"ranges": quantizer.get("ranges", ()), "refits": quantizer.get("refits", 0),
            "damp": r.damp, "block": r.block}  # fmt: skip
    routed = inputs.experts(key)
    error = nearest = 0.0
    out = []
    for e in range(w.shape[0]) if routed is not None else [-1]:
        weight = w if e < 0 else w[e]
        x, h, u = inputs.of(key, e)
        if len(x) < (r.min_expert_tokens if e >= 0 else 1):
            gain.experts_nearest += 1
            out.append(affine.quantize(weight, g, bits, **quantizer))
            continue
        rounded = compensated(weight, h, g, bits, x=x, u=u, **opts)
        error, nearest = error + rounded.error, nearest + rounded.nearest_error
        out.append(rounded.packed(w.dtype))
    gain.error, gain.nearest_error = gain.error + error, gain.nearest_error + nearest
    gain.modules += 1
    gain.per_module[path] = error / nearest if nearest > 0 else 1.0
    if routed is None:
        return out[0]
    stacked = tuple(mx.stack([o[k] for o in out]) for k in range(3))
    return stacked[0], stacked[1], stacked[2]


def unpacked(
    packed: Packed, shape: tuple[int, ...], q: dict[str, Any], dtype: mx.Dtype
) -> mx.array:
    """The weight as the quantized kernels compute it (scales and biases in ``dtype``)."""
    w, s, b = (a.reshape(-1, a.shape[-1]) for a in packed)
    out = affine.unpack_affine(w, s.astype(dtype), b.astype(dtype), q["group_size"], q["bits"])
    return out.reshape(shape)


def compensated_layers(
    source: Any,
    quantization: dict[str, Any],
    quantizer: dict[str, Any],
    rounding: dict[str, Any],
    gain: Gain,
    progress: bool = False,
) -> Iterator[tuple[int, dict[str, Packed]]]:
    """Per decoder layer in order, its planned modules' packed weights, compensated (``gain``
    collects how much error that removed)."""
    from tqdm import tqdm

    start = time.perf_counter()
    r = RoundingSettings(**{k: v for k, v in rounding.items() if k != "method"})
    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    stored = getattr(mx, source.float_dtype)
    run = StreamedModel(source, dtype)
    vocab = int(source.config["vocab_size"])
    bar = tqdm(total=r.sweeps + 1, desc="sampling", unit="pass", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    run.layer_done = lambda: bar.update(1 / len(run.layers))
    x = sampled_sequences(run, r.sequences, r.tokens, r.sweeps, r.seed,
                          start_token(source.config, vocab), vocab)  # fmt: skip
    h, args, kwargs = run.first_layer_call(x)
    bar.close()
    weights = source.weights()
    bar = tqdm(total=len(run.layers), desc="compensating", unit="layer", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    for i, layer in enumerate(run.layers):
        layer.update(run.layer_params(i))
        probes, _ = probe_modules(run, i)
        planned: dict[str, Probe] = {
            p: probe for p, probe in probes.items() if isinstance(quantization.get(p), dict)
        }
        swapped = [(p, run.swap(p, probe)) for p, probe in planned.items()]
        try:
            out = layer(h, *args, **kwargs)  # the probes record their inputs
            mx.eval(out, [probe.x for probe in planned.values()])
            results: dict[str, Packed] = {}
            shared = SharedInputs(r.damp)
            for path, probe in planned.items():
                w = weights.pop(f"{path}.weight").astype(stored)
                results[path] = round_module(
                    w, shared, shared.add(probe), quantization[path], quantizer, r, gain, path
                )
                mx.eval(results[path])
            del shared
        finally:
            for path, module in reversed(swapped):
                run.swap(path, module)
        if r.sequential and results:  # the next layer sees this one as it will be stored
            modules = dict(run.model.named_modules())
            for path, packed in results.items():
                m = modules[path]
                m.weight = unpacked(packed, m.weight.shape, quantization[path], dtype)
            out = layer(h, *args, **kwargs)
        mx.eval(out)
        h = out
        run.release_layer(i)
        bar.update(1)
        yield i, results
    bar.close()
    gain.seconds = time.perf_counter() - start
