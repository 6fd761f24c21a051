"""What the runtime really uses beside weights and KV cache: MLX's peak memory while P sequences fill a
context of N tokens, against budget.py's formula (runtime scratch) and its KV line. The constants in
configs/defaults.toml [budget] come from this table.

Two sets of models:
- ``shared``: the shared 30 M-parameter models, planned and quantized by ramserve (30%);
- ``large``: real-sized shapes at a few layers, random and uniformly 4-bit (bench/synthetic.py):
  Llama-3-8B's widths (vocab 128,256, 32 heads, MLP 14,336) and Qwen3-30B-A3B's (vocab 151,936, 32
  heads, 128 experts of which 8 are active), each at 2 layers. Scratch is one layer's at a time, so a
  few layers show what the whole model allocates beside its weights; but not one layer: a prefill
  evaluates only the KV caches, and nothing reads the last layer's attention or MLP output until the
  prompt's final token, so a 1-layer model never builds a score matrix.

Usage: python bench/budget.py [shared|large|MODEL ...]   (default: both sets)
       python bench/budget.py --report OUTPUT...       (earlier runs' JSON lines, reported together)
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from synthetic import LLAMA3_8B, QWEN3_30B_A3B, quantized_synthetic  # noqa: E402

from bench.measure import fill_context  # noqa: E402
from ramserve.budget import (  # noqa: E402
    ActivationShape,
    KVShape,
    RuntimeShape,
    activation_shape,
    default_shape,
    kv_shape,
    runtime_bytes,
)
from ramserve.engine import Engine  # noqa: E402
from ramserve.fmt import human_bytes, table  # noqa: E402
from ramserve.plan import make_plan  # noqa: E402
from ramserve.profile import analyze  # noqa: E402
from ramserve.quantize import quantize  # noqa: E402
from ramserve.settings import BudgetSettings, Settings, load_settings  # noqa: E402
from ramserve.source import open_source  # noqa: E402

SHARED = ROOT.parent.parent / "shared" / "models"
# context, parallel sequences, KV bits
SHARED_CASES = [(512, 1, 16), (512, 4, 16), (2048, 1, 16), (2048, 4, 16), (4096, 2, 16)]
LARGE_CASES = [(2048, 1, 16), (2048, 4, 16), (4096, 2, 16), (8192, 1, 16), (8192, 4, 16)]
# name, config, layers, cases
LARGE = [
    ("llama3-8b-shaped-2l", LLAMA3_8B, 2, [*LARGE_CASES, (4096, 2, 8)]),
    ("qwen3-30b-a3b-shaped-2l", QWEN3_30B_A3B, 2, LARGE_CASES),
]


def shared_models(settings: Settings) -> list[tuple[str, Path, list[tuple[int, int, int]]]]:
    out = []
    for name in ("code-qwen3-30m", "code-qwen3moe-27m"):
        source = open_source(str(SHARED / name), settings)
        plan = make_plan(analyze(source, progress=False), "30%", settings=settings)
        out.append((name, quantize(source, plan, progress=False)[0], SHARED_CASES))
    return out


def large_models(names: list[str]) -> list[tuple[str, Path, list[tuple[int, int, int]]]]:
    return [(name, quantized_synthetic(cfg, layers, f"{name}-q4"), cases)
            for name, cfg, layers, cases in LARGE if name in names]  # fmt: skip


def measure(
    name: str, folder: Path, context: int, parallel: int, kv_bits: int, settings: Settings
) -> dict[str, Any]:
    source = open_source(str(folder), settings)
    kv, act = kv_shape(source, kv_bits=kv_bits), activation_shape(source)
    runtime = default_shape(kv, settings, context, parallel, kv_bits)
    engine = Engine(folder, settings, parallel=parallel, prompt_cache_entries=0,
                    prefill_chunk=runtime.prefill_chunk, prefill_batch=runtime.prefill_batch,
                    kv_bits=kv_bits if kv_bits < 16 else None)  # fmt: skip
    m = fill_context(engine, context, parallel)
    engine.close()
    del engine
    mx.clear_cache()
    return {"model": name, "context": context, "parallel": parallel, "kv_bits": kv_bits, **m,
            "kv_predicted": kv.bytes(context, parallel), "scratch": m["peak"] - m["weights"] - m["kv"],
            "heads": act.heads, "width": act.width, "prefill_chunk": runtime.prefill_chunk,
            "prefill_batch": runtime.prefill_batch, "dtype_bytes": kv.dtype_bytes}  # fmt: skip


def scratch_line(r: dict[str, Any], cfg: BudgetSettings) -> int:
    """budget.runtime_bytes for a measured case under ``cfg``, less the process overhead (outside
    MLX's allocator, so not in its peak)."""
    kv = KVShape((), r.get("dtype_bytes", 4), None)  # the scratch reads only the float width
    runtime = RuntimeShape(r["context"], r["parallel"], r["prefill_chunk"], r["prefill_batch"],
                           r.get("kv_bits", 16))  # fmt: skip
    act = ActivationShape(r["heads"], r["width"])
    return runtime_bytes(kv, runtime, act, cfg) - int(cfg.runtime_fixed_mb * 2**20)


def best_factors(results: list[dict[str, Any]], cfg: BudgetSettings) -> tuple[float, float, float]:
    """The attention and width factors (configs [budget]) under which the scratch line covers every
    measured case with the least over-charge in the worst one; that over-charge."""
    best = (cfg.attention_factor, cfg.width_factor, math.inf)
    for a in np.arange(0.5, 2.001, 0.05):
        for w in np.arange(0.0, 12.001, 0.25):
            trial = cfg.model_copy(update={"attention_factor": float(a), "width_factor": float(w)})
            ratios = [scratch_line(r, trial) / r["scratch"] for r in results]
            if min(ratios) >= 1.0 and max(ratios) < best[2]:
                best = (round(float(a), 2), round(float(w), 2), max(ratios))
    return best


def report(results: list[dict[str, Any]], cfg: BudgetSettings) -> None:
    lines = [scratch_line(r, cfg) for r in results]
    ratios = [line / r["scratch"] for line, r in zip(lines, results, strict=True)]
    rows = [(r["model"], r["context"], r["parallel"], r.get("kv_bits", 16), human_bytes(r["weights"]),
             human_bytes(r["kv"]), human_bytes(r["kv_predicted"]), human_bytes(r["peak"]),
             human_bytes(r["scratch"]), human_bytes(line), f"{ratio:.2f}")
            for r, line, ratio in zip(results, lines, ratios, strict=True)]  # fmt: skip
    print(table(["model", "context", "P", "KV bits", "weights", "KV real", "KV formula", "MLX peak",
                 "scratch", "scratch line", "line / scratch"], rows))  # fmt: skip
    a, w, best = best_factors(results, cfg)
    print(f"\nconfigured: attention_factor {cfg.attention_factor}, width_factor {cfg.width_factor}: "
          f"line / scratch {min(ratios):.2f}-{max(ratios):.2f}")  # fmt: skip
    print(f"least factors covering every case: attention_factor {a}, width_factor {w}: "
          f"worst line / scratch {best:.2f}")  # fmt: skip
    print(json.dumps({"bench": "budget", "results": results,
                      "best_factors": {"attention_factor": a, "width_factor": w, "worst": best}}))  # fmt: skip


def main() -> None:
    settings = load_settings()
    args = sys.argv[1:]
    if args[:1] == ["--report"]:  # the JSON lines of earlier runs, reported together
        lines = [json.loads(ln) for f in args[1:] for ln in Path(f).read_text().splitlines()
                 if ln.startswith('{"bench": "budget"')]  # fmt: skip
        report([r for ln in lines for r in ln["results"]], settings.budget)
        return
    which = args or ["shared", "large"]
    large = [name for name, *_ in LARGE if "large" in which or name in which]
    models = (shared_models(settings) if "shared" in which else []) + large_models(large)
    results = []
    for name, folder, cases in models:
        for context, parallel, kv_bits in cases:
            results.append(measure(name, folder, context, parallel, kv_bits, settings))
            r = results[-1]
            print(name, context, parallel, human_bytes(r["scratch"]), file=sys.stderr, flush=True)
    report(results, settings.budget)


if __name__ == "__main__":
    main()
