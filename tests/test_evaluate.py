from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ramserve import quantize as qz
from ramserve.cli import main
from ramserve.device import runtime_dtype
from ramserve.evaluate import (
    EvalError,
    encode,
    evaluate,
    load_for_eval,
    recipe_quantization,
    stored_bytes,
    token_windows,
)
from ramserve.plan import make_plan
from ramserve.profile import analyze
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import EVAL_TEXT
from .factory import CORPUS, make_model


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 30 KB of the factory corpus, shuffled: thousands of tokens for the tiny tokenizer."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n".join(rng.choice(CORPUS) for _ in range(600)))
    return path


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_simulated_quantization_scores_as_the_quantized_model(
    tmp_path: Path, text: Path, arch: str
) -> None:
    """Scoring a plan simulated on the float model gives what MLX's quantized kernels give."""
    src = make_model(tmp_path / arch, arch, layers=2)
    plan = make_plan(
        analyze(open_source(str(src), load_settings()), progress=False),
        "40%",
        settings=load_settings(),
    )
    folder, _ = qz.quantize(open_source(str(src), load_settings()), plan, progress=False)
    kw = {"reference": str(src), "seq_len": 64, "samples": 12, "progress": False}
    real = evaluate(str(folder), text, load_settings(), **kw)
    sim = evaluate(str(src), text, load_settings(), quantization=plan.quantization, quantizer=plan.quantizer,
                   rounding=plan.rounding, **kw)  # fmt: skip
    # the same plan quantized by mx.quantize, as mlx-lm would: ramserve's quantizer does better
    plain = evaluate(str(src), text, load_settings(), quantization=plan.quantization, **kw)
    nearest = evaluate(str(src), text, load_settings(), quantization=plan.quantization,
                       quantizer=plan.quantizer, rounding={"method": "nearest"}, **kw)  # fmt: skip
    assert real.kl_mean is not None and sim.kl_mean is not None and plain.kl_mean is not None
    assert nearest.kl_mean is not None and plan.rounding["method"] == "compensated"
    assert plan.quantizer["ranges"] and nearest.kl_mean < plain.kl_mean
    assert real.kl_mean > 1e-4  # the plan does change the model
    assert sim.ppl_mean == pytest.approx(real.ppl_mean, rel=1e-4)
    assert sim.ppl_median == pytest.approx(real.ppl_median, rel=1e-4)
    assert sim.kl_mean == pytest.approx(real.kl_mean, rel=0.02, abs=1e-6)
    assert sim.bits_per_weight == pytest.approx(8 * plan.total_bytes / plan.parameters)
    assert real.bits_per_weight == pytest.approx(sim.bits_per_weight, rel=0.01)


def test_the_same_arguments_score_the_same_sequences(tiny_dir: Path, text: Path) -> None:
    tokens = list(range(10_000))
    a, b = token_windows(tokens, 100, 7), token_windows(tokens, 100, 7)
    assert np.array_equal(a, b) and a.shape == (7, 100)
    assert a[0, 0] == 0 and a[-1, 0] == 9_900  # spread over the whole text, first to last
    assert len({int(r[0]) for r in a}) == 7  # no window twice
    kw = {"seq_len": 48, "samples": 5, "progress": False}
    first, second = (
        evaluate(str(tiny_dir), text, load_settings(), **kw),
        evaluate(str(tiny_dir), text, load_settings(), **kw),
    )
    assert first == second
    assert first.sequences == 5 and first.tokens == 5 * 47 and first.kl_mean is None


def test_recipes_follow_mlx_lm(tiny_dir: Path, tiny_moe_dir: Path) -> None:
    src = open_source(str(tiny_dir), load_settings())
    mixed = recipe_quantization(src, "mixed_4_6")
    # mlx-lm's mixed recipe: more bits for v/down in the first and last eighth and every third layer,
    # and for lm_head; the rest at the low width (of 2 layers, the second is the last eighth)
    assert mixed["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert mixed["model.layers.0.mlp.down_proj"]["bits"] == 4
    assert mixed["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert mixed["lm_head"]["bits"] == 6
    uniform = recipe_quantization(open_source(str(tiny_moe_dir), load_settings()), "uniform-3g32")
    assert uniform["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert uniform["model.layers.0.mlp.switch_mlp.up_proj"]["bits"] == 3
    assert {q["group_size"] for p, q in uniform.items() if not p.endswith("mlp.gate")} == {32}
    # the size of a plan's map is the plan's own byte count
    plan = make_plan(
        analyze(open_source(str(tiny_dir), load_settings()), progress=False),
        "35%",
        settings=load_settings(),
    )
    assert stored_bytes(src, plan.quantization) == plan.total_bytes
    with pytest.raises(EvalError, match="unknown recipe"):
        recipe_quantization(src, "mixed_5_7")
    with pytest.raises(EvalError, match="uniform-<bits>g<group>"):
        recipe_quantization(src, "uniform-four")


def test_bad_input_is_refused_clearly(tiny_dir: Path, tmp_path: Path, text: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("def add(a, b):\n    return a + b\n")
    other_vocab = make_model(tmp_path / "other", "qwen3", vocab=320)
    cases = [
        (["--text", str(short)], "fewer than one sequence of 512"),
        (["--text", str(text), "--seq-len", "4096"], "beyond tiny-qwen3's context of 512"),
        (
            ["--text", str(text), "--reference", str(other_vocab), "--seq-len", "32"],
            "vocabulary of 320",
        ),  # fmt: skip
        (["--text", str(tmp_path / "missing.txt")], "cannot read the text"),
        (["--text", str(text), "--recipe", "mixed_9_9"], "unknown recipe"),
        (["--text", str(text), "--samples", "0"], "--samples must be at least 1"),
    ]
    for args, message in cases:
        assert main(["eval", str(tiny_dir), "-q", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_samples_all_scores_every_window_of_the_text(tiny_dir: Path, text: Path, capsys) -> None:
    args = ["eval", str(tiny_dir), "--text", str(text), "--seq-len", "64", "-q", "--json"]
    assert main([*args, "--samples", "all"]) == 0
    every = json.loads(capsys.readouterr().out)
    tokens = encode(load_for_eval(str(tiny_dir), load_settings()).tokenizer, text.read_text())
    assert every["sequences"] == len(tokens) // 64 > 48  # more than the default takes
    assert main([*args, "--samples", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == 3


def test_eval_cli_on_the_shared_model(dense: Path, capsys) -> None:
    args = ["eval", str(dense), "--text", str(EVAL_TEXT), "--reference", str(dense),
            "--seq-len", "96", "--samples", "2", "-q", "--json"]  # fmt: skip
    assert main(args) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["kl_mean"] == pytest.approx(0.0, abs=1e-6) and base["top1_agreement"] == 1.0
    assert 1.0 < base["ppl_mean"] < 100  # a trained model on code it did not see
    assert main([*args, "--recipe", "uniform-3g64"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert low["kl_mean"] > 1e-3 and low["ppl_mean"] > base["ppl_mean"]
    assert low["bits_per_weight"] == pytest.approx(3.5, abs=0.02)


def test_a_quantized_folder_is_not_quantized_again(tiny_dir: Path, text: Path) -> None:
    plan = make_plan(
        analyze(open_source(str(tiny_dir), load_settings()), progress=False),
        "40%",
        settings=load_settings(),
    )
    folder, _ = qz.quantize(open_source(str(tiny_dir), load_settings()), plan, progress=False)
    with pytest.raises(EvalError, match="already quantized"):
        load_for_eval(str(folder), load_settings(), plan.quantization)
    e = load_for_eval(str(folder), load_settings())
    assert any("Quantized" in type(m).__name__ for _, m in e.model.named_modules())
    want = getattr(mx, runtime_dtype())  # float32 on MLX's CPU back end
    assert e.model.parameters()["model"]["norm"]["weight"].dtype == want
