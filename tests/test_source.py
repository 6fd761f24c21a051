from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ramserve.cli import main
from ramserve.describe import describe
from ramserve.errors import BadModel, ModelNotFound
from ramserve.settings import load_settings
from ramserve.source import open_source

from .factory import make_hf_cache, make_model


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramserve.cli", *args], capture_output=True, text=True, check=False
    )


def test_inspect_shared_dense(dense: Path) -> None:
    d = describe(open_source(str(dense), load_settings()))
    assert round(d["parameters"] / 1e6, 1) == 30.4
    assert d["bf16_bytes"] == 2 * d["parameters"]
    assert d["modules_by_kind"]["lm_head"]["count"] == 1
    assert d["modules_by_kind"]["attn_q"]["count"] == 7
    assert len(d["shards"]) == 5


def test_inspect_shared_moe_has_18_stacked_experts(moe: Path) -> None:
    d = describe(open_source(str(moe), load_settings()))
    assert round(d["parameters"] / 1e6, 1) == 26.8
    assert d["stacked_expert_modules"] == 18
    assert "lm_head" not in d["modules_by_kind"]  # tied: the embedding serves as lm_head
    shapes = {m["path"]: m["shape"] for m in d["modules"]}
    assert shapes["model.layers.0.mlp.switch_mlp.gate_proj"] == [12, 256, 384]


def test_module_paths_match_mlx_lm(tiny_moe_dir: Path) -> None:
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_moe_dir, lazy=True)
    expected = {p for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    assert {m.path for m in open_source(str(tiny_moe_dir), load_settings()).modules} == expected


def test_non_divisible_dimension_lists_only_possible_group_sizes(tiny_llama_dir: Path) -> None:
    src = open_source(str(tiny_llama_dir), load_settings())
    q = next(m for m in src.modules if m.kind == "attn_q")
    assert q.shape[-1] == 96 and q.group_sizes == (32,)


def test_module_without_any_group_size_is_reported(tmp_path: Path, capsys) -> None:
    folder = make_model(tmp_path / "odd", "llama", hidden=80)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "stays 16-bit" in out and "q_proj" in out


def test_fingerprint_is_stable_and_tracks_weights(tmp_path: Path, tiny_dir: Path) -> None:
    a = open_source(str(tiny_dir), load_settings()).fingerprint
    assert a == open_source(str(tiny_dir), load_settings()).fingerprint
    other = make_model(tmp_path / "other", "qwen3", seed=1)  # same shapes, different weights
    assert open_source(str(other), load_settings()).fingerprint != a


def test_tensors_are_lazy_and_correct(tiny_dir: Path) -> None:
    import mlx.core as mx

    src = open_source(str(tiny_dir), load_settings())
    w = src.weights()
    assert all(isinstance(v, mx.array) for v in w.values())
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)


def test_hub_repo_resolves_from_offline_cache(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    make_hf_cache(cache, "acme/tiny", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = open_source("acme/tiny", load_settings())
    assert src.name == "tiny"
    assert src.fingerprint == open_source(str(tiny_dir), load_settings()).fingerprint


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such folder"),
        ("noconfig", "has no config.json"),
        ("badtype", "unsupported model_type 'nosuchmodel'; supported: "),
        ("corrupt", "corrupt safetensors header in"),
        ("noshard", "missing shard:"),
        ("uncached", "not in the Hugging Face cache and the hub is offline"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, tiny_dir: Path, setup: str, message: str):
    folder = tmp_path / "m"
    if setup != "missing":
        shutil.copytree(tiny_dir, folder)
    spec = str(folder)
    if setup == "noconfig":
        (folder / "config.json").unlink()
    elif setup == "badtype":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "nosuchmodel"}))
    elif setup == "corrupt":
        shard = folder / "model-00001-of-00002.safetensors"
        shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif setup == "noshard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif setup == "uncached":
        spec = "acme/not-cached"
    result = run_cli("inspect", spec)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if setup in ("corrupt", "noshard"):
        assert "model-0000" in result.stderr  # names the file


def test_inspect_json(dense: Path, capsys) -> None:
    assert main(["inspect", str(dense), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fingerprint"] and data["quantizable_modules"] == 51


def test_missing_path_raises_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        open_source(str(tmp_path / "nope"), load_settings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadModel):
        open_source(str(tmp_path / "empty"), load_settings())
