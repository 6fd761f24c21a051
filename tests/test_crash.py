"""kill -9 during analysis, quantization and a variant swap, then a rerun: the result equals an
uninterrupted run's, and nothing a killed run left is ever trusted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import DENSE, shared_model, user_config
from .serving import free_port, wait_healthy


def start(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "RAMSERVE_HOME": str(home)}
    home.mkdir(parents=True, exist_ok=True)
    with (home / "stderr.log").open("a") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "ramserve.cli", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip


def log_of(home: Path) -> str:
    return (home / "stderr.log").read_text()


def finish(home: Path, *args: str) -> None:
    proc = start(home, *args)
    assert proc.wait(timeout=300) == 0, log_of(home)


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if it ends first."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, (
            f"finished before {what}: {proc.stderr.read() if proc.stderr else ''}"
        )
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def staging(models: Path) -> list[Path]:
    return [p for p in models.glob("*/.*.partial") if p.is_dir()]


def profile_body(path: Path) -> dict:
    """A profile without what differs between runs (timings and the digest over them)."""
    data = json.loads(path.read_text())
    for key in ("created", "analysis_seconds", "fisher_seconds", "rounding_seconds", "checksum"):
        data.pop(key)
    for m in data["modules"]:
        m.pop("seconds")
    return data


def folder_digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == "plan.json":
            plan = json.loads(p.read_text())
            plan.pop("written")  # its timing differs; its manifest is checked by every load
            plan["solver"].pop("seconds")
            out[p.name] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_kill_9_during_analysis_quantization_and_swap(tmp_path: Path) -> None:
    model = str(shared_model(DENSE))
    fp = open_source(model, load_settings()).fingerprint
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    # the tests' small rounding sample: what a kill leaves is the same
    for home in (clean, crashed):
        home.mkdir()
        user_config(home, "")
    for budget in ("30%", "4.5bpw"):
        finish(clean, "quantize", model, "--budget", budget, "-q")
    profile = crashed / "profiles" / f"{fp}.json"
    partial = profile.with_suffix(".partial.json")
    lock = crashed / "locks" / f"profile-{fp}.write"

    # Analysis: killed in the self-Fisher pass (before any checkpoint), then after a checkpoint.
    proc = start(crashed, "analyze", model, "-q")
    kill_when(proc, lambda: lock.exists() and time.sleep(0.5) is None, "the analysis")
    assert not profile.exists()
    proc = start(crashed, "analyze", model, "-q")
    kill_when(proc, partial.exists, "the first checkpoint")
    assert not profile.exists() and partial.exists()

    # Quantization: killed as the staging folder appears, and with a shard half written.
    models = crashed / "models" / fp
    proc = start(crashed, "quantize", model, "--budget", "30%", "-q")
    kill_when(proc, lambda: bool(staging(crashed / "models")), "the staging folder")
    assert profile_body(profile) == profile_body(clean / "profiles" / f"{fp}.json")

    def shard_started() -> bool:
        return any(p.stat().st_size > 1 << 20 for s in staging(crashed / "models")
                   for p in s.glob("*.safetensors"))  # fmt: skip

    proc = start(crashed, "quantize", model, "--budget", "30%", "-q")
    kill_when(proc, shard_started, "a shard half written")
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == []
    finish(crashed, "quantize", model, "--budget", "30%", "-q")
    (done,) = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert folder_digest(done) == folder_digest(clean / "models" / fp / done.name)

    # A swap: the server quantizes a new variant for a request and is killed while writing it.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = ("run", model, "--budget", "30%", "--any-budget", "--port", str(port), "-q")
    server = start(crashed, *run)
    wait_healthy(base, server)
    body = {"model": f"{DENSE.name}@4.5bpw", "prompt": "def", "max_tokens": 2, "temperature": 0}
    asker = threading.Thread(target=lambda: _post(base, body), daemon=True)
    asker.start()
    kill_when(server, lambda: bool(staging(crashed / "models")), "the swap's staging folder")
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == [done.name]
    server = start(crashed, *run)
    try:
        wait_healthy(base, server)
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    finally:
        server.terminate()
        server.wait(timeout=30)
    swapped = [p for p in models.iterdir() if not p.name.startswith(".") and p != done]
    assert len(swapped) == 1
    assert folder_digest(swapped[0]) == folder_digest(clean / "models" / fp / swapped[0].name)
    # What the killed runs left is listed as partial, and prune removes it.
    listed = subprocess.run([sys.executable, "-m", "ramserve.cli", "prune", "--json"], text=True,
                            env={**os.environ, "RAMSERVE_HOME": str(crashed)},
                            capture_output=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert all(e["partial"] for e in json.loads(listed.stdout)["removed"])
    assert not staging(crashed / "models")


def _post(base: str, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(f"{base}/v1/completions", json=body, timeout=300)
