"""Quantized KV in continuous batching: the batched engine decodes as mlx-lm's single-sequence
QuantizedKVCache does, sequences join and leave the batch, the prompt cache keeps quantized entries,
and the KV line of the budget is the bytes the caches allocate."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from ramserve.budget import kv_shape
from ramserve.engine import Engine, SamplingParams, load_model
from ramserve.output import Done, Text, Usage, make_output
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import DENSE

PROMPTS = [
    "def fibonacci(n):\n    ",
    'import os\nimport sys\n\n\ndef main(argv):\n    """Parse the arguments and',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def reference(folder: Path, prompt: list[int], bits: int, n: int) -> str:
    """What mlx-lm's single-sequence generation gives with its own QuantizedKVCache."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    model, tokenizer = load_model(folder, load_settings().server)
    cache = [QuantizedKVCache(64, bits) if type(c) is KVCache else c
             for c in make_prompt_cache(model)]  # fmt: skip
    events: list[object] = []
    output = make_output(tokenizer, prompt, events.append)  # the text as the engine makes it
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=n,
                                         sampler=lambda x: mx.argmax(x, axis=-1),
                                         prompt_cache=cache):  # fmt: skip
        output.token(int(token), logprobs)
    output.finish("length", Usage(len(prompt), n, 0))
    return texts([events])[0]


def texts(events: list[list[object]]) -> list[str]:
    return ["".join(e.text for e in evs if isinstance(e, Text)) for evs in events]


@pytest.fixture(scope="module")
def engine8(served_dense: Path) -> Engine:
    engine = Engine(served_dense, load_settings(), parallel=3, context=512, kv_bits=8)
    yield engine
    engine.close()


def test_batched_8_bit_kv_decodes_as_mlx_lm_single_sequence(
    engine8: Engine, served_dense: Path
) -> None:
    prompts = [engine8.encode(p) for p in PROMPTS]
    batched = texts(engine8.run_batch(prompts, GREEDY))
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == reference(served_dense, prompt, 8, GREEDY.max_tokens)
    # and 8 bits are not 16: the 16-bit engine's text is allowed to differ, the cache is smaller
    assert all(got for got in batched)


def test_sequences_join_and_leave_the_quantized_batch(engine8: Engine, served_dense: Path) -> None:
    """A short request finishes (leaves) while long ones decode; one more joins mid-way."""
    import threading

    prompts = [engine8.encode(p) for p in PROMPTS]
    lengths = [4, 40, 40]
    out: dict[int, list[object]] = {i: [] for i in range(4)}
    done = threading.Semaphore(0)

    def submit(i: int, prompt: list[int], n: int) -> None:
        def sink(e: object, i: int = i) -> None:
            out[i].append(e)
            if isinstance(e, Done):
                done.release()

        params = SamplingParams(temperature=0, max_tokens=n)
        engine8.submit(prompt, params, make_output(engine8.tokenizer, prompt, sink), [])

    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        submit(i, p, n)
    done.acquire()  # the short one has left the batch
    submit(3, prompts[0], 12)  # and a new one joins the two still decoding
    for _ in range(3):
        done.acquire()
    got = texts([out[i] for i in range(4)])
    want = [
        reference(served_dense, prompts[i], 8, n) for i, n in ((0, 4), (1, 40), (2, 40), (0, 12))
    ]
    assert got == want


def test_the_prompt_cache_keeps_quantized_entries(engine8: Engine, served_dense: Path) -> None:
    from ramserve.kvcache import SequenceKVCache

    prompt = engine8.encode(PROMPTS[1])
    first = texts(engine8.run_batch([prompt], GREEDY))[0]
    cached_before = engine8.stats.cached_tokens
    again = texts(engine8.run_batch([prompt], GREEDY))[0]
    assert again == first == reference(served_dense, prompt, 8, GREEDY.max_tokens)
    assert engine8.stats.cached_tokens - cached_before >= len(prompt) - 1
    entry, _ = engine8._prompt_cache.fetch_nearest_cache(engine8._key, prompt)
    assert entry is not None and any(isinstance(c, SequenceKVCache) for c in entry)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_the_kv_line_is_the_bytes_the_caches_allocate(served_dense: Path, bits: int) -> None:
    from bench.measure import fill_context

    source = open_source(str(DENSE), load_settings())
    kv = kv_shape(source, kv_bits=bits)
    engine = Engine(served_dense, load_settings(), parallel=2, context=300, kv_bits=bits,
                    prompt_cache_entries=0)  # fmt: skip
    try:
        measured = fill_context(engine, 300, 2)
    finally:
        engine.close()
    assert measured["kv"] == kv.bytes(300, 2)
    full = kv_shape(source).bytes(300, 2)
    assert kv.bytes(300, 2) == full if bits == 16 else kv.bytes(300, 2) < full


def test_kv_bits_on_the_command_line(engine8: Engine, capsys) -> None:
    from ramserve.cli import main

    assert engine8.runtime_shape().kv_bits == 8
    assert main(["budget", str(DENSE), "--kv-bits", "8", "--context", "512", "-q"]) == 0
    out = capsys.readouterr().out
    assert "512 tokens x 4 sequences, 8-bit KV" in out and "8-bit " in out
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["budget", str(DENSE), "--kv-bits", "5", "-q"])
    assert "'5' is not auto, 16, 8 or 4" in capsys.readouterr().err


def test_eval_scores_a_quantized_kv_cache() -> None:
    from ramserve.evaluate import evaluate

    from .conftest import EVAL_TEXT

    kw = {"reference": str(DENSE), "seq_len": 256, "samples": 4, "progress": False}
    full = evaluate(str(DENSE), EVAL_TEXT, load_settings(), **kw)
    eight = evaluate(str(DENSE), EVAL_TEXT, load_settings(), kv_bits=8, **kw)
    four = evaluate(str(DENSE), EVAL_TEXT, load_settings(), kv_bits=4, **kw)
    assert full.kl_mean == pytest.approx(0, abs=1e-6)
    assert 0 < eight.kl_mean < four.kl_mean and "8-bit KV" in eight.label


def test_a_head_too_narrow_for_quantized_kv_is_refused_by_name(tiny_dir: Path) -> None:
    from ramserve.errors import RamserveError
    from ramserve.evaluate import evaluate

    from .conftest import EVAL_TEXT

    with pytest.raises(RamserveError, match="head dimension 16"):
        evaluate(str(tiny_dir), EVAL_TEXT, load_settings(), kv_bits=8, seq_len=16, samples=1,
                 progress=False)  # fmt: skip


def test_a_server_that_cannot_store_the_kv_cache_says_why_in_its_own_words(tiny_dir: Path) -> None:
    """The refusal reaches /health and every request as the user's problem, in its own words (no
    exception type, which is for bugs)."""
    from ramserve.server.registry import Registry

    from .serving import wait_for

    registry = Registry(tiny_dir, "tiny", load_settings(), {"kv_bits": 8})
    registry.start()
    assert wait_for(lambda: registry.stage == "failed", timeout=60)
    assert registry.error is not None
    assert registry.error.startswith("the model failed to load: cannot store this model's KV")
    assert "Error" not in registry.error
