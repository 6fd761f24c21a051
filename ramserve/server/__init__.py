"""The OpenAI-compatible HTTP server: ``serve`` runs it under uvicorn."""

from __future__ import annotations

from typing import Any

from ..settings import ServerSettings


def serve(registry: Any, server: ServerSettings, *, host: str, port: int,
          api_key: str | None = None, allow_origin: list[str] | None = None) -> None:  # fmt: skip
    """Serve ``registry``'s models on host:port until interrupted."""
    import uvicorn

    from .app import create_app

    app = create_app(registry, server, api_key=api_key, allow_origin=allow_origin)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
