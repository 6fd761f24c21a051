"""The per-request output pipeline, token by token, with a real mlx-lm tokenizer (no model run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ramserve.constrain import Grammars, Tool, ToolUse
from ramserve.output import Done, Reasoning, Text, ToolCall, Usage, make_output
from ramserve.settings import load_settings

from .factory import TOOLS_TEMPLATE, make_model

TOOL = Tool("pick", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tokenizer with <think> markers and the Hermes tool format."""
    folder = make_model(tmp_path_factory.mktemp("think") / "m", chat_template=TOOLS_TEMPLATE,
                        extra_special=("<think>", "</think>"))  # fmt: skip
    tok = load_tokenizer(Path(folder))
    assert tok.has_thinking and tok.has_tool_calling
    return tok


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


def test_grammar_masks_all_but_the_call_after_the_marker(thinker: Any) -> None:
    """auto: free text is unconstrained; once the marker is written only the call may follow."""
    grammars = Grammars(thinker, 384, load_settings().tool_formats)
    grammar = grammars.grammar(ToolUse([TOOL], "auto"), None, [1])
    assert grammar is not None
    proc = grammars.processor(*grammar)
    tokens = thinker.encode('Hello <tool_call>\n{"name": "pick", "arguments": {"n": 12}}',
                            add_special_tokens=False)  # fmt: skip
    context = [1]
    allowed = []
    for t in tokens:
        logits = proc(mx.array(context), mx.zeros((1, 384)))
        allowed.append(int((logits > -1e9).sum()))
        assert bool(logits[0, t] > -1e9), thinker.decode([t])
        context.append(t)
    assert allowed[0] > 250  # free text: every token that is text
    assert min(allowed) < 20  # inside the call: only what the schema allows
    # Required: the very first token must start the call, thinking allowed before it.
    required = grammars.processor(*grammars.grammar(ToolUse([TOOL], "required"), None, [1]))
    first = required(mx.array([1]), mx.zeros((1, 384)))
    ok = {thinker.decode([i]) for i in range(384) if bool(first[0, i] > -1e9)}
    assert ok and all("<tool_call>".startswith(s) or s == "<think>" for s in ok)
