"""Each request's output pipeline: tokens in, typed events out.

The engine's scheduler hands every sampled token of a request to that request's ``Output``, on the
worker thread. The output runs it through stages, each a small object that takes events and returns
events: detokenize → stop strings → reasoning/tool segmentation → tool-call parsing. The server builds
each endpoint's response from the events that come out (``Text``, ``Reasoning``, ``ToolCall``, and one
``Done`` last). A new parser or a new kind of output is a new stage, not a branch in the engine.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from .constrain import Tool, opens_thinking

log = logging.getLogger("ramserve.output")


# -- events ------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Text:
    """Answer text (chat ``content``, or a text completion), with the logprobs of its tokens."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Reasoning:
    """Text the model wrote between its thinking markers (``reasoning_content``)."""

    text: str


@dataclass
class ToolCall:
    """One complete tool call whose arguments parsed and validated against the tool's schema."""

    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass
class Done:
    """The last event of every request."""

    finish_reason: str  # "stop", "length", "tool_calls", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    first_token_s: float = 0.0  # from submission to the first token (queue and prefill)
    total_s: float = 0.0  # from submission to the end


@dataclass
class ToolText:
    """Raw text inside the family's tool-call markers (between stages only)."""

    text: str
    closed: bool = False


Event = Text | Reasoning | ToolCall | Done
Sink = Callable[[Event], None]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    first_token_s: float = 0.0
    total_s: float = 0.0


# -- stages ------------------------------------------------------------------------------------


class Stage(Protocol):
    def push(self, events: list[Any]) -> list[Any]: ...

    def close(self) -> list[Any]: ...


class StopStrings:
    """Ends the text at the first stop string (never emitted), matched across token boundaries.

    Text that could be the start of a stop string is held until the next token decides it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for e in events:
            if self.stopped:
                break
            if not isinstance(e, Text):
                out.append(e)
                continue
            text = self.pending + e.text
            hits = [(text.find(s), s) for s in self.stops if s in text]
            if hits:
                at, self.matched = min(hits)
                text, self.pending, self.stopped = text[:at], "", True
            else:
                hold = stop_holdback(text, self.stops)
                text, self.pending = text[: len(text) - hold], text[len(text) - hold :]
            out.append(Text(text, e.logprobs))
        return out

    def close(self) -> list[Any]:
        tail, self.pending = self.pending, ""
        return [Text(tail)] if tail and not self.stopped else []


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could start a stop string (held until resolved)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Segmenter:
    """Splits text at the family's reasoning and tool-call markers, with mlx-lm's TextStateMachine.

    Markers are matched on text, not token ids, so a marker split over tokens (or merged with its
    neighbours) is still found; text that could start a marker is held until it is decided.
    """

    def __init__(self, transitions: dict[str, list[tuple[str, str]]], initial: str) -> None:
        from mlx_lm.generate import TextStateMachine

        self.machine = TextStateMachine
        self.state = TextStateMachine(transitions).make_state(initial=initial)

    def push(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for e in events:
            if not isinstance(e, Text):
                out.append(e)
                continue
            self.state, segments = self.machine.split(self.state, e.text)
            out += self._events(segments, e.logprobs)
        return out

    def close(self) -> list[Any]:
        self.state, rest, name = self.machine.flush(self.state)
        return self._events([(name, rest)], [])

    def _events(self, segments: list[tuple[str, str]], logprobs: list[TokenLogprob]) -> list[Any]:
        out: list[Any] = []
        for i, (name, text) in enumerate(segments):
            if name == "reasoning":
                out += [Reasoning(text)] if text else []
            elif name == "tool":
                closed = i + 1 < len(segments)  # a later segment: the machine left the call here
                out += [ToolText(text, closed)] if text or closed else []
            elif text or logprobs:
                out.append(Text(text, logprobs))
                logprobs = []
        return out


class ToolCalls:
    """Turns the text of each tool call into ``ToolCall`` events with mlx-lm's parser for the family.

    A call is emitted only when it parses, names a tool the request offered and its arguments
    validate against that tool's schema; anything else is given back as text, markers included, so
    nothing is lost and nothing invalid is returned as a call. Whitespace between calls is dropped.
    """

    def __init__(
        self, parser: Callable[..., Any], tools: list[Tool], markers: tuple[str, str]
    ) -> None:
        self.parser = parser
        self.tools = {t.name: t for t in tools}
        self.markers = markers
        self.buffer: list[str] = []
        self.open = False
        self.count = 0
        self.gap = ""  # whitespace after a call, emitted only if text follows

    def push(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for e in events:
            if isinstance(e, ToolText):
                self.open = True
                self.buffer.append(e.text)
                if e.closed:
                    out += self._finish_call(closed=True)
            elif isinstance(e, Text) and self.count and not e.text.strip():
                self.gap += e.text
            else:
                if isinstance(e, Text) and self.gap:
                    out.append(Text(self.gap))
                    self.gap = ""
                out.append(e)
        return out

    def close(self) -> list[Any]:
        return self._finish_call(closed=False) if self.open else []

    def _finish_call(self, *, closed: bool) -> list[Any]:
        raw = "".join(self.buffer)
        self.buffer, self.open = [], False
        calls = self._parse(raw)
        if calls is None:
            start, end = self.markers
            return [Text(start + raw + (end if closed else ""))]
        self.gap = ""
        out = []
        for name, args, call_id in calls:
            out.append(ToolCall(self.count, call_id, name, json.dumps(args, ensure_ascii=False)))
            self.count += 1
        return out

    def _parse(self, raw: str) -> list[tuple[str, dict[str, Any], str]] | None:
        import jsonschema

        try:
            parsed = self.parser(raw, [t.openai() for t in self.tools.values()])
        except Exception as e:  # noqa: BLE001 - any parser failure means "not a call"
            log.info("tool call text did not parse (%s: %s): kept as text", type(e).__name__, e)
            return None
        calls = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            tool = self.tools.get(str(item.get("name"))) if isinstance(item, dict) else None
            args = item.get("arguments") if isinstance(item, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if tool is None or not isinstance(args, dict):
                return None
            try:
                jsonschema.validate(args, tool.parameters)
            except jsonschema.ValidationError as e:
                log.info("tool call %s failed its schema (%s): kept as text", tool.name, e.message)
                return None
            calls.append((tool.name, args, str(item.get("id") or "call_" + secrets.token_hex(12))))
        return calls or None


# -- the pipeline --------------------------------------------------------------------------------


class Output:
    """A request's output: detokenizes its tokens and runs the stages; events go to ``sink``."""

    def __init__(self, tokenizer: Any, stages: list[Stage], sink: Sink, *, top_logprobs: int = -1
                 ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer
        self.stages = stages
        self.sink = sink
        self.top_logprobs = top_logprobs  # -1: no logprobs
        self.called_tools = False

    @property
    def stopped(self) -> bool:
        """A stage ended the output (a stop string): the scheduler drops the sequence."""
        return any(getattr(s, "stopped", False) for s in self.stages)

    def token(self, token: int, logprobs: mx.array) -> bool:
        """One sampled token (not the end of sequence); True when the output wants no more."""
        self.detokenizer.add_token(token)
        entries = []
        if self.top_logprobs >= 0:
            entries.append(self._logprob_entry(token, logprobs))
        self._emit(self._run([Text(self.detokenizer.last_segment, entries)]))
        return self.stopped

    def finish(self, reason: str, usage: Usage) -> None:
        """The sequence ended (``reason`` "stop" also when a stage stopped it): flush, send ``Done``."""
        self.detokenizer.finalize()
        events: list[Any] = [Text(self.detokenizer.last_segment)]
        for stage in self.stages:
            events = stage.push(events) + stage.close()
        self._emit(events)
        if reason == "stop" and self.called_tools:
            reason = "tool_calls"
        matched = [s.matched for s in self.stages if isinstance(s, StopStrings) and s.matched]
        self.sink(Done(reason, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                       stop_sequence=matched[0] if matched else None,
                       first_token_s=usage.first_token_s, total_s=usage.total_s))  # fmt: skip

    def fail(self, message: str) -> None:
        self.sink(Done("error", error=message))

    def _run(self, events: list[Any]) -> list[Any]:
        for stage in self.stages:
            events = stage.push(events)
        return events

    def _emit(self, events: Iterable[Any]) -> None:
        for e in events:
            if isinstance(e, Text) and not (e.text or e.logprobs):
                continue
            if isinstance(e, ToolCall):
                self.called_tools = True
            self.sink(e)

    def _logprob_entry(self, token: int, logprobs: mx.array) -> TokenLogprob:
        decode = self.tokenizer.decode
        row = np.array(logprobs.astype(mx.float32))
        entry = TokenLogprob(decode([token]), float(row[token]), [])
        top = self.top_logprobs
        if top:
            part = np.argpartition(-row, top - 1)[:top]  # not a sort of the whole vocabulary
            best = part[np.argsort(-row[part], kind="stable")]
            entry.top = [(decode([int(i)]), float(row[i])) for i in best]
        return entry


def segment_transitions(tokenizer: Any, *, reasoning: bool, tools: bool
                        ) -> dict[str, list[tuple[str, str]]]:  # fmt: skip
    """The marker transitions for this family: its reasoning markers, and tool calls when on."""
    transitions: dict[str, list[tuple[str, str]]] = {"normal": []}
    if reasoning and getattr(tokenizer, "has_thinking", False):
        transitions["normal"].append((tokenizer.think_start, "reasoning"))
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    if tools:
        transitions["normal"].append((tokenizer.tool_call_start, "tool"))
        if "reasoning" in transitions:
            transitions["reasoning"].append((tokenizer.tool_call_start, "tool"))
        end = tokenizer.tool_call_end
        transitions["tool"] = [(end, "normal")] if end else []
    return transitions


def make_output(tokenizer: Any, prompt: list[int], sink: Sink, *, stops: Sequence[str] = (),
                chat: bool = False, tools: list[Tool] | None = None, top_logprobs: int = -1
                ) -> Output:  # fmt: skip
    """The pipeline a request needs: stop strings if any, then for chat the reasoning and tool calls.

    ``top_logprobs`` -1 keeps no logprobs; 0 keeps the sampled token's.
    """
    stages: list[Stage] = []
    if stops:
        stages.append(StopStrings(stops))
    transitions = segment_transitions(tokenizer, reasoning=chat, tools=bool(tools))
    if any(transitions.values()):
        initial = "reasoning" if chat and opens_thinking(tokenizer, prompt) else "normal"
        stages.append(Segmenter(transitions, initial))
    if tools:
        markers = (tokenizer.tool_call_start, tokenizer.tool_call_end or "")
        stages.append(ToolCalls(tokenizer.tool_parser, tools, markers))
    return Output(tokenizer, stages, sink, top_logprobs=top_logprobs)
