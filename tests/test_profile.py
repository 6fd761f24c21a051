from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import pytest

from ramserve import profile as prof
from ramserve.cli import main
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import user_config
from .factory import make_model


@pytest.mark.parametrize("shape", [(64, 256), (4, 96, 128), (130, 384)])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_candidate_bytes_equal_mlx_arrays(shape, bits, group_size) -> None:
    if shape[-1] % group_size:
        pytest.skip("impossible candidate")  # covered by the non-divisible test below
    w = mx.random.normal(shape).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    numel = w.size
    assert (
        prof.quantized_bytes(numel, shape[-1], bits, group_size, 2)
        == q.nbytes + s.nbytes + b.nbytes
    )


def test_profile_covers_every_module_and_candidate(tiny_moe_dir: Path) -> None:
    src = open_source(str(tiny_moe_dir), load_settings())
    p = prof.analyze(src, progress=False)
    settings = load_settings()
    by_path = {m.path: m for m in p.modules}
    assert set(by_path) == {m.path for m in src.modules}
    for m in src.modules:
        options = by_path[m.path].options
        assert len(options) == 1 + len(prof.candidates_for(m, settings))
        assert options[0].bits == 16 and options[0].damage == 0
        for o in options[1:]:
            assert 0 < o.rel_mse < 1 and o.damage > 0
    router = by_path["model.layers.0.mlp.gate"]
    assert {o.bits for o in router.options} == {8, 16}  # restricted in configs/
    experts = by_path["model.layers.1.mlp.switch_mlp.down_proj"]
    assert experts.shape == [4, 64, 128]
    # more bits, less error, at every group size
    for g in (32, 64, 128):
        errs = [experts.option(b, g).rel_mse for b in (2, 3, 4, 5, 6, 8)]
        assert errs == sorted(errs, reverse=True)


def test_non_divisible_dimension_omits_impossible_candidates(tiny_llama_dir: Path) -> None:
    p = prof.analyze(open_source(str(tiny_llama_dir), load_settings()), progress=False)
    q = next(m for m in p.modules if m.kind == "attn_q")  # last dim 96
    assert {o.group_size for o in q.options} == {None, 32}


def test_module_without_group_size_keeps_only_16_bit(tmp_path: Path) -> None:
    p = prof.analyze(
        open_source(str(make_model(tmp_path / "odd", "llama", hidden=80)), load_settings()),
        progress=False,
    )
    q = next(m for m in p.modules if m.kind == "attn_q")
    assert [o.bits for o in q.options] == [16]


def test_sampled_error_close_to_full(dense: Path) -> None:
    src = open_source(str(dense), load_settings())
    settings = load_settings()
    m = next(m for m in src.modules if m.kind == "mlp_down")
    w = src.weights()[f"{m.path}.weight"].astype(mx.bfloat16)
    streams = [mx.cpu]
    sampled = prof.analyse_module(m, w, settings, "bfloat16", streams)
    settings_full = settings.model_copy(deep=True)
    settings_full.analysis.sample_elements = m.numel
    full = prof.analyse_module(m, w, settings_full, "bfloat16", streams)
    for s, f in zip(sampled[1:], full[1:], strict=True):
        assert s.rel_mse == pytest.approx(f.rel_mse, rel=0.05)


def test_measured_error_is_exact_on_a_large_tensor() -> None:
    """The profile's error sums stay exact on millions of elements (a single float32 sum drifts ~1%)."""
    import numpy as np

    w = (mx.random.normal((4096, 2048), key=mx.random.key(3)) * 0.02).astype(mx.bfloat16)
    ((measured, _),) = prof.measure_errors(w, [(8, 32)], [mx.cpu])
    ref = np.asarray(w.astype(mx.float32), dtype=np.float64)
    q = mx.dequantize(*mx.quantize(w, group_size=32, bits=8), group_size=32, bits=8)
    err = np.asarray(q.astype(mx.float32), dtype=np.float64) - ref
    assert measured == pytest.approx(np.square(err).sum() / np.square(ref).sum(), rel=1e-4)


def test_cache_reused_and_invalidated(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    first = prof.analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    assert first.cache_hit is False
    path = prof.profile_path(first.fingerprint)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(prof, "analyse_module", boom)
    second = prof.analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    assert second.cache_hit is True and second.modules == first.modules
    with pytest.raises(AssertionError, match="recomputed"):
        prof.analyze(open_source(str(tiny_dir), load_settings()), force=True, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):  # another fingerprint
        prof.analyze(
            open_source(str(make_model(tmp_path / "other", "qwen3", seed=7)), load_settings()),
            progress=False,
        )
    assert json.loads(path.read_text())["modules"] == [asdict(m) for m in first.modules]


def test_interrupted_run_leaves_no_profile_and_resumes(tiny_dir: Path, monkeypatch) -> None:
    src = open_source(str(tiny_dir), load_settings())
    reference = prof.analyze(src, progress=False)
    prof.profile_path(src.fingerprint).unlink()
    real = prof.analyse_module
    calls = {"n": 0}

    def interrupt_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # in the second layer
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prof, "analyse_module", interrupt_late)
    with pytest.raises(KeyboardInterrupt):
        prof.analyze(src, progress=False)
    assert prof.load_profile(src) is None
    assert not prof.profile_path(src.fingerprint).exists()
    partial = prof.profile_path(src.fingerprint).with_suffix(".partial.json")
    assert partial.exists()

    monkeypatch.setattr(prof, "analyse_module", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(prof, "analyse_module", counting)
    resumed = prof.analyze(src, progress=False)
    assert 0 < counted["n"] < len(src.modules)  # resumed, not restarted
    assert [m.options for m in resumed.modules] == [m.options for m in reference.modules]
    assert [m.importance for m in resumed.modules] == pytest.approx(
        [m.importance for m in reference.modules]
    )
    assert not partial.exists()


def _streamed(folder: Path, sequences: int = 3, tokens: int = 16, sweeps: int = 2):
    from ramserve.fisher import FisherSettings, streamed_fisher

    cfg = FisherSettings(sequences=sequences, tokens=tokens, sweeps=sweeps, seed=0, memory_share=1,
                         row_smoothing=0)  # fmt: skip
    return streamed_fisher(
        open_source(str(folder), load_settings()), cfg, mx.float32, progress=False
    ).stats


def _inputs(folder: Path, sequences: int = 3, tokens: int = 16, sweeps: int = 2):
    from ramserve.fisher import StreamedModel, jacobi_inputs

    src = open_source(str(folder), load_settings())
    run = StreamedModel(src, mx.float32)
    x, labels, _ = jacobi_inputs(
        run, sequences, tokens, sweeps, 0, 0, int(src.config["vocab_size"])
    )
    return x, labels


@pytest.mark.parametrize(
    ("arch", "tied", "tolerance", "probes"),
    [
        ("qwen3", False, 1e-4, True),
        ("llama", False, 1e-4, True),
        ("qwen3_moe", False, 1e-2, True),
        ("qwen3", True, 1e-4, True),
        ("qwen3_moe", False, 1e-2, False),  # every module's own weight gradient, per sequence
    ],  # fmt: skip
)
def test_streamed_fisher_equals_the_whole_models_gradients(
    tmp_path: Path, arch: str, tied: bool, tolerance: float, probes: bool, monkeypatch
) -> None:
    """One layer at a time gives the same per-sequence squared gradients as the whole model."""
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from ramserve import fisher
    from ramserve.engine import load_model

    if not probes:
        monkeypatch.setattr(fisher, "probed_types", lambda: ())
    folder = make_model(tmp_path / "m", arch, layers=3, tied=tied)
    stats = _streamed(folder)
    x, labels = _inputs(folder)
    model = load_model(folder)[0]

    def loss(x_: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(x_), y, reduction="sum")

    grad = nn.value_and_grad(model, loss)
    rows: dict[str, np.ndarray] = {}
    cols: dict[str, np.ndarray] = {}
    for s in range(x.shape[0]):
        g = dict(tree_flatten(grad(x[s : s + 1], labels[s : s + 1])[1]))
        for m in open_source(str(folder), load_settings()).modules:
            sq = np.asarray(mx.square(g[f"{m.path}.weight"]), dtype=np.float64) / x.size
            rows[m.path] = rows.get(m.path, 0) + sq.sum(-1)
            cols[m.path] = cols.get(m.path, 0) + sq.sum(-2)
    assert set(stats) == set(rows)
    for path, stat in stats.items():
        assert np.allclose(stat.rows, rows[path], rtol=tolerance, atol=1e-9 * rows[path].max()), (
            path
        )
        assert np.allclose(stat.cols, cols[path], rtol=tolerance, atol=1e-9 * cols[path].max()), (
            path
        )


def test_streamed_fisher_holds_about_one_layer(tmp_path: Path) -> None:
    """Bounded memory: MLX's peak while streaming an 8-layer model stays far below its weights."""
    folder = make_model(tmp_path / "m", "qwen3", layers=8, hidden=256, vocab=256)
    weights = (
        4 * open_source(str(folder), load_settings()).parameter_count
    )  # float32, as the pass runs
    mx.clear_cache()
    mx.reset_peak_memory()
    _streamed(folder)
    peak = mx.get_peak_memory()
    assert peak < 0.5 * weights, (peak, weights)


def test_jacobi_sweeps_make_the_models_own_sample(tiny_dir: Path) -> None:
    """With the noise of every position fixed, sweep k fixes the first k tokens; enough sweeps give
    exactly the sample the model writes one token at a time with that noise."""
    x, _ = _inputs(tiny_dir, sequences=2, tokens=12, sweeps=11)
    again, _ = _inputs(tiny_dir, sequences=2, tokens=12, sweeps=12)
    assert (x == again).all().item()  # a fixed point: every token is its prefix's sample
    partial, _ = _inputs(tiny_dir, sequences=2, tokens=12, sweeps=3)
    assert (partial[:, :4] == x[:, :4]).all().item()
    assert not (partial == x).all().item()  # (the tiny model's later tokens still moved)


def test_self_fisher_predicts_the_kl_of_weight_noise(tiny_dir: Path) -> None:
    """½ σ² tr(F) is the KL per token that noise of variance σ² in a module's weight causes."""
    from ramserve.engine import load_model

    stats = _streamed(tiny_dir, sequences=16, tokens=64, sweeps=4)
    x, _ = _inputs(tiny_dir, sequences=16, tokens=64, sweeps=4)
    model = load_model(tiny_dir)[0]
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"]

    def log_probs() -> mx.array:
        logits = model(x).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    base = log_probs()
    for path in paths:
        module = dict(model.named_modules())[path]
        w = module.weight
        sigma = 0.1 * mx.sqrt(mx.square(w).mean()).item()
        kls = []
        for draw in range(4):
            module.weight = w + sigma * mx.random.normal(w.shape, key=mx.random.key(draw))
            kls.append(((mx.exp(base) * (base - log_probs())).sum(-1).mean()).item())
        module.weight = w
        predicted = 0.5 * sigma**2 * stats[path].trace
        assert 0.6 < float(sum(kls) / len(kls)) / predicted < 1.6, path


def test_profile_uses_the_self_fisher_and_is_deterministic(tiny_moe_dir: Path) -> None:
    first = prof.analyze(
        open_source(str(tiny_moe_dir), load_settings()), progress=False, force=True
    )
    second = prof.analyze(
        open_source(str(tiny_moe_dir), load_settings()), progress=False, force=True
    )
    assert first.estimator == "self-fisher/2" and first.fisher_seconds > 0
    imp = [m.importance for m in first.modules]
    assert imp == [m.importance for m in second.modules]
    assert all(i > 0 for i in imp)
    for m in first.modules:  # damage: the predicted KL, ½ Σ F̂ δW² = ½ Σ F̂ W² × weighted error
        assert m.options[0].bits == 16 and m.options[0].damage == 0
        for o in m.options[1:]:
            assert o.damage == pytest.approx(m.fisher_energy * o.rel_fisher)
        fewer_bits = [o.rel_fisher for o in m.options[1:] if o.group_size == 64]
        assert fewer_bits == sorted(fewer_bits, reverse=True)  # 2-bit worst, 8-bit best


def test_energy_flow_when_the_model_does_not_fit_for_the_fisher(
    tmp_path: Path, ramserve_home: Path
) -> None:
    """Without memory for gradients the estimate falls back to the weights' energy flow, which
    follows the weights, not the names: scaling a block's output weights raises only its importance."""
    import numpy as np

    ramserve_home.mkdir(parents=True, exist_ok=True)
    user_config(ramserve_home, "[sensitivity.fisher]\nmemory_share = 1e-12\n")
    base = make_model(tmp_path / "a", "llama", layers=3)
    p_base = prof.analyze(open_source(str(base), load_settings()), progress=False)
    assert p_base.estimator == "energy-flow/1"
    scaled = make_model(tmp_path / "b", "llama", layers=3)
    shard = next(
        f
        for f in scaled.glob("*.safetensors")
        if "model.layers.1.mlp.down_proj.weight" in mx.load(str(f))
    )
    arrays = mx.load(str(shard))
    arrays["model.layers.1.mlp.down_proj.weight"] = (
        arrays["model.layers.1.mlp.down_proj.weight"] * 8
    )
    mx.save_safetensors(str(shard), arrays, metadata={"format": "pt"})
    p_scaled = prof.analyze(open_source(str(scaled), load_settings()), progress=False)
    imp = lambda p, path: next(m.importance for m in p.modules if m.path == path)  # noqa: E731
    path = "model.layers.1.mlp.down_proj"
    assert imp(p_scaled, path) > 10 * imp(p_base, path)
    assert np.isclose(imp(p_scaled, "model.layers.0.mlp.down_proj"),
                      imp(p_base, "model.layers.0.mlp.down_proj"))  # fmt: skip


def test_analyze_cli_report(tiny_moe_dir: Path, capsys) -> None:
    assert main(["analyze", str(tiny_moe_dir), "--report", "-q"]) == 0
    out = capsys.readouterr().out
    assert "span of importance" in out and "expert_down" in out
    assert main(["analyze", str(tiny_moe_dir), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_hit"] is True


def test_fisher_rank_one_estimate_keeps_each_experts_marginals() -> None:
    import numpy as np

    from ramserve.fisher import FisherStat

    def estimate(stat: FisherStat, rows: np.ndarray | None, smooth: float) -> np.ndarray:
        """F̂ of the given flattened rows (all when None), from the two factors the profile uses."""
        scale = stat.row_scale(smooth)
        return scale[slice(None) if rows is None else rows, None] * stat.column_weights(rows)

    f = np.random.default_rng(0).random((3, 5, 4))  # 3 stacked experts, 5 outputs, 4 inputs
    stat = FisherStat(f.sum(-1), f.sum(-2))
    assert stat.trace == pytest.approx(f.sum())
    full = estimate(stat, None, 0.0).reshape(3, 5, 4)
    assert np.allclose(full.sum(-1), f.sum(-1), rtol=1e-5)
    assert np.allclose(full.sum(-2), f.sum(-2), rtol=1e-5)
    some = estimate(stat, np.array([1, 7, 14]), 0.0)
    assert np.allclose(some, full.reshape(15, 4)[[1, 7, 14]])
    w = np.random.default_rng(1).random((3, 5, 4))
    products = prof.squared_products(mx.array(w), stat.columns()[:, :, None])
    assert (stat.row_scale(0.5) @ products[:, 0]) == pytest.approx(
        float((estimate(stat, None, 0.5).reshape(3, 5, 4) * w**2).sum()), rel=1e-5
    )
    smoothed = estimate(stat, None, 1.0).reshape(15, 4)
    assert np.allclose(smoothed.sum(-1), f.sum(-1).reshape(-1) + f.sum(-1).mean(), rtol=1e-5)


def test_an_architecture_the_seams_do_not_fit_is_named_before_any_work(
    tmp_path: Path, ramserve_home: Path, capsys
) -> None:
    """GPT-2 is an mlx-lm model, but its embedding (``wte``) is not one the module kinds know: the
    analysis refuses it by name, with the tested architectures, and writes nothing."""
    import json

    from mlx.utils import tree_flatten

    from ramserve.cli import main
    from ramserve.source import model_classes

    from .factory import write_tokenizer

    config = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_ctx": 128,
              "n_positions": 128, "vocab_size": 384, "layer_norm_epsilon": 1e-5}  # fmt: skip
    folder = tmp_path / "tiny-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    model_class, args_class = model_classes(config)
    weights = dict(tree_flatten(model_class(args_class.from_dict(config)).parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tokenizer(folder, 384, "", ())
    assert main(["analyze", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot analyse tiny-gpt2" in err and "gpt2" in err and "Qwen3-MoE" in err
    assert "Traceback" not in err and not (ramserve_home / "profiles").exists()


@pytest.mark.parametrize(
    ("arch", "tied"), [("llama", False), ("qwen3", True), ("qwen3_moe", False)]
)
def test_the_profile_measures_what_a_quantized_kv_cache_costs(
    tmp_path: Path, arch: str, tied: bool
) -> None:
    """On the sequences the model samples itself, 4-bit keys and values lose more than 8-bit ones
    (the seam that hands each layer a quantized cache works on every architecture)."""
    src = make_model(tmp_path / arch, arch, layers=2, hidden=256, tied=tied)
    p = prof.analyze(open_source(str(src), load_settings()), progress=False)
    assert set(p.kv_damage) == {"8", "4"}
    assert 0 < p.kv_damage["8"] < p.kv_damage["4"]
    narrow = prof.analyze(open_source(str(make_model(tmp_path / "n", arch)), load_settings()),
                          progress=False)  # fmt: skip
    assert narrow.kv_damage == {}  # a 16-wide head keeps a 16-bit cache: nothing to measure
