"""Plans: solving a profile for a budget (records.Plan), reading them back, and their human views."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import Problem, Solution, fill_leftover, solve
from .budget import parse_budget
from .errors import BudgetError
from .fmt import human_bytes, table
from .records import BudgetAsk, Choice, Plan, Profile, RecordError, SafetyFloor, SolverStats
from .rounding import is_compensated
from .settings import Settings
from .source import Source


def problem_of(profile: Profile, settings: Settings, allow_unsafe: bool) -> Problem:
    floor = None if allow_unsafe else settings.allocate.min_sqnr_db
    return Problem.from_profile(profile, floor, settings.rounding.method == "compensated")


def limits(profile: Profile, settings: Settings) -> dict[str, int]:
    """The smallest plan that passes the safety floor, the absolute smallest, and the all-best one."""
    safe = problem_of(profile, settings, False)
    absolute = problem_of(profile, settings, True)
    return {"min_safe": safe.min_bytes(), "absolute_min": absolute.min_bytes(),
            "max": safe.bytes_of(safe.best_choice())}  # fmt: skip


def min_safe_memory(profile: Profile, settings: Settings, float_bytes: int) -> int:
    """The smallest safe plan's weights as loaded by a runtime with ``float_bytes``-byte floats: what
    the runtime shape must leave room for."""
    return memory_bytes(profile, problem_of(profile, settings, False).min_choice(), float_bytes)


MachineBudget = Callable[[str | None], tuple[int, int]]
"""The machine's weight budget for a named device, or for this machine when given None: the bytes
the weights may take in memory, and the bytes per float (scales, 16-bit tensors) the runtime uses."""


def is_size_spec(spec: str, settings: Settings) -> bool:
    """A budget given as a size (6GB, 4.5bpw, 30%), not a name the profile or the machine resolves."""
    return spec not in ("min-safe", "auto", "max") and spec not in settings.devices


def resolve_budget(
    spec: str, profile: Profile, settings: Settings, machine: MachineBudget | None = None
) -> tuple[int, int]:
    """Bytes for a budget spec against this profile, and the runtime's bytes per float.

    ``auto`` is this machine's weight budget, ``max`` the same capped at the all-16-bit model, and a
    named device that device's weight budget: all three need ``machine`` (see budget.weight_budget).
    """
    if spec == "min-safe":
        return limits(profile, settings)["min_safe"], 2
    if is_size_spec(spec, settings):
        return parse_budget(spec, parameters=profile.parameters, bf16_bytes=profile.bf16_bytes), 2
    if machine is None:
        raise BudgetError(
            f"budget {spec!r} needs the model's KV geometry; give the model, not a profile"
        )
    weights, float_bytes = machine(None if spec in ("auto", "max") else spec)
    if spec == "max":
        weights = min(weights, memory_bytes(profile, _all16_choice(profile), float_bytes))
    return weights, float_bytes


def make_plan(
    profile: Profile,
    spec: str,
    settings: Settings,
    *,
    allow_unsafe: bool = False,
    machine: MachineBudget | None = None,
) -> Plan:
    """Solve for the budget named by ``spec``.

    The budget bounds the weights as loaded: where the runtime keeps floats wider than stored (float32
    on MLX's CPU back end), the stored-size target is searched until the loaded size fits (``fit_loaded``).
    """
    budget, float_bytes = resolve_budget(spec, profile, settings, machine)
    problem = problem_of(profile, settings, allow_unsafe)
    lim = limits(profile, settings)
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
        fitted = fit_loaded(problem, profile, budget, float_bytes)
        if fitted is None:
            raise too_small(f" once loaded with {float_bytes}-byte floats")
        sol = fitted
    floor = SafetyFloor(settings.allocate.min_sqnr_db, allow_unsafe)
    # A size spec bounds the stored bytes; what they take in memory depends on the runtime.
    runtime_float = machine(None)[1] if machine is not None else float_bytes
    loaded = memory_bytes(profile, sol.choice, runtime_float)
    return assemble_plan(profile, BudgetAsk(spec, budget), sol, floor, note, (runtime_float, loaded),
                 settings.rounding.record())  # fmt: skip


def fit_loaded(
    problem: Problem, profile: Profile, budget: int, float_bytes: int
) -> Solution | None:
    """The best plan whose loaded size fits ``budget``: the stored-size target is searched between the
    smallest plan and the budget (loaded size grows with it, by up to float_bytes / 2 per byte), each
    guess scaled by how far the last one missed, until the bracket is within 0.1% of the budget; then
    what the loaded budget still has room for goes to the upgrades that save the most damage per
    loaded byte, so the budget is filled to within one module's move."""
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
    if problem.packed is None:
        return best
    room = budget - profile.fixed_bytes * float_bytes / 2
    choice = fill_leftover(problem.loaded(float_bytes), problem.damage, best.choice, room)
    rows = np.arange(len(choice))
    return replace(best, choice=choice, bytes=problem.bytes_of(choice),
                   damage=float(problem.damage[rows, choice].sum()))  # fmt: skip


def _all16_choice(profile: Profile) -> np.ndarray:
    return np.zeros(len(profile.modules), dtype=np.int64)


def memory_bytes(profile: Profile, choice: np.ndarray, float_bytes: int) -> int:
    """The weights' size once loaded by a runtime that keeps floats in ``float_bytes`` bytes."""
    scale = float_bytes / 2
    total = profile.fixed_bytes * scale
    for m, j in zip(profile.modules, choice, strict=True):
        o = m.options[int(j)]
        packed = m.packed_bytes(o)
        total += packed + (o.bytes - packed) * scale
    return int(total)


def assemble_plan(
    profile: Profile,
    budget: BudgetAsk,
    sol: Solution,
    floor: SafetyFloor,
    note: str | None,
    loaded: tuple[int, int],
    rounding: dict[str, Any],
) -> Plan:
    choices = {}
    for m, j in zip(profile.modules, sol.choice, strict=True):
        o = m.options[int(j)]
        damage = o.damage_with(is_compensated(rounding))
        choices[m.path] = Choice(m.kind, m.layer, o.bits, o.group_size, o.bytes, damage, m.numel)
    quantized = {p: c for p, c in choices.items() if c.bits < 16}
    common = Counter((c.bits, c.group_size) for c in quantized.values()).most_common(1)
    bits, group = common[0][0] if common else (4, 64)
    quantization: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, c in quantized.items():
        quantization[path] = {"group_size": c.group_size, "bits": c.bits, "mode": "affine"}
    solver = SolverStats(sol.lower_bound, sol.gap, sol.gap / sol.damage if sol.damage else 0.0,
                         sol.seconds, sol.hull_points, len(choices))  # fmt: skip
    return Plan(
        name=profile.name,
        fingerprint=profile.fingerprint,
        profile_key=profile.settings_key,
        budget=budget,
        total_bytes=sol.bytes,
        fixed_bytes=profile.fixed_bytes,
        parameters=profile.parameters,
        bits_per_weight=8 * sol.bytes / profile.parameters,
        budget_used=sol.bytes / budget.bytes,
        predicted_damage=sol.damage,
        solver=solver,
        safety_floor=floor,
        note=note,
        quantization=quantization,
        quantizer=profile.quantizer,
        choices=choices,
        runtime_float_bytes=loaded[0],
        memory_bytes=loaded[1],
        rounding=rounding,
    )


def load_plan(path: Path) -> Plan:
    try:
        return Plan.read(path)
    except RecordError as e:
        raise BudgetError(f"cannot use plan {path}: {e}") from e


def histogram(plan: Plan) -> list[tuple[str, float, float]]:
    """(choice, share of modules, share of quantizable bytes at 16-bit) per bits × group size."""
    choices = plan.choices.values()
    n = len(choices)
    params = sum(c.params for c in choices) or 1
    counts: Counter[str] = Counter()
    weight: Counter[str] = Counter()
    for c in choices:
        counts[c.label] += 1
        weight[c.label] += c.params
    order = sorted(
        counts, key=lambda s: (int(s.split("/")[0]), -int(s.split("/")[1]) if "/" in s else 0)
    )
    return [(k, counts[k] / n, weight[k] / params) for k in order]


def layer_map(plan: Plan) -> tuple[list[str], list[list[object]]]:
    choices = plan.choices.values()
    kinds = list(dict.fromkeys(c.kind for c in choices if c.layer is not None))
    cells = {(c.layer, c.kind): c.label for c in choices}
    layers = sorted({c.layer for c in choices if c.layer is not None})
    return kinds, [[layer, *(cells.get((layer, k), "-") for k in kinds)] for layer in layers]


def rounding_label(rounding: dict[str, Any]) -> str:
    if not is_compensated(rounding):
        return "to nearest"
    return (f"compensated (H from {rounding['sequences']} x {rounding['tokens']} self-sampled "
            f"tokens, damp {rounding['damp']})")  # fmt: skip


def render_plan(plan: Plan) -> str:
    s = plan.solver
    lines = [
        f"{plan.name}  budget {plan.budget.spec} = {human_bytes(plan.budget.bytes)}",
        f"  total {human_bytes(plan.total_bytes)} ({100 * plan.budget_used:.2f}% of budget), "
        f"{plan.bits_per_weight:.3f} bits per weight",
        f"  predicted damage {plan.predicted_damage:.5g}; lower bound {s.lower_bound:.5g} "
        f"(gap {100 * s.gap_relative:.3f}%), solved in {1000 * s.seconds:.1f} ms",
        f"  rounding: {rounding_label(plan.rounding)}",
    ]
    if plan.note:
        lines.append(f"  note: {plan.note}")
    if plan.safety_floor.lifted:
        lines.append("  safety floor lifted (--allow-unsafe)")
    lines += ["", table(["bits/group", "modules", "bytes@16"],
                        [(k, f"{100 * a:.1f}%", f"{100 * b:.1f}%") for k, a, b in histogram(plan)])]  # fmt: skip
    kinds, rows = layer_map(plan)
    lines += ["", "bits/group by layer and module kind:", table(["layer", *kinds], rows)]
    for path, c in plan.choices.items():
        if c.layer is None:
            lines.append(f"  {path}: {c.label}")
    return "\n".join(lines)


def plot_plan(plan: Plan, path: Path) -> None:
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
    ax.set_title(f"{plan.name} @ {plan.budget.spec}: {plan.bits_per_weight:.2f} bpw")
    fig.colorbar(im, ax=ax, label="bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def served_name(source: Source) -> str:
    """The id a server offers a model under: the source model's name for a folder ramserve wrote."""
    plan = Plan.in_folder(source.path)
    return plan.name if plan else source.name
