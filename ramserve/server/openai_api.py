"""The OpenAI API: chat and text completions, and the model list.

Every error is the OpenAI error object with the right status, streaming included (a fault
mid-stream is sent as a ``data: {"error": ...}`` event before the stream ends).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import SamplingParams
from ..output import Done, Event, Reasoning, Text, TokenLogprob, ToolCall
from .core import Adapter, Running, final, generation_error, new_id
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
    TextChoice,
    TextCompletion,
    TextLogprobs,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)


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


def _tool_call(e: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=e.id, function=FunctionOut(name=e.name, arguments=e.arguments))


def chat_completion(head: Envelope, params: SamplingParams, events: list[Event]) -> ChatCompletion:
    done = final(events)
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
    done = final(events)
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


class OpenAI(Adapter):
    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("/v1/chat/completions", "POST", self.chat),
            ("/v1/completions", "POST", self.completions),
            ("/v1/models/{model:path}", "GET", self.get_model),
        ]

    async def list_models(self, request: Request) -> Response:
        cards = [ModelCard(**c) for c in self.core.registry.cards()]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def get_model(self, request: Request) -> Response:
        card = self.core.registry.card_for(request.path_params["model"])
        return JSONResponse(ModelCard(**card).model_dump())

    async def chat(self, request: Request) -> Response:
        body: ChatRequest = await self.core.parse(request, ChatRequest)
        return await self.respond(body, await self.core.start(body.generation()), chat=True)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self.core.parse(request, CompletionRequest)
        return await self.respond(body, await self.core.start(body.generation()), chat=False)

    async def respond(self, body: Any, running: Running, *, chat: bool) -> Response:
        head = Envelope(id=new_id("chatcmpl-" if chat else "cmpl-"), created=int(time.time()),
                        model=body.model, system_fingerprint=self.core.fingerprint)  # fmt: skip
        if body.stream:
            chunks = (stream_chat if chat else stream_text)(head, body, running.events())
            return EventSourceResponse(running.stream(chunks), ping=15)
        collected = await running.collect()
        out = (chat_completion if chat else text_completion)(head, body.sampling(), collected)
        return JSONResponse(out.model_dump(exclude_none=False))
