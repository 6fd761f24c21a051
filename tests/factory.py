"""Tiny random models in Hugging Face layout, for tests that must not depend on ../shared.

Writes config.json, sharded safetensors with an index, a byte-level BPE tokenizer trained on the spot,
and a tokenizer_config.json with a ChatML chat template, exactly as a hub checkpoint would be laid out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The Qwen/Hermes tool format, from which mlx-lm infers its ``json_tools`` parser.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ 'user' if m.role == 'tool' else m.role }}\n"
    "{% if m.role == 'tool' %}<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% else %}{{ m.content }}{% endif %}"
    '{% for c in m.tool_calls or [] %}{% set tool_call = c.function %}<tool_call>\n{"name": '
    '"{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Hello world, the quick brown fox jumps over the lazy dog.",
]
ARCHS = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "qk_norm": True},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "qk_norm": True},
    "llama": {"architectures": ["LlamaForCausalLM"], "qk_norm": False},
}


def write_tokenizer(folder: Path, vocab_size: int, chat_template: str = CHAT_TEMPLATE,
                    extra_special: tuple[str, ...] = ()) -> None:  # fmt: skip
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "chat_template": chat_template,
                "model_max_length": 512,
            }
        )
    )


def _config(arch: str, layers: int, hidden: int, vocab: int, tied: bool, **extra: Any) -> dict:
    cfg = {
        "model_type": arch,
        "architectures": ARCHS[arch]["architectures"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    if arch == "qwen3_moe":
        cfg |= {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": hidden * 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return cfg | extra


def _tensors(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * (1.0 / np.sqrt(shape[-1]))).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = np.ones(h, np.float32)
        out[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
        out[f"{p}.self_attn.q_proj.weight"] = w(nq * hd, h)
        out[f"{p}.self_attn.k_proj.weight"] = w(nkv * hd, h)
        out[f"{p}.self_attn.v_proj.weight"] = w(nkv * hd, h)
        out[f"{p}.self_attn.o_proj.weight"] = w(h, nq * hd)
        if ARCHS[cfg["model_type"]]["qk_norm"]:
            out[f"{p}.self_attn.q_norm.weight"] = np.ones(hd, np.float32)
            out[f"{p}.self_attn.k_norm.weight"] = np.ones(hd, np.float32)
        if cfg["model_type"] == "qwen3_moe":
            mi = cfg["moe_intermediate_size"]
            out[f"{p}.mlp.gate.weight"] = w(cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = w(mi, h)
                out[f"{p}.mlp.experts.{e}.up_proj.weight"] = w(mi, h)
                out[f"{p}.mlp.experts.{e}.down_proj.weight"] = w(h, mi)
        else:
            out[f"{p}.mlp.gate_proj.weight"] = w(inter, h)
            out[f"{p}.mlp.up_proj.weight"] = w(inter, h)
            out[f"{p}.mlp.down_proj.weight"] = w(h, inter)
    return out


def _stacked(tensors: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp"
        for n in ("gate_proj", "up_proj", "down_proj"):
            experts = [tensors[f"{p}.experts.{e}.{n}.weight"] for e in range(cfg["num_experts"])]
            out[f"{p}.switch_mlp.{n}.weight"] = np.stack(experts)
    return out


def make_model(
    folder: Path,
    arch: str = "qwen3",
    *,
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 384,
    tied: bool | None = None,
    shards: int = 2,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    extra_special: tuple[str, ...] = (),
    stacked_experts: bool = False,
    **config_extra: Any,
) -> Path:
    """Write a tiny random ``arch`` model into ``folder`` and return it.

    ``chat_template`` defaults to plain ChatML (no tools); ``extra_special`` adds special tokens
    (``<think>``, ``</think>`` make mlx-lm treat it as a thinking model). ``stacked_experts`` stores an
    MoE's experts as mlx-lm stacks them (one tensor per projection), not one tensor each as the hub
    does: the same weights for the same ``seed``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tied = arch == "qwen3_moe" if tied is None else tied
    cfg = _config(arch, layers, hidden, vocab, tied, **config_extra)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = _tensors(cfg, np.random.default_rng(seed))
    if stacked_experts:
        tensors = _stacked(tensors, cfg)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        arrays = {k: mx.array(tensors[k]).astype(mx.bfloat16) for k in part}
        mx.save_safetensors(str(folder / fname), arrays, metadata={"format": "pt"})
        weight_map |= {k: fname for k in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    write_tokenizer(folder, vocab, chat_template, extra_special)
    return folder


def make_hf_cache(cache: Path, repo: str, model_dir: Path, commit: str = "a" * 40) -> Path:
    """Lay ``model_dir`` out as the Hugging Face cache does: blobs, a snapshot of symlinks, refs/main."""
    import hashlib
    import shutil

    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap
