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
from typing import Any

from . import cache
from .budget import machine_budget
from .cache import model_dir
from .engine import Engine
from .errors import BudgetError
from .fit import Fit, require_plan_fits, variant_status
from .plan import make_plan
from .progress import Step, watching
from .quantize import quantize
from .records import Plan
from .server.registry import NotOffered, NotReady, Registry, UnknownModel
from .settings import Settings

log = logging.getLogger("ramserve.variants")


class VariantRegistry(Registry):
    def __init__(self, fitted: Fit, settings: Settings, engine_args: dict[str, Any],
                 any_budget: bool = False) -> None:  # fmt: skip
        super().__init__(fitted.folder, fitted.source.name, settings, engine_args)
        server = settings.server
        self.fitted = fitted
        self.listed = server.variants
        self.swap_timeout = server.swap_timeout_s
        self.swap_waiting = server.swap_waiting
        self.any_budget = any_budget or server.any_budget
        self.loaded_hash = fitted.plan.hash
        self._plans: dict[str, Plan] = {"": fitted.plan}
        self._swap = asyncio.Lock()
        self._waiting = 0
        self._machine = machine_budget(fitted.source, fitted.budget.shape)

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
            f = self.fitted
            plan = make_plan(f.profile, spec, f.source.settings, machine=self._machine)
            require_plan_fits(plan, f.budget, f"{self.name}@{spec}")
            self._plans[spec] = plan
        return self._plans[spec]

    def offered(self, spec: str, plan: Plan) -> bool:
        """Whether a client may have this variant: listed, already cached, or any (--any-budget)."""
        if self.any_budget or spec in ("", *self.listed) or plan.hash == self.loaded_hash:
            return True
        if any(self._listed_hash(s) == plan.hash for s in self.listed):  # plans are memoised
            return True
        return variant_status(self.fitted.source, plan) == "cached"

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
        if plan.hash == self.loaded_hash and self.ready:
            status = "loaded"
        else:
            status = variant_status(self.fitted.source, plan)
        return {"id": model_id, "created": self.created, "status": status,
                "context_length": self.fitted.budget.context, **plan.summary(),
                "runtime_shape": asdict(self.fitted.budget.shape),
                "memory_bytes": plan.memory_bytes}  # fmt: skip

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
        previous = (self.folder, self.loaded_hash, self.loaded_id)
        source = self.fitted.source
        cache.hold(model_dir(source.fingerprint, plan.hash))  # to be loaded: never evicted
        try:
            self.stage = f"quantizing {model_id}"
            with watching(self._report):  # the worker thread inherits the watcher
                folder, _ = await asyncio.to_thread(quantize, source, plan, progress=False)
            self.progress = None
            self.stage = f"loading {model_id}"
            await asyncio.to_thread(self._replace, folder)
            if folder != previous[0]:
                cache.release(previous[0])  # the old variant may be evicted from now on
            self.folder, self.loaded_hash, self.loaded_id = folder, plan.hash, model_id
        except Exception as e:
            self.progress = None
            log.exception("swap to %s failed; restoring %s", model_id, previous[2])
            cache.release(model_dir(source.fingerprint, plan.hash))
            self.stage = f"restoring {previous[2]}"
            await asyncio.to_thread(self._replace, previous[0])
            self.stage = "ready"
            raise BudgetError(f"could not switch to {model_id}: {e}") from e
        self.stage = "ready"

    def how_fitted(self) -> Fit:
        return self.fitted

    def _report(self, step: Step) -> None:
        self.progress = step

    def _replace(self, folder: Any) -> None:
        """Free the old engine before loading the new: two models are never held at once."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        import mlx.core as mx

        mx.clear_cache()
        self.engine = Engine(folder, self.settings, **self.engine_args)
