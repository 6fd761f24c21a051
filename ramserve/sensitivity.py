"""How much a module's quantization error matters to the model's output, from the weights alone.

Equal relative error in two tensors does not do equal damage: what differs between tensors is how much
of the model's signal passes through them. We estimate that signal with an *energy flow* computed from
the weights, with no text:

* A module fed by an RMSNorm sees inputs ``x = γ ⊙ ĥ`` with ``ĥ`` of unit mean square per channel, so
  ``E[x_j²] = γ_j²`` (γ: the norm's gain).
* A linear map sends channel energies on as ``E[y_i²] = Σ_j W_ij² E[x_j²]`` (channels taken as
  uncorrelated). That gives v's output energy, which is o_proj's input (heads repeated for GQA), and
  gate/up's output energies, whose product through SiLU (``E[silu(g)²]`` by Gauss-Hermite quadrature)
  is down_proj's input.
* The residual stream starts with the embedding's energy per token and grows by each block's output
  energy. A block's *share* ``S = E‖block output‖² / E‖residual entering it‖²`` is how large a relative
  error in that block's output is, measured against the stream every later layer reads (after its norm).

A module's importance is its block's share times a propagation prior per kind (configs/: how a relative
error in, say, q_proj carries to the attention output); the embedding and lm_head perturb the stream and
the logits directly, with share 1. Predicted damage of a candidate = importance × measured relative MSE.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .settings import SensitivitySettings
from .source import ModuleInfo

# Within a layer, producers are analysed before the modules whose input energy they define.
FLOW_ORDER = [
    "attn_q", "attn_k", "attn_v", "attn_o", "router",
    "mlp_gate", "mlp_up", "mlp_down",
    "expert_gate", "expert_up", "expert_down",
    "shared_gate", "shared_up", "shared_down",
]  # fmt: skip
WRITERS = {"attn_o": "attn", "mlp_down": "mlp", "expert_down": "mlp", "shared_down": "mlp"}
_HERMITE = np.polynomial.hermite.hermgauss(48)


def flow_order(modules: list[ModuleInfo]) -> list[ModuleInfo]:
    def key(m: ModuleInfo) -> tuple[int, int, str]:
        if m.kind == "embedding":
            return (-1, 0, m.path)
        if m.layer is None:
            return (1 << 30, 0, m.path)
        rank = FLOW_ORDER.index(m.kind) if m.kind in FLOW_ORDER else len(FLOW_ORDER)
        return (m.layer, rank, m.path)

    return sorted(modules, key=key)


def silu_second_moment(var: np.ndarray) -> np.ndarray:
    """E[silu(g)²] for g ~ N(0, var), elementwise."""
    x, w = _HERMITE
    g = np.sqrt(2.0 * np.maximum(var, 0.0))[..., None] * x
    silu = g / (1.0 + np.exp(-g))
    return np.asarray((silu**2 * w).sum(-1) / np.sqrt(np.pi))


@dataclass
class EnergyFlow:
    """Walks the modules in flow order, tracking the channel energies each one needs as input."""

    settings: SensitivitySettings
    weights: dict[str, mx.array]
    num_experts_per_tok: int = 1
    head_dim: int | None = None
    _outputs: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)

    def _norm_energy(self, name: str) -> np.ndarray | None:
        w = self.weights.get(f"{name}.weight")
        if w is None:
            return None
        return np.asarray(mx.square(w.astype(mx.float32)))

    def input_energy(self, m: ModuleInfo) -> np.ndarray | None:
        """Per-channel input energy (C,) or (experts, C); None when unknown for this architecture."""
        s, layer = self.settings, m.layer
        prefix = m.path.split(".self_attn.")[0].split(".mlp.")[0]
        if m.kind == "lm_head":
            return self._norm_energy(s.final_norm)
        if m.kind in ("attn_q", "attn_k", "attn_v"):
            return self._norm_energy(f"{prefix}.{s.attn_norm}")
        if m.kind in ("mlp_gate", "mlp_up", "expert_gate", "expert_up", "shared_gate", "shared_up",
                      "router"):  # fmt: skip
            return self._norm_energy(f"{prefix}.{s.mlp_norm}")
        if layer is None:
            return None
        if m.kind == "attn_o":
            v, hd = self._outputs.get((layer, "attn_v")), self.head_dim
            if v is None or not hd or v.size % hd or m.shape[-1] % v.size:
                return None
            # GQA: each key/value head serves `rep` consecutive query heads.
            rep = m.shape[-1] // v.size
            return np.repeat(v.reshape(v.size // hd, hd), rep, axis=0).reshape(-1)
        prefix_kind = m.kind.split("_")[0]
        if m.kind.endswith("_down"):
            gate = self._outputs.get((layer, f"{prefix_kind}_gate"))
            up = self._outputs.get((layer, f"{prefix_kind}_up"))
            if gate is None or up is None:
                return None
            return np.asarray(silu_second_moment(gate) * up)
        return None

    def observe(self, m: ModuleInfo, w: mx.array) -> None:
        """Record the module's output energy, given its (float) weight."""
        if m.kind == "embedding":
            # Energy per token: the mean squared norm of an embedding row.
            rows = mx.square(w.astype(mx.float32)).sum(-1).mean()
            self.energy[m.path] = float(np.asarray(rows, dtype=np.float64))
            return
        xin = self.input_energy(m)
        w2 = mx.square(w.astype(mx.float32))
        x = mx.ones((w.shape[-1],)) if xin is None else mx.array(xin.astype(np.float32))
        out = np.asarray(mx.squeeze(w2 @ mx.expand_dims(x, -1), -1))  # (O,) or (E, O)
        if m.layer is not None:
            self._outputs[(m.layer, m.kind)] = out
        per_token = out.sum(-1)
        if per_token.ndim:  # stacked experts: top-k of them mix with weights ≈ 1/k each
            self.energy[m.path] = float(per_token.mean() / max(1, self.num_experts_per_tok))
        else:
            self.energy[m.path] = float(per_token)


def importances(
    modules: list[ModuleInfo],
    energy: dict[str, float],
    settings: SensitivitySettings,
    tied: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Importance per module path, and the per-layer residual account behind it."""
    prop = settings.propagation
    embed = next((energy[m.path] for m in modules if m.kind == "embedding"), None)
    residual = embed if embed and embed > 0 else 1.0
    layers = sorted({m.layer for m in modules if m.layer is not None})
    block_out: dict[tuple[int, str], float] = {}
    for m in modules:
        if m.kind in WRITERS and m.layer is not None:
            key = (m.layer, WRITERS[m.kind])
            block_out[key] = block_out.get(key, 0.0) + energy.get(m.path, 0.0)
    share: dict[tuple[int, str], float] = {}
    account = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer, "residual_in": residual}
        for block in ("attn", "mlp"):
            out = block_out.get((layer, block), 0.0)
            share[(layer, block)] = out / residual if out > 0 else 1.0
            row[f"{block}_share"] = share[(layer, block)]
            residual += out
        account.append(row)
    result = {}
    for m in modules:
        if m.kind == "embedding":
            weight = prop.get("embedding", 1.0) + (prop.get("lm_head", 1.0) if tied else 0.0)
        elif m.layer is not None and m.block in ("attn", "mlp"):
            weight = prop.get(m.kind, 1.0) * share.get((m.layer, m.block), 1.0)
        else:
            weight = prop.get(m.kind, 1.0)
        result[m.path] = weight
    return result, account


# ---------------------------------------------------------------------------------------------
# The self-Fisher


def _start_token(config: dict[str, Any], vocab: int) -> int:
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < vocab:
            return value
    return 0


def sample_sequences(
    model: Any, config: dict[str, Any], count: int, length: int, seed: int
) -> mx.array:
    """``count`` sequences of ``length`` tokens the model writes itself from its start token, sampled
    at temperature 1: text from the model's own distribution, so no data enters the profile."""
    from mlx_lm.models.cache import make_prompt_cache

    vocab = int(config["vocab_size"])
    key = mx.random.key(seed)
    tokens = mx.full((count, 1), _start_token(config, vocab), dtype=mx.int32)
    out = [tokens]
    cache = make_prompt_cache(model)
    for _ in range(length - 1):
        key, sub = mx.random.split(key)
        logits = model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
        tokens = mx.random.categorical(logits, key=sub)[:, None].astype(mx.int32)
        mx.eval(tokens)
        out.append(tokens)
    return mx.concatenate(out, axis=1)


@dataclass
class FisherStat:
    """A module's diagonal Fisher per token, kept as its trace and its rank-1 marginals: ``rows`` sums
    over input channels (shape (..., out)), ``cols`` over output channels ((..., in)). The element
    (i, j) is estimated as rows_i × cols_j / trace (per expert for stacked experts): which outputs the
    model's loss is sensitive to, times which inputs carry energy, as in K-FAC's factorisation."""

    rows: np.ndarray
    cols: np.ndarray

    @property
    def trace(self) -> float:
        return float(self.rows.sum())

    def smoothed_rows(self, smooth: float) -> np.ndarray:
        """Flattened row sums plus ``smooth`` × their mean: rows the sampled sequences never reach
        (embedding rows of unseen tokens) still count a little."""
        rows = self.rows.reshape(-1)
        return np.asarray(rows + smooth * rows.mean())

    def row_probabilities(self, smooth: float) -> np.ndarray:
        """Each flattened row's share of the (smoothed) Fisher: where the damage is."""
        rows = self.smoothed_rows(smooth)
        total = rows.sum()
        return np.asarray(rows / total) if total > 0 else np.full(rows.size, 1 / rows.size)

    def weights(self, row_index: np.ndarray | None, smooth: float) -> mx.array:
        """F̂ for the given flattened rows (all when None), shape (rows, in), with smoothed rows."""
        rows = self.smoothed_rows(smooth)
        cols = self.cols.reshape(-1, self.cols.shape[-1])
        per_expert = self.rows.shape[-1]
        total = self.rows.reshape(-1, per_expert).sum(-1)
        index = np.arange(rows.size) if row_index is None else row_index
        expert = index // per_expert
        scale = (rows[index] / np.maximum(total[expert], 1e-30))[:, None]
        return mx.array((scale * cols[expert]).astype(np.float32))


def fisher_stats(
    model: Any, sequences: mx.array, paths: list[str], progress: Any = None
) -> dict[str, FisherStat]:
    """Per module, the diagonal of the Fisher information of its weight per token, as ``FisherStat``:
    the sum over sequences of the squared gradient of log p(sequence), divided by the tokens predicted.

    Because the sequences are the model's own samples, the gradient of their log-likelihood is a
    sample of the score, whose second moment is the Fisher: no labels and no text. Second-order, the
    KL divergence a weight error δW causes per token is ½ Σ F_ij δW_ij².
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def loss(seq: mx.array) -> mx.array:
        logits = model(seq[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, seq[:, 1:], reduction="sum")

    grad = nn.value_and_grad(model, loss)
    names = {f"{p}.weight": p for p in paths}
    rows: dict[str, mx.array] = {}
    cols: dict[str, mx.array] = {}
    for i in range(sequences.shape[0]):
        g = dict(tree_flatten(grad(sequences[i : i + 1])[1]))
        for key, path in names.items():
            sq = mx.square(g[key].astype(mx.float32))
            rows[path] = rows[path] + sq.sum(-1) if path in rows else sq.sum(-1)
            cols[path] = cols[path] + sq.sum(-2) if path in cols else sq.sum(-2)
        mx.eval(rows, cols)
        if progress:
            progress(i + 1)
    tokens = sequences.shape[0] * (sequences.shape[1] - 1)
    out = {}
    for path in paths:
        out[path] = FisherStat(np.asarray(rows[path], dtype=np.float64) / tokens,
                               np.asarray(cols[path], dtype=np.float64) / tokens)  # fmt: skip
    return out


def self_fisher(
    source: Any, settings: SensitivitySettings, progress: bool
) -> dict[str, FisherStat] | None:
    """The Fisher of every quantizable module's weight (``fisher_stats``), or None when the
    model, its gradients and the activations would not fit in the configured share of free memory
    (the profile then falls back to the energy flow)."""
    import psutil
    from tqdm import tqdm

    from .engine import load_model, runtime_dtype

    cfg = settings.fisher
    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    width = int(source.config.get("hidden_size") or 0)
    vocab = int(source.config.get("vocab_size") or 0)
    activations = 64 * cfg.tokens * (width + vocab) * dtype.size
    need = 2 * source.parameter_count * dtype.size + activations
    if need > cfg.memory_share * psutil.virtual_memory().available:
        return None
    model = load_model(source.path)[0]  # in the runtime dtype, as the engine runs it
    bar = tqdm(total=cfg.sequences * 2, desc="self-Fisher", unit="seq", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    sequences = sample_sequences(model, source.config, cfg.sequences, cfg.tokens, cfg.seed)
    bar.update(cfg.sequences)
    stats = fisher_stats(
        model, sequences, [m.path for m in source.modules], lambda i: bar.update(1)
    )
    bar.close()
    del model
    mx.clear_cache()
    return stats
