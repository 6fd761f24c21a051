"""The engine's scheduling: a long prompt prefills in chunks, and requests that arrive meanwhile join
the batch between its chunks instead of waiting for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ramserve.engine import Engine, SamplingParams
from ramserve.output import Done, Text, make_output
from ramserve.settings import load_settings


def test_waiting_requests_become_active_during_a_long_prefill(served_dense: Path) -> None:
    engine = Engine(served_dense, load_settings(), parallel=4, context=4096, prefill_chunk=64,
                    prompt_cache_entries=0)  # fmt: skip
    try:
        first_token: dict[str, float] = {}
        done = threading.Semaphore(0)

        def submit(name: str, prompt: list[int], n: int) -> None:
            def sink(e: object) -> None:
                if isinstance(e, Text) and name not in first_token:
                    first_token[name] = time.perf_counter()
                if isinstance(e, Done):
                    done.release()

            out = make_output(engine.tokenizer, prompt, sink)
            engine.submit(prompt, SamplingParams(temperature=0, max_tokens=n), out)

        long_prompt = engine.encode("def f(x):\n    return x\n\n" * 160)  # ~1,600 tokens: 25 chunks
        assert len(long_prompt) > 20 * 64
        submit("long", long_prompt, 4)
        while engine.active == 0:  # the long prompt is in the batch, prefilling
            time.sleep(0.001)
        active_seen = 0
        for i in range(3):
            submit(f"short{i}", engine.encode(f"# note {i}\nimport os\n"), 8)
        deadline = time.perf_counter() + 60
        while "long" not in first_token and time.perf_counter() < deadline:
            active_seen = max(active_seen, engine.active)
            time.sleep(0.002)
        for _ in range(4):
            done.acquire()
        assert active_seen == 4  # all four in the batch at once, none queued behind the prefill
        shorts = [first_token[f"short{i}"] for i in range(3)]
        assert max(shorts) < first_token["long"]  # they answered while the long prompt prefilled
    finally:
        engine.close()
