"""Solver speed on a synthetic profile of 20,000 modules x 19 candidates (a 30B MoE with experts stored
separately). Target (issue 4): median solve <= 50 ms on this machine. Prints the median and the gap.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ramserve.allocate import Problem, solve  # noqa: E402
from ramserve.fmt import table  # noqa: E402

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]


def synthetic_problem(modules: int = 20_000, seed: int = 0) -> Problem:
    """Realistic shapes: bytes from bits + 32/g per weight, damage ~ importance * 2^(-2 bits)."""
    rng = np.random.default_rng(seed)
    numel = rng.choice([2048 * 768, 768 * 2048, 2048 * 4096, 512 * 2048], size=modules)
    importance = np.exp(rng.normal(0, 1.5, size=modules))
    cols_b, cols_d = [numel * 2.0], [np.zeros(modules)]  # 16-bit
    for b in BITS:
        for g in GROUPS:
            cols_b.append(numel * (b + 32 / g) / 8)
            noise = np.exp(rng.normal(0, 0.05, size=modules))
            cols_d.append(importance * 4.0 ** (-b) * (1 + 64 / g / 16) * noise)
    return Problem(np.stack(cols_b, 1), np.stack(cols_d, 1), fixed_bytes=10_000_000)


def main() -> None:
    rows, results = [], []
    for bpw in (3.0, 4.0, 4.5, 5.0, 6.0):
        cold, warm = [], []
        for _ in range(9):
            p = synthetic_problem()  # a fresh problem: the convex hulls are built inside the timing
            budget = int(p.fixed_bytes + p.bytes[:, 0].sum() / 16 * bpw)
            start = time.perf_counter()
            solve(p, budget)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            sol = solve(p, budget)  # re-targeting the same profile: hulls reused
            warm.append(time.perf_counter() - start)
        med_cold, med_warm = (statistics.median(t) * 1000 for t in (cold, warm))
        gap = sol.gap / sol.damage if sol.damage else 0.0
        rows.append((f"{bpw} bpw", f"{med_cold:.1f}", f"{med_warm:.1f}", f"{100 * gap:.4f}%",
                     f"{100 * sol.bytes / budget:.3f}%"))  # fmt: skip
        results.append({"bpw": bpw, "median_ms_cold": round(med_cold, 2),
                        "median_ms_retarget": round(med_warm, 2), "gap_rel": gap})  # fmt: skip
    print(f"{p.bytes.shape[0]} modules x {p.bytes.shape[1]} candidates")
    print(table(["budget", "cold ms (hulls+solve)", "re-target ms", "gap", "budget used"], rows))
    print(json.dumps({"bench": "allocate", "modules": p.bytes.shape[0], "results": results}))


if __name__ == "__main__":
    main()
