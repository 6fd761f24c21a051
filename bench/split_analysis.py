"""The analysis split over ranks (issue 25): does its time divide?

The shared dense model is analysed by one process, then by ranks on MLX's ring over loopback, each
rank its own layers (``profile.analyse_share``, as ``run --hosts`` runs it), cut as ``run --hosts``
cuts them for two equal machines, two uneven ones, and three equal ones.

This machine cannot show it by the wall clock. Its two cores share one core's vector units (a
matmul takes 2.0 x as long while the other core runs one), and a rank waiting in MLX's ring receive
spins (it slows a matmul on the other core just as much). So every process runs on one core, and
each records, in order, the CPU seconds it computed between its sends and receives (every call of
ramserve/relay.py), and those calls. CPU seconds are what a stretch costs whoever else shares the
core (the sending stream's thread, which spins while a queued send waits, is left out: on a
machine of its own it spins on a spare core). From that record:

- *computing s*: a rank's CPU seconds outside the relay calls;
- *separate machines s*: every rank's record replayed in order as if each had a machine of its own:
  each stretch takes its CPU seconds, a receive waits for its send, and a hidden state takes its
  bytes / LINK_BYTES_PER_S to cross (10 Gb Ethernet). Replayed with the wall-clock stretches and
  no link time instead, the same replay gives back the wall clock measured here ("replayed here"),
  which checks the replay.

Usage: python bench/split_analysis.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

DENSE = ROOT.parent / "models" / "code-qwen3-30m"
LINK_BYTES_PER_S = 1.25e9  # 10 Gb Ethernet, the ring between two Macs
UNEVEN_MEMORY = (1.0, 3.0)  # the uneven cut: rank 1 states three times rank 0's memory

Interval = tuple[float, float]


def _phases() -> list[tuple[Any, str]]:
    from ramserve import profile, rounding

    # the self-Fisher, compensation's sampling, its inputs passed up the ranks, the candidates (on
    # the last rank before the inputs come), the rest of the compensation
    return [(profile, "self_fisher"), (rounding, "sampled_sequences"), (rounding, "up"),
            (profile, "_run_analysis"), (profile, "compensation_ratios")]  # fmt: skip


def rank_main(rank: int, bounds: list[int], chunks: int, out: Path) -> None:
    """One rank's (or the one process's) analysis of its share, with every relay call recorded."""
    from ramserve.process import restart_tuned

    restart_tuned()
    import mlx.core as mx

    from ramserve import relay
    from ramserve.profile import analyse_share, settings_key
    from ramserve.settings import load_settings
    from ramserve.source import open_source

    if len(bounds) > 2:
        mx.distributed.init(strict=True, backend="ring")
    source = open_source(str(DENSE), load_settings())
    share = relay.share_of(bounds, rank, chunks)
    events: list[list[Any]] = []
    sending: set[str] = set()  # the threads of the stream ``relay.up`` sends on

    def cpu_now() -> float:
        """This process's CPU seconds, less those of the sending stream's thread, which spins
        while a queued send waits for its receiver (on a machine of its own, on a spare core)."""
        return time.process_time() - sum(thread_seconds(t) for t in sending)

    def traced(kind: str, call: Any) -> Any:
        def run(states: list[mx.array] | mx.array, peer: int) -> Any:
            start, cpu = time.monotonic(), cpu_now()
            threads = set(os.listdir("/proc/self/task"))
            result = call(states, peer)
            if kind == "queue" and not sending:
                sending.update(set(os.listdir("/proc/self/task")) - threads)
            size = sum(a.nbytes for a in (states if isinstance(states, list) else [states]))
            events.append([kind, peer, size, start, time.monotonic(), cpu, cpu_now()])
            return result

        return run

    for name, kind in (("_send", "send"), ("_queue", "queue"), ("_receive", "recv"),
                       ("_receive_one", "recv")):  # fmt: skip
        setattr(relay, name, traced(kind, getattr(relay, name)))
    for module, name in _phases():
        setattr(module, name, marked(getattr(module, name), name, events, cpu_now))
    start, cpu = time.monotonic(), cpu_now()
    part = analyse_share(source, share, True, {}, None, settings_key(source.settings), False)
    out.write_text(json.dumps({"rank": rank, "start": start, "end": time.monotonic(), "cpu": cpu,
                               "cpu_end": cpu_now(), "events": events,
                               "modules": len(part.records)}))  # fmt: skip


def thread_seconds(tid: str) -> float:
    """A thread's CPU seconds (user and system), from /proc."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def marked(call: Any, name: str, events: list[list[Any]], cpu_now: Any) -> Any:
    """``call``, recording when it ended (a mark in the rank's record)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        result = call(*args, **kwargs)
        now, cpu = time.monotonic(), cpu_now()
        events.append(["mark", name, 0, now, now, cpu, cpu])
        return result

    return run


def ring_env(n: int) -> dict[str, str]:
    """The environment for ``n`` ranks on MLX's ring over loopback."""
    from tests.serving import free_ports

    port = free_ports(n)
    hostfile = Path(tempfile.mkdtemp(prefix="ramserve-bench-ring-")) / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    return {**os.environ, "MLX_HOSTFILE": str(hostfile)}


def on_core_0() -> None:
    """Every process on one core, all its threads (see the module's docstring)."""
    os.sched_setaffinity(0, {0})


def run_ranks(bounds: list[int], chunks: int) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="ramserve-bench-split-"))
    n = len(bounds) - 1
    env = ring_env(n) if n > 1 else dict(os.environ)
    ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), json.dumps(bounds),
                               str(chunks), str(folder / f"rank{r}.json")],
                              env={**env, "MLX_RANK": str(r)}, preexec_fn=on_core_0)
             for r in range(n)]  # fmt: skip
    for p in ranks:
        if p.wait() != 0:
            raise SystemExit(f"a rank failed (exit {p.returncode})")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]


def steps(trace: dict[str, Any], clock: str) -> list[list[Any]]:
    """A rank's record in order: computing stretches (their seconds by ``clock``, "wall" or "cpu")
    and relay calls (kind, peer, bytes)."""
    start, end = (
        (trace["start"], trace["end"]) if clock == "wall" else (trace["cpu"], trace["cpu_end"])
    )
    out: list[list[Any]] = []
    for kind, peer, size, *times in trace["events"]:
        began, ended = times[:2] if clock == "wall" else times[2:]
        out += [["compute", began - start], [kind, peer, size]]
        start = ended
    return [*out, ["compute", end - start]]


def replay(ranks: list[list[list[Any]]], link: float, starts: list[float]
           ) -> tuple[list[float], list[dict[str, float]]]:  # fmt: skip
    """Each rank's finishing time when its steps run in order from its start: a receive waits for
    the matching send (messages between two ranks arrive in the order sent), and a hidden state
    takes its bytes / ``link`` to cross (0: at once). Also the time each rank reached each mark."""
    clock = list(starts)
    marks: list[dict[str, float]] = [{} for _ in ranks]
    at = [0] * len(ranks)
    sent: dict[tuple[int, int], list[float]] = {}
    while any(a < len(steps) for a, steps in zip(at, ranks, strict=True)):
        moved = False
        for r, steps in enumerate(ranks):
            while at[r] < len(steps):
                step = steps[at[r]]
                if step[0] == "compute":
                    clock[r] += step[1]
                elif step[0] == "mark":
                    marks[r][step[1]] = clock[r]
                elif step[0] in ("send", "queue"):
                    sent.setdefault((r, step[1]), []).append(
                        clock[r] + (step[2] / link if link else 0)
                    )
                else:
                    queue = sent.get((step[1], r))
                    if not queue:
                        break
                    clock[r] = max(clock[r], queue.pop(0))
                at[r] += 1
                moved = True
        if not moved:
            raise RuntimeError("the records do not replay: a receive has no send")
    return clock, marks


def cuts() -> list[tuple[str, list[int]]]:
    from ramserve.hosts import analysis_bounds
    from ramserve.settings import load_settings
    from ramserve.source import open_source

    source = open_source(str(DENSE), load_settings())
    return [("2 ranks, equal memory", analysis_bounds(source, [1, 1])),
            (f"2 ranks, memory {UNEVEN_MEMORY[0]:g}:{UNEVEN_MEMORY[1]:g}",
             analysis_bounds(source, list(UNEVEN_MEMORY))),
            ("3 ranks, equal memory", analysis_bounds(source, [1, 1, 1]))]  # fmt: skip


def main() -> None:
    from ramserve.fmt import table
    from ramserve.settings import load_settings

    settings = load_settings()
    layers = int(json.loads((DENSE / "config.json").read_text())["num_hidden_layers"])
    alone = run_ranks([0, layers], 1)[0]
    wall = alone["end"] - alone["start"]
    ends, alone_marks = replay([steps(alone, "cpu")], 0, [0.0])
    one = ends[0]  # its CPU seconds, the measure the ranks' separate machines are replayed with
    rows: list[dict[str, Any]] = [{"run": "one process", "rank": 0, "layers": f"0-{layers - 1}",
                                   "wall_s": round(wall, 1), "waiting_s": 0.0,
                                   "computing_s": round(one, 1), "replayed_here_s": round(wall, 1),
                                   "separate_s": round(one, 1), "x_one": 1.0}]  # fmt: skip
    phases: list[tuple[str, list[dict[str, float]]]] = [("one process", alone_marks)]
    for name, bounds in cuts():
        n = len(bounds) - 1
        traces = run_ranks(bounds, n * settings.hosts.relay_chunks_per_rank)
        solo = [steps(t, "cpu") for t in traces]
        measured = [steps(t, "wall") for t in traces]
        origin = min(t["start"] for t in traces)
        here, _ = replay(measured, 0, [t["start"] - origin for t in traces])
        apart, marks = replay(solo, LINK_BYTES_PER_S, [0.0] * n)
        phases.append((name, marks))
        for r, t in enumerate(traces):
            wall = t["end"] - origin
            waited = sum(e[4] - e[3] for e in t["events"])
            rows.append({"run": name, "rank": r,
                         "layers": f"{bounds[r]}-{bounds[r + 1] - 1}", "wall_s": round(wall, 1),
                         "waiting_s": round(waited, 1),
                         "computing_s": round(sum(s[1] for s in solo[r] if s[0] == "compute"), 1),
                         "replayed_here_s": round(here[r], 1),
                         "separate_s": round(apart[r], 1),
                         "x_one": round(apart[r] / one, 2)})  # fmt: skip
    print(f"every process on one core; link {LINK_BYTES_PER_S / 1e9:g} GB/s")
    print(table(["run", "rank", "layers", "wall s here", "waiting s", "computing s (CPU)",
                 "replayed here s", "separate machines s", "x one process"],
                [list(r.values()) for r in rows]))  # fmt: skip
    names = [name for _, name in _phases()]
    print("\nwhen each phase ended on separate machines (s): " + ", ".join(names))
    print(table(["run", "rank", *names],
                [(run, r, *(f"{m.get(p, float('nan')):.1f}" for p in names))
                 for run, marks in phases for r, m in enumerate(marks)]))  # fmt: skip
    print(
        json.dumps({"bench": "split_analysis", "link_bytes_per_s": LINK_BYTES_PER_S, "rows": rows})
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
