"""Budget variants: one model offered at several budgets (``name@6GB``, ``name@min-safe``...).

A request for a variant that is not loaded plans it from the cached profile, quantizes it (or takes
it from the cache) and swaps it in. Only one model is held at a time: the swap waits for in-flight
requests on the old engine to finish, frees it, then loads the new one; requests that arrive
meanwhile wait (bounded in number and time, then 503). A failed swap reloads the previous model.

Each new variant costs minutes and gigabytes of disk, so by default a client may ask only for the
listed variants and for budgets whose plan is already cached; ``--any-budget`` lifts that.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import cache
from .budget import Budget, machine_budget
from .cache import model_dir
from .engine import Engine
from .errors import BudgetError, log_failure
from .fit import Fit, require_plan_fits
from .plan import make_plan
from .progress import Step, watching
from .quantize import is_complete, quantize_to_serve
from .records import Plan
from .server.registry import NotOffered, NotReady, Registry, UnknownModel
from .settings import Settings
from .source import Source

log = logging.getLogger("ramserve.variants")


class VariantRegistry(Registry):
    """One machine's variants. ramserve/cluster.py's ``RanksRegistry`` offers the same over several
    machines: it plans (``new_plan``), sizes cards (``fitted_budget``) and installs a quantized
    folder (``install``) in its own way."""

    plan: Plan | None  # the plan of the model loaded now

    def __init__(self, fitted: Fit, settings: Settings, engine_args: dict[str, Any],
                 any_budget: bool = False) -> None:  # fmt: skip
        super().__init__(fitted.folder, fitted.source.name, settings, engine_args)
        self.offer_variants(any_budget)
        self.fitted = fitted
        self.source: Source | None = fitted.source
        self.loaded_hash = fitted.plan.hash
        self.plan = fitted.plan
        self._plans[""] = fitted.plan
        self._machine = machine_budget(fitted.source, fitted.budget.shape)

    def offer_variants(self, any_budget: bool) -> None:
        server = self.settings.server
        self.listed = server.variants
        self.swap_timeout = server.swap_timeout_s
        self.swap_waiting = server.swap_waiting
        self.any_budget = any_budget or server.any_budget
        self.loaded_hash = ""
        self.plan = None
        self._plans: dict[str, Plan] = {}
        self._swap = asyncio.Lock()
        self._waiting = 0

    # -- what differs on several machines -----------------------------------------------------

    def new_plan(self, spec: str) -> Plan:
        f = self.fitted
        plan = make_plan(f.profile, spec, f.source.settings, machine=self._machine)
        require_plan_fits(plan, f.budget, f"{self.name}@{spec}")
        return plan

    def fitted_budget(self) -> Budget:
        """The budget the variants are sized for (their context and runtime shape)."""
        return self.fitted.budget

    def status_of(self, plan: Plan) -> str:
        """A variant not loaded: "cached" where ``install`` would find it written, else
        "available"."""
        return "cached" if is_complete(self.folder_for(plan), plan.hash) else "available"

    def folder_for(self, plan: Plan) -> Path:
        """Where ``install`` loads the plan's model from."""
        assert self.source is not None
        return model_dir(self.source.fingerprint, plan.hash)

    def prepare(self, plan: Plan) -> Path:
        """The plan's model written (or found in the cache) and held, for ``install``."""
        assert self.source is not None
        return quantize_to_serve(self.source, plan, progress=False)[0]

    def install(self, folder: Path, plan: Plan) -> None:
        """Free the old engine before loading the new: two models are never held at once."""
        self._free_engine()
        self.engine = Engine(folder, self.settings, **self.engine_args)

    def _free_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        import mlx.core as mx

        mx.clear_cache()

    # -- plans --------------------------------------------------------------------------------

    def spec_of(self, model_id: str) -> str:
        base, _, spec = model_id.partition("@")
        if base != self.name:
            raise UnknownModel(f"model {model_id!r} does not exist; this server has {self.name!r} "
                               f"and its budget variants {self.name}@<budget>")  # fmt: skip
        return spec

    def plan_for(self, spec: str) -> Plan:
        """The plan for a variant (under a second from the cached profile); must fit the machine."""
        if spec not in self._plans:
            self._plans[spec] = self.new_plan(spec)
        return self._plans[spec]

    def offered(self, spec: str, plan: Plan) -> bool:
        """Whether a client may have this variant: listed, already cached, or any (--any-budget)."""
        if self.any_budget or spec in ("", *self.listed) or plan.hash == self.loaded_hash:
            return True
        if any(self._listed_hash(s) == plan.hash for s in self.listed):  # plans are memoised
            return True
        return self.source is not None and self.status_of(plan) == "cached"

    def _listed_hash(self, spec: str) -> str | None:
        try:
            return self.plan_for(spec).hash
        except BudgetError:
            return None

    def require_offered(self, model_id: str) -> Plan:
        spec = self.spec_of(model_id)
        plan = self.plan_for(spec)
        if not self.offered(spec, plan):
            listed = ", ".join(f"{self.name}@{s}" for s in self.listed) or "none"
            raise NotOffered(
                f"{model_id} is not offered: this server quantizes new budget variants only when "
                f"started with --any-budget (or [server] any_budget = true in config.toml); it "
                f"serves {self.name}, its listed variants ({listed}) and budgets already cached"
            )
        return plan

    # -- models -------------------------------------------------------------------------------

    def cards(self) -> list[dict[str, Any]]:
        ids = [self.name] + [f"{self.name}@{s}" for s in self.listed]
        cards = []
        for model_id in ids:
            try:
                cards.append(self.card_for(model_id))
            except BudgetError:
                continue  # a listed budget that does not fit this machine is not offered
        return cards

    def card_for(self, model_id: str) -> dict[str, Any]:
        plan = self.require_offered(model_id)
        loaded = plan.hash == self.loaded_hash and self.ready
        status = "loaded" if loaded else self.status_of(plan)
        budget = self.fitted_budget()
        return {"id": model_id, "created": self.created, "status": status,
                "context_length": budget.context, **plan.summary(),
                "runtime_shape": asdict(budget.shape), "memory_bytes": plan.memory_bytes}  # fmt: skip

    # -- swapping -----------------------------------------------------------------------------

    async def resolve(self, model_id: str) -> Engine:
        plan = self.require_offered(model_id)
        if plan.hash == self.loaded_hash and not self._swap.locked():
            return self.require_ready()
        if self._waiting >= self.swap_waiting:
            raise NotReady(f"{self._waiting} requests already wait for a model swap; try "
                           f"{model_id} again shortly")  # fmt: skip
        self._waiting += 1
        try:
            await asyncio.wait_for(self._swap.acquire(), self.swap_timeout)
        except TimeoutError as e:
            raise NotReady(f"still swapping models; try {model_id} again shortly") from e
        finally:
            self._waiting -= 1
        try:
            if plan.hash != self.loaded_hash:
                await self._swap_to(model_id, plan)
            return self.require_ready()
        finally:
            self._swap.release()

    async def _swap_to(self, model_id: str, plan: Plan) -> None:
        old = self.engine
        if old is not None:
            self.stage = f"draining {self.loaded_id}"
            try:
                await self.wait_unleased(old, self.swap_timeout)
            except TimeoutError as e:
                self.stage = "ready"
                raise NotReady(f"requests on {self.loaded_id} did not finish; try again") from e
        assert self.source is not None and self.plan is not None
        previous = (self.folder, self.plan, self.loaded_id)
        installing = False
        try:
            self.stage = f"quantizing {model_id}"
            with watching(self._report):  # the worker thread inherits the watcher
                folder = await asyncio.to_thread(self.prepare, plan)
            self.progress = None
            self.stage = f"loading {model_id}"
            installing = True
            await asyncio.to_thread(self.install, folder, plan)
            if folder != previous[0]:
                cache.release(previous[0])  # the old variant may be evicted from now on
            self.folder, self.plan, self.loaded_hash, self.loaded_id = \
                folder, plan, plan.hash, model_id  # fmt: skip
        except Exception as e:
            self.progress = None
            log_failure(log, e, "swap to %s failed; restoring %s", model_id, previous[2])
            cache.release(self.folder_for(plan))
            if installing:
                await self._restore(*previous)
            elif self.error is None:  # the model before is still loaded, and serves on
                self.stage = "ready"
            raise BudgetError(f"could not switch to {model_id}: {e}") from e
        self.stage = "ready"

    async def _restore(self, folder: Path, plan: Plan, model_id: str) -> None:
        self.stage = f"restoring {model_id}"
        try:
            await asyncio.to_thread(self.install, folder, plan)
        except Exception as e:  # nothing is loaded now: say so to every request
            log_failure(log, e, "restoring %s failed", model_id)
            self.error = f"{model_id} could not be restored after a failed swap: {e}"
            self.stage = "failed"
            return
        self.stage = "ready"

    def how_fitted(self) -> Fit | None:
        return self.fitted

    def _report(self, step: Step) -> None:
        self.progress = step
