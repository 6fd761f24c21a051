"""Loading a quantized model and scheduling its generation: continuous batching, sampling, prompt cache.

One worker thread owns every MLX call. It runs mlx-lm's ``BatchGenerator`` (continuous batching:
requests join and leave the decoding batch at any step) and reuses KV caches of earlier prompts
through mlx-lm's ``LRUPromptCache``, so a shared prefix is not recomputed. Callers submit a prompt
with sampling parameters, the request's ``Output`` (ramserve/output.py: detokenizing, stop strings,
reasoning and tool calls, typed events) and any extra logits processors (ramserve/constrain.py's
grammars); the scheduler hands each sampled token to that request's output, from the worker thread.

Memory is bounded up front instead of failing mid-generation: at most ``parallel`` sequences decode
at once, each within ``context`` tokens (what the budget's KV line pays for); later requests wait in
a bounded queue and a full queue is refused.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .budget import RuntimeShape
from .constrain import Grammars
from .crew import Lockstep, RankLost, Tick
from .device import kv_quantizable, runtime_dtype
from .errors import RamserveError
from .kvcache import sequence_caches
from .output import Done, Event, Output, Usage, make_output
from .settings import ServerSettings, Settings
from .source import head_dim_of

log = logging.getLogger("ramserve.engine")

UNBOUNDED = 1 << 30  # the generator's own token limit: the engine ends sequences itself


class QueueFull(RamserveError):
    """Every decoding slot is busy and the waiting queue is full."""


class ContextExceeded(RamserveError):
    """The prompt plus the tokens asked for do not fit the context."""


def load_model(folder: Path, cpu: ServerSettings | None = None,
               stage: Callable[[Any], None] | None = None) -> tuple[Any, Any]:  # fmt: skip
    """mlx-lm's model and tokenizer for a folder, in the dtype this device runs fastest.

    On MLX's CPU back end the model runs in float32: quantized matmuls with bf16 scales decode about
    7x slower there than with float32 scales (measured: 3.9 vs 28.8 tokens/s on code-qwen3-30m), and
    MoE expert matmuls (``gather_mm``) exist only in float32. budget.activation_dtype counts it.
    There too, given ``cpu`` (the server's ``cpu_*`` settings), the quantized layers take
    ramserve/cpu.py's paths, which use every core and batch rows; without it they are mlx-lm's own.
    ``stage`` makes the model one rank's part of a pipeline (ramserve/pipeline.py), before anything is
    read: a rank reads only the weights it runs.
    """
    import mlx_lm

    from .cpu import adapt_to_cpu, cores

    if stage is None:
        model, tokenizer = mlx_lm.load(str(folder))[:2]
    else:  # a rank's part holds only its own layers: ``stage`` checks that they are all there
        from mlx_lm.utils import load_model as load_lazily
        from mlx_lm.utils import load_tokenizer

        model, config = load_lazily(Path(folder), lazy=True, strict=False)
        tokenizer = load_tokenizer(Path(folder), eos_token_ids=config.get("eos_token_id"))
    if cpu is not None and mx.default_device() == mx.cpu:
        adapt_to_cpu(model, min_rows=cpu.cpu_dense_rows, workers=cpu.cpu_workers or cores(),
                     min_gflops=cpu.cpu_dense_min_gflops)  # fmt: skip
    if runtime_dtype() == "float32":
        model.set_dtype(mx.float32)
    if stage is not None:  # after set_dtype: a stand-in's zeros take the dtype the others send
        stage(model)
    mx.eval(model.parameters())  # now, on this thread's stream: the worker thread has no other
    return model, tokenizer


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    repetition_context: int = 20  # the last tokens the repetition penalty looks at
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(p: SamplingParams) -> Callable[[mx.array], mx.array]:
    """A per-request sampler; with a seed it draws from its own key, independent of the batch."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if p.temperature == 0:
        return _greedy  # one shared object: the batch then samples in one call
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < p.top_p < 1:
        filters.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p > 0:
        filters.append(lambda x: apply_min_p(x, p.min_p))
    if p.top_k > 0:
        filters.append(lambda x: apply_top_k(x, p.top_k))
    state = {"key": mx.random.key(p.seed) if p.seed is not None else None}

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        key = state["key"]
        if key is None:
            return mx.random.categorical(logprobs * (1 / p.temperature))
        state["key"], sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return sample


def make_processors(p: SamplingParams) -> list[Any]:
    from mlx_lm.sample_utils import make_logits_processors

    processors: list[Any] = make_logits_processors(
        logit_bias=p.logit_bias,
        repetition_penalty=p.repetition_penalty,
        repetition_context_size=p.repetition_context,
        presence_penalty=p.presence_penalty or None,
        frequency_penalty=p.frequency_penalty or None,
    )
    return processors


@dataclass
class Request:
    prompt: array[int]  # 4 bytes a token while it waits (a list holds ~36)
    params: SamplingParams
    output: Output
    max_tokens: int
    processors: list[Any] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    uid: int | None = None
    cached_tokens: int = 0
    steps: int = 0  # tokens sampled for it
    generated: int = 0  # tokens delivered to its output
    first_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (the worker drops it at its next step)."""
        self.cancelled = True


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def decode_rate(self) -> float:
        """Tokens per second while decoding, all streams together."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """A loaded model and the thread that generates with it."""

    def __init__(
        self,
        folder: Path,
        settings: Settings,
        *,
        context: int | None = None,
        parallel: int | None = None,
        queue_size: int | None = None,
        prompt_cache_entries: int | None = None,
        prompt_cache_bytes: int | None = None,
        prefill_chunk: int | None = None,
        prefill_batch: int | None = None,
        kv_bits: int | None = None,
        stage: Callable[[Any], None] | None = None,
        crew: Lockstep | None = None,
    ) -> None:
        """Load ``folder`` and start its worker; each count not given is ``[server]``'s (the prefill
        step ``[budget]``'s) in configs: the fit (ramserve/shape.py) may give smaller ones. With
        ``kv_bits`` (8 or 4) the KV cache is stored quantized (ramserve/kvcache.py). On several
        machines, ``stage`` makes the model this rank's part, and ``crew`` keeps the ranks' batches
        in step: the leading rank schedules, the others follow (ramserve/crew.py)."""
        from mlx_lm.models.cache import LRUPromptCache

        server = settings.server
        # the prefill step the budget's scratch line pays for
        self.prefill_chunk = prefill_chunk or settings.budget.prefill_chunk
        self.prefill_batch = prefill_batch or settings.budget.prefill_batch
        self.folder = Path(folder)
        self.model, self.tokenizer = load_model(self.folder, server, stage)
        self.crew = crew
        self._ops: list[list[Any]] = []  # batch changes the following ranks have not been told
        self._eos = set(self.tokenizer.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, vocab_size(self.model), settings.tool_formats)
        limit = max_positions(self.model)
        self.context = min(context or limit, limit)
        self.kv_bits = require_kv_bits(self.model, kv_bits)
        self.parallel = server.parallel if parallel is None else parallel
        self.queue_size = server.queue_size if queue_size is None else queue_size
        entries = (
            server.prompt_cache_entries if prompt_cache_entries is None else prompt_cache_entries
        )
        self.stats = Stats()
        self._prompt_cache = LRUPromptCache(entries, prompt_cache_bytes or 1 << 62)
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._lock = threading.Condition()
        self._closing = False
        self._abandoned = False
        self.failure: str | None = None  # why the worker stopped, where it could not go on
        # Called with the generator after each step (bench/budget.py reads the cache size there).
        self.on_step: Callable[[Any], None] | None = None
        self._generator: Any = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="ramserve-engine", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, Any]], **template_args: Any) -> list[int]:
        tokens = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **template_args
        )
        return list(tokens)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def submit(self, prompt: list[int], params: SamplingParams, output: Output,
               processors: list[Any] | None = None) -> Request:  # fmt: skip
        """Queue a generation; raises ContextExceeded or QueueFull instead of over-committing."""
        room = self.context - len(prompt)
        if not prompt:
            raise ContextExceeded("the prompt is empty")
        if room <= 0 or (params.max_tokens is not None and params.max_tokens > room):
            asked = f" + {params.max_tokens} max tokens" if params.max_tokens is not None else ""
            raise ContextExceeded(
                f"the prompt ({len(prompt)} tokens){asked} exceeds the context of "
                f"{self.context} tokens"
            )
        request = Request(array("i", prompt), params, output, params.max_tokens or room,
                          processors or [])  # fmt: skip
        with self._lock:
            if len(self._waiting) >= self.queue_size + max(0, self.parallel - len(self._active)):
                raise QueueFull(f"all {self.parallel} slots are busy and {self.queue_size} wait")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def run_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Event]]:
        """Generate for every prompt at once and wait: each prompt's events, in order."""
        events: list[list[Event]] = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def sink_for(i: int) -> Callable[[Event], None]:
            def sink(e: Event) -> None:
                events[i].append(e)
                if isinstance(e, Done):
                    done.release()

            return sink

        for i, prompt in enumerate(prompts):
            output = make_output(self.tokenizer, prompt, sink_for(i), stops=params.stop)
            self.submit(prompt, params, output)
        for _ in prompts:
            done.acquire()
        return events

    def runtime_shape(self) -> RuntimeShape:
        """What this engine is sized for (the budget's record of it)."""
        return RuntimeShape(self.context, self.parallel, self.prefill_chunk, self.prefill_batch,
                            self.kv_bits or 16)  # fmt: skip

    def weight_bytes(self) -> int:
        """The loaded model's bytes (parameters as this runtime holds them)."""
        from mlx.utils import tree_flatten

        leaves: Any = tree_flatten(self.model.parameters())
        return sum(int(v.nbytes) for _, v in leaves)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=1 if self._abandoned else 30)

    def wait(self) -> None:
        """Until the worker ends (a following rank: when the leading one closes)."""
        self._thread.join()

    def abandon(self, message: str) -> None:
        """Fail every request now, from any thread: the worker may be blocked for good in a pass
        that waits for a lost rank, so it is not asked."""
        with self._lock:
            self._abandoned = self._closing = True
            requests = [*self._active.values(), *self._waiting]
            self._waiting.clear()
            self._lock.notify()
        self._fail(requests, message)

    # -- the worker ----------------------------------------------------------------------------

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        # No sequence ends inside the generator: the engine ends each one after a step
        # (``_step``), so ranks that follow this one (``_follow``) end it at the same point.
        return BatchGenerator(
            self.model,
            stream=self._stream,
            stop_tokens=None,
            max_tokens=UNBOUNDED,
            completion_batch_size=self.parallel,
            prefill_batch_size=min(self.parallel, self.prefill_batch),
            prefill_step_size=self.prefill_chunk,
        )

    def _run(self) -> None:
        # MLX streams belong to the thread that made them: the worker makes its own.
        self._stream = mx.default_stream(mx.default_device())
        self._generator = self._new_generator()
        try:
            if self.crew is not None and not self.crew.leads:
                self._follow()
            else:
                self._loop()
        except Exception as e:  # a following rank's fault: it stops, and says why (cluster.py)
            log.error("following the leading rank failed: %s", traceback.format_exc())
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            if self.crew is not None and self.crew.leads:
                self.crew.tell(Tick(close=True))
            self._generator.close()
            # Work still queued on this thread's stream (the batch's look-ahead step) must finish
            # before the thread ends, or MLX aborts the process at exit.
            self._generator = None
            gc.collect()  # free the batch's lazy arrays here, while their stream's thread lives
            mx.synchronize(self._stream)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._waiting and not self._active:
                    self._lock.wait()
                if self._closing:
                    break
                starting: list[Request] = []
                while self._waiting and len(self._active) + len(starting) < self.parallel:
                    starting.append(self._waiting.popleft())
            try:
                self._drop_cancelled()
                for request in starting:
                    self._start(request)
                if self._active:
                    self._step()
            except Exception as e:  # a fault in generation fails its requests, not the server
                log.error("generation failed: %s", traceback.format_exc())
                self._fail_all(f"internal error during generation: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        with self._lock:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._count_finish("cancelled")
        gone = [uid for uid, r in self._active.items() if r.cancelled]
        if gone:
            self._end({uid: None for uid in gone})
            for _ in gone:
                self._count_finish("cancelled")

    def _start(self, r: Request) -> None:
        if r.cancelled:
            self._count_finish("cancelled")
            return
        prompt = r.prompt.tolist()
        r.uid, r.cached_tokens = self._insert(
            prompt, make_sampler(r.params), make_processors(r.params) + r.processors
        )
        self._active[r.uid] = r
        self.stats.prompt_tokens += len(r.prompt)
        self.stats.cached_tokens += r.cached_tokens
        self._record(["start", r.uid, prompt])

    def _insert(self, prompt: list[int], sampler: Any, processors: list[Any]) -> tuple[int, int]:
        """Start decoding ``prompt`` from the nearest cached prefix: its uid and the tokens reused."""
        from mlx_lm.models.cache import trim_prompt_cache

        cache, rest = self._prompt_cache.fetch_nearest_cache(self._key, prompt)
        if cache is not None and not rest:  # an exact hit: recompute the last token for its logits
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        if cache is None:
            cache = sequence_caches(self.model, self.kv_bits)
        cached = len(prompt) - len(rest)
        (uid,) = self._generator.insert(
            [rest],
            max_tokens=[UNBOUNDED],
            caches=[cache] if cache is not None else None,
            all_tokens=[prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        return int(uid), cached

    def _end(self, ended: dict[int, str | None]) -> None:
        """Take sequences out of the batch; those that ended on their own (a reason given) keep
        their KV cache for a later prompt that shares the prefix."""
        kept = self._generator.remove(list(ended), return_prompt_caches=True)
        finished = {uid: kept[uid][1] for uid, why in ended.items() if why}
        self._keep_caches(kept, finished)
        for uid in ended:
            self._active.pop(uid, None)
        self._record(["end", list(ended), {str(u): t for u, t in finished.items()}])

    def _keep_caches(self, kept: dict[int, Any], finished: dict[int, list[int]]) -> None:
        for uid, tokens in finished.items():
            caches = kept[uid][0]
            mx.eval([c.state for c in caches])  # no lazy work may outlive the stream
            self._prompt_cache.insert_cache(self._key, tokens, caches)

    @property
    def _key(self) -> str:
        return str(self.folder)

    def _step(self) -> None:
        self._tell(step=True)
        tic = time.perf_counter()
        _, responses = self._generator.next()
        if self.on_step is not None:
            self.on_step(self._generator)
        if responses:
            self.stats.decode_seconds += time.perf_counter() - tic
            self.stats.decode_tokens += len(responses)
        ended: dict[int, str | None] = {}
        for resp in responses:
            r = self._active.get(resp.uid)
            if r is None:
                continue
            r.steps += 1
            finish = ("stop" if resp.token in self._eos
                      else "length" if r.steps >= r.max_tokens else None)  # fmt: skip
            if not r.cancelled:
                self._deliver(r, resp.token, resp.logprobs, finish)
            if finish is not None or r.done:  # r.done: a stop string ended it
                ended[resp.uid] = finish
        if ended:
            self._end(ended)

    def _deliver(self, r: Request, token: int, logprobs: Any, finish: str | None) -> None:
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.stats.ttft_sum += now - r.submitted
            self.stats.ttft_count += 1
        r.generated += 1
        self.stats.generated_tokens += 1
        stopped = False
        if finish != "stop":  # "stop" is the end-of-sequence token: no text
            stopped = r.output.token(token, logprobs)
        finish = "stop" if stopped else finish
        if finish is not None:
            r.done = True
            self._count_finish(finish)
            usage = Usage(len(r.prompt), r.generated, r.cached_tokens,
                          r.first_token_at - r.submitted, now - r.submitted)  # fmt: skip
            r.output.finish(finish, usage)

    def _count_finish(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _fail_all(self, message: str) -> None:
        failed = list(self._active.values())
        self._active.clear()
        self._reset()
        self._record(["reset"])
        with contextlib.suppress(RankLost):  # abandon() has failed them all already
            self._tell(step=False)
        self._fail(failed, message)

    def _fail(self, requests: list[Request], message: str) -> None:
        for r in requests:
            if not r.done:
                self._count_finish("error")
                r.done = True
                r.output.fail(message)

    def _reset(self) -> None:
        self._generator.close()
        self._generator = self._new_generator()
        mx.clear_cache()

    # -- ranks in lockstep (ramserve/crew.py) ---------------------------------------------------

    def _record(self, op: list[Any]) -> None:
        if self.crew is not None and self.crew.leads:
            self._ops.append(op)

    def _tell(self, step: bool) -> None:
        """Send the following ranks what changed in the batch since the last step, and whether to
        step: they then run the same forward passes on the same batch."""
        if self.crew is not None and self.crew.leads:
            self.crew.tell(Tick(self._ops, step))
            self._ops = []

    def _follow(self) -> None:
        """A following rank: replay the leading rank's batch changes and steps. Its tokens are its
        own (greedy) and never used: what it runs of the model reads only hidden states."""
        assert self.crew is not None
        for tick in self.crew.ticks():
            if tick.close:
                return
            for op in tick.ops:
                self._apply(op)
            if tick.step:
                self._generator.next()

    def _apply(self, op: list[Any]) -> None:
        kind = op[0]
        if kind == "start":
            uid, _ = self._insert(op[2], None, [])
            if uid != op[1]:
                raise RamserveError(f"out of step with the leading rank: uid {uid}, not {op[1]}")
        elif kind == "end":
            kept = self._generator.remove(op[1], return_prompt_caches=True)
            self._keep_caches(kept, {int(uid): tokens for uid, tokens in op[2].items()})
        elif kind == "reset":
            self._reset()
        else:
            raise RamserveError(f"unknown step from the leading rank: {kind!r}")


def require_kv_bits(model: Any, bits: int | None) -> int | None:
    """The quantized KV precision to run ``model`` with (None: 16 bits), refusing one its attention
    heads cannot be stored in."""
    if bits is None or bits >= 16:
        return None
    head_dim = head_dim_of(vars(model.args))
    if bits not in (4, 8) or not kv_quantizable(head_dim):
        raise RamserveError(
            f"cannot store this model's KV cache in {bits} bits (head dimension {head_dim}); "
            "use --kv-bits 16, 8 or 4 with a head dimension divisible by 64"
        )
    return bits


def vocab_size(model: Any) -> int:
    """The width of the model's logits."""
    return int(model.args.vocab_size)


def max_positions(model: Any) -> int:
    """The model's context in tokens (its config's max_position_embeddings; unbounded without one)."""
    args = getattr(model, "args", None)
    value = getattr(args, "max_position_embeddings", None) if args is not None else None
    return int(value) if value else 1 << 20
