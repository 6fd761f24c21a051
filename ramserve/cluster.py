"""Serving one model from several machines: ``ramserve run MODEL --hosts hosts.json``.

Started by hand, ``run --hosts`` becomes rank 0 and starts one more rank per further host of the
hostfile (by ssh, as ``mlx.launch`` does; hosts whose "ssh" is 127.0.0.1 run here), on MLX's ring back
end. It can also be started under ``mlx.launch`` directly (``MLX_RANK`` set); ``mlx.launch`` then stops
every rank when one ends, rank 0 included. Each rank takes its role:

- Rank 0 serves the API at once (503 with the stage while it starts). It gathers the other ranks'
  hellos (each rank's memory, measured on its host or stated by the hostfile's ``memory_gb``),
  and where the model's profile is not cached, has every rank analyse its own layers (each rank's
  share of the work in proportion to its memory; the passes relayed between ranks, pipelined in
  chunks, ramserve/relay.py) and merges the parts into the profile, which covers the whole model.
  It chooses the split and the plan together (ramserve/hosts.py) and tells every rank the plan and
  its layers; each rank writes its part of the quantized model (cached) and loads it. Then rank 0
  schedules the batch (ramserve/engine.py), and each step goes to the other ranks
  (ramserve/crew.py).
- Every other rank analyses its share when asked, writes its part of each plan from its own copy
  of the model (cached), loads it and follows.

A rank that is lost fails the requests in flight and every later one with a 503 that names it, and
``/health`` says so. The other ranks then exit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import cache
from .budget import Ask, Budget
from .crew import Crew, Hand, Hello, Lockstep, RankLost, Setup, Tick
from .device import Machine, this_machine
from .engine import Engine
from .errors import RamserveError, in_words, log_failure
from .fisher import fisher_fits
from .fmt import table
from .hosts import (
    Host,
    Part,
    Split,
    analysis_bounds,
    read_hostfile,
    relay_chunks,
    render_split,
    split_for,
)
from .pipeline import stager
from .plan import served_name
from .profile import SharePart, analyse_share, analyze, settings_key
from .quantize import part_dir, quantize_part, reserve_part
from .records import Plan, Profile
from .relay import share_of
from .server.registry import NotReady, Registry
from .settings import Settings
from .source import Source, open_source
from .variants import VariantRegistry

log = logging.getLogger("ramserve.cluster")


LOCAL = {"127.0.0.1", "localhost"}
TOKEN = "RAMSERVE_CREW_TOKEN"  # under mlx.launch directly there is none, and any rank is admitted


def under_launch() -> bool:
    """Whether this process is already one rank (started by ``launch`` or by ``mlx.launch``)."""
    return "MLX_RANK" in os.environ


def ring_hostfile(hosts: list[Host], settings: Settings) -> str:
    """MLX's ring back end's hostfile: each rank's address and port, as ``mlx.launch`` writes it."""
    port = settings.hosts.control_port + 1
    return json.dumps([[f"{h.ips[0]}:{port + r}"] for r, h in enumerate(hosts)])


def back_end(hosts: list[Host], settings: Settings) -> str:
    """MLX's back end for the hidden states: JACCL (RDMA over Thunderbolt 5) where asked, or by
    ``auto`` where every host has its "rdma" row and this MLX has the back end; else the ring."""
    asked = settings.hosts.backend
    if asked == "ring":
        return "ring"
    rows = all(h.rdma for h in hosts)
    if asked == "jaccl":
        if not rows:
            missing = ", ".join(h.ssh for h in hosts if not h.rdma)
            raise RamserveError(f'[hosts] backend = "jaccl" needs each host\'s "rdma" row in the '
                                f"hostfile, and {missing} has none: mlx.distributed_config "
                                "--backend jaccl --auto-setup writes them")  # fmt: skip
        if not mx.distributed.is_available("jaccl"):
            raise RamserveError('[hosts] backend = "jaccl", but this MLX has no JACCL back end: it '
                                "needs macOS 26.2 or later on Thunderbolt 5 Macs, with RDMA "
                                "enabled (rdma_ctl enable, in Recovery); or use the ring")  # fmt: skip
        return "jaccl"
    return "jaccl" if rows and mx.distributed.is_available("jaccl") else "ring"


def group_env(hosts: list[Host], settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """What every rank needs to join MLX's group, as ``mlx.launch`` gives it: files (an environment
    variable naming each, with its content) and plain environment variables."""
    if back_end(hosts, settings) == "ring":
        return {"MLX_HOSTFILE": ring_hostfile(hosts, settings)}, {}
    devices = json.dumps([list(h.rdma) for h in hosts])
    coordinator = f"{hosts[0].ips[0]}:{settings.hosts.control_port + 1}"
    # The CPU drives RDMA: the faster GPU-CPU synchronisation mlx.launch's docs ask for with JACCL.
    return {"MLX_IBV_DEVICES": devices}, {"MLX_JACCL_COORDINATOR": coordinator,
                                          "MLX_METAL_FAST_SYNCH": "1"}  # fmt: skip


def launch(hostfile: Path, settings: Settings, argv: list[str]) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1.. (on their hosts: by ssh, as ``mlx.launch`` does, or here for 127.0.0.1) and
    make this process rank 0. Not through ``mlx.launch`` itself, which stops every rank when one
    ends, so rank 0 could not stay up to answer that a rank is lost."""
    hosts = read_hostfile(hostfile)  # named errors before anything starts
    if len(hosts) < 2:
        raise RamserveError(f"hostfile {hostfile} names one host: --hosts is for several; "
                            "on one machine, run without it")  # fmt: skip
    missing = [h.ssh for h in hosts if not h.ips]
    if missing:
        raise RamserveError(f"hostfile {hostfile}: the ranks reach rank 0, and MLX's ring its "
                            f'neighbours, at each host\'s "ips"; {", ".join(missing)} has none')  # fmt: skip
    files, env = group_env(hosts, settings)
    env[TOKEN] = secrets.token_hex(16)  # only the ranks started here may join (crew.py)
    here = {**env}
    for name, text in files.items():
        path = Path(tempfile.mkstemp(prefix=f"ramserve-{name.lower()}-", suffix=".json")[1])
        path.write_text(text)
        here[name] = str(path)
    script = Path(sys.argv[0]) if Path(sys.argv[0]).name == "ramserve" else \
        Path(sys.executable).parent / "ramserve"  # fmt: skip
    command = [sys.executable, str(script.resolve()), *argv]
    ranks = []
    for rank, host in enumerate(hosts[1:], start=1):
        if host.ssh in LOCAL:
            ranks.append(
                subprocess.Popen(command, env={**os.environ, **here, "MLX_RANK": str(rank)})
            )
        else:
            written = "".join(f"f=$(mktemp); echo {shlex.quote(text)} > $f; export {name}=$f; "
                              for name, text in files.items())  # fmt: skip
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            remote = (f"cd {shlex.quote(os.getcwd())} 2>/dev/null; {written}"
                      f"export MLX_RANK={rank} {exports}; exec {shlex.join(command)}")  # fmt: skip
            ranks.append(subprocess.Popen(["ssh", "-tt", "-o", "LogLevel=QUIET", host.ssh, remote]))
    os.environ.update({**here, "MLX_RANK": "0"})
    return ranks


def leader_address(hosts: list[Host]) -> str:
    return hosts[0].ips[0]


def join_group() -> str:
    """Join MLX's group, on the back end ``launch`` (or ``mlx.launch``) set this rank up for."""
    backend = "jaccl" if "MLX_IBV_DEVICES" in os.environ else "ring"
    mx.distributed.init(strict=True, backend=backend)
    return backend


class RanksRegistry(VariantRegistry):
    """Rank 0's registry: the model split over the hostfile's hosts, fitted once every rank has said
    what memory it has. Its variants (``name@budget``) are spread over the same hosts, and a swap
    loads on every rank or, restored, on none."""

    def __init__(self, spec: str, hostfile: Path, settings: Settings, ask: Ask, *,
                 budget: str = "auto", any_budget: bool = False,
                 progress: bool = True) -> None:  # fmt: skip
        # The name until the source is open: a folder's or a repo's last part, as sources name them.
        Registry.__init__(self, Path(), Path(spec.partition("@")[0].rstrip("/")).name, settings, {})
        self.offer_variants(any_budget)
        self.spec, self.ask, self.budget, self.show_progress = spec, ask, budget, progress
        self.hosts = read_hostfile(hostfile)
        self.split: Split | None = None
        self.crew: Crew | None = None
        self.backend = ""
        self.source = None
        self._profile: Profile | None = None
        self._machines: list[Machine] = []
        self._splits: dict[str, Split] = {}

    def _load_initial(self) -> None:
        try:
            self._start_ranks()
            if self.crew is not None and self.crew.lost:
                raise RamserveError(self.crew.lost)
            self.stage = "ready"
        except Exception as e:  # reported by /health and every request, never a crash
            log_failure(log, e, "starting the ranks failed")
            self.error = self.error or f"the model could not start on its hosts: {in_words(e)}"
            self.stage = "failed"
            if self.crew is not None and not self.crew.lost:  # the others wait for a setup
                with contextlib.suppress(RamserveError):
                    self.crew.send_all({"stopped": self.error})

    def _start_ranks(self) -> None:
        cfg, n = self.settings.hosts, len(self.hosts)
        self.stage = f"waiting for {n - 1} more rank{'s' if n > 2 else ''} to connect"
        crew = Crew(leader_address(self.hosts), cfg.control_port, n,
                    token=os.environ.get(TOKEN, ""), lost_after_s=cfg.lost_after_s)  # fmt: skip
        self.crew = crew
        hellos = crew.gather(cfg.connect_timeout_s)
        crew.on_lost = self._lose
        self.stage = "joining MLX's group"
        self.backend = join_group()
        source = open_source(self.spec, self.settings)
        self._machines = [this_machine(self.hosts[0].memory_gb or 0), *(h.machine for h in hellos)]
        self.stage = "analysing"
        others = Analysts(crew, source, self.spec, self._machines, self.hosts)
        self._profile = analyze(source, progress=self.show_progress, others=others)
        self.stage = "splitting"
        self.source, self.name = source, served_name(source)
        self.loaded_id = self.name
        plan = self.plan_for("")
        done = self._splits[plan.hash]
        print(render_split(done.to_json()), flush=True)
        print(f"the ranks pass hidden states on MLX's {self.backend} back end", flush=True)
        self.engine_args = done.parts[0].budget.shape.engine_args()
        self.stage = "quantizing and loading on every rank"
        folder = self.prepare(plan)
        self.install(folder, plan)
        self.folder, self.plan, self.loaded_hash = folder, plan, plan.hash

    # -- variants over the hosts ---------------------------------------------------------------

    def new_plan(self, spec: str) -> Plan:
        """The split of ``--budget`` chooses the plan with it (ramserve/hosts.py); a variant's plan
        is the one-machine plan at its budget, spread over the hosts."""
        if self.source is None or self._profile is None:
            raise NotReady(f"the model is not ready yet ({self.stage})")
        done = split_for(self.source, self._profile, self.hosts, self.ask, spec or self.budget,
                         self._machines)  # fmt: skip
        self._splits[done.plan.hash] = done
        return done.plan

    async def resolve(self, model_id: str) -> Engine:
        if self.split is None:  # still starting, or failed to: say which
            self.spec_of(model_id)
            return self.require_ready()
        return await super().resolve(model_id)

    def fitted_budget(self) -> Budget:
        assert self.split is not None
        return self.split.parts[0].budget

    def card_for(self, model_id: str) -> dict[str, Any]:
        if self.split is None:  # still starting, or failed to
            self.spec_of(model_id)
            status = "failed" if self.stage == "failed" else "loading"
            return {"id": model_id, "created": self.created, "status": status}
        card = super().card_for(model_id)
        done = self._splits[self.plan_for(self.spec_of(model_id)).hash]
        return {**card, "hosts": [{"rank": p.rank, "host": p.host, "layers": list(p.layers),
                                   "memory_bytes": p.memory_bytes} for p in done.parts]}  # fmt: skip

    def folder_for(self, plan: Plan) -> Path:
        assert self.source is not None
        return part_dir(self.source, plan, share_of(self._splits[plan.hash].bounds, 0))

    def prepare(self, plan: Plan) -> Path:  # every rank writes its part in ``install``, together
        return self.folder_for(plan)

    def install(self, folder: Path, plan: Plan) -> None:
        """Quantize (cached) and load ``plan`` on every rank, each its own part; raises, naming each
        rank that could not, with every rank's answer in, so that the caller can restore the same
        on all. Every rank first makes room for its part (or finds it cached), then, if any writes,
        all run compensated rounding's pass together (ramserve/relay.py)."""
        assert self.crew is not None and self.source is not None
        done = self._splits[plan.hash]
        self._free_engine()  # its close ends the other ranks' engines too
        setup = Setup(self.spec, plan, done.bounds, self.engine_args)
        share = share_of(done.bounds, 0)
        self.crew.send_all(setup.to_message())
        try:  # this rank answers as the others do
            mine: dict[str, Any] = {"ready": reserve_part(self.source, plan, share)}
        except Exception as e:
            mine = {"load_failed": in_words(e)}
        answers = {0: mine, **self.crew.collect()}
        failed = self._failed(answers)
        if failed:
            self.crew.send_all({"cancel": 1})
            raise RamserveError("; ".join(failed))
        relay = any(a["ready"] for a in answers.values())
        chunks = relay_chunks(self.source, done.bounds, self._machines)
        self.crew.send_all({"write": {"relay": relay, "chunks": chunks}})
        written = None
        try:
            written = quantize_part(self.source, plan, replace(share, chunks=chunks), relay)
            engine = stage_engine(written, setup, 0, self.settings, self.crew)
        except Exception as e:
            if relay and written is None:  # the others wait in the pass for what this rank sends
                self.crew.abandon(f"rank 0 ({self.hosts[0].ssh}) failed in the pass the ranks "
                                  f"run together: {in_words(e)}")  # fmt: skip
                raise RankLost(self.crew.lost or "") from e
            self.crew.collect()  # every rank has answered: the next setup finds them waiting
            self.crew.tell(Tick(close=True))  # those that loaded follow an engine that never ran
            raise
        self.engine = engine
        failed = self._failed(self.crew.collect())
        if failed:
            raise RamserveError("; ".join(failed))
        self.split = done

    def _failed(self, answers: dict[int, dict[str, Any]]) -> list[str]:
        return [f"rank {r} ({self.hosts[r].ssh}) could not load it: {a['load_failed']}"
                for r, a in sorted(answers.items()) if "load_failed" in a]  # fmt: skip

    def _lose(self, why: str) -> None:
        if self.stage == "failed":  # the ranks were told to stop: the first cause stands
            return
        self.error = f"{why}; the model is split over {len(self.hosts)} hosts and cannot serve " \
                     "without it: restart ramserve run --hosts"  # fmt: skip
        self.stage = "failed"
        if self.engine is not None:
            self.engine.abandon(self.error)

    def how_fitted(self) -> None:  # fitted to several machines: no one machine's fit to show
        return None

    def loaded_plan(self) -> Plan | None:
        return self.plan

    def host_parts(self) -> list[Part]:
        return self.split.parts if self.split else []

    def close(self) -> None:
        super().close()
        if self.crew is not None:
            self.crew.close()


class Analysts:
    """The other ranks' side of rank 0's analysis (``profile.OtherRanks``), over the control
    channel: each rank analyses its own layers, cut in proportion to the ranks' memory."""

    def __init__(self, crew: Crew, source: Source, spec: str, machines: list[Machine],
                 hosts: list[Host]) -> None:  # fmt: skip
        import psutil

        self.crew, self.hosts = crew, hosts
        self.bounds = analysis_bounds(source, [m.available for m in machines])
        self.chunks = relay_chunks(source, self.bounds, machines)
        self.share = share_of(self.bounds, 0, self.chunks)
        # Every rank runs the Fisher's pass: it must fit the least memory measured (a stated
        # memory is a budget to fit the model to, not what the analysis has here).
        measured = [m.available for m in machines if m.live]
        least = min([*measured, psutil.virtual_memory().available])
        self.fits = fisher_fits(source, source.settings.sensitivity.fisher, least)
        self.order = {"model": spec, "fingerprint": source.fingerprint, "bounds": self.bounds,
                      "settings_key": settings_key(source.settings), "fits": self.fits,
                      "chunks": self.chunks}  # fmt: skip

    def begin(self) -> None:
        self.crew.send_all({"analyse": self.order})
        refused = [f"rank {r} ({self.hosts[r].ssh}) cannot analyse its layers: {a['refused']}"
                   for r, a in sorted(self.crew.collect().items()) if "refused" in a]  # fmt: skip
        if refused:
            raise RamserveError("; ".join(refused))
        self.crew.send_all({"go": 1})

    def gather(self, own: SharePart) -> list[SharePart]:
        parts = [SharePart.from_json(a["analysed"]) for _, a in sorted(self.crew.collect().items())]
        print(render_shares(self.bounds, [h.ssh for h in self.hosts], [own, *parts]), flush=True)
        return parts


def render_shares(bounds: list[int], hosts: list[str], parts: list[SharePart]) -> str:
    """Each rank's share of the analysis and where its time went."""

    def s(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.1f}"

    rows = [(r, hosts[r], f"{bounds[r]}-{bounds[r + 1] - 1}", "embedding, head" if r == 0 else "",
             len(p.records), s(p.fisher_seconds), s(p.rounding_seconds),
             s(sum(m.seconds for m in p.records)), s(p.seconds))
            for r, p in enumerate(parts)]  # fmt: skip
    return table(["rank", "host", "layers analysed", "also", "modules", "Fisher s",
                  "compensation s", "candidates s", "seconds"], rows)  # fmt: skip


def ready_to_analyse(order: dict[str, Any], settings: Settings) -> tuple[Source | None, str]:
    """This rank's copy of the model for rank 0's analysis, or why it cannot take part."""
    try:
        source = open_source(str(order["model"]), settings)
    except Exception as e:
        return None, in_words(e)
    if source.fingerprint != order["fingerprint"]:
        return None, (f"its copy of {order['model']} ({source.path}) is not rank 0's: its "
                      f"fingerprint is {source.fingerprint}, rank 0's {order['fingerprint']}")  # fmt: skip
    if settings_key(settings) != order["settings_key"]:
        return None, ("its settings for the analysis (config.toml: [analysis], [quantizer], "
                      "[sensitivity], [rounding], [[kinds]]) differ from rank 0's")  # fmt: skip
    return source, ""


def stage_engine(folder: Path, setup: Setup, rank: int, settings: Settings,
                 crew: Lockstep) -> Engine:  # fmt: skip
    """This rank's layers of the quantized model, its engine in lockstep with the other ranks'."""
    return Engine(folder, settings, crew=crew, **setup.engine_args,
                  stage=stager(folder, setup.bounds, rank, settings.kinds))  # fmt: skip


def follow(spec: str, hostfile: Path, settings: Settings) -> int:
    """A rank other than 0: say hello; then carry out each order rank 0 sends (ramserve/crew.py),
    answering each: analyse its layers; quantize its part of each plan (the first, and one per
    variant swap), load it and follow the engine rank 0 leads."""
    hosts, rank = read_hostfile(hostfile), int(os.environ["MLX_RANK"])
    host, cfg = hosts[rank], settings.hosts
    hand = Hand(leader_address(hosts), cfg.control_port,
                Hello(rank, host.ssh, this_machine(host.memory_gb or 0)),
                timeout_s=cfg.connect_timeout_s, token=os.environ.get(TOKEN, ""),
                beat_s=cfg.heartbeat_s)  # fmt: skip
    follower = Follower(rank, settings, hand)
    try:
        join_group()
        while (message := hand.next_order()) is not None:
            if "stopped" in message:
                log.error("rank 0 stopped: %s", message["stopped"])
                return 1
            kind = next(k for k in ("analyse", "go", "setup", "cancel", "write") if k in message)
            if not getattr(follower, f"on_{kind}")(message[kind]):
                return 1
    except Exception as e:
        hand.report(in_words(e))
        raise
    return 0


class Follower:
    """A following rank's state between rank 0's orders, and a method per order (``on_<order>``);
    each returns whether to go on."""

    def __init__(self, rank: int, settings: Settings, hand: Hand) -> None:
        self.rank, self.settings, self.hand = rank, settings, hand
        self.source: Source | None = None
        self.order: dict[str, Any] = {}  # the analysis asked for
        self.setup: Setup | None = None
        self.share = share_of([0, 1], 0)
        self.folder: Path | None = None  # the part loaded last

    def on_analyse(self, order: dict[str, Any]) -> bool:
        """Ready to analyse its share, or why not; then "go" (or rank 0 stops)."""
        self.order = order
        self.source, problem = ready_to_analyse(order, self.settings)
        self.hand.answer({"refused": problem} if self.source is None else {"ready": 1})
        return True

    def on_go(self, _: Any) -> bool:
        assert self.source is not None
        share = share_of(self.order["bounds"], self.rank, int(self.order["chunks"]))
        part = analyse_share(self.source, share, bool(self.order["fits"]), {}, None,
                             self.order["settings_key"], progress=False)  # fmt: skip
        print(f"rank {self.rank} analysed layers {share.start}-{share.stop - 1}: "
              f"{len(part.records)} modules in {part.seconds:.1f} s", flush=True)  # fmt: skip
        self.hand.answer({"analysed": part.to_json()})
        self.source = None
        return True

    def on_setup(self, message: dict[str, Any]) -> bool:
        """Room made for its part of the plan, or the part found cached; then "write" or
        "cancel"."""
        gc.collect()  # the engine before this setup has ended: free its weights first
        mx.clear_cache()
        self.setup = Setup.from_message({"setup": message})
        self.share = share_of(self.setup.bounds, self.rank)
        try:
            self.source = open_source(self.setup.model, self.settings)
            self.hand.answer({"ready": reserve_part(self.source, self.setup.plan, self.share)})
        except Exception as e:  # rank 0 restores the model before on every rank
            log_failure(log, e, "making room for the plan rank 0 sent failed")
            self.hand.answer({"load_failed": in_words(e)})
        return True

    def on_cancel(self, _: Any) -> bool:
        assert self.source is not None and self.setup is not None
        if (held := part_dir(self.source, self.setup.plan, self.share)) != self.folder:
            cache.release(held)
        return True

    def on_write(self, order: dict[str, Any]) -> bool:
        """Its part written (every rank together) or found, loaded, and followed until rank 0
        closes that engine; False when it failed."""
        assert self.source is not None and self.setup is not None
        share, relay = replace(self.share, chunks=int(order["chunks"])), bool(order["relay"])
        written = None
        try:
            written = quantize_part(self.source, self.setup.plan, share, relay)
            if self.folder is not None and self.folder != written:
                cache.release(self.folder)
            self.folder = written
            engine = stage_engine(written, self.setup, self.rank, self.settings, self.hand)
        except Exception as e:
            log_failure(log, e, "loading the plan rank 0 sent failed")
            if relay and written is None:  # the others wait in the pass for what this rank sends:
                self.hand.report(in_words(e))  # only this process's end frees them
                return False
            self.hand.answer({"load_failed": in_words(e)})  # rank 0 restores the model before
            return True
        self.hand.answer({"loaded": self.setup.plan.hash})
        engine.wait()
        if engine.failure:
            self.hand.report(engine.failure)
            return False
        return True
