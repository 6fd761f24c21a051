"""A real uvicorn server on a free loopback port, in a thread, for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports: ``run --hosts`` takes a control port and one ring
    port per rank after it."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


@contextmanager
def live_server(app: Any, ready_timeout: float = 120.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 and yield its base URL once /health answers 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {base} not ready in {ready_timeout} s")
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_folder(folder: Any, name: str, *, api_key: str | None = None, server: Any = None,
                 **engine_args: Any) -> Iterator[str]:  # fmt: skip
    """A real server of one quantized folder under ``name``; yields its base URL."""
    from ramserve.server.app import create_app
    from ramserve.server.registry import Registry
    from ramserve.settings import load_settings

    registry = Registry(folder, name, load_settings(), engine_args)
    app = create_app(registry, server or load_settings().server, api_key=api_key)
    with live_server(app) as url:
        yield url


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def metric(base: str, name: str, labels: str = "") -> float:
    """One sample from the server's /metrics."""
    text = httpx.get(f"{base}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"ramserve_{name}{labels} "):
            return float(line.split()[-1])
    return 0.0


def leave_a_stream(base: str, path: str, body: dict[str, Any]) -> bool:
    """Read a few lines of a streamed answer, then go away; whether the server then cancelled the
    request and freed its slot."""
    before = metric(base, "generations_finished_total", '{reason="cancelled"}')
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    cancelled = wait_for(
        lambda: metric(base, "generations_finished_total", '{reason="cancelled"}') > before
    )
    return cancelled and wait_for(lambda: metric(base, "active_sequences") == 0)


def wait_healthy(base: str, proc: Any = None, timeout: float = 180.0) -> None:
    """Wait for a server (optionally a subprocess that must stay alive) to answer /health with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, "the server exited"
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server on {base} never became healthy")


@contextmanager
def ramserve_run(*args: str, env: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """Start `ramserve run` and yield its base URL and what it printed until it was healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "ramserve.cli", "run", *args, "--port", str(port), "-q"]
    log = Path(env["RAMSERVE_HOME"]).parent / f"run-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_healthy(base, proc)
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{log.read_text()}") from e
        yield base, log.read_text().splitlines()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAMSERVE_HOME": str(home), **extra}


def host_memory_gb(model: Path, mib: float, ask: Any) -> float:
    """A host's memory_gb that leaves about ``mib`` MiB for ``model``'s weights beside its runtime
    and its whole KV cache (at ``ask``'s shape), after the OS reserve of 2 GiB."""
    from ramserve.budget import activation_shape, budget_for, default_shape, kv_shape
    from ramserve.device import Machine
    from ramserve.settings import load_settings
    from ramserve.source import open_source

    settings = load_settings()
    source = open_source(str(model), settings)
    kv = kv_shape(source)
    shape = default_shape(kv, settings, ask.context, ask.parallel)
    probe = budget_for(kv, activation_shape(source), settings, shape,
                       machine=Machine("probe", 16 * 2**30, 16 * 2**30, None, False))  # fmt: skip
    return 2.0 + (probe.runtime + probe.kv + mib * 2**20) / 2**30


def open_page(browser: Any, base: str, scheme: str = "light") -> Any:
    page = browser.new_page(color_scheme=scheme, viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base}/")
    page.wait_for_selector("body[data-ready=true]", timeout=20_000)
    page.errors = errors
    return page
