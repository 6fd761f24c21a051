"""MLX's affine format (pack, unpack) and ramserve's search quantizer, against MLX's own kernels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ramserve import affine

SEARCH = {"ranges": [1.0, 0.95, 0.9, 0.85, 0.8], "refits": 2}


def _weights(rows: int, cols: int, seed: int = 0) -> mx.array:
    """Heavy-tailed rows of very different ranges, as in trained models."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 1, (rows, 1)))
    return mx.array((rng.standard_t(4, (rows, cols)) * scale).astype(np.float32))


def _group_errors(w: mx.array, q, s, b, group_size: int, bits: int) -> np.ndarray:
    d = affine.unpack_affine(q, s.astype(mx.float32), b.astype(mx.float32), group_size, bits)
    err = mx.square(d - w.astype(mx.float32)).reshape(w.shape[0], -1, group_size).sum(-1)
    return np.asarray(err)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_unpack_equals_mlx_dequantize(bits: int, group_size: int) -> None:
    w = _weights(48, 512)
    for dtype in (mx.float32, mx.bfloat16):
        q, s, b = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
        ours = affine.unpack_affine(q, s, b, group_size, bits)
        theirs = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert mx.array_equal(ours, theirs).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_the_inverse_of_unpack(bits: int) -> None:
    q, _, _ = mx.quantize(_weights(24, 256), group_size=32, bits=bits)
    codes = affine.unpack_codes(q, bits, 32).reshape(24, 256)
    assert codes.max().item() == 2**bits - 1 and codes.min().item() == 0
    assert mx.array_equal(affine.pack_codes(codes, bits), q).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_search_beats_mx_quantize_in_every_group(bits: int, group_size: int) -> None:
    for dtype in (mx.float32, mx.bfloat16):
        w = _weights(64, 512, seed=bits).astype(dtype)
        mlx = _group_errors(w, *mx.quantize(w, group_size=group_size, bits=bits), group_size, bits)
        q, s, b = affine.quantize(w, group_size, bits, **SEARCH)
        assert s.dtype == b.dtype == dtype and q.dtype == mx.uint32
        ours = _group_errors(w, q, s, b, group_size, bits)
        assert (ours <= mlx * (1 + 1e-5) + 1e-12).all()
        assert ours.sum() < 0.95 * mlx.sum()  # bf16 scales and biases limit it most at 6+ bits


def test_mlx_kernels_compute_with_the_searched_weights() -> None:
    """The result is MLX's format: its quantized matmul gives x @ dequantize(quantize(w)).T."""
    w, x = _weights(96, 256), mx.array(np.random.default_rng(1).normal(size=(5, 256)), mx.float32)
    for bits in (3, 4, 6):
        q, s, b = affine.quantize(w, 64, bits, **SEARCH)
        got = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits)
        want = x @ affine.dequantize(w, 64, bits, **SEARCH).T
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


def test_slabs_and_stacked_experts_quantize_as_one_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights(3 * 40, 128).reshape(3, 40, 128)  # experts x rows x columns
    whole = affine.quantize(w, 32, 4, **SEARCH)
    assert [tuple(a.shape) for a in whole] == [(3, 40, 16), (3, 40, 4), (3, 40, 4)]
    monkeypatch.setattr(affine, "SLAB_ELEMENTS", 7 * 128)  # slabs of 7 rows, across experts
    slabbed = affine.quantize(w, 32, 4, **SEARCH)
    per_expert = [affine.quantize(w[e], 32, 4, **SEARCH) for e in range(3)]
    for k in range(3):
        assert mx.array_equal(whole[k], slabbed[k]).item()
        assert mx.array_equal(whole[k], mx.stack([p[k] for p in per_expert])).item()


def test_without_ranges_it_is_mx_quantize() -> None:
    w = _weights(16, 128).astype(mx.bfloat16)
    theirs = mx.quantize(w, group_size=64, bits=4)
    for ours, want in zip(affine.quantize(w, 64, 4), theirs, strict=True):
        assert mx.array_equal(ours, want).item()


def test_dequantize_is_unpack_of_quantize() -> None:
    w = _weights(24, 256).astype(mx.bfloat16)
    for search in ({}, SEARCH):
        for dtype in (mx.bfloat16, mx.float32):
            q, s, b = affine.quantize(w, 64, 3, **search)
            want = affine.unpack_affine(q, s.astype(dtype), b.astype(dtype), 64, 3)
            got = affine.dequantize(w, 64, 3, **search, dtype=dtype)
            assert got.dtype == dtype and mx.array_equal(got, want).item()
