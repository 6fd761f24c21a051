"""Fitting a model to this machine: budget -> profile (cached) -> plan -> quantized folder (cached).

This is what ``ramserve run`` does before it serves, and what a variant swap does while serving.
Every stage reports how long it took and whether it was a cache hit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .budget import (
    Ask,
    Budget,
    activation_dtype,
    activation_shape,
    default_shape,
    kv_shape,
    machine_budget,
    require_fit,
    weight_budget,
)
from .device import FLOAT_BYTES, runtime_dtype
from .errors import BudgetError
from .fmt import human_bytes, table
from .plan import histogram, is_size_spec, make_plan, min_safe_memory
from .profile import analyze, candidates_for, quantized_bytes
from .quantize import quantize_to_serve, rounding_line
from .records import Plan, Profile
from .settings import Settings
from .shape import choose_kv, fit_shape, fit_source_shape
from .source import Source

ASKED_NOTHING = Ask()


@dataclass
class Fit:
    source: Source
    profile: Profile
    budget: Budget
    plan: Plan
    folder: Path
    stages: list[tuple[str, float, bool]] = field(default_factory=list)  # name, seconds, cached

    def engine_args(self) -> dict[str, Any]:
        """The runtime shape the fit chose, as the engine takes it."""
        return self.budget.shape.engine_args()


def absolute_minimum(source: Source) -> int:
    """The smallest any plan can be, from shapes alone (every module at its cheapest candidate)."""
    from .profile import fixed_bytes

    settings = source.settings
    total = fixed_bytes(source)
    for m in source.modules:
        sizes = [
            quantized_bytes(m.numel, m.shape[-1], b, g, FLOAT_BYTES[source.float_dtype])
            for b, g in candidates_for(m, settings)
        ]
        total += min(sizes, default=2 * m.numel)
    return total


def hub_precheck(spec: str, settings: Settings, ask: Ask) -> None:
    """For a hub repo, before downloading weights: refuse when even the smallest possible plan plus
    the KV cache cannot fit this machine, from config.json and the safetensors index alone."""
    import json

    from .budget import activation_shape_of, kv_shape_of_config
    from .source import REPO_ID, hub_snapshot

    if Path(spec).expanduser().exists() or not (match := REPO_ID.match(spec)):
        return
    meta = hub_snapshot(
        match["repo"], match["rev"], settings.cache, ["config.json", "*.safetensors.index.json"]
    )
    index = next(meta.glob("*.safetensors.index.json"), None)
    if index is None:
        return  # a single-file model: its size is known only once fetched
    config = json.loads((meta / "config.json").read_text())
    stored = int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
    analysis = settings.analysis
    floor_bpw = min(analysis.bits) + 32 / max(analysis.group_sizes)
    floor = int(stored / 2 * floor_bpw / 8)  # every bf16 parameter at the fewest bits
    kv = kv_shape_of_config(config, FLOAT_BYTES[runtime_dtype()])
    budget = fit_shape(kv, activation_shape_of(config), settings, floor, ask)
    if budget.weights < floor:
        raise BudgetError(
            f"{spec} cannot fit this machine: even at {floor_bpw:.2f} bits per weight its "
            f"{human_bytes(stored)} of bf16 weights need {human_bytes(floor)}, and only "
            f"{human_bytes(max(budget.weights, 0))} is left even at the smallest runtime shape "
            f"({budget.shape.describe()}: {human_bytes(budget.kv)} of KV cache and "
            f"{human_bytes(budget.runtime)} of runtime); "
            "nothing but metadata was downloaded"
        )


def precheck(source: Source, spec: str, budget: Budget) -> None:
    """Refuse before any analysis when no plan can fit at any runtime shape (needs only shapes and
    the machine): ``budget`` is fitted for the smallest possible plan (``absolute_minimum``)."""
    floor = budget.needed or 0
    if budget.weights < floor:
        require_fit(budget, floor, "the smallest possible plan (every module at its fewest bits)")
    if is_size_spec(spec, source.settings):
        from .budget import parse_budget

        asked = parse_budget(
            spec, parameters=source.parameter_count, bf16_bytes=2 * source.parameter_count
        )
        if asked < floor:
            raise BudgetError(
                f"budget {spec} = {human_bytes(asked)} is below the smallest possible plan of "
                f"{source.name} ({human_bytes(floor)}, every module at its fewest bits); "
                "nothing was analysed"
            )


def fit(
    source: Source,
    spec: str = "auto",
    ask: Ask = ASKED_NOTHING,
    *,
    progress: bool = True,
) -> Fit:
    """Measure, analyse, plan and quantize: everything ``ramserve run`` needs before serving.

    The runtime shape (context, parallel sequences, prefill step) is fitted with the weights
    (ramserve/shape.py): what the user fixed (``ask``) stays, the rest shrinks until the plan fits."""
    stages: list[tuple[str, float, bool]] = []
    t = time.perf_counter()
    budget = fit_source_shape(source, absolute_minimum(source), ask)
    precheck(source, spec, budget)
    stages.append(("budget", time.perf_counter() - t, False))

    t = time.perf_counter()
    profile = analyze(source, progress=progress)
    stages.append(("profile", time.perf_counter() - t, profile.cache_hit))

    t = time.perf_counter()
    budget, plan = fit_runtime(source, profile, spec, ask)
    stages.append(("plan", time.perf_counter() - t, False))

    t = time.perf_counter()
    folder, cached = quantize_to_serve(source, plan, progress=progress)
    stages.append(("quantize", time.perf_counter() - t, cached))
    return Fit(source, profile, budget, plan, folder, stages)


def fit_runtime(source: Source, profile: Profile, spec: str, ask: Ask) -> tuple[Budget, Plan]:
    """The runtime shape and the plan for ``spec`` chosen together; refuses, with the numbers, when
    nothing fits. With ``--kv-bits auto`` (None) and a measured KV damage, each KV precision is
    weighed (``shape.choose_kv``); without one, the shrink order decides (ramserve/shape.py)."""
    settings, device = source.settings, ask.device
    min_safe = min_safe_memory(profile, settings, FLOAT_BYTES[activation_dtype(source, device)])
    sized = make_plan(profile, spec, settings, machine=machine_budget(source)) if is_size_spec(
        spec, settings) else None  # fmt: skip
    needed = max(min_safe, sized.memory_bytes if sized else 0)

    kv, act = (
        kv_shape(source, device),
        activation_shape(source),
    )  # once: every shape tried reads them

    def shaped(kv_bits: int | None) -> Budget:
        return fit_shape(kv, act, settings, needed, replace(ask, kv_bits=kv_bits))

    def plan_at(b: Budget) -> Plan:
        if sized is not None:
            return sized
        machine = machine_budget(source, b.shape) if device is None else (
            lambda _: (b.weights, FLOAT_BYTES[activation_dtype(source, device)]))  # fmt: skip
        return make_plan(profile, spec, settings, machine=machine)

    def damage_at(b: Budget) -> tuple[float, Plan] | None:
        try:
            plan = plan_at(b)
        except BudgetError:
            return None
        return (plan.predicted_damage, plan) if plan.memory_bytes <= b.weights else None

    if ask.kv_bits is None and profile.kv_damage and kv.quantizable:
        asked = default_shape(kv, settings, ask.context, ask.parallel)
        chosen = choose_kv(profile.kv_damage, (asked.context, asked.parallel),
                           shaped,
                           damage_at)  # fmt: skip
        if chosen is not None:
            return chosen
    budget = shaped(ask.kv_bits)
    require_fit(budget, min_safe)
    plan = plan_at(budget)
    require_plan_fits(plan, budget, f"budget {spec}")
    return budget, plan


def fitted_budget(source: Source, ask: Ask, *, progress: bool = True) -> Budget:
    """``ramserve budget``: the runtime shape and weight budget ``run --budget auto`` would choose,
    on this machine or a named device (bad input is refused before any analysis)."""
    weight_budget(source, context=ask.context, parallel=ask.parallel, device=ask.device)
    profile = analyze(source, progress=progress)
    budget, _ = fit_runtime(source, profile, "auto", ask)
    return budget


def plan_for(source: Source, spec: str, quiet: bool, allow_unsafe: bool = False) -> Plan:
    """The plan for a budget: the profile (cached) solved against this machine's memory."""
    profile = analyze(source, progress=not quiet)
    return make_plan(profile, spec, source.settings, allow_unsafe=allow_unsafe,
                     machine=machine_budget(source))  # fmt: skip


def require_plan_fits(plan: Plan, budget: Budget, what: str) -> None:
    """Refuse a plan whose weights, as loaded, exceed what the machine allows beside its KV cache."""
    if plan.memory_bytes > budget.weights:
        raise BudgetError(
            f"{what} gives {human_bytes(plan.memory_bytes)} of weights in memory, more than "
            f"this machine can hold beside a {budget.context:,}-token KV cache for {budget.parallel} "
            f"sequences ({human_bytes(budget.weights)}); use a smaller budget, context or --parallel"
        )


def render_fit(f: Fit) -> str:
    from .budget import render_budget

    p = f.plan
    hist = ", ".join(f"{k}: {100 * b:.0f}%" for k, _, b in histogram(p))
    lines = [
        render_budget(f.budget.to_json()),
        "",
        f"plan {p.budget.spec}: {human_bytes(p.total_bytes)} stored, "
        f"{human_bytes(p.memory_bytes)} in memory, {p.bits_per_weight:.2f} bits per weight, "
        f"predicted damage {p.predicted_damage:.4g}",
        f"bits/group by weight: {hist}",
        f"model folder: {f.folder}",
        *([line] if (line := rounding_line(f.folder)) else []),
        "",
        table(
            ["stage", "seconds", "cache"],
            [(n, f"{s:.2f}", "hit" if c else "-") for n, s, c in f.stages],
        ),  # fmt: skip
    ]
    return "\n".join(lines)
