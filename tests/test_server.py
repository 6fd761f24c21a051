"""The OpenAI-compatible server: a real uvicorn server on loopback, driven by the official client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ramserve.server.app import create_app
from ramserve.server.registry import Registry
from ramserve.settings import load_settings

from .serving import leave_a_stream, live_server, metric, wait_for

NAME = "code-qwen3-30m"
HELLO = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def folder(served_dense: Path) -> Path:
    return served_dense


@pytest.fixture(scope="module")
def strict(folder: Path) -> Iterator[str]:
    """One slot, no queue, a 256-token context and an API key."""
    registry = Registry(
        folder, NAME, load_settings(), {"parallel": 1, "queue_size": 0, "context": 256}
    )
    server = load_settings().server.model_copy(update={"max_body_bytes": 20_000})
    with live_server(create_app(registry, server, api_key="sekret")) as url:
        yield url


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def chat_text(client: openai.OpenAI, messages: list[dict], **kw) -> str:
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content or ""


def test_chat_stream_and_not_agree_and_report_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=24)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(
        model=NAME, messages=HELLO, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_stream_ends_with_done_and_has_no_usage_unless_asked(base: str) -> None:
    body = {"model": NAME, "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    objects = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all("usage" not in o or o["usage"] is None for o in objects)


def test_text_completions_and_stop_across_tokens(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model=NAME, prompt="def add(a, b):", max_tokens=40, temperature=0
    )
    text = free.choices[0].text
    assert free.object == "text_completion" and len(text) > 12
    # A stop string that starts inside one token and ends in a later one.
    stop = text[5:12]
    cut = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=40,
                                    temperature=0, stop=[stop, "never-seen"])  # fmt: skip
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=40,
                                         temperature=0, stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_logprobs_and_seeded_sampling(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=4,
                                       logprobs=True, top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert (
            entry.logprob <= 0 and entry.token == entry.top_logprobs[0].token
        )  # greedy takes the top

    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=1.0, top_p=0.95,
                                           max_tokens=16, seed=seed)  # fmt: skip
        return r.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    plain = chat_text(client, HELLO, max_tokens=40)
    assert chat_text(client, HELLO, max_tokens=40, frequency_penalty=2.0) != plain
    assert chat_text(client, HELLO, max_tokens=40, extra_body={"repetition_penalty": 1.5}) != plain
    assert chat_text(client, HELLO, max_completion_tokens=3) == chat_text(
        client, HELLO, max_tokens=3
    )


def test_shared_prefix_is_reported_as_cached(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a careful Python programmer. " * 8}
    first = client.chat.completions.create(model=NAME, max_tokens=4, temperature=0,
                                           messages=[system, {"role": "user", "content": "Sort a list."}])  # fmt: skip
    second = client.chat.completions.create(model=NAME, max_tokens=4, temperature=0,
                                            messages=[system, {"role": "user", "content": "Read a file."}])  # fmt: skip
    assert first.usage.prompt_tokens > 60
    assert second.usage.prompt_tokens_details.cached_tokens >= 60


def test_eight_concurrent_streams_match_each_alone(client: openai.OpenAI, base: str) -> None:
    prompts = [
        [{"role": "user", "content": f"Write function number {i} for a queue."}] for i in range(8)
    ]
    alone = [chat_text(client, p, max_tokens=20) for p in prompts]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as ac:

            async def one(p: list[dict]) -> str:
                stream = await ac.chat.completions.create(model=NAME, messages=p, temperature=0,
                                                          max_tokens=20, stream=True)  # fmt: skip
                return "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    assert asyncio.run(together()) == alone


def test_async_client_text_completion(base: str) -> None:
    async def go() -> openai.types.Completion:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as ac:
            return await ac.completions.create(model=NAME, prompt="import os\n", max_tokens=6,
                                               temperature=0)  # fmt: skip

    r = asyncio.run(go())
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_disconnected_stream_stops_generating(base: str) -> None:
    body = {"model": NAME, "messages": HELLO, "max_tokens": 3000, "stream": True,
            "logit_bias": {"0": -100}}  # fmt: skip
    assert leave_a_stream(base, "/v1/chat/completions", body)
    generated = metric(base, "generated_tokens_total")
    assert wait_for(lambda: metric(base, "generated_tokens_total") == generated, timeout=2)
    assert metric(base, "client_disconnects_total") >= 1


def test_models_health_and_metrics(client: openai.OpenAI, base: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].owned_by == "ramserve"
    card = client.models.retrieve(NAME).model_dump()
    assert card["status"] == "loaded" and card["budget"] == "30%" and card["bits_per_weight"] > 2
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    text = httpx.get(f"{base}/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "generated_tokens_total",
                 "time_to_first_token_seconds_sum", "tokens_per_second", "queue_depth",
                 "memory_active_bytes"):  # fmt: skip
        assert f"ramserve_{name}" in text


def post(base: str, path: str, body: object, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{base}{path}", content=content, timeout=60, **kw)


def assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": NAME, "messages": HELLO, "temperature": "hot"}, "temperature", None),
        ({"model": NAME, "messages": "hello"}, "messages", None),
        ({"model": NAME}, "messages", "missing"),
        ({"model": NAME, "messages": HELLO, "n": 2}, "n", None),
        (
            {"model": NAME, "messages": HELLO, "tools": [{"type": "function"}]},
            "tools[0].function",
            "missing",
        ),
        (
            {"model": NAME, "messages": HELLO, "response_format": {"type": "xml"}},
            "response_format.type",
            None,
        ),
        (
            {"model": NAME, "messages": HELLO, "frobnicate": True},
            "frobnicate",
            "unsupported_parameter",
        ),
        ({"model": NAME, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ],
)
def test_bad_chat_requests_name_the_field(
    base: str, body: dict, param: str, code: str | None
) -> None:
    assert_error(post(base, "/v1/chat/completions", body), 400, param, code)


def test_malformed_and_unknown(base: str) -> None:
    assert_error(post(base, "/v1/chat/completions", "{not json"), 400, code="invalid_json")
    assert_error(post(base, "/v1/chat/completions", "[1, 2]"), 400, code="invalid_json")
    assert_error(post(base, "/v1/chat/completions", {"model": "gpt-9", "messages": HELLO}), 404,
                 "model", "model_not_found")  # fmt: skip
    assert_error(
        post(base, "/v1/completions", {"model": NAME, "prompt": "x", "echo": True}), 400, "echo"
    )
    assert_error(httpx.get(f"{base}/v1/nothing"), 404)


def test_lax_booleans_deep_nesting_and_huge_bodies_are_refused(base: str) -> None:
    # "yes" is not true: a lax coercion would start a stream the client cannot read.
    for value in ("yes", 1, "true"):
        body = {"model": NAME, "messages": HELLO, "stream": value}
        assert_error(post(base, "/v1/chat/completions", body), 400, "stream", "bool_type")
    assert_error(post(base, "/v1/completions", {"model": NAME, "prompt": "x", "echo": "no"}), 400,
                 "echo", "bool_type")  # fmt: skip
    # 100,000 brackets exhaust the parser's stack; 65 levels pass it but not the server's limit.
    assert_error(post(base, "/v1/chat/completions", "[" * 100_000 + "]" * 100_000), 400,
                 code="invalid_json")  # fmt: skip
    deep: dict = {"type": "object"}
    for _ in range(70):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    err = assert_error(post(base, "/v1/chat/completions", dict(model=NAME, messages=HELLO,
                                                                tools=[tool])), 400, code="invalid_json")  # fmt: skip
    assert "64 levels" in err["message"]
    # A body over the limit is read to its end and answered 413, not a reset connection.
    limit = load_settings().server.max_body_bytes
    huge = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * limit}]})
    assert_error(post(base, "/v1/chat/completions", huge), 413, code="body_too_large")
    chunks = (huge[i : i + 65536].encode() for i in range(0, len(huge), 65536))  # no length header
    chunked = httpx.post(f"{base}/v1/chat/completions", content=chunks, timeout=60)
    assert_error(chunked, 413, code="body_too_large")
    assert httpx.get(f"{base}/health").status_code == 200


def test_status_reports_the_model_and_the_work_in_flight(base: str) -> None:
    body = {"model": NAME, "messages": HELLO, "max_tokens": 3000, "stream": True,
            "logit_bias": {"0": -100}, "user": "u" * 50_000}  # fmt: skip
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        st = httpx.get(f"{base}/status").json()
    assert st["model"] == NAME and st["stage"] == "ready" and st["folder"].endswith("model")
    assert st["active"] == 1 and st["queued"] == 0 and st["parallel"] == 8
    assert st["pending_body_bytes"] > 50_000  # the stream's body, held until it ends
    assert 0 < st["weight_bytes"] < st["rss_bytes"]
    assert wait_for(lambda: httpx.get(f"{base}/status").json()["pending_body_bytes"] == 0)


def test_bodies_in_flight_are_bounded(folder: Path) -> None:
    registry = Registry(folder, NAME, load_settings(), {"parallel": 2, "queue_size": 4})
    server = load_settings().server.model_copy(update={"max_pending_body_mb": 1})
    body = {"model": NAME, "messages": HELLO, "max_tokens": 3000, "stream": True,
            "logit_bias": {"0": -100}, "user": "u" * 600_000}  # fmt: skip
    with live_server(create_app(registry, server)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # holds 600 KB until it ends
            refused = post(url, "/v1/chat/completions", dict(body, stream=False))
            small = post(url, "/v1/chat/completions", {"model": NAME, "messages": HELLO,
                                                       "max_tokens": 2})  # fmt: skip
        assert_error(refused, 503, code="server_busy")
        assert refused.headers["Retry-After"] and small.status_code == 200
        again = post(url, "/v1/chat/completions", dict(body, stream=False, max_tokens=2))
        assert again.status_code == 200, again.text


def test_api_key_context_and_body_limits(strict: str) -> None:
    body = {"model": NAME, "messages": HELLO, "max_tokens": 4}
    assert_error(post(strict, "/v1/chat/completions", body), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(post(strict, "/v1/chat/completions", body, headers=wrong), 401)
    assert_error(httpx.get(f"{strict}/v1/models"), 401)
    auth = {"Authorization": "Bearer sekret"}
    assert post(strict, "/v1/chat/completions", body, headers=auth).status_code == 200
    assert httpx.get(f"{strict}/health").status_code == 200  # probes need no key
    long = {"model": NAME, "messages": [{"role": "user", "content": "word " * 400}]}
    assert_error(post(strict, "/v1/chat/completions", long, headers=auth), 400,
                 code="context_length_exceeded")  # fmt: skip
    too_many = dict(body, max_tokens=250)
    assert_error(post(strict, "/v1/chat/completions", too_many, headers=auth), 400,
                 code="context_length_exceeded")  # fmt: skip
    huge = {"model": NAME, "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert_error(post(strict, "/v1/chat/completions", huge, headers=auth), 413)


def test_full_queue_is_refused_with_retry_after(strict: str) -> None:
    auth = {"Authorization": "Bearer sekret"}
    body = {
        "model": NAME,
        "messages": HELLO,
        "max_tokens": 200,
        "stream": True,
        "logit_bias": {"0": -100},
    }
    with httpx.stream(
        "POST", f"{strict}/v1/chat/completions", json=body, headers=auth, timeout=60
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generating now, in the only slot
        refused = post(strict, "/v1/chat/completions", dict(body, stream=False), headers=auth)
        rest = list(lines)
        assert_error(refused, 503, code="queue_full")
        assert refused.headers["Retry-After"]
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]", rest[-4:]
