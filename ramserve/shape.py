"""Choosing the runtime shape the weights are fitted beside: context, parallel sequences, prefill step
and KV precision.

What the user gave (``--context``, ``--parallel``, ``--kv-bits`` 16/8/4) is kept as given; the defaults
in configs/ are targets. When the weights a model needs do not fit beside the shape asked for, the fit
gives up, in the order of ``[budget] shrink_order``, what costs least, and stops at the first shape
that fits:

- ``prefill_chunk``: halved down to ``[budget] min_prefill_chunk``; a long prompt prefills in more
  steps (the scratch of one step shrinks with it);
- ``prefill_batch``: halved down to 1; prompts that arrive together prefill one after another;
- ``kv_bits``: with ``--kv-bits auto``, 16 then 8 then 4 bits (ramserve/kvcache.py);
- ``parallel``: halved down to 1; fewer requests decode at once and the rest wait in the queue;
- ``context``: the longest that fits, in the KV cache's steps, down to ``[budget] min_context``.

With a KV damage the profile measured, ``--kv-bits auto`` is not a step of that order but a choice
(``choose_kv``): the shape and the plan are found for 16 bits and each measured precision, and the one
that keeps the asked context and parallelism with the least predicted damage, weights plus KV cache,
wins.

Every shape tried and not taken is kept in the budget (``Budget.rejected``) with the weight bytes it
would have left, so that ``ramserve budget`` and ``ramserve run`` show why the shape is what it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from .budget import (
    ActivationShape,
    Ask,
    Budget,
    KVOption,
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


Step = Callable[[RuntimeShape, Settings], RuntimeShape | None]


def _halve_chunk(s: RuntimeShape, settings: Settings) -> RuntimeShape | None:
    floor = settings.budget.min_prefill_chunk
    return (
        replace(s, prefill_chunk=max(floor, s.prefill_chunk // 2))
        if s.prefill_chunk > floor
        else None
    )


def _halve_batch(s: RuntimeShape, settings: Settings) -> RuntimeShape | None:
    return replace(s, prefill_batch=s.prefill_batch // 2) if s.prefill_batch > 1 else None


def _fewer_kv_bits(s: RuntimeShape, settings: Settings) -> RuntimeShape | None:
    return replace(s, kv_bits=KV_STEPS[s.kv_bits]) if s.kv_bits in KV_STEPS else None


def _halve_parallel(s: RuntimeShape, settings: Settings) -> RuntimeShape | None:
    if s.parallel <= 1:
        return None
    parallel = s.parallel // 2
    return replace(s, parallel=parallel, prefill_batch=min(s.prefill_batch, parallel))


KV_STEPS = {16: 8, 8: 4}
STEPS: dict[str, Step] = {"prefill_chunk": _halve_chunk, "prefill_batch": _halve_batch,
                          "kv_bits": _fewer_kv_bits, "parallel": _halve_parallel}  # fmt: skip


def smaller_shapes(
    first: RuntimeShape, settings: Settings, fixed: set[str]
) -> Iterator[RuntimeShape]:
    """The order of ``[budget] shrink_order`` up to the context (``fit_shape``'s last resort), each
    shape one step smaller than the last; what is in ``fixed`` is left as it is."""
    shape = first
    for name in settings.budget.shrink_order:
        if name in fixed or name not in STEPS:
            continue
        while (smaller := STEPS[name](shape, settings)) is not None:
            shape = smaller
            yield shape


def fit_shape(
    kv: KVShape,
    act: ActivationShape,
    settings: Settings,
    needed: int,
    ask: Ask,
) -> Budget:
    """The budget at the first shape, in the order above, that leaves ``needed`` bytes for the
    weights; when none does, the budget at the smallest shape (its ``weights`` fall short). Under
    ``--kv-bits auto`` (``ask.kv_bits`` None) 16 bits come first, fewer when the order comes to them."""

    def at(shape: RuntimeShape) -> Budget:
        return budget_for(kv, act, settings, shape, device=ask.device, min_safe=needed)

    budget = at(default_shape(kv, settings, ask.context, ask.parallel, ask.kv_bits or 16))
    rejected: list[Rejected] = []
    fixed = {name for name in ("parallel", "kv_bits") if getattr(ask, name) is not None}
    if not kv.quantizable:
        fixed.add("kv_bits")
    for shape in smaller_shapes(budget.shape, settings, fixed):
        if budget.weights >= needed:
            break
        rejected.append(Rejected(budget.shape, budget.weights))
        budget = at(shape)
    if budget.weights < needed and ask.context is None:
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


def fit_source_shape(source: Source, needed: int, ask: Ask) -> Budget:
    """fit_shape for a model: its KV and activation shapes, on this machine or a named device."""
    kv = kv_shape(source, ask.device)
    return fit_shape(kv, activation_shape(source), source.settings, needed, ask)


T = TypeVar("T")


def choose_kv(
    kv_damage: dict[str, float],
    asked: tuple[int, int],
    shaped: Callable[[int], Budget],
    plan_at: Callable[[Budget], tuple[float, T] | None],
) -> tuple[Budget, T] | None:
    """``--kv-bits auto`` with a measured KV damage: of 16 bits and each measured precision, the one
    whose fitted shape (``shaped(bits)``) keeps the context and parallelism ``asked`` when any does,
    then the least predicted damage of the weights (``plan_at``: the plan's damage, and the plan) plus
    the KV cache's. The budget returned lists every option weighed (``Budget.kv_options``); None when
    no precision fits."""
    weighed: list[tuple[KVOption, Budget, T]] = []
    options: list[KVOption] = []
    for bits in (16, *sorted((int(b) for b in kv_damage), reverse=True)):
        budget = shaped(bits)
        keeps = (budget.shape.context, budget.shape.parallel) == asked
        planned = plan_at(budget) if budget.weights >= (budget.needed or 0) else None
        option = KVOption(
            bits, planned[0] if planned else None, kv_damage.get(str(bits), 0.0), keeps
        )
        options.append(option)
        if planned is not None:
            weighed.append((option, budget, planned[1]))
    if not weighed:
        return None
    _, budget, plan = min(weighed, key=lambda w: (not w[0].keeps_shape, w[0].total))
    budget.kv_options = options
    return budget, plan
