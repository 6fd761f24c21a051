"""Quantized layers for MLX's CPU back end, where its quantized matmul runs on one thread and unpacks
the weight once per input row: M rows cost M times one row, and eight decoding streams ran no faster
in total than one (bench/serve.py: 36 vs 35 tokens/s). Two changes, on the CPU only (on Metal the
quantized kernels use the GPU and batch well):

- a large layer's output rows are split over one MLX stream per core (each stream runs on its own
  thread), which makes one stream decode about 1.4x faster;
- given at least ``min_rows`` input rows, the weight is dequantized once, a slab of output rows at a
  time (so the dense copy never exceeds ``slab_bytes`` per stream), and multiplied by BLAS: a step
  for 8 sequences then costs about 3.5x a step for one instead of 7x.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .affine import unpack_affine
from .process import blas_threads
from .seams import swap_classes


def _rows(layer: Any, rows: slice) -> tuple[mx.array, mx.array, mx.array | None]:
    """The packed weight, scales and biases (None in modes without them) of some output rows."""
    biases = layer.get("biases")
    return layer["weight"][rows], layer["scales"][rows], None if biases is None else biases[rows]


def _dequantize(layer: Any, rows: slice) -> mx.array:
    weight, scales, biases = _rows(layer, rows)
    if layer.mode == "affine" and biases is not None:
        return unpack_affine(weight, scales, biases, layer.group_size, layer.bits)
    return mx.dequantize(
        weight, scales, biases, group_size=layer.group_size, bits=layer.bits, mode=layer.mode
    )


def _quantized(layer: Any, x: mx.array, rows: slice) -> mx.array:
    weight, scales, biases = _rows(layer, rows)
    return mx.quantized_matmul(
        x,
        weight,
        scales=scales,
        biases=biases,
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


@functools.cache
def blas_gflops() -> float:
    """The float32 matmul rate of the BLAS MLX calls here, best of five (about 3 GFLOP/s with the
    reference BLAS of MLX's Linux wheel, 50-150 with OpenBLAS on 2 cores). Measured once a process:
    the BLAS does not change, and every model (re)load asks. Best of five, because other processes
    busy on the same cores (an analysis beside a server) divide any one reading."""
    a = mx.random.normal((384, 384), key=mx.random.key(0))
    mx.eval(a @ a)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - start)
    return 2 * 384**3 / best / 1e9


_threads = threading.local()


def _streams(count: int) -> list[Any]:
    """This thread's CPU streams for split matmuls (MLX runs each stream on its own thread)."""
    streams = getattr(_threads, "streams", None)
    if streams is None or len(streams) != count:
        streams = _threads.streams = [mx.new_stream(mx.cpu) for _ in range(count)]
    return streams


class _CpuMatmul:
    """Mixin: x @ W.T, its output rows split over ``workers`` CPU streams when W is large, and
    through a dense copy of W, one slab at a time, for inputs of at least ``min_rows`` rows."""

    min_rows: int = 4
    workers: int = 1
    # Weights below this are not split: handing them to another thread costs more than it saves.
    split_weights: int = 1 << 18
    slab_bytes: int = 16 << 20

    def _matmul(self: Any, x: mx.array) -> mx.array:
        out, inner = self["weight"].shape[0], x.shape[-1]
        dense = x.size >= self.min_rows * inner
        split = self.workers > 1 and out * inner >= self.split_weights
        streams = _streams(self.workers) if split else [None]
        pieces = len(streams)
        if dense:
            pieces = max(pieces, -(-out * inner * x.itemsize // self.slab_bytes))
        step = -(-out // pieces)
        parts = []
        for i, start in enumerate(range(0, out, step)):
            rows, stream = slice(start, start + step), streams[i % len(streams)]
            with mx.stream(stream) if stream is not None else contextlib.nullcontext():
                parts.append(x @ _dequantize(self, rows).T if dense else _quantized(self, x, rows))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class CpuLinear(_CpuMatmul, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        return y + self["bias"] if "bias" in self else y


class CpuEmbedding(_CpuMatmul, nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self._matmul(x)


_CONVERSIONS: dict[type, type] = {
    nn.QuantizedLinear: CpuLinear,
    nn.QuantizedEmbedding: CpuEmbedding,
}


def adapt_to_cpu(model: nn.Module, *, min_rows: int, workers: int, min_gflops: float) -> int:
    """Give the model's quantized layers the CPU paths above; how many layers changed. The dense
    path needs a fast BLAS (``min_gflops``): with MLX's reference BLAS it is slower than row by row.

    The layers keep their parameters and their place in the tree (only their class changes), so
    everything that reads the model, from weight counts to mlx-lm's generation, sees no difference.
    """
    if blas_gflops() < min_gflops:
        min_rows = sys.maxsize
    if workers > 1:
        # its own threads fought the streams for the same cores (bench/serve.py, 8 streams: 85
        # tokens/s with them, 118 without)
        blas_threads(1)
    changed = swap_classes(model, _CONVERSIONS)  # seams: same parameters, same tree
    for module in changed:
        module.min_rows, module.workers = min_rows, workers
    return len(changed)
