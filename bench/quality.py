"""Quality at equal size: ramserve's plans against fixed recipes and calibrated GPTQ (issues 6, 21).

For each shared model, on ../shared/data/code-eval.txt: the bf16 model's perplexity, then for each
anchor its size, mean and median perplexity and mean KL per token from the bf16 model, beside
ramserve's plan at exactly the anchor's stored size, rounded to nearest and with compensated rounding
(the default; ramserve/rounding.py). The anchors:
- fixed recipes: uniform 3-bit g64 and 4-bit g128/g64/g32, mlx-lm's mixed_3_6 and mixed_4_6;
- mlx-lm's GPTQ (``mlx_lm.quant.gptq.gptq_quantize``: 4-bit g64, 6-bit g64 where GPTQ does not
  apply), calibrated on 64 x 512 tokens of real in-domain text, ../shared/data/code-calib.txt (sympy
  source, unseen in training and disjoint from the evaluation text), chunks drawn as mlx-lm draws them.
Recipes and ramserve's plans are simulated on the float model (ramserve/evaluate.py: equal to the
quantized kernels' output); GPTQ's model runs on MLX's quantized kernels. All rows of a model are
scored against one reference pass.

Targets (issue 21): ramserve's KL <= 0.4 x each uniform recipe's, <= 0.5 x each mixed recipe's and
<= 0.5 x GPTQ's, and lower mean and median perplexity than every anchor. Run it with the fast BLAS
(`make quality`).
Usage: python bench/quality.py [--samples 48|all] [--seq-len 512] [--models dense,moe] [--anchors ...]
(--samples all scores every window of the text, 610 of 512 tokens: twelve times as long, and the
reference's log-probabilities kept for KL take 10 GB.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("RAMSERVE_HOME", str(ROOT / ".cache" / "ramserve-home"))

import mlx.core as mx  # noqa: E402

from ramserve.cli import sample_count  # noqa: E402
from ramserve.evaluate import (  # noqa: E402
    Evaluated,
    Scores,
    encode,
    load_for_eval,
    recipe_quantization,
    reference_log_probs,
    render_scores,
    score,
    stored_bytes,
    token_windows,
)
from ramserve.fmt import table  # noqa: E402
from ramserve.plan import make_plan  # noqa: E402
from ramserve.profile import analyze  # noqa: E402
from ramserve.settings import load_settings  # noqa: E402
from ramserve.source import Source, open_source  # noqa: E402

SHARED = ROOT.parent.parent / "shared"
MODELS = {
    "dense": ROOT.parent / "models" / "code-qwen3-30m",
    "moe": SHARED / "models" / "code-qwen3moe-27m",
}
TEXT = SHARED / "data" / "code-eval.txt"
CALIBRATION = SHARED / "data" / "code-calib.txt"
UNIFORM = ["uniform-3g64", "uniform-4g128", "uniform-4g64", "uniform-4g32"]
MIXED = ["mixed_3_6", "mixed_4_6"]
GPTQ = "gptq-4g64"
TARGETS = {**dict.fromkeys(UNIFORM, 0.4), **dict.fromkeys(MIXED, 0.5), GPTQ: 0.5}


def gptq_model(source: Source, samples: int = 64, seq_len: int = 512) -> tuple[Evaluated, float]:
    """mlx-lm's GPTQ as its own command runs it (4-bit g64, 6-bit g64 fallback, seed 123), on
    ``samples`` chunks of the calibration text; and the seconds it took."""
    from mlx_lm import load
    from mlx_lm.quant.gptq import gptq_quantize

    start = time.perf_counter()
    mx.random.seed(123)
    model, tokenizer = load(str(source.path), lazy=True)
    # in float32: MLX's CPU runs bfloat16 matmuls without BLAS (the Hessians alone took 20 minutes);
    # the scales and biases are then stored in the model's bfloat16, as mlx-lm would save them
    model.set_dtype(mx.float32)
    tokens = mx.array(encode(tokenizer, CALIBRATION.read_text()))
    tokens = tokens[: tokens.size // seq_len * seq_len].reshape(-1, seq_len)
    data = tokens[mx.random.permutation(tokens.shape[0])[:samples]]
    model, _ = gptq_quantize(model, data, 4, 64, 6, 64)
    quant = {}
    for path, m in model.named_modules():
        if getattr(m, "bits", None):
            quant[path] = {"bits": m.bits, "group_size": m.group_size, "mode": "affine"}
            stored = getattr(mx, source.float_dtype)
            m.scales, m.biases = (a.astype(stored).astype(mx.float32) for a in (m.scales, m.biases))
    size = stored_bytes(source, quant)
    mx.eval(model.parameters())
    return Evaluated(model, tokenizer, GPTQ, 8 * size / source.parameter_count, size), (
        time.perf_counter() - start
    )


def bench_model(
    folder: Path, samples: int | None, seq_len: int, only: set[str] | None = None
) -> list[dict]:
    settings = load_settings()
    source = open_source(str(folder), settings)
    start = time.perf_counter()
    profile = analyze(source, progress=False)
    analysis_s = time.perf_counter() - start
    ref = load_for_eval(str(folder), settings, label="bf16")
    windows = token_windows(encode(ref.tokenizer, TEXT.read_text()), seq_len, samples)
    ref_lp = reference_log_probs(ref, windows)
    base = score(ref, windows, ref_lp)
    anchors: list[tuple[str, Evaluated, float | None]] = []
    for recipe in UNIFORM + MIXED:
        if only is None or recipe in only:
            quant = recipe_quantization(source, recipe)
            anchors.append((recipe, load_for_eval(str(folder), settings, quant, recipe), None))
    if only is None or GPTQ in only:
        anchors.append((GPTQ, *gptq_model(source)))
    nearest_rounding = {"method": "nearest"}
    rows = []
    for name, model, seconds in anchors:
        fixed = score(model, windows, ref_lp)
        plan = make_plan(profile, f"{fixed.stored_bytes}B", settings=settings)
        scored = {}
        for label, rounding in (("nearest", nearest_rounding), ("compensated", plan.rounding)):
            start = time.perf_counter()
            e = load_for_eval(str(folder), settings, plan.quantization, f"ramserve {label}",
                              plan.quantizer, rounding)  # fmt: skip
            load_s = time.perf_counter() - start
            scored[label] = (score(e, windows, ref_lp), load_s)
        ours, near = scored["compensated"][0], scored["nearest"][0]
        ratio = ours.kl_mean / fixed.kl_mean if fixed.kl_mean else float("nan")
        target = TARGETS[name]
        rows.append({"model": source.name, "recipe": name, "recipe_scores": fixed.to_json(),
                     "ramserve_scores": ours.to_json(), "nearest_scores": near.to_json(),
                     "kl_ratio": ratio, "nearest_kl_ratio": near.kl_mean / fixed.kl_mean,
                     "target": target, "size_match": ours.stored_bytes / fixed.stored_bytes,
                     "anchor_seconds": seconds,
                     "compensation_seconds": scored["compensated"][1] - scored["nearest"][1],
                     "pass": ratio <= target and ours.ppl_mean < fixed.ppl_mean
                     and ours.ppl_median < fixed.ppl_median})  # fmt: skip
        print(render_scores([fixed, near, ours]), "\n", file=sys.stderr)
    rows.insert(0, {"model": source.name, "recipe": "bf16", "recipe_scores": base.to_json(),
                    "analysis_seconds": analysis_s})  # fmt: skip
    return rows


def render(rows: list[dict]) -> str:
    out = []
    for r in rows:
        f = Scores(**r["recipe_scores"])
        if r["recipe"] == "bf16":
            out.append([r["model"], "bf16", f"{f.bits_per_weight:.2f}", f"{f.ppl_mean:.3f}",
                        f"{f.ppl_median:.3f}", "-", "", "", "", "", "", "", ""])  # fmt: skip
            continue
        o, n = Scores(**r["ramserve_scores"]), Scores(**r["nearest_scores"])
        out.append([r["model"], r["recipe"], f"{f.bits_per_weight:.3f}", f"{f.ppl_mean:.3f}",
                    f"{f.ppl_median:.3f}", f"{f.kl_mean:.4f}", f"{o.bits_per_weight:.3f}",
                    f"{n.kl_mean:.4f} ({r['nearest_kl_ratio']:.2f})", f"{o.ppl_mean:.3f}",
                    f"{o.ppl_median:.3f}", f"{o.kl_mean:.4f}",
                    f"{r['kl_ratio']:.2f} (<= {r['target']:.1f})",
                    "yes" if r["pass"] else "NO"])  # fmt: skip
    head = ["model", "anchor", "bpw", "ppl", "ppl med", "KL", "ramserve bpw", "KL nearest (ratio)",
            "ppl", "ppl med", "KL", "KL ratio", "pass"]  # fmt: skip
    return table(head, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=sample_count, default=48, metavar="N|all")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--models", default="dense,moe")
    p.add_argument("--anchors", help=f"comma-separated, of {', '.join(UNIFORM + MIXED + [GPTQ])}"
                   " (default: all)")  # fmt: skip
    a = p.parse_args()
    only = set(a.anchors.split(",")) if a.anchors else None
    rows = []
    for key in a.models.split(","):
        rows += bench_model(MODELS[key], a.samples, a.seq_len, only)
    counted = rows[0]["recipe_scores"]["sequences"]  # every window of the text where --samples all
    print(f"{counted} sequences x {a.seq_len} tokens of {TEXT.name}; KL per token from bf16;"
          " ramserve's plan at each anchor's size, rounded to nearest and compensated")  # fmt: skip
    print(render(rows))
    print(json.dumps({"bench": "quality", "samples": counted, "seq_len": a.seq_len, "rows": rows}))


if __name__ == "__main__":
    main()
