"""The weight budget: the KV formula against mlx-lm's real caches, measured memory against the budget,
named devices, what trades against what, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import fill_context
from ramserve.budget import (
    activation_shape,
    default_shape,
    kv_shape,
    machine_budget,
    require_fit,
    runtime_bytes,
    weight_budget,
)
from ramserve.engine import Engine
from ramserve.errors import BudgetError
from ramserve.plan import limits, make_plan
from ramserve.quantize import quantize
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import DENSE, MOE, shared_model, user_config


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ramserve.cli", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize(("context", "parallel"), [(300, 1), (512, 3)])
def test_kv_formula_matches_mlx_lm_cache_and_memory_stays_in_budget(
    model: Path, context: int, parallel: int, profile_cache, tmp_path: Path
) -> None:
    source = open_source(str(shared_model(model)), load_settings())
    budget = weight_budget(source, context=context, parallel=parallel)
    plan = make_plan(
        profile_cache(model),
        "auto",
        machine=machine_budget(source, budget.shape),
        settings=load_settings(),
    )
    folder, _ = quantize(source, plan, tmp_path / "model", progress=False)
    engine = Engine(
        folder, load_settings(), context=context, parallel=parallel, prompt_cache_entries=0
    )
    try:
        m = fill_context(engine, context, parallel)
    finally:
        engine.close()
    kv = kv_shape(source)
    assert m["kv"] == kv.bytes(context, parallel) == budget.kv
    assert m["weights"] == plan.memory_bytes
    scratch = budget.runtime - int(load_settings().budget.runtime_fixed_mb * 2**20)
    allowed = plan.memory_bytes + budget.kv + scratch
    print(f"\n{source.name} context {context} x {parallel}: MLX peak {m['peak']:,} <= weights "
          f"{plan.memory_bytes:,} + KV {budget.kv:,} + scratch {scratch:,} = {allowed:,}")  # fmt: skip
    assert m["peak"] <= allowed
    assert plan.memory_bytes <= budget.weights


def test_sliding_window_layers_are_counted_by_their_window(tiny_dir: Path) -> None:
    from mlx_lm.models.cache import RotatingKVCache

    source = open_source(str(tiny_dir), load_settings())
    full = kv_shape(source)
    windowed = type(full)(tuple(type(layer)(layer.per_token, 256) for layer in full.layers),
                          full.dtype_bytes, full.max_context)  # fmt: skip
    assert windowed.bytes(4096, 2) == full.bytes(256, 2) < full.bytes(4096, 2)
    cache = RotatingKVCache(max_size=256)
    assert cache.max_size == windowed.layers[0].window


def test_named_devices_are_budgets_everywhere(profile_cache) -> None:
    source = open_source(str(shared_model(DENSE)), load_settings())
    fit = machine_budget(source)
    for device in ("mac-8", "m4-pro-48"):
        plan = make_plan(profile_cache(DENSE), device, machine=fit, settings=load_settings())
        assert plan.budget.bytes == weight_budget(source, device=device).weights
    assert (
        weight_budget(source, device="mac-8").weights
        < weight_budget(source, device="m4-pro-48").weights
    )
    listed = run_cli("budget", "--devices")
    assert (
        listed.returncode == 0 and "m4-pro-48" in listed.stdout and "iphone-16-pro" in listed.stdout
    )
    shown = run_cli("budget", str(shared_model(DENSE)), "--device", "mac-16", "-q")
    assert shown.returncode == 0
    for line in (
        "total memory",
        "MLX working-set limit",
        "OS reserve",
        "runtime",
        "KV cache",
        "weights",
    ):
        assert line in shown.stdout


def test_tight_memory_names_the_tradeoffs_and_refuses(profile_cache, ramserve_home: Path) -> None:
    source = open_source(str(shared_model(DENSE)), load_settings())
    min_safe = limits(profile_cache(DENSE), load_settings())["min_safe"]
    kv, shape = kv_shape(source, "x"), activation_shape(source)
    needed = (
        runtime_bytes(  # a named device is Apple Silicon: fused attention, no score matrices
            kv, default_shape(kv, load_settings(), 4096, 2), shape, load_settings().budget, False
        )
        + kv.bytes(4096, 2)
        + min_safe
    )
    ramserve_home.mkdir(parents=True, exist_ok=True)
    user_config(
        ramserve_home,
        "[budget]\nos_reserve_min_gb = 0\nos_reserve_share = 0\n"
        f"[devices.tight]\nmemory_gb = {(needed - min_safe // 2) / 2**30}\n",
    )
    source = open_source(str(shared_model(DENSE)), load_settings())  # settings are read at open
    budget = weight_budget(source, context=4096, parallel=2, device="tight", min_safe=min_safe)
    t = budget.tradeoffs
    assert not t["fits"] and 0 < t["longest_context_at_min_safe"] < 4096
    assert t["usable_needed_for_context"] == needed
    with pytest.raises(BudgetError, match="longest context that fits is"):
        require_fit(budget, min_safe)
    shown = run_cli("budget", str(shared_model(DENSE)), "--device", "tight", "--context", "4096",
                    "--parallel", "2", "--kv-bits", "16", "-q")  # fmt: skip
    # The fit keeps the context and parallelism the user gave and takes a smaller prefill step.
    assert "runtime shape: 4,096 tokens x 2 sequences, prefill" in shown.stdout
    assert "tried first" in shown.stdout and "prefill 2048 tokens x 2" in shown.stdout
    assert "(fits)" in shown.stdout and "longest context at min-safe" in shown.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "100000"], "beyond the model's maximum of 4,096"),
        (["--context", "0"], "context must be a positive"),
        (["--parallel", "-2"], "parallel must be a positive"),
        (["--device", "pocket-calculator"], "known devices: ipad-pro-16"),
    ],
)
def test_bad_budget_input_is_one_clear_line(args: list[str], message: str) -> None:
    done = run_cli("budget", str(shared_model(DENSE)), "-q", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
