"""Measuring helpers the benchmarks and the budget tests share."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ramserve.engine import SamplingParams


def fill_context(engine: Any, context: int, parallel: int) -> dict[str, int]:
    """Run ``parallel`` sequences that each fill ``context`` tokens; MLX's memory while doing it.

    Returns the loaded weights' bytes, the KV cache mlx-lm allocated (the largest the batch's caches
    reached), and MLX's peak. Prompts are random token ids filling all but the last 32 tokens, and
    the end of sequence is banned, so every sequence decodes to the full context.
    """
    vocab = engine.model.args.vocab_size
    prompt_len = context - min(32, context // 2)
    prompts = [mx.random.randint(1, vocab, (prompt_len,), key=mx.random.key(i)).tolist()
               for i in range(parallel)]  # fmt: skip
    ban = {int(t): -100.0 for t in engine.tokenizer.eos_token_ids}
    params = SamplingParams(max_tokens=context - prompt_len, temperature=0, logit_bias=ban)
    kv_seen: list[int] = []
    engine.on_step = lambda gen: kv_seen.append(gen.prompt_cache_nbytes)
    mx.synchronize()
    weights = engine.weight_bytes()
    mx.reset_peak_memory()
    events = engine.run_batch(prompts, params)
    engine.on_step = None
    if any(e[-1].finish_reason != "length" for e in events):
        raise RuntimeError("a sequence ended before filling the context")
    return {"weights": weights, "kv": max(kv_seen, default=0), "peak": int(mx.get_peak_memory())}
