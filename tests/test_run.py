"""`ramserve run` end to end: the real command in a subprocess, fitted, served, swapped, restarted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import ollama
import openai

from .conftest import DENSE, shared_model, user_config
from .factory import make_hf_cache
from .serving import ramserve_run, run_env


def stage_cache(lines: list[str]) -> dict[str, str]:
    """The stage table's cache column: stage -> 'hit' or '-'."""
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in {"budget", "profile", "plan", "quantize"}:
            out[parts[0]] = parts[2]
    return out


def test_run_serves_swaps_variants_and_restarts_from_cache(ramserve_home: Path) -> None:
    model = str(shared_model(DENSE))
    env = run_env(ramserve_home)
    with ramserve_run(model, "--budget", "30%", env=env) as (base, lines):
        assert stage_cache(lines) == {"budget": "-", "profile": "-", "plan": "-", "quantize": "-"}
        assert any("bits per weight" in ln for ln in lines) and any(
            "KV cache" in ln for ln in lines
        )
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="code-qwen3-30m", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Sort a list."}])  # fmt: skip
        assert chat.usage.completion_tokens == 8
        status = {m.id: m.model_dump()["status"] for m in client.models.list().data}
        assert (
            status["code-qwen3-30m"] == "loaded"
            and status["code-qwen3-30m@min-safe"] == "available"
        )
        small = client.chat.completions.create(model="code-qwen3-30m@min-safe", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Sort a list."}])  # fmt: skip
        assert small.model == "code-qwen3-30m@min-safe" and small.usage.completion_tokens == 8
        cards = {m.id: m.model_dump() for m in client.models.list().data}
        assert cards["code-qwen3-30m@min-safe"]["status"] == "loaded"
        assert cards["code-qwen3-30m"]["status"] == "cached"
        # The same variant by Ollama's name (the tag is the budget) and through Anthropic's API.
        sort = [{"role": "user", "content": "Sort a list."}]
        with ollama.Client(host=base) as olla:
            assert {"code-qwen3-30m:latest", "code-qwen3-30m:min-safe"} <= {
                m.model for m in olla.list().models
            }
            assert [m.model for m in olla.ps().models] == ["code-qwen3-30m:min-safe"]
            by_tag = olla.chat(model="code-qwen3-30m:min-safe", messages=sort,
                               options={"temperature": 0, "num_predict": 8})  # fmt: skip
        assert by_tag.model == "code-qwen3-30m:min-safe" and by_tag.eval_count == 8
        with anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0) as claude:
            msg = claude.messages.create(model="code-qwen3-30m@min-safe", max_tokens=8,
                                         messages=sort, extra_body={"temperature": 0})  # fmt: skip
        assert msg.model == "code-qwen3-30m@min-safe" and msg.usage.output_tokens == 8
        # Neither swapped models: the variant asked for was the one loaded.
        assert client.models.retrieve("code-qwen3-30m@min-safe").model_dump()["status"] == "loaded"
        shape = cards["code-qwen3-30m"]["runtime_shape"]
        assert shape["context"] == cards["code-qwen3-30m"]["context_length"]
        assert shape["prefill_chunk"] <= shape["context"] and shape["parallel"] >= 1
        assert any(ln.startswith("runtime shape: ") for ln in lines)
        assert (
            cards["code-qwen3-30m@min-safe"]["weight_bytes"]
            < cards["code-qwen3-30m"]["weight_bytes"]
        )
        # An unlisted budget is not quantized on request by default; a budget no plan can meet is a
        # 400 naming the minimum.
        try:
            client.models.retrieve("code-qwen3-30m@4.2bpw")
            raise AssertionError("an unlisted variant was offered")
        except openai.BadRequestError as e:
            assert "--any-budget" in str(e)
        try:
            client.chat.completions.create(model="code-qwen3-30m@1KB", max_tokens=2,
                                           messages=[{"role": "user", "content": "x"}])  # fmt: skip
            raise AssertionError("an impossible variant was served")
        except openai.BadRequestError as e:
            assert "min-safe" in str(e)
    with ramserve_run(model, "--budget", "30%", env=env) as (base, lines):
        cache = stage_cache(lines)
        assert cache["profile"] == "hit" and cache["quantize"] == "hit"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert client.models.retrieve("code-qwen3-30m@min-safe").model_dump()["status"] == "cached"


def test_run_resolves_a_repo_from_the_offline_hub_cache(tmp_path: Path, tiny_dir: Path) -> None:
    make_hf_cache(tmp_path / "hub", "acme/tiny-coder", tiny_dir)
    env = run_env(tmp_path / "home", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    with ramserve_run("acme/tiny-coder", "--budget", "50%", env=env) as (base, _):
        ids = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
        assert ids[0] == "tiny-coder"
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"model": "tiny-coder", "prompt": "def", "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_run_refuses_an_impossible_budget_before_any_work(ramserve_home: Path) -> None:
    cmd = [sys.executable, "-m", "ramserve.cli", "run", str(shared_model(DENSE)), "--budget", "1MB"]
    done = subprocess.run(
        cmd, env=run_env(ramserve_home), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert (
        "below the smallest possible plan" in done.stderr and "nothing was analysed" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not (ramserve_home / "profiles").exists() and not (ramserve_home / "models").exists()


def test_a_hub_repo_too_big_for_the_machine_is_refused_from_metadata(
    tmp_path: Path, tiny_dir: Path
) -> None:
    import json
    import shutil

    meta = tmp_path / "meta"
    meta.mkdir()
    shutil.copy(tiny_dir / "config.json", meta / "config.json")
    (meta / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * 10**12}, "weight_map": {"lm_head.weight": "model-1.safetensors"}}))  # fmt: skip
    make_hf_cache(tmp_path / "hub", "acme/giant", meta)
    env = run_env(tmp_path / "home", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ramserve.cli", "run", "acme/giant"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot fit this machine" in done.stderr and "nothing but metadata" in done.stderr
    assert "2.00 TB" in done.stderr and "Traceback" not in done.stderr


def test_a_failed_swap_leaves_the_previous_model_serving(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    from ramserve.budget import Ask
    from ramserve.fit import fit
    from ramserve.server.app import create_app
    from ramserve.settings import load_settings
    from ramserve.source import open_source
    from ramserve.variants import VariantRegistry

    from .serving import live_server

    model = tmp_path / "tiny-coder"
    shutil.copytree(tiny_dir, model)
    fitted = fit(open_source(str(model), load_settings()), "50%", Ask(256, 2), progress=False)
    server = load_settings().server.model_copy(update={"variants": ["min-safe"]})
    registry = VariantRegistry(
        fitted,
        load_settings().model_copy(update={"server": server}),
        {"context": 256, "parallel": 2},
    )
    with live_server(create_app(registry, server)) as base:
        for shard in model.glob("*.safetensors"):
            shard.write_bytes(b"corrupt")  # the source can no longer be quantized
        # Greedy: a sampled token could be end-of-sequence and end the reply early.
        body = {"model": "tiny-coder@min-safe", "prompt": "def", "max_tokens": 3, "temperature": 0}
        failed = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 400 and "could not switch" in failed.json()["error"]["message"]
        ok = httpx.post(f"{base}/v1/completions", json=dict(body, model="tiny-coder"), timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        cards = {m["id"]: m["status"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert cards["tiny-coder"] == "loaded" and cards["tiny-coder@min-safe"] == "available"


def test_run_fits_a_runtime_shape_instead_of_refusing(tmp_path: Path, ramserve_home: Path) -> None:
    """A stand-in for a large model's shape (many heads, a long context): at the default prefill its
    scratch alone is beyond the memory left, so the fit takes a smaller prefill step and serves,
    keeping the --parallel and --context it was given."""
    import psutil

    from .factory import make_model

    model = make_model(tmp_path / "wide", "qwen3", hidden=512, layers=2, vocab=2048,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=16,
                       max_position_embeddings=8192)  # fmt: skip
    total_gb = psutil.virtual_memory().total / 2**30
    ramserve_home.mkdir(parents=True, exist_ok=True)
    user_config(
        ramserve_home,  # leave 10 GiB usable on any machine
        f"[budget]\nos_reserve_min_gb = {max(total_gb - 10, 0):.3f}\nos_reserve_share = 0\n",
    )
    env = run_env(ramserve_home)
    with ramserve_run(str(model), "--parallel", "8", "--context", "8192", "--kv-bits", "16",
                      env=env) as (base, lines):  # fmt: skip
        shape = next(ln for ln in lines if ln.startswith("runtime shape: "))
        assert shape.startswith("runtime shape: 8,192 tokens x 8 sequences, prefill ")
        chunk = int(shape.split("prefill ")[1].split()[0])
        assert chunk < 2048 and any("prefill 2048 tokens x 8" in ln for ln in lines)
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
        assert card["runtime_shape"]["prefill_chunk"] == chunk
        assert card["runtime_shape"]["parallel"] == 8
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        done = client.completions.create(model=card["id"], prompt="def", max_tokens=4)
        assert done.usage.completion_tokens >= 1
