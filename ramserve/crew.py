"""The control channel between the ranks of a model split over machines: plain TCP beside MLX's own
distributed back end, which carries only the hidden states.

The leading rank (rank 0) listens; each following rank connects, says who it is and what memory it
measured (``Hello``), and then receives a ``Setup`` (at the start and at each variant swap), answers
whether it loaded it, and receives for every step of the batch a ``Tick``: what changed in the batch
since the last step (sequences started and ended) and whether to step. So every rank runs the same
forward passes on the same batch, and only the leading rank schedules and samples.

Only a rank that knows the launch's token (``RAMSERVE_CREW_TOKEN``, made by ``cluster.launch``) is
admitted. Faults show at once: a following rank sends a heartbeat every ``beat_s`` seconds, and the
leading rank calls ``Crew.on_lost`` with the cause when one closes its connection (a killed process),
stops beating or cannot be written to. A following rank whose leader is gone exits.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .device import Machine
from .errors import RamserveError
from .records import Plan

log = logging.getLogger("ramserve.crew")


class RankLost(RamserveError):
    """A rank stopped answering, or never connected."""


@dataclass
class Tick:
    ops: list[list[Any]] = field(default_factory=list)  # batch changes, in the order they were made
    step: bool = False  # then run one step of the batch
    close: bool = False  # the leading rank is shutting down


@dataclass(frozen=True)
class Setup:
    """What every rank loads: the model, the whole plan (each rank writes its part from its own copy),
    the cut points, and the runtime shape. Sent at the start and at each variant swap; each
    following rank answers ``{"ready": whether it writes its part}`` or ``{"load_failed": why}``,
    then, told to write (or to cancel), ``{"loaded": plan hash}`` or ``{"load_failed": why}``."""

    model: str
    plan: Plan
    bounds: list[int]
    engine_args: dict[str, Any]

    def to_message(self) -> dict[str, Any]:
        return {"setup": {"model": self.model, "plan": self.plan.to_json(), "bounds": self.bounds,
                          "engine_args": self.engine_args}}  # fmt: skip

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Setup:
        s = message["setup"]
        plan = Plan.from_json(s["plan"], "the plan the leading rank sent")
        return cls(str(s["model"]), plan, [int(b) for b in s["bounds"]], dict(s["engine_args"]))


@dataclass(frozen=True)
class Hello:
    rank: int
    host: str
    machine: Machine


class Lockstep(Protocol):
    """What an engine needs of the channel: the leading rank tells, the others follow."""

    leads: bool

    def tell(self, tick: Tick) -> None: ...

    def ticks(self) -> Iterator[Tick]: ...


_HEADER = struct.Struct("!I")
# A tick carries the prompts that start in it and the tokens of the sequences that end: a few MB at
# the longest contexts.
MAX_MESSAGE = 64 << 20
ORDERS = {"setup", "write", "cancel", "analyse", "go", "stopped"}
# What a following rank answers the leading rank's orders with (``Crew.collect`` waits for each).
ANSWERS = {"loaded", "load_failed", "ready", "analysed", "refused"}


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the other side closed the connection."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    size = _HEADER.unpack(header)[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
    body = _read_exactly(sock, size)
    if body is None:
        return None
    message: dict[str, Any] = json.loads(body)
    return message


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        # a reset is a close with a message of ours unread (at exit, or ``Crew.abandon``)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Crew:
    """The leading rank's side: the following ranks' connections."""

    leads = True

    def __init__(self, address: str, port: int, size: int, *, token: str = "",
                 lost_after_s: float = 10.0) -> None:  # fmt: skip
        self.size, self.token, self.lost_after_s = size, token, lost_after_s
        self.hellos: dict[int, Hello] = {}
        self.lost: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._socks: dict[int, socket.socket] = {}
        self._write = threading.Lock()
        self._answers: dict[int, dict[str, Any]] = {}
        self._answered = threading.Condition()
        self._listener = socket.create_server((address, port), reuse_port=False)
        self.where = f"{address}:{port}"

    def gather(self, timeout_s: float) -> list[Hello]:
        """Wait for every following rank to connect and say hello, in rank order."""
        deadline = time.monotonic() + timeout_s
        while len(self._socks) < self.size - 1:
            self._listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                missing = [r for r in range(1, self.size) if r not in self._socks]
                raise RankLost(
                    f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never "
                    f"connected to {self.where} within {timeout_s:g} s"
                ) from None
            sock.settimeout(self.lost_after_s)
            hello = self._admit(sock)
            if hello is None:
                sock.close()
                continue
            self.hellos[hello.rank] = hello
            self._socks[hello.rank] = sock
        self._listener.close()
        for rank, sock in self._socks.items():
            threading.Thread(target=self._watch, args=(rank, sock), daemon=True,
                             name=f"ramserve-crew-{rank}").start()  # fmt: skip
        return [self.hellos[r] for r in sorted(self.hellos)]

    def _admit(self, sock: socket.socket) -> Hello | None:
        """The hello of a rank this group still waits for, with the launch's token; else None (a
        stray or forged connection is refused, and the wait goes on)."""
        try:
            message = _receive(sock)
            if message is None:
                return None
            rank = message["rank"]
            hello = Hello(rank, str(message["host"]), Machine(**message["machine"]))
            token_ok = hmac.compare_digest(str(message.get("token", "")), self.token)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("refused a connection that sent no valid hello: %s", e)
            return None
        if not token_ok or not isinstance(rank, int) or not 0 < rank < self.size \
                or rank in self._socks:  # fmt: skip
            log.warning("refused a connection claiming rank %r (wrong token, or not awaited)", rank)
            return None
        return hello

    def send_all(self, message: dict[str, Any]) -> None:
        with self._write:
            for rank, sock in self._socks.items():
                try:
                    _send(sock, message)
                except OSError as e:
                    self._lose(rank, f"cannot be reached ({e.strerror or e})")
            if self.lost:
                raise RankLost(self.lost)

    def collect(self) -> dict[int, dict[str, Any]]:
        """Every following rank's answer to the last setup; RankLost if a rank is lost meanwhile."""
        with self._answered:
            self._answered.wait_for(lambda: self.lost or len(self._answers) == self.size - 1)
            if self.lost:
                raise RankLost(self.lost)
            answers, self._answers = self._answers, {}
        return answers

    def tell(self, tick: Tick) -> None:
        if self.lost and tick.close:
            return
        self.send_all(asdict(tick))

    def ticks(self) -> Iterator[Tick]:
        raise RamserveError("the leading rank tells; it does not follow")

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()

    def _watch(self, rank: int, sock: socket.socket) -> None:
        try:
            while (message := _receive(sock)) is not None:
                if "failed" in message:
                    self._lose(rank, f"failed: {message['failed']}")
                    return
                if ANSWERS & message.keys():
                    with self._answered:
                        self._answers[rank] = message
                        self._answered.notify_all()
            self._lose(rank, "closed its connection (its process ended)")
        except TimeoutError:
            self._lose(rank, f"sent no heartbeat for {self.lost_after_s:g} s")
        except OSError as e:
            self._lose(rank, f"failed: {e.strerror or e}")

    def abandon(self, why: str) -> None:
        """This rank failed where the others wait for it, in a pass they run together that no
        order reaches: the group is lost, and its connections are closed, which ends the others
        (their heartbeat fails: ``Hand``)."""
        self._set_lost(why)
        self.close()

    def _lose(self, rank: int, why: str) -> None:
        hello = self.hellos.get(rank)
        self._set_lost(f"rank {rank} ({hello.host if hello else '?'}) {why}")

    def _set_lost(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        log.error("%s", self.lost)
        with self._answered:
            self._answered.notify_all()
        if self.on_lost is not None:
            self.on_lost(self.lost)


class Hand:
    """A following rank's side: its connection to the leading rank."""

    leads = False

    def __init__(self, address: str, port: int, hello: Hello, *, timeout_s: float,
                 token: str = "", beat_s: float = 1.0) -> None:  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock = socket.create_connection((address, port), timeout=5)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RankLost(f"rank {hello.rank} cannot reach the leading rank at "
                                   f"{address}:{port}: {e.strerror or e}") from e  # fmt: skip
                time.sleep(0.2)
        self._sock.settimeout(None)
        self._write = threading.Lock()
        with self._write:
            _send(self._sock, {"rank": hello.rank, "host": hello.host, "token": token,
                               "machine": asdict(hello.machine)})  # fmt: skip
        threading.Thread(target=self._beat, args=(beat_s,), daemon=True,
                         name="ramserve-heartbeat").start()  # fmt: skip

    def tell(self, tick: Tick) -> None:
        raise RamserveError("a following rank does not tell")

    def next_order(self) -> dict[str, Any] | None:
        """The leading rank's next order: a setup, an analysis (``{"analyse": …}``, then
        ``{"go": 1}``), or its ``{"stopped": why}``; None once it has closed. The close of the engine
        before it, which this rank has already seen, is passed over."""
        while (message := _receive(self._sock)) is not None:
            if ORDERS & message.keys():
                return message
        return None

    def answer(self, message: dict[str, Any]) -> None:
        """``{"loaded": ...}`` or ``{"load_failed": why}``: the leading rank waits for every rank's."""
        with self._write:
            _send(self._sock, message)

    def report(self, failure: str) -> None:
        """Tell the leading rank why this rank stops (it names the cause to clients)."""
        with contextlib.suppress(OSError):
            self.answer({"failed": failure})

    def ticks(self) -> Iterator[Tick]:
        while True:
            message = _receive(self._sock)
            if message is None:
                return
            yield Tick(**message)

    def _beat(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            try:
                with self._write:
                    _send(self._sock, {"beat": 1})
            except OSError:
                # The leader is gone: this rank may be blocked in a pass that waits for it.
                log.error("the leading rank is gone; this rank exits")
                os._exit(3)
