"""`ramserve run --hosts`: one model served from 2 and 3 ranks on this machine (MLX's ring back end over
loopback, as MLX's own Linux CI runs it), each rank's memory stated in the hostfile so that the split is
uneven. Greedy output through the API equals one process serving the same plan; a rank that dies or
never connects is named by /health and by every request's 503."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import psutil
import pytest

from ramserve.budget import Ask
from ramserve.cluster import ring_hostfile
from ramserve.crew import _receive, _send
from ramserve.hosts import read_hostfile, split, split_for
from ramserve.profile import analyze
from ramserve.quantize import needed_bytes, part_dir, quantize
from ramserve.relay import share_of
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import DENSE, REPO, TEST_CONFIG, shared_model
from .serving import (
    free_port,
    free_ports,
    host_memory_gb,
    open_page,
    ramserve_run,
    run_env,
    serve_folder,
    wait_for,
)

ASK = Ask(context=1024, parallel=2)
SHAPE = ["--context", "1024", "--parallel", "2", "--kv-bits", "16"]
NAME = "code-qwen3-30m"
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\nimport json\nfrom pathlib import Path\n\n\n"
           "def read_config(path: Path) -> dict:\n    \"\"\"Read the JSON config at path.\"\"\"\n",
           "class Stack:\n    def __init__(self):", "# sort a list of pairs by their second item\n"]  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the model is analysed once, and each split's plan quantized once."""
    home = tmp_path_factory.mktemp("cluster") / "home"
    home.mkdir()
    # Prompts are prefilled 8 tokens a step: ranks after the first make a chunk's mask from a
    # stand-in layer's cache.
    configure(home)
    return home


@pytest.fixture(scope="module")
def one_process(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The model analysed in one process, with the module's settings."""
    alone = tmp_path_factory.mktemp("one-process")
    shutil.copy(home / "config.toml", alone / "config.toml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAMSERVE_HOME", str(alone))
        return analyze(open_source(str(shared_model(DENSE)), load_settings()), progress=False)


def configure(home: Path) -> None:
    """The module's settings, with control and ring ports of their own for each start: a rank of
    the run before may still hold its ports while it exits."""
    chunks = "[budget]\nprefill_chunk = 8\nmin_prefill_chunk = 8\n"
    port = free_ports(4)
    (home / "config.toml").write_text(TEST_CONFIG + chunks + f"[hosts]\ncontrol_port = {port}\n")


@contextmanager
def run_on_hosts(home: Path, hosts: Path) -> Iterator[tuple[str, list[str]]]:
    configure(home)
    model = str(shared_model(DENSE))
    with ramserve_run(model, "--hosts", str(hosts), *SHAPE, env=run_env(home)) as served:
        yield served


def hostfile(home: Path, mibs: tuple[float, ...]) -> Path:
    """Hosts on this machine, each stating memory that leaves it about ``mibs[r]`` MiB of weights."""
    model = shared_model(DENSE)
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "memory_gb": host_memory_gb(model, m, ASK)}
             for m in mibs]  # fmt: skip
    path = home.parent / f"hosts-{'-'.join(map(str, mibs))}.json"
    path.write_text(json.dumps(hosts))
    return path


def complete(base: str, prompt: str, model: str = NAME) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def table_rows(lines: list[str], header: str) -> list[list[str]]:
    """The rows of the table `run --hosts` printed under the header that holds ``header``."""
    start = next(i for i, ln in enumerate(lines) if header in ln) + 2
    rows = []
    for ln in lines[start:]:
        if not ln[:1].isdigit():
            break
        rows.append(ln.split())
    return rows


def printed_layers(lines: list[str]) -> list[str]:
    """The layers column of the split `run --hosts` printed: '0-1', '2-6'."""
    return [row[2] for row in table_rows(lines, "weight budget")]


@pytest.mark.parametrize("mibs", [(24, 46), (22, 26, 30)], ids=["2 ranks", "3 ranks"])
def test_a_model_split_over_ranks_serves_what_one_process_serves(
    home: Path, mibs: tuple[float, ...], monkeypatch: pytest.MonkeyPatch, one_process: Any
) -> None:
    monkeypatch.setenv("RAMSERVE_HOME", str(home))
    hosts = hostfile(home, mibs)
    model = str(shared_model(DENSE))
    shutil.rmtree(home / "profiles", ignore_errors=True)  # each rank analyses its own layers
    with run_on_hosts(home, hosts) as (base, lines):
        one_by_one = [complete(base, p) for p in PROMPTS]
        # 4 requests on 2 slots: the batch changes under way, and each prompt's cache is reused.
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: complete(base, p), PROMPTS))
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
        layers = printed_layers(lines)

    # Every rank analysed its own layers, and together they found what one process finds.
    analysed = [ln.split()[1] for ln in lines if " analysed layers " in ln]
    assert sorted(analysed) == [str(r) for r in range(1, len(mibs))]
    ranges = analysis_ranges(lines)
    assert ranges[0][0] == 0 and all(
        a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:], strict=False)
    )
    assert ranges[-1][1] == 6 and len(ranges) == len(mibs)
    source = open_source(model, load_settings())
    profile = analyze(source, progress=False)  # rank 0's, cached
    assert_same_analysis(profile, one_process)
    # The same split, chosen here from the same stated memory, and its plan in one process.
    done = split(source, profile, read_hostfile(hosts), ASK)
    assert layers == [f"{p.layers[0]}-{p.layers[1] - 1}" for p in done.parts]
    sizes = [p.layers[1] - p.layers[0] for p in done.parts]
    assert len(set(sizes)) > 1, f"the stated memory should split the layers unevenly: {sizes}"
    assert card["weight_bytes"] == done.plan.total_bytes
    folder, cached = quantize(source, done.plan, progress=False)
    assert not cached  # no rank wrote the whole model: each wrote and loaded its own part
    assert_parts_of(folder, [part_dir(source, done.plan, share_of(done.bounds, r))
                             for r in range(len(mibs))], done.bounds)  # fmt: skip
    with serve_folder(folder, NAME, context=1024, parallel=2, kv_bits=16) as one:
        expected = [complete(one, p) for p in PROMPTS]
    assert one_by_one == expected
    assert together == expected
    assert all(len(t) > 0 for t in expected)


def analysis_ranges(lines: list[str]) -> list[tuple[int, int]]:
    """The layers each rank analysed, from the table rank 0 printed."""
    cuts = [row[2].split("-") for row in table_rows(lines, "layers analysed")]
    return [(int(first), int(last)) for first, last in cuts]


def assert_same_analysis(split_over: Any, one: Any) -> None:
    """Profiles equal in every prediction: the relayed passes compute what one process does."""
    assert split_over.settings_key == one.settings_key
    assert [m.path for m in split_over.modules] == [m.path for m in one.modules]
    for a, b in zip(split_over.modules, one.modules, strict=True):
        assert a.importance == pytest.approx(b.importance, rel=1e-5), a.path
        assert [o.damage for o in a.options] == pytest.approx([o.damage for o in b.options],
                                                              rel=1e-5), a.path  # fmt: skip
        assert [o.rounding_ratio for o in a.options] == [o.rounding_ratio for o in b.options]
    assert split_over.kv_damage == pytest.approx(one.kv_damage, rel=1e-5)
    # rank 0 keeps the sequences the relayed sampling drew: a later quantization on one machine
    # takes them as one process's
    assert one.samples is not None and split_over.samples == one.samples
    assert split_over.kv_damage["4"] > split_over.kv_damage["8"] > 0
    assert split_over.estimator == one.estimator == "self-fisher/2"


def stored(folder: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(path)))  # type: ignore[arg-type]
    return out


def assert_parts_of(whole: Path, parts: list[Path], bounds: list[int]) -> None:
    """Each rank's part holds its own layers (rank 0's also the embedding and the head, every
    rank the final norm), each tensor the same bytes as one process writes: compensated rounding's
    pass, relayed between the ranks, saw what one process sees."""
    expected = stored(whole)
    for r, part in enumerate(parts):
        tensors = stored(part)
        layers = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
        assert layers == set(range(bounds[r], bounds[r + 1])), (r, sorted(layers))
        assert ("model.embed_tokens.weight" in tensors) == (r == 0)
        assert "model.norm.weight" in tensors
        for name, a in tensors.items():
            assert a.dtype == expected[name].dtype and mx.array_equal(a, expected[name]), (r, name)
    together = {k for part in parts for k in stored(part)}
    assert together == set(expected)


def rank_process(rank: int, hosts: Path) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(hosts) in (proc.info["cmdline"] or []) and \
                    proc.environ().get("MLX_RANK") == str(rank):  # fmt: skip
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} running for {hosts}")


def test_a_lost_rank_is_named_by_health_and_by_every_request(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = hostfile(home, (24, 46))
    # Rank 1's part is gone (rank 0's is cached): rank 1 writes it again, rank 0 relaying the pass.
    monkeypatch.setenv("RAMSERVE_HOME", str(home))
    source = open_source(str(shared_model(DENSE)), load_settings())
    done = split(source, analyze(source, progress=False), read_hostfile(hosts), ASK)
    part = part_dir(source, done.plan, share_of(done.bounds, 1))
    before = stored(part) if part.exists() else None
    shutil.rmtree(part, ignore_errors=True)
    with run_on_hosts(home, hosts) as (base, _):
        assert complete(base, PROMPTS[0])
        again = stored(part)
        if before is not None:  # the tests before wrote it
            assert again.keys() == before.keys()
            assert all(mx.array_equal(again[k], before[k]) for k in again)
        streamed: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 900, "temperature": 0,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        streamed.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        rank_process(1, hosts).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=10)
        seconds = time.monotonic() - killed
        health = httpx.get(f"{base}/health").json()
        reader.join(30)
        assert not reader.is_alive(), "the request in flight hung"
        refused = httpx.post(f"{base}/v1/completions", timeout=10,
                             json={"model": NAME, "prompt": "x", "max_tokens": 2})  # fmt: skip
    assert seconds < 5
    assert "rank 1 (127.0.0.1)" in health["error"] and health["stage"] == "failed"
    assert "rank 1 (127.0.0.1)" in streamed[-1] and '"error"' in streamed[-1]
    assert refused.status_code == 503
    assert "rank 1 (127.0.0.1)" in refused.json()["error"]["message"]


def test_a_rank_that_stops_answering_is_named_after_its_heartbeats(home: Path) -> None:
    hosts = hostfile(home, (24, 46))
    with run_on_hosts(home, hosts) as (base, _):
        assert complete(base, PROMPTS[0])
        frozen = rank_process(1, hosts)
        frozen.suspend()  # a host that hangs: its connection stays open, its heartbeats stop
        try:
            stopped = time.monotonic()
            lost_after = load_settings().hosts.lost_after_s
            assert wait_for(lambda: health(base).get("stage") == "failed", timeout=lost_after + 10)
            seconds = time.monotonic() - stopped
            message = refusal(base)
        finally:
            frozen.resume()
    assert lost_after - 1 <= seconds <= lost_after + 5
    assert f"rank 1 (127.0.0.1) sent no heartbeat for {lost_after:g} s" in message


@contextmanager
def rank_zero(home: Path, hosts: Path, env: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """`ramserve run --hosts` that never becomes healthy: its base URL and process."""
    api = free_port()
    cmd = [sys.executable, "-m", "ramserve.cli", "run", str(shared_model(DENSE)), "--hosts",
           str(hosts), "--port", str(api), "-q", *SHAPE]  # fmt: skip
    log = (home.parent / f"rank0-{api}.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{api}", proc
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def health(base: str) -> dict[str, Any]:
    try:
        body: dict[str, Any] = httpx.get(f"{base}/health").json()
        return body
    except httpx.TransportError:
        return {}


def refusal(base: str) -> str:
    response = httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "x"})
    assert response.status_code == 503, response.text
    message: str = response.json()["error"]["message"]
    return message


def test_a_rank_that_never_connects_is_named(tmp_path: Path) -> None:
    home = tmp_path / "alone"
    home.mkdir()
    port = free_ports(3)
    (home / "config.toml").write_text(
        TEST_CONFIG + f"[hosts]\ncontrol_port = {port}\nconnect_timeout_s = 2\n"
    )
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port + 1}"], [f"127.0.0.1:{port + 2}"]]))
    # Rank 0 as a launcher would start it; rank 1 is never started, and a stranger without the
    # launch's token who claims to be rank 1 is refused.
    env = run_env(home, MLX_RANK="0", MLX_HOSTFILE=str(ring), RAMSERVE_CREW_TOKEN="launch-token")
    with rank_zero(home, hosts, env) as (base, proc):
        assert wait_for(lambda: health(base).get("stage", "").startswith("waiting"), timeout=60)
        machine = {"name": "x", "total": 1 << 40, "available": 1 << 40,
                   "working_set_limit": None, "live": False}  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stranger:
            _send(stranger, {"rank": 1, "host": "stranger", "token": "guess", "machine": machine})
            assert stranger.recv(1) == b""  # closed on it
        assert wait_for(lambda: health(base).get("stage") == "failed", timeout=30)
        message = refusal(base)
        assert proc.poll() is None  # still up, saying why
    assert f"rank 1 never connected to 127.0.0.1:{port} within 2 s" in message


def test_hosts_too_small_for_the_model_are_named_and_every_rank_stops(home: Path) -> None:
    hosts = home.parent / "hosts-small.json"
    small = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "memory_gb": 2.3}
    hosts.write_text(json.dumps([small, small]))
    with rank_zero(home, hosts, run_env(home)) as (base, proc):
        assert wait_for(lambda: health(base).get("stage") == "failed", timeout=120)
        message = refusal(base)
        others = psutil.Process(proc.pid).children()  # rank 1, started by rank 0
        assert others and wait_for(lambda: not any(p.is_running() and p.status() != "zombie"
                                                   for p in others), timeout=30)  # fmt: skip
        assert proc.poll() is None
    assert "could not start on its hosts" in message
    assert "127.0.0.1 with layers" in message and "needs" in message


def test_a_rank_that_would_analyse_otherwise_is_named_and_every_rank_stops(tmp_path: Path) -> None:
    """The ranks analyse the model together, so they must analyse it alike: a rank whose settings
    would give another profile is refused before any pass starts, named with the reason, and the
    ranks stop (as mlx.launch starts them: each with its own home)."""
    homes = [tmp_path / "rank0", tmp_path / "rank1"]
    for h in homes:
        h.mkdir()
    configure(homes[0])
    config = (homes[0] / "config.toml").read_text()
    (homes[1] / "config.toml").write_text(config + "[sensitivity.fisher]\nseed = 7\n")
    hosts = hostfile(homes[0], (24, 46))
    ring = tmp_path / "ring.json"
    ring.write_text(ring_hostfile(read_hostfile(hosts), load_settings()))
    command = [sys.executable, "-m", "ramserve.cli", "run", str(shared_model(DENSE)), "--hosts",
               str(hosts), "-q", *SHAPE]  # fmt: skip
    follower = subprocess.Popen(command, env=run_env(homes[1], MLX_RANK="1", MLX_HOSTFILE=str(ring)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        env = run_env(homes[0], MLX_RANK="0", MLX_HOSTFILE=str(ring))
        with rank_zero(homes[0], hosts, env) as (base, proc):
            assert wait_for(lambda: health(base).get("stage") == "failed", timeout=120)
            message = refusal(base)
            assert follower.wait(30) != 0  # told to stop, it did
            assert proc.poll() is None
    finally:
        follower.kill()
        follower.wait(30)
    assert "rank 1 (127.0.0.1) cannot analyse its layers" in message
    assert "settings for the analysis" in message and "differ from rank 0's" in message
    assert not (homes[0] / "profiles").exists() or not any((homes[0] / "profiles").glob("*.json"))


def test_variants_swap_on_every_rank_or_on_none(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: Any
) -> None:
    """name@budget is served over the hosts. Rank 1 has its own cache, with room for the model
    and one small variant only: a bigger variant fails there, so every rank keeps the model it
    had; the small one then loads on both, and serves what one process serves of its plan."""
    configure(home)
    config = (home / "config.toml").read_text() + '[server]\nvariants = ["min-safe", "40MB"]\n'
    (home / "config.toml").write_text(config)
    monkeypatch.setenv("RAMSERVE_HOME", str(home))
    hosts = hostfile(home, (24, 46))
    model = str(shared_model(DENSE))
    settings = load_settings()
    source = open_source(model, settings)
    profile = analyze(source, progress=False)
    whole = split_for(source, profile, read_hostfile(hosts), ASK)
    small, big = (
        split_for(source, profile, read_hostfile(hosts), ASK, s) for s in ("min-safe", "40MB")
    )
    assert small.plan.total_bytes < big.plan.total_bytes < whole.plan.total_bytes

    # Rank 1's cache: room for its part of the model it starts with, and of one small variant.
    other = tmp_path / "rank1"
    other.mkdir()
    part = [needed_bytes(source, s.plan, share_of(s.bounds, 1)) for s in (whole, small, big)]
    room = part[0] + (part[1] + part[2]) // 2
    (other / "config.toml").write_text(config + f"[cache]\nmax_gb = {room / 2**30!r}\n")

    # The ranks as mlx.launch starts them: MLX_RANK and its ring hostfile, each with its own env.
    ring = home.parent / "ring-variants.json"
    ring.write_text(ring_hostfile(read_hostfile(hosts), settings))
    launch = {"MLX_HOSTFILE": str(ring)}
    follower_log = (tmp_path / "rank1.log").open("w")
    follower = subprocess.Popen(
        [sys.executable, "-m", "ramserve.cli", "run", model, "--hosts", str(hosts), "-q", *SHAPE],
        env=run_env(other, MLX_RANK="1", **launch), stdout=follower_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with ramserve_run(model, "--hosts", str(hosts), *SHAPE,
                          env=run_env(home, MLX_RANK="0", **launch)) as (base, _):  # fmt: skip
            before = complete(base, PROMPTS[0])
            fit = httpx.get(f"{base}/fit").json()
            page = open_page(browser, base)
            page.click("#tab-fit")
            page.wait_for_selector("#host-bars figure.host .seg")
            drawn = [int(page.locator(f'#host-bars figure[data-rank="{r}"] .seg[data-label="weights"]')
                         .get_attribute("data-bytes")) for r in range(2)]  # fmt: skip
            captions = page.locator("#host-bars figcaption").all_text_contents()
            page.screenshot(path=str(REPO / "docs" / "screenshots" / "fit-hosts-light.png"))
            single_bar_hidden = page.locator("#memory-bar").is_hidden()
            assert not page.errors, page.errors
            cards = {c["id"]: c for c in httpx.get(f"{base}/v1/models").json()["data"]}
            failed = httpx.post(f"{base}/v1/completions", timeout=300, json={
                "model": f"{NAME}@40MB", "prompt": PROMPTS[0], "max_tokens": 4})  # fmt: skip
            after_failure = complete(base, PROMPTS[0])
            loaded = [c["id"] for c in httpx.get(f"{base}/v1/models").json()["data"]
                      if c["status"] == "loaded"]  # fmt: skip
            swapped = [complete(base, p, f"{NAME}@min-safe") for p in PROMPTS[:2]]
            now = {c["id"]: c["status"] for c in httpx.get(f"{base}/v1/models").json()["data"]}
            back = complete(base, PROMPTS[0])
    finally:
        follower.terminate()
        follower.wait(30)
        follower_log.close()

    # The page draws each host's memory: its weights, runtime and KV cache of its own layers.
    assert [h["layers"] for h in fit["hosts"]] == [list(p.layers) for p in whole.parts]
    for h, part in zip(fit["hosts"], whole.parts, strict=True):
        bar = {s["label"]: s["bytes"] for s in h["memory_bar"]}
        assert bar["weights"] == part.memory_bytes and bar["KV cache"] == part.budget.kv
        assert bar["weights"] + bar.get("free", 0) == part.budget.weights
    assert drawn == [p.memory_bytes for p in whole.parts] and single_bar_hidden
    assert captions[0].startswith("rank 0 · 127.0.0.1 · layers 0–") and "head" in captions[0]
    # Every variant is offered over the hosts, with its own split.
    assert set(cards) == {NAME, f"{NAME}@min-safe", f"{NAME}@40MB"}
    spread_of = cards[f"{NAME}@min-safe"]["hosts"]
    assert [h["layers"] for h in spread_of] == [list(p.layers) for p in small.parts]
    assert cards[f"{NAME}@min-safe"]["weight_bytes"] == small.plan.total_bytes
    assert cards[f"{NAME}@min-safe"]["status"] == "available"  # no rank has written its part
    # The bigger variant did not fit rank 1's cache: named, and both ranks kept the model.
    assert failed.status_code == 400, failed.text
    message = failed.json()["error"]["message"]
    assert "rank 1 (127.0.0.1) could not load it" in message and "cache" in message
    said = (tmp_path / "rank1.log").read_text()  # a user's problem in its words, no traceback
    assert "raise [cache] max_gb" in said and "Traceback" not in said
    assert after_failure == before and loaded == [NAME]
    # The small one loaded on both ranks, and serves what one process serves of its plan.
    assert now[f"{NAME}@min-safe"] == "loaded" and now[NAME] == "cached"  # rank 0's part
    folder, _ = quantize(source, small.plan, progress=False)
    # Each rank holds its parts alone: rank 1's cache, its parts of the model and of the variant.
    held = sorted(p.name for p in (other / "models" / source.fingerprint).iterdir())
    assert held == sorted(part_dir(source, s.plan, share_of(s.bounds, 1)).name
                          for s in (whole, small))  # fmt: skip
    with serve_folder(folder, NAME, context=1024, parallel=2, kv_bits=16) as one:
        assert swapped == [complete(one, p) for p in PROMPTS[:2]]
    assert back == before


def test_a_connection_closed_with_a_message_unread_reads_as_closed() -> None:
    """Rank 0 closing its control connections (at exit, or ``Crew.abandon``) while a heartbeat of
    the other side sits unread resets the connection; the follower reads that as rank 0 gone and
    ends, instead of dying with a traceback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        leader, _ = server.accept()
        _send(client, {"beat": 1})  # never read by the leader
        time.sleep(0.1)
        leader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        leader.close()
        time.sleep(0.1)
        try:
            assert _receive(client) is None
        finally:
            client.close()
