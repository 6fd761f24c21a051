"""Prometheus text exposition of the server's counters and the engine's state."""

from __future__ import annotations

from collections import Counter
from typing import Any

import mlx.core as mx


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.disconnects = 0

    def count(self, path: str, status: int) -> None:
        self.requests[(path, status)] += 1

    def render(self, engine: Any | None) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP ramserve_{name} {help_}")
            out.append(f"# TYPE ramserve_{name} {kind}")
            out.extend(f"ramserve_{name}{labels} {value:g}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP requests by path and status.",
               [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.requests.items())])  # fmt: skip
        metric("client_disconnects_total", "counter", "Streams whose client went away.",
               [("", self.disconnects)])  # fmt: skip
        if engine is not None:
            st = engine.stats
            metric("prompt_tokens_total", "counter", "Prompt tokens received.",
                   [("", st.prompt_tokens)])  # fmt: skip
            metric("cached_prompt_tokens_total", "counter", "Prompt tokens served from the prompt cache.",
                   [("", st.cached_tokens)])  # fmt: skip
            metric("generated_tokens_total", "counter", "Tokens generated.",
                   [("", st.generated_tokens)])  # fmt: skip
            metric("generations_finished_total", "counter", "Generations by how they ended.",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(st.finished.items())])  # fmt: skip
            metric("time_to_first_token_seconds", "summary", "From submission to the first token.",
                   [("_sum", st.ttft_sum), ("_count", st.ttft_count)])  # fmt: skip
            metric("tokens_per_second", "gauge", "Decode throughput, all streams together.",
                   [("", st.decode_rate)])  # fmt: skip
            metric("queue_depth", "gauge", "Requests waiting for a decoding slot.",
                   [("", engine.queue_depth)])  # fmt: skip
            metric("active_sequences", "gauge", "Sequences decoding now.", [("", engine.active)])
        metric("memory_active_bytes", "gauge", "MLX memory in use.", [("", mx.get_active_memory())])
        metric("memory_peak_bytes", "gauge", "MLX peak memory.", [("", mx.get_peak_memory())])
        return "\n".join(out) + "\n"
