from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate, load
from mlx_lm.utils import load_model

from ramserve import quantize as qz
from ramserve import rounding
from ramserve.cache import profile_path
from ramserve.cli import main
from ramserve.describe import describe
from ramserve.errors import BadModel
from ramserve.evaluate import simulate
from ramserve.plan import make_plan
from ramserve.profile import analyze, drawn_sequences
from ramserve.records import Profile
from ramserve.rounding import drawn_with
from ramserve.settings import load_settings
from ramserve.source import open_source

from .factory import make_model

PROMPT = mx.array([[1, 5, 9, 42, 7, 100, 3, 64, 12, 8]])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def simulated_logits(source_dir: Path, plan: dict) -> mx.array:
    """The source in float32 with the plan's quantization applied as dequantize(quantize(W))."""
    model, _ = load_model(source_dir)
    source = open_source(str(source_dir), load_settings())
    simulate(model, plan.quantization, mx.float32, plan.quantizer, plan.rounding, source)
    model.set_dtype(mx.float32)
    return model(PROMPT)


def quantized_logits(folder: Path) -> mx.array:
    model, _ = load(str(folder))  # stock mlx-lm
    model.set_dtype(mx.float32)  # the CPU back end runs MoE only in float32
    return model(PROMPT)


@pytest.mark.parametrize("budget", ["25%", "30%", "40%"])
def test_shared_models_quantize_load_and_match(
    dense: Path, moe: Path, budget: str, profile_cache
) -> None:
    for model_dir in (dense, moe):
        plan = make_plan(profile_cache(model_dir), budget, settings=load_settings())
        folder, cached = qz.quantize(
            open_source(str(model_dir), load_settings()), plan, progress=False
        )
        assert not cached
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert abs(index["metadata"]["total_size"] / plan.total_bytes - 1) < 0.01
        got, want = quantized_logits(folder), simulated_logits(model_dir, plan)
        scale = mx.abs(want).max().item()
        assert mx.abs(got - want).max().item() < 1e-3 * scale
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["quantization"] == plan.quantization == cfg["quantization_config"]


def test_generate_and_inspect_report_the_plan(dense: Path, profile_cache) -> None:
    plan = make_plan(profile_cache(dense), "30%", settings=load_settings())
    folder, _ = qz.quantize(open_source(str(dense), load_settings()), plan, progress=False)
    model, tok = load(str(folder))
    text = generate(model, tok, "def add(a, b):", max_tokens=12)
    assert isinstance(text, str) and len(text) > 0
    d = describe(open_source(str(folder), load_settings()))
    assert d["plan"]["hash"] == plan.hash and d["plan"]["budget"]["spec"] == "30%"
    assert d["parameters"] == plan.parameters
    again, cached = qz.quantize(open_source(str(dense), load_settings()), plan, progress=False)
    assert cached and again == folder


def test_every_kind_of_module(tmp_path: Path) -> None:
    """Tied embeddings, stacked experts, modules that cannot take a group size, 16-bit beside every
    bits x group size."""
    for arch, hidden in (("qwen3_moe", 64), ("llama", 96), ("llama", 80)):
        src = make_model(tmp_path / f"{arch}{hidden}", arch, hidden=hidden)
        plan = make_plan(
            analyze(open_source(str(src), load_settings()), progress=False),
            "45%" if hidden != 80 else "100%",
            settings=load_settings(),
        )
        folder, _ = qz.quantize(open_source(str(src), load_settings()), plan, progress=False)
        got, want = quantized_logits(folder), simulated_logits(src, plan)
        assert mx.allclose(got, want, atol=1e-3 * mx.abs(want).max().item()).item()
        model, _ = load(str(folder))
        kinds = {type(m).__name__ for _, m in model.named_modules()}
        if hidden == 80:
            assert not any("Quantized" in k for k in kinds)
        else:
            assert any("Quantized" in k for k in kinds)


def test_interrupted_write_is_never_trusted_and_rerun_completes(
    tiny_moe_dir: Path, monkeypatch
) -> None:
    plan = make_plan(
        analyze(open_source(str(tiny_moe_dir), load_settings()), progress=False),
        "40%",
        settings=load_settings(),
    )
    final = qz.model_dir(plan.fingerprint, plan.hash)
    real = qz._Producer.get
    calls = {"n": 0}

    def failing(self, t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, t)

    monkeypatch.setattr(qz._Producer, "get", failing)
    with pytest.raises(KeyboardInterrupt):
        qz.quantize(open_source(str(tiny_moe_dir), load_settings()), plan, progress=False)
    assert not final.exists() and not qz.is_complete(final, plan.hash)
    assert not list(final.parent.glob("*.partial"))  # the staging folder is gone too
    monkeypatch.setattr(qz._Producer, "get", real)
    folder, cached = qz.quantize(
        open_source(str(tiny_moe_dir), load_settings()), plan, progress=False
    )
    assert folder == final and not cached and qz.is_complete(folder, plan.hash)
    load(str(folder))


def test_quantized_input_is_refused(tiny_dir: Path, capsys) -> None:
    plan = make_plan(
        analyze(open_source(str(tiny_dir), load_settings()), progress=False),
        "40%",
        settings=load_settings(),
    )
    folder, _ = qz.quantize(open_source(str(tiny_dir), load_settings()), plan, progress=False)
    with pytest.raises(BadModel, match="already quantized"):
        qz.quantize(open_source(str(folder), load_settings()), plan, progress=False)
    assert main(["quantize", str(folder), "--budget", "40%", "-q"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_plan_for_another_model_is_refused(tiny_dir: Path, tiny_llama_dir: Path) -> None:
    plan = make_plan(
        analyze(open_source(str(tiny_dir), load_settings()), progress=False),
        "40%",
        settings=load_settings(),
    )
    with pytest.raises(BadModel, match="make a new plan"):
        qz.quantize(open_source(str(tiny_llama_dir), load_settings()), plan, progress=False)


def test_cli_quantize_from_plan_file(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    plan_file, out = tmp_path / "plan.json", tmp_path / "out"
    assert (
        main(["plan", str(tiny_dir), "--budget", "35%", "-o", str(plan_file), "-q", "--json"]) == 0
    )
    capsys.readouterr()
    assert main(["quantize", str(tiny_dir), "--plan", str(plan_file), "-o", str(out), "-q"]) == 0
    assert "written" in capsys.readouterr().out
    assert isinstance(load(str(out))[0], nn.Module)


def test_quantize_takes_the_analysis_samples_and_writes_the_same_bytes(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    source = open_source(str(tiny_dir), load_settings())
    profile = analyze(source, progress=False)
    r = load_settings().rounding
    assert profile.samples is not None and profile.samples.drawn_with == drawn_with(source, r)
    assert np.array(profile.samples.tokens).shape == (r.sequences, r.tokens)
    plan = make_plan(profile, "40%", settings=load_settings())
    real, draws = rounding.sampled_sequences, []

    def counted(*args, **kwargs):
        draws.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(rounding, "sampled_sequences", counted)
    taken, _ = qz.quantize(source, plan, tmp_path / "taken", progress=False)
    assert draws == []
    # a profile without them (written before they were kept): the pass draws the same itself
    path = profile_path(source.fingerprint)
    replace(Profile.read(path), samples=None).write(path)
    drawn, _ = qz.quantize(source, plan, tmp_path / "drawn", progress=False)
    assert draws == [(r.sequences, r.tokens)]
    shards = sorted(p.name for p in taken.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in drawn.glob("*.safetensors"))
    for name in shards:
        assert digest(taken / name) == digest(drawn / name)


def test_samples_drawn_with_other_settings_are_not_taken(tiny_dir: Path) -> None:
    source = open_source(str(tiny_dir), load_settings())
    analyze(source, progress=False)
    rounding_now = load_settings().rounding.model_dump()
    taken = drawn_sequences(source, rounding_now)
    assert taken is not None and taken.tokens is not None
    assert drawn_sequences(source, {**rounding_now, "seed": 1}) is None
    assert drawn_sequences(source, {**rounding_now, "tokens": rounding_now["tokens"] * 2}) is None
