"""The pipelined passes of ramserve/relay.py on 2 and 3 ranks over loopback (MLX's ring, started by
``mlx.launch``): each chunk comes through every rank's work in order, the ranks work side by side,
and ``up`` neither waits for its receivers nor deadlocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .serving import free_ports

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES, WIDTH = 7, 1 << 20  # a chunk of one sequence is 4 MB: more than a socket's buffer
WORK_S, MEANWHILE_S = 0.3, 2.5

HUNG_S = 60  # a pass takes seconds: a rank still running then dumps every thread's stack and exits

SCRIPT = f"""
import faulthandler, json, sys, threading, time
faulthandler.dump_traceback_later({HUNG_S}, exit=True)
import mlx.core as mx
from ramserve import relay

group = mx.distributed.init(strict=True, backend="ring")
rank, n, chunks, pass_kind = group.rank(), group.size(), int(sys.argv[1]), sys.argv[2]
share = relay.share_of(list(range(n + 1)), rank, chunks)  # a layer each
rows = relay.chunk_rows(share, {SEQUENCES})
x = mx.broadcast_to(mx.arange({SEQUENCES}, dtype=mx.float32)[:, None], ({SEQUENCES}, {WIDTH}))
firsts = [x[r] if share.first else mx.zeros_like(x[r]) for r in rows]
log = []

def work(c, h):
    began = time.monotonic()
    time.sleep({WORK_S})
    out = h * 2 + rank  # each rank's own step, so the order of the steps shows
    mx.eval(out)
    log.append(["work", c, began, time.monotonic()])
    return out

def meanwhile():
    began = time.monotonic()
    time.sleep({MEANWHILE_S})
    log.append(["meanwhile", -1, began, time.monotonic()])

out = []
if pass_kind == "ring":
    relay.ring(share, firsts, work, lambda c, h: out.append([c, h[:, 0].tolist()]))
else:
    def one_pass():
        arrived = relay.up(share, firsts, work, meanwhile)
        log.append(["arrived", -1, time.monotonic(), time.monotonic()])
        out[:] = [[c, h[:, 0].tolist()] for c, h in enumerate(arrived)]
        relay.settle()
    one_pass()
    if pass_kind == "up, then up on another thread":  # as a server's swap runs it
        log.clear()
        out.clear()  # a second pass that fails in its thread leaves nothing, not the first's
        thread = threading.Thread(target=one_pass)
        thread.start()
        thread.join()
print(json.dumps({{"rank": rank, "log": log, "out": out, "rows": [[r.start, r.stop] for r in rows]}}))
"""


def run_ranks(tmp_path: Path, ranks: int, kind: str) -> tuple[list[dict[str, Any]], list[range]]:
    """Each rank's record of one pass in two chunks per rank, and each chunk's sequences."""
    chunks = 2 * ranks
    script = tmp_path / "relay_pass.py"
    script.write_text(SCRIPT)
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring",
           "--starting-port", str(free_ports(ranks)), "--python", sys.executable, str(script),
           str(chunks), kind]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * HUNG_S, cwd=ROOT)
    lines = sorted((json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")),
                   key=lambda ln: ln["rank"])  # fmt: skip
    # mlx.launch exits 0 when a rank fails alone: every rank must have printed its record
    assert done.returncode == 0 and [ln["rank"] for ln in lines] == list(range(ranks)), \
        done.stderr[-6000:]  # fmt: skip
    rows = [range(*r) for r in lines[0]["rows"]]
    assert len(rows) == chunks and [s for r in rows for s in r] == list(range(SEQUENCES))
    return lines, rows


def through(value: float, ranks: range) -> float:
    for r in ranks:
        value = value * 2 + r
    return value


def assert_came_through(got: list[Any], rows: list[range], ranks: range) -> None:
    """Every chunk, in order, each of its sequences through the steps of ``ranks`` in order."""
    assert [c for c, _ in got] == list(range(len(rows)))
    for c, values in got:
        assert values == [through(s, ranks) for s in rows[c]]


def intervals(rank: dict[str, Any], kind: str) -> dict[int, tuple[float, float]]:
    return {c: (a, b) for k, c, a, b in rank["log"] if k == kind}


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_ring_pass_brings_every_chunk_back_through_every_rank_side_by_side(
    tmp_path: Path, ranks: int
) -> None:
    out, rows = run_ranks(tmp_path, ranks, "ring")
    chunks = len(rows)
    assert_came_through(out[0]["out"], rows, range(ranks))  # rank 0 takes every chunk back
    assert all(not r["out"] for r in out[1:])
    # side by side: rank 1 works on a chunk while rank 0 works on the next one
    first, second = intervals(out[0], "work"), intervals(out[1], "work")
    assert len(first) == len(second) == chunks
    assert any(second[c][0] < first[c + 1][1] and first[c + 1][0] < second[c][1]
               for c in range(chunks - 1))  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 3])
def test_up_passes_every_chunk_to_the_last_rank_without_waiting_for_it(
    tmp_path: Path, ranks: int
) -> None:
    out, rows = run_ranks(tmp_path, ranks, "up")
    last = out[-1]
    # what reaches the last rank went through every rank before it, in order; it runs no step
    assert_came_through(last["out"], rows, range(ranks - 1))
    assert not intervals(last, "work")
    for r in out[:-1]:  # each rank's own input, as it came
        assert [v for _, values in r["out"] for v in values] == \
            [through(s, range(r["rank"])) for s in range(SEQUENCES)]  # fmt: skip
    # the last rank's meanwhile runs before it receives. The rank before it does not wait for it to
    # receive (4 MB a chunk or more: beyond the link's buffers, a second send would wait): it is
    # on its third chunk before the last rank receives any. The ranks before the last run their
    # meanwhile once they have sent every chunk.
    waited = intervals(last, "meanwhile")[-1]
    assert intervals(last, "arrived")[-1][0] >= waited[1]
    assert intervals(out[-2], "work")[2][0] < waited[1]
    for r in out[:-1]:
        assert max(b for _, b in intervals(r, "work").values()) <= intervals(r, "meanwhile")[-1][0]


def test_up_runs_again_on_a_thread_other_than_the_first_passs(tmp_path: Path) -> None:
    """A server runs each swap's pass on whichever thread its executor gives it: the second pass,
    on a new thread, queues its sends on a stream of that thread (MLX refuses another's) and
    brings every chunk through again."""
    out, rows = run_ranks(tmp_path, 2, "up, then up on another thread")
    assert_came_through(out[-1]["out"], rows, range(1))
    assert len(intervals(out[0], "work")) == len(rows)  # the second pass's own steps
