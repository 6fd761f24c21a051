"""Several machines: the hostfile, and the split of the layers chosen with each host's plan, checked
against every split there is on small instances."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ramserve.budget import Ask
from ramserve.errors import BudgetError, RamserveError
from ramserve.hosts import (
    Host,
    HostfileError,
    Ranks,
    analysis_bounds,
    analysis_work,
    plan_choice,
    read_hostfile,
    relay_chunks,
    split,
    split_for,
)
from ramserve.plan import make_plan, memory_bytes
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import DENSE, shared_model
from .factory import make_model
from .serving import host_memory_gb

ASK = Ask(context=1024, parallel=1)


def weights_gb(mib: float) -> float:
    """A host's memory_gb that leaves about ``mib`` MiB for weights beside the shared dense model's
    runtime and its whole KV cache (at ASK's shape), after the OS reserve of 2 GiB."""
    return host_memory_gb(shared_model(DENSE), mib, ASK)


def brute_force(ranks: Ranks) -> float:
    """The least total damage over every contiguous split (each host at least one layer)."""
    n, layers = len(ranks.hosts), ranks.layers
    best = math.inf
    for cuts in itertools.combinations(range(1, layers), n - 1):
        bounds = [0, *cuts, layers]
        total = 0.0
        for r in range(n):
            solved = ranks.solve(r, bounds[r], bounds[r + 1])
            if solved is None:
                total = math.inf
                break
            total += solved[0]
        best = min(best, total)
    return best


@pytest.mark.parametrize(
    "mibs",
    [
        (24, 46),
        (46, 24),
        (28, 28),
        (21, 21),
        (19, 56),
        (1, 1),
        (22, 26, 30),
        (36, 21, 25),
        (25,) * 4,
    ],
)
def test_the_split_is_the_best_of_every_split(profile_cache, mibs: tuple[float, ...]) -> None:
    model = shared_model(DENSE)
    source = open_source(str(model), load_settings())
    profile = profile_cache(model)
    hosts = [Host(f"h{i}", (), weights_gb(m)) for i, m in enumerate(mibs)]
    ranks = Ranks(source, profile, hosts, ASK)
    exhaustive = brute_force(ranks)
    try:
        found = split(source, profile, hosts, ASK)
    except BudgetError:
        assert math.isinf(exhaustive)
        return
    assert found.damage == pytest.approx(exhaustive, rel=1e-9, abs=1e-15)
    # Where each host could hold 1/N of every layer, mlx-lm's tensor parallelism (qwen3 has it) is
    # weighed: 4 x 25 MiB holds the plan's ~85 MiB; 24 + 46 MiB does not, as 2 x 24 MiB.
    if mibs in ((25,) * 4, (24, 46)):
        assert (found.tensor_parallel is not None) == (mibs == (25,) * 4)
    # Contiguous, covering every layer once, the embedding first and the head last.
    bounds = [p.layers for p in found.parts]
    assert bounds[0][0] == 0 and bounds[-1][1] == 7
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(bounds))
    assert "model.embed_tokens" in found.parts[0].modules
    assert "lm_head" in found.parts[0].modules
    assert sorted(m for p in found.parts for m in p.modules) == sorted(found.plan.choices)
    # Rank 0 alone computes the logits: it holds the head, the others hold nothing beside layers.
    assert found.parts[0].holds == ("embedding", "head")
    assert all(p.holds == () for p in found.parts[1:])
    for part in found.parts:
        room = part.budget.weights
        assert part.memory_bytes <= room
        assert_within_one_move(profile, part, found.plan.choices, ranks.float_bytes, room)


def assert_within_one_move(profile, part, choices, fb: int, room: int) -> None:
    """No module of the part could take a less damaging candidate in the room its budget has left:
    the budget is filled to within one module's move."""
    left = room - part.memory_bytes
    by_path = {m.path: m for m in profile.modules}
    for path in part.modules:
        m = by_path[path]
        chosen = choices[path]
        now = m.option_index(chosen.bits, chosen.group_size)
        alone = replace(profile, modules=[m], fixed_bytes=0)
        size = memory_bytes(alone, np.array([now]), fb)
        for j, o in enumerate(m.options):
            safe = o.bits >= 16 or (o.sqnr_db or 0) >= load_settings().allocate.min_sqnr_db
            if safe and o.damage_with(True) < m.options[now].damage_with(True) - 1e-18:
                grows = memory_bytes(alone, np.array([j]), fb) - size
                assert grows > left, f"{path} could move to {o.bits}/{o.group_size} in {left} bytes"


def test_a_split_that_cannot_fit_names_each_hosts_shortfall(profile_cache) -> None:
    model = shared_model(DENSE)
    source = open_source(str(model), load_settings())
    hosts = [Host("small-a", (), 2.3), Host("small-b", (), 2.3)]
    with pytest.raises(BudgetError, match="small-a with layers 0-2 has .* needs"):
        split(source, profile_cache(model), hosts, ASK)


def fullest(ranks: Ranks, plan_choice: np.ndarray, bounds: list[int]) -> float:
    """How full the fullest host is (weights over its budget) with these cut points."""
    worst = 0.0
    for r in range(len(bounds) - 1):
        room = ranks.budget(r, bounds[r], bounds[r + 1]).weights
        rows = ranks.rows(r, bounds[r], bounds[r + 1])
        worst = max(worst, ranks.memory(rows, plan_choice[rows]) / room if room > 0 else math.inf)
    return worst


@pytest.mark.parametrize("spec", ["min-safe", "40MB", "3.5bpw", "30%"])
@pytest.mark.parametrize("mibs", [(24, 46), (46, 24), (22, 26, 30)])
def test_a_variant_is_spread_over_the_hosts_as_evenly_as_can_be(
    profile_cache, spec: str, mibs: tuple[float, ...]
) -> None:
    """A budget variant keeps the one-machine plan at its budget; the cut points chosen leave the
    fullest host least full, checked against every split there is."""
    model = shared_model(DENSE)
    source = open_source(str(model), load_settings())
    profile = profile_cache(model)
    hosts = [Host(f"h{i}", (), weights_gb(m)) for i, m in enumerate(mibs)]
    found = split_for(source, profile, hosts, ASK, spec)
    alone = make_plan(profile, spec, source.settings)
    assert found.plan.hash == alone.hash  # the same model as one machine serves at that budget
    ranks = Ranks(source, profile, hosts, ASK)
    picked = plan_choice(profile, found.plan)
    every = [fullest(ranks, picked, [0, *cuts, ranks.layers])
             for cuts in itertools.combinations(range(1, ranks.layers), len(hosts) - 1)]  # fmt: skip
    assert fullest(ranks, picked, found.bounds) == pytest.approx(min(every))
    assert all(p.memory_bytes <= p.budget.weights for p in found.parts)
    assert sorted(m for p in found.parts for m in p.modules) == sorted(found.plan.choices)
    assert sum(p.damage for p in found.parts) == pytest.approx(found.plan.predicted_damage)


def test_a_variant_too_big_for_the_hosts_names_the_fullest(profile_cache) -> None:
    model = shared_model(DENSE)
    source = open_source(str(model), load_settings())
    hosts = [Host("mac-a", (), weights_gb(20)), Host("mac-b", (), weights_gb(20))]
    with pytest.raises(BudgetError, match=r"the 60MB plan .* fits no split .* at best mac-. holds"):
        split_for(source, profile_cache(model), hosts, ASK, "60MB")


@pytest.mark.parametrize("memories", [(1, 1), (1, 3), (3, 1), (1, 1, 1), (1, 1000, 1), (5, 2, 9)])
def test_each_rank_analyses_layers_in_proportion_to_its_memory(memories: tuple[int, ...]) -> None:
    """Before there is a profile, each rank's share of the analysis's work follows its memory: no
    other cut (each rank keeping a layer) is nearer its share."""
    source = open_source(str(shared_model(DENSE)), load_settings())
    layers, n = int(source.config["num_hidden_layers"]), len(memories)
    bounds = analysis_bounds(source, list(memories))
    assert len(bounds) == n + 1 and bounds[0] == 0 and bounds[-1] == layers
    assert all(
        a < b for a, b in zip(bounds, bounds[1:], strict=False)
    )  # every rank at least one layer
    outer, work = analysis_work(source)
    up_to = [outer + sum(work[:c]) for c in range(layers + 1)]  # rank 0's work with layers [0, c)
    for r in range(1, n):
        target = up_to[-1] * sum(memories[:r]) / sum(memories)
        allowed = range(bounds[r - 1] + 1, layers - (n - r) + 1)
        best = min(abs(up_to[c] - target) for c in allowed)
        assert abs(up_to[bounds[r]] - target) == pytest.approx(best), (r, bounds)
    if n == 2:
        assert (bounds[1] < layers / 2) == (memories[0] <= memories[1])


def test_the_analysis_work_counts_each_parameter_once_per_pass_through_it() -> None:
    """A layer's parameters count in every sampling sweep, in the inputs pass and for their
    candidates; the untied head's in the sweeps and for its candidates; the embedding's for its
    candidates only (a lookup); so equal machines analyse more layers on rank 0 than their bytes
    alone would give it."""
    source = open_source(str(shared_model(DENSE)), load_settings())
    sweeps = source.settings.rounding.sweeps
    per_layer: dict[int, int] = {}
    embedding = head = norms = 0
    for key, shape in source.tensor_shapes.items():
        parts, count = key.split("."), math.prod(shape)
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            per_layer[i] = per_layer.get(i, 0) + count
        elif "embed_tokens" in parts:
            embedding += count
        elif "lm_head" in parts:
            head += count
        else:
            norms += count
    assert head > 0 and source.untied_head  # the shared dense model's head is its own
    outer, work = analysis_work(source)
    assert outer == embedding + head * (1 + sweeps) + norms
    assert work == [per_layer[i] * (2 + sweeps) for i in range(len(work))]
    bytes_cut = analysis_bounds(source, [1, 1])[1]
    reached = [embedding + head + norms + sum(per_layer[i] for i in range(c))
               for c in range(len(work) + 1)]  # fmt: skip
    assert bytes_cut > min(range(1, len(work)), key=lambda c: abs(reached[c] - reached[-1] / 2))


def test_the_passes_go_in_fewer_chunks_where_a_rank_cannot_keep_its_layers_cached() -> None:
    """Each chunk reads a rank's layers again: from the page cache where they fit in its free
    memory (then [hosts] relay_chunks_per_rank chunks per rank), else one chunk per rank."""
    from ramserve.device import Machine

    source = open_source(str(shared_model(DENSE)), load_settings())
    per_rank = source.settings.hosts.relay_chunks_per_rank
    assert per_rank > 1
    layer = sum(math.prod(shape) * 2 for key, shape in source.tensor_shapes.items()
                if ".layers.0." in key)  # fmt: skip
    bounds = [0, 3, 7]  # rank 1: four layers of the same size

    def machines(free: int) -> list[Machine]:
        return [Machine("a", 2**34, 2**34, None, True), Machine("b", 2**34, free, None, True)]

    assert relay_chunks(source, bounds, machines(4 * layer)) == 2 * per_rank
    assert relay_chunks(source, bounds, machines(4 * layer - 1)) == 2
    assert relay_chunks(source, [0, 2, 4, 7], [machines(2**34)[0]] * 3) == 3 * per_rank


def test_a_tied_head_is_held_by_the_first_host_only(tmp_path: Path) -> None:
    from ramserve.profile import analyze

    folder = make_model(tmp_path / "tied", layers=4, tied=True)
    source = open_source(str(folder), load_settings())
    assert source.tied_embeddings and source.untied_head is None
    profile = analyze(source, progress=False)
    hosts, ask = [Host("a", (), 2.45), Host("b", (), 2.45)], Ask(context=256, parallel=1)
    found = split(source, profile, hosts, ask)
    assert found.parts[0].holds == ("embedding (the tied head)",)
    assert "model.embed_tokens" in found.parts[0].modules
    assert found.parts[-1].holds == () and "model.embed_tokens" not in found.parts[-1].modules
    assert all(p.memory_bytes <= p.budget.weights for p in found.parts)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "JSON list of hosts"),
        ("[]", "JSON list of hosts"),
        ('[{"ips": []}]', '"ssh"'),
        ('[{"ssh": "a", "ips": "10.0.0.1"}]', '"ips"'),
        ('[{"ssh": "a", "memory_gb": -4}]', '"memory_gb"'),
        ('[{"ssh": "a", "memory_gb": true}]', '"memory_gb"'),
        ("[{", "not JSON"),
        ('[{"ssh": "a", "rdma": [null, "x"]}]', '"rdma"'),  # a row per host: 1, not 2
        ('[{"ssh": "a", "rdma": [null, "e5"]}, {"ssh": "b", "rdma": ["e5", "e4"]}]', '"rdma"'),
        ('[{"ssh": "a", "rdma": [null, 5]}, {"ssh": "b", "rdma": ["e5", null]}]', '"rdma"'),
    ],
)
def test_a_bad_hostfile_is_named_and_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(text)
    with pytest.raises(HostfileError, match=message) as e:
        read_hostfile(path)
    assert str(path) in str(e.value)


def test_plan_and_budget_with_hosts_print_the_split(tmp_path: Path, ramserve_home: Path) -> None:
    model = str(shared_model(DENSE))
    hosts = tmp_path / "hosts.json"  # mlx.launch's format, with each host's memory stated
    hosts.write_text(json.dumps([{"ssh": "mac-a", "ips": ["10.0.0.1"], "memory_gb": weights_gb(10)},
                                 {"ssh": "mac-b", "ips": ["10.0.0.2"], "memory_gb": weights_gb(30)}]))  # fmt: skip
    assert [h.ssh for h in read_hostfile(hosts)] == ["mac-a", "mac-b"]
    base = [sys.executable, "-m", "ramserve.cli"]
    shape = ["--hosts", str(hosts), "--context", "1024", "--parallel", "1", "-q"]
    out = tmp_path / "plan.json"
    done = subprocess.run([*base, "plan", model, *shape, "--json", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [p["host"] for p in data["parts"]] == ["mac-a", "mac-b"]
    assert data["parts"][0]["layers"][0] == 0 and data["parts"][1]["layers"][1] == 7
    whole = json.loads(out.read_text())
    assert len(whole["choices"]) == sum(p["modules"] for p in data["parts"])
    assert whole["predicted_damage"] == pytest.approx(data["predicted_damage"])
    text = subprocess.run([*base, "plan", model, *shape], capture_output=True, text=True,
                          timeout=600).stdout  # fmt: skip
    assert "mac-a" in text and "embedding" in text and "predicted damage" in text
    budget = subprocess.run([*base, "budget", model, *shape], capture_output=True, text=True,
                            timeout=600).stdout  # fmt: skip
    assert "KV cache" in budget and "mac-b" in budget
    unstated = tmp_path / "unstated.json"
    unstated.write_text(json.dumps([{"ssh": "mac-a"}, {"ssh": "mac-b"}]))
    done = subprocess.run([*base, "plan", model, "--hosts", str(unstated), "-q"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2 and 'states no "memory_gb"' in done.stderr


JACCL_HOSTS = [
    {"ssh": "m3-ultra-1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en5", "rdma_en4"]},
    {"ssh": "m3-ultra-2", "ips": ["10.0.0.2"], "rdma": ["rdma_en5", None, "rdma_en3"]},
    {"ssh": "m3-ultra-3", "ips": ["10.0.0.3"], "rdma": ["rdma_en4", "rdma_en3", None]},
]


@pytest.mark.parametrize("asked", ["auto", "ring", "jaccl"])
def test_the_back_end_is_jaccl_where_every_host_has_rdma_and_mlx_has_it(
    tmp_path: Path, asked: str
) -> None:
    import mlx.core as mx

    from ramserve.cluster import back_end, group_env

    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(JACCL_HOSTS))
    hosts = read_hostfile(path)
    assert hosts[1].rdma == ("rdma_en5", None, "rdma_en3")
    settings = load_settings()
    settings = settings.model_copy(update={"hosts": settings.hosts.model_copy(
        update={"backend": asked})})  # fmt: skip
    has_jaccl = mx.distributed.is_available("jaccl")
    if asked == "jaccl" and not has_jaccl:
        with pytest.raises(RamserveError, match="no JACCL back end: it needs macOS 26.2"):
            back_end(hosts, settings)
        return
    expected = "ring" if asked == "ring" or not has_jaccl else "jaccl"
    assert back_end(hosts, settings) == expected
    files, env = group_env(hosts, settings)
    if expected == "jaccl":  # mlx.launch's variables for JACCL: the device matrix, rank 0's address
        assert json.loads(files["MLX_IBV_DEVICES"]) == [h["rdma"] for h in JACCL_HOSTS]
        assert env["MLX_JACCL_COORDINATOR"] == f"10.0.0.1:{settings.hosts.control_port + 1}"
    else:
        port = settings.hosts.control_port + 1
        assert json.loads(files["MLX_HOSTFILE"]) == [
            [f"10.0.0.{r + 1}:{port + r}"] for r in range(3)
        ]
    # Without every host's row, auto takes the ring, and jaccl is refused, naming the host.
    plain = [replace(h, rdma=()) if h.ssh == "m3-ultra-2" else h for h in hosts]
    if asked == "jaccl":
        with pytest.raises(RamserveError, match="m3-ultra-2 has none"):
            back_end(plain, settings)
    else:
        assert back_end(plain, settings) == "ring"


def test_run_with_jaccl_asked_where_mlx_has_none_says_why(
    tmp_path: Path, ramserve_home: Path
) -> None:
    import mlx.core as mx

    if mx.distributed.is_available("jaccl"):
        pytest.skip("this MLX has JACCL: the refusal is for machines without it")
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(JACCL_HOSTS))
    user = ramserve_home / "config.toml"
    user.write_text(user.read_text() + '[hosts]\nbackend = "jaccl"\n')
    done = subprocess.run([sys.executable, "-m", "ramserve.cli", "run", str(shared_model(DENSE)),
                           "--hosts", str(path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "no JACCL back end" in done.stderr and "Traceback" not in done.stderr
