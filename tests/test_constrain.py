"""Grammars for tools and JSON: what the mask allows, and what is refused before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ramserve.constrain import ConstraintError, Grammars, ToolUse, closed
from ramserve.settings import load_settings

from .factory import TOOLS_TEMPLATE, make_model
from .test_output import TOOL


def grammars_for(tok: Any) -> Grammars:
    return Grammars(tok, 384, load_settings().tool_formats)


def test_grammar_masks_all_but_the_call_after_the_marker(thinker: Any) -> None:
    """auto: free text is unconstrained; once the marker is written only the call may follow."""
    grammars = grammars_for(thinker)
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


def test_a_family_without_a_grammar_is_refused_required_but_parsed_in_auto(tmp_path: Path) -> None:
    mistral = TOOLS_TEMPLATE.replace("<tool_call>", "[TOOL_CALLS]")
    tok = load_tokenizer(Path(make_model(tmp_path / "m", chat_template=mistral)))
    grammars = grammars_for(tok)
    assert grammars.tool_format is None
    with pytest.raises(ConstraintError) as e:
        grammars.check_tools(ToolUse([TOOL], "required"))
    assert e.value.param == "tool_choice" and "mistral" in str(e.value)
    grammars.check_tools(ToolUse([TOOL], "auto"))
    assert grammars.grammar(ToolUse([TOOL], "auto"), None, [1]) is None


def test_objects_that_name_their_properties_are_closed() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {"b": {"type": "integer"}}}}},
              "anyOf": [{"properties": {"c": {}}}], "additionalProperties": True}  # fmt: skip
    out = closed(schema)
    assert out["additionalProperties"] is True  # the schema's own choice is kept
    assert out["properties"]["a"]["items"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]["items"]  # not modified
