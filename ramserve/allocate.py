"""Budget-targeted allocation: one candidate per module, least predicted damage, total bytes <= budget.

A multiple-choice knapsack, solved through its structure:

1. Each module's safe candidates are reduced to their lower convex hull in (bytes, damage): only hull
   points can be optimal for some price per byte.
2. The Lagrangian relaxation is solved exactly by sorting every hull segment of every module by its
   slope (damage saved per byte) and taking segments, steepest first, while the budget lasts; convexity
   makes each module's segments come in order. The fractional last segment gives the lower bound.
3. The bytes left over are spent greedily on the upgrade (any safe candidate, hull or not) that saves
   the most damage per byte, until nothing fits.

The reported gap is the plan's damage minus the lower bound. Everything is vectorised over modules: a
profile of 20,000 modules × 19 candidates is solved in about 40 ms with its hulls, 10 ms once the hulls
are cached (bench/allocate.py). Equal slopes keep module order: the plan is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import BudgetError
from .records import Profile

INF = np.inf


@dataclass(frozen=True, eq=False)
class Problem:
    """Padded candidate arrays (modules × candidates); padding has infinite bytes."""

    bytes: np.ndarray  # float64 (M, K)
    damage: np.ndarray  # float64 (M, K)
    fixed_bytes: int
    packed: np.ndarray | None = (
        None  # (M, K) the codes' bytes; the rest are floats (scales, 16-bit)
    )

    @classmethod
    def from_profile(
        cls, profile: Profile, min_sqnr_db: float | None, compensated: bool = False
    ) -> Problem:
        modules = profile.modules
        k = max(len(m.options) for m in modules)
        b = np.full((len(modules), k), INF)
        d = np.full((len(modules), k), INF)
        packed = np.zeros((len(modules), k))
        for i, m in enumerate(modules):
            for j, o in enumerate(m.options):
                packed[i, j] = m.packed_bytes(o)
                safe = (
                    o.bits >= 16
                    or min_sqnr_db is None
                    or (o.sqnr_db is not None and o.sqnr_db >= min_sqnr_db)
                )
                if safe:
                    b[i, j], d[i, j] = o.bytes, o.damage_with(compensated)
        return cls(b, d, profile.fixed_bytes, packed)

    def rows(self, rows: list[int], fixed_bytes: int) -> Problem:
        """The problem of some modules alone (one host's share of them, ramserve/hosts.py)."""
        packed = None if self.packed is None else self.packed[rows]
        return Problem(self.bytes[rows], self.damage[rows], fixed_bytes, packed)

    def loaded(self, float_bytes: int) -> np.ndarray:
        """Every candidate's bytes once loaded by a runtime whose floats take ``float_bytes``."""
        if self.packed is None:
            raise ValueError("the problem does not know its candidates' packed bytes")
        scaled: np.ndarray = self.packed + (self.bytes - self.packed) * (float_bytes / 2)
        return scaled

    def min_bytes(self) -> int:
        return int(self.fixed_bytes + self.bytes.min(axis=1).sum())

    def min_choice(self) -> np.ndarray:
        """Each module's fewest-bytes candidate."""
        choice: np.ndarray = np.argmin(self.bytes, axis=1)
        return choice

    def best_choice(self) -> np.ndarray:
        """Each module's least-damage candidate (the fewest bytes among equals)."""
        dmin = self.damage.min(axis=1, keepdims=True)
        best: np.ndarray = np.argmin(np.where(self.damage <= dmin, self.bytes, INF), axis=1)
        return best

    def bytes_of(self, choice: np.ndarray) -> int:
        return int(self.fixed_bytes + self.bytes[np.arange(len(self.bytes)), choice].sum())

    @cached_property
    def hull(self) -> np.ndarray:
        """Each module's lower convex hull; budget-independent, so computed once per profile."""
        return lower_hulls(self.bytes, self.damage)

    @cached_property
    def segments(self) -> Segments:
        """Every hull segment, steepest first; budget-independent like the hulls."""
        return Segments.of(self)


@dataclass(frozen=True)
class Segments:
    module: np.ndarray  # which module each segment belongs to, in slope order
    level: np.ndarray  # the hull position the segment leads to
    dbytes: np.ndarray
    ddamage: np.ndarray  # negative: damage saved
    cum_bytes: np.ndarray

    @classmethod
    def of(cls, p: Problem) -> Segments:
        hull = p.hull
        m, h = hull.shape
        frm, to = hull[:, :-1], hull[:, 1:]
        valid = to >= 0
        mod = np.broadcast_to(np.arange(m)[:, None], frm.shape)[valid]
        pos = np.broadcast_to(np.arange(1, h)[None, :], frm.shape)[valid]
        f, t = frm[valid], to[valid]
        db = p.bytes[mod, t] - p.bytes[mod, f]
        dd = p.damage[mod, t] - p.damage[mod, f]
        slope = dd / db
        order = np.argsort(slope)
        if np.any(slope[order[1:]] == slope[order[:-1]]):
            # laid out module by module, so a stable sort keeps equal slopes in module and hull order
            order = np.argsort(slope, kind="stable")
        return cls(mod[order], pos[order], db[order], dd[order], np.cumsum(db[order]))


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # index of the chosen candidate per module
    bytes: int
    damage: float
    lower_bound: float
    seconds: float
    hull_points: int

    @property
    def gap(self) -> float:
        return max(0.0, self.damage - self.lower_bound)


def lower_hulls(b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(M, H) candidate indices of each module's lower convex hull, cheapest first; -1 pads.

    Andrew's monotone chain, run for every module at once: candidates are visited cheapest first, those
    that do not lower the damage are skipped (no hull point is dominated), and each pushed point pops
    the points it makes non-convex (collinear ones too, so a hull's slopes strictly increase). Each
    point is pushed and popped at most once, so the work is a few passes over the (M, K) table.
    """
    m, k = b.shape
    flat_b, flat_d = b.ravel(), d.ravel()
    order = np.argsort(b, axis=1) + np.arange(0, m * k, k)[:, None]  # flat indices, cheapest first
    stack = np.full((m, k), -1, dtype=np.int64)
    size = np.zeros(m, dtype=np.int64)
    top_b, top_d, prev_b, prev_d = (np.zeros(m) for _ in range(4))
    least = np.full(m, INF)  # the least damage seen so far, per module
    for col in order.T:
        nb, nd = flat_b.take(col), flat_d.take(col)
        new = np.isfinite(nb) & (nd < least)
        pop = new & (size > 0) & _pops(size, top_b, top_d, prev_b, prev_d, nb, nd)
        check = np.nonzero(pop)[0]
        while len(check):
            size[check] -= 1
            top_b[check], top_d[check] = prev_b[check], prev_d[check]
            under = check[size[check] > 1]
            below = stack[under, size[under] - 2]
            prev_b[under], prev_d[under] = flat_b.take(below), flat_d.take(below)
            check = check[size[check] > 0]
            state = (a[check] for a in (size, top_b, top_d, prev_b, prev_d, nb, nd))
            check = check[_pops(*state)]
        r = np.nonzero(new)[0]
        stack[r, size[r]] = col[r]
        size[r] += 1
        prev_b[r], prev_d[r] = top_b[r], top_d[r]
        top_b[r], top_d[r], least[r] = nb[r], nd[r], nd[r]
    hull = stack % k
    hull[np.arange(k)[None, :] >= size[:, None]] = -1  # empty and popped slots
    out: np.ndarray = hull[:, : max(1, int(size.max()))]
    return out


def _pops(*state: np.ndarray) -> np.ndarray:
    """Whether a new point (nb, nd) pops the stack's top: the top costs no less, or it does not lie
    strictly below the segment from the point under it to the new one."""
    size, top_b, top_d, prev_b, prev_d, nb, nd = state
    cross = (top_d - prev_d) * (nb - prev_b) >= (nd - prev_d) * (top_b - prev_b)
    popped: np.ndarray = (top_b >= nb) | ((size > 1) & cross)
    return popped


def solve(problem: Problem, budget: int) -> Solution:
    """Least total damage with fixed + chosen bytes <= budget."""
    start = time.perf_counter()
    b, d = problem.bytes, problem.damage
    rows = np.arange(len(b))
    hull, seg = problem.hull, problem.segments
    base = hull[:, 0]
    used = problem.fixed_bytes + b[rows, base].sum()
    if used > budget:
        raise BudgetError(f"budget {budget} is below the smallest plan ({int(used)} bytes)")
    room = budget - used
    k = int(np.searchsorted(seg.cum_bytes, room, side="right"))  # segments fully taken
    # A module's segments come in hull order, so the number it has taken is the hull level it reached.
    level = np.bincount(seg.module[:k], minlength=len(b))
    lp = d[rows, base].sum() + seg.ddamage[:k].sum()
    if k < len(seg.module):  # the relaxation takes a fraction of the next segment
        spent = seg.cum_bytes[k - 1] if k else 0.0
        lp += seg.ddamage[k] * (room - spent) / seg.dbytes[k]
    choice = fill_leftover(b, d, hull[rows, level], budget - problem.fixed_bytes)
    total = int(problem.fixed_bytes + b[rows, choice].sum())
    return Solution(choice, total, float(d[rows, choice].sum()), float(lp),
                    time.perf_counter() - start, int((hull >= 0).sum()))  # fmt: skip


def fill_leftover(b: np.ndarray, d: np.ndarray, choice: np.ndarray, room: float) -> np.ndarray:
    """Spend what the relaxation left (``_fill_once``) until no module's upgrade that saves damage
    fits: a module whose best-rate upgrade no longer fits once others took their share may still
    have a smaller one that does. Every walk that changes the plan lowers its damage, so it ends."""
    while True:
        filled = _fill_once(b, d, choice, room)
        if np.array_equal(filled, choice):
            return filled
        choice = filled


def _fill_once(b: np.ndarray, d: np.ndarray, choice: np.ndarray, room: float) -> np.ndarray:
    """Each module's upgrade that saves the most damage per extra byte (plans from the relaxation sit
    on their hulls, so only larger candidates can save any), taken best rate first whenever it still
    fits. Few fit, so the walk stops as soon as none of the rest can."""
    rows = np.arange(len(b))
    choice = choice.copy()
    now_b, now_d = b[rows, choice], d[rows, choice]
    left = room - now_b.sum()
    extra = b - now_b[:, None]
    saved = now_d[:, None] - d
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((extra > 0) & (extra <= left) & (saved > 0), saved / extra, -INF)
    best = np.argmax(ratio, axis=1)  # ties to the cheaper index
    rate = ratio[rows, best]
    i = np.nonzero(np.isfinite(rate))[0]
    i = i[np.argsort(-rate[i], kind="stable")]
    cost = extra[i, best[i]]
    cheapest_after = np.minimum.accumulate(cost[::-1])[::-1]
    for n, (c, floor) in enumerate(zip(cost.tolist(), cheapest_after.tolist(), strict=True)):
        if floor > left:
            break
        if c <= left:
            choice[i[n]] = best[i[n]]
            left -= c
    return choice
