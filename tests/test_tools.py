"""Tool calling and structured output, end to end: the official client against a real server.

The shared model never learned to call tools (its template renders them in the Qwen/Hermes format),
so every call it makes here is the constraint's doing; greedy decoding makes each run repeatable.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from ramserve.server.app import create_app
from ramserve.server.registry import Registry
from ramserve.settings import load_settings

from .factory import TOOLS_TEMPLATE, make_model
from .serving import live_server, metric

NAME = "code-qwen3-30m"
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, CLOCK]


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, messages: list[dict], **kw: Any) -> Any:
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw)


def assert_valid_calls(calls: list[Any], allowed: set[str] | None = None) -> None:
    """Every call names an offered tool and its arguments validate against that tool's schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls, "no tool call"
    assert len({c.id for c in calls}) == len(calls)
    for c in calls:
        assert c.type == "function" and c.function.name in (allowed or set(schemas))
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


def test_agent_loop_call_result_answer(client: openai.OpenAI) -> None:
    first = ask(client, ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 21})},
    ]
    final = ask(client, history, tools=TOOLS, max_tokens=24)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    # The tool turn reached the prompt: the answer differs from one without it.
    without = ask(client, ASK, tools=TOOLS, max_tokens=24)
    assert final.usage.prompt_tokens > without.usage.prompt_tokens + 20


def test_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = ask(client, ASK, tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls, {"get_time"})


def test_auto_is_free_text_until_the_call_marker(client: openai.OpenAI) -> None:
    plain = ask(client, ASK, tools=TOOLS, tool_choice="auto", max_tokens=32)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    # After turns that called tools the model writes the marker itself; the call is constrained.
    shot = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [shot]},
        {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
        {"role": "assistant", "content": "It is 20 C in Rome."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    r = ask(client, history, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls)
    none = ask(client, history, tools=TOOLS, tool_choice="none", max_tokens=40)
    assert none.choices[0].message.tool_calls is None


def test_streamed_calls_assemble_to_the_same_calls(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = ask(client, ASK, **kw).choices[0].message
    with client.chat.completions.stream(model=NAME, messages=ASK, temperature=0, **kw) as stream:
        chunks = list(stream)
        final = stream.get_final_completion().choices[0].message
    assert [(c.function.name, c.function.arguments) for c in final.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]
    assert final.content == whole.content
    # The name comes first, in its own delta, then the arguments.
    deltas = [
        d for c in chunks if c.type == "chunk" for d in c.chunk.choices[0].delta.tool_calls or []
    ]
    assert deltas[0].function.name and deltas[0].id and deltas[0].function.arguments == ""
    assert deltas[1].function.name is None and json.loads(deltas[1].function.arguments)


def test_parallel_calls_and_the_single_call_limit(client: openai.OpenAI) -> None:
    many = ask(client, ASK, tools=TOOLS, tool_choice="required", max_tokens=200)
    calls = many.choices[0].message.tool_calls
    assert len(calls) >= 2
    assert_valid_calls(calls)
    # Streamed, the calls come by index, each name before its arguments.
    stream = ask(client, ASK, tools=TOOLS, tool_choice="required", max_tokens=200, stream=True)
    assembled: dict[int, list[str]] = {}
    for chunk in stream:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.function.name is not None:
                assert d.index not in assembled and d.id
                assembled[d.index] = [d.function.name, ""]
            assembled[d.index][1] += d.function.arguments
    assert [tuple(assembled[i]) for i in sorted(assembled)] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    one = ask(client, ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 12}},
     "required": ["ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"]}}}, "required": ["points"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}}, "required": ["id", "address"]}}, "required": ["user"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                          {"type": "string", "maxLength": 6}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"id": {"type": "string", "maxLength": 8},
                                      "nickname": {"type": "string", "maxLength": 8},
                                      "level": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["id", "level"]},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "event"}, "when": {"type": "string", "maxLength": 10},
                                      "size": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
     "required": ["kind", "when", "size"]},
]  # fmt: skip


def test_response_format_json_schema_validates(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Describe the record as JSON."}]
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        r = ask(client, prompt, response_format=fmt, max_tokens=200)
        assert r.choices[0].finish_reason == "stop", (i, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_response_format_json_object(client: openai.OpenAI) -> None:
    r = ask(client, [{"role": "user", "content": "A JSON object, please."}],
            response_format={"type": "json_object"}, max_tokens=300)  # fmt: skip
    content = r.choices[0].message.content
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_constrained_and_free_requests_share_one_batch(client: openai.OpenAI, base: str) -> None:
    free_alone = ask(client, ASK, max_tokens=40).choices[0].message.content
    schema = SCHEMAS[7]
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": schema}}
    results: dict[str, Any] = {}

    def run(key: str, **kw: Any) -> None:
        results[key] = ask(client, ASK, **kw)

    threads = [
        threading.Thread(target=run, args=("json",), kwargs={"response_format": fmt, "max_tokens": 200}),
        threading.Thread(target=run, args=("free",), kwargs={"max_tokens": 40}),
        threading.Thread(target=run, args=("tool",),
                         kwargs={"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}),
    ]  # fmt: skip
    for t in threads:
        t.start()
    active = []  # sequences decoding together, sampled while the three run
    while any(t.is_alive() for t in threads):
        active.append(metric(base, "active_sequences"))
    for t in threads:
        t.join()
    jsonschema.validate(json.loads(results["json"].choices[0].message.content), schema)
    assert results["free"].choices[0].message.content == free_alone
    assert_valid_calls(results["tool"].choices[0].message.tool_calls)
    assert max(active) >= 2


def error_of(base: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": NAME, "messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (
        set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    )
    return dict(err)


def test_tool_and_schema_errors_name_the_parameter(base: str) -> None:
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 7}}}}}  # fmt: skip
    assert error_of(base, {"tools": [bad_params]})["param"] == "tools[0].function.parameters"
    not_object = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    assert error_of(base, {"tools": [not_object]})["param"] == "tools[0].function.parameters"
    unenforceable = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}  # fmt: skip
    err = error_of(base, {"tools": [unenforceable], "tool_choice": "required"})
    assert err["param"] == "tools[0].function.parameters" and "not" in err["message"]
    assert (
        error_of(base, {"tools": [{"type": "function", "function": {"name": "bad name"}}]})["param"]
        == "tools[0].function.name"
    )
    named = {"type": "function", "function": {"name": "nope"}}
    err = error_of(base, {"tools": TOOLS, "tool_choice": named})
    assert err["param"] == "tool_choice" and "nope" in err["message"]
    assert error_of(base, {"tool_choice": "required"})["param"] == "tool_choice"
    assert error_of(base, {"tools": [WEATHER, WEATHER]})["param"] == "tools[1].function.name"
    lookaround = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": lookaround}}
    err = error_of(base, {"response_format": fmt})
    assert err["param"] == "response_format.json_schema.schema" and "look" in err["message"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nothing"}}}
    assert error_of(base, {"response_format": fmt})["param"] == "response_format.json_schema.schema"
    assert (
        error_of(base, {"response_format": {"type": "json_schema"}})["param"] == "response_format"
    )
    bad_args = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}  # fmt: skip
    err = error_of(base, {"messages": [*ASK, bad_args]})
    assert err["param"] == "messages[1].tool_calls[0].function.arguments"


# -- a tiny random model: the constraint, not the model, guarantees the calls -----------------


def test_random_model_still_returns_valid_calls(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "tiny-tools", "qwen3", chat_template=TOOLS_TEMPLATE)
    registry = Registry(folder, "tiny", load_settings(), {"parallel": 4, "queue_size": 4})
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "color": {"enum": ["red", "blue"]},
                                         "flag": {"type": "boolean"}},
        "required": ["n", "color", "flag"]}}}]  # fmt: skip
    with live_server(create_app(registry, load_settings().server)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for seed in range(4):
            r = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], tools=tools,
                tool_choice="required", seed=seed, parallel_tool_calls=False, max_tokens=160)  # fmt: skip
            (call,) = r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "pick"
            jsonschema.validate(json.loads(call.function.arguments),
                                tools[0]["function"]["parameters"])  # fmt: skip


def test_a_template_without_tools_refuses_them(tiny_dir: Path) -> None:
    registry = Registry(tiny_dir, "tiny", load_settings(), {"parallel": 1, "queue_size": 1})
    with live_server(create_app(registry, load_settings().server)) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "tiny", "messages": ASK, "tools": TOOLS})  # fmt: skip
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "tools" and "no tool support" in err["message"]
        # Without tools the same model answers.
        ok = httpx.post(f"{url}/v1/chat/completions",
                        json={"model": "tiny", "messages": ASK, "max_tokens": 4})  # fmt: skip
        assert ok.status_code == 200
