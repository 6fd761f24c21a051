"""Load: 64 concurrent streaming clients for 60 s against `ramserve serve` at default settings (issue
20). Each client streams one chat completion after another. Prints completed streams, errors, 503s,
tokens per second and the server's RSS once warm and at the end (a table, then a JSON line).
Targets: 0 errors, 0 503s, RSS flat within 10%.
Usage: python bench/load.py [--clients 64] [--seconds 60] [--max-tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from ramserve.fmt import human_bytes, table  # noqa: E402
from tests.serving import free_port  # noqa: E402

MODEL = ROOT.parent / "models" / "code-qwen3-30m"
PROMPTS = ["Write a function that adds two numbers.", "Sort a list in Python.",
           "Parse a CSV file.", "Reverse a string."]  # fmt: skip


def start_server(model: Path, home: str) -> tuple[subprocess.Popen[bytes], str]:
    """`ramserve quantize` (a 30% variant, as a user would) then `ramserve serve` on it, defaults."""
    env = {**os.environ, "RAMSERVE_HOME": home}
    cli = [sys.executable, "-m", "ramserve.cli"]
    done = subprocess.run([*cli, "quantize", str(model), "--budget", "30%", "-q"], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    folder = done.stdout.split()[0]
    port = free_port()
    proc = subprocess.Popen([*cli, "serve", folder, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server never became healthy")


async def client(http: httpx.AsyncClient, base: str, i: int, until: float, max_tokens: int,
                 counts: Counter[str], warm: asyncio.Event, needed: int) -> None:  # fmt: skip
    body = {"model": "code-qwen3-30m", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}  # fmt: skip
    while time.monotonic() < until:
        try:
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                if r.status_code == 503:
                    counts["503"] += 1
                    await r.aread()
                    continue
                if r.status_code != 200:
                    counts["errors"] += 1
                    await r.aread()
                    continue
                ended = False
                async for line in r.aiter_lines():
                    if line.startswith('data: {"error"'):
                        counts["errors"] += 1
                    elif line == "data: [DONE]":
                        ended = True
                    elif '"content"' in line:
                        counts["tokens"] += 1  # one chunk a token
                counts["completed" if ended else "errors"] += 1
                if counts["completed"] >= needed:
                    warm.set()
        except httpx.HTTPError:
            counts["errors"] += 1


async def load(base: str, server: psutil.Process, args: argparse.Namespace) -> dict[str, object]:
    counts: Counter[str] = Counter()
    warm = asyncio.Event()
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        start = time.monotonic()
        until = start + args.seconds
        tasks = [asyncio.create_task(client(http, base, i, until, args.max_tokens, counts, warm,
                                            args.clients)) for i in range(args.clients)]  # fmt: skip
        await warm.wait()  # every client's first stream on average: caches and buffers are made
        rss_warm, warm_at = server.memory_info().rss, time.monotonic() - start
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return {"clients": args.clients, "seconds": round(elapsed, 1), "completed": counts["completed"],
            "errors": counts["errors"], "refused_503": counts["503"],
            "tokens_per_s": round(counts["tokens"] / elapsed, 1),
            "rss_warm": rss_warm, "rss_warm_at_s": round(warm_at, 1),
            "rss_end": server.memory_info().rss}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", type=Path, default=MODEL)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramserve-load-") as home:
        proc, base = start_server(args.model, home)
        try:
            server = psutil.Process(proc.pid)
            rss_start = server.memory_info().rss
            result = {"rss_start": rss_start, **asyncio.run(load(base, server, args))}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    growth = result["rss_end"] / result["rss_warm"] - 1  # type: ignore[operator]
    rows = [(k, human_bytes(v) if k.startswith("rss") and not k.endswith("_s") else v)
            for k, v in result.items()]  # fmt: skip
    rows.append(("rss growth, warm to end", f"{100 * growth:+.1f}%"))
    print(table(["load (`ramserve serve`, default settings)", "value"], rows))
    ok = result["errors"] == 0 and result["refused_503"] == 0 and abs(growth) <= 0.10
    print("targets (0 errors, 0 503s, RSS within 10%):", "met" if ok else "MISSED")
    print(json.dumps({"bench": "load", **result, "rss_growth": round(growth, 4), "met": ok}))


if __name__ == "__main__":
    main()
