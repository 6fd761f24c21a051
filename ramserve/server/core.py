"""What every API shares: one internal request type and one generation path.

Each API's adapter (``openai_api``, ``anthropic_api``, ``ollama_api``) parses its own request into a
``Generation`` and renders the engine's typed events (ramserve/output.py) in its own wire format.
Everything between is here, once: leasing the model, the chat template, tool and schema checks,
grammars, the output pipeline, submission, and the stream's end (a client that goes away cancels
its request and frees its slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from ..constrain import ConstraintError, Tool, ToolUse
from ..engine import ContextExceeded, Engine, QueueFull, SamplingParams
from ..errors import BudgetError, RamserveError
from ..output import Done, Event, Output, make_output
from ..settings import ServerSettings
from .errors import APIError
from .limits import InFlight, parse_json
from .metrics import Metrics
from .registry import NotOffered, NotReady, Registry, UnknownModel

T = TypeVar("T")

# Stop sequences a request may send (where its API sets no lower limit): each is matched against
# the text at every token.
MAX_STOPS = 16


class Strict(BaseModel):
    """A request part: unknown fields are refused, and a boolean must be JSON true or false (a lax
    "yes" or 1 would turn streaming on by accident)."""

    model_config = ConfigDict(extra="forbid")


def check_stops(stops: list[str] | None, limit: int = MAX_STOPS) -> list[str] | None:
    """A pydantic validator's check of a request's stop strings."""
    if stops and (len(stops) > limit or not all(stops)):
        raise ValueError(f"takes up to {limit} non-empty strings")
    return stops


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
    # Of a union's failed branches, the deepest names the field the client got wrong (a content
    # list's bad block, not "content: should be a string").
    first = max(e.errors(), key=lambda err: len(err["loc"]))
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


def final(events: list[Event]) -> Done:
    """The last event of a collected request; a failed generation is raised as its error."""
    last = events[-1]
    assert isinstance(last, Done)
    if last.finish_reason == "error":
        raise generation_error(last)
    return last


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# -- tools and schemas, as every API states them ------------------------------------------------


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """Refuse a schema that is not valid JSON Schema, naming where it is."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConstraintError(f"{param}: not a valid JSON schema: {e.message}", param) from e


def tool_use(tools: list[Tool], choice: Literal["none", "auto", "required"] | None,
             named: str | None = None, parallel: bool = True,
             choice_param: str = "tool_choice") -> ToolUse | None:  # fmt: skip
    """The request's tools and how they may be used, checked; None when it has none.

    Each tool's ``where`` names its schema in the request (``tools[0].function.parameters``,
    ``tools[0].input_schema``), so every refusal points at the field as the client wrote it.
    """
    if not tools:
        if named is not None or choice not in (None, "none", "auto"):
            raise ConstraintError(f"{choice_param} requires tools", choice_param)
        return None
    seen: set[str] = set()
    for t in tools:
        if t.parameters.get("type", "object") != "object":
            raise ConstraintError(f"{t.where}: a function's parameters must be an object schema",
                                  t.where)  # fmt: skip
        check_json_schema(t.parameters, t.where)
        if t.name in seen:
            at = t.where.rsplit(".", 1)[0]
            raise ConstraintError(f"{at}.name: a second tool named {t.name!r}", f"{at}.name")
        seen.add(t.name)
    if named is not None and named not in seen:
        raise ConstraintError(f"{choice_param} names {named!r}, which is not in tools",
                              choice_param)  # fmt: skip
    mode = "required" if named else choice or "auto"
    return ToolUse(tools, mode, named, parallel)


def continued(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A chat whose last turn is the assistant's (text, no calls) is continued, as Anthropic's and
    Ollama's APIs do: the turns before it, and its text, which the answer goes on from."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or last.get("tool_calls"):
        return messages, ""
    return messages[:-1], str(last.get("content") or "")


# -- the internal request -----------------------------------------------------------------------


@dataclass
class Generation:
    """One request for the engine, whichever API it came in by."""

    model: str  # a ramserve model id: name or name@budget
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None  # a chat, as chat templates take messages
    text: str | None = None  # or a raw prompt, no template
    tools: ToolUse | None = None
    schema: dict[str, Any] | None = None  # the JSON schema the answer must follow
    schema_param: str = "response_format.json_schema.schema"
    prefill: str = ""  # the assistant's turn as the client began it: the answer continues it
    top_logprobs: int = -1  # -1: none; 0: the sampled token's only
    context: int | None = None  # a smaller context than the model's, asked by the request
    clamp: bool = False  # max_tokens is a ceiling: cut to the room the context leaves
    template_args: dict[str, Any] = field(default_factory=dict)

    @property
    def offered(self) -> ToolUse | None:
        """The tools the model is shown (none under tool_choice "none")."""
        return self.tools if self.tools is not None and self.tools.choice != "none" else None


@dataclass
class Job:
    """A request made ready for the engine: its prompt, limits, output pipeline and grammar."""

    prompt: list[int]
    params: SamplingParams
    output: Output
    processors: list[Any] = field(default_factory=list)
    clamped: bool = False  # max_tokens was cut to the context's room


def prompt_of(engine: Engine, gen: Generation) -> list[int]:
    """The request's prompt tokens: the chat template (with any tools shown), or the raw text."""
    if gen.messages is None:
        return engine.encode(gen.text or "")
    offered = gen.offered
    tools = [t.openai() for t in offered.tools] if offered else None
    prompt = engine.encode_chat(gen.messages, tools=tools, **gen.template_args)
    if gen.prefill:
        prompt += engine.tokenizer.encode(gen.prefill, add_special_tokens=False)
    return prompt


def within_context(
    gen: Generation, prompt: list[int], engine: Engine
) -> tuple[SamplingParams, bool]:
    """The sampling limits within the context (the request's, never over the model's), and whether
    max_tokens was cut to the room left (``clamp``: APIs whose max_tokens is a ceiling)."""
    limit = min(gen.context or engine.context, engine.context)
    if limit == engine.context and not gen.clamp:
        return gen.params, False  # the engine refuses what does not fit
    room = limit - len(prompt)
    asked = gen.params.max_tokens
    if room <= 0 or (asked is not None and asked > room and not gen.clamp):
        more = f" + {asked} tokens to generate" if asked is not None else ""
        whose = "the request asked for" if limit < engine.context else "of this model"
        raise ContextExceeded(f"the prompt ({len(prompt)} tokens){more} exceeds the context "
                              f"of {limit} tokens {whose}")  # fmt: skip
    if asked is not None and asked <= room:
        return gen.params, False
    return dataclasses.replace(gen.params, max_tokens=room), asked is not None


def check(engine: Engine, gen: Generation) -> None:
    """Refuse tools and schemas the loaded model cannot be given or held to."""
    if gen.tools is not None:
        engine.grammars.check_tools(gen.tools)
    if gen.schema is not None:
        engine.grammars.check_schema(gen.schema, gen.schema_param)


def prepare(engine: Engine, gen: Generation, sink: Any) -> Job:
    """Check the request against the loaded model and build its prompt, grammar and output."""
    grammars = engine.grammars
    check(engine, gen)
    prompt = prompt_of(engine, gen)
    params, clamped = within_context(gen, prompt, engine)
    grammar = grammars.grammar(gen.tools, gen.schema, prompt)
    processors = [grammars.processor(*grammar)] if grammar else []
    # A constrained answer is cut by nothing but its grammar and max_tokens.
    stops = params.stop if grammar is None else []
    offered = gen.offered
    output = make_output(engine.tokenizer, prompt, sink, stops=stops,
                         chat=gen.messages is not None,
                         tools=offered.tools if offered else None,
                         top_logprobs=gen.top_logprobs)  # fmt: skip
    return Job(prompt, params, output, processors, clamped)


# -- the one generation path ----------------------------------------------------------------------


class Running:
    """A submitted request: its events as they come, and its lease on the model until it ends."""

    def __init__(self, request: Any, queue: asyncio.Queue[Event], lease: contextlib.AsyncExitStack,
                 job: Job, metrics: Metrics) -> None:  # fmt: skip
        self.request = request
        self.prompt_tokens = len(job.prompt)
        self.clamped = job.clamped
        self.queue = queue
        self.lease = lease
        self.metrics = metrics

    async def events(self) -> AsyncIterator[Event]:
        while True:
            e = await self.queue.get()
            yield e
            if isinstance(e, Done):
                return

    async def collect(self, events: AsyncIterator[Event] | None = None) -> list[Event]:
        """Every event (of ``events``, a filter of them, if given), the ``Done`` last; the lease
        ends with it."""
        try:
            return [e async for e in events or self.events()]
        except asyncio.CancelledError:
            self.request.cancel()
            raise
        finally:
            await self.lease.aclose()

    async def stream(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """``items`` (an API's rendering of the events), ending the request if the client leaves."""
        finished = False
        try:
            async for item in items:
                yield item
            finished = True
        finally:
            if not finished:
                self.request.cancel()
                self.metrics.disconnects += 1
            await self.lease.aclose()


class Core:
    """The registry, limits, metrics and key that every API's routes share."""

    def __init__(self, registry: Registry, *, api_key: str | None, server: ServerSettings) -> None:
        self.registry = registry
        self.api_key = api_key
        self.server = server
        self.in_flight = InFlight()
        self.metrics = Metrics()
        self.fingerprint = f"ramserve-{registry.name}"

    def authorize(self, request: Request) -> None:
        """The API key, as OpenAI's clients send it (Bearer) or Anthropic's (x-api-key)."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        token = token or request.headers.get("x-api-key", "").strip()
        if not token or not secrets.compare_digest(token, self.api_key):
            why = "missing API key" if not token else "incorrect API key"
            raise APIError(401, f"{why}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                           "invalid_request_error", code="invalid_api_key")  # fmt: skip

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        # The body's size was checked as it arrived (limits.BodyLimits).
        data = parse_json(await request.body(), self.server.max_json_depth)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from e

    async def count(self, gen: Generation) -> int:
        """The prompt's tokens, without generating (checked as a generation would be)."""
        async with self.registry.lease(gen.model) as engine:
            await asyncio.to_thread(check, engine, gen)
            return len(await asyncio.to_thread(prompt_of, engine, gen))

    async def start(self, gen: Generation) -> Running:
        """Lease the model, prepare the request and submit it."""
        # The lease outlives this call: the collected or streamed request's end releases it.
        lease = contextlib.AsyncExitStack()
        engine = await lease.enter_async_context(self.registry.lease(gen.model))
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Event] = asyncio.Queue()

            def sink(e: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, e)

            # Grammars compile off the event loop (the vocabulary's first use takes a second).
            job = await asyncio.to_thread(prepare, engine, gen, sink)
            request = engine.submit(job.prompt, job.params, job.output, job.processors)
        except BaseException:
            await lease.aclose()
            raise
        return Running(request, queue, lease, job, self.metrics)


class Adapter:
    """An API: its routes (path, method, handler), bound to the server's core."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def routes(self) -> list[tuple[str, str, Any]]:
        raise NotImplementedError
