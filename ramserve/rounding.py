"""A plan's weights rounded with error compensation, layer by layer, from sequences the model writes.

Compensated rounding (ramserve/compensate.py) needs each module's input second moments H = XᵀX. There is
no data, so the inputs come from the model itself: ``sequences`` sequences of ``tokens`` tokens from its
own parallel sampling sweeps (fisher.sampled_sequences, seeded, so the same plan always gets the same
weights). One streamed pass then runs the layers in order with one layer's weights resident: each
layer's linear modules record their inputs (fisher.Probe), and each planned module is rounded under its
own H (stacked experts: each expert under the H of the tokens routed to it, or to nearest when fewer
than ``min_expert_tokens`` reached it).

The same pass, at analysis, measures on a row sample how much of each candidate's error compensation
removes (``compensation_ratios``), so that the profile predicts the damage of the rounding a plan gets.

An untied head is rounded last, under the H of its inputs (the final norm of the last layer's
output). The embedding, a tied head and any module no probe covers are rounded to nearest by the
caller. ``quantize`` writes what this yields; ``evaluate`` simulates it, so the
simulated and the stored model are the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from . import affine
from .compensate import compensated, inverse_cholesky
from .device import runtime_dtype
from .fisher import Probe, StreamedModel, probe_modules, sampled_sequences, start_token
from .process import blas_threads_as_at_start
from .progress import Bar
from .relay import Share, chunk_rows, come_back, pass_on, settle, up
from .settings import RoundingSettings
from .source import ExpertBytes, layer_index

Weight = mx.array | ExpertBytes  # a module's weight, or its stacked experts read one at a time

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

    @property
    def ratio(self) -> float:
        return self.error / self.nearest_error if self.nearest_error > 0 else 1.0


@dataclass
class InputStats:
    """One input's statistics (for one expert, or all rows): how many rows, H = XᵀX and H's inverse
    Cholesky factor."""

    count: int
    h: np.ndarray
    u: np.ndarray


class SharedInputs:
    """Each distinct input of a layer's planned modules (q, k and v read one input; gate and up
    another), keyed by the first module that reads it, and per (input, expert) the ``InputStats``,
    computed once for every module that reads it. What is kept of the rows is whichever is smaller,
    so the pass's memory does not grow with the tokens as the rows would:

    - H = XᵀX summed over the pieces the pass runs the layer on (per expert for stacked experts
      whose every (token, expert) pair has an input of its own: the experts' down projection);
    - the rows themselves where stacked experts share each token's input (their gate and up): with
      E experts, the tokens' rows are ~E×width/tokens times smaller than E sums of H (Qwen3-30B's
      128 experts at 8,192 tokens: 67 MB against 2.1 GB). Each expert's H is formed when it is
      rounded, from the rows routed to it."""

    def __init__(self, damp: float) -> None:
        self.damp = damp
        self.sums: dict[tuple[str, int], tuple[int, np.ndarray]] = {}
        self.width: dict[str, int] = {}
        self.routed: dict[str, list[np.ndarray]] = {}
        # shared rows: per input, each piece's distinct rows and the row of each (token, expert)
        self.rows: dict[str, list[np.ndarray]] = {}
        self.row_of: dict[str, list[np.ndarray]] = {}
        self.stats: dict[tuple[str, int], InputStats] = {}

    def add(self, probes: dict[str, Probe]) -> dict[str, str]:
        """One piece's inputs, as ``probes`` (by module path) recorded them; each module's key."""
        keys: dict[str, str] = {}
        first: dict[int, str] = {}
        for path, probe in probes.items():
            keys[path] = first.setdefault(id(probe.x), path)
            if keys[path] != path:
                continue
            if (shared := probe.token_rows()) is not None:
                self.add_token_rows(path, *shared)
            else:
                self.add_rows(path, *probe.rows())
        return keys

    def add_rows(self, key: str, inputs: mx.array, experts: mx.array | None = None) -> None:
        """Rows of input ``key``, each its own (routed to ``experts``, for stacked experts)."""
        x = _float_rows(inputs)
        self.width[key] = x.shape[1]
        if experts is None:
            self._add(key, -1, x)
            return
        routed = np.asarray(experts)
        self._route(key, routed)
        for e in np.unique(routed):
            self._add(key, int(e), x[routed == e])

    def add_token_rows(self, key: str, inputs: mx.array, experts: mx.array, row_of: mx.array
                       ) -> None:  # fmt: skip
        """Rows of input ``key`` shared by stacked experts: each (token, expert) pair goes to
        ``experts`` and reads row ``row_of`` of ``inputs``."""
        x = _float_rows(inputs)
        self.width[key] = x.shape[1]
        offset = sum(len(r) for r in self.rows.get(key, []))
        self.rows.setdefault(key, []).append(x.copy())  # not a view of the piece's activations
        self.row_of.setdefault(key, []).append(np.asarray(row_of) + offset)
        self._route(key, np.asarray(experts))

    def _route(self, key: str, routed: np.ndarray) -> None:
        self.routed.setdefault(key, []).append(routed)
        if len(self.routed[key]) > 1:  # joined once, so that readers need not join them again
            self.routed[key] = [np.concatenate(self.routed[key])]

    def _add(self, key: str, expert: int, x: np.ndarray) -> None:
        count, h = self.sums.get((key, expert), (0, None))
        if h is None:
            h = x.T @ x
        else:
            h += x.T @ x  # in place: at 5,632 columns a sum is 127 MB
        self.sums[key, expert] = (count + len(x), h)

    def experts(self, key: str) -> np.ndarray | None:
        """The expert of each of input ``key``'s rows, for stacked experts; else None."""
        routed = self.routed.get(key)
        return routed[0] if routed else None

    def of(self, key: str, expert: int = -1) -> InputStats:
        """The statistics of input ``key``'s rows (those routed to ``expert``, unless -1)."""
        if (key, expert) not in self.stats:
            width = self.width[key]
            if key in self.rows:
                self._join(key)
                routed = self.experts(key)
                assert routed is not None
                x = self.rows[key][0][self.row_of[key][0][routed == expert]]
                count, h = len(x), x.T @ x
            else:
                count, h = self.sums.pop((key, expert), (0, np.zeros((width, width), np.float32)))
            u = inverse_cholesky(h, self.damp) if count else h
            self.stats[key, expert] = InputStats(count, h, u)
        return self.stats[key, expert]

    def _join(self, key: str) -> None:
        for held in (self.rows, self.row_of):
            if len(held[key]) > 1:
                held[key] = [np.concatenate(held[key])]

    def release(self, key: str, expert: int | None = None) -> None:
        """Lets go of what is held for input ``key``'s rows routed to ``expert`` (None: all of
        them, and the rows themselves), which no module left to round reads."""
        for held in (self.stats, self.sums):
            for k in [k for k in held if k[0] == key and expert in (None, k[1])]:
                del held[k]
        if expert is None:
            self.rows.pop(key, None)
            self.row_of.pop(key, None)


def _float_rows(inputs: mx.array) -> np.ndarray:
    return np.asarray(inputs.reshape(-1, inputs.shape[-1]).astype(mx.float32))


def readers(keys: dict[str, str]) -> dict[str, list[str]]:
    """The modules (paths) that read each input, by the input's key."""
    out: dict[str, list[str]] = {}
    for path, key in keys.items():
        out.setdefault(key, []).append(path)
    return out


def _options(quantizer: dict[str, Any], r: RoundingSettings) -> dict[str, Any]:
    """``compensate.compensated``'s options from a plan's quantizer and rounding."""
    return {"ranges": quantizer.get("ranges", ()), "refits": quantizer.get("refits", 0),
            "damp": r.damp, "block": r.block, "descent": r.descent_sweeps,
            "scale_rounds": r.scale_rounds}  # fmt: skip


def round_input(
    weights: dict[str, Weight],
    inputs: SharedInputs,
    key: str,
    plans: dict[str, dict[str, Any]],
    quantizer: dict[str, Any],
    r: RoundingSettings,
    gain: Gain,
) -> dict[str, Packed]:
    """The planned modules that read input ``key`` (by path: 2-D weights, or stacked experts
    (experts, out, in)), each rounded under that input's H, and for stacked experts each expert under
    the H of the rows routed to it: expert by expert, so that one expert's statistics are held at a
    time (``SharedInputs.release``)."""
    opts = _options(quantizer, r)
    routed = inputs.experts(key)
    experts = range(next(iter(weights.values())).shape[0]) if routed is not None else [-1]
    out: dict[str, list[Packed]] = {path: [] for path in weights}
    for e in experts:
        stats = inputs.of(key, e)
        enough = stats.count >= (r.min_expert_tokens if e >= 0 else 1)
        for path, w in weights.items():
            weight, q = w[e] if e >= 0 else w, plans[path]
            assert isinstance(weight, mx.array)  # a 2-D weight is read whole
            if not enough:
                gain.experts_nearest += 1
                out[path].append(affine.quantize(weight, q["group_size"], q["bits"], **quantizer))
                continue
            rounded = compensated(weight, stats.h, q["group_size"], q["bits"], u=stats.u, **opts)
            gain.error += rounded.error
            gain.nearest_error += rounded.nearest_error
            out[path].append(rounded.packed(w.dtype))
        inputs.release(key, e)
    inputs.release(key)
    gain.modules += len(weights)
    if routed is None:
        return {path: parts[0] for path, parts in out.items()}
    return {path: _stacked(parts) for path, parts in out.items()}


def _stacked(parts: list[Packed]) -> Packed:
    q, s, b = (mx.stack([p[k] for p in parts]) for k in range(3))
    return q, s, b


def unpacked(
    packed: Packed, shape: tuple[int, ...], q: dict[str, Any], dtype: mx.Dtype
) -> mx.array:
    """The weight as the quantized kernels compute it (scales and biases in ``dtype``)."""
    w, s, b = (a.reshape(-1, a.shape[-1]) for a in packed)
    out = affine.unpack_affine(w, s.astype(dtype), b.astype(dtype), q["group_size"], q["bits"])
    return out.reshape(shape)


def drawn_with(source: Any, r: RoundingSettings) -> dict[str, Any]:
    """What the self-sampled sequences depend on besides the model's weights."""
    return {"sequences": r.sequences, "tokens": r.tokens, "sweeps": r.sweeps, "seed": r.seed,
            "dtype": runtime_dtype(source.float_dtype)}  # fmt: skip


@dataclass
class Sequences:
    """The token sequences a pass takes its inputs from: set before the pass to reuse those an
    earlier pass drew with the same settings (``drawn_with``), else drawn by the pass and left here.
    Only the first rank's are the model's: the ranks after it hold no head and never read tokens."""

    tokens: mx.array | None = None


def layer_inputs(
    source: Any,
    r: RoundingSettings,
    wanted: Callable[[str], bool],
    desc: str,
    progress: bool,
    share: Share | None = None,
    meanwhile: Callable[[], None] | None = None,
    sequences: Sequences | None = None,
) -> Iterator[tuple[int, dict[str, str], SharedInputs]]:
    """The streamed pass: per decoder layer in order (of this rank's ``share``), the wanted linear
    modules' inputs on the self-sampled ``sequences`` (``SharedInputs``, keyed per module). The
    layers' inputs come from the float model: rounding them in order (later layers seeing the rounded
    earlier ones, as GPTQ does) scored no better (configs/defaults.toml [rounding]) and costs a second
    pass per layer. ``meanwhile`` runs once the sequences are sampled, where this rank would
    otherwise wait for the ranks before it (``relay.up``)."""
    with blas_threads_as_at_start():  # the same bytes for a plan in any process
        yield from _layer_inputs(source, r, wanted, desc, progress, share, meanwhile,
                                 sequences or Sequences())  # fmt: skip


def _layer_inputs(
    source: Any,
    r: RoundingSettings,
    wanted: Callable[[str], bool],
    desc: str,
    progress: bool,
    share: Share | None,
    meanwhile: Callable[[], None] | None,
    sequences: Sequences,
) -> Iterator[tuple[int, dict[str, str], SharedInputs]]:
    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    run = StreamedModel(source, dtype, share, r.pass_tokens)
    share = run.share
    vocab = int(source.config["vocab_size"])
    draw = sequences.tokens is None
    # the sweeps, and on ranks before the last the pass that passes the inputs on
    passes = r.sweeps * draw + (not share.last)
    bar = Bar(passes, f"{desc}: sampling", unit="pass", show=progress and passes > 0)
    run.layer_done = lambda part: bar.update(part / len(share.layers))
    if draw:
        sequences.tokens = sampled_sequences(run, r.sequences, r.tokens, r.sweeps, r.seed,
                                             start_token(source.config, vocab), vocab)  # fmt: skip
    x = sequences.tokens
    assert x is not None
    h, args, kwargs = run.first_layer_call(x)
    rows = chunk_rows(share, x.shape[0])
    # The ranks before the last run their layers once first, pipelined, to pass each chunk on at
    # once, keeping each layer's input for their own work: the ranks after them start meanwhile.
    # The last rank runs its layers once, in this work, and passes on the model's output after it.
    seen: dict[int, list[mx.array]] = {}
    arrived = up(share, [h[r] for r in rows], run.through(args, kwargs, seen, len(rows)), meanwhile)
    kept = [affine.joined(seen.pop(i)) for i in share.layers] if seen else []
    # the layers' activations as pieces (StreamedModel.in_pieces), never held whole twice; a kept
    # input (one a layer) is let go once its layer has taken it
    pieces = [] if kept else run.pieces(affine.joined(arrived))
    del h, arrived
    bar.close()
    bar = Bar(len(share.layers), desc, unit="layer", show=progress)
    for i in share.layers:
        layer = run.layers[i]
        pieces = run.pieces(kept.pop(0)) if kept else pieces
        layer.update(run.layer_params(i))
        probes, _ = probe_modules(run, i)
        chosen = {p: probe for p, probe in probes.items() if wanted(p)}
        swapped = [(p, run.swap(p, probe)) for p, probe in chosen.items()]
        shared, keys = SharedInputs(r.damp), dict[str, str]()
        try:
            pieces = run.in_pieces(layer, pieces, args, kwargs, _recording(chosen, shared, keys))
        finally:
            for path, module in reversed(swapped):
                run.swap(path, module)
        del chosen, probes
        run.release_layer(i)
        yield i, keys, shared
        bar.update(1)
    bar.close()
    settle()  # the inputs this rank passed on have long been received
    h = affine.joined(pieces)
    del pieces
    if share.last:
        pass_on(share, [h])
    h = come_back(share, [h])[0]
    # a tied head is the embedding's lookup table too; the head is rank 0's
    if share.first and not run.tied and wanted(run.head_path):
        shared = SharedInputs(r.damp)
        shared.add_rows(run.head_path, run.head_inputs(x, h))
        yield AFTER_LAYERS, {run.head_path: run.head_path}, shared


def _recording(
    probes: dict[str, Probe], shared: SharedInputs, keys: dict[str, str]
) -> Callable[[mx.array], None]:
    """What follows each piece of the probed pass: its output evaluated with the inputs the
    ``probes`` recorded, which ``shared`` adds up (``keys``: each module's input)."""

    def after(out: mx.array) -> None:
        mx.eval(out, [probe.x for probe in probes.values()])
        keys.update(shared.add(probes))

    return after


AFTER_LAYERS = 1 << 30  # the untied head's place in the pass: after every layer


def pass_position(path: str, head: str | None) -> int | None:
    """Where in the pass a module is rounded: its decoder layer's index, AFTER_LAYERS for the
    untied ``head``; None for a module the pass does not round (the embedding, a tied head)."""
    return AFTER_LAYERS if path == head else layer_index(path)


def compensated_layers(
    source: Any,
    quantization: dict[str, Any],
    quantizer: dict[str, Any],
    rounding: dict[str, Any],
    gain: Gain,
    progress: bool = False,
    share: Share | None = None,
    sequences: Sequences | None = None,
) -> Iterator[tuple[int, dict[str, Packed]]]:
    """Per decoder layer in order, its planned modules' packed weights, compensated (``gain``
    collects how much error that removed) under the inputs of ``sequences`` (``layer_inputs``)."""
    start = time.perf_counter()
    r = RoundingSettings(**rounding)
    stored = getattr(mx, source.float_dtype)
    weights = source.weights()

    def planned(path: str) -> bool:
        return isinstance(quantization.get(path), dict)

    for i, keys, shared in layer_inputs(source, r, planned, "compensating", progress, share,
                                        sequences=sequences):  # fmt: skip
        results: dict[str, Packed] = {}
        for key, paths in readers(keys).items():
            read = {p: _weight(source, weights, p, stored) for p in paths}
            done = round_input(read, shared, key, {p: quantization[p] for p in paths},
                               quantizer, r, gain)  # fmt: skip
            mx.eval(done)
            results |= done
            del read
            mx.clear_cache()  # inputs differ in width: MLX's cache would keep each one's buffers
        yield i, results
    gain.seconds = time.perf_counter() - start


def _weight(source: Any, weights: dict[str, mx.array], path: str, dtype: mx.Dtype) -> Weight:
    """Module ``path``'s weight in ``dtype``, lazily: stacked experts are read an expert at a time
    where the checkpoint allows (``Source.experts_as_stored``), so that rounding a layer's experts,
    or measuring a few of them, never holds its stacks (Qwen3-30B: 400 MB a projection)."""
    whole = weights.pop(f"{path}.weight")
    return (source.experts_as_stored(f"{path}.weight") or whole).astype(dtype)


def _sample(w: Weight, shared: SharedInputs, key: str, r: RoundingSettings
            ) -> list[tuple[mx.array, int]]:  # fmt: skip
    """Rows to measure a module's compensation on, with the expert whose H they take (-1: none):
    ``RATIO_ROWS`` spread over the rows; for stacked experts, spread over the ``RATIO_EXPERTS``
    experts that saw the most tokens (of those with enough)."""
    routed = shared.experts(key)
    if routed is None:
        assert isinstance(w, mx.array)  # only stacked experts are read by the expert
        idx = np.unique(np.linspace(0, w.shape[0] - 1, min(RATIO_ROWS, w.shape[0])).astype(int))
        return [(w[mx.array(idx)], -1)]
    counts = np.bincount(routed, minlength=w.shape[0])
    busiest = [
        int(e) for e in np.argsort(-counts)[:RATIO_EXPERTS] if counts[e] >= r.min_expert_tokens
    ]
    per = max(1, RATIO_ROWS // max(1, len(busiest)))
    out = []
    for e in busiest:
        idx = np.unique(np.linspace(0, w.shape[1] - 1, min(per, w.shape[1])).astype(int))
        out.append((w[e][mx.array(idx)], e))
    return out


RATIO_ROWS = 64
RATIO_EXPERTS = 4


def compensation_ratios(
    source: Any,
    rounding: dict[str, Any],
    candidates: dict[str, list[tuple[int, int]]],
    quantizer: dict[str, Any],
    progress: bool = False,
    share: Share | None = None,
    meanwhile: Callable[[], None] | None = None,
    sequences: Sequences | None = None,
) -> dict[str, float]:
    """Per module: the output error under the sampled inputs' H of compensated rounding, as a share
    of rounding to nearest's, measured on a row sample at the candidate nearest 4-bit g64. The share
    is a property of the module's inputs far more than of the candidate (code-qwen3-30m: 0.23-0.66
    across modules, within ±6% across 2-8 bits in each), so the profile scales every candidate's
    predicted damage by it (``Option.rounding_ratio``). ``meanwhile``, ``sequences``: see
    ``layer_inputs``."""
    r = RoundingSettings(**rounding)
    stored = getattr(mx, source.float_dtype)
    weights = source.weights()
    out: dict[str, float] = {}
    opts = _options(quantizer, r)
    for _, keys, shared in layer_inputs(source, r, lambda p: bool(candidates.get(p)),
                                        "compensation", progress, share, meanwhile,
                                        sequences):  # fmt: skip
        for key, paths in readers(keys).items():
            for path in paths:
                out[path] = _measured_ratio(_weight(source, weights, path, stored), shared, key,
                                            candidates[path], r, opts)  # fmt: skip
            shared.release(key)
    return out


def _measured_ratio(w: Weight, shared: SharedInputs, key: str,
                    candidates: list[tuple[int, int]], r: RoundingSettings, opts: dict[str, Any]
                    ) -> float:  # fmt: skip
    """One module's share of rounding to nearest's error that compensation keeps (a function of
    its own, so that the statistics and results it holds go when it returns)."""
    bits, g = min(candidates, key=lambda c: (abs(c[0] - 4), abs(c[1] - 64)))
    error = nearest = 0.0
    for rows, e in _sample(w, shared, key, r):
        stats = shared.of(key, e)
        done = compensated(rows, stats.h, g, bits, u=stats.u, **opts)
        error, nearest = error + done.error, nearest + done.nearest_error
    return error / nearest if nearest > 0 else 1.0
