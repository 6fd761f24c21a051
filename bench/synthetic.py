"""A synthetic Llama model of about 2 GB (bf16), written once into bench/.cache and reused.

Random weights (scaled normal) in Hugging Face layout, sharded like a hub checkpoint; heavy enough that
throughput and peak memory reflect streaming, not start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def _tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{n}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def synthetic_model(
    folder: Path = ROOT / ".cache" / "synthetic-2gb", shard_bytes: int = 500_000_000
) -> Path:
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _tensor_shapes(CONFIG)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * int(mx.array(shape).prod().item()) if shape else 0
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    key = mx.random.key(0)
    for idx, names in enumerate(shards):
        fname = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name in names:
            key, sub = mx.random.split(key)
            shape = shapes[name]
            if len(shape) == 1:
                arrays[name] = mx.ones(shape, dtype=mx.bfloat16)
            else:
                arrays[name] = (mx.random.normal(shape, key=sub) * shape[-1] ** -0.5).astype(
                    mx.bfloat16
                )
        mx.save_safetensors(str(folder / f".{fname}"), arrays, metadata={"format": "pt"})
        (folder / f".{fname}").rename(folder / fname)
        weight_map |= {n: fname for n in names}
        del arrays
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_tokenizer(folder, 512)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    return folder
