"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), as coding agents
such as Claude Code speak it.

The request's content blocks become the chat template's messages (``tool_use`` blocks an
assistant's tool calls, ``tool_result`` blocks tool turns); a last assistant turn is continued, as
Anthropic's API does. The engine's events come back as content blocks (``thinking``, ``text``,
``tool_use``) and, streamed, as Anthropic's event sequence: ``message_start``, per block
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta`` with the stop reason and usage,
``message_stop``, with ``ping`` keep-alives.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..constrain import ConstraintError, Tool, ToolUse
from ..engine import SamplingParams
from ..output import Done, Event, Reasoning, Text, ToolCall
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
    new_id,
    tool_use,
)


class Block(Strict):
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here


class TextBlock(Block):
    type: Literal["text"]
    text: str
    citations: list[Any] | None = None


class MediaBlock(BaseModel):
    """Images, documents and search results: refused by name (ramserve serves text models)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "search_result"]


class ToolUseBlock(Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    # What Anthropic's responses carry besides, so an answer can be sent back as it came.
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class ToolResultBlock(Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | MediaBlock] = ""
    is_error: StrictBool = False


class ThinkingBlock(Block):
    """Earlier thinking sent back by the client; not part of the prompt (templates drop it too)."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""
    signature: str = ""
    data: str = ""


Content = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | MediaBlock,
    Field(discriminator="type"),
]


class MessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Content]

    def blocks(self) -> list[Any]:
        return (
            [TextBlock(type="text", text=self.content)]
            if isinstance(self.content, str)
            else self.content
        )


class ToolIn(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: StrictBool | None = None  # the schema is always enforced
    eager_input_streaming: StrictBool | None = None  # a call's input is streamed when complete
    input_examples: list[dict[str, Any]] | None = None  # not shown to the model


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is given exactly when type is 'tool'")
        return self


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # no effect here
    format: OutputFormat | None = None


class Metadata(Strict):
    user_id: str | None = None


class CountRequest(Strict):
    """What ``count_tokens`` takes: the parts of a request that make the prompt."""

    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here

    def tool_use(self) -> ToolUse | None:
        c = self.tool_choice
        tools = [Tool(t.name, t.input_schema, t.description, f"tools[{i}].input_schema")
                 for i, t in enumerate(self.tools or [])]  # fmt: skip
        modes: dict[str, Literal["none", "auto", "required"]] = {
            "auto": "auto", "any": "required", "tool": "required", "none": "none"}  # fmt: skip
        return tool_use(tools, modes[c.type] if c else None, c.name if c else None,
                        not (c and c.disable_parallel_tool_use))  # fmt: skip

    def generation(self, params: SamplingParams) -> Generation:
        messages, prefill = template_messages(self.system, self.messages)
        args = {"enable_thinking": self.thinking.type != "disabled"} if self.thinking else {}
        fmt = self.output_config.format if self.output_config else None
        schema = fmt.schema_ if fmt else None
        if schema is not None:
            check_json_schema(schema, "output_config.format.schema")
        return Generation(self.model, params, messages=messages, tools=self.tool_use(),
                          schema=schema, schema_param="output_config.format.schema",
                          prefill=prefill, template_args=args, clamp=True)  # fmt: skip


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=0)  # 0: fill the prompt cache, answer nothing
    stop_sequences: list[str] | None = None
    # Sampling, as older clients and other apps still send it.
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: StrictBool = False
    # Accounting and routing hints of Anthropic's service: accepted, no effect on one machine.
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard", "fast"] | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        return check_stops(v)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or 1, temperature=self.temperature,
                              top_p=self.top_p or 1.0, top_k=self.top_k or 0,
                              stop=list(self.stop_sequences or []))  # fmt: skip


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, b in enumerate(content):
        if isinstance(b, MediaBlock):
            _refuse_media(b, f"{where}[{j}]")
    return "".join(b.text for b in content)


def _refuse_media(block: MediaBlock, where: str) -> None:
    raise ConstraintError(f"{where}: {block.type} blocks are not supported: ramserve serves "
                          "text-only models", where)  # fmt: skip


def template_messages(system: str | list[TextBlock] | None, messages: list[MessageIn]
                      ) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """The chat template's messages, and the text of a last assistant turn to continue (if any)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, m in enumerate(messages):
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(m.blocks()):
            where = f"messages[{i}].content[{j}]"
            if isinstance(b, MediaBlock):
                _refuse_media(b, where)
            elif isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ThinkingBlock):
                continue
            elif (m.role == "user") != isinstance(b, ToolResultBlock):
                owner = "an assistant" if m.role == "user" else "a user"
                raise ConstraintError(f"{where}: a {b.type} block belongs in {owner} message",
                                      where)  # fmt: skip
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": b.input}})  # fmt: skip
            elif isinstance(b, ToolResultBlock):
                result = _text(b.content, f"{where}.content")
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {result}" if b.is_error else result})  # fmt: skip
        if m.role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts),
                        **({"tool_calls": calls} if calls else {})})  # fmt: skip
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    out, prefill = continued(out)
    if prefill != prefill.rstrip():
        where = f"messages[{len(messages) - 1}].content"
        raise ConstraintError(f"{where}: a final assistant turn cannot end with whitespace", where)
    return out, prefill


# -- responses ---------------------------------------------------------------------------------


def stop_reason(done: Done, clamped: bool) -> str:
    if done.finish_reason == "length":
        # max_tokens is a ceiling: a request that asked past the context stops at its end
        return "model_context_window_exceeded" if clamped else "max_tokens"
    if done.finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if done.stop_sequence else "end_turn"


def usage(done: Done) -> dict[str, int]:
    # Anthropic counts cache reads apart from input tokens: the prompt is their sum.
    return {"input_tokens": done.prompt_tokens - done.cached_tokens,
            "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens,
            "cache_creation_input_tokens": 0}  # fmt: skip


def content_blocks(events: list[Event]) -> list[dict[str, Any]]:
    """The answer's blocks in order: thinking, text and tool calls, adjacent pieces joined."""
    blocks: list[dict[str, Any]] = []
    for e in events:
        kind = block_kind(e)
        if kind is None:
            continue
        if kind in ("text", "thinking") and blocks and blocks[-1]["type"] == kind:
            blocks[-1][kind] += e.text  # type: ignore[union-attr]
        else:
            blocks.append(start_block(e))
            if kind != "tool_use":
                blocks[-1][kind] = e.text  # type: ignore[union-attr]
    return blocks


def block_kind(e: Event) -> str | None:
    return {Text: "text", Reasoning: "thinking", ToolCall: "tool_use"}.get(type(e))


def start_block(e: Event) -> dict[str, Any]:
    """A block as ``content_block_start`` opens it (a tool call whole, as the message has it)."""
    if isinstance(e, ToolCall):
        return {"type": "tool_use", "id": e.id, "name": e.name, "input": json.loads(e.arguments)}
    if isinstance(e, Reasoning):
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def message(head: dict[str, Any], events: list[Event], clamped: bool) -> dict[str, Any]:
    done = final(events)
    return {**head, "content": content_blocks(events), "stop_reason": stop_reason(done, clamped),
            "stop_sequence": done.stop_sequence, "usage": usage(done)}  # fmt: skip


def sse(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": kind, "data": json.dumps({"type": kind, **data})}


async def stream_message(head: dict[str, Any], running: Running, events: AsyncIterator[Event]
                         ) -> AsyncIterator[dict[str, str]]:  # fmt: skip
    start_usage = {"input_tokens": running.prompt_tokens, "output_tokens": 0}
    yield sse("message_start", {"message": {**head, "content": [], "stop_reason": None,
                                            "stop_sequence": None, "usage": start_usage}})  # fmt: skip
    yield sse("ping", {})
    index, open_kind = -1, None
    async for e in events:
        if isinstance(e, Done):
            if e.finish_reason == "error":
                err = generation_error(e)
                yield {"event": "error", "data": json.dumps(err.body("anthropic"))}
                return
            if open_kind is not None:
                yield sse("content_block_stop", {"index": index})
            yield sse("message_delta", {"delta": {"stop_reason": stop_reason(e, running.clamped),
                                                  "stop_sequence": e.stop_sequence},
                                        "usage": usage(e)})  # fmt: skip
            yield sse("message_stop", {})
            return
        kind = block_kind(e)
        if kind is None:
            continue
        if kind != open_kind or kind == "tool_use":
            if open_kind is not None:
                yield sse("content_block_stop", {"index": index})
            index, open_kind = index + 1, kind
            block = start_block(e)
            if kind == "tool_use":
                block["input"] = {}  # the arguments follow as JSON deltas
            yield sse("content_block_start", {"index": index, "content_block": block})
        if isinstance(e, ToolCall):
            delta = {"type": "input_json_delta", "partial_json": e.arguments}
        elif isinstance(e, Reasoning):
            delta = {"type": "thinking_delta", "thinking": e.text}
        else:
            delta = {"type": "text_delta", "text": e.text}
        yield sse("content_block_delta", {"index": index, "delta": delta})


async def prompt_only(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """``max_tokens`` 0: the prompt fills the cache; the one token that took is not the answer."""
    async for e in events:
        if isinstance(e, Done):
            failed = e.finish_reason == "error"
            yield dataclasses.replace(e, completion_tokens=0,
                                      finish_reason="error" if failed else "length")  # fmt: skip
            return


def _ping() -> ServerSentEvent:
    return ServerSentEvent(event="ping", data=json.dumps({"type": "ping"}))


class Anthropic(Adapter):
    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("/v1/messages", "POST", self.messages),
            ("/v1/messages/count_tokens", "POST", self.count_tokens),
        ]

    async def messages(self, request: Request) -> Response:
        body: MessagesRequest = await self.core.parse(request, MessagesRequest)
        running = await self.core.start(body.generation(body.sampling()))
        head = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": body.model}
        events = running.events() if body.max_tokens else prompt_only(running.events())
        if body.stream:
            chunks = stream_message(head, running, events)
            return EventSourceResponse(running.stream(chunks), ping=10, ping_message_factory=_ping)
        return JSONResponse(message(head, await running.collect(events), running.clamped))

    async def count_tokens(self, request: Request) -> Response:
        body: CountRequest = await self.core.parse(request, CountRequest)
        return JSONResponse(
            {"input_tokens": await self.core.count(body.generation(SamplingParams()))}
        )

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models`` in Anthropic's shape (its clients send ``anthropic-version``)."""
        cards = self.core.registry.cards()
        data = [{"type": "model", "id": c["id"], "display_name": c["id"],
                 "created_at": datetime.fromtimestamp(c["created"], UTC).isoformat()}
                for c in cards]  # fmt: skip
        return JSONResponse({"data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})  # fmt: skip
