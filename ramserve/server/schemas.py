"""The OpenAI API's request and response objects, as pydantic models.

Requests forbid unknown fields, and fields ramserve accepts only in their default form (``n``,
``echo``, ``suffix``...) are refused when set otherwise: an app must learn that a feature is missing,
never get a silently different answer.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ..constrain import ConstraintError, Tool, ToolUse
from ..engine import SamplingParams
from .core import Generation, Strict, check_json_schema, check_stops, tool_use


class StreamOptions(Strict):
    include_usage: StrictBool = False


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Sent back by clients that keep whole assistant messages; not part of the prompt.
    reasoning_content: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def template(self, index: int) -> dict[str, Any]:
        """The message as chat templates take it: text content, tool-call arguments as objects."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": c.type,
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments, index, j)}}
                for j, c in enumerate(self.tool_calls)
            ]  # fmt: skip
        return out


def _arguments(text: str, message: int, call: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        param = f"messages[{message}].tool_calls[{call}].function.arguments"
        raise ConstraintError(f"{param}: must be a JSON object, as a string", param)
    return value


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: StrictBool | None = None  # ramserve always enforces the schema


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


def tools_of(defs: list[ToolDef] | None) -> list[Tool]:
    """OpenAI's function tools (Ollama's too), each with where its schema is in the request."""
    return [Tool(t.function.name, t.function.parameters, t.function.description,
                 f"tools[{i}].function.parameters") for i, t in enumerate(defs or [])]  # fmt: skip


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        return self

    def target(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is not None:
            return self.json_schema.schema_
        return None


class Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: str
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None  # an end-user id for the caller's own tracking

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("ramserve returns one choice per request; n must be 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        check_stops([v] if isinstance(v, str) else v, limit=4)  # OpenAI's limit
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids to values in [-100, 100]")
        return v

    def params(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()} or None,
            stop=stops,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def sampling(self) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens
        return self.params(limit, self.logprobs, self.top_logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template(i) for i, m in enumerate(self.messages)]

    def tool_use(self) -> ToolUse | None:
        """The request's tools and how they may be used; None when it has none."""
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        tools = tools_of(self.tools)
        mode = None if isinstance(choice, NamedToolChoice) else choice
        return tool_use(tools, mode, named, self.parallel_tool_calls)

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (``response_format``); None for free text."""
        schema = self.response_format.target() if self.response_format else None
        if schema is not None:
            check_json_schema(schema, "response_format.json_schema.schema")
        return schema

    def generation(self) -> Generation:
        return Generation(self.model, self.sampling(), messages=self.template_messages(),
                          tools=self.tool_use(), schema=self.answer_schema(),
                          top_logprobs=self.top_logprobs if self.logprobs else -1)  # fmt: skip


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("ramserve takes one prompt per request")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("ramserve does not support echo")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("ramserve does not support suffix (fill-in-the-middle)")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("ramserve returns one choice per request; best_of must be 1")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingParams:
        n = self.logprobs or 0
        return self.params(self.max_tokens, self.logprobs is not None, n)

    def generation(self) -> Generation:
        params = self.sampling()
        top = params.top_logprobs if params.logprobs else -1
        return Generation(self.model, params, text=self.text(), top_logprobs=top)


# ---- responses --------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobContent]


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class Envelope(BaseModel):
    """What every completion object and chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An OpenAI ``model`` object; ramserve's extension fields describe the variant."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ramserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StepOut(BaseModel):
    """A progress bar's state (ramserve/progress.py): ``done`` of ``total`` ``unit``."""

    desc: str
    done: float
    total: float
    unit: str
    elapsed_s: float
    fraction: float


class ServerStatus(BaseModel):
    """What ``GET /status`` (and ``ramserve ps``) reports: the model held and the work in flight."""

    pid: int
    model: str  # the id of the model loaded now (a budget variant: name@budget)
    folder: str
    stage: str
    uptime_s: float
    weight_bytes: int | None
    mlx_active_bytes: int
    mlx_peak_bytes: int
    rss_bytes: int
    context: int | None
    parallel: int | None
    active: int
    queued: int
    queue_size: int | None
    pending_body_bytes: int
    generated_tokens: int = 0
    tokens_per_second: float = 0.0  # decode throughput, all streams together (as /metrics)
    progress: StepOut | None = None  # the long work in progress (a variant swap's quantization)
