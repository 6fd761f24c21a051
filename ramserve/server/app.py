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
from typing import Any

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..engine import ContextExceeded, Engine, Event, QueueFull, SamplingParams, TokenLogprob
from ..errors import BudgetError, RamserveError
from .metrics import Metrics
from .registry import NotReady, Registry, UnknownModel
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
    LogprobContent,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TopLogprob,
    Usage,
)

log = logging.getLogger("ramserve.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


# The status, type, param and code each engine or registry refusal maps to.
REFUSALS: dict[type[Exception], tuple[int, str, str | None, str]] = {
    UnknownModel: (404, "invalid_request_error", "model", "model_not_found"),
    BudgetError: (400, "invalid_request_error", "model", "invalid_budget"),
    ContextExceeded: (400, "invalid_request_error", "messages", "context_length_exceeded"),
    QueueFull: (503, "server_error", None, "queue_full"),
    NotReady: (503, "server_error", None, "model_not_ready"),
}


def api_error(e: Exception) -> APIError:
    for cls, (status, type_, param, code) in REFUSALS.items():
        if isinstance(e, cls):
            headers = {"Retry-After": "1"} if status == 503 else None
            return APIError(status, str(e), type_, param, code, headers)
    if isinstance(e, RamserveError):
        return APIError(400, str(e), code="invalid_request")
    return APIError(
        500, f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error"
    )


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"unsupported field {param!r}: ramserve does not implement it"
        return APIError(400, message, param=param, code="unsupported_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return APIError(
        400, f"{param}: {message}" if param else message, param=param, code=first["type"]
    )


def generation_error(e: Event) -> APIError:
    return APIError(500, e.error or "generation failed", "server_error", code="internal_error")


def error_event(e: Event) -> dict[str, str]:
    """A fault mid-stream, sent as its own event before the stream ends."""
    return {"data": json.dumps(generation_error(e).body())}


def _usage(e: Event) -> Usage:
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

    def __init__(self, registry: Registry, *, api_key: str | None, max_body_bytes: int) -> None:
        self.registry = registry
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
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
                response = JSONResponse(e.body(), e.status, headers=e.headers)
            except Exception as e:
                if not isinstance(e, RamserveError):
                    log.exception("internal error on %s", request.url.path)
                err = api_error(e)
                response = JSONResponse(err.body(), err.status, headers=err.headers)
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
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(
                413, f"request body over {self.max_body_bytes} bytes", code="body_too_large"
            )
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise APIError(
                413, f"request body over {self.max_body_bytes} bytes", code="body_too_large"
            )
        try:
            data = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
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

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.registry.engine),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    # -- completions --------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body: ChatRequest = await self.parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await self.generate(body, body.sampling(), chat=True,
                                   encode=lambda e: e.encode_chat(messages))  # fmt: skip

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        return await self.generate(body, body.sampling(), chat=False,
                                   encode=lambda e: e.encode(body.text()))  # fmt: skip

    async def generate(self, body: Any, params: SamplingParams, *, chat: bool,
                       encode: Callable[[Engine], list[int]]) -> Response:  # fmt: skip
        # The lease outlives this call when streaming: the stream's end releases it.
        lease = contextlib.AsyncExitStack()
        engine = await lease.enter_async_context(self.registry.lease(body.model))
        try:
            prompt = encode(engine)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Event] = asyncio.Queue()

            def sink(e: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, e)

            job = engine.submit(prompt, params, sink)
        except BaseException:
            await lease.aclose()
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())

        async def events() -> AsyncIterator[Event]:
            while True:
                e = await queue.get()
                yield e
                if e.finish_reason is not None:
                    return

        if body.stream:
            stream = self.stream_chat if chat else self.stream_text
            gen = stream(rid, created, body, events())

            async def guarded() -> AsyncIterator[dict[str, str]]:
                finished = False
                try:
                    async for item in gen:
                        yield item
                    finished = True
                finally:
                    if not finished:
                        job.cancel()
                        self.metrics.disconnects += 1
                    await lease.aclose()

            return EventSourceResponse(guarded(), ping=15)
        try:
            collected = [e async for e in events()]
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            await lease.aclose()
        last = collected[-1]
        if last.finish_reason == "error":
            raise generation_error(last)
        text = "".join(e.text for e in collected)
        entries = [x for e in collected for x in e.logprobs]
        usage = _usage(last)
        if chat:
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason,
                                logprobs=_chat_logprobs(entries) if params.logprobs else None)  # fmt: skip
            out: BaseModel = ChatCompletion(id=rid, created=created, model=body.model,
                                            system_fingerprint=self.fingerprint, choices=[choice],
                                            usage=usage)  # fmt: skip
        else:
            choice_t = TextChoice(text=text, finish_reason=last.finish_reason,
                                  logprobs=_text_logprobs(entries, 0) if params.logprobs else None)  # fmt: skip
            out = TextCompletion(id=rid, created=created, model=body.model,
                                 system_fingerprint=self.fingerprint, choices=[choice_t], usage=usage)  # fmt: skip
        return JSONResponse(out.model_dump(exclude_none=False))

    async def stream_chat(self, rid: str, created: int, body: ChatRequest, events: AsyncIterator[Event]
                          ) -> AsyncIterator[dict[str, str]]:  # fmt: skip
        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, str]:
            c = ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices,
                                    system_fingerprint=self.fingerprint, usage=usage)  # fmt: skip
            return {"data": c.model_dump_json(exclude_none=usage is None and bool(choices))}

        yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
        async for e in events:
            if e.finish_reason == "error":
                yield error_event(e)
                return
            lp = _chat_logprobs(e.logprobs) if body.logprobs and e.logprobs else None
            if e.text or lp:
                yield chunk([ChunkChoice(delta=Delta(content=e.text), logprobs=lp)])
            if e.finish_reason is not None:
                yield chunk([ChunkChoice(delta=Delta(), finish_reason=e.finish_reason)])
                if body.include_usage:
                    yield chunk([], _usage(e))
        yield {"data": "[DONE]"}

    async def stream_text(self, rid: str, created: int, body: CompletionRequest,
                          events: AsyncIterator[Event]) -> AsyncIterator[dict[str, str]]:  # fmt: skip
        def chunk(choices: list[TextChoice], usage: Usage | None = None) -> dict[str, str]:
            c = TextCompletion(id=rid, created=created, model=body.model, choices=choices,
                               system_fingerprint=self.fingerprint, usage=usage)  # fmt: skip
            return {"data": c.model_dump_json()}

        offset = 0
        async for e in events:
            if e.finish_reason == "error":
                yield error_event(e)
                return
            lp = _text_logprobs(e.logprobs, offset) if body.logprobs is not None else None
            offset += len(e.text)
            if e.text or e.finish_reason:
                yield chunk([TextChoice(text=e.text, logprobs=lp, finish_reason=e.finish_reason)])
            if e.finish_reason is not None and body.include_usage:
                yield chunk([], _usage(e))
        yield {"data": "[DONE]"}


def create_app(registry: Registry, *, api_key: str | None = None, allow_origin: list[str] | None = None,
               max_body_bytes: int = 4 << 20) -> Starlette:  # fmt: skip
    api = API(registry, api_key=api_key, max_body_bytes=max_body_bytes)
    routes = [
        Route(path, api.route(path, handler, auth=auth), methods=[method])
        for path, method, handler, auth in (
            ("/v1/chat/completions", "POST", api.chat, True),
            ("/v1/completions", "POST", api.completions, True),
            ("/v1/models", "GET", api.list_models, True),
            ("/v1/models/{model:path}", "GET", api.get_model, True),
            ("/health", "GET", api.health, False),
            ("/metrics", "GET", api.metrics_text, False),
        )
    ]
    middleware = []
    if allow_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=allow_origin,
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))  # fmt: skip

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        err = APIError(status, message, code="not_found" if status == 404 else "method_not_allowed")
        return JSONResponse(err.body(), status)

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
