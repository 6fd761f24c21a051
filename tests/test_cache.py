"""The cache: a disk budget with LRU eviction, disk errors before or during a write, corrupt entries
rebuilt, the ls/rm/prune/ps commands, and which variants a server quantizes on request."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

from ramserve import cache
from ramserve.plan import make_plan
from ramserve.profile import analyze
from ramserve.quantize import quantize, verify
from ramserve.records import Profile
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import TEST_CONFIG, user_config
from .serving import free_port, live_server, wait_for, wait_healthy


def configure(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    user_config(home, text)


def cli(*args: str, home: Path, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAMSERVE_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "ramserve.cli", *args], env=env, text=True,
                          capture_output=True, timeout=300, **kw)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def variant(model: Path, spec: str) -> Path:
    source = open_source(str(model), load_settings())
    folder, _ = quantize(
        source,
        make_plan(analyze(source, progress=False), spec, settings=load_settings()),
        progress=False,
    )
    return folder


def models(home: Path) -> set[str]:
    return {p.name for p in (home / "models").glob("*/*")}


@contextmanager
def serving(folder: Path, home: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real `ramserve serve` of ``folder``, which holds it loaded; yields it and its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ramserve.cli", "serve", str(folder), "--port",
                             str(port)], env={**os.environ, "RAMSERVE_HOME": str(home), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert cache.in_use(folder)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_more_variants_than_fit_evict_the_oldest_and_spare_the_loaded(
    tiny_dir: Path, ramserve_home: Path, tmp_path: Path
) -> None:
    source = open_source(str(tiny_dir), load_settings())
    profile = analyze(source, progress=False)
    specs = ("40%", "60%", "80%", "70%")
    size = {s: cache._size(quantize(source, make_plan(profile, s, settings=load_settings()), tmp_path / s, progress=False)[0])
            for s in specs}  # fmt: skip
    room = cache._size(cache.profile_path(source.fingerprint)) + size["60%"] + size["80%"]
    # Room for the profile and the two largest, not for the three.
    configure(ramserve_home, f"[cache]\nmax_gb = {(room + size['40%'] // 2) / cache.GB}\n"
                             "min_free_gb = 0\n")  # fmt: skip
    first = variant(tiny_dir, "40%")
    second = variant(tiny_dir, "60%")
    os.utime(first, (time.time() - 100, time.time() - 100))  # the least recently used
    third = variant(tiny_dir, "80%")
    assert second.exists() and third.exists() and not first.exists()
    assert cache.usage(load_settings().cache).used <= cache.usage(load_settings().cache).max_bytes
    # The oldest now is `second`, but a server has it loaded: `third` goes instead.
    os.utime(second, (time.time() - 200, time.time() - 200))
    with serving(second, ramserve_home):
        fourth = variant(tiny_dir, "70%")
        assert second.exists() and fourth.exists() and not third.exists()
        done = cli("ls", "--json", home=ramserve_home)
        state = {Path(e["path"]): e["in_use"] for e in json.loads(done.stdout)["entries"]}
        assert state[second] and not state[fourth]
        # A variant that fits only where the loaded one is is refused, naming what holds the room.
        configure(ramserve_home, f"[cache]\nmax_gb = {(size['60%'] + size['40%'] // 2) / cache.GB}"
                                 "\nmin_free_gb = 0\n")  # fmt: skip
        with pytest.raises(cache.CacheError, match=r"in use"):
            variant(tiny_dir, "40%")
        assert second.exists()
    # A single write bigger than the whole budget is refused, naming the setting.
    configure(ramserve_home, f"[cache]\nmax_gb = {size['40%'] / 2 / cache.GB}\nmin_free_gb = 0\n")
    with pytest.raises(cache.CacheError, match=r"max_gb"):
        variant(tiny_dir, "50%")


def test_a_truncated_shard_or_edited_plan_is_rebuilt_never_served(tiny_dir: Path) -> None:
    source = open_source(str(tiny_dir), load_settings())
    plan = make_plan(analyze(source, progress=False), "50%", settings=load_settings())
    folder, _ = quantize(source, plan, progress=False)
    shard = folder / "model.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    assert "model.safetensors is" in (verify(folder, plan.hash) or "")
    again, cached = quantize(source, plan, progress=False)
    assert again == folder and not cached and shard.read_bytes() == good
    meta = json.loads((folder / "plan.json").read_text())
    first = next(iter(k for k, v in meta["quantization"].items() if isinstance(v, dict)))
    q = meta["quantization"][first]
    q["bits"] = 3 if q["bits"] != 3 else 4  # the shards say otherwise: no longer this plan
    (folder / "plan.json").write_text(json.dumps(meta))
    assert "edited" in (verify(folder, plan.hash) or "")
    assert quantize(source, plan, progress=False) == (folder, False)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("4", "5", 1))
    assert "changed" in (verify(folder, plan.hash) or "")
    assert quantize(source, plan, progress=False) == (folder, False)
    assert verify(folder, plan.hash) is None


def test_an_edited_profile_is_analysed_again(tiny_dir: Path) -> None:
    first = analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    path = cache.profile_path(first.fingerprint)
    data = json.loads(path.read_text())
    data["modules"][0]["options"][0]["damage"] += 1.0
    path.write_text(json.dumps(data))
    again = analyze(open_source(str(tiny_dir), load_settings()), progress=False)

    def measured(p: Profile) -> list[dict]:
        return [{k: v for k, v in asdict(m).items() if k != "seconds"} for m in p.modules]

    assert not again.cache_hit and measured(again) == measured(first)
    assert analyze(open_source(str(tiny_dir), load_settings()), progress=False).cache_hit


def in_namespace(script: str, home: Path, *args: str, after: str = "true"
                 ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ramserve in a private mount namespace: ``script`` mounts, ``after`` looks (same mounts)."""
    # No preloaded OpenBLAS: its threads start at load, and a threaded process cannot unshare.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["RAMSERVE_HOME"] = str(home)
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, env=env).returncode
    ):
        if os.environ.get("CI"):
            pytest.fail("unshare -r -m is needed for a real tiny or read-only file system")
        pytest.skip("no user namespaces here")
    cmd = f"{script} && {sys.executable} -m ramserve.cli {' '.join(args)}; rc=$?; {after}; exit $rc"
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd], env=env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path: Path, tiny_dir: Path) -> None:
    home = tmp_path / "small"
    home.mkdir()
    # The profile (reserving 337 KB, writing 54 KB) fits on this 352 KB disk; the model (317 KB)
    # does not fit beside it.
    settings = TEST_CONFIG.replace("\n", "\\n")  # the tests' sample size, as in-process
    mount = (f"mount -t tmpfs -o size=352k tmpfs {home} && "
             f"printf '{settings}[cache]\\nmin_free_gb = 0\\n' >> {home}/config.toml")  # fmt: skip
    done = in_namespace(mount, home, "quantize", str(tiny_dir), "--budget", "16bpw", "-q",
                        after=f"ls -aR {home}")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        "not enough disk for tiny-qwen3@16bpw" in done.stderr
        and "Nothing was written" in done.stderr
    )
    assert "is free on the disk" in done.stderr and "tmpfs" not in done.stderr
    assert "Traceback" not in done.stderr
    left = done.stdout.split()
    assert any(n.endswith(".json") and "partial" not in n for n in left), done.stdout  # profile
    assert not any(n.endswith((".partial", ".tmp")) for n in left), done.stdout
    assert "model.safetensors" not in left


def test_a_disk_that_fills_mid_write_leaves_nothing(tmp_path: Path, tiny_dir: Path) -> None:
    home = tmp_path / "home"
    analyze(
        open_source(str(tiny_dir), load_settings()), progress=False
    )  # in this process's home; the child's is its own
    cli("analyze", str(tiny_dir), "-q", home=home)

    def limit_file_size() -> None:  # every write past 64 KB fails (EFBIG), as ENOSPC would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    done = cli("quantize", str(tiny_dir), "--budget", "90%", "-q", home=home, check=False,
               preexec_fn=limit_file_size)  # fmt: skip
    assert done.returncode == 2
    assert "cannot write tiny-qwen3@90%" in done.stderr and "nothing was kept" in done.stderr
    assert not list((home / "models").rglob("*.safetensors"))
    assert not [p for p in (home / "models").rglob("*") if p.is_dir() and p.name.startswith(".")]
    cli("quantize", str(tiny_dir), "--budget", "90%", "-q", home=home)  # with room: written


def test_a_read_only_home_is_a_clear_error(tmp_path: Path, tiny_dir: Path) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    done = in_namespace(f"mount --bind {home} {home} && mount -o remount,bind,ro {home}", home,
                        "quantize", str(tiny_dir), "--budget", "50%", "-q")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "read-only" in done.stderr and "RAMSERVE_HOME" in done.stderr
    assert "Traceback" not in done.stderr and not any(home.iterdir())


def test_ls_rm_prune_through_the_cli(
    tiny_dir: Path, tiny_moe_dir: Path, ramserve_home: Path
) -> None:
    cli("quantize", str(tiny_dir), "--budget", "50%", "-q", home=ramserve_home)
    cli("quantize", str(tiny_dir), "--budget", "70%", "-q", home=ramserve_home)
    cli("quantize", str(tiny_moe_dir), "--budget", "60%", "-q", home=ramserve_home)
    listing = json.loads(cli("ls", "--json", home=ramserve_home).stdout)
    labels = {e["label"]: e for e in listing["entries"]}
    assert {"tiny-qwen3@50%", "tiny-qwen3@70%", "tiny-moe@60%", "tiny-qwen3 (profile)",
            "tiny-moe (profile)"} == set(labels)  # fmt: skip
    v = labels["tiny-qwen3@50%"]
    assert v["bytes"] > 0 and 2 < v["summary"]["bits_per_weight"] < 16 and not v["in_use"]
    assert listing["total"]["used"] == sum(e["bytes"] for e in listing["entries"])
    text = cli("ls", home=ramserve_home).stdout
    assert "tiny-qwen3@70%" in text and "cache budget" in text

    removed = json.loads(cli("rm", "tiny-qwen3@50%", "--json", home=ramserve_home).stdout)
    assert [e["label"] for e in removed["removed"]] == ["tiny-qwen3@50%"]
    assert not Path(v["path"]).exists() and Path(labels["tiny-qwen3@70%"]["path"]).exists()
    missing = cli("rm", "nothing-like-it", home=ramserve_home, check=False)
    assert missing.returncode == 2 and "nothing cached matches" in missing.stderr
    removed = json.loads(cli("rm", "tiny-moe", "--json", home=ramserve_home).stdout)
    assert {e["label"] for e in removed["removed"]} == {"tiny-moe@60%", "tiny-moe (profile)"}

    # A crashed run's staging folder is removed by prune; a variant in use is not.
    stale = Path(labels["tiny-qwen3@70%"]["path"]).parent / ".0123456789abcdef.x1.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    kept = Path(labels["tiny-qwen3@70%"]["path"])
    with serving(kept, ramserve_home):
        busy = cli("rm", "tiny-qwen3@70%", home=ramserve_home, check=False)
        assert busy.returncode == 2 and "in use" in busy.stderr and kept.exists()
        pruned = json.loads(cli("prune", "--keep-gb", "0", "--json", home=ramserve_home).stdout)
    assert {e["label"] for e in pruned["removed"]} >= {"tiny-qwen3 (profile)"}
    assert any(e["partial"] for e in pruned["removed"]) and not stale.exists() and kept.exists()
    assert pruned["total"]["used"] == cache._size(kept)
    pruned = json.loads(cli("prune", "--keep-gb", "0", "--json", home=ramserve_home).stdout)
    assert [e["label"] for e in pruned["removed"]] == ["tiny-qwen3@70%"]
    assert "the cache is empty" in cli("ls", home=ramserve_home).stdout


def test_ps_reads_what_a_server_holds(tiny_dir: Path, ramserve_home: Path) -> None:
    folder = variant(tiny_dir, "50%")
    with serving(folder, ramserve_home, RAMSERVE_API_KEY="k") as (proc, url):
        nokey = cli("ps", "--url", url, home=ramserve_home, check=False)
        assert nokey.returncode == 2 and "API key" in nokey.stderr
        done = cli("ps", "--url", url, "--api-key", "k", "--json", home=ramserve_home)
        (st,) = json.loads(done.stdout)
        assert st["model"] == "tiny-qwen3" and st["folder"] == str(folder)
        assert st["pid"] == proc.pid and st["active"] == 0 and st["queue_size"] == 512
        assert st["rss_bytes"] > st["weight_bytes"] > 0
        text = cli("ps", "--url", url, "--api-key", "k", home=ramserve_home).stdout
        assert "tiny-qwen3" in text and url in text
    gone = cli("ps", "--url", url, home=ramserve_home, check=False)
    assert gone.returncode == 2 and "no ramserve server answers" in gone.stderr


def test_unlisted_budgets_are_quantized_only_when_allowed(tiny_dir: Path) -> None:
    from ramserve.budget import Ask
    from ramserve.fit import fit
    from ramserve.server.app import create_app
    from ramserve.settings import load_settings
    from ramserve.variants import VariantRegistry

    fitted = fit(open_source(str(tiny_dir), load_settings()), "50%", Ask(256, 2), progress=False)
    variant(tiny_dir, "65%")  # cached beforehand: offered though not listed
    server = load_settings().server.model_copy(update={"variants": ["min-safe"]})

    def ask(base: str, model: str) -> httpx.Response:
        body = {"model": model, "prompt": "def", "max_tokens": 2, "temperature": 0}
        return httpx.post(f"{base}/v1/completions", json=body, timeout=120)

    registry = VariantRegistry(
        fitted,
        load_settings().model_copy(update={"server": server}),
        {"context": 256, "parallel": 2},
    )
    with live_server(create_app(registry, server)) as base:
        refused = ask(base, "tiny-qwen3@40%")
        assert refused.status_code == 400, refused.text
        err = refused.json()["error"]
        assert err["code"] == "variant_not_offered" and err["param"] == "model"
        assert "--any-budget" in err["message"] and "tiny-qwen3@min-safe" in err["message"]
        assert httpx.get(f"{base}/v1/models/tiny-qwen3@40%").status_code == 400
        assert ask(base, "tiny-qwen3@min-safe").status_code == 200
        assert ask(base, "tiny-qwen3@65%").status_code == 200
        assert len(models(cache.ramserve_home())) == 3  # nothing new was written for the refusal
    registry = VariantRegistry(
        fitted,
        load_settings().model_copy(update={"server": server}),
        {"context": 256, "parallel": 2},
        any_budget=True,
    )
    with live_server(create_app(registry, server)) as base:
        assert ask(base, "tiny-qwen3@40%").status_code == 200
        assert len(models(cache.ramserve_home())) == 4


def test_one_quantization_at_a_time_and_its_waiters_are_bounded() -> None:
    """While one swap quantizes, one more request may wait for the swap lock (swap_waiting = 1); the
    next is answered 503 with Retry-After at once, and the waiter is served after the swap."""
    import threading

    from ramserve.budget import Ask
    from ramserve.fit import fit
    from ramserve.server.app import create_app
    from ramserve.settings import load_settings
    from ramserve.variants import VariantRegistry

    from .conftest import DENSE

    fitted = fit(open_source(str(DENSE), load_settings()), "30%", Ask(256, 2), progress=False)
    server = load_settings().server.model_copy(
        update={"variants": ["min-safe", "25%", "35%"], "swap_waiting": 1}
    )
    registry = VariantRegistry(
        fitted,
        load_settings().model_copy(update={"server": server}),
        {"context": 256, "parallel": 2},
    )
    results: dict[str, httpx.Response] = {}

    def ask(base: str, spec: str) -> None:
        body = {"model": f"{DENSE.name}@{spec}", "prompt": "def", "max_tokens": 2}
        results[spec] = httpx.post(f"{base}/v1/completions", json=body, timeout=300)

    with live_server(create_app(registry, server)) as base:
        first = threading.Thread(target=ask, args=(base, "min-safe"))
        first.start()
        assert wait_for(lambda: registry.stage.startswith("quantizing"), timeout=60)
        second = threading.Thread(target=ask, args=(base, "25%"))
        second.start()
        assert wait_for(lambda: registry._waiting == 1, timeout=60)
        ask(base, "35%")  # a third, while the first quantizes and the second waits
        first.join()
        second.join()
    assert results["35%"].status_code == 503, results["35%"].text
    assert (
        results["35%"].headers["Retry-After"]
        and "swap" in results["35%"].json()["error"]["message"]
    )
    assert results["min-safe"].status_code == 200 and results["25%"].status_code == 200


def test_a_bad_config_file_is_named_without_a_traceback(ramserve_home: Path) -> None:
    configure(ramserve_home, "[cache]\nmax_gb = -3\n")
    done = cli("ls", home=ramserve_home, check=False)
    assert done.returncode == 2 and "[cache] max_gb" in done.stderr
    assert str(ramserve_home / "config.toml") in done.stderr
    configure(ramserve_home, "[cache\n")
    done = cli("ls", home=ramserve_home, check=False)
    assert done.returncode == 2 and "is not valid TOML" in done.stderr


def test_a_second_writer_of_an_entry_waits_and_says_so(ramserve_home: Path, caplog) -> None:
    entry = cache.profile_path("0123456789abcdef")
    code = ("import sys, time; from pathlib import Path; from ramserve import cache\n"
            f"with cache.writing(Path({str(entry)!r})):\n"
            "    print('held', flush=True); time.sleep(1.0)\n")  # fmt: skip
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAMSERVE_HOME": str(ramserve_home)})  # fmt: skip
    assert other.stdout is not None and other.stdout.readline().strip() == "held"
    start = time.monotonic()
    with cache.writing(entry):
        waited = time.monotonic() - start
    other.wait(timeout=30)
    other.stdout.close()
    assert waited > 0.5 and "waiting for another ramserve writing" in caplog.text
