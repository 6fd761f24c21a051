"""Several machines: the hostfile, each host's weight budget, and the split of the model's layers over
the hosts chosen together with the plan.

Each rank takes a contiguous range of decoder layers; the first also holds the embedding and the head
(ramserve/pipeline.py: the last rank's output comes back to it, and it alone computes the logits and
samples). A rank's weight budget is its usable memory minus its runtime and the KV cache of
its own layers. For a candidate range, the rank's plan is the least-damage one that fits its budget
(the single-machine solver on its modules, ``plan.fit_loaded``), so the cost of a split is the sum of
its ranks' predicted damage, and the best split is found by dynamic programming over the cut points:
``best[r][j]`` is the least damage of ranks 0..r holding layers 0..j-1. A range's damage only grows
as it takes more layers, and once it no longer fits it never will again, so each rank's scan stops
at the first range that does not fit.

The hostfile is ``mlx.launch``'s: a JSON list of ``{"ssh": host, "ips": [...]}``; ramserve reads an
optional ``"memory_gb"`` per host, the memory that host may count on (as ``[budget] memory_gb`` does
for one machine). Without it, a host's memory is known only once its rank runs there.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import Solution
from .budget import (
    Ask,
    Budget,
    activation_dtype,
    activation_shape,
    budget_for,
    default_shape,
    kv_shape,
    machine_budget,
)
from .device import FLOAT_BYTES, Machine
from .errors import BudgetError, RamserveError
from .fmt import human_bytes, meter, table
from .plan import assemble_plan, fit_loaded, make_plan, memory_bytes, problem_of
from .records import BudgetAsk, Plan, Profile, SafetyFloor
from .source import Source, layer_index, model_classes


class HostfileError(RamserveError):
    """A hostfile that cannot be read or says something impossible."""


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...] = ()
    memory_gb: float | None = None  # what the host may count on; None: measured by its rank
    # JACCL's row for this host: the RDMA device reaching each other host (None for itself)
    rdma: tuple[str | None, ...] = ()


def read_hostfile(path: Path) -> list[Host]:
    """The hosts of an ``mlx.launch`` hostfile, in rank order."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise HostfileError(f"hostfile {path} is not JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise HostfileError(f"hostfile {path} must be a JSON list of hosts, as mlx.launch reads")
    hosts = []
    for i, entry in enumerate(data):
        where = f"hostfile {path}, host {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise HostfileError(f'{where}: each host is an object with "ssh" (its host name)')
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise HostfileError(f'{where}: "ips" must be a list of addresses')
        memory = entry.get("memory_gb")
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int | float)
                                   or memory <= 0):  # fmt: skip
            raise HostfileError(f'{where}: "memory_gb" must be a positive number of GiB')
        rdma = entry.get("rdma", [])
        if not isinstance(rdma, list) or (rdma and (
                len(rdma) != len(data) or rdma[i] is not None
                or not all(isinstance(d, str) for j, d in enumerate(rdma) if j != i))):  # fmt: skip
            raise HostfileError(f'{where}: "rdma" must name the RDMA device to each of the '
                                f"{len(data)} hosts, with null for itself (as mlx.distributed_config "
                                "--backend jaccl writes it)")  # fmt: skip
        hosts.append(Host(entry["ssh"], tuple(ips), float(memory) if memory is not None else None,
                          tuple(rdma)))  # fmt: skip
    return hosts


def host_machine(host: Host, rank: int) -> Machine:
    if host.memory_gb is None:
        raise HostfileError(
            f'host {rank} ({host.ssh}) states no "memory_gb": planning from here needs each '
            "host's memory (under mlx.launch every rank measures its own)"
        )
    total = int(host.memory_gb * 2**30)
    return Machine(f"{host.ssh} (stated: {host.memory_gb:g} GiB)", total, total, None, False)


@dataclass
class Part:
    """One rank's share of the model: its layers, what else it holds, its budget and plan."""

    rank: int
    host: str
    layers: tuple[int, int]  # [start, stop)
    holds: tuple[str, ...]  # besides its layers: "embedding", "head"
    budget: Budget  # its memory, runtime and KV cache of its own layers
    modules: list[str]
    memory_bytes: int  # its weights as loaded
    stored_bytes: int
    damage: float
    parameters: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(self.parameters, 1)

    def to_json(self) -> dict[str, Any]:
        b = self.budget.to_json()
        return {"rank": self.rank, "host": self.host, "layers": list(self.layers),
                "holds": list(self.holds), "weight_budget": self.budget.weights,
                "memory_bytes": self.memory_bytes, "stored_bytes": self.stored_bytes,
                "bits_per_weight": self.bits_per_weight, "predicted_damage": self.damage,
                "modules": len(self.modules), "budget": b}  # fmt: skip


@dataclass
class Split:
    parts: list[Part]
    plan: Plan  # the whole model's plan (rank 0 holds it)
    seconds: float
    ranges_tried: int  # ranges whose plan was solved
    tensor_parallel: str | None = None  # where the other way to split would also do, why not it

    @property
    def damage(self) -> float:
        return sum(p.damage for p in self.parts)

    @property
    def bounds(self) -> list[int]:
        """The cut points: 0, then each rank's last layer + 1 (ramserve/pipeline.py's ``share_of``)."""
        return [0, *(p.layers[1] for p in self.parts)]

    def to_json(self) -> dict[str, Any]:
        return {"parts": [p.to_json() for p in self.parts], "predicted_damage": self.damage,
                "seconds": self.seconds, "ranges_tried": self.ranges_tried,
                "tensor_parallel": self.tensor_parallel,
                "plan": self.plan.summary()}  # fmt: skip


Solved = tuple[float, np.ndarray, list[int]]  # damage, the choice per row, the rows


def layers_for(source: Source, hosts: int) -> int:
    """The model's decoder layers, at least one for each of ``hosts``."""
    layers = int(source.config["num_hidden_layers"])
    if hosts > layers:
        raise HostfileError(
            f"{hosts} hosts for {layers} layers: each host needs at least one layer"
        )
    return layers


class Ranks:
    """What a candidate range costs each rank: its budget and its plan, solved on demand."""

    def __init__(self, source: Source, profile: Profile, hosts: list[Host], ask: Ask,
                 machines: list[Machine] | None = None) -> None:  # fmt: skip
        settings = source.settings
        self.profile, self.hosts, self.settings = profile, hosts, settings
        self.layers = layers_for(source, len(hosts))
        self.kv, self.act = kv_shape(source), activation_shape(source)
        self.shape = default_shape(self.kv, settings, ask.context, ask.parallel, ask.kv_bits or 16)
        self.float_bytes = FLOAT_BYTES[activation_dtype(source)]  # the runtime's, as loaded
        self.machines = machines or [host_machine(h, r) for r, h in enumerate(hosts)]
        self.problem = problem_of(profile, settings, False)
        modules = profile.modules
        self.embedding = [i for i, m in enumerate(modules) if m.kind == "embedding"]
        self.head = [i for i, m in enumerate(modules) if m.kind == "lm_head"]
        self.by_layer = [
            [i for i, m in enumerate(modules) if m.layer == n] for n in range(self.layers)
        ]
        self.tied = not self.head
        self.solved: dict[tuple[int, int, int], Solved | None] = {}

    def budget(self, rank: int, start: int, stop: int) -> Budget:
        kv = replace(self.kv, layers=self.kv.layers[start:stop])
        return budget_for(kv, self.act, self.settings, self.shape, machine=self.machines[rank])

    def rows(self, rank: int, start: int, stop: int) -> list[int]:
        rows = [i for n in range(start, stop) for i in self.by_layer[n]]
        return self.embedding + rows + self.head if rank == 0 else rows

    def holds(self, rank: int) -> tuple[str, ...]:
        if rank != 0:
            return ()
        return ("embedding (the tied head)",) if self.tied else ("embedding", "head")

    def solve(self, rank: int, start: int, stop: int) -> Solved | None:
        """The least damage of the rank's modules within its budget, its choice per row, and the
        rows; None when even their smallest safe plan does not fit. Solved once per range: the
        search, the split it picks and a brute-force check all ask again."""
        key = (rank, start, stop)
        if key not in self.solved:
            self.solved[key] = self._solve(rank, start, stop)
        return self.solved[key]

    def _solve(self, rank: int, start: int, stop: int) -> Solved | None:
        rows = self.rows(rank, start, stop)
        room = self.budget(rank, start, stop).weights
        sub = self.problem.rows(rows, self.fixed_share)
        profile = replace(self.profile, modules=[self.profile.modules[i] for i in rows],
                          fixed_bytes=self.fixed_share)  # fmt: skip
        if room <= 0 or memory_bytes(profile, sub.min_choice(), self.float_bytes) > room:
            return None
        all16 = np.zeros(len(rows), dtype=np.int64)
        if memory_bytes(profile, all16, self.float_bytes) <= room:
            return 0.0, all16, rows
        solution = fit_loaded(sub, profile, room, self.float_bytes)
        return None if solution is None else (solution.damage, solution.choice, rows)

    def memory(self, rows: list[int], picked: np.ndarray) -> int:
        """The bytes of these modules, as chosen, once loaded, with the rank's fixed share."""
        sub = replace(self.profile, modules=[self.profile.modules[i] for i in rows],
                      fixed_bytes=self.fixed_share)  # fmt: skip
        return memory_bytes(sub, picked, self.float_bytes)

    def part(self, rank: int, start: int, stop: int, picked: np.ndarray, damage: float) -> Part:
        """Rank ``rank`` holding layers [start, stop) with its modules' choices ``picked``."""
        rows, modules = self.rows(rank, start, stop), self.profile.modules
        stored = self.fixed_share + int(self.problem.bytes[rows, picked].sum())
        return Part(rank, self.hosts[rank].ssh, (start, stop), self.holds(rank),
                    self.budget(rank, start, stop), [modules[i].path for i in rows],
                    self.memory(rows, picked), stored, damage,
                    sum(modules[i].numel for i in rows))  # fmt: skip

    @property
    def fixed_share(self) -> int:
        """Each rank is charged all the tensors no plan chooses for (norms: a few MB at most), so
        that every rank's budget holds its own wherever the cut falls."""
        return self.profile.fixed_bytes


def split(source: Source, profile: Profile, hosts: list[Host], ask: Ask,
          machines: list[Machine] | None = None) -> Split:  # fmt: skip
    """The contiguous layer ranges and per-rank plans with the least total predicted damage; each
    host's memory is ``machines``' (what its rank measured), else the hostfile's ``memory_gb``."""
    start_time = time.perf_counter()
    ranks = Ranks(source, profile, hosts, ask, machines)
    best, cut = _search(ranks)
    n, layers = len(hosts), ranks.layers
    if not math.isfinite(best[n - 1][layers]):
        raise BudgetError(_no_split(ranks))
    bounds = _bounds(cut, layers)
    choice = np.zeros(len(profile.modules), dtype=np.int64)
    parts = []
    for r in range(n):
        solved = ranks.solve(r, bounds[r], bounds[r + 1])
        assert solved is not None  # the search found it fits
        damage, picked, rows = solved
        choice[rows] = picked
        parts.append(ranks.part(r, bounds[r], bounds[r + 1], picked, damage))
    plan = whole_plan(ranks, choice, parts)
    return Split(parts, plan, time.perf_counter() - start_time, len(ranks.solved),
                 tensor_parallel_note(source, ranks, sum(p.memory_bytes for p in parts)))  # fmt: skip


def split_for(source: Source, profile: Profile, hosts: list[Host], ask: Ask, spec: str = "auto",
              machines: list[Machine] | None = None) -> Split:  # fmt: skip
    """The split for a budget spec: for ``auto`` and ``max`` (the most these hosts hold) the split
    chooses each host's plan; any other budget's plan is the one-machine plan, spread."""
    if spec in ("auto", "max"):
        return split(source, profile, hosts, ask, machines)
    ranks = Ranks(source, profile, hosts, ask, machines)
    plan = make_plan(profile, spec, source.settings, machine=machine_budget(source, ranks.shape))
    return spread(ranks, plan)


def spread(ranks: Ranks, plan: Plan) -> Split:
    """A plan chosen for the whole model (a budget variant: ``name@6GB``), spread over the hosts.

    Its modules keep their choices, so only the cut points are searched: by dynamic programming, the
    contiguous ranges whose fullest host is least full (each host's weights over its budget). A
    BudgetError names the closest split where none fits."""
    start_time = time.perf_counter()
    profile = ranks.profile
    choice = plan_choice(profile, plan)
    n, layers = len(ranks.hosts), ranks.layers
    tried = 0

    def fill(r: int, start: int, stop: int) -> float:
        nonlocal tried
        tried += 1
        room = ranks.budget(r, start, stop).weights
        rows = ranks.rows(r, start, stop)
        return ranks.memory(rows, choice[rows]) / room if room > 0 else math.inf

    # fullest[r][j]: the least "fullest host" of ranks 0..r holding layers [0, j); cut as in _search
    fullest = [[math.inf] * (layers + 1) for _ in range(n)]
    cut = [[-1] * (layers + 1) for _ in range(n)]
    for stop in range(1, layers - n + 2):
        fullest[0][stop] = fill(0, 0, stop)
    for r in range(1, n):
        stops = [layers] if r == n - 1 else range(r + 1, layers - (n - r - 1) + 1)
        for stop in stops:
            for start in range(r, stop):
                worst = max(fullest[r - 1][start], fill(r, start, stop))
                if worst < fullest[r][stop]:
                    fullest[r][stop], cut[r][stop] = worst, start
    if not math.isfinite(fullest[n - 1][layers]):
        raise BudgetError(_no_split(ranks))
    bounds = _bounds(cut, layers)
    parts = []
    for r in range(n):
        rows = ranks.rows(r, bounds[r], bounds[r + 1])
        damage = sum(plan.choices[profile.modules[i].path].damage for i in rows)
        parts.append(ranks.part(r, bounds[r], bounds[r + 1], choice[rows], damage))
    if fullest[n - 1][layers] > 1:
        full = max(parts, key=lambda p: p.memory_bytes / max(p.budget.weights, 1))
        raise BudgetError(
            f"the {plan.budget.spec} plan ({human_bytes(plan.memory_bytes)} once loaded) fits no "
            f"split over these hosts: at best {full.host} holds "
            f"{human_bytes(full.memory_bytes)} of weights in a budget of "
            f"{human_bytes(max(full.budget.weights, 0))}"
        )
    return Split(parts, plan, time.perf_counter() - start_time, tried)


def _bounds(cut: list[list[int]], layers: int) -> list[int]:
    """The cut points a search chose: 0, each rank's first layer, then the number of layers."""
    bounds = [layers]
    for r in range(len(cut) - 1, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    return [0, *reversed(bounds)]


def plan_choice(profile: Profile, plan: Plan) -> np.ndarray:
    """Each module's candidate (its index in the profile's options) as the plan chose it."""
    choices = plan.choices
    picked = [m.option_index(choices[m.path].bits, choices[m.path].group_size)
              for m in profile.modules]  # fmt: skip
    return np.array(picked, dtype=np.int64)


def _search(ranks: Ranks) -> tuple[list[list[float]], list[list[int]]]:
    """best[r][j]: least damage of ranks 0..r on layers [0, j); cut[r][j]: where rank r starts."""
    n, layers = len(ranks.hosts), ranks.layers
    inf = math.inf
    best = [[inf] * (layers + 1) for _ in range(n)]
    cut = [[-1] * (layers + 1) for _ in range(n)]
    for stop in range(1, layers - n + 2):  # rank 0 on [0, stop)
        solved = ranks.solve(0, 0, stop)
        if solved is None:
            break
        best[0][stop] = solved[0]
    for r in range(1, n):
        last = r == n - 1
        for start in range(r, layers - (n - r) + 1):
            if not math.isfinite(best[r - 1][start]):
                continue
            stops = [layers] if last else range(start + 1, layers - (n - r - 1) + 1)
            for stop in stops:
                solved = ranks.solve(r, start, stop)
                if solved is None:
                    break  # more layers never fit where fewer did not
                total = best[r - 1][start] + solved[0]
                if total < best[r][stop]:
                    best[r][stop], cut[r][stop] = total, start
    return best, cut


def tensor_parallel_note(source: Source, ranks: Ranks, weights: int) -> str | None:
    """Where mlx-lm could also shard every layer of the model over these hosts (its ``Model.shard``:
    each host holds 1/N of every weight and of the KV cache, so the smallest host bounds it), whether
    that would be faster than the pipeline, and why it is not used."""
    if not hasattr(model_classes(source.config)[0], "shard"):
        return None
    n = len(ranks.hosts)
    rooms = []
    for r in range(n):
        whole = ranks.budget(r, 0, ranks.layers)  # every layer's KV cache; it would hold 1/N
        rooms.append(whole.weights + whole.kv * (n - 1) // n)
    if n * min(rooms) < weights:
        return None
    return (
        f"mlx-lm's tensor parallelism would also fit {source.model_type} on these hosts, each "
        "holding 1/N of every layer: each host then reads 1/N of the weights per token, so one "
        "stream could decode up to N x faster, but only over links with microsecond latency "
        "(JACCL over Thunderbolt 5); over the ring's TCP its two all-reduces per layer cost more "
        "(measured: docs/measurements.md, bench/parallel.py). ramserve splits by layers, which "
        "also lets each host's plan fit its own memory"
    )


def whole_plan(ranks: Ranks, choice: np.ndarray, parts: list[Part]) -> Plan:
    """One plan for the whole model: each module as its rank chose it."""
    problem, profile = ranks.problem, ranks.profile
    budget = sum(p.budget.weights for p in parts)
    stored = problem.bytes_of(choice)
    damage = float(sum(p.damage for p in parts))
    solution = Solution(choice, stored, damage, damage, 0.0, 0)
    loaded = memory_bytes(profile, choice, ranks.float_bytes)
    floor = SafetyFloor(ranks.settings.allocate.min_sqnr_db, False)
    note = " | ".join(
        f"rank {p.rank} {p.host}: layers {p.layers[0]}-{p.layers[1] - 1}" for p in parts
    )
    return assemble_plan(profile, BudgetAsk(f"hosts x{len(parts)}", budget), solution, floor, note,
                 (ranks.float_bytes, loaded), ranks.settings.rounding.record())  # fmt: skip


def _no_split(ranks: Ranks) -> str:
    """Why nothing fits: each host's budget for an even share, against what that share needs."""
    n, layers = len(ranks.hosts), ranks.layers
    lines = []
    for r in range(n):
        start, stop = r * layers // n, (r + 1) * layers // n
        b = ranks.budget(r, start, stop)
        sub = ranks.problem.rows(ranks.rows(r, start, stop), ranks.fixed_share)
        lines.append(f"{ranks.hosts[r].ssh} with layers {start}-{stop - 1} has "
                     f"{human_bytes(max(b.weights, 0))} for weights, needs {human_bytes(sub.min_bytes())}")  # fmt: skip
    return ("no split of the model over these hosts fits, even at the smallest safe plan: "
            + "; ".join(lines) + "; add memory (memory_gb), a host, or a shorter --context")  # fmt: skip


def analysis_work(source: Source) -> tuple[float, list[float]]:
    """The analysis's work outside the layers (rank 0's: the embedding, the head, the norms) and in
    each layer, counted in parameters: each parameter's candidates are measured once, and a
    parameter counts once more for every forward pass of the compensation that multiplies by it: a
    layer's in every sampling sweep and in the pass that gives its inputs, the head's (a tied one is
    the embedding) in every sweep, for the logits; an embedding's in none, its rows being looked
    up. (The self-Fisher's passes run on far fewer tokens.)"""
    r = source.settings.rounding
    sweeps, inputs = (r.sweeps, 1) if r.method == "compensated" else (0, 0)
    head = f"{source.untied_head or next(m.path for m in source.modules if m.kind == 'embedding')}."
    layers = [0.0] * int(source.config["num_hidden_layers"])
    outer = 0.0
    for key, shape in source.tensor_shapes.items():
        i, count = layer_index(key), math.prod(shape)
        if i is None:
            outer += count * (1 + (sweeps if key.startswith(head) else 0))
        else:
            layers[i] += count * (1 + sweeps + inputs)
    return outer, layers


def analysis_bounds(source: Source, memories: list[int]) -> list[int]:
    """The cut points each rank analyses by, before there is a profile to split by: each rank's
    layers (and rank 0's embedding and head) such that its share of the analysis's work
    (``analysis_work``) follows its share of the memory, every rank at least one layer. Equal
    machines get equal work, so that the analysis's time divides; and as the split the plan then
    chooses also weighs memory, it is near this one, so each rank mostly reads the weights it will
    serve."""
    n = len(memories)
    layers = layers_for(source, n)
    outer, work = analysis_work(source)
    reached = np.cumsum([outer + work[0], *work[1:]])  # after each layer, rank 0's outer first
    whole, total = float(reached[-1]), float(sum(memories))
    bounds = [0]
    for r in range(1, n):
        target = whole * sum(memories[:r]) / total
        cut = int(np.argmin(np.abs(reached[:-1] - target))) + 1  # layers [0, cut) before it
        bounds.append(min(max(cut, bounds[-1] + 1), layers - (n - r)))
    return [*bounds, layers]


def relay_chunks(source: Source, bounds: list[int], machines: list[Machine]) -> int:
    """How many chunks of sequences the pipelined passes go in (ramserve/relay.py; rank 0 tells the
    others, which must agree): ``[hosts] relay_chunks_per_rank`` per rank where each rank's layers
    fit in its free memory, so that the page cache keeps their weights between chunks; else one
    per rank, so that no rank reads more from its disk in a pass than one process reading the
    whole model once."""
    stored = [0] * (bounds[-1])
    for key, shape in source.tensor_shapes.items():
        if (i := layer_index(key)) is not None:
            stored[i] += math.prod(shape) * FLOAT_BYTES.get(source.tensor_dtypes[key], 2)
    n = len(bounds) - 1
    held = all(sum(stored[bounds[r] : bounds[r + 1]]) <= machines[r].available for r in range(n))
    return n * (source.settings.hosts.relay_chunks_per_rank if held else 1)


def render_split(s: dict[str, Any]) -> str:
    rows = [(p["rank"], p["host"], f"{p['layers'][0]}-{p['layers'][1] - 1}", ", ".join(p["holds"]) or "-",
             human_bytes(p["weight_budget"]), human_bytes(p["memory_bytes"]),
             meter(p["memory_bytes"] / max(p["weight_budget"], 1)),
             f"{p['bits_per_weight']:.2f}", f"{p['predicted_damage']:.4g}") for p in s["parts"]]  # fmt: skip
    headers = ["rank", "host", "layers", "also", "weight budget", "weights", "budget used", "bpw",
               "damage"]  # fmt: skip
    out = [table(headers, rows)]
    out.append(f"the {s['plan']['budget']} plan: predicted damage {s['predicted_damage']:.4g} in "
               f"all; the split and plans solved in {1000 * s['seconds']:.0f} ms "
               f"({s['ranges_tried']} ranges tried)")  # fmt: skip
    if s.get("tensor_parallel"):
        out.append(s["tensor_parallel"])
    return "\n".join(out)


def render_host_budgets(s: dict[str, Any]) -> str:
    rows = []
    for p in s["parts"]:
        b = p["budget"]
        line = {ln["label"]: ln["bytes"] for ln in b["lines"]}
        rows.append((p["rank"], p["host"], human_bytes(line["total memory"]),
                     human_bytes(line["OS reserve"]), human_bytes(b["runtime"]),
                     f"{human_bytes(b['kv'])} ({p['layers'][1] - p['layers'][0]} layers)",
                     human_bytes(b["weights"])))  # fmt: skip
    return table(["rank", "host", "memory", "OS reserve", "runtime", "KV cache", "weights"], rows)
