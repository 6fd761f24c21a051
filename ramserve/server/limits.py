"""What a request may cost the server before any route sees it: its body's size, the bytes all
requests in flight hold together, and how deeply its JSON nests.

An ASGI middleware reads each body itself, so a refusal is a proper answer rather than a reset
connection: a body over the limit is read to its end (up to ``DRAIN_FACTOR`` times the limit, past
which the connection is closed) and answered 413. Bodies are counted from their first byte until their
response's last (a stream's end), and a request that would push the total past
``max_pending_body_bytes`` is answered 503 with Retry-After: queued requests can never hold more.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .errors import APIError, dialect_of

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_FACTOR = 4


@dataclass
class InFlight:
    """The bytes of the bodies of the requests in flight (read by ``/status``)."""

    bytes: int = 0


class BodyLimits:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_pending_bytes: int,
                 in_flight: InFlight) -> None:  # fmt: skip
        self.app = app
        self.max_body = max_body_bytes
        self.max_pending = max_pending_bytes
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, over = await self._read(scope, receive)
        if over:
            too_large = APIError(413, f"the request body is over the server's limit of "
                                      f"{self.max_body:,} bytes", code="body_too_large")  # fmt: skip
            await too_large.response(dialect_of(scope["path"]))(scope, receive, send)
            return
        if self.in_flight.bytes + len(body) > self.max_pending:
            busy = APIError(503, f"the server holds {self.in_flight.bytes:,} bytes of requests in flight, "
                                 "its limit; try again shortly", "server_error",
                            code="server_busy", headers={"Retry-After": "1"})  # fmt: skip
            await busy.response(dialect_of(scope["path"]))(scope, receive, send)
            return
        self.in_flight.bytes += len(body)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight.bytes -= len(body)

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        """The whole body, or (b"", True) once it passes the limit (the rest read and dropped)."""
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        over = declared.isdigit() and int(declared) > self.max_body
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                over, chunks = True, []
            elif not over:
                chunks.append(chunk)
            if not message.get("more_body") or seen > DRAIN_FACTOR * self.max_body:
                break
        return (b"", True) if over else (b"".join(chunks), False)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the client's disconnect, which a stream listens for

    return replay


def json_depth(data: Any) -> int:
    """How deeply a parsed JSON value nests (iteratively: a deep value must not exhaust the stack)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in value)
    return deepest


def parse_json(body: bytes, max_depth: int) -> dict[str, Any]:
    """The request's JSON object; APIError 400 for anything else, nesting past ``max_depth`` included."""
    try:
        data = json.loads(body)
    except RecursionError as e:
        raise APIError(400, f"the body's JSON nests deeper than {max_depth} levels",
                       code="invalid_json") from e  # fmt: skip
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if json_depth(data) > max_depth:
        raise APIError(400, f"the body's JSON nests deeper than {max_depth} levels",
                       code="invalid_json")  # fmt: skip
    return data
