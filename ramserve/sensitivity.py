"""The energy flow: how much a module's quantization error matters, from the weights alone.

The profile's main estimator is the self-Fisher (ramserve/fisher.py); this cheaper one is its fallback
when not even one layer, its gradients and the activations fit in memory.

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

    def observe(self, m: ModuleInfo, out: np.ndarray) -> None:
        """Record the module's output energy per channel, ``out`` = Σ_j W_ij² E[x_j²] with the
        input energy of ``input_energy`` (ones where it is None): (out,) or (experts, out)."""
        if m.kind == "embedding":
            # energy per token: the mean squared norm of an embedding row
            self.energy[m.path] = float(out.mean())
            return
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
