"""Peak resident memory of a call, sampled from a background thread (RSS, over a baseline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


def peak_rss_over_baseline(fn: Callable[[], T], interval: float = 0.01) -> tuple[T, int, float]:
    """Run ``fn``; return its result, the peak RSS above the RSS before it (bytes), and seconds."""
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        thread.join()
    return result, max(0, peak - baseline), seconds


def in_fresh_process(argv: list[str]) -> dict[str, Any]:
    """Runs ``python *argv`` (a benchmark measuring one row) with this environment and returns the
    JSON object its last output line holds: a row measured in a process of its own starts from that
    process's baseline, not from what earlier rows left resident."""
    done = subprocess.run([sys.executable, *argv], env=os.environ, stdout=subprocess.PIPE,
                          text=True, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
