"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``), which many front-ends and libraries speak natively.

Model names are Ollama's ``name:tag``, the tag a budget: ``code-qwen3-30m:6GB`` is
``code-qwen3-30m@6GB``, and ``:latest`` (or no tag) is the model ``ramserve run`` fitted and loaded.
Chat and generate stream NDJSON unless ``"stream": false``; the last object carries Ollama's counters
(durations in nanoseconds). ``options`` map to ramserve's sampling; the options that tune Ollama's
own runtime (GPU layers, threads, mmap...) are accepted and have no effect, since ramserve fits the
model itself, and sampling methods it does not have (mirostat, tail-free, typical) are refused when
set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, StrictBool, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine import Engine, SamplingParams
from ..output import Done, Event, Reasoning, Text, TokenLogprob, ToolCall
from .core import (
    Adapter,
    Generation,
    Running,
    Strict,
    check_json_schema,
    check_stops,
    continued,
    final,
    generation_error,
    tool_use,
)
from .errors import APIError
from .registry import UnknownModel
from .schemas import ToolDef, tools_of


class Options(Strict):
    # mapped to ramserve's sampling
    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    num_ctx: int | None = Field(default=None, ge=1)
    # Ollama's own runtime: ramserve fits the model to the machine itself
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    penalize_newline: bool | None = None
    # sampling ramserve does not have: only their "off" values
    mirostat: Literal[0] | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    tfs_z: Literal[1] | None = None
    typical_p: Literal[1] | None = None

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v not in (-1, -2):
            raise ValueError("num_predict is at least 1, or -1 (no limit) or -2 (fill the context)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        return check_stops(v)

    def sampling(self, logprobs: bool, top_logprobs: int) -> SamplingParams:
        last = self.repeat_last_n
        return SamplingParams(
            max_tokens=self.num_predict if self.num_predict and self.num_predict > 0 else None,
            temperature=0.8 if self.temperature is None else self.temperature,  # Ollama's default
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=None if last == 0 else self.repeat_penalty,
            repetition_context=1 << 20 if last == -1 else (last or 64),
            stop=list(self.stop or []),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )


class FunctionIn(Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCallIn(Strict):
    function: FunctionIn
    id: str | None = None
    type: Literal["function"] | None = None


class MessageIn(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError("images are not supported: ramserve serves text-only models")
        return v

    def template(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": c.function.arguments}}
                                 for j, c in enumerate(self.tool_calls)]  # fmt: skip
        if self.tool_name is not None:
            out["name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class Common(Strict):
    """What chat and generate share."""

    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: StrictBool = True
    keep_alive: str | float | None = None  # ramserve keeps its one model loaded
    think: StrictBool | Literal["low", "medium", "high"] | None = None
    logprobs: StrictBool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)

    def generation(self, model_id: str, **kw: Any) -> Generation:
        schema = {"type": "object"} if self.format == "json" else self.format or None
        if isinstance(self.format, dict):
            check_json_schema(self.format, "format")
        args = {} if self.think is None else {"enable_thinking": self.think is not False}
        top = self.top_logprobs if self.logprobs else -1
        return Generation(model_id, self.options.sampling(self.logprobs, self.top_logprobs),
                          schema=schema, schema_param="format", top_logprobs=top,
                          context=self.options.num_ctx, template_args=args, clamp=True,
                          **kw)  # fmt: skip


class ChatIn(Common):
    messages: list[MessageIn] = Field(default_factory=list)
    tools: list[ToolDef] | None = None

    def chat(self, model_id: str) -> Generation:
        messages, prefill = continued([m.template(i) for i, m in enumerate(self.messages)])
        return self.generation(model_id, messages=messages, prefill=prefill,
                               tools=tool_use(tools_of(self.tools), None))  # fmt: skip


class GenerateIn(Common):
    prompt: str = ""
    system: str | None = None
    raw: StrictBool = False
    suffix: Literal[""] | None = None
    template: Literal[""] | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    @field_validator("suffix", "template", "context", "images", mode="before")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by ramserve (fill-in-the-middle, custom templates, "
                             "token contexts and images are not served)")  # fmt: skip
        return v

    def text_generation(self, model_id: str) -> Generation:
        if self.raw:
            return self.generation(model_id, text=self.prompt)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.generation(
            model_id, messages=[*system, {"role": "user", "content": self.prompt}]
        )


class ShowIn(Strict):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: StrictBool = False


# -- responses ---------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def counters(done: Done) -> dict[str, Any]:
    ns = 1_000_000_000
    return {"done_reason": done.finish_reason if done.finish_reason == "length" else "stop",
            "total_duration": int(done.total_s * ns), "load_duration": 0,
            "prompt_eval_count": done.prompt_tokens,
            "prompt_eval_duration": int(done.first_token_s * ns),
            "eval_count": done.completion_tokens,
            "eval_duration": int((done.total_s - done.first_token_s) * ns)}  # fmt: skip


def logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": e.token, "logprob": e.logprob,
             "top_logprobs": [{"token": t, "logprob": v} for t, v in e.top]}
            for e in entries]  # fmt: skip


def tool_call(e: ToolCall) -> dict[str, Any]:
    return {"id": e.id, "function": {"index": e.index, "name": e.name,
                                     "arguments": json.loads(e.arguments)}}  # fmt: skip


def part(e: Event, chat: bool) -> dict[str, Any]:
    """One event as the fields of a streamed object (or of the whole answer, joined)."""
    key = "content" if chat else "response"
    if isinstance(e, Text):
        out: dict[str, Any] = {key: e.text}
        if e.logprobs:
            out["logprobs"] = logprobs(e.logprobs)
        return out
    if isinstance(e, Reasoning):
        return {key: "", "thinking": e.text}
    if isinstance(e, ToolCall):
        return {key: "", "tool_calls": [tool_call(e)]}
    return {key: ""}


def wrap(head: dict[str, Any], fields: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The response object: for chat, the message fields go in ``message``."""
    top = {k: fields.pop(k) for k in ("logprobs",) if k in fields}
    if chat:
        return {**head, "created_at": now(), "message": {"role": "assistant", **fields}, **top}
    return {**head, "created_at": now(), **fields, **top}


def whole(head: dict[str, Any], events: list[Event], chat: bool) -> dict[str, Any]:
    done = final(events)
    key = "content" if chat else "response"
    fields: dict[str, Any] = {key: ""}
    for e in events:
        for k, v in part(e, chat).items():
            fields[k] = fields.get(k, type(v)()) + v
    return {**wrap(head, fields, chat), "done": True, **counters(done)}


async def stream(head: dict[str, Any], events: AsyncIterator[Event], chat: bool
                 ) -> AsyncIterator[str]:  # fmt: skip
    async for e in events:
        if isinstance(e, Done):
            if e.finish_reason == "error":
                yield json.dumps(generation_error(e).body("ollama")) + "\n"
                return
            last = wrap(head, part(Text(""), chat), chat)
            yield json.dumps({**last, "done": True, **counters(e)}) + "\n"
            return
        yield json.dumps({**wrap(head, part(e, chat), chat), "done": False}) + "\n"


def modified_at(card: dict[str, Any]) -> str:
    return datetime.fromtimestamp(card["created"], UTC).isoformat()


def details(engine: Engine | None, card: dict[str, Any]) -> dict[str, Any]:
    family = getattr(getattr(engine, "model", None), "model_type", None) or ""
    bpw = card.get("bits_per_weight")
    return {"parent_model": "", "format": "mlx", "family": family,
            "families": [family] if family else None,
            "parameter_size": "", "quantization_level": f"{bpw:.2f} bpw" if bpw else ""}  # fmt: skip


class Ollama(Adapter):
    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("/api/chat", "POST", self.chat),
            ("/api/generate", "POST", self.generate),
            ("/api/tags", "GET", self.tags),
            ("/api/show", "POST", self.show),
            ("/api/ps", "GET", self.ps),
            ("/api/version", "GET", self.version),
        ]

    # -- names ---------------------------------------------------------------------------------

    def model_id(self, name: str) -> str:
        """ramserve's id for an Ollama name: the tag is the budget; ``latest`` the fitted model."""
        registry = self.core.registry
        base, _, tag = name.partition(":")
        model_id = base if tag in ("", "latest") else f"{base}@{tag}"
        try:
            registry.card_for(model_id)
        except UnknownModel as e:
            raise UnknownModel(f"model {name!r} not found: this server has {registry.name}:latest"
                               f" and its budget variants {registry.name}:<budget>") from e  # fmt: skip
        return model_id

    def name_of(self, model_id: str) -> str:
        base, _, spec = model_id.partition("@")
        return f"{base}:{spec or 'latest'}"

    def entry(self, card: dict[str, Any]) -> dict[str, Any]:
        name = self.name_of(card["id"])
        digest = hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()
        return {"name": name, "model": name, "modified_at": modified_at(card),
                "size": card.get("weight_bytes") or 0, "digest": digest,
                "details": details(self.core.registry.engine, card)}  # fmt: skip

    # -- generation -----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body: ChatIn = await self.core.parse(request, ChatIn)
        if not body.messages:
            return await self.load(body, chat=True)
        return await self.respond(body, body.chat(self.model_id(body.model)), chat=True)

    async def generate(self, request: Request) -> Response:
        body: GenerateIn = await self.core.parse(request, GenerateIn)
        if not body.prompt:
            return await self.load(body, chat=False)
        return await self.respond(body, body.text_generation(self.model_id(body.model)), chat=False)

    async def load(self, body: Common, chat: bool) -> Response:
        """An empty request loads the model (Ollama's way to warm it up) and answers at once."""
        async with self.core.registry.lease(self.model_id(body.model)):
            pass
        fields = {"content": ""} if chat else {"response": ""}
        head = {"model": body.model}
        return JSONResponse({**wrap(head, fields, chat), "done": True, "done_reason": "load"})

    async def respond(self, body: Common, gen: Generation, chat: bool) -> Response:
        running: Running = await self.core.start(gen)
        head = {"model": body.model}
        if body.stream:
            lines = running.stream(stream(head, running.events(), chat))
            return StreamingResponse(lines, media_type="application/x-ndjson")
        return JSONResponse(whole(head, await running.collect(), chat))

    # -- models --------------------------------------------------------------------------------

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self.entry(c) for c in self.core.registry.cards()]})

    async def show(self, request: Request) -> Response:
        body: ShowIn = await self.core.parse(request, ShowIn)
        name = body.model or body.name
        if not name:
            raise APIError(400, "model: field required", param="model")
        registry = self.core.registry
        card = registry.card_for(self.model_id(name))
        engine = registry.require_ready()
        tok = engine.tokenizer
        arch = str(getattr(engine.model, "model_type", "") or "")
        capabilities = ["completion"]
        capabilities += ["tools"] if getattr(tok, "has_tool_calling", False) else []
        capabilities += ["thinking"] if getattr(tok, "has_thinking", False) else []
        info = {"general.architecture": arch, f"{arch}.context_length": card.get("context_length"),
                "ramserve.budget": card.get("budget"),
                "ramserve.bits_per_weight": card.get("bits_per_weight"),
                "ramserve.predicted_damage": card.get("predicted_damage")}  # fmt: skip
        return JSONResponse({"modelfile": "", "parameters": "",
                             "template": getattr(tok, "chat_template", None) or "",
                             "details": details(engine, card), "model_info": info,
                             "capabilities": capabilities,
                             "modified_at": modified_at(card)})  # fmt: skip

    async def ps(self, request: Request) -> Response:
        registry = self.core.registry
        engine = registry.engine
        if engine is None or not registry.ready:
            return JSONResponse({"models": []})
        import mlx.core as mx

        card = registry.card_for(registry.loaded_id)
        size = engine.weight_bytes()
        gpu = mx.default_device() == mx.gpu
        entry = {**self.entry(card), "size": size, "size_vram": size if gpu else 0,
                 "expires_at": "2318-01-01T00:00:00Z",  # never unloaded while served
                 "context_length": engine.context}  # fmt: skip
        return JSONResponse({"models": [entry]})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": self.core.server.ollama_version})
