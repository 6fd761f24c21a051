"""A quantized KV cache for continuous batching.

mlx-lm quantizes the KV cache of one sequence (``QuantizedKVCache``) but its batched server keeps 16-bit
caches (``BatchKVCache``). ``QuantizedBatchKVCache`` is ``BatchKVCache`` with each of keys and values
stored as MLX's affine triple (packed codes, scales, biases): the same left padding, the same join
(``extend``, ``merge``), leave (``filter``) and hand-over to the prompt cache (``extract``). Each token's
vector is quantized on its own (groups run along the head dimension), so every one of those operations
moves along the token axis exactly as it does for 16-bit arrays, applied to the three parts alike.
Attention reads the cache through mlx-lm's ``quantized_scaled_dot_product_attention``, which mlx-lm's
models take whenever the cache carries ``bits``.

Layers whose cache mlx-lm makes a ``RotatingKVCache`` (sliding windows) stay 16-bit: their window
bounds them already, and mlx-lm has no quantized rotating cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, dynamic_roll

from .device import KV_GROUP_SIZE as GROUP_SIZE

Parts = tuple[mx.array, mx.array, mx.array]  # packed codes, scales, biases


def _each(parts: Parts, f: Callable[[mx.array], mx.array]) -> Parts:
    return (f(parts[0]), f(parts[1]), f(parts[2]))


def _empty(shape: tuple[int, int, int], dim: int, bits: int, dtype: mx.Dtype) -> Parts:
    """Zeroed storage for ``shape`` = (batch, heads, tokens) vectors of ``dim`` elements."""
    per_word = 32 // bits
    return (mx.zeros((*shape, dim // per_word), dtype=mx.uint32),
            mx.zeros((*shape, dim // GROUP_SIZE), dtype=dtype),
            mx.zeros((*shape, dim // GROUP_SIZE), dtype=dtype))  # fmt: skip


class SequenceKVCache(QuantizedKVCache):
    """One sequence's quantized cache, as the prompt cache keeps it: mlx-lm's ``QuantizedKVCache``
    that knows its length and joins a batch."""

    def __init__(self, bits: int) -> None:
        super().__init__(group_size=GROUP_SIZE, bits=bits)

    def size(self) -> int:
        return int(self.offset)

    @classmethod
    def merge(cls, caches: list[Any]) -> QuantizedBatchKVCache:
        return QuantizedBatchKVCache.merge(caches)


class QuantizedBatchKVCache(BatchKVCache):
    keys: Parts | None
    values: Parts | None
    offset: mx.array  # per sequence: tokens held, less its left padding
    left_padding: mx.array
    _idx: int  # tokens stored, padding included
    _right_padding: mx.array | None

    def __init__(self, left_padding: list[int], bits: int = 8) -> None:
        super().__init__(left_padding)
        self.bits, self.group_size = bits, GROUP_SIZE

    def _parts(self) -> tuple[Parts, Parts]:
        assert self.keys is not None and self.values is not None, "an empty cache has no parts"
        return self.keys, self.values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Parts, Parts]:
        prev, count = self._idx, keys.shape[2]
        if self.keys is None or prev + count > self.keys[0].shape[2]:
            steps = (self.step + count - 1) // self.step * self.step
            shape = (keys.shape[0], keys.shape[1], steps)
            new_k = _empty(shape, keys.shape[3], self.bits, keys.dtype)
            new_v = _empty(shape, values.shape[3], self.bits, values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                old_k, old_v = self._parts()
                end = prev if prev % self.step else old_k[0].shape[2]

                def grown(old: Parts, new: Parts) -> Parts:
                    return (mx.concatenate([old[0][..., :end, :], new[0]], axis=2),
                            mx.concatenate([old[1][..., :end, :], new[1]], axis=2),
                            mx.concatenate([old[2][..., :end, :], new[2]], axis=2))  # fmt: skip

                self.keys, self.values = grown(old_k, new_k), grown(old_v, new_v)
        self.offset = self.offset + count
        self._idx += count
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for stored, new in zip(self._parts(), (qk, qv), strict=True):
            for part, fresh in zip(stored, new, strict=True):
                part[..., prev : self._idx, :] = fresh
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Parts, Parts]:
        idx = self._idx
        k, v = self._parts()
        return _each(k, lambda x: x[..., :idx, :]), _each(v, lambda x: x[..., :idx, :])

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding, shift = self._right_padding, self._right_padding[:, None]
            k, v = self._parts()
            self.keys = _each(k, lambda x: dynamic_roll(x, shift, axis=2))
            self.values = _each(v, lambda x: dynamic_roll(x, shift, axis=2))
            self.offset = self.offset - padding
            self.left_padding = self.left_padding + padding
            self._right_padding = None

    def filter(self, batch_indices: list[int]) -> None:
        kept = mx.array(batch_indices)
        if self.keys is not None:
            k, v = self._parts()
            self.keys, self.values = _each(k, lambda x: x[kept]), _each(v, lambda x: x[kept])
        self.offset = self.offset[kept]
        self.left_padding = self.left_padding[kept]
        shift = int(np.asarray(self.left_padding).min())
        if shift > 0:  # drop the padding every remaining sequence has
            if self.keys is not None:
                k, v = self._parts()
                self.keys = _each(k, lambda x: x[..., shift:, :])
                self.values = _each(v, lambda x: x[..., shift:, :])
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: QuantizedBatchKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref_k, ref_v = (self if self.keys is not None else other)._parts()
        idx = max(self._idx, other._idx)
        length = max(c._parts()[0][0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c: QuantizedBatchKVCache) -> tuple[Parts, Parts, mx.array]:
            """c's parts right-justified at ``idx`` in ``length`` tokens."""
            n, heads = int(c.offset.shape[0]), ref_k[0].shape[1]
            if c.keys is None:
                k = _empty((n, heads, 0), _dim(ref_k, self.bits), self.bits, ref_k[1].dtype)
                v = _empty((n, heads, 0), _dim(ref_v, self.bits), self.bits, ref_v[1].dtype)
            else:
                k, v = c._parts()
            left = idx - c._idx
            right = length - k[0].shape[2] - left

            def pad(x: mx.array) -> mx.array:
                x = x[..., : x.shape[2] + min(right, 0), :]
                return mx.pad(x, [(0, 0), (0, 0), (left, max(right, 0)), (0, 0)])

            return _each(k, pad), _each(v, pad), c.left_padding + left

        (k1, v1, p1), (k2, v2, p2) = aligned(self), aligned(other)
        self.keys = (mx.concatenate([k1[0], k2[0]]), mx.concatenate([k1[1], k2[1]]),
                     mx.concatenate([k1[2], k2[2]]))  # fmt: skip
        self.values = (mx.concatenate([v1[0], v2[0]]), mx.concatenate([v1[1], v2[1]]),
                       mx.concatenate([v1[2], v2[2]]))  # fmt: skip
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> SequenceKVCache:
        cache = SequenceKVCache(self.bits)
        padding = int(np.asarray(self.left_padding)[idx])

        def one(x: mx.array) -> mx.array:
            return mx.contiguous(x[idx : idx + 1, :, padding : self._idx])

        k, v = self._parts()
        cache.keys, cache.values = _each(k, one), _each(v, one)
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> QuantizedBatchKVCache:
        """One batch from sequences' caches (``SequenceKVCache``; fresh ones are empty)."""
        bits = caches[0].bits
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        batch = cls([longest - n for n in lengths], bits)
        if longest == 0:
            return batch
        full = next(c for c in caches if c.keys is not None)
        heads, dtype = full.keys[0].shape[1], full.keys[1].dtype
        shape = (len(caches), heads, longest)
        keys = _empty(shape, _dim(full.keys, bits), bits, dtype)
        values = _empty(shape, _dim(full.values, bits), bits, dtype)
        for i, (c, n) in enumerate(zip(caches, lengths, strict=True)):
            for stored, own in ((keys, c.keys), (values, c.values)):
                for part, src in zip(stored, own or (), strict=False):
                    part[i : i + 1, :, longest - n :] = src[..., :n, :]
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        k, v = self._parts()
        return sum(int(x.nbytes) for x in (*k, *v))


def _dim(parts: Parts, bits: int) -> int:
    """The vector length that ``parts`` store."""
    return int(parts[0].shape[-1]) * (32 // bits)


def sequence_caches(model: Any, bits: int | None) -> list[Any] | None:
    """A fresh sequence's caches with ``bits``-bit KV where the layer allows it (else mlx-lm's own),
    or None for mlx-lm's defaults (16-bit). A layer another rank runs (ramserve/pipeline.py's stand-ins,
    ``holds_no_kv``) keeps a plain cache: it stores one-wide placeholders, which cannot be quantized."""
    if bits is None or bits >= 16:
        return None
    from mlx_lm.models.cache import make_prompt_cache

    layers = getattr(model, "layers", [])
    elsewhere = {i for i, layer in enumerate(layers) if getattr(layer, "holds_no_kv", False)}
    return [SequenceKVCache(bits) if type(c) is KVCache and i not in elsewhere else c
            for i, c in enumerate(make_prompt_cache(model))]  # fmt: skip
