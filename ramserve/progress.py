"""Progress of long work: a bar on the terminal, and the same steps for whoever watches.

The terminal gets tqdm's bar. A watcher (the server, showing a variant swap on its web page) is set
for the current context with ``watching``: ``asyncio.to_thread`` copies the context into its worker,
so the work started for one swap reports to that swap alone, and no global state is shared.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Where one bar stands: ``done`` of ``total`` ``unit`` after ``elapsed_s`` seconds."""

    desc: str
    done: float
    total: float
    unit: str
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


Watcher = Callable[[Step], None]
_watcher: ContextVar[Watcher | None] = ContextVar("ramserve_progress", default=None)


@contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """Report every bar opened in this context (and the threads it starts) to ``watcher``."""
    token = _watcher.set(watcher)
    try:
        yield
    finally:
        _watcher.reset(token)


class Bar:
    """A progress bar: tqdm on stderr when ``show``, and a ``Step`` to the context's watcher."""

    def __init__(self, total: float, desc: str, *, unit: str = "it", show: bool = True,
                 unit_scale: bool = False) -> None:  # fmt: skip
        from tqdm import tqdm

        self.desc, self.total, self.unit, self.done = desc, total, unit, 0.0
        self.started = time.monotonic()
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                          file=sys.stderr, disable=not show, dynamic_ncols=True)  # fmt: skip
        self._watcher = _watcher.get()
        self._report()

    def update(self, n: float = 1) -> None:
        self.done += n
        self._tqdm.update(n)
        self._report()

    def note(self, text: str) -> None:
        """A short status after the bar (``3/40 modules``)."""
        self._tqdm.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._tqdm.close()

    def _report(self) -> None:
        if self._watcher is not None:
            elapsed = time.monotonic() - self.started
            self._watcher(Step(self.desc, self.done, self.total, self.unit, elapsed))
