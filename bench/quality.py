"""Quality at equal size: ramserve's plans against fixed recipes (issue 6).

For each shared model, on ../shared/data/code-eval.txt: the bf16 model's perplexity, then for each fixed
recipe (uniform 3-bit g64, 4-bit g128/g64/g32, mlx-lm's mixed_3_6 and mixed_4_6) its size, mean and
median perplexity and mean KL per token from the bf16 model, beside ramserve's plan at exactly the
recipe's stored size. Quantization is simulated on the float model (ramserve/evaluate.py: equal to the
quantized kernels' output); all rows of a model are scored against one reference pass.

Targets: at each uniform recipe's size, ramserve's KL <= 0.7 x the recipe's; at each mixed recipe's
size, lower KL; lower mean perplexity everywhere. Run it with the fast BLAS (`make quality`).
Usage: python bench/quality.py [--samples 48] [--seq-len 512] [--models dense,moe]
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

from ramserve.evaluate import (  # noqa: E402
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
from ramserve.source import open_source  # noqa: E402

SHARED = ROOT.parent.parent / "shared"
MODELS = {
    "dense": ROOT.parent / "models" / "code-qwen3-30m",
    "moe": SHARED / "models" / "code-qwen3moe-27m",
}
TEXT = SHARED / "data" / "code-eval.txt"
UNIFORM = ["uniform-3g64", "uniform-4g128", "uniform-4g64", "uniform-4g32"]
MIXED = ["mixed_3_6", "mixed_4_6"]


def bench_model(folder: Path, samples: int, seq_len: int) -> list[dict]:
    source = open_source(str(folder), load_settings())
    start = time.perf_counter()
    profile = analyze(source, progress=False)
    analysis_s = time.perf_counter() - start
    ref = load_for_eval(str(folder), load_settings(), label="bf16")
    windows = token_windows(encode(ref.tokenizer, TEXT.read_text()), seq_len, samples)
    ref_lp = reference_log_probs(ref, windows)
    base = score(ref, windows, ref_lp)
    rows = []
    for recipe in UNIFORM + MIXED:
        quant = recipe_quantization(source, recipe)
        size = stored_bytes(source, quant)
        fixed = score(load_for_eval(str(folder), load_settings(), quant, recipe), windows, ref_lp)
        plan = make_plan(profile, f"{size}B", settings=load_settings())
        ours = score(
            load_for_eval(
                str(folder), load_settings(), plan.quantization, "ramserve", plan.quantizer
            ),
            windows,
            ref_lp,
        )
        ratio = ours.kl_mean / fixed.kl_mean if fixed.kl_mean else float("nan")
        target = 0.7 if recipe in UNIFORM else 1.0
        rows.append({"model": source.name, "recipe": recipe, "recipe_scores": fixed.to_json(),
                     "ramserve_scores": ours.to_json(), "kl_ratio": ratio, "target": target,
                     "size_match": ours.stored_bytes / size,
                     "pass": ratio <= target and ours.ppl_mean < fixed.ppl_mean})  # fmt: skip
        print(render_scores([fixed, ours]), "\n", file=sys.stderr)
    rows.insert(0, {"model": source.name, "recipe": "bf16", "recipe_scores": base.to_json(),
                    "analysis_seconds": analysis_s})  # fmt: skip
    return rows


def render(rows: list[dict]) -> str:
    out = []
    for r in rows:
        f = Scores(**r["recipe_scores"])
        if r["recipe"] == "bf16":
            out.append([r["model"], "bf16", f"{f.bits_per_weight:.2f}", f"{f.ppl_mean:.3f}",
                        f"{f.ppl_median:.3f}", "-", "", "", "", "", "", ""])  # fmt: skip
            continue
        o = Scores(**r["ramserve_scores"])
        out.append([r["model"], r["recipe"], f"{f.bits_per_weight:.3f}", f"{f.ppl_mean:.3f}",
                    f"{f.ppl_median:.3f}", f"{f.kl_mean:.4f}", f"{o.bits_per_weight:.3f}",
                    f"{o.ppl_mean:.3f}", f"{o.ppl_median:.3f}", f"{o.kl_mean:.4f}",
                    f"{r['kl_ratio']:.2f} (<= {r['target']:.1f})",
                    "yes" if r["pass"] else "NO"])  # fmt: skip
    head = ["model", "recipe", "bpw", "ppl", "ppl med", "KL", "ramserve bpw", "ppl", "ppl med",
            "KL", "KL ratio", "pass"]  # fmt: skip
    return table(head, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--models", default="dense,moe")
    a = p.parse_args()
    rows = []
    for key in a.models.split(","):
        rows += bench_model(MODELS[key], a.samples, a.seq_len)
    print(f"{a.samples} sequences x {a.seq_len} tokens of {TEXT.name}; KL per token from bf16")
    print(render(rows))
    print(
        json.dumps({"bench": "quality", "samples": a.samples, "seq_len": a.seq_len, "rows": rows})
    )


if __name__ == "__main__":
    main()
