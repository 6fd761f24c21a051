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
others fixed (``descended``), which never raises the error under the damped H, and rounds of each
group's scale and bias re-chosen under it (``refitted``) follow. Both move along the damped gradient
(H + λI) δwᵀ, which the rounding makes once and each step keeps current: remade at every step, it
cost as much as six more sweeps.

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
    codes: np.ndarray  # (rows, columns), uint8 in [0, 2^bits)
    scales: np.ndarray  # (rows, groups)
    biases: np.ndarray  # (rows, groups)
    error: float  # Σ_rows δw H δwᵀ of what is kept
    nearest_error: float  # the same for rounding to nearest

    def packed(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
        """MLX's stored form: packed uint32 weight, and scales and biases in ``dtype``. The codes
        are packed a slab of rows at a time: packing widens them to uint32 and holds a few copies
        (an untied head of 32,000 × 2,048 whole: 1.2 GB)."""
        parts = []
        for run in affine.row_slabs(*self.codes.shape):
            parts.append(affine.pack_codes(mx.array(self.codes[run]), self.bits))
            mx.eval(parts[-1])
        return (
            affine.joined(parts),
            mx.array(self.scales).astype(dtype),
            mx.array(self.biases).astype(dtype),
        )


def damping(h: np.ndarray, damp: float) -> np.ndarray:
    """What ``damped`` adds to H's diagonal: λ = ``damp`` × mean(diag H), and 1 more on the
    diagonal of a column no input reached."""
    diag = np.diagonal(h)
    dead = diag <= 0
    level = float(diag[~dead].mean()) if (~dead).any() else 1.0
    shift: np.ndarray = np.where(dead, 1.0, 0.0).astype(np.float32) + np.float32(damp * level)
    return shift


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + λI, λ = ``damp`` × mean(diag H), with 1 on the diagonal of a column no input reached."""
    out = np.array(h, dtype=np.float32)
    idx = np.arange(h.shape[0])
    out[idx, idx] += damping(h, damp)
    return out


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper triangular U with UᵀU = ``damped`` H⁻¹: a column no input reached (H_jj = 0) is
    rounded to nearest and spreads nothing.

    With J the reversal, J H J = M Mᵀ gives H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J): one Cholesky and one
    triangular inverse (MLX's, on the CPU's LAPACK). Each step's input is let go as soon as it is
    used: at 5,632 columns every copy is 127 MB."""
    flipped = np.ascontiguousarray(damped(h, damp)[::-1, ::-1])
    square = mx.array(flipped)
    del flipped
    m = mx.linalg.cholesky(square, stream=mx.cpu)
    mx.eval(m)
    del square
    inv = mx.linalg.tri_inv(m, upper=False, stream=mx.cpu)
    mx.eval(inv)
    del m
    u = np.ascontiguousarray(np.asarray(inv)[::-1, ::-1])
    del inv
    return u


def row_errors(delta: np.ndarray, h: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """δw H δwᵀ per row, in float64 sums; from the inputs ``x`` (H = xᵀx) when they are fewer rows
    than columns, which costs less. A slab of rows at a time: the float64 copies are twice the rows'
    size."""
    rows, n = delta.shape
    errors = np.empty(rows, dtype=np.float64)
    for run in affine.row_slabs(rows, n):
        part = delta[run]
        if x is not None and x.shape[0] < x.shape[1]:
            out = (part @ x.T).astype(np.float64)
            errors[run] = np.einsum("ij,ij->i", out, out)
        else:
            hd = (part @ h).astype(np.float64)
            errors[run] = np.einsum("ij,ij->i", hd, part.astype(np.float64))
    return errors


def nearest(
    w: mx.array, group_size: int, bits: int, ranges: Sequence[float], refits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounding to nearest by the search quantizer: codes (rows, columns), scales and biases
    (rows, groups), float32. A slab of rows at a time, as ``affine.quantize`` searches: the search
    keeps several float32 copies of what it is given alive (an untied head whole: 3.4 GB)."""
    slabs = []
    for run in affine.row_slabs(w.shape[0], w.shape[1]):
        part = w[run]
        fit = affine._fit(part, group_size, bits, ranges, refits)
        slabs.append([np.asarray(a, dtype=np.float32).reshape(part.shape[0], -1) for a in fit])
    codes, s, b = (np.concatenate([slab[k] for slab in slabs]) for k in range(3))
    return codes, s, b


def dequantized(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int
                ) -> np.ndarray:  # fmt: skip
    rows = codes.shape[0]
    grouped = codes.reshape(rows, -1, group_size) * scales[..., None] + biases[..., None]
    out: np.ndarray = grouped.reshape(rows, -1)
    return out


def damped_gradient(weights: np.ndarray, codes: np.ndarray, scales: np.ndarray,
                    biases: np.ndarray, group_size: int, h: np.ndarray, shift: np.ndarray
                    ) -> np.ndarray:  # fmt: skip
    """E = (H + diag(``shift``)) δwᵀ, (columns, rows): what the descent and the refit both move
    along. One product as costly as a sweep, so the rounding makes it once and each step keeps it
    current for the next (``descended``, ``refitted``)."""
    delta = np.ascontiguousarray((weights - dequantized(codes, scales, biases, group_size)).T)
    e: np.ndarray = h @ delta
    e += shift[:, None] * delta
    return e


def descended(weights: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
              group_size: int, bits: int, h: np.ndarray, sweeps: int, block: int,
              shift: np.ndarray | None = None, e: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """``codes`` (rows, columns) improved by ``sweeps`` of cyclic coordinate descent on
    Σ_rows δw H δwᵀ (as QuantEase, Behdin et al. 2023): each column in turn takes the code nearest
    its best value with every other column fixed, so the error under ``h`` (plus ``shift`` on its
    diagonal: ``damping``, without a damped copy of H) never rises. GPTQ's pass only looks forward;
    the sweeps let a column answer the columns after it. Columns in blocks: the in-block changes
    reach a column by one product, the whole block's reach the rest in one. ``e``: the codes'
    ``damped_gradient``, updated in place (made here when not given)."""
    rows, n = codes.shape
    top = float((1 << bits) - 1)
    shift = np.zeros(n, dtype=np.float32) if shift is None else shift
    if e is None:
        e = damped_gradient(weights, codes, scales, biases, group_size, h, shift)
    q = np.array(codes.T, dtype=np.float32, order="C")  # a copy: the caller's codes stay as given
    st, bt = np.ascontiguousarray(scales.T), np.ascontiguousarray(biases.T)
    deq = q * np.repeat(st, group_size, axis=0) + np.repeat(bt, group_size, axis=0)
    diag = np.diagonal(h) + shift
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
            _carried(e, h, shift, i1, d)
    return np.ascontiguousarray(q.T)


def refitted(weights: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
             group_size: int, h: np.ndarray, shift: np.ndarray, dtype: mx.Dtype,
             e: np.ndarray | None = None, block: int = 256) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each group's scale and bias re-chosen for its codes under H + diag(``shift``) (the damped H),
    group after group with the others fixed: the search quantizer chose them for the weights alone,
    but what counts is the output error, where a group's error can answer the others'. Per row, a
    group's (s, b) moves to the least squares solution of its 2 × 2 system, rounded to the stored
    ``dtype``, where that lowers the error (so it never rises). ``e``: as ``descended`` takes it.
    Groups in blocks of ``block`` columns, as the descent takes columns: the changes inside a block
    reach a group by one product, the whole block's reach the rest in one."""
    rows, n = codes.shape
    q = codes.astype(np.float32)
    scales, biases = scales.copy(), biases.copy()
    if e is None:
        e = damped_gradient(weights, q, scales, biases, group_size, h, shift)
    block = max(block - block % group_size, group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        d = np.zeros((i2 - i1, rows), dtype=np.float32)
        for j1 in range(i1, i2, group_size):
            cols = slice(j1, j1 + group_size)
            ek = e[cols] - h[cols, i1:j1] @ d[: j1 - i1]  # the shift: on the diagonal only
            hg = h[cols, cols] + np.diag(shift[cols])
            change = _refit_group(q[:, cols], ek.T, scales, biases, j1 // group_size, hg, dtype)
            d[j1 - i1 : j1 - i1 + group_size] = change.T
        _carried(e, h, shift, i1, d)
    return scales, biases


def _carried(e: np.ndarray, h: np.ndarray, shift: np.ndarray, i1: int, d: np.ndarray) -> None:
    """A block's changes ``d`` to the dequantized columns from ``i1`` on, (columns, rows), carried
    into the damped gradient ``e`` in place, for the blocks after it."""
    i2 = i1 + d.shape[0]
    e -= h[:, i1:i2] @ d
    e[i1:i2] -= shift[i1:i2, None] * d


def _refit_group(qk: np.ndarray, ek: np.ndarray, scales: np.ndarray, biases: np.ndarray, k: int,
                 hg: np.ndarray, dtype: mx.Dtype) -> np.ndarray:  # fmt: skip
    """``refitted`` for group ``k`` (its codes ``qk`` and gradient ``ek``, both (rows, group), and
    its block of the damped H): moves its scales and biases in place, returns what that changed in
    the dequantized weights."""
    a11 = np.einsum("ij,ij->i", qk @ hg, qk)
    a12, a22 = qk @ hg.sum(1), hg.sum()
    r1, r2 = np.einsum("ij,ij->i", qk, ek), ek.sum(1)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-9 * np.abs(a11 * a22)
    safe = np.where(ok, det, 1.0)
    s_new = _stored(scales[:, k] + np.where(ok, (r1 * a22 - r2 * a12) / safe, 0), dtype)
    b_new = _stored(biases[:, k] + np.where(ok, (a11 * r2 - a12 * r1) / safe, 0), dtype)
    change: np.ndarray = (s_new - scales[:, k])[:, None] * qk + (b_new - biases[:, k])[:, None]
    gain = 2 * np.einsum("ij,ij->i", change, ek) - np.einsum("ij,ij->i", change @ hg, change)
    take = (gain > 0) & (s_new != 0)
    change[~take] = 0
    scales[take, k], biases[take, k] = s_new[take], b_new[take]
    return change


def _stored(a: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    return np.asarray(affine.as_stored(mx.array(a), dtype))


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
    scale_rounds: int = 0,
) -> Rounded:
    """Round the 2-D weight ``w`` (rows, columns; its dtype is the stored one) with error
    compensation under ``h`` (columns, columns), and keep per row the better of that and rounding to
    nearest (errors measured under ``h``, or the inputs ``x`` it was made of). ``u``: H's
    ``inverse_cholesky``, when modules that read the same input share it. ``descent``: sweeps of
    coordinate descent on the compensated codes, under the damped H (``descended``).
    ``scale_rounds``: after that, rounds of the groups' scales and biases re-chosen under the damped
    H (``refitted``), each but the last followed by one more sweep of the descent.

    Rows are rounded independently (the error is a sum over rows), so a tall weight is taken in slabs
    of rows (``ROW_SLAB_ELEMENTS``): the rounding holds several float32 copies of what it rounds."""
    h = np.asarray(h, dtype=np.float32)
    u = inverse_cholesky(h, damp) if u is None else u
    shift = damping(h, damp) if descent or scale_rounds else None
    slabs = [_compensated_rows(w[run], h, shift, u, group_size, bits, ranges, refits, block, x,
                               descent, scale_rounds)
             for run in affine.row_slabs(w.shape[0], w.shape[1], ROW_SLAB_ELEMENTS)]  # fmt: skip
    if len(slabs) == 1:
        return slabs[0]
    codes, scales, biases = (np.concatenate([getattr(r, k) for r in slabs])
                             for k in ("codes", "scales", "biases"))  # fmt: skip
    return Rounded(bits, group_size, codes, scales, biases, sum(r.error for r in slabs),
                   sum(r.nearest_error for r in slabs))  # fmt: skip


# Rows of a weight rounded at once hold about this many elements (float32: 32 MB a copy).
ROW_SLAB_ELEMENTS = 1 << 23


def _compensated_rows(
    w: mx.array,
    h: np.ndarray,
    shift: np.ndarray | None,
    u: np.ndarray,
    group_size: int,
    bits: int,
    ranges: Sequence[float],
    refits: int,
    block: int,
    x: np.ndarray | None,
    descent: int,
    scale_rounds: int,
) -> Rounded:
    """``compensated`` on rows ``w``, given H, its ``damping`` ``shift`` (for ``descent``) and
    ``u``."""
    rows, n = w.shape
    block = max(block, group_size)
    if block % group_size:
        raise ValueError(f"the column block ({block}) must hold whole groups ({group_size})")
    top = float((1 << bits) - 1)
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
    # made once for the descent and the scale rounds, and kept current through every step of them
    e = None if shift is None else damped_gradient(weights, codes, scales, biases, group_size, h,
                                                   shift)  # fmt: skip
    if descent:
        codes = descended(weights, codes, scales, biases, group_size, bits, h, descent, block,
                          shift, e)  # fmt: skip
    for round_ in range(scale_rounds):
        assert shift is not None
        scales, biases = refitted(weights, codes, scales, biases, group_size, h, shift, w.dtype, e)
        if round_ + 1 < scale_rounds:
            codes = descended(weights, codes, scales, biases, group_size, bits, h, 1, block, shift,
                              e)  # fmt: skip
    del e  # a copy of the rows' size, not held through what follows
    near_codes, near_s, near_b = nearest(w, group_size, bits, ranges, refits)
    comp_err = row_errors(weights - dequantized(codes, scales, biases, group_size), h, x)
    near_err = row_errors(weights - dequantized(near_codes, near_s, near_b, group_size), h, x)
    worse = comp_err > near_err
    codes[worse], scales[worse], biases[worse] = near_codes[worse], near_s[worse], near_b[worse]
    kept = np.where(worse, near_err, comp_err)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return Rounded(bits, group_size, codes, scales, biases, float(kept.sum()),
                   float(near_err.sum()))  # fmt: skip
