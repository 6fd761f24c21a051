"""Plans: the chosen quantization per module for a budget, as plan.json, and its human views.

``quantization`` is exactly mlx-lm's per-module config object (every quantized module listed; a module
absent from it stays 16-bit), so a plan can be written into a model's config.json as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import Problem, Solution, solve
from .atomic import read_json
from .budget import named_devices, parse_budget
from .errors import BudgetError
from .fmt import human_bytes, table
from .settings import load_settings
from .source import Source

FORMAT = "ramserve-plan/1"


def _problem(profile: dict[str, Any], allow_unsafe: bool) -> Problem:
    floor = None if allow_unsafe else load_settings().allocate.min_sqnr_db
    return Problem.from_profile(profile, floor)


def limits(profile: dict[str, Any]) -> dict[str, int]:
    """The smallest plan that passes the safety floor, the absolute smallest, and the all-best one."""
    safe = _problem(profile, False)
    return {"min_safe": safe.min_bytes(), "absolute_min": _problem(profile, True).min_bytes(),
            "max": safe.bytes_of(safe.best_choice())}  # fmt: skip


MachineBudget = Callable[[str | None], tuple[int, int]]
"""The machine's weight budget for a named device, or for this machine when given None: the bytes
the weights may take in memory, and the bytes per float (scales, 16-bit tensors) the runtime uses."""


def is_size_spec(spec: str) -> bool:
    """A budget given as a size (6GB, 4.5bpw, 30%), not a name the profile or the machine resolves."""
    return spec not in ("min-safe", "auto", "max") and spec not in named_devices()


def resolve_budget(
    spec: str, profile: dict[str, Any], machine: MachineBudget | None = None
) -> tuple[int, int]:
    """Bytes for a budget spec against this profile, and the runtime's bytes per float.

    ``auto`` is this machine's weight budget, ``max`` the same capped at the all-16-bit model, and a
    named device that device's weight budget: all three need ``machine`` (see budget.weight_budget).
    """
    if spec == "min-safe":
        return limits(profile)["min_safe"], 2
    if is_size_spec(spec):
        return parse_budget(
            spec, parameters=profile["parameters"], bf16_bytes=profile["bf16_bytes"]
        ), 2
    if machine is None:
        raise BudgetError(
            f"budget {spec!r} needs the model's KV geometry; give the model, not a profile"
        )
    weights, float_bytes = machine(None if spec in ("auto", "max") else spec)
    if spec == "max":
        weights = min(weights, memory_bytes(profile, _all16_choice(profile), float_bytes))
    return weights, float_bytes


def make_plan(
    profile: dict[str, Any],
    spec: str,
    *,
    allow_unsafe: bool = False,
    machine: MachineBudget | None = None,
) -> dict[str, Any]:
    """Solve for the budget named by ``spec`` and return the plan.json object.

    The budget bounds the weights as loaded: where the runtime keeps floats wider than stored (float32
    on MLX's CPU back end), the stored-size target is searched until the loaded size fits (``_fit_loaded``).
    """
    budget, float_bytes = resolve_budget(spec, profile, machine)
    problem = _problem(profile, allow_unsafe)
    lim = limits(profile)
    smallest = problem.min_bytes()

    def too_small(what: str) -> BudgetError:
        return BudgetError(
            f"budget {human_bytes(budget)} ({spec}) is below the smallest safe plan{what}: min-safe is "
            f"{human_bytes(lim['min_safe'])} ({lim['min_safe']} bytes); the absolute minimum, with "
            f"--allow-unsafe, is {human_bytes(lim['absolute_min'])} ({lim['absolute_min']} bytes)"
        )

    if budget < smallest:
        raise too_small("")
    note = None
    all16 = _all16_choice(profile)
    if memory_bytes(profile, all16, float_bytes) <= budget:
        note = "the budget holds the whole model in 16-bit: nothing is quantized"
        sol = Solution(all16, problem.bytes_of(all16), 0.0, 0.0, 0.0, 0)
    else:
        fitted = _fit_loaded(problem, profile, budget, float_bytes)
        if fitted is None:
            raise too_small(f" once loaded with {float_bytes}-byte floats")
        sol = fitted
    plan = _plan_json(profile, spec, budget, sol, allow_unsafe, note)
    # A size spec bounds the stored bytes; what they take in memory depends on the runtime.
    runtime_float = machine(None)[1] if machine is not None else float_bytes
    plan["runtime_float_bytes"] = runtime_float
    plan["memory_bytes"] = memory_bytes(profile, sol.choice, runtime_float)
    return plan


def _fit_loaded(
    problem: Problem, profile: dict[str, Any], budget: int, float_bytes: int
) -> Solution | None:
    """The best plan whose loaded size fits ``budget``: the stored-size target is searched between the
    smallest plan and the budget (loaded size grows with it, by up to float_bytes / 2 per byte), each
    guess scaled by how far the last one missed, until the bracket is within 0.1% of the budget."""
    lo = problem.min_bytes()
    best = solve(problem, lo)
    if memory_bytes(profile, best.choice, float_bytes) > budget:
        return None
    hi = target = budget
    for _ in range(40):
        if hi - lo <= budget // 1000:
            break
        sol = solve(problem, target)
        loaded = memory_bytes(profile, sol.choice, float_bytes)
        if loaded <= budget:
            lo, best = target, sol
        else:
            hi = target - 1
        guess = int(target * budget / loaded)
        target = guess if lo < guess < hi else (lo + hi + 1) // 2
    return best


def _all16_choice(profile: dict[str, Any]) -> np.ndarray:
    return np.zeros(len(profile["modules"]), dtype=np.int64)


def memory_bytes(profile: dict[str, Any], choice: np.ndarray, float_bytes: int) -> int:
    """The weights' size once loaded by a runtime that keeps floats in ``float_bytes`` bytes."""
    scale = float_bytes / 2
    total = profile["fixed_bytes"] * scale
    for m, j in zip(profile["modules"], choice, strict=True):
        o = m["options"][int(j)]
        packed = m["numel"] * o["bits"] // 8 if o["bits"] < 16 else 0
        total += packed + (o["bytes"] - packed) * scale
    return int(total)


def _plan_json(
    profile: dict[str, Any],
    spec: str,
    budget: int,
    sol: Solution,
    allow_unsafe: bool,
    note: str | None,
) -> dict[str, Any]:
    choices = {}
    for m, j in zip(profile["modules"], sol.choice, strict=True):
        o = m["options"][int(j)]
        choices[m["path"]] = {"kind": m["kind"], "layer": m["layer"], "bits": o["bits"],
                              "group_size": o["group_size"], "bytes": o["bytes"],
                              "damage": o["damage"], "params": m["numel"]}  # fmt: skip
    quantized = {p: c for p, c in choices.items() if c["bits"] < 16}
    common = Counter((c["bits"], c["group_size"]) for c in quantized.values()).most_common(1)
    bits, group = common[0][0] if common else (4, 64)
    quantization: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, c in quantized.items():
        quantization[path] = {"group_size": c["group_size"], "bits": c["bits"], "mode": "affine"}
    plan = {
        "format": FORMAT,
        "name": profile["name"],
        "fingerprint": profile["fingerprint"],
        "profile_key": profile["settings_key"],
        "budget": {"spec": spec, "bytes": budget},
        "total_bytes": sol.bytes,
        "fixed_bytes": profile["fixed_bytes"],
        "parameters": profile["parameters"],
        "bits_per_weight": 8 * sol.bytes / profile["parameters"],
        "budget_used": sol.bytes / budget,
        "predicted_damage": sol.damage,
        "solver": {
            "lower_bound": sol.lower_bound,
            "gap": sol.gap,
            "gap_relative": sol.gap / sol.damage if sol.damage else 0.0,
            "seconds": sol.seconds,
            "hull_points": sol.hull_points,
            "modules": len(choices),
        },  # fmt: skip
        "safety_floor": {
            "min_sqnr_db": load_settings().allocate.min_sqnr_db,
            "lifted": allow_unsafe,
        },  # fmt: skip
        "note": note,
        "quantization": quantization,
        "quantizer": profile.get("quantizer", {}),
        "choices": choices,
    }
    plan["hash"] = plan_hash(plan)
    return plan


def plan_hash(plan: dict[str, Any]) -> str:
    """Identifies the weights a plan produces: the source fingerprint, the quantization object and the
    quantizer."""
    key = json.dumps([plan["fingerprint"], plan["quantization"], plan.get("quantizer", {})],
                     sort_keys=True)  # fmt: skip
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BudgetError(f"cannot read plan {path}: {e}") from e
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise BudgetError(f"{path} is not a ramserve plan ({FORMAT})")
    return plan


def choice_label(c: dict[str, Any]) -> str:
    return "16" if c["bits"] >= 16 else f"{c['bits']}/{c['group_size']}"


def histogram(plan: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(choice, share of modules, share of quantizable bytes at 16-bit) per bits × group size."""
    choices = plan["choices"].values()
    n = len(choices)
    params = sum(c["params"] for c in choices) or 1
    counts: Counter[str] = Counter()
    weight: Counter[str] = Counter()
    for c in choices:
        counts[choice_label(c)] += 1
        weight[choice_label(c)] += c["params"]
    order = sorted(
        counts, key=lambda s: (int(s.split("/")[0]), -int(s.split("/")[1]) if "/" in s else 0)
    )
    return [(k, counts[k] / n, weight[k] / params) for k in order]


def layer_map(plan: dict[str, Any]) -> tuple[list[str], list[list[object]]]:
    choices = plan["choices"]
    kinds = list(dict.fromkeys(c["kind"] for c in choices.values() if c["layer"] is not None))
    cells = {(c["layer"], c["kind"]): choice_label(c) for c in choices.values()}
    layers = sorted({c["layer"] for c in choices.values() if c["layer"] is not None})
    return kinds, [[layer, *(cells.get((layer, k), "-") for k in kinds)] for layer in layers]


def render_plan(plan: dict[str, Any]) -> str:
    s = plan["solver"]
    lines = [
        f"{plan['name']}  budget {plan['budget']['spec']} = {human_bytes(plan['budget']['bytes'])}",
        f"  total {human_bytes(plan['total_bytes'])} ({100 * plan['budget_used']:.2f}% of budget), "
        f"{plan['bits_per_weight']:.3f} bits per weight",
        f"  predicted damage {plan['predicted_damage']:.5g}; lower bound {s['lower_bound']:.5g} "
        f"(gap {100 * s['gap_relative']:.3f}%), solved in {1000 * s['seconds']:.1f} ms",
    ]
    if plan.get("note"):
        lines.append(f"  note: {plan['note']}")
    if plan["safety_floor"]["lifted"]:
        lines.append("  safety floor lifted (--allow-unsafe)")
    lines += ["", table(["bits/group", "modules", "bytes@16"],
                        [(k, f"{100 * a:.1f}%", f"{100 * b:.1f}%") for k, a, b in histogram(plan)])]  # fmt: skip
    kinds, rows = layer_map(plan)
    lines += ["", "bits/group by layer and module kind:", table(["layer", *kinds], rows)]
    for path, c in plan["choices"].items():
        if c["layer"] is None:
            lines.append(f"  {path}: {choice_label(c)}")
    return "\n".join(lines)


def plot_plan(plan: dict[str, Any], path: Path) -> None:
    """The per-layer bit map as a heat map image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, rows = layer_map(plan)
    grid = np.full((len(rows), len(kinds)), np.nan)
    for i, row in enumerate(rows):
        for j, label in enumerate(row[1:]):
            if label != "-":
                grid[i, j] = float(str(label).split("/")[0])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", vmin=2, vmax=16, aspect="auto")
    for i, row in enumerate(rows):
        for j, label in enumerate(row[1:]):
            ax.text(j, i, str(label), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r[0]) for r in rows])
    ax.set_ylabel("layer")
    ax.set_title(f"{plan['name']} @ {plan['budget']['spec']}: {plan['bits_per_weight']:.2f} bpw")
    fig.colorbar(im, ax=ax, label="bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def folder_plan(folder: Path) -> dict[str, Any] | None:
    """The plan.json of a folder ramserve quantized, or None."""
    plan = read_json(folder / "plan.json")
    return plan if plan and "quantization" in plan else None


def served_name(source: Source) -> str:
    """The id a server offers a model under: the source model's name for a folder ramserve wrote."""
    plan = folder_plan(source.path)
    return str(plan["name"]) if plan else source.name
