"""A model's decoder layers shared out over ranks, and the hidden states relayed between them.

Rank r of n holds layers [start, stop) (``Share``); rank 0 alone also holds the embedding and the head.
A pass over the layers goes up the ranks and back to rank 0 (0 → 1 → … → n-1 → 0), and a backward pass
down them (0 → n-1 → … → 1 → 0): every hop is between neighbours of MLX's ring. Serving
(ramserve/pipeline.py) and the streamed passes of the analysis and the rounding (ramserve/fisher.py,
ramserve/rounding.py) both split the model so; on one machine a pass is one rank's (``alone``)
and nothing is sent.

The analysis's forward passes go through the ranks in chunks of sequences (``Share.chunks``),
pipelined: each rank works on one chunk while the next works on the one before (``ring``, ``up``),
so that the ranks work side by side rather than one after the other. A layer's output for a sequence
does not depend on the other sequences of its batch, so the chunks give what one batch gives.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .errors import RamserveError


@dataclass(frozen=True)
class Share:
    """Rank ``rank`` of ``size`` runs decoder layers [start, stop); its pipelined passes go in
    ``chunks`` chunks of sequences (every rank must be given the same)."""

    rank: int
    size: int
    start: int
    stop: int
    chunks: int = 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


def share_of(bounds: Sequence[int], rank: int, chunks: int = 1) -> Share:
    """``bounds`` are the cut points, first 0 and last the layer count: [0, 3, 7] for two ranks."""
    if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)) or bounds[0] != 0:
        raise RamserveError(f"bounds {list(bounds)} must rise from 0, one range per rank")
    return Share(rank, len(bounds) - 1, bounds[rank], bounds[rank + 1], max(1, chunks))


def alone(layers: int) -> Share:
    """One machine's share: every layer, the embedding and the head."""
    return Share(0, 1, 0, layers)


class _Sends(threading.local):
    """The sends ``up`` queued that may not have been received yet, and the stream they go on: per
    thread, because MLX refuses a stream made in another thread, and a server runs each swap's pass
    on whichever thread its executor gives it."""

    def __init__(self) -> None:
        self.in_flight: list[mx.array] = []
        self.stream: mx.Stream | None = None


_sends = _Sends()


def settle() -> None:
    """Wait until every queued send has been received: before any other relay call, so that the
    messages between two ranks keep their order."""
    mx.eval(_sends.in_flight)
    _sends.in_flight.clear()


def _send(states: list[mx.array], dest: int) -> None:
    settle()
    for a in states:
        mx.eval(mx.distributed.send(a, dest))


def _queue(states: list[mx.array], dest: int) -> None:
    """Send without waiting for the receiver (on a stream of its own, so this rank's work goes on):
    a send waits for its receiver once the link's buffers are full."""
    _sends.stream = _sends.stream or mx.new_stream(mx.cpu)
    for a in states:
        _sends.in_flight.append(mx.distributed.send(a, dest, stream=_sends.stream))
        mx.async_eval(_sends.in_flight[-1])  # type: ignore[no-untyped-call]


def _receive(like: list[mx.array], source: int) -> list[mx.array]:
    settle()
    out = []
    for a in like:  # one at a time: evaluated together, MLX may run the receives in any order
        out.append(mx.distributed.recv_like(a, source))
        mx.eval(out[-1])
    return out


def arrive(share: Share, states: list[mx.array]) -> list[mx.array]:
    """Before this rank's first layer, going up: the previous rank's states (rank 0: its own, from
    the embedding). ``states`` give the shapes and dtypes."""
    return states if share.first else _receive(states, share.rank - 1)


def leave(share: Share, states: list[mx.array]) -> list[mx.array]:
    """After this rank's last layer, going up: sent on to the next rank. Rank 0 gets back the last
    rank's states (the whole model's output, for its head); the others return what they sent."""
    pass_on(share, states)
    return come_back(share, states)


def pass_on(share: Share, states: list[mx.array]) -> None:
    """``leave``'s first half: sent on to the next rank (the last rank's, to rank 0)."""
    if share.size > 1:
        _send(states, (share.rank + 1) % share.size)


def come_back(share: Share, like: list[mx.array]) -> list[mx.array]:
    """``leave``'s second half: rank 0 gets the last rank's states (the others, ``like``)."""
    return _receive(like, share.size - 1) if share.first and share.size > 1 else like


def arrive_down(share: Share, states: list[mx.array]) -> list[mx.array]:
    """Before this rank's last layer, going down (gradients from the head): rank 0 sends its own
    (from the head) to the last rank and gets rank 1's; the last rank gets rank 0's."""
    if share.size == 1:
        return states
    if share.first:
        _send(states, share.size - 1)
        return _receive(states, 1)
    return _receive(states, 0 if share.last else share.rank + 1)


def leave_down(share: Share, states: list[mx.array]) -> list[mx.array]:
    """After this rank's first layer, going down: sent on to the rank before (rank 0 keeps its own,
    for the embedding)."""
    if not share.first:
        _send(states, share.rank - 1)
    return states


def chunk_rows(share: Share, sequences: int) -> list[slice]:
    """The sequences of each chunk of a pipelined pass: ``share.chunks`` runs of nearly equal
    length (fewer when there are fewer sequences); one on one machine (``alone``)."""
    count = min(share.chunks, sequences)
    cuts = [sequences * c // count for c in range(count + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


Work = Callable[[int, mx.array], mx.array]  # chunk c's input to this rank's layers → their output


def ring(share: Share, firsts: list[mx.array], work: Work,
         back: Callable[[int, mx.array], None] | None = None) -> list[mx.array]:  # fmt: skip
    """A pipelined pass up every rank's layers and back to rank 0: chunk c's first-layer input
    ``firsts[c]`` (on ranks after the first, its shape), through each rank's ``work``; rank 0
    takes each chunk's output with ``back`` as it returns, in order. Returns each chunk's output:
    on rank 0 the model's, on the others their own layers'.

    Sends block until received, so rank 0 never has more chunks out than the n - 1 other ranks can
    hold: with that many out, it takes the oldest back before it sends the next."""
    n = share.size
    outs: list[mx.array] = []
    if not share.first:
        for c, like in enumerate(firsts):
            outs.append(work(c, _receive([like], share.rank - 1)[0]))
            _send([outs[-1]], (share.rank + 1) % n)
        return outs
    out: deque[int] = deque()

    def taken(c: int, h: mx.array) -> None:
        outs.append(h)
        if back is not None:
            back(c, h)

    def take() -> None:
        c = out.popleft()
        taken(c, _receive([firsts[c]], n - 1)[0])

    for c, h in enumerate(firsts):
        done = work(c, h)
        if n == 1:
            taken(c, done)
            continue
        if len(out) == n - 1:
            take()
        _send([done], 1)
        out.append(c)
    while out:
        take()
    return outs


def up(share: Share, firsts: list[mx.array], work: Work,
       meanwhile: Callable[[], None] | None = None) -> list[mx.array]:  # fmt: skip
    """A pipelined pass up to the last rank, which runs none of its layers: each rank before it runs
    ``work`` on each chunk as it comes and passes the output on without waiting for it to be
    received. Returns the chunks' inputs to this rank's first layer (rank 0: ``firsts``; later
    ranks receive them, ``firsts`` giving the shapes). ``meanwhile`` runs where this rank would
    otherwise wait: on the last rank before the chunks come, on the others once all are sent."""
    if share.last and meanwhile is not None:
        meanwhile()
    arrived = []
    for c, like in enumerate(firsts):
        h = like if share.first else _receive_one(like, share.rank - 1)
        arrived.append(h)
        if not share.last:
            _queue([work(c, h)], share.rank + 1)
    if not share.last and meanwhile is not None:
        meanwhile()
    return arrived


def _receive_one(like: mx.array, source: int) -> mx.array:
    """A receive that leaves the sends queued before it in flight (``up``'s chunks go on to the next
    rank while this one receives the next chunk)."""
    out = mx.distributed.recv_like(like, source)
    mx.eval(out)
    return out
