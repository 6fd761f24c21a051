"""A model split over ranks along its decoder layers, on MLX's distributed back ends: each rank runs its
own contiguous layers, and hidden states pass between neighbours with ``mx.distributed`` send/recv (the
ring back end over TCP everywhere; JACCL over Thunderbolt 5 where MLX has it).

Generic over mlx-lm's model structure through ``seams.DecoderStack``: every rank runs the model's own
forward pass, with the other ranks' layers replaced by stand-ins. The layer just before a rank's first
receives the hidden state from the rank before it; the rank's last layer sends its output on to the
next; the others pass their input through. The last rank sends its output back to rank 0, which alone
holds the embedding and the head: it computes the logits and the token. The other ranks hold neither
(a stand-in gives the shapes the forward pass expects), and their tokens are never used: serving,
rank 0 tells them each step what changed in the batch (ramserve/crew.py), and their stages read only
hidden states.

A stand-in keeps its layer's cache slot in step with one-wide placeholders, so every rank's masks
(mlx-lm's ``create_attention_mask(h, cache[0])``, from a stand-in's slot on ranks after the first) and
its batch bookkeeping (padding, filtering, merging for continuous batching) are what one process has,
chunked prefill included. The placeholders are made from the hidden state, so that evaluating the
caches, which is all a prefill step evaluates, runs every send and receive before them on every rank.

Serving a split model (``ramserve run --hosts``) is ramserve/cluster.py's; ``greedy`` here decodes one
sequence (``ramserve pipeline`` under ``mlx.launch``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BadModel, RamserveError
from .quantize import holds
from .relay import Share, share_of
from .seams import DecoderStack
from .settings import KindRule


class PassThrough(nn.Module):
    """Another rank's layer: the hidden state goes through unchanged. Its cache slot is kept in
    step with a one-wide key and value per token (4 bytes a token), so the masks the model makes
    from it (``create_attention_mask(h, cache[0])``) and the batch's cache bookkeeping (padding,
    filtering, merging) are the ones the real layer's cache would give."""

    holds_no_kv = True  # ramserve/kvcache.py gives its slot a plain cache

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if cache is not None and hasattr(cache, "update_and_fetch"):
            # Made from x, so that evaluating the caches (a prefill step evaluates nothing else)
            # runs the sends and receives before it on every rank alike.
            ghost = (x[..., :1] * 0).astype(mx.float16)[:, None]
            cache.update_and_fetch(ghost, ghost)
        return x


class Receive(PassThrough):
    """The layer before this rank's first: the hidden state comes from rank ``source``."""

    def __init__(self, source: int) -> None:
        super().__init__()
        self.source = source

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return mx.distributed.recv_like(super().__call__(x, *args, **kwargs), self.source)


class SendOn(nn.Module):
    """This rank's last layer: runs it, and sends its output to rank ``dest``."""

    def __init__(self, layer: nn.Module, dest: int) -> None:
        super().__init__()
        self.inner = layer
        self.dest = dest

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return mx.distributed.send(self.inner(x, *args, **kwargs), self.dest)


class ReceiveLast(PassThrough):
    """Rank 0's slot for the model's last layer: the last rank's output comes back, and rank 0
    computes the final norm, the head and the token."""

    def __init__(self, source: int) -> None:
        super().__init__()
        self.source = source

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        x = super().__call__(x, *args, **kwargs)
        # Send first: nothing in the graph orders this receive after the send to rank 1, and the
        # last rank's output needs that send.
        mx.eval(x)
        return mx.distributed.recv_like(x, self.source)


class Absent(nn.Module):
    """An embedding (or a head) this rank does not hold. As the embedding: zeros of the shape the
    forward pass expects (the hidden state they stand for comes from the previous rank). As the head
    (called, or ``as_linear`` for a tied one): two logits per position, made from the hidden state so
    that evaluating it runs this rank's send; the tokens it gives are never used (rank 0 samples)."""

    def __init__(self, width: int, dtype: mx.Dtype) -> None:
        super().__init__()
        self.width, self.dtype = width, dtype

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim == 2 or not mx.issubdtype(x.dtype, mx.floating):  # token ids: the embedding
            return mx.zeros((*x.shape, self.width), dtype=self.dtype)
        return self.as_linear(x)

    def as_linear(self, x: mx.array) -> mx.array:
        # Two logits, not one: MLX answers an argmax over one element without reading it, and
        # then this rank's send would never run.
        return x[..., :2] * 0


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    parent = dict(model.named_modules())[owner] if owner else model
    setattr(parent, attr, module)


def _float_dtype(module: nn.Module) -> mx.Dtype:
    scales = getattr(module, "scales", None)  # a quantized module's floats are its scales
    dtype: mx.Dtype = (scales if scales is not None else module.weight).dtype
    return dtype


def stage(model: nn.Module, share: Share, kinds: list[KindRule], hidden: int,
          stored: set[str] | None = None, folder: Path | None = None) -> None:  # fmt: skip
    """Make ``model`` this rank's stage, in place: the stand-ins above in place of what it does not
    run. The modules it drops are never evaluated, so a lazily loaded model reads only its share.
    Given the tensors ``stored`` in its ``folder`` (a rank's part holds only its own), every one the
    stage keeps must be among them."""
    stack = DecoderStack.of(model)
    n = len(stack.slots)
    if share.stop > n:
        raise RamserveError(
            f"rank {share.rank} is given layers up to {share.stop}; the model has {n}"
        )
    pattern = {rule.name: re.compile(rule.pattern) for rule in kinds}
    if stored is not None:  # what the stage keeps is what a part holds (quantize.holds)
        ends = tuple(f"{p}." for p, _ in model.named_modules()
                     if pattern["embedding"].search(p) or pattern["lm_head"].search(p))  # fmt: skip
        flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        kept = [k for k, _ in flat if k not in stored and holds(share, k, ends)]
        if kept:
            raise BadModel(f"{folder} lacks {len(kept)} of rank {share.rank}'s tensors "
                           f"({kept[0]}, …): it is not this rank's part of the model")  # fmt: skip
    for i in range(n):
        if i < share.start:
            stack.slots[i] = Receive(share.rank - 1) if i == share.start - 1 else PassThrough()
        elif i >= share.stop:
            last_of_model = i == n - 1 and share.first
            stack.slots[i] = ReceiveLast(share.size - 1) if last_of_model else PassThrough()
        elif i == share.stop - 1 and share.size > 1:
            stack.slots[i] = SendOn(stack.slots[i], (share.rank + 1) % share.size)
    if share.first:
        return
    modules = dict(model.named_modules())
    embedding = next(p for p in modules if pattern["embedding"].search(p))
    absent = Absent(hidden, _float_dtype(modules[embedding]))
    _replace(model, embedding, absent)
    for head in [p for p in modules if pattern["lm_head"].search(p)]:
        _replace(model, head, absent)


def stager(folder: Path, bounds: Sequence[int], rank: int,
           kinds: list[KindRule]) -> Callable[[nn.Module], None]:  # fmt: skip
    """What makes a freshly (lazily) loaded model in ``folder`` rank ``rank``'s stage."""
    share = share_of(bounds, rank)
    hidden = int(json.loads((Path(folder) / "config.json").read_text())["hidden_size"])
    index = Path(folder) / "model.safetensors.index.json"
    stored = set(json.loads(index.read_text())["weight_map"]) if index.is_file() else None
    return lambda model: stage(model, share, kinds, hidden, stored, Path(folder))


def greedy(model: nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """Greedy decoding across the ranks: rank 0 returns the tokens (the others, placeholders)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = mx.array(prompt, dtype=mx.int32)[None]
    out: list[int] = []
    for _ in range(tokens):
        token = mx.argmax(model(ids, cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        out.append(cast(int, token.item()))
        ids = token.reshape(1, 1).astype(mx.int32)
    return out


def run_greedy(folder: Path, bounds: Sequence[int], prompt: str, tokens: int,
               kinds: list[KindRule]) -> dict[str, Any]:  # fmt: skip
    """This rank's part of a greedy run of the model in ``folder`` split at ``bounds`` (one range
    per rank of the group ``mlx.launch`` started)."""
    from mlx_lm.utils import load

    group = mx.distributed.init()
    if len(bounds) - 1 != group.size():
        raise RamserveError(f"{len(bounds) - 1} layer ranges for {group.size()} ranks")
    model, tokenizer = load(str(folder), lazy=True)  # a rank reads only what it evaluates
    stager(folder, bounds, group.rank(), kinds)(model)
    out = greedy(model, tokenizer.encode(prompt), tokens)
    return {"rank": group.rank(), "size": group.size(), "bounds": list(bounds),
            "tokens": out if group.rank() == 0 else None}  # the others' are placeholders  # fmt: skip
