"""The HTTP app: three APIs over one engine, and the server's own routes (the web page, status,
health, metrics).

The OpenAI (``/v1/chat/completions``...), Anthropic (``/v1/messages``) and Ollama (``/api/...``)
adapters each bring their routes; every route shares the core's API key, body limits, queue,
metrics and budget variants, and answers errors in its own API's shape (server/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import RamserveError
from ..settings import ServerSettings
from .anthropic_api import Anthropic
from .core import Core, api_error
from .errors import APIError, Dialect, dialect_of
from .limits import BodyLimits
from .ollama_api import Ollama
from .openai_api import OpenAI
from .registry import Registry
from .schemas import ServerStatus, StepOut
from .web import PAGE, Page

log = logging.getLogger("ramserve.server")

Handler = Callable[[Request], Awaitable[Response]]


class API:
    """The routes of every API, bound to one core."""

    def __init__(self, registry: Registry, *, api_key: str | None, server: ServerSettings) -> None:
        self.core = Core(registry, api_key=api_key, server=server)
        self.openai = OpenAI(self.core)
        self.anthropic = Anthropic(self.core)
        self.ollama = Ollama(self.core)
        self.page = Page(registry)

    def route(self, path: str, handler: Handler, *, auth: bool = True) -> Handler:
        dialect: Dialect = dialect_of(path)

        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self.core.authorize(request)
                response = await handler(request)
            except APIError as e:
                response = e.response(dialect)
            except Exception as e:
                if not isinstance(e, RamserveError):
                    log.exception("internal error on %s", request.url.path)
                response = api_error(e).response(dialect)
            self.core.metrics.count(path, response.status_code)
            return response

        return endpoint

    def routes(self) -> list[tuple[str, str, Handler, bool]]:
        own = [
            ("/", "GET", self.page.index, False),  # HEAD too (Starlette adds it to GET routes)
            ("/fit", "GET", self.page.fit, True),
            ("/v1/models", "GET", self.list_models, True),
            ("/status", "GET", self.status, True),
            ("/health", "GET", self.health, False),
            ("/metrics", "GET", self.metrics_text, False),
        ]
        apis = [*self.openai.routes(), *self.anthropic.routes(), *self.ollama.routes()]
        return own + [(path, method, handler, True) for path, method, handler in apis]

    async def list_models(self, request: Request) -> Response:
        # One path, two APIs: Anthropic's clients say which they speak in a header.
        if "anthropic-version" in request.headers:
            return await self.anthropic.list_models(request)
        return await self.openai.list_models(request)

    async def health(self, request: Request) -> Response:
        r = self.core.registry
        body = {"status": "ok" if r.ready else r.stage, "stage": r.stage, "model": r.name}
        if r.error:
            body["error"] = r.error
        return JSONResponse(
            body, 200 if r.ready else 503, headers=None if r.ready else {"Retry-After": "2"}
        )

    async def status(self, request: Request) -> Response:
        import mlx.core as mx
        import psutil

        r, engine = self.core.registry, self.core.registry.engine
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
            pending_body_bytes=self.core.in_flight.bytes,
            generated_tokens=engine.stats.generated_tokens if engine else 0,
            tokens_per_second=engine.stats.decode_rate if engine else 0.0,
            progress=StepOut(**asdict(r.progress), fraction=r.progress.fraction)
            if r.progress else None,
        )  # fmt: skip
        return JSONResponse(st.model_dump())

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.core.metrics.render(self.core.registry.engine),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip


def create_app(registry: Registry, server: ServerSettings, *, api_key: str | None = None,
               allow_origin: list[str] | None = None) -> Starlette:  # fmt: skip
    api = API(registry, api_key=api_key, server=server)
    routes: list[BaseRoute] = [Route(path, api.route(path, handler, auth=auth), methods=[method])
                               for path, method, handler, auth in api.routes()]  # fmt: skip
    routes.append(Mount("/ui", StaticFiles(directory=PAGE), name="ui"))  # the page's files
    middleware = [Middleware(BodyLimits, max_body_bytes=server.max_body_bytes,
                             max_pending_bytes=server.max_pending_body_mb << 20,
                             in_flight=api.core.in_flight)]  # fmt: skip
    if allow_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=allow_origin,
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))  # fmt: skip

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        path = request.url.path
        message = f"method not allowed on {path}" if status == 405 else f"no route {path}"
        if status == 404 and dialect_of(path) == "ollama":
            message += " (ramserve serves /api/chat, generate, tags, show, ps and version)"
        err = APIError(status, message, code="not_found" if status == 404 else "method_not_allowed")
        return err.response(dialect_of(path))

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
