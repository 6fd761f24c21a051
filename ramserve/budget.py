"""How many bytes the weights may take: budget specs, the machine's memory, the KV cache, the fit.

The weight budget is usable memory minus the runtime and the KV cache:

    usable   = min(total - OS reserve, memory available now, MLX's working-set limit)
    runtime  = fixed process overhead + activation scratch of one prefill chunk per sequence
    KV       = what mlx-lm's caches allocate for `context` tokens x `parallel` sequences
    weights  = usable - runtime - KV

Every constant (reserve, overheads, named devices) is data in configs/.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .device import (
    FLOAT_BYTES,
    KV_GROUP_SIZE,
    Machine,
    attention_materialises_scores,
    kv_quantizable,
    runs_on_metal,
    runtime_dtype,
    this_machine,
)
from .errors import BudgetError
from .fmt import human_bytes
from .settings import BudgetSettings, Device, Settings

if TYPE_CHECKING:
    from .source import Source

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
SIZE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?b|b)\s*$", re.IGNORECASE)
PERCENT = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*%\s*$")
KV_PROJ = re.compile(r"layers\.(\d+)\.\w+\.(k_proj|v_proj)\.weight$")
BPW = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*bpw\s*$", re.IGNORECASE)
FORMS = "a size (6GB, 5.5GiB, 800MB), bits per weight (4.5bpw), a share of the bf16 size (30%), "
FORMS += "min-safe, max, auto, or a named device (see `ramserve budget --devices`)"


def parse_budget(spec: str, *, parameters: int, bf16_bytes: int) -> int:
    """Bytes for a size, bits-per-weight or percentage spec (symbolic specs are the caller's)."""
    forms: list[tuple[re.Pattern[str], Callable[[float, re.Match[str]], float]]] = [
        (SIZE, lambda n, m: n * UNITS[m["unit"].lower()]),
        (PERCENT, lambda n, m: n / 100 * bf16_bytes),
        (BPW, lambda n, m: n * parameters / 8),
    ]
    for pattern, to_bytes in forms:
        if match := pattern.match(spec):
            value = float(match["n"])
            if value <= 0:
                raise BudgetError(f"budget {spec!r} must be positive; accepted forms: {FORMS}")
            return int(to_bytes(value, match))
    raise BudgetError(f"cannot read budget {spec!r}; accepted forms: {FORMS}")


# ---------------------------------------------------------------------------------------------
# The KV cache


@dataclass(frozen=True)
class KVLayer:
    """One layer's cache: elements stored per token (keys + values, all heads) and its window."""

    per_token: int
    window: int | None = None


@dataclass(frozen=True)
class KVShape:
    """What a model's KV cache costs, derived from its mlx-lm module and tensor shapes."""

    layers: tuple[KVLayer, ...]
    dtype_bytes: int
    max_context: int | None
    step: int = 256  # mlx-lm's KVCache grows in steps of this many tokens
    bits: int = 16  # 8 or 4: stored as MLX affine codes (ramserve/kvcache.py), windows stay 16-bit
    head_dim: int = 0  # the attention heads' width (0: unknown)

    @property
    def quantizable(self) -> bool:
        """Whether the cache can be stored in 8 or 4 bits (in groups of KV_GROUP_SIZE per head)."""
        return kv_quantizable(self.head_dim)

    def element_bytes(self, windowed: bool = False) -> float:
        """Bytes per stored element: the float, or the code plus its group's scale and bias."""
        if self.bits >= 16 or windowed:
            return self.dtype_bytes
        return self.bits / 8 + 2 * self.dtype_bytes / KV_GROUP_SIZE

    def bytes(self, context: int, parallel: int = 1) -> int:
        """Bytes mlx-lm's caches allocate for ``context`` tokens in each of ``parallel`` sequences."""
        total = 0.0
        for layer in self.layers:
            allocated = math.ceil(context / self.step) * self.step
            if layer.window is not None:
                allocated = min(allocated, layer.window)
            total += allocated * layer.per_token * self.element_bytes(layer.window is not None)
        return round(total * parallel)

    def per_token(self) -> int:
        """Bytes per token of context for one sequence, unwindowed layers only (the slope)."""
        elements = sum(layer.per_token for layer in self.layers if layer.window is None)
        return round(elements * self.element_bytes())


def kv_shape_of_config(config: dict[str, Any], dtype_bytes: int) -> KVShape:
    """A lower bound of the KV geometry from config.json alone (before any weights are fetched):
    every layer with full attention, unless the config declares sliding windows (then none)."""
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    windowed = config.get("sliding_window") is not None or "layer_types" in config
    per_token = 0 if windowed else 2 * kv_heads * head_dim
    max_context = config.get("max_position_embeddings")
    return KVShape(tuple(KVLayer(per_token) for _ in range(layers)), dtype_bytes, max_context)


def kv_shape(source: Source, device: str | None = None, kv_bits: int | None = None) -> KVShape:
    """The KV geometry: each layer's k/v projection widths and its cache type in mlx-lm.

    The cache types come from the model's own ``make_cache`` (sliding-window layers get a
    ``RotatingKVCache`` with their window), so limited layers are counted as they really are.
    """
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from .source import head_dim_of

    model = source.model
    caches = (
        model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
    )
    widths: dict[tuple[int, str], int] = {}  # (layer, projection) -> output width, one pass
    for name, shape in source.tensor_shapes.items():
        if match := KV_PROJ.search(name):
            widths.setdefault((int(match[1]), match[2]), shape[0])
    layers = []
    for i, cache in enumerate(caches):
        if not isinstance(cache, KVCache | RotatingKVCache):
            continue  # fixed-size state (linear attention, SSM): no per-token cost
        per_token = 0
        for proj in ("k_proj", "v_proj"):
            if (i, proj) not in widths:
                raise BudgetError(
                    f"{source.name}: cannot find layer {i}'s {proj} to size its KV cache"
                )
            per_token += widths[i, proj]
        window = cache.max_size if isinstance(cache, RotatingKVCache) else None
        layers.append(KVLayer(per_token, window))
    max_context = source.config.get("max_position_embeddings")
    dtype_bytes = FLOAT_BYTES[activation_dtype(source, device)]
    return KVShape(tuple(layers), dtype_bytes, max_context, bits=kv_bits or 16,
                   head_dim=head_dim_of(source.config))  # fmt: skip


def activation_dtype(source: Source, device: str | None = None) -> str:
    """The dtype activations, the KV cache, scales and 16-bit weights take when running.

    A named device is an Apple Silicon machine (the stored dtype); this machine runs what the engine
    chooses for its back end (float32 on MLX's CPU, see engine.runtime_dtype).
    """
    return source.float_dtype if device else runtime_dtype(source.float_dtype)


# ---------------------------------------------------------------------------------------------
# The machine


def device_machine(name: str, devices: dict[str, Device]) -> Machine:
    if name not in devices:
        known = ", ".join(sorted(devices))
        raise BudgetError(f"unknown device {name!r}; known devices: {known}")
    d = devices[name]
    total = int(d.memory_gb * 2**30)
    limit = int(total * d.working_set_share) if d.working_set_share else None
    return Machine(name, total, total, limit, False)


# ---------------------------------------------------------------------------------------------
# The fit


@dataclass
class Line:
    label: str
    bytes: int
    why: str


@dataclass(frozen=True)
class RuntimeShape:
    """What the runtime is sized for: the KV cache's tokens and sequences, and the prefill's step
    (``prefill_chunk`` tokens of up to ``prefill_batch`` sequences at once)."""

    context: int
    parallel: int
    prefill_chunk: int
    prefill_batch: int
    kv_bits: int = 16  # the KV cache's precision: 16, or 8 / 4 (MLX affine, ramserve/kvcache.py)

    def engine_args(self) -> dict[str, Any]:
        """This shape, as ramserve/engine.py's ``Engine`` takes it."""
        return {"context": self.context, "parallel": self.parallel,
                "prefill_chunk": self.prefill_chunk, "prefill_batch": self.prefill_batch,
                "kv_bits": self.kv_bits}  # fmt: skip

    def describe(self) -> str:
        kv = f", {self.kv_bits}-bit KV" if self.kv_bits < 16 else ""
        return (f"{self.context:,} tokens x {self.parallel} sequences{kv}, prefill "
                f"{self.prefill_chunk} tokens x {self.prefill_batch}")  # fmt: skip


def default_shape(
    kv: KVShape,
    settings: Settings,
    context: int | None = None,
    parallel: int | None = None,
    kv_bits: int = 16,
) -> RuntimeShape:
    """The shape asked for: the user's context and parallelism, else the defaults in configs/."""
    cfg = settings.budget
    if context is None:  # the default, not the user's ask: fit it to the model
        context = min(cfg.default_context, kv.max_context or cfg.default_context)
    parallel = settings.server.parallel if parallel is None else parallel
    check_request(kv, context, parallel)
    return RuntimeShape(context, parallel, min(cfg.prefill_chunk, context),
                        min(parallel, cfg.prefill_batch), kv_bits)  # fmt: skip


@dataclass(frozen=True)
class Ask:
    """What the user fixed of the runtime (``--context``, ``--parallel``, ``--kv-bits``, ``--device``);
    None leaves it to the fit (``kv_bits`` None is ``--kv-bits auto``)."""

    context: int | None = None
    parallel: int | None = None
    kv_bits: int | None = None
    device: str | None = None  # a named device instead of this machine


@dataclass(frozen=True)
class Rejected:
    """A runtime shape the fit tried and did not take, and the weight bytes it would have left."""

    shape: RuntimeShape
    weights: int


@dataclass(frozen=True)
class KVOption:
    """One KV precision ``--kv-bits auto`` weighed: the predicted damage of the weights at the budget
    its shape leaves (None: nothing fits), the KV cache's own (measured, fisher.kv_damage), and
    whether its shape keeps the context and parallelism asked for."""

    bits: int
    weights_damage: float | None
    kv_damage: float
    keeps_shape: bool

    @property
    def total(self) -> float:
        return (self.weights_damage or 0.0) + self.kv_damage


@dataclass
class Budget:
    """The weight budget with every line of its breakdown."""

    machine: Machine
    shape: RuntimeShape
    usable: int
    runtime: int
    kv: int
    weights: int
    lines: list[Line] = field(default_factory=list)
    tradeoffs: dict[str, Any] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)  # shapes the fit tried first
    needed: int | None = None  # the weight bytes the fit had to find room for
    kv_options: list[KVOption] = field(default_factory=list)  # what --kv-bits auto weighed

    @property
    def context(self) -> int:
        return self.shape.context

    @property
    def parallel(self) -> int:
        return self.shape.parallel

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["machine"] = asdict(self.machine)
        out["context"], out["parallel"] = self.context, self.parallel
        return out


def reserve_bytes(machine: Machine, cfg: BudgetSettings) -> int:
    return max(int(cfg.os_reserve_min_gb * 2**30), int(cfg.os_reserve_share * machine.total))


def runtime_bytes(
    kv: KVShape,
    runtime: RuntimeShape,
    shape: ActivationShape,
    cfg: BudgetSettings,
    scores: bool = True,
) -> int:
    """The runtime's own memory: the process (Python, MLX, tokenizer, server) and prefill scratch.

    The engine prefills ``prefill_chunk`` tokens of up to ``prefill_batch`` sequences at once; its
    scratch is the attention scores (heads x chunk x context) and the widest activation (chunk x
    width). The factors were measured with bench/budget.py (MLX's peak minus weights minus KV cache,
    see configs/). Where attention runs fused (``scores`` false: Metal, 16-bit KV, see
    device.attention_materialises_scores) the score matrices are not charged.
    """
    chunk = min(runtime.prefill_chunk, runtime.context)
    attention = cfg.attention_factor * shape.heads * runtime.context if scores else 0.0
    per_sequence = chunk * (attention + cfg.width_factor * shape.width)
    batch = min(runtime.parallel, runtime.prefill_batch)
    scratch = cfg.scratch_fixed_mb * 2**20 + batch * per_sequence * kv.dtype_bytes
    return int(cfg.runtime_fixed_mb * 2**20 + scratch)


def check_request(kv: KVShape, context: int, parallel: int) -> None:
    if context <= 0:
        raise BudgetError(f"context must be a positive number of tokens, not {context}")
    if parallel <= 0:
        raise BudgetError(f"parallel must be a positive number of sequences, not {parallel}")
    if kv.max_context and context > kv.max_context:
        raise BudgetError(
            f"context {context:,} is beyond the model's maximum of {kv.max_context:,} tokens "
            "(max_position_embeddings)"
        )


@dataclass(frozen=True)
class ActivationShape:
    heads: int  # attention heads (query side): the score matrices' count
    width: int  # the widest per-token activation (MLP intermediate, all active experts)


def activation_shape(source: Source) -> ActivationShape:
    return activation_shape_of(source.config)


def activation_shape_of(c: dict[str, Any]) -> ActivationShape:
    hidden = int(c.get("hidden_size", 0))
    inter = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 4 * hidden)
    inter *= int(c.get("num_experts_per_tok") or 1)
    return ActivationShape(int(c.get("num_attention_heads", 1)), max(hidden, inter))


def weight_budget(
    source: Source,
    *,
    context: int | None = None,
    parallel: int | None = None,
    device: str | None = None,
    min_safe: int | None = None,
    shape: RuntimeShape | None = None,
    kv_bits: int = 16,
) -> Budget:
    """The weight budget for this machine (or a named device) at ``context`` x ``parallel`` (the
    defaults' prefill), or at the runtime ``shape`` given."""
    kv = kv_shape(source, device)
    shape = shape or default_shape(kv, source.settings, context, parallel, kv_bits)
    return budget_for(kv, activation_shape(source), source.settings, shape, device=device,
                      min_safe=min_safe)  # fmt: skip


def budget_for(
    kv: KVShape,
    shape: ActivationShape,
    settings: Settings,
    runtime_shape: RuntimeShape,
    *,
    device: str | None = None,
    min_safe: int | None = None,
    machine: Machine | None = None,
) -> Budget:
    """weight_budget from a model's KV and activation shapes (which a config alone can give), on
    this machine, a named ``device`` or a ``machine`` described (a host of several)."""
    cfg = settings.budget
    context, parallel = runtime_shape.context, runtime_shape.parallel
    check_request(kv, context, parallel)
    kv = replace(kv, bits=runtime_shape.kv_bits)
    if machine is None:
        machine = (
            device_machine(device, settings.devices) if device else this_machine(cfg.memory_gb)
        )

    reserve = reserve_bytes(machine, cfg)
    candidates = {"total - OS reserve": machine.total - reserve}
    if machine.live:
        candidates["available now"] = machine.available
    if machine.working_set_limit:
        candidates["MLX working-set limit"] = machine.working_set_limit
    bound = min(candidates, key=lambda k: candidates[k])
    usable = candidates[bound]
    metal = device is not None or runs_on_metal()  # named devices are Apple Silicon
    scores = attention_materialises_scores(metal, runtime_shape.kv_bits)
    runtime = runtime_bytes(kv, runtime_shape, shape, cfg, scores)
    kv_bytes = kv.bytes(context, parallel)
    weights = usable - runtime - kv_bytes

    lines = [Line("total memory", machine.total, machine.name)]
    if machine.live:
        lines.append(Line("available now", machine.available, "free + reclaimable (psutil)"))
    if machine.working_set_limit:
        lines.append(Line("MLX working-set limit", machine.working_set_limit,
                          "the GPU cannot use more without wiring"))  # fmt: skip
    reserve_why = (
        f"for the OS and other apps: max({cfg.os_reserve_min_gb} GiB, "
        f"{100 * cfg.os_reserve_share:.0f}% of total)"
    )
    lines += [
        Line("OS reserve", reserve, reserve_why),
        Line("usable", usable, f"the smallest of: {', '.join(candidates)} (bound: {bound})"),
        Line(
            "runtime",
            runtime,
            f"process {cfg.runtime_fixed_mb} MiB + prefill scratch "
            f"({runtime_shape.prefill_chunk} tokens x "
            f"{min(parallel, runtime_shape.prefill_batch)} sequences"
            + (")" if scores else "; fused attention: no score matrices)"),
        ),  # fmt: skip
        Line(
            "KV cache",
            kv_bytes,
            f"{context:,} tokens x {parallel} sequences x "
            f"{len(kv.layers)} layers, {_precision(kv)} {human_bytes(kv.per_token())}/token",
        ),  # fmt: skip
        Line("weights", weights, "usable - runtime - KV cache"),
    ]
    budget = Budget(machine, runtime_shape, usable, runtime, kv_bytes, weights, lines)
    if min_safe is not None:
        budget.tradeoffs = tradeoffs(budget, kv, min_safe)
    return budget


def _precision(kv: KVShape) -> str:
    return f"{kv.dtype_bytes}-byte" if kv.bits >= 16 else f"{kv.bits}-bit"


def tradeoffs(budget: Budget, kv: KVShape, min_safe: int) -> dict[str, Any]:
    """What trades against what: the longest context at min-safe, the memory the ask needs."""
    room = budget.usable - budget.runtime - min_safe
    hi = kv.max_context or 1 << 24
    lo = 0
    while lo < hi:  # largest context whose KV fits the room left by min-safe weights
        mid = (lo + hi + 1) // 2
        if kv.bytes(mid, budget.parallel) <= room:
            lo = mid
        else:
            hi = mid - 1
    needed = min_safe + budget.kv + budget.runtime
    return {
        "min_safe_bytes": min_safe,
        "longest_context_at_min_safe": lo,
        "usable_needed_for_context": needed,
        "fits": budget.weights >= min_safe,
    }


def require_fit(budget: Budget, min_safe: int, what: str = "the smallest safe plan") -> None:
    """Refuse, with the numbers, when even the smallest safe plan (or ``what``) cannot fit."""
    if budget.weights >= min_safe:
        return
    t = budget.tradeoffs or {}
    context_hint = ""
    if "longest_context_at_min_safe" in t:
        longest = t["longest_context_at_min_safe"]
        context_hint = (
            f"; at min-safe the longest context that fits is {longest:,} tokens"
            if longest > 0
            else "; even 1 token of context does not fit at min-safe"
        )
    raise BudgetError(
        f"the model does not fit {budget.machine.name}: the weights may use "
        f"{human_bytes(budget.weights)} but {what} needs {human_bytes(min_safe)}; "
        f"{budget.context:,} tokens x {budget.parallel} sequences needs "
        f"{human_bytes(min_safe + budget.kv + budget.runtime)} usable (have "
        f"{human_bytes(budget.usable)}){context_hint}"
    )


def render_budget(b: dict[str, Any]) -> str:
    from .fmt import table

    rows = [(ln["label"], human_bytes(ln["bytes"]), ln["why"]) for ln in b["lines"]]
    out = [table(["", "bytes", "why"], rows)]
    s = RuntimeShape(**b["shape"])
    out += ["", f"runtime shape: {s.describe()}"]
    if b.get("rejected"):
        need = human_bytes(b["needed"])
        out.append(f"tried first (weights need {need}; shrunk in the order of ramserve/shape.py):")
        out += [f"  {RuntimeShape(**r['shape']).describe()}: {human_bytes(r['weights'])} for "
                "the weights" for r in b["rejected"]]  # fmt: skip
    if b.get("kv_options"):
        out.append(
            "KV precision weighed (--kv-bits auto; predicted KL per token, weights + KV cache):"
        )
        for o in b["kv_options"]:
            mark = "  <- chosen" if o["bits"] == s.kv_bits else ""
            if o["weights_damage"] is None:
                out.append(f"  {o['bits']:>2}-bit KV: the smallest safe plan does not fit{mark}")
                continue
            kept = "" if o["keeps_shape"] else " (at a smaller context or parallelism)"
            out.append(f"  {o['bits']:>2}-bit KV: {o['weights_damage']:.4g} + {o['kv_damage']:.4g} = "
                       f"{o['weights_damage'] + o['kv_damage']:.4g}{kept}{mark}")  # fmt: skip
    t = b.get("tradeoffs") or {}
    if t:
        out.append("")
        out.append(f"min-safe plan: {human_bytes(t['min_safe_bytes'])} "
                   f"({'fits' if t['fits'] else 'does NOT fit'})")  # fmt: skip
        out.append(f"longest context at min-safe ({b['parallel']} sequences): "
                   f"{t['longest_context_at_min_safe']:,} tokens")  # fmt: skip
        out.append(f"usable memory the asked context needs at min-safe: "
                   f"{human_bytes(t['usable_needed_for_context'])}")  # fmt: skip
    return "\n".join(out)


def stable_budget(weights: int) -> int:
    """Round a measured budget down to a grid (steps of 1/32 of its power of two, under 3.2%), so
    that free memory moving a little between runs picks the same plan and hits the cache."""
    if weights <= 0:
        return weights
    step = 2 ** math.floor(math.log2(weights)) // 32
    return int(max(step, weights // step * step))


def machine_budget(
    source: Source, shape: RuntimeShape | None = None
) -> Callable[[str | None], tuple[int, int]]:
    """plan.MachineBudget for this model: weight bytes and runtime float bytes per device, this
    machine at the runtime ``shape`` (default: the defaults'), a named device at its context and
    parallelism with the default prefill.

    This machine's budget moves with its free memory, so it is put on a grid (stable_budget): every
    command that plans for ``auto`` or ``max`` picks the same plan, and the cached model, while the
    free memory moves a little."""

    def fit(device: str | None) -> tuple[int, int]:
        if device is None:
            b = weight_budget(source, shape=shape)
        else:
            context, parallel = (shape.context, shape.parallel) if shape else (None, None)
            b = weight_budget(source, context=context, parallel=parallel, device=device,
                              kv_bits=shape.kv_bits if shape else 16)  # fmt: skip
        weights = b.weights if device else stable_budget(b.weights)
        return weights, FLOAT_BYTES[activation_dtype(source, device)]

    return fit
