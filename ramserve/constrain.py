"""Constrained decoding: tool calls and JSON answers that always parse and validate.

A request's tools or response format become one llguidance grammar (Lark syntax with inline JSON
schemas). A logits processor, one per constrained sequence in mlx-lm's batch, feeds the grammar each
sampled token and masks every token that would leave it, so free and constrained sequences share
one continuous batch. Tool calls follow the family's own format (configs/tools.toml), written the
way its chat template renders them, so the model stays on text it has seen.

- ``tool_choice`` "required" or a named function: the output is one or more calls from the start.
- "auto": free text until the model writes the family's call marker; from there the call is
  constrained (a lazy lexeme: llguidance ends the text at the first marker).
- ``response_format`` json_object / json_schema: the answer is a JSON value of the schema.

Thinking models keep their thinking: an optional (or, when the template opened it, required)
``<think>…</think>`` comes before the constrained part.

Why llguidance: it takes JSON schema and Lark with lazy triggers and special tokens in one grammar,
its masks cost tens of microseconds per token (measured in bench/serve.py), it reports the schema
features it cannot enforce by name, and its Python wheel runs anywhere MLX runs (the masks are
applied here with MLX array ops, so the CPU and Metal back ends share one path). outlines-core
compiles a schema to a regex automaton up front (no recursion, no lazy trigger), and xgrammar has no
MLX path.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal, cast

import mlx.core as mx
import numpy as np

from .errors import ConfigError, RamserveError
from .settings import ToolFormat

log = logging.getLogger("ramserve.constrain")

TEXT = r"/(.|\n)*/"


class ConstraintError(RamserveError):
    """A tool or schema the request sent that cannot be enforced; ``param`` names where it is."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    description: str | None = None
    where: str = ""  # where the request gave its schema, for errors (each API names it its way)

    def openai(self) -> dict[str, Any]:
        """The tool as the chat template and mlx-lm's parsers take it."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """What a request allows: its tools, ``tool_choice`` and ``parallel_tool_calls``."""

    tools: list[Tool]
    choice: Literal["none", "auto", "required"] = "auto"
    name: str | None = None  # tool_choice naming one function (then choice is "required")
    parallel: bool = True

    @property
    def allowed(self) -> list[Tool]:
        return [t for t in self.tools if self.name in (None, t.name)]


def opens_thinking(tokenizer: Any, prompt: list[int]) -> bool:
    """Whether the prompt ends inside a thinking block (the template opened it for the model)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    return bool(tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt))


def parser_name(tokenizer: Any) -> str | None:
    """mlx-lm's tool parser for this tokenizer (``json_tools``, ``mistral``, ...), if it found one."""
    parser = getattr(tokenizer, "tool_parser", None)
    return parser.__module__.rsplit(".", 1)[-1] if parser is not None else None


def _tool_format(tokenizer: Any, formats: dict[str, ToolFormat]) -> ToolFormat | None:
    """The configured call format of this tokenizer's family, checked against its call marker."""
    name = parser_name(tokenizer)
    fmt = formats.get(name) if name else None
    if fmt is not None and not fmt.open.startswith(tokenizer.tool_call_start):
        raise ConfigError(
            f"tool_formats.{name}.open = {fmt.open!r} must start with the family's call marker "
            f"{tokenizer.tool_call_start!r} (configs/tools.toml or $RAMSERVE_HOME/config.toml)"
        )
    return fmt


class Grammars:
    """Grammars for one loaded model: checks requests and makes their logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int, formats: dict[str, ToolFormat]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.tool_format = _tool_format(tokenizer, formats)
        self._ll: Any = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (built once: about a second for 150k tokens)."""
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(
                    self.tokenizer._tokenizer,
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self.tokenizer.eos_token_ids),
                )
            return self._ll

    # -- checking ----------------------------------------------------------------------------

    def check_tools(self, use: ToolUse) -> None:
        """Refuse what cannot be served: no template support, or a schema that cannot be enforced."""
        if use.choice == "none":
            return
        if not getattr(self.tokenizer, "has_tool_calling", False):
            raise ConstraintError(
                "this model's chat template has no tool support (mlx-lm found no tool-call "
                "format in it), so tools cannot be offered to it",
                "tools",
            )
        if use.choice == "required" and self.tool_format is None:
            raise ConstraintError(
                f"tool_choice {'naming a function' if use.name else 'required'} needs constrained "
                f"decoding, which ramserve has no grammar for in this model's tool-call format "
                f"({parser_name(self.tokenizer)!r}; configs/tools.toml lists the supported ones)",
                "tool_choice",
            )
        if self.tool_format is not None:
            for i, tool in enumerate(use.tools):
                self.check_schema(tool.parameters, tool.where or f"tools[{i}].function.parameters")

    def check_schema(self, schema: dict[str, Any], param: str) -> None:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if failed:
            raise ConstraintError(f"{param}: cannot be enforced: {messages[0]}", param)

    # -- grammars ------------------------------------------------------------------------------

    def grammar(self, use: ToolUse | None, schema: dict[str, Any] | None, prompt: list[int]
                ) -> tuple[str, str] | None:  # fmt: skip
        """The request's grammar and the parameter it comes from; None where nothing is constrained.

        The answer is free text, or a JSON value of ``schema``; with tools it may instead be calls
        ("auto"), or must be ("required" and a named function).
        """
        fmt = self.tool_format if use is not None and use.choice != "none" else None
        answer = self._json(schema) if schema is not None else None
        think = self._think(prompt)
        if use is None or fmt is None:
            return (
                (f"%llguidance {{}}\nstart: {think} {answer}", "response_format")
                if answer
                else None
            )
        trigger = self.tokenizer.tool_call_start
        more = f"({self._literal(fmt.separator)} {self._literal(trigger)} call)*"
        lines = [
            f"call: {self._call_body(use, fmt, rest=fmt.open[len(trigger) :])}",
            f"calls: call {more if use.parallel else ''}",
            f"TEXT: {TEXT}",
        ]
        if use.choice == "required":
            start = f"{think} {self._literal(trigger)} calls"
        elif answer is not None:
            start = f"{think} ({answer} | {self._literal(trigger)} calls)"
        elif self._special(trigger) is not None:  # one special token: the text ends there
            start = f"TEXT | TEXT {self._literal(trigger)} calls"
        else:  # a lazy lexeme: the text ends at the first marker, and the call follows
            start = "TEXT | head calls"
            lines.append(f"head[lazy]: TEXT {self._literal(trigger)}")
        return "\n".join(["%llguidance {}", f"start: {start}", *lines]), "tools"

    def processor(self, grammar: str, param: str) -> GrammarProcessor:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"{param}: cannot be enforced: {matcher.get_error()}", param)
        return GrammarProcessor(matcher, self.vocab_size, sorted(self.tokenizer.eos_token_ids))

    def _call_body(self, use: ToolUse, fmt: ToolFormat, rest: str) -> str:
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in use.allowed
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        body = self._json(schema, fmt.key_separator, fmt.item_separator)
        return f"{self._literal(rest)} {body} {self._literal(fmt.close)}".strip()

    def _json(self, schema: dict[str, Any], key_sep: str = ": ", item_sep: str = ", ") -> str:
        # Fixed spacing: a model that may put whitespace anywhere can pad forever.
        options = {
            "whitespace_flexible": False,
            "key_separator": key_sep,
            "item_separator": item_sep,
        }
        return "%json " + json.dumps({**closed(schema), "x-guidance": options})

    def _think(self, prompt: list[int]) -> str:
        """Thinking before a constrained answer: required if the prompt opened it, else optional."""
        tok = self.tokenizer
        if not getattr(tok, "has_thinking", False):
            return ""
        start, end = self._literal(tok.think_start), self._literal(tok.think_end)
        if opens_thinking(tok, prompt):
            return f"{TEXT} {end} /\\n*/"
        return f"({start} {TEXT} {end} /\\n*/)?"

    def _special(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.ll_tokenizer.is_special_token(ids[0]):
            return int(ids[0])
        return None

    def _literal(self, text: str) -> str:
        """A Lark literal; a marker that is one special token is named by its id."""
        if not text:
            return ""
        special = self._special(text)
        return f"<[{special}]>" if special is not None else json.dumps(text)


SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed(schema: Any) -> Any:
    """The schema with objects that name their properties closed to others, as OpenAI's strict mode.

    JSON Schema allows unnamed properties unless told otherwise, and a small model given the
    choice invents keys until max_tokens; what is generated still validates against the original.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SUBSCHEMAS:
        if key in out:
            out[key] = closed(out[key])
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(s) for k, s in out[key].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GrammarProcessor:
    """An mlx-lm logits processor: each step, the grammar takes the last token and masks the next.

    Reading the last token back forces it to be computed, so a constrained sequence costs one
    synchronisation per step; free sequences in the same batch carry no processor at all.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int]) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = eos
        self.mask = allocate_token_bitmask(1, vocab_size)
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        if self.started:
            self.matcher.consume_token(cast(int, tokens[-1].item()))
        self.started = True
        if self.matcher.is_error():  # cannot happen for masked tokens: end the sequence cleanly
            log.error("grammar error, ending the sequence: %s", self.matcher.get_error())
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos] = True
        else:
            fill_next_token_bitmask(self.matcher, self.mask)
            bits = np.unpackbits(self.mask[0].view(np.uint8), bitorder="little")
            allowed = bits[: logits.shape[-1]].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))
