"""Synthetic models with random weights (scaled normal, bf16) in Hugging Face layout, sharded like a
hub checkpoint, written once into bench/.cache and reused.

- ``synthetic_model()``: a Llama of about 2 GB, heavy enough that throughput and peak memory reflect
  streaming, not start-up.
- ``synthetic_moe()``: an MoE of 3.0 GB with Qwen3-30B-A3B's widths and 32 experts a layer, stacked as
  mlx-lm stacks them, for the MoE paths' throughput.
- ``synthetic_model(QWEN3_30B_A3B, layers=24)``: Qwen3-30B-A3B's shapes (128 experts of which 8 are
  active, 32 query heads, vocab 151,936) at fewer layers; 24 layers are 15.6 B parameters, 31 GB, more
  than this machine's memory. Experts are stored one tensor each, as the hub checkpoint stores them.

Usage: python bench/synthetic.py [qwen3-30b-a3b LAYERS]   (prints the folder it wrote)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from tests.factory import write_tokenizer  # noqa: E402

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
    "num_hidden_layers": 18, "intermediate_size": 5632, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 32000, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip
# Qwen/Qwen3-30B-A3B's config.json (48 layers there).
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
    "num_hidden_layers": 48, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip
# A dense model with Llama-3-8B's widths (vocab 128,256, 32 query heads, 14,336 MLP).
LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip


# An MoE of a few GB with Qwen3-30B-A3B's widths (8 active experts of 768, 32 query heads) but 32
# experts a layer, so that a layer (300 MB as stored, 600 MB in float32, the CPU passes' dtype) stays
# well under the 1 GB the benchmarks allow over baseline; a 32,000-token vocabulary; its experts
# stacked as mlx-lm stacks them (one (experts, out, in) tensor per projection). 8 layers: 1.5 B
# parameters, 3.0 GB.
MOE_CONFIG = QWEN3_30B_A3B | {"vocab_size": 32000, "num_hidden_layers": 8, "num_experts": 32,
                              "stacked_experts": True}  # fmt: skip


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (nq * hd, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (nkv * hd, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (nkv * hd, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, nq * hd)
        if cfg["model_type"] == "qwen3_moe":
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
            mi = cfg["moe_intermediate_size"]
            shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
            if cfg.get("stacked_experts"):
                for proj, shape in (("gate", (mi, h)), ("up", (mi, h)), ("down", (h, mi))):
                    shapes[f"{p}.mlp.switch_mlp.{proj}_proj.weight"] = (cfg["num_experts"], *shape)
            for e in range(0 if cfg.get("stacked_experts") else cfg["num_experts"]):
                shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (mi, h)
                shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (mi, h)
                shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (h, mi)
        else:
            i = cfg["intermediate_size"]
            shapes[f"{p}.mlp.gate_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def synthetic_model(
    config: dict[str, Any] = CONFIG,
    *,
    layers: int | None = None,
    shard_bytes: int = 500_000_000,
    name: str = "synthetic-2gb",
) -> Path:
    """Write (once) the model ``config`` describes, at ``layers`` layers, and return its folder."""
    cfg = config | ({"num_hidden_layers": layers} if layers else {})
    folder = ROOT / ".cache" / name
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    shards: list[list[str]] = [[]]
    size = 0
    for tensor, shape in shapes.items():
        n = 2 * math.prod(shape)
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += n
    weight_map = {}
    key = mx.random.key(0)
    for idx, names in enumerate(shards):
        fname = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor in names:
            key, sub = mx.random.split(key)
            shape = shapes[tensor]
            if len(shape) == 1:
                arrays[tensor] = mx.ones(shape, dtype=mx.bfloat16)
            else:
                arrays[tensor] = (mx.random.normal(shape, key=sub) * shape[-1] ** -0.5).astype(
                    mx.bfloat16
                )
        mx.save_safetensors(str(folder / f".{fname}"), arrays, metadata={"format": "pt"})
        (folder / f".{fname}").rename(folder / fname)
        weight_map |= {n: fname for n in names}
        del arrays
        mx.clear_cache()
        print(f"  {folder.name}: shard {idx + 1}/{len(shards)} written", file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_tokenizer(folder, 512)
    config_json = {k: v for k, v in cfg.items() if k != "stacked_experts"}
    (folder / "config.json").write_text(json.dumps(config_json, indent=1))
    return folder


def synthetic_moe() -> Path:
    """``MOE_CONFIG``'s model (3.0 GB, experts stacked)."""
    return synthetic_model(MOE_CONFIG, name="synthetic-moe-32x8")


def qwen3_30b_shaped(layers: int) -> Path:
    """Qwen3-30B-A3B's shapes at ``layers`` layers, in 4 GB shards as the hub stores it."""
    return synthetic_model(QWEN3_30B_A3B, layers=layers, shard_bytes=4_000_000_000,
                           name=f"qwen3-30b-a3b-{layers}l")  # fmt: skip


def quantized_synthetic(config: dict[str, Any], layers: int, name: str, bits: int = 4) -> Path:
    """A model of ``config``'s shapes at ``layers`` layers, random and quantized uniformly to ``bits``
    (group 64) by mlx-lm itself, in mlx-lm's format: for measuring the runtime around real-sized
    shapes without analysing or planning them first."""
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    folder = ROOT / ".cache" / name
    if (folder / "config.json").exists():
        return folder
    cfg = config | {"num_hidden_layers": layers}
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    model, cfg = quantize_model(model, cfg, group_size=64, bits=bits)
    staging = folder.with_name(f".{name}")
    save_model(staging, model)
    write_tokenizer(staging, 512)
    save_config(cfg, staging / "config.json")
    staging.rename(folder)
    return folder


if __name__ == "__main__":
    if sys.argv[1:2] == ["qwen3-30b-a3b"]:
        print(qwen3_30b_shaped(int(sys.argv[2])))
    else:
        print(synthetic_model())
