"""The OpenAI-compatible HTTP API: chat and text completions, models, health, metrics.

Every error is the OpenAI error object with the right status, on every route, streaming included (a
fault mid-stream is sent as a ``data: {"error": ...}`` event before the stream ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..constrain import ConstraintError
from ..engine import ContextExceeded, Engine, QueueFull, SamplingParams
from ..errors import BudgetError, RamserveError
from ..output import Done, Event, Output, Reasoning, Sink, Text, TokenLogprob, ToolCall, make_output
from ..settings import ServerSettings
from .errors import APIError
from .limits import BodyLimits, InFlight, parse_json
from .metrics import Metrics
from .registry import NotOffered, NotReady, Registry, UnknownModel
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionRequest,
    Delta,
    Envelope,
    FunctionDelta,
    FunctionOut,
    LogprobContent,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ServerStatus,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)

log = logging.getLogger("ramserve.server")


# The status, type, param and code each engine or registry refusal maps to.
REFUSALS: dict[type[Exception], tuple[int, str, str | None, str]] = {
    UnknownModel: (404, "invalid_request_error", "model", "model_not_found"),
    NotOffered: (400, "invalid_request_error", "model", "variant_not_offered"),
    BudgetError: (400, "invalid_request_error", "model", "invalid_budget"),
    ContextExceeded: (400, "invalid_request_error", "messages", "context_length_exceeded"),
    QueueFull: (503, "server_error", None, "queue_full"),
    NotReady: (503, "server_error", None, "model_not_ready"),
    ConstraintError: (400, "invalid_request_error", None, "invalid_request"),
}


def api_error(e: Exception) -> APIError:
    for cls, (status, type_, param, code) in REFUSALS.items():
        if isinstance(e, cls):
            headers = {"Retry-After": "1"} if status == 503 else None
            return APIError(status, str(e), type_, getattr(e, "param", param), code, headers)
    if isinstance(e, RamserveError):
        return APIError(400, str(e), code="invalid_request")
    return APIError(
        500, f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error"
    )


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])[1:] or None
    if first["type"] == "extra_forbidden":
        message = f"unsupported field {param!r}: ramserve does not implement it"
        return APIError(400, message, param=param, code="unsupported_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return APIError(
        400, f"{param}: {message}" if param else message, param=param, code=first["type"]
    )


def generation_error(e: Done) -> APIError:
    return APIError(500, e.error or "generation failed", "server_error", code="internal_error")


def error_event(e: Done) -> dict[str, str]:
    """A fault mid-stream, sent as its own event before the stream ends."""
    return {"data": json.dumps(generation_error(e).body())}


def _usage(e: Done) -> Usage:
    return Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                 total_tokens=e.prompt_tokens + e.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=e.cached_tokens))  # fmt: skip


def _chat_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return ChoiceLogprobs(content=[
        LogprobContent(**item(e.token, e.logprob),
                       top_logprobs=[TopLogprob(**item(t, v)) for t, v in e.top])
        for e in entries])  # fmt: skip


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> TextLogprobs:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return TextLogprobs(tokens=[e.token for e in entries],
                        token_logprobs=[e.logprob for e in entries],
                        top_logprobs=[dict(e.top) for e in entries], text_offset=offsets)  # fmt: skip


class API:
    """The routes, bound to a registry, its metrics and the server's options."""

    def __init__(self, registry: Registry, *, api_key: str | None, server: ServerSettings) -> None:
        self.registry = registry
        self.api_key = api_key
        self.server = server
        self.in_flight = InFlight()
        self.metrics = Metrics()
        self.fingerprint = f"ramserve-{registry.name}"

    # -- plumbing -----------------------------------------------------------------------------

    def route(self, path: str, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
              ) -> Callable[[Request], Awaitable[Response]]:  # fmt: skip
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self.authorize(request)
                response = await handler(request)
            except APIError as e:
                response = e.response()
            except Exception as e:
                if not isinstance(e, RamserveError):
                    log.exception("internal error on %s", request.url.path)
                response = api_error(e).response()
            self.metrics.count(path, response.status_code)
            return response

        return endpoint

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or not secrets.compare_digest(token, self.api_key):
            why = "missing API key" if not token else "incorrect API key"
            raise APIError(401, f"{why}: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", code="invalid_api_key")  # fmt: skip

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        # The body's size was checked as it arrived (limits.BodyLimits).
        data = parse_json(await request.body(), self.server.max_json_depth)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from e

    # -- models, health, metrics --------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        cards = [ModelCard(**c) for c in self.registry.cards()]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def get_model(self, request: Request) -> Response:
        card = self.registry.card_for(request.path_params["model"])
        return JSONResponse(ModelCard(**card).model_dump())

    async def health(self, request: Request) -> Response:
        r = self.registry
        body = {"status": "ok" if r.ready else r.stage, "stage": r.stage, "model": r.name}
        if r.error:
            body["error"] = r.error
        return JSONResponse(
            body, 200 if r.ready else 503, headers=None if r.ready else {"Retry-After": "2"}
        )

    async def status(self, request: Request) -> Response:
        import os

        import mlx.core as mx
        import psutil

        r, engine = self.registry, self.registry.engine
        st = ServerStatus(
            pid=os.getpid(), model=r.loaded_id, folder=str(r.folder), stage=r.stage,
            uptime_s=time.time() - r.created,
            weight_bytes=engine.weight_bytes() if engine else None,
            mlx_active_bytes=mx.get_active_memory(), mlx_peak_bytes=mx.get_peak_memory(),
            rss_bytes=psutil.Process().memory_info().rss,
            context=engine.context if engine else None,
            parallel=engine.parallel if engine else None,
            active=engine.active if engine else 0, queued=engine.queue_depth if engine else 0,
            queue_size=engine.queue_size if engine else None,
            pending_body_bytes=self.in_flight.bytes,
        )  # fmt: skip
        return JSONResponse(st.model_dump())

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.registry.engine),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    # -- completions --------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body: ChatRequest = await self.parse(request, ChatRequest)
        params = body.sampling()
        use, schema, messages = body.tool_use(), body.answer_schema(), body.template_messages()
        offered = use if use is not None and use.choice != "none" else None

        def prepare(engine: Engine, sink: Sink) -> Job:
            if use is not None:
                engine.grammars.check_tools(use)
            if schema is not None:
                engine.grammars.check_schema(schema, "response_format.json_schema.schema")
            tools = [t.openai() for t in offered.tools] if offered else None
            prompt = engine.encode_chat(messages, tools=tools)
            grammar = engine.grammars.grammar(use, schema, prompt)
            processors = [engine.grammars.processor(*grammar)] if grammar else []
            # A constrained answer is cut by nothing but its grammar and max_tokens.
            stops = params.stop if grammar is None else []
            output = make_output(engine.tokenizer, prompt, sink, stops=stops, chat=True,
                                 tools=offered.tools if offered else None,
                                 top_logprobs=body.top_logprobs if body.logprobs else -1)  # fmt: skip
            return Job(prompt, output, processors)

        return await self.generate(body, params, prepare, chat=True)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        params = body.sampling()

        def prepare(engine: Engine, sink: Sink) -> Job:
            prompt = engine.encode(body.text())
            top = params.top_logprobs if params.logprobs else -1
            return Job(prompt, make_output(engine.tokenizer, prompt, sink, stops=params.stop,
                                           top_logprobs=top))  # fmt: skip

        return await self.generate(body, params, prepare, chat=False)

    async def generate(self, body: Any, params: SamplingParams,
                       prepare: Callable[[Engine, Sink], Job], *, chat: bool) -> Response:  # fmt: skip
        """The one generation path: lease the model, prepare the request, stream or collect."""
        # The lease outlives this call when streaming: the stream's end releases it.
        lease = contextlib.AsyncExitStack()
        engine = await lease.enter_async_context(self.registry.lease(body.model))
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Event] = asyncio.Queue()

            def sink(e: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, e)

            # Grammars compile off the event loop (the vocabulary's first use takes a second).
            job = await asyncio.to_thread(prepare, engine, sink)
            request = engine.submit(job.prompt, params, job.output, job.processors)
        except BaseException:
            await lease.aclose()
            raise
        head = Envelope(id=("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                        created=int(time.time()), model=body.model,
                        system_fingerprint=self.fingerprint)  # fmt: skip

        async def events() -> AsyncIterator[Event]:
            while True:
                e = await queue.get()
                yield e
                if isinstance(e, Done):
                    return

        if body.stream:
            gen = (stream_chat if chat else stream_text)(head, body, events())

            async def guarded() -> AsyncIterator[dict[str, str]]:
                finished = False
                try:
                    async for item in gen:
                        yield item
                    finished = True
                finally:
                    if not finished:
                        request.cancel()
                        self.metrics.disconnects += 1
                    await lease.aclose()

            return EventSourceResponse(guarded(), ping=15)
        try:
            collected = [e async for e in events()]
        except asyncio.CancelledError:
            request.cancel()
            raise
        finally:
            await lease.aclose()
        out = (chat_completion if chat else text_completion)(head, params, collected)
        return JSONResponse(out.model_dump(exclude_none=False))


@dataclass
class Job:
    """A request made ready for the engine: its prompt, output pipeline and grammar, if any."""

    prompt: list[int]
    output: Output
    processors: list[Any] = field(default_factory=list)


def _done(events: list[Event]) -> Done:
    last = events[-1]
    assert isinstance(last, Done)
    if last.finish_reason == "error":
        raise generation_error(last)
    return last


def _tool_call(e: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=e.id, function=FunctionOut(name=e.name, arguments=e.arguments))


def chat_completion(head: Envelope, params: SamplingParams, events: list[Event]) -> ChatCompletion:
    done = _done(events)
    texts = [e for e in events if isinstance(e, Text)]
    calls = [_tool_call(e) for e in events if isinstance(e, ToolCall)]
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    content = "".join(e.text for e in texts)
    message = AssistantMessage(content=content or (None if calls else ""),
                               reasoning_content=reasoning or None, tool_calls=calls or None)  # fmt: skip
    entries = [x for e in texts for x in e.logprobs]
    choice = ChatChoice(message=message, finish_reason=done.finish_reason,
                        logprobs=_chat_logprobs(entries) if params.logprobs else None)  # fmt: skip
    return ChatCompletion(**head.model_dump(), choices=[choice], usage=_usage(done))


def text_completion(head: Envelope, params: SamplingParams, events: list[Event]) -> TextCompletion:
    done = _done(events)
    texts = [e for e in events if isinstance(e, Text)]
    entries = [x for e in texts for x in e.logprobs]
    choice = TextChoice(text="".join(e.text for e in texts), finish_reason=done.finish_reason,
                        logprobs=_text_logprobs(entries, 0) if params.logprobs else None)  # fmt: skip
    return TextCompletion(**head.model_dump(), choices=[choice], usage=_usage(done))


def _chat_deltas(e: Event, logprobs: bool) -> list[ChunkChoice]:
    """The chunk choices one event becomes; a tool call sends its name first, then its arguments."""
    if isinstance(e, Text):
        lp = _chat_logprobs(e.logprobs) if logprobs and e.logprobs else None
        return [ChunkChoice(delta=Delta(content=e.text), logprobs=lp)]
    if isinstance(e, Reasoning):
        return [ChunkChoice(delta=Delta(reasoning_content=e.text))]
    if isinstance(e, ToolCall):
        name = ToolCallDelta(index=e.index, id=e.id, type="function",
                             function=FunctionDelta(name=e.name, arguments=""))  # fmt: skip
        args = ToolCallDelta(index=e.index, function=FunctionDelta(arguments=e.arguments))
        return [ChunkChoice(delta=Delta(tool_calls=[name])),
                ChunkChoice(delta=Delta(tool_calls=[args]))]  # fmt: skip
    return []


async def stream_chat(head: Envelope, body: ChatRequest, events: AsyncIterator[Event]
                      ) -> AsyncIterator[dict[str, str]]:  # fmt: skip
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, str]:
        c = ChatCompletionChunk(**head.model_dump(), choices=choices, usage=usage)
        return {"data": c.model_dump_json(exclude_none=usage is None and bool(choices))}

    # The role alone: whether content or tool calls follow is not known yet.
    yield chunk([ChunkChoice(delta=Delta(role="assistant"))])
    async for e in events:
        if isinstance(e, Done):
            if e.finish_reason == "error":
                yield error_event(e)
                return
            yield chunk([ChunkChoice(delta=Delta(), finish_reason=e.finish_reason)])
            if body.include_usage:
                yield chunk([], _usage(e))
        for choice in _chat_deltas(e, body.logprobs):
            yield chunk([choice])
    yield {"data": "[DONE]"}


async def stream_text(head: Envelope, body: CompletionRequest, events: AsyncIterator[Event]
                      ) -> AsyncIterator[dict[str, str]]:  # fmt: skip
    def chunk(choices: list[TextChoice], usage: Usage | None = None) -> dict[str, str]:
        return {
            "data": TextCompletion(
                **head.model_dump(), choices=choices, usage=usage
            ).model_dump_json()
        }

    offset = 0
    async for e in events:
        if isinstance(e, Text):
            lp = _text_logprobs(e.logprobs, offset) if body.logprobs is not None else None
            offset += len(e.text)
            yield chunk([TextChoice(text=e.text, logprobs=lp)])
        elif isinstance(e, Done):
            if e.finish_reason == "error":
                yield error_event(e)
                return
            yield chunk([TextChoice(text="", finish_reason=e.finish_reason)])
            if body.include_usage:
                yield chunk([], _usage(e))
    yield {"data": "[DONE]"}


def create_app(registry: Registry, server: ServerSettings, *, api_key: str | None = None,
               allow_origin: list[str] | None = None) -> Starlette:  # fmt: skip
    api = API(registry, api_key=api_key, server=server)
    routes = [
        Route(path, api.route(path, handler, auth=auth), methods=[method])
        for path, method, handler, auth in (
            ("/v1/chat/completions", "POST", api.chat, True),
            ("/v1/completions", "POST", api.completions, True),
            ("/v1/models", "GET", api.list_models, True),
            ("/v1/models/{model:path}", "GET", api.get_model, True),
            ("/status", "GET", api.status, True),
            ("/health", "GET", api.health, False),
            ("/metrics", "GET", api.metrics_text, False),
        )
    ]
    middleware = [Middleware(BodyLimits, max_body_bytes=server.max_body_bytes,
                             max_pending_bytes=server.max_pending_body_mb << 20,
                             in_flight=api.in_flight)]  # fmt: skip
    if allow_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=allow_origin,
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))  # fmt: skip

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        err = APIError(status, message, code="not_found" if status == 404 else "method_not_allowed")
        return err.response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            await asyncio.to_thread(registry.close)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})  # fmt: skip
    app.state.api = api
    return app
