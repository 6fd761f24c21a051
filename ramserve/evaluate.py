"""Measured quality: perplexity over a text and the KL divergence from a reference model.

A model is evaluated as a quantized folder (MLX's quantized kernels) or as a float source with a
quantization map (a plan, or a fixed recipe) *simulated*: each quantized module's weight is replaced by
``dequantize(quantize(W))`` with the scales and biases in the runtime dtype, which is what the quantized
kernels compute, so the float matmuls give the same logits (tests/test_evaluate.py checks it) and run
much faster on a CPU.

Sequences are non-overlapping windows of ``seq_len`` tokens of the text, ``samples`` of them spread
evenly across it: the same arguments give the same sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import affine
from .device import FLOAT_BYTES, runtime_dtype
from .engine import max_positions, require_kv_bits
from .errors import RamserveError
from .kvcache import sequence_caches
from .process import freed_memory_returned
from .profile import drawn_sequences
from .progress import Bar
from .rounding import Gain, compensated_layers, is_compensated, unpacked
from .settings import Settings
from .source import Source, open_source


class EvalError(RamserveError):
    """Evaluation input that cannot work: text too short, incompatible reference, sequence too long."""


@dataclass
class Evaluated:
    """A model ready to score: its mlx-lm module, tokenizer and what it is."""

    model: nn.Module
    tokenizer: Any
    label: str
    bits_per_weight: float
    stored_bytes: int
    kv_bits: int | None = None  # keys and values stored in these bits while scoring (kvcache)


@dataclass
class Scores:
    label: str
    bits_per_weight: float
    stored_bytes: int
    sequences: int
    seq_len: int
    tokens: int
    ppl_mean: float
    ppl_median: float
    kl_mean: float | None
    top1_agreement: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quantizable_paths(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}


def stored_bytes(source: Source, quantization: dict[str, Any]) -> int:
    """Bytes of the model stored with this quantization map (16-bit tensors in the source dtype)."""
    from .profile import quantized_bytes

    fb = FLOAT_BYTES[source.float_dtype]
    total = 0
    for name, shape in source.tensor_shapes.items():
        q = quantization.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        numel = math.prod(shape)
        if isinstance(q, dict):
            total += quantized_bytes(numel, shape[-1], q["bits"], q["group_size"], fb)
        else:
            total += numel * fb
    return total


def recipe_quantization(source: Source, recipe: str) -> dict[str, Any]:
    """The quantization map mlx-lm's converter produces for a fixed recipe, by its own predicates.

    ``uniform-<bits>g<group>`` is ``mlx_lm.convert -q --q-bits B --q-group-size G`` (the model's own
    quant_predicate applies, e.g. 8-bit MoE routers); ``mixed_3_6`` etc. are mlx-lm's named recipes.
    """
    from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder

    model = source.model
    if recipe.startswith("uniform-"):
        try:
            bits_s, group_s = recipe.removeprefix("uniform-").split("g")
            bits, group = int(bits_s), int(group_s)
        except ValueError:
            raise EvalError(
                f"bad recipe {recipe!r}: write uniform-<bits>g<group>, e.g. uniform-4g64"
            ) from None
        base = getattr(model, "quant_predicate", None)
    elif recipe in QUANT_RECIPES:
        bits, group = 0, 64
        base = mixed_quant_predicate_builder(recipe, model, group)
    else:
        raise EvalError(
            f"unknown recipe {recipe!r}: use uniform-<bits>g<group> or one of {QUANT_RECIPES}"
        )
    out: dict[str, Any] = {}
    for path, module in quantizable_paths(model).items():
        if module.weight.shape[-1] % group:
            continue
        params: Any = base(path, module) if base else True
        if params is False:
            continue
        q = {"group_size": group, "bits": bits, "mode": "affine"}
        if isinstance(params, dict):
            q.update(params)
        out[path] = q
    return out


def simulate(
    model: nn.Module,
    quantization: dict[str, Any],
    dtype: mx.Dtype,
    quantizer: dict[str, Any] | None = None,
    rounding: dict[str, Any] | None = None,
    source: Source | None = None,
) -> None:
    """Replace each quantized module's weight by dequantize(quantize(W)), as the kernels compute it:
    quantized from the stored float weight by ``quantizer`` (a plan's; default mx.quantize, as
    mlx-lm does) and ``rounding`` (a plan's: compensated rounding runs on ``source``, as
    ``quantize`` runs it), scales and biases stored in it and used in ``dtype``."""
    modules = quantizable_paths(model)
    for path in quantization:
        if isinstance(quantization[path], dict) and path not in modules:
            raise EvalError(f"the quantization map names {path!r}, which this model does not have")
    done = set()
    if rounding and is_compensated(rounding):
        assert source is not None, "compensated rounding runs on the source"
        drawn = drawn_sequences(source, rounding)  # as quantize takes them
        layers = compensated_layers(source, quantization, quantizer or {}, rounding, Gain(),
                                    sequences=drawn)  # fmt: skip
        with freed_memory_returned():  # the pass's activations, not the heap's high-water
            for _, results in layers:
                for path, packed in results.items():
                    m = modules[path]
                    m.weight = unpacked(packed, m.weight.shape, quantization[path], dtype)
                    mx.eval(m.weight)
                    done.add(path)
    for path, q in quantization.items():
        if not isinstance(q, dict) or path in done:
            continue
        m = modules[path]
        g, bits = q["group_size"], q["bits"]
        m.weight = affine.dequantize(m.weight, g, bits, **(quantizer or {}), dtype=dtype)
        mx.eval(m.weight)


def load_source_model(source: Source) -> tuple[nn.Module, Any]:
    from mlx_lm.utils import load_model, load_tokenizer

    model = load_model(source.path, lazy=True)[0]
    return model, load_tokenizer(source.path)


def load_for_eval(
    spec: str,
    settings: Settings,
    quantization: dict[str, Any] | None = None,
    label: str | None = None,
    quantizer: dict[str, Any] | None = None,
    rounding: dict[str, Any] | None = None,
) -> Evaluated:
    """A model to evaluate: a folder as it is stored (quantized or not), or a float source with a
    quantization map simulated on it (by ``quantizer``, see ``simulate``)."""
    source = open_source(spec, settings)
    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    if source.quantization and quantization:
        raise EvalError(f"{source.path} is already quantized; a plan applies to a float source")
    model, tokenizer = load_source_model(source)
    if quantization:
        simulate(model, quantization, dtype, quantizer, rounding, source)
        size = stored_bytes(source, quantization)
    else:
        size = sum(
            math.prod(shape) * getattr(mx, source.tensor_dtypes[k]).size
            for k, shape in source.tensor_shapes.items()
        )
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    params = source.parameter_count if not source.quantization else _params_of(model)
    return Evaluated(model, tokenizer, label or source.name, 8 * size / params, size)


def _params_of(model: nn.Module) -> int:
    """Logical parameter count of a quantized model (packed words unpacked)."""
    total = 0
    for _, m in model.named_modules():
        bits = getattr(m, "bits", None)
        for k, v in m.parameters().items():
            if not isinstance(v, mx.array):
                continue
            if k == "weight" and bits:
                total += v.size * 32 // bits
            elif k not in ("scales", "biases") or not bits:
                total += v.size
    return total


def vocab_size(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "args", None), "vocab_size", None)
    return int(value) if value else None


def encode(tokenizer: Any, text: str) -> list[int]:
    """The whole text's tokens (transformers warns that it is longer than the model's context: it is
    split into windows after)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return list(tokenizer.encode(text))
    finally:
        logging.set_verbosity(level)


def token_windows(tokens: Sequence[int], seq_len: int, samples: int | None) -> np.ndarray:
    """``samples`` non-overlapping windows of ``seq_len`` tokens spread evenly over the text."""
    n = len(tokens) // seq_len
    if n < 1:
        raise EvalError(
            f"the text has {len(tokens)} tokens, fewer than one sequence of {seq_len}: "
            "give a longer text or a smaller --seq-len"
        )
    count = n if samples is None else min(samples, n)
    picks = np.linspace(0, n - 1, count).round().astype(np.int64)
    arr = np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return arr[picks]


def check_model(e: Evaluated, seq_len: int) -> None:
    limit = max_positions(e.model)
    if seq_len > limit:
        raise EvalError(f"--seq-len {seq_len} is beyond {e.label}'s context of {limit} tokens")


def check_reference(e: Evaluated, ref: Evaluated, sample_text: str) -> None:
    """The reference must predict over the same tokens: same vocabulary size and same encoding."""
    va, vb = vocab_size(e.model), vocab_size(ref.model)
    if va != vb:
        raise EvalError(f"the reference {ref.label} has a vocabulary of {vb}, {e.label} of {va}")
    if encode(e.tokenizer, sample_text) != encode(ref.tokenizer, sample_text):
        raise EvalError(
            f"the reference {ref.label} tokenizes the text differently from {e.label}: "
            "compare models that share a tokenizer"
        )


def log_probs(model: nn.Module, batch: mx.array, kv_bits: int | None = None) -> mx.array:
    """Next-token log-probabilities; with ``kv_bits`` every layer's keys and values are stored in
    that many bits before attention reads them, as the serving engine stores them."""
    cache = sequence_caches(model, kv_bits)
    logits: mx.array = model(batch, cache=cache).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def batches(windows: np.ndarray, batch_size: int) -> Iterator[mx.array]:
    for i in range(0, len(windows), batch_size):
        yield mx.array(windows[i : i + batch_size])


def reference_log_probs(
    ref: Evaluated, windows: np.ndarray, batch_size: int = 4, progress: bool = True
) -> list[mx.array]:
    """The reference's next-token log-probabilities per batch, kept to score several models against."""
    out = []
    todo = list(batches(windows, batch_size))
    bar = Bar(len(todo), f"reference {ref.label}", unit="batch", show=progress)
    for b in todo:
        lp = log_probs(ref.model, b)
        mx.eval(lp)
        out.append(lp)
        bar.update(1)
    bar.close()
    return out


def score(
    e: Evaluated,
    windows: np.ndarray,
    reference: Evaluated | list[mx.array] | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> Scores:
    """Perplexity (mean over tokens, median over sequences) and, given a reference, the mean KL
    divergence per token KL(reference ‖ model) and how often both rank the same token first."""
    nll_per_seq: list[np.ndarray] = []
    kl_sum, agree, counted = 0.0, 0, 0
    todo = list(batches(windows, batch_size))
    bar = Bar(len(windows), f"scoring {e.label}", unit="seq", show=progress)
    for i, b in enumerate(todo):
        lp = log_probs(e.model, b, e.kv_bits)[:, :-1]
        targets = b[:, 1:]
        nll = -mx.take_along_axis(lp, targets[..., None], axis=-1)[..., 0].sum(-1)
        parts = [nll]
        if reference is not None:
            ref = reference[i] if isinstance(reference, list) else log_probs(reference.model, b)
            ref = ref[:, :-1]
            kl = (mx.exp(ref) * (ref - lp)).sum(-1)
            parts += [kl.sum(), (ref.argmax(-1) == lp.argmax(-1)).sum()]
        mx.eval(parts)
        nll_per_seq.append(np.asarray(parts[0], dtype=np.float64))
        if reference is not None:
            kl_sum += float(np.asarray(parts[1]))
            agree += int(np.asarray(parts[2]))
        counted += int(targets.size)
        bar.update(int(b.shape[0]))
    bar.close()
    nll_seq = np.concatenate(nll_per_seq)
    per_token = windows.shape[1] - 1
    return Scores(
        label=e.label,
        bits_per_weight=e.bits_per_weight,
        stored_bytes=e.stored_bytes,
        sequences=len(windows),
        seq_len=windows.shape[1],
        tokens=counted,
        ppl_mean=float(np.exp(nll_seq.sum() / counted)),
        ppl_median=float(np.median(np.exp(nll_seq / per_token))),
        kl_mean=kl_sum / counted if reference is not None else None,
        top1_agreement=agree / counted if reference is not None else None,
    )


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EvalError(f"cannot read the text {path}: {e.strerror}") from e


def evaluate(
    model: str,
    text: Path,
    settings: Settings,
    *,
    reference: str | None = None,
    quantization: dict[str, Any] | None = None,
    quantizer: dict[str, Any] | None = None,
    rounding: dict[str, Any] | None = None,
    label: str | None = None,
    seq_len: int = 512,
    samples: int | None = 48,
    batch_size: int = 4,
    kv_bits: int | None = None,
    progress: bool = True,
) -> Scores:
    """``ramserve eval``: score one model (simulating ``quantization`` if given, with its KV cache
    in ``kv_bits``) on a text."""
    if seq_len < 2:
        raise EvalError(f"--seq-len must be at least 2, not {seq_len}")
    if samples is not None and samples < 1:
        raise EvalError(f"--samples must be at least 1, not {samples}")
    content = read_text(text)
    e = load_for_eval(model, settings, quantization, label, quantizer, rounding)
    e.kv_bits = require_kv_bits(e.model, kv_bits)
    if e.kv_bits is not None:
        e.label = f"{e.label}, {e.kv_bits}-bit KV"
    check_model(e, seq_len)
    windows = token_windows(encode(e.tokenizer, content), seq_len, samples)
    ref = None
    if reference is not None:
        ref = load_for_eval(reference, settings)
        check_reference(e, ref, content[:20000])
    return score(e, windows, ref, batch_size, progress)


def render_scores(s: Scores | list[Scores]) -> str:
    from .fmt import table

    rows = s if isinstance(s, list) else [s]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return table(
        ["model", "bits/weight", "ppl mean", "ppl median", "KL mean", "top-1 agree"],
        [
            [
                r.label,
                f"{r.bits_per_weight:.3f}",
                f"{r.ppl_mean:.4f}",
                f"{r.ppl_median:.4f}",
                fmt(r.kl_mean, ".5f"),
                fmt(r.top1_agreement, ".4f"),
            ]
            for r in rows
        ],  # fmt: skip
    )
