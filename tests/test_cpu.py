"""The CPU paths of quantized layers (ramserve/cpu.py): the same results as MLX's own layers."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step

from ramserve import cpu

from .factory import make_model


def _weights(rows: int, cols: int) -> mx.array:
    rng = np.random.default_rng(rows * cols)
    scale = np.exp(
        rng.normal(0, 1, (rows, 1))
    )  # rows of very different ranges, as in trained models
    return mx.array((rng.normal(0, 1, (rows, cols)) * scale).astype(np.float32))


def _adapt(layer: nn.Module, **thresholds: int) -> None:
    """Give ``layer`` the CPU paths in place; ``thresholds`` overrides their class defaults."""
    holder = nn.Module()
    holder.layer = layer
    cpu.adapt_to_cpu(holder, min_rows=4, workers=2, min_gflops=0)
    for key, value in thresholds.items():
        setattr(layer, key, value)


@pytest.mark.parametrize(
    ("mode", "bits", "group"),
    [("affine", 3, 64), ("affine", 4, 64), ("affine", 5, 64), ("mxfp4", 4, 32)],
)
def test_linear_paths_agree_with_mlx(mode: str, bits: int, group: int) -> None:
    lin = nn.QuantizedLinear(512, 640, bias=True, group_size=group, bits=bits, mode=mode)
    lin.bias = mx.random.normal((640,), key=mx.random.key(1))
    inputs = {rows: mx.random.normal((rows, 512), key=mx.random.key(rows)) for rows in (1, 3, 4, 9)}
    expected = {rows: lin(x) for rows, x in inputs.items()}
    _adapt(lin, split_weights=1, slab_bytes=512 * 4 * 100)  # split over both workers, and slabbed
    assert isinstance(lin, cpu.CpuLinear)
    for rows, x in inputs.items():
        got = lin(x)
        assert got.shape == expected[rows].shape == (rows, 640)
        if rows < 4:  # the quantized kernel on row slices of the weight: the same sums
            assert mx.array_equal(got, expected[rows]).item()
        else:  # a dense matmul: the same products, summed in another order
            assert mx.allclose(got, expected[rows], rtol=1e-4, atol=1e-4).item()


def test_embedding_as_head_agrees() -> None:
    emb = nn.QuantizedEmbedding(300, 128, group_size=64, bits=4)
    ids = mx.array([[3, 7, 299]])
    inputs = [mx.random.normal((1, rows, 128), key=mx.random.key(rows)) for rows in (1, 8)]
    looked_up, expected = emb(ids), [emb.as_linear(x) for x in inputs]
    _adapt(emb, split_weights=1)
    assert isinstance(emb, cpu.CpuEmbedding)
    assert mx.array_equal(emb(ids), looked_up).item()  # the lookup is untouched
    for x, want in zip(inputs, expected, strict=True):
        assert mx.allclose(emb.as_linear(x), want, rtol=1e-4, atol=1e-4).item()


def _greedy(model: nn.Module, prompt: mx.array, n: int) -> list[int]:
    steps = generate_step(prompt, model, max_tokens=n, sampler=lambda p: mx.argmax(p, axis=-1))
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize(
    ("arch", "tied"), [("qwen3", False), ("qwen3", True), ("llama", False), ("qwen3_moe", False)]
)
def test_adapted_model_keeps_its_tree_and_its_output(tmp_path: Path, arch: str, tied: bool) -> None:
    """The CPU layer swap's contract, on every architecture ramserve supports: every quantized
    linear and embedding takes the CPU class in place, the tree and the outputs stay the same."""
    folder = make_model(tmp_path / "m", arch, layers=2, hidden=256, vocab=512, tied=tied)
    model = load(str(folder))[0]
    nn.quantize(model, group_size=64, bits=4)
    model.set_dtype(mx.float32)
    before = {k: v.shape for k, v in tree_flatten(model.parameters())}
    batch = mx.array([[5, 9, 11, 2, 7, 30, 31, 1]] * 3)
    prompt = batch[0]
    reference_logits, reference_tokens = model(batch), _greedy(model, prompt, 12)
    changed = cpu.adapt_to_cpu(model, min_rows=4, workers=2, min_gflops=0)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    embeddings = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedEmbedding)]
    assert changed == len(quantized) + len(embeddings) and len(embeddings) == 1
    assert all(isinstance(m, cpu.CpuLinear) for m in quantized)
    assert {k: v.shape for k, v in tree_flatten(model.parameters())} == before
    for m in quantized:
        m.split_weights = 1  # every layer split over both workers, as a large model's would be
    assert mx.allclose(model(batch), reference_logits, rtol=1e-4, atol=1e-4).item()
    assert _greedy(model, prompt, 12) == reference_tokens


def test_slow_blas_keeps_the_quantized_kernel(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m", layers=1, hidden=128, vocab=256)
    model = load(str(folder))[0]
    nn.quantize(model, group_size=64, bits=4)
    cpu.adapt_to_cpu(model, min_rows=4, workers=1, min_gflops=1e12)
    rows = {m.min_rows for _, m in model.named_modules() if isinstance(m, cpu.CpuLinear)}
    assert rows == {sys.maxsize}
    assert cpu.blas_gflops() > 0
