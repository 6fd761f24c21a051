"""Anthropic's Messages API and Ollama's API, driven by their official clients against a real server,
and the same answer through all three APIs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest

from ramserve.settings import load_settings

from .factory import TOOLS_TEMPLATE, make_model
from .serving import leave_a_stream, metric, serve_folder

NAME = "code-qwen3-30m"
HELLO = [{"role": "user", "content": "Write a function that adds two numbers."}]
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}  # fmt: skip
CLOCK_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 24}},
    "required": ["zone"],
}
TOOLS = [
    {"name": "get_weather", "description": "The current weather in a city.",
     "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "input_schema": CLOCK_SCHEMA},
]  # fmt: skip
FUNCTIONS = [
    {"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
    for t in TOOLS
]


@pytest.fixture(scope="module")
def strict(served_dense: Path) -> Iterator[str]:
    """One slot, no queue, an API key and a 20 KB body limit."""
    server = load_settings().server.model_copy(update={"max_body_bytes": 20_000})
    with serve_folder(served_dense, NAME, api_key="sekret", server=server, parallel=1,
                      queue_size=0) as url:  # fmt: skip
        yield url


@contextmanager
def clients(base: str, key: str = "unused") -> Iterator[tuple[Any, Any, Any]]:
    """The three official clients, with ``key`` as each sends it (closed after: no leaked sockets)."""
    with (
        openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
        anthropic.Anthropic(base_url=base, api_key=key, max_retries=0) as claude,
        ollama.Client(host=base, headers={"Authorization": f"Bearer {key}"}) as olla,
    ):
        yield oai, claude, olla


@pytest.fixture
def claude(base: str) -> Iterator[anthropic.Anthropic]:
    with clients(base) as (_, client, _):
        yield client


@pytest.fixture
def olla(base: str) -> Iterator[ollama.Client]:
    with clients(base) as (_, _, client):
        yield client


# Anthropic's current client has no sampling arguments; other apps still send them, and tests
# need greedy decoding.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}


def greedy(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0, "num_predict": max_tokens}


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- Anthropic ---------------------------------------------------------------------------------


def test_messages_stream_and_not_agree(claude: anthropic.Anthropic, base: str) -> None:
    whole = claude.messages.create(**GREEDY, model=NAME, max_tokens=24, messages=HELLO)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == NAME
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 24
    assert whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0) > 5
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text
    with claude.messages.stream(**GREEDY, model=NAME, max_tokens=24, messages=HELLO) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text_of(final) == text_of(whole)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24
    # The documented event sequence, read off the wire.
    body = {"model": NAME, "max_tokens": 6, "temperature": 0, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{base}/v1/messages", json=body, timeout=60) as r:
        events = [ln.removeprefix("event: ") for ln in r.iter_lines() if ln.startswith("event: ")]
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}


def test_async_client_creates_and_streams(base: str) -> None:
    async def run() -> tuple[str, str]:
        async with anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0) as c:
            whole = await c.messages.create(**GREEDY, model=NAME, max_tokens=12, messages=HELLO)
            async with c.messages.stream(**GREEDY, model=NAME, max_tokens=12,
                                         messages=HELLO) as s:  # fmt: skip
                final = await s.get_final_message()
        return text_of(whole), text_of(final)

    whole, streamed = asyncio.run(run())
    assert whole and whole == streamed


def test_forced_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    forced = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    first = claude.messages.create(**GREEDY, model=NAME, max_tokens=160, messages=ASK,
                                   tools=TOOLS, tool_choice=forced)  # fmt: skip
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    for c in calls:
        jsonschema.validate(c.input, WEATHER_SCHEMA)
    # Streamed, the call arrives as a tool_use block whose input comes as JSON deltas.
    with claude.messages.stream(**GREEDY, model=NAME, max_tokens=160, messages=ASK,
                                tools=TOOLS, tool_choice=forced) as s:  # fmt: skip
        kinds = [e.delta.type for e in s if e.type == "content_block_delta"]
        streamed = s.get_final_message()
    assert "input_json_delta" in kinds
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [
        (c.name, c.input) for c in calls
    ]
    # The result goes back as a tool_result block; the model answers in text.
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id,
                                      "content": json.dumps({"temp_c": 21})} for c in calls]},
    ]  # fmt: skip
    answer = claude.messages.create(**GREEDY, model=NAME, max_tokens=24, messages=history,
                                    tools=TOOLS, tool_choice={"type": "none"})  # fmt: skip
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    without = claude.messages.count_tokens(model=NAME, messages=ASK)  # "none" shows no tools
    assert answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0) > (
        without.input_tokens + 20
    )


def test_any_tool_single_call(claude: anthropic.Anthropic) -> None:
    r = claude.messages.create(**GREEDY, model=NAME, max_tokens=160, messages=ASK,
                               tools=TOOLS, tool_choice={"type": "any",
                                                         "disable_parallel_tool_use": True})  # fmt: skip
    (call,) = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and call.name in ("get_weather", "get_time")
    assert call.id


def test_stop_sequences_count_tokens_and_prefill(claude: anthropic.Anthropic) -> None:
    reply = text_of(claude.messages.create(**GREEDY, model=NAME, max_tokens=24,
                                           messages=HELLO))  # fmt: skip
    words = [w for w in reply.split() if len(w) >= 3]
    stop = words[len(words) // 2]
    cut = claude.messages.create(**GREEDY, model=NAME, max_tokens=24, messages=HELLO,
                                 stop_sequences=["@@never@@", stop])  # fmt: skip
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert text_of(cut) == reply[: reply.index(stop)]
    counted = claude.messages.count_tokens(model=NAME, messages=HELLO)
    full = claude.messages.create(**GREEDY, model=NAME, max_tokens=1, messages=HELLO)
    assert counted.input_tokens == full.usage.input_tokens + (
        full.usage.cache_read_input_tokens or 0
    )
    # A last assistant turn is continued: its text is in the prompt, and not said again.
    begun = [*HELLO, {"role": "assistant", "content": reply[: reply.index(stop)].rstrip()}]
    more = claude.messages.create(**GREEDY, model=NAME, max_tokens=6, messages=begun)
    used = more.usage.input_tokens + (more.usage.cache_read_input_tokens or 0)
    assert used > counted.input_tokens and not text_of(more).startswith(begun[-1]["content"])


def test_output_format_and_cache_warming(claude: anthropic.Anthropic, base: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0,
                                                       "maximum": 120}},
              "required": ["name", "age"]}  # fmt: skip
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    r = claude.messages.create(**GREEDY, model=NAME, max_tokens=120, messages=ask,
                               output_config={"format": {"type": "json_schema", "schema": schema}})  # fmt: skip
    jsonschema.validate(json.loads(text_of(r)), schema)
    # max_tokens 0 fills the prompt cache and answers nothing; the same prompt then hits the cache.
    prompt = [{"role": "user", "content": "Explain binary search trees. " * 8}]
    warm = claude.messages.create(model=NAME, max_tokens=0, messages=prompt)
    assert warm.content == [] and warm.usage.output_tokens == 0
    hit = claude.messages.create(**GREEDY, model=NAME, max_tokens=2, messages=prompt)
    assert hit.usage.cache_read_input_tokens >= warm.usage.input_tokens - 1


# -- Ollama ----------------------------------------------------------------------------------


def test_ollama_chat_stream_and_not_agree(olla: ollama.Client) -> None:
    whole = olla.chat(model=NAME, messages=HELLO, options=greedy(24), stream=False)
    assert whole.done and whole.done_reason == "length" and whole.message.role == "assistant"
    assert whole.eval_count == 24 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = list(olla.chat(model=f"{NAME}:latest", messages=HELLO, options=greedy(24), stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 24 and parts[-1].done_reason == "length"


def test_ollama_generate_templated_and_raw(olla: ollama.Client) -> None:
    templated = olla.generate(model=NAME, prompt=HELLO[0]["content"], options=greedy(16))
    parts = list(olla.generate(model=NAME, prompt=HELLO[0]["content"], options=greedy(16),
                               stream=True))  # fmt: skip
    assert "".join(p.response for p in parts) == templated.response and parts[-1].done
    raw = olla.generate(model=NAME, prompt="def add(a, b):", raw=True, options=greedy(16))
    assert raw.eval_count == 16 and raw.prompt_eval_count < templated.prompt_eval_count
    # An empty prompt loads the model and answers at once.
    loaded = olla.generate(model=NAME, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_ollama_tags_show_ps_version(olla: ollama.Client, base: str) -> None:
    (entry,) = olla.list().models
    assert entry.model == f"{NAME}:latest" and entry.size > 1_000_000 and len(entry.digest) == 64
    assert entry.details.family == "qwen3" and entry.details.quantization_level.endswith("bpw")
    shown = olla.show(NAME)
    assert {"completion", "tools"} <= set(shown.capabilities) and "im_start" in shown.template
    assert shown.modelinfo["general.architecture"] == "qwen3"
    (running,) = olla.ps().models
    assert running.model == f"{NAME}:latest" and running.size > 1_000_000
    assert running.context_length and running.context_length > 256
    assert httpx.get(f"{base}/api/version").json()["version"]
    assert httpx.head(f"{base}/").status_code == 200  # the Ollama CLI's heartbeat


def test_ollama_format_schema_and_json(olla: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0,
                                                       "maximum": 120}},
              "required": ["name", "age"]}  # fmt: skip
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    r = olla.chat(model=NAME, messages=ask, format=schema, options=greedy(120))
    jsonschema.validate(json.loads(r.message.content), schema)
    g = olla.generate(model=NAME, prompt="A JSON object, please.", format="json",
                      options=greedy(200))  # fmt: skip
    assert g.response.startswith("{")
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)


def test_ollama_tools(olla: ollama.Client) -> None:
    # After turns that called tools the model writes the call marker itself; the call is constrained.
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "20 C"},
        {"role": "assistant", "content": "It is 20 C in Rome."},
        {"role": "user", "content": "Weather in Paris?"},
    ]  # fmt: skip
    r = olla.chat(model=NAME, messages=history, tools=FUNCTIONS, options=greedy(160))
    calls = r.message.tool_calls
    assert calls and r.done_reason in ("stop", "length")  # a model may call again and again
    schemas = {t["name"]: t["input_schema"] for t in TOOLS}
    for c in calls:
        jsonschema.validate(dict(c.function.arguments), schemas[c.function.name])
    streamed = [c for p in olla.chat(model=NAME, messages=history, tools=FUNCTIONS,
                                     options=greedy(160), stream=True)
                for c in p.message.tool_calls or []]  # fmt: skip
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [
        (c.function.name, dict(c.function.arguments)) for c in calls
    ]


def test_ollama_num_ctx_bounds_the_request(olla: ollama.Client) -> None:
    prompt = olla.chat(model=NAME, messages=HELLO, options=greedy(1)).prompt_eval_count
    r = olla.chat(model=NAME, messages=HELLO,
                  options={"temperature": 0, "num_predict": -1, "num_ctx": prompt + 5})  # fmt: skip
    assert r.eval_count <= 5
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model=NAME, messages=HELLO, options={"num_ctx": prompt - 1})
    assert e.value.status_code == 400 and "context" in e.value.error


def test_thinking_comes_back_as_thinking(tmp_path: Path) -> None:
    """A last assistant turn is continued (Anthropic and Ollama); one that opens <think> makes the
    answer reasoning, which each API returns its way."""
    folder = make_model(tmp_path / "thinker", chat_template=TOOLS_TEMPLATE,
                        extra_special=("<think>", "</think>"))  # fmt: skip
    begun = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>"}]
    with (
        serve_folder(folder, "tiny", parallel=2, queue_size=2, prompt_cache_entries=0) as url,
        clients(url) as (_, claude, olla),
    ):
        r = claude.messages.create(**GREEDY, model="tiny", max_tokens=8, messages=begun)
        with claude.messages.stream(**GREEDY, model="tiny", max_tokens=8, messages=begun) as s:
            deltas = [e.delta.type for e in s if e.type == "content_block_delta"]
            streamed = s.get_final_message()
        o = olla.chat(model="tiny", messages=begun, options=greedy(8))
    thinking = r.content[0]
    assert thinking.type == "thinking" and thinking.thinking
    assert "thinking_delta" in deltas and streamed.content[0].thinking == thinking.thinking
    assert o.message.thinking == thinking.thinking


def test_max_tokens_is_a_ceiling_within_the_context(served_dense: Path) -> None:
    """Anthropic's max_tokens (required, and large from coding agents) and Ollama's num_predict
    stop at the context's end instead of refusing; a prompt past the context is still refused."""
    with (
        serve_folder(served_dense, NAME, parallel=1, queue_size=1, context=64) as url,
        clients(url) as (_, claude, olla),
    ):
        r = claude.messages.create(**GREEDY, model=NAME, max_tokens=16000, messages=HELLO)
        assert r.stop_reason == "model_context_window_exceeded"
        assert (
            r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) + r.usage.output_tokens
            == 64
        )
        o = olla.chat(model=NAME, messages=HELLO, options=greedy(5000))
        assert o.done_reason == "length" and o.prompt_eval_count + o.eval_count == 64
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=NAME, max_tokens=8, messages=[{"role": "user",
                                                                        "content": "word " * 80}])  # fmt: skip
        assert "context of 64 tokens" in e.value.body["error"]["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"model": NAME, "max_tokens": 3000, "messages": HELLO, "stream": True}),
    ("/api/chat", {"model": NAME, "messages": HELLO, "options": {"num_predict": 3000}}),
])  # fmt: skip
def test_a_client_that_leaves_frees_its_slot(base: str, path: str, body: dict[str, Any]) -> None:
    assert leave_a_stream(base, path, body)


# -- one engine, three APIs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uncached(served_dense: Path) -> Iterator[str]:
    """No prompt cache: every request is prefilled alike. (A prompt prefilled from a cached prefix
    rounds differently, which can flip a near-tie in greedy decoding, whatever the API.)"""
    with serve_folder(served_dense, NAME, parallel=8, queue_size=16,
                      prompt_cache_entries=0) as url:  # fmt: skip
        yield url


def check_one_answer(oai: Any, claude: Any, olla: Any, messages: list[dict[str, str]]) -> None:
    """Greedy text for ``messages``: OpenAI chat, Anthropic messages, Ollama chat and generate."""
    via_openai = oai.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                             max_tokens=32).choices[0].message.content  # fmt: skip
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    via_claude = text_of(claude.messages.create(
        **GREEDY, model=NAME, max_tokens=32, messages=turns,
        **({"system": system[0]} if system else {})))  # fmt: skip
    via_ollama = olla.chat(model=NAME, messages=messages, options=greedy(32)).message.content
    via_generate = olla.generate(model=NAME, prompt=turns[-1]["content"],
                                 system=system[0] if system else None,
                                 options=greedy(32)).response  # fmt: skip
    answers = {"openai": via_openai, "anthropic": via_claude, "ollama": via_ollama,
               "generate": via_generate}  # fmt: skip
    assert via_openai and len(set(answers.values())) == 1, answers


def test_greedy_text_is_the_same_through_every_api(uncached: str) -> None:
    with clients(uncached) as (oai, claude, olla):
        for messages in (HELLO, [{"role": "system", "content": "Answer in Python."}, *ASK]):
            check_one_answer(oai, claude, olla, messages)
    assert metric(uncached, "requests_total", '{path="/v1/messages",status="200"}') >= 2
    assert metric(uncached, "requests_total", '{path="/api/chat",status="200"}') >= 2


def test_key_queue_and_body_limit_apply_to_every_api(strict: str) -> None:
    with clients(strict, "sekret") as (_, claude, olla), clients(strict, "nope") as (_, bad, worse):
        # greedy: a sampled first token may end the reply (a flaky failure in CI, output_tokens 1)
        reply = claude.messages.create(**GREEDY, model=NAME, max_tokens=2, messages=HELLO)
        assert reply.usage.output_tokens == 2
        assert olla.chat(model=NAME, messages=HELLO, options=greedy(2)).eval_count == 2
        with pytest.raises(anthropic.AuthenticationError) as e:  # the key sent as x-api-key
            bad.messages.create(model=NAME, max_tokens=2, messages=HELLO)
        assert e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(ollama.ResponseError) as o:
            worse.chat(model=NAME, messages=HELLO, options=greedy(2))
        assert o.value.status_code == 401 and "API key" in o.value.error
    auth = {"x-api-key": "sekret"}
    body = {"model": NAME, "max_tokens": 300, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{strict}/v1/messages", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("event: ")  # generating now, in the only slot
        busy = httpx.post(f"{strict}/v1/messages", json=dict(body, stream=False), headers=auth)
        busy_ollama = httpx.post(f"{strict}/api/chat", headers=auth,
                                 json={"model": NAME, "messages": HELLO, "stream": False})  # fmt: skip
    assert busy.status_code == 529 and busy.json()["error"]["type"] == "overloaded_error"
    assert busy_ollama.status_code == 503 and set(busy_ollama.json()) == {"error"}
    huge = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 30_000}]}
    too_big = httpx.post(f"{strict}/v1/messages", json=huge, headers=auth)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"
    too_big = httpx.post(f"{strict}/api/chat", json=dict(huge, messages=huge["messages"]))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]


# -- malformed requests: each API's own error shape and status --------------------------------------

M = {"model": NAME, "max_tokens": 8, "messages": HELLO}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
ANTHROPIC_BAD: list[tuple[str, Any, int, str]] = [
    ("not json", "{nope", 400, "JSON"),
    ("no max_tokens", {"model": NAME, "messages": HELLO}, 400, "max_tokens"),
    ("no messages", dict(M, messages=[]), 400, "messages"),
    ("system role in messages", dict(M, messages=[{"role": "system", "content": "x"}]), 400, "role"),
    ("temperature over 1", dict(M, temperature=1.5), 400, "temperature"),
    ("unknown field", dict(M, frobnicate=1), 400, "frobnicate"),
    ("lax boolean", dict(M, stream="yes"), 400, "stream"),
    ("image block", dict(M, messages=[{"role": "user", "content": [IMAGE]}]), 400, "image"),
    ("tool_result from the assistant",
     dict(M, messages=[*HELLO, {"role": "assistant", "content": [
         {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]), 400, "user message"),
    ("tool choice without a name", dict(M, tools=TOOLS, tool_choice={"type": "tool"}), 400, "name"),
    ("tool choice naming no tool", dict(M, tools=TOOLS, tool_choice={"type": "tool", "name": "f"}),
     400, "'f'"),
    ("invalid input schema",
     dict(M, tools=[{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": 7}}}}]),
     400, "tools[0].input_schema"),
    ("duplicate tool", dict(M, tools=[TOOLS[0], TOOLS[0]]), 400, "tools[1].name"),
    ("trailing whitespace in a final assistant turn",
     dict(M, messages=[*HELLO, {"role": "assistant", "content": "def "}]), 400, "whitespace"),
    ("too many stop sequences", dict(M, stop_sequences=["s"] * 17), 400, "stop_sequences"),
    ("unknown model", dict(M, model="claude-9"), 404, "claude-9"),
]  # fmt: skip
OLLAMA_BAD: list[tuple[str, str, Any, int, str]] = [
    ("not json", "/api/chat", "{nope", 400, "JSON"),
    ("no model", "/api/chat", {"messages": HELLO}, 400, "model"),
    ("unknown model", "/api/chat", {"model": "llama3:8b", "messages": HELLO}, 404, "llama3:8b"),
    ("unknown budget tag", "/api/chat", {"model": f"{NAME}:7GB", "messages": HELLO}, 404, "7GB"),
    ("bad role", "/api/chat", {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, 400, "role"),
    ("mirostat", "/api/chat", {"model": NAME, "messages": HELLO, "options": {"mirostat": 2}}, 400, "mirostat"),
    ("num_predict 0", "/api/chat", {"model": NAME, "messages": HELLO, "options": {"num_predict": 0}},
     400, "num_predict"),
    ("unknown option", "/api/chat", {"model": NAME, "messages": HELLO, "options": {"warp": 9}}, 400, "warp"),
    ("images", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x",
                                                          "images": ["iVBO"]}]}, 400, "images"),
    ("invalid format schema", "/api/chat", {"model": NAME, "messages": HELLO, "format": {"type": "nothing"}},
     400, "format"),
    ("lax boolean", "/api/chat", {"model": NAME, "messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("bad tool name", "/api/chat", {"model": NAME, "messages": HELLO, "tools": [
        {"type": "function", "function": {"name": "bad name"}}]}, 400, "name"),
    ("suffix", "/api/generate", {"model": NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("num_ctx over the prompt", "/api/generate", {"model": NAME, "prompt": "word " * 50,
                                                 "options": {"num_ctx": 8}}, 400, "context"),
    ("show without a model", "/api/show", {}, 400, "model"),
    ("unserved endpoint", "/api/pull", {"model": NAME}, 404, "/api/pull"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "needle"), [c[1:] for c in ANTHROPIC_BAD],
                         ids=[c[0] for c in ANTHROPIC_BAD])  # fmt: skip
def test_anthropic_errors(base: str, body: Any, status: int, needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base}/v1/messages", content=content, timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    out = r.json()
    assert set(out) == {"type", "error"} and out["type"] == "error"
    assert set(out["error"]) == {"type", "message"}
    assert out["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert needle in out["error"]["message"]


@pytest.mark.parametrize(("path", "body", "status", "needle"), [c[1:] for c in OLLAMA_BAD],
                         ids=[c[0] for c in OLLAMA_BAD])  # fmt: skip
def test_ollama_errors(base: str, path: str, body: Any, status: int, needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base}{path}", content=content, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and needle in r.json()["error"]


def test_official_clients_raise_the_errors(base: str, claude: anthropic.Anthropic,
                                          olla: ollama.Client) -> None:  # fmt: skip
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-9", max_tokens=2, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(ollama.ResponseError) as o:
        olla.chat(model="llama3", messages=HELLO)
    assert o.value.status_code == 404 and "llama3" in o.value.error
    wrong = httpx.get(f"{base}/api/chat")
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"}
