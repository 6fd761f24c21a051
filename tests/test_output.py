"""The per-request output pipeline, token by token, with a real mlx-lm tokenizer (no model run)."""

from __future__ import annotations

import json
from typing import Any

from ramserve.constrain import Tool
from ramserve.output import Done, Reasoning, Text, ToolCall, Usage, make_output

TOOL = Tool("pick", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})


def run(tok: Any, text: str, prompt: list[int] | None = None, **kw: Any) -> list[Any]:
    """Feed ``text`` one token at a time through a chat output; the events it sends."""
    events: list[Any] = []
    out = make_output(tok, prompt or [1], events.append, chat=True, **kw)
    for t in tok.encode(text, add_special_tokens=False):
        if out.token(t, None):
            break
    out.finish("stop", Usage(1, 0, 0))
    return events


def texts(events: list[Any], kind: type) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def test_reasoning_is_separated_from_the_answer(thinker: Any) -> None:
    events = run(thinker, "<think>let me see</think>The answer is 4.")
    assert texts(events, Reasoning) == "let me see"
    assert texts(events, Text) == "The answer is 4."
    # A template that opened the thinking block: the output starts inside it.
    opened = thinker.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    events = run(thinker, "hmm</think>Four.", prompt=opened)
    assert (texts(events, Reasoning), texts(events, Text)) == ("hmm", "Four.")


def test_tool_calls_parse_and_invalid_ones_stay_text(thinker: Any) -> None:
    call = '<tool_call>\n{"name": "pick", "arguments": {"n": 3}}\n</tool_call>'
    events = run(thinker, f"Sure.{call}\n{call}", tools=[TOOL])
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "pick", {"n": 3}), (1, "pick", {"n": 3})]  # fmt: skip
    assert texts(events, Text) == "Sure." and events[-1].finish_reason == "tool_calls"
    bad = '<tool_call>\n{"name": "pick", "arguments": {"n": "three"}}\n</tool_call>'
    events = run(thinker, bad, tools=[TOOL])
    assert not [e for e in events if isinstance(e, ToolCall)]
    assert texts(events, Text) == bad and events[-1].finish_reason == "stop"
    # Without tools the markers are plain text.
    assert texts(run(thinker, call), Text) == call


def test_stop_strings_cut_across_tokens(thinker: Any) -> None:
    events = run(thinker, "def add(a, b):\n    return a + b\n", stops=["retu"])
    assert texts(events, Text) == "def add(a, b):\n    "
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
