"""The three places ramserve reaches into mlx-lm's models, each behind one small contract.

- **The decoder stack** (used by fisher's layer streaming): ``DecoderStack.of(model)`` finds the
  decoder layers (``model.layers``), their module paths, and the list the model's own forward loop
  reads them from. Replacing that list's entries makes the loop call stand-ins, which is how one layer
  at a time is loaded. Contract: ``model.layers`` lists the decoder layers in order, and each is an
  entry of one list attribute of one module (``model.model.layers`` for every mlx-lm LLM ramserve is
  tested on; ``model.layers`` may be a copy of a slice of it).
- **A layer's cache argument** (used by fisher's KV measurement): ``with_cache(args, kwargs, cache)``
  gives a decoder layer's call, as the model's loop made it, another cache. Contract: mlx-lm's decoder
  layers are called ``layer(x, mask, cache)``, the cache positional or as ``cache=``.
- **Layer classes** (used by cpu): ``swap_classes(model, conversions)`` gives every module of exactly
  a listed class its replacement class in place. Contract: the replacement subclasses the original and
  keeps its parameters, so the tree, the weights and every reader of the model see no difference.

All are tested on each architecture ramserve supports (Llama, Qwen3 tied and untied, Qwen3-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.nn as nn


@dataclass
class DecoderStack:
    layers: list[Any]  # the real decoder layers, in order
    paths: list[str]  # their module paths ("model.layers.3")
    slots: list[Any]  # the list the model's loop reads; its entries may be replaced

    @classmethod
    def of(cls, model: nn.Module) -> DecoderStack:
        layers = list(getattr(model, "layers", None) or [])
        if not layers:
            raise ValueError("the model has no decoder layer list (model.layers)")
        modules = dict(model.named_modules())
        names = {id(m): p for p, m in modules.items()}
        if any(id(layer) not in names for layer in layers):
            raise ValueError("model.layers holds modules outside the model's tree")
        paths = [names[id(layer)] for layer in layers]
        owner, _, attr = paths[0].rpartition(".")[0].rpartition(".")
        slots = (modules[owner] if owner else model)[attr]
        if not isinstance(slots, list) or any(s is not layer for s, layer in
                                               zip(slots[-len(layers):], layers, strict=True)):  # fmt: skip
            raise ValueError(f"the decoder layers are not one list attribute ({paths[0]})")
        return cls(layers, paths, slots)


def with_cache(
    args: tuple[Any, ...], kwargs: dict[str, Any], cache: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A decoder layer's extra call arguments (after ``x``) with ``cache`` as its cache."""
    if "cache" in kwargs or len(args) < 2:
        return args, {**kwargs, "cache": cache}
    return (args[0], cache, *args[2:]), kwargs


def swap_classes(model: nn.Module, conversions: dict[type, type]) -> list[Any]:
    """Give each module of exactly a key class the value class, in place; the modules changed."""
    changed = []
    for _, module in model.named_modules():
        target = conversions.get(type(module))
        if target is not None:
            assert issubclass(target, type(module)), (target, type(module))
            module.__class__ = target
            changed.append(module)
    return changed
