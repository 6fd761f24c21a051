from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from ramserve.allocate import Problem, lower_hulls, solve
from ramserve.cli import main
from ramserve.errors import BudgetError
from ramserve.plan import limits, make_plan
from ramserve.profile import analyze
from ramserve.settings import load_settings
from ramserve.source import open_source


def random_problem(rng: np.random.Generator, modules: int, cands: int) -> Problem:
    b = rng.integers(10, 200, size=(modules, cands)).astype(float)
    d = rng.random((modules, cands)) * 10
    # realistic shape: more bytes tend to mean less damage
    order = np.argsort(b, axis=1)
    d = np.take_along_axis(np.sort(d, axis=1)[:, ::-1], np.argsort(order, axis=1), axis=1)
    d += rng.random((modules, cands)) * 0.5
    return Problem(b, d, fixed_bytes=int(rng.integers(0, 50)))


def brute_force(p: Problem, budget: int) -> float:
    best = np.inf
    for combo in itertools.product(range(p.bytes.shape[1]), repeat=p.bytes.shape[0]):
        idx = np.array(combo)
        rows = np.arange(len(idx))
        if p.fixed_bytes + p.bytes[rows, idx].sum() <= budget:
            best = min(best, p.damage[rows, idx].sum())
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_optimal_or_within_reported_gap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = random_problem(rng, modules=int(rng.integers(2, 6)), cands=int(rng.integers(2, 5)))
    lo, hi = p.min_bytes(), p.bytes_of(p.best_choice())
    budget = int(rng.integers(lo, hi + 1))
    sol = solve(p, budget)
    optimum = brute_force(p, budget)
    assert sol.bytes <= budget
    assert sol.lower_bound <= optimum + 1e-9  # a true lower bound
    assert sol.damage >= optimum - 1e-9
    assert sol.damage - optimum <= sol.gap + 1e-9  # within the reported gap
    again = solve(p, budget)
    assert np.array_equal(sol.choice, again.choice)  # deterministic


def test_gap_is_small_on_random_instances() -> None:
    rng = np.random.default_rng(123)
    gaps = []
    for _ in range(30):
        p = random_problem(rng, 5, 4)
        budget = (p.min_bytes() + p.bytes_of(p.best_choice())) // 2
        sol = solve(p, budget)
        gaps.append((sol.damage - brute_force(p, budget)) / max(sol.damage, 1e-9))
    assert np.median(gaps) < 0.02


def test_hull_is_convex_and_decreasing() -> None:
    rng = np.random.default_rng(5)
    p = random_problem(rng, 50, 19)
    hull = lower_hulls(p.bytes, p.damage)
    for i in range(50):
        pts = [(p.bytes[i, j], p.damage[i, j]) for j in hull[i] if j >= 0]
        bs, ds = zip(*pts, strict=True)
        assert all(np.diff(bs) > 0) and all(np.diff(ds) < 0)
        slopes = np.diff(ds) / np.diff(bs)
        assert all(np.diff(slopes) >= -1e-12)  # convex: slopes flatten


@pytest.mark.parametrize("seed", range(20))
def test_hull_lies_under_every_candidate(seed: int) -> None:
    """Strictly convex, made of candidates, and no candidate below it: that is the lower hull. Ties in
    bytes, collinear points and refused (infinite) candidates included."""
    rng = np.random.default_rng(seed)
    b = rng.integers(1, 12, size=(40, 9)).astype(float) * 10
    d = np.round(100 / b + rng.integers(0, 4, size=b.shape), 0)  # coarse: ties and collinear runs
    b[rng.random(b.shape) < 0.15] = np.inf
    d[~np.isfinite(b)] = np.inf
    b[:, 0], d[:, 0] = 500.0, 0.0  # keeping 16-bit is always possible
    hull = lower_hulls(b, d)
    for i in range(len(b)):
        hb, hd = b[i, hull[i][hull[i] >= 0]], d[i, hull[i][hull[i] >= 0]]
        finite = np.isfinite(b[i])
        assert hb[0] == b[i, finite].min() and hd[-1] == d[i].min()
        assert hd[0] == d[i, b[i] == hb[0]].min() and hb[-1] == b[i, d[i] == hd[-1]].min()
        assert all(np.diff(hb) > 0) and all(np.diff(np.diff(hd) / np.diff(hb)) > 0)
        under = np.interp(b[i, finite], hb, hd)  # flat beyond the last point: the least damage
        assert all(d[i, finite] >= under - 1e-9)


@pytest.mark.parametrize("spec", ["25%", "30%", "40%", "min-safe"])
def test_shared_plans_fit_and_use_the_budget(
    dense: Path, moe: Path, spec: str, profile_cache
) -> None:
    for model in (dense, moe):
        profile = profile_cache(model)
        plan = make_plan(profile, spec, settings=load_settings())
        assert plan.total_bytes <= plan.budget.bytes
        assert plan.total_bytes >= 0.995 * plan.budget.bytes
        recount = profile.fixed_bytes + sum(c.bytes for c in plan.choices.values())
        assert recount == plan.total_bytes
        q = plan.quantization
        listed = {k for k in q if isinstance(q[k], dict)}
        assert listed == {p for p, c in plan.choices.items() if c.bits < 16}


def test_safety_floor_and_allow_unsafe(tiny_dir: Path) -> None:
    profile = analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    lim = limits(profile, load_settings())
    assert lim["absolute_min"] < lim["min_safe"]
    with pytest.raises(BudgetError, match="min-safe is .* absolute minimum"):
        make_plan(profile, str(lim["absolute_min"]) + "B", settings=load_settings())
    plan = make_plan(
        profile, f"{lim['absolute_min']}B", allow_unsafe=True, settings=load_settings()
    )
    assert plan.safety_floor.lifted and any(c.bits == 2 for c in plan.choices.values())
    floor = plan.safety_floor.min_sqnr_db
    safe = make_plan(profile, "min-safe", settings=load_settings())
    for m in profile.modules:
        c = safe.choices[m.path]
        if c.bits < 16:
            o = next(o for o in m.options if o.bits == c.bits and o.group_size == c.group_size)
            assert o.sqnr_db >= floor


@pytest.mark.parametrize("spec", ["lots", "-5GB", "0%", "0bpw", "12 parsecs"])
def test_bad_budget_names_accepted_forms(tiny_dir: Path, spec: str) -> None:
    with pytest.raises(BudgetError, match="accepted forms"):
        make_plan(
            analyze(open_source(str(tiny_dir), load_settings()), progress=False),
            spec,
            settings=load_settings(),
        )


def test_budget_at_bf16_size_is_all_16_bit(tiny_dir: Path) -> None:
    plan = make_plan(
        analyze(open_source(str(tiny_dir), load_settings()), progress=False),
        "100%",
        settings=load_settings(),
    )
    assert all(c.bits == 16 for c in plan.choices.values())
    assert "16-bit" in plan.note


def test_budget_units(tiny_dir: Path) -> None:
    profile = analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    mib = make_plan(profile, "0.25MiB", settings=load_settings()).budget.bytes
    mb = make_plan(profile, "0.25MB", settings=load_settings()).budget.bytes
    assert mib == int(0.25 * 2**20) and mb == 250_000
    bpw = make_plan(profile, "6bpw", settings=load_settings())
    assert bpw.budget.bytes == int(6 * profile.parameters / 8)
    assert bpw.bits_per_weight <= 6


def test_plan_cli_writes_json_and_plot(tiny_moe_dir: Path, tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "map.png"
    assert (
        main(
            ["plan", str(tiny_moe_dir), "--budget", "35%", "-o", str(out), "--plot", str(png), "-q"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "bits/group by layer" in text and "bits per weight" in text
    plan = json.loads(out.read_text())
    assert plan["quantization"]["mode"] == "affine"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", str(tiny_moe_dir), "--budget", "1B", "-q"]) == 2
    assert "min-safe is" in capsys.readouterr().err


def test_max_is_the_best_plan_the_machine_holds(tiny_dir: Path) -> None:
    from ramserve.budget import machine_budget, weight_budget
    from ramserve.source import open_source

    source = open_source(str(tiny_dir), load_settings())
    profile = analyze(source, progress=False)
    shape = weight_budget(source, context=256, parallel=1).shape
    roomy = make_plan(
        profile, "max", machine=machine_budget(source, shape), settings=load_settings()
    )
    assert all(c.bits == 16 for c in roomy.choices.values())  # this machine holds it all
    tight = roomy.memory_bytes // 2
    small = make_plan(
        profile, "max", machine=lambda device: (tight, 4), settings=load_settings()
    )  # a small machine's answer
    # fills it to within one module's move (a tiny model's modules are each ~2% of it)
    step = max(m.numel for m in profile.modules) * 4
    assert tight - step <= small.memory_bytes <= tight
    assert small.predicted_damage > 0
