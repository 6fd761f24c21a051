"""The error every route answers a refusal with, in the shape of the API the request came in by.

One ``APIError`` carries the status, message and OpenAI's ``type``/``param``/``code``; each API
renders it its own way (its *dialect*), chosen by the request's path, so a refusal raised anywhere
(the body limits, the parser, the engine) reaches each client in the shape its library reads:

- OpenAI: ``{"error": {"message", "type", "param", "code"}}``;
- Anthropic: ``{"type": "error", "error": {"type", "message"}}``, its types by status, 529 for
  an overloaded server;
- Ollama: ``{"error": "message"}``.
"""

from __future__ import annotations

from typing import Any, Literal

from starlette.responses import JSONResponse

Dialect = Literal["openai", "anthropic", "ollama"]

# Anthropic's error type for each status (its API reference, "Errors").
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def dialect_of(path: str) -> Dialect:
    """The API a path belongs to."""
    if path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


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

    def body(self, dialect: Dialect = "openai") -> dict[str, Any]:
        if dialect == "ollama":
            return {"error": self.message}
        if dialect == "anthropic":
            kind = ANTHROPIC_TYPES.get(self.status_in(dialect), "api_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def status_in(self, dialect: Dialect) -> int:
        # Anthropic's clients read 529 as "overloaded, retry": a full queue or a loading model.
        return 529 if dialect == "anthropic" and self.status == 503 else self.status

    def response(self, dialect: Dialect = "openai") -> JSONResponse:
        return JSONResponse(self.body(dialect), self.status_in(dialect), headers=self.headers)
