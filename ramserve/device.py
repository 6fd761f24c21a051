"""Facts about the device ramserve runs on, which every stage may use: the dtype the runtime computes
in, bytes per float, and this machine's memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_GROUP_SIZE = 64  # elements per scale and bias of a quantized KV cache (ramserve/kvcache.py)


def kv_quantizable(head_dim: int) -> bool:
    """Whether attention heads of ``head_dim`` elements can be stored in 8 or 4 bits: whole groups of
    KV_GROUP_SIZE (which also fill whole 32-bit words at either width)."""
    return head_dim > 0 and head_dim % KV_GROUP_SIZE == 0


def runtime_dtype(stored: str = "bfloat16") -> str:
    """The dtype activations, scales and 16-bit weights take in memory on this device."""
    return "float32" if mx.default_device() == mx.cpu else stored


def runs_on_metal() -> bool:
    return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu


def attention_materialises_scores(metal: bool, kv_bits: int) -> bool:
    """Whether prefill attention holds its whole score matrix (heads x chunk x context), read from
    MLX's sources: ``mx.fast.scaled_dot_product_attention`` falls back to matmul + softmax on the
    CPU always and on CUDA for prefill (its fused kernel, ``sdpa_vector``, takes one query token);
    on Metal, prefill runs fused (``steel_attention``). mlx-lm's attention over a quantized KV cache
    is matmul + softmax on every back end."""
    return not metal or kv_bits < 16


@dataclass(frozen=True)
class Machine:
    name: str
    total: int
    available: int
    working_set_limit: int | None  # MLX's recommended limit for the GPU (Apple Silicon)
    live: bool  # this machine (available memory is real) or a named device (a fresh boot)


def this_machine(stated_gb: float = 0) -> Machine:
    """This machine's memory, measured; or ``stated_gb`` GiB, installed and free (``[budget]
    memory_gb``)."""
    import psutil

    if stated_gb:
        total = int(stated_gb * 2**30)
        return Machine(f"this machine (stated: {stated_gb:g} GiB)", total, total, None, False)

    vm = psutil.virtual_memory()
    info: dict[str, Any] = {}
    if mx.metal.is_available():
        info = dict(mx.device_info())
    limit = info.get("max_recommended_working_set_size")
    return Machine(
        "this machine", int(vm.total), int(vm.available), int(limit) if limit else None, True
    )
