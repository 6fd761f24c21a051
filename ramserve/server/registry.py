"""Which models the server offers, and the engine that answers a request for one.

A registry owns the loaded engine. Requests take a lease on it for their whole life, so a registry
that swaps models (variants, see ramserve/variants.py) waits for the leases on the old engine before
it frees it, and never holds two models at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import cache
from ..engine import Engine
from ..errors import RamserveError, in_words, log_failure
from ..fit import Fit
from ..hosts import Part
from ..progress import Step
from ..records import Plan
from ..settings import Settings

log = logging.getLogger("ramserve.server")


class UnknownModel(RamserveError):
    """No model by that id is served here."""


class NotReady(RamserveError):
    """The model is still loading (or failed to load)."""


class NotOffered(RamserveError):
    """A budget variant this server does not quantize on request (see ``--any-budget``)."""

    param = "model"


class Registry:
    """Serves one model folder under one name."""

    def __init__(self, folder: Path, name: str, settings: Settings,
                 engine_args: dict[str, Any]) -> None:  # fmt: skip
        self.name = name
        self.folder = Path(folder)
        self.settings = settings
        self.engine_args = engine_args
        self.engine: Engine | None = None
        self.stage = "starting"
        self.error: str | None = None
        self.created = int(time.time())
        self.loaded_id = name  # the id of the model loaded now
        self.progress: Step | None = None  # the long work under way (a swap's quantization)
        self._leases: dict[int, int] = {}
        self._idle = asyncio.Condition()  # binds to the server's loop on first use

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load in the background, so /health can answer 503 while the model loads."""
        threading.Thread(target=self._load_initial, name="ramserve-load", daemon=True).start()

    def _load_initial(self) -> None:
        try:
            self.stage = "loading model"
            cache.hold(self.folder)  # never evicted while this server has it loaded
            self.engine = Engine(self.folder, self.settings, **self.engine_args)
            self.stage = "ready"
        except Exception as e:  # reported by /health and every request, never a crash
            log_failure(log, e, "loading %s failed", self.folder)
            self.error = f"the model failed to load: {in_words(e)}"
            self.stage = "failed"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.stage == "ready"

    # -- models -------------------------------------------------------------------------------

    def cards(self) -> list[dict[str, Any]]:
        return [self.card_for(self.name)]

    def how_fitted(self) -> Fit | None:
        """How ``ramserve run`` fitted the model to this machine (None: ``ramserve serve``)."""
        return None

    def host_parts(self) -> list[Part]:
        """Each host's share of the loaded model, where it is split over several (cluster.py)."""
        return []

    def loaded_plan(self) -> Plan | None:
        """The plan of the model loaded now (None: a folder ramserve did not quantize)."""
        return Plan.in_folder(self.folder)

    def card_for(self, model_id: str) -> dict[str, Any]:
        if model_id != self.name:
            raise UnknownModel(f"model {model_id!r} does not exist; this server has {self.name!r}")
        plan = Plan.in_folder(self.folder)
        return {"id": self.name, "created": self.created,
                "status": "loaded" if self.ready else
                          "failed" if self.stage == "failed" else "loading",
                "context_length": self.engine.context if self.engine else None,
                "runtime_shape": asdict(self.engine.runtime_shape()) if self.engine else None,
                **(plan.summary() if plan else {})}  # fmt: skip

    # -- requests -----------------------------------------------------------------------------

    async def resolve(self, model_id: str) -> Engine:
        """The engine for a model id, ready to take requests (swapping models is a subclass's)."""
        self.card_for(model_id)
        return self.require_ready()

    def require_ready(self) -> Engine:
        if self.stage == "failed":
            raise NotReady(self.error or "the model failed")
        if self.engine is None or not self.ready:
            raise NotReady(f"the model is not ready yet ({self.stage})")
        return self.engine

    @contextlib.asynccontextmanager
    async def lease(self, model_id: str) -> AsyncIterator[Engine]:
        engine = await self.resolve(model_id)
        key = id(engine)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield engine
        finally:
            self._leases[key] -= 1
            async with self._idle:
                self._idle.notify_all()

    async def wait_unleased(self, engine: Engine, timeout: float) -> None:
        async with self._idle:
            await asyncio.wait_for(
                self._idle.wait_for(lambda: self._leases.get(id(engine), 0) == 0), timeout
            )
