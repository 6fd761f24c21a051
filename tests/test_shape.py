"""The runtime shape the fit chooses: prefill first, then parallelism, then context; never what the user
fixed; never a refusal where a smaller shape fits; `run` and `budget` agree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ramserve.budget import (
    ActivationShape,
    Ask,
    KVLayer,
    KVShape,
    budget_for,
    default_shape,
    require_fit,
)
from ramserve.cli import main
from ramserve.errors import BudgetError
from ramserve.settings import Device, Settings, load_settings
from ramserve.shape import fit_shape

# A Qwen3-30B-A3B-like geometry: 48 layers of 4 KV heads x 128, 32 query heads, float32 on a CPU.
KV = KVShape(tuple(KVLayer(2 * 4 * 128) for _ in range(48)), 4, 40960, head_dim=128)
ACT = ActivationShape(heads=32, width=6144)
GB = 2**30


def on_device(memory_gb: float) -> Settings:
    s = load_settings()
    devices = {"box": Device(memory_gb=memory_gb)}
    budget = s.budget.model_copy(update={"os_reserve_min_gb": 0, "os_reserve_share": 0})
    return s.model_copy(update={"devices": devices, "budget": budget})


def weights_at(settings: Settings, **shape: int) -> int:
    first = default_shape(KV, settings, shape.pop("context", None), shape.pop("parallel", None))
    return budget_for(KV, ACT, settings, replace(first, **shape), device="box").weights


def test_the_default_shape_is_kept_when_it_fits() -> None:
    settings = on_device(64)
    b = fit_shape(KV, ACT, settings, 4 * GB, Ask(kv_bits=16, device="box"))
    assert b.shape == default_shape(KV, settings) and not b.rejected and b.weights >= 4 * GB


def test_the_prefill_chunk_shrinks_first_then_the_batch_then_parallelism() -> None:
    settings = on_device(24)
    first = default_shape(KV, settings)
    assert first.prefill_chunk == 2048 and first.parallel == 4 and first.prefill_batch == 4
    # Needs more than a 1024-token chunk leaves, less than a 512-token chunk leaves.
    needed = (
        weights_at(settings, prefill_chunk=1024) + weights_at(settings, prefill_chunk=512)
    ) // 2
    b = fit_shape(KV, ACT, settings, needed, Ask(kv_bits=16, device="box"))
    assert b.shape.prefill_chunk == 512 and b.shape.parallel == 4 and b.shape.context == 8192
    assert [r.shape.prefill_chunk for r in b.rejected] == [2048, 1024]
    assert b.weights >= needed and all(r.weights < needed for r in b.rejected)
    # More than any prefill step frees: parallelism goes next, never below what fits.
    needed = weights_at(settings, prefill_chunk=256, prefill_batch=1, parallel=2) - 1
    b = fit_shape(KV, ACT, settings, needed, Ask(kv_bits=16, device="box"))
    assert (b.shape.prefill_chunk, b.shape.prefill_batch, b.shape.parallel) == (256, 1, 2)
    assert b.shape.context == 8192


def test_what_the_user_fixed_is_never_changed() -> None:
    settings = on_device(24)
    needed = weights_at(settings, prefill_chunk=256, prefill_batch=1, parallel=1) - 1
    kept = fit_shape(KV, ACT, settings, needed, Ask(parallel=4, kv_bits=16, device="box"))
    assert kept.shape.parallel == 4  # the context gives way instead
    assert kept.shape.context < 8192 and kept.weights >= needed
    assert kept.shape.context % KV.step == 0
    both = fit_shape(
        KV, ACT, settings, needed, Ask(context=8192, parallel=4, kv_bits=16, device="box")
    )
    assert (both.shape.parallel, both.shape.context) == (4, 8192) and both.weights < needed
    with pytest.raises(BudgetError, match="longest context that fits"):
        require_fit(both, needed)


def test_the_context_shrinks_last_and_not_below_the_floor() -> None:
    settings = on_device(24)
    needed = weights_at(settings, prefill_chunk=256, prefill_batch=1, parallel=1) + GB
    b = fit_shape(KV, ACT, settings, needed, Ask(kv_bits=16, device="box"))
    assert b.shape.parallel == 1 and 512 <= b.shape.context < 8192 and b.weights >= needed
    longer = weights_at(settings, prefill_chunk=256, prefill_batch=1, parallel=1,
                        context=b.shape.context + KV.step)  # fmt: skip
    assert longer < needed  # the longest that fits, to the KV cache's step
    hopeless = fit_shape(KV, ACT, settings, 40 * GB, Ask(kv_bits=16, device="box"))
    assert hopeless.weights < 40 * GB and hopeless.shape.context == 8192  # nothing fits: no change


def test_auto_kv_precision_is_given_up_after_the_prefill_step_before_parallelism() -> None:
    settings = on_device(24)
    prefill_only = weights_at(settings, prefill_chunk=256, prefill_batch=1)
    needed = prefill_only + GB  # more than the smallest prefill step frees
    auto = fit_shape(KV, ACT, settings, needed, Ask(device="box"))
    assert auto.shape.kv_bits == 8 and auto.shape.parallel == 4 and auto.shape.context == 8192
    assert auto.weights >= needed and auto.rejected[-1].shape.kv_bits == 16
    assert auto.kv < auto.rejected[-1].weights  # (the 8-bit cache is well under the 16-bit one)
    fixed = fit_shape(KV, ACT, settings, needed, Ask(kv_bits=16, device="box"))
    assert fixed.shape.kv_bits == 16 and fixed.shape.parallel < 4  # the user's 16 bits stay
    roomy = fit_shape(KV, ACT, settings, 2 * GB, Ask(device="box"))
    assert roomy.shape.kv_bits == 16 and not roomy.rejected  # no need: full precision
    narrow = replace(KV, head_dim=80)  # 80 is not a multiple of the 64-element groups
    assert fit_shape(narrow, ACT, settings, needed, Ask(device="box")).shape.kv_bits == 16


def test_the_kv_line_follows_the_precision() -> None:
    settings = on_device(64)
    shape = default_shape(KV, settings)
    lines = {b: budget_for(KV, ACT, settings, replace(shape, kv_bits=b), device="box").kv
             for b in (16, 8, 4)}  # fmt: skip
    assert lines[16] == KV.bytes(8192, 4)
    # float32 on this CPU: 8 bits + a float32 scale and bias per 64 elements = 9 bits; 4 -> 5
    assert lines[8] == pytest.approx(lines[16] * 9 / 32) and lines[4] == pytest.approx(
        lines[16] * 5 / 32
    )


def test_budget_and_run_report_one_min_safe_and_one_shape(
    tiny_dir: Path, ramserve_home: Path, capsys
) -> None:
    from ramserve.fit import fit, fitted_budget
    from ramserve.source import open_source

    source = open_source(str(tiny_dir), load_settings())
    shown = fitted_budget(source, Ask(256, 2), progress=False)
    fitted = fit(source, "auto", Ask(256, 2), progress=False)
    assert shown.needed == fitted.budget.needed
    assert shown.tradeoffs["min_safe_bytes"] == fitted.budget.tradeoffs["min_safe_bytes"]
    assert shown.shape == fitted.budget.shape
    assert fitted.engine_args()["prefill_chunk"] == shown.shape.prefill_chunk
    assert main(["budget", str(tiny_dir), "--context", "256", "--parallel", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "runtime shape: 256 tokens x 2 sequences, prefill 256 tokens x 2" in out


def test_auto_quantizes_the_kv_cache_where_it_is_a_large_share_of_memory(profile_cache) -> None:
    """With the KV damage the profile measured, `auto` weighs each precision: where the cache is
    large, 8 bits free enough memory for the weights to lose far less than the cache does; where it
    is small, 16 bits."""
    from ramserve.budget import activation_shape, kv_shape
    from ramserve.fit import fit_runtime
    from ramserve.plan import min_safe_memory
    from ramserve.source import open_source

    from .conftest import DENSE

    profile = profile_cache(DENSE)
    assert set(profile.kv_damage) == {"8", "4"}
    probe = open_source(str(DENSE), on_device(64))
    kv, act = kv_shape(probe, "box"), activation_shape(probe)
    min_safe = min_safe_memory(profile, probe.settings, 2)  # bf16 on a device
    big = default_shape(kv, probe.settings, 4096, 64)
    rest = budget_for(kv, act, probe.settings, big, device="box")
    # a box where the 16-bit cache leaves the weights twice min-safe
    memory = (rest.usable - rest.weights + 2 * min_safe) / GB
    source = open_source(str(DENSE), on_device(memory))
    large, plan = fit_runtime(source, profile, "auto", Ask(context=4096, parallel=64, device="box"))
    assert large.shape.kv_bits == 8 and (large.shape.context, large.shape.parallel) == (4096, 64)
    options = {o.bits: o for o in large.kv_options}
    assert options[8].total < options[16].total and options[16].weights_damage > 0
    small, _ = fit_runtime(source, profile, "auto", Ask(context=512, parallel=1, device="box"))
    assert small.shape.kv_bits == 16
    fixed, _ = fit_runtime(source, profile, "auto", Ask(context=4096, parallel=64, kv_bits=16, device="box"))  # fmt: skip
    assert fixed.shape.kv_bits == 16 and not fixed.kv_options


def test_score_matrices_are_charged_only_where_attention_materialises_them() -> None:
    """MLX's CPU (and CUDA) prefill attention is matmul + softmax; Metal's is fused, except over a
    quantized cache, which mlx-lm attends to with matmul + softmax everywhere."""
    settings = on_device(64)
    shape = default_shape(KV, settings)
    mac_16 = budget_for(KV, ACT, settings, shape, device="box").runtime
    mac_8 = budget_for(KV, ACT, settings, replace(shape, kv_bits=8), device="box").runtime
    here = budget_for(KV, ACT, settings, shape).runtime  # this machine: MLX's CPU back end
    factor = settings.budget.attention_factor
    # factor x heads x chunk x context x 4 bytes x 4 sequences
    scores = factor * ACT.heads * 2048 * 8192 * 4 * 4
    assert mac_8 == here and here - mac_16 == pytest.approx(scores, rel=0.01)
