"""Choosing the runtime shape the weights are fitted beside: context, parallel sequences, prefill step.

The user's ``--context`` and ``--parallel`` are kept as given; the defaults in configs/ are targets.
When the weights a model needs do not fit beside the shape asked for, the fit gives up, in this order,
what costs least, and stops at the first shape that fits:

1. the prefill chunk, halved down to ``[budget] min_prefill_chunk``: a long prompt prefills in more
   steps (the scratch of one step shrinks with it);
2. the prefill batch, halved down to 1: prompts that arrive together prefill one after another;
3. the parallel sequences, halved down to 1, unless the user gave ``--parallel``: fewer requests
   decode at once and the rest wait in the queue;
4. the context, unless the user gave ``--context``: the longest that fits, in the KV cache's steps,
   down to ``[budget] min_context``.

Every shape tried and not taken is kept in the budget (``Budget.rejected``) with the weight bytes it
would have left, so that ``ramserve budget`` and ``ramserve run`` show why the shape is what it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from .budget import (
    ActivationShape,
    Budget,
    KVShape,
    Rejected,
    RuntimeShape,
    activation_shape,
    budget_for,
    default_shape,
    kv_shape,
)
from .settings import Settings

if TYPE_CHECKING:
    from .source import Source


def smaller_shapes(first: RuntimeShape, settings: Settings, *, keep_parallel: bool,
                   ) -> Iterator[RuntimeShape]:  # fmt: skip
    """Steps 1-3 of the order above, each shape one step smaller than the last."""
    shape = first
    while shape.prefill_chunk > settings.budget.min_prefill_chunk:
        shape = replace(shape, prefill_chunk=max(settings.budget.min_prefill_chunk,
                                                 shape.prefill_chunk // 2))  # fmt: skip
        yield shape
    while shape.prefill_batch > 1:
        shape = replace(shape, prefill_batch=shape.prefill_batch // 2)
        yield shape
    while not keep_parallel and shape.parallel > 1:
        parallel = shape.parallel // 2
        shape = replace(shape, parallel=parallel, prefill_batch=min(shape.prefill_batch, parallel))
        yield shape


def fit_shape(
    kv: KVShape,
    act: ActivationShape,
    settings: Settings,
    needed: int,
    *,
    context: int | None = None,
    parallel: int | None = None,
    device: str | None = None,
) -> Budget:
    """The budget at the first shape, in the order above, that leaves ``needed`` bytes for the
    weights; when none does, the budget at the smallest shape (its ``weights`` fall short)."""

    def at(shape: RuntimeShape) -> Budget:
        return budget_for(kv, act, settings, shape, device=device, min_safe=needed)

    budget = at(default_shape(kv, settings, context, parallel))
    rejected: list[Rejected] = []
    for shape in smaller_shapes(budget.shape, settings, keep_parallel=parallel is not None):
        if budget.weights >= needed:
            break
        rejected.append(Rejected(budget.shape, budget.weights))
        budget = at(shape)
    if budget.weights < needed and context is None:
        shorter = _longest_context(budget.shape, at, needed, kv.step, settings.budget.min_context)
        if shorter is not None:
            rejected.append(Rejected(budget.shape, budget.weights))
            budget = shorter
    budget.rejected, budget.needed = rejected, needed
    return budget


def _longest_context(shape: RuntimeShape, at: Callable[[RuntimeShape], Budget], needed: int,
                     step: int, floor: int) -> Budget | None:  # fmt: skip
    """The budget at the longest context (a multiple of ``step``, at least ``floor``) shorter than
    ``shape``'s that leaves ``needed`` bytes for the weights, or None."""

    def shaped(context: int) -> RuntimeShape:
        return replace(shape, context=context, prefill_chunk=min(shape.prefill_chunk, context))

    lo, hi = max(1, -(-floor // step)), (shape.context - 1) // step
    best = None
    while lo <= hi:  # the weights' room shrinks as the context grows: bisect on it
        mid = (lo + hi) // 2
        b = at(shaped(mid * step))
        if b.weights >= needed:
            best, lo = b, mid + 1
        else:
            hi = mid - 1
    return best


def fit_source_shape(
    source: Source,
    needed: int,
    *,
    context: int | None = None,
    parallel: int | None = None,
    device: str | None = None,
) -> Budget:
    """fit_shape for a model: its KV and activation shapes, on this machine or a named device."""
    return fit_shape(kv_shape(source, device), activation_shape(source), source.settings, needed,
                     context=context, parallel=parallel, device=device)  # fmt: skip
