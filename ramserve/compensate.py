"""Error-compensating rounding of one weight matrix, given its inputs' second moments H = XᵀX.

Rounding to nearest treats every weight alone. What the model feels is the error of the module's
output, ‖δW X‖² = Σ_rows δw H δwᵀ, and there correlated inputs let the error of one column be
cancelled by small changes of the columns still to be rounded. This is GPTQ's algorithm (Frantar et
al. 2022, the OBQ update in column order): round column j, then spread its error over the columns after
it in proportion to the inverse of H, by the upper Cholesky factor U of H⁻¹. Columns are taken in
blocks: inside a block the updates are rank-1, and the block's whole error reaches the columns after it
in one matrix product.

Groups are MLX's affine groups along a row. A group's scale and bias are chosen when the rounding
reaches its first column, from the weights as updated so far, by the same search quantizer as the
nearest rounding (``affine``); its codes are then rounded column by column.

GPTQ's pass only looks forward. Sweeps of coordinate descent then revisit every column with all the
others fixed (``descended``), which never raises the error under the damped H.

The result is never worse than rounding to nearest under the H it was given: each output row's
error is compared (rows are independent in ``δw H δwᵀ``) and the row keeps whichever rounding is
closer, with its own scales and biases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import affine

# Columns whose updates are rank-1 (the rest of their block gets them in one product).
INNER_BLOCK = 16


@dataclass(frozen=True)
class Rounded:
    """A weight's affine codes, scales and biases (float32 holding the stored dtype's values), and
    how it went: its error under H, per row, for the compensated and the nearest rounding."""

    bits: int
    group_size: int
    codes: np.ndarray  # (rows, columns), integers in [0, 2^bits)
    scales: np.ndarray  # (rows, groups)
    biases: np.ndarray  # (rows, groups)
    error: float  # Σ_rows δw H δwᵀ of what is kept
    nearest_error: float  # the same for rounding to nearest

    def packed(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
        """MLX's stored form: packed uint32 weight, and scales and biases in ``dtype``."""
        q = affine.pack_codes(mx.array(self.codes), self.bits)
        return q, mx.array(self.scales).astype(dtype), mx.array(self.biases).astype(dtype)


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + λI, λ = ``damp`` × mean(diag H), with 1 on the diagonal of a column no input reached."""
    h = np.array(h, dtype=np.float32)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    level = float(diag[~dead].mean()) if (~dead).any() else 1.0
    idx = np.arange(h.shape[0])
    h[idx, idx] = np.where(dead, 1.0, diag) + damp * level
    return h


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper triangular U with UᵀU = ``damped`` H⁻¹: a column no input reached (H_jj = 0) is
    rounded to nearest and spreads nothing.

    With J the reversal, J H J = M Mᵀ gives H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J): one Cholesky and one
    triangular inverse (MLX's, on the CPU's LAPACK)."""
    h = damped(h, damp)
    flipped = mx.array(np.ascontiguousarray(h[::-1, ::-1]))
    m = mx.linalg.cholesky(flipped, stream=mx.cpu)
    inv = mx.linalg.tri_inv(m, upper=False, stream=mx.cpu)
    u = np.asarray(inv)[::-1, ::-1]
    return np.ascontiguousarray(u)


def row_errors(delta: np.ndarray, h: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """δw H δwᵀ per row, in float64 sums; from the inputs ``x`` (H = xᵀx) when they are fewer rows
    than columns, which costs less."""
    if x is not None and x.shape[0] < x.shape[1]:
        out = (delta @ x.T).astype(np.float64)
        errors: np.ndarray = np.einsum("ij,ij->i", out, out)
        return errors
    hd = delta @ h
    errors = np.einsum("ij,ij->i", hd.astype(np.float64), delta.astype(np.float64))
    return errors


def nearest(
    w: mx.array, group_size: int, bits: int, ranges: Sequence[float], refits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounding to nearest by the search quantizer: codes (rows, columns), scales and biases
    (rows, groups), float32."""
    codes, s, b = affine._fit(w, group_size, bits, ranges, refits)
    rows = w.shape[0]
    return (np.asarray(codes, dtype=np.float32).reshape(rows, -1),
            np.asarray(s, dtype=np.float32).reshape(rows, -1),
            np.asarray(b, dtype=np.float32).reshape(rows, -1))  # fmt: skip


def dequantized(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int
                ) -> np.ndarray:  # fmt: skip
    rows = codes.shape[0]
    grouped = codes.reshape(rows, -1, group_size) * scales[..., None] + biases[..., None]
    out: np.ndarray = grouped.reshape(rows, -1)
    return out


def descended(weights: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
              group_size: int, bits: int, h: np.ndarray, sweeps: int, block: int
              ) -> np.ndarray:  # fmt: skip
    """``codes`` (rows, columns) improved by ``sweeps`` of cyclic coordinate descent on
    Σ_rows δw H δwᵀ (as QuantEase, Behdin et al. 2023): each column in turn takes the code nearest
    its best value with every other column fixed, so the error under ``h`` never rises. GPTQ's pass
    only looks forward; the sweeps let a column answer the columns after it. Columns in blocks: the
    in-block changes reach a column by one product, the whole block's reach the rest in one."""
    rows, n = codes.shape
    top = float((1 << bits) - 1)
    q = np.ascontiguousarray(codes.T)
    st, bt = np.ascontiguousarray(scales.T), np.ascontiguousarray(biases.T)
    deq = q * np.repeat(st, group_size, axis=0) + np.repeat(bt, group_size, axis=0)
    e = h @ (np.ascontiguousarray(weights.T) - deq)  # (n, rows): H·δwᵀ
    diag = np.diagonal(h)
    for _ in range(sweeps):
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            d = np.zeros((i2 - i1, rows), dtype=np.float32)
            for j in range(i1, i2):
                if diag[j] <= 0:
                    continue
                ej = e[j] - h[j, i1:j] @ d[: j - i1] if j > i1 else e[j]
                s, b = st[j // group_size], bt[j // group_size]
                t = np.clip(np.rint((deq[j] + ej / diag[j] - b) / s), 0, top)
                new = t * s + b
                d[j - i1] = new - deq[j]
                q[j], deq[j] = t, new
            e -= h[:, i1:i2] @ d
    return np.ascontiguousarray(q.T)


def compensated(
    w: mx.array,
    h: np.ndarray,
    group_size: int,
    bits: int,
    ranges: Sequence[float] = (),
    refits: int = 0,
    damp: float = 0.01,
    block: int = 128,
    x: np.ndarray | None = None,
    u: np.ndarray | None = None,
    descent: int = 0,
) -> Rounded:
    """Round the 2-D weight ``w`` (rows, columns; its dtype is the stored one) with error
    compensation under ``h`` (columns, columns), and keep per row the better of that and rounding to
    nearest (errors measured under ``h``, or the inputs ``x`` it was made of). ``u``: H's
    ``inverse_cholesky``, when modules that read the same input share it. ``descent``: sweeps of
    coordinate descent on the compensated codes, under the damped H (``descended``)."""
    rows, n = w.shape
    block = max(block, group_size)
    if block % group_size:
        raise ValueError(f"the column block ({block}) must hold whole groups ({group_size})")
    top = float((1 << bits) - 1)
    h = np.asarray(h, dtype=np.float32)
    u = inverse_cholesky(h, damp) if u is None else u
    inv_d = 1 / np.diagonal(u)
    weights = np.asarray(w.astype(mx.float32))
    # columns as rows: each step reads and updates contiguous memory
    work = np.ascontiguousarray(weights.T)
    codes = np.empty((n, rows), dtype=np.float32)
    scales = np.empty((n // group_size, rows), dtype=np.float32)
    biases = np.empty_like(scales)
    inner = min(INNER_BLOCK, group_size)
    t = np.empty(rows, dtype=np.float32)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        errors = np.empty((i2 - i1, rows), dtype=np.float32)
        for j1 in range(i1, i2, inner):
            j2 = j1 + inner
            if j1 % group_size == 0:
                slab = mx.array(work[j1 : j1 + group_size].T).astype(w.dtype)
                _, fit_s, fit_b = nearest(slab, group_size, bits, ranges, refits)
                s, b = fit_s[:, 0], fit_b[:, 0]
                scales[j1 // group_size], biases[j1 // group_size] = s, b
            for col in range(j1, j2):
                # the code nearest the updated weight, and its error over H⁻¹'s pivot
                np.subtract(work[col], b, out=t)
                np.divide(t, s, out=t)
                np.rint(t, out=t)
                np.clip(t, 0, top, out=t)
                codes[col] = t
                err = errors[col - i1]
                np.multiply(t, s, out=t)
                np.add(t, b, out=t)
                np.subtract(work[col], t, out=err)
                err *= inv_d[col]
                if col + 1 < j2:
                    work[col + 1 : j2] -= u[col, col + 1 : j2, None] * err
            if j2 < i2:  # the inner block's error reaches the rest of the block
                work[j2:i2] -= u[j1:j2, j2:i2].T @ errors[j1 - i1 : j2 - i1]
        if i2 < n:
            work[i2:] -= u[i1:i2, i2:].T @ errors
    codes, scales, biases = codes.T, np.ascontiguousarray(scales.T), np.ascontiguousarray(biases.T)
    if descent:
        codes = descended(weights, codes, scales, biases, group_size, bits, damped(h, damp), descent,
                          block)  # fmt: skip
    near_codes, near_s, near_b = nearest(w, group_size, bits, ranges, refits)
    comp_err = row_errors(weights - dequantized(codes, scales, biases, group_size), h, x)
    near_err = row_errors(weights - dequantized(near_codes, near_s, near_b, group_size), h, x)
    worse = comp_err > near_err
    codes[worse], scales[worse], biases[worse] = near_codes[worse], near_s[worse], near_b[worse]
    kept = np.where(worse, near_err, comp_err)
    return Rounded(
        bits, group_size, codes, scales, biases, float(kept.sum()), float(near_err.sum())
    )
