"""Analysis throughput (MB of bf16 weights per second), peak memory, and sampled-vs-full accuracy.

Targets (issues 3, 21): >= 50 MB/s on the synthetic 2 GB dense model and on the 3.0 GB MoE (32
experts a layer, stacked as mlx-lm stacks them), peak RSS < 1 GB over the interpreter's baseline; the sampled
reconstruction error within 2% of the full computation. Both models are analysed
with the streamed self-Fisher pass (ramserve/fisher.py; its seconds shown apart), the path every
model takes, however large.

The analysis split over several machines (issue 25) is bench/split_analysis.py.
Usage: python bench/analyze.py [--skip-synthetic]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

from ramserve.process import restart_tuned  # noqa: E402

restart_tuned()  # as the `ramserve` command does

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from memory import in_fresh_process, peak_rss_over_baseline  # noqa: E402
from synthetic import synthetic_model, synthetic_moe  # noqa: E402

from ramserve import affine  # noqa: E402
from ramserve.fmt import table  # noqa: E402
from ramserve.profile import analyse_module, analyze  # noqa: E402
from ramserve.settings import load_settings  # noqa: E402
from ramserve.source import open_source  # noqa: E402

DENSE = ROOT.parent / "models" / "code-qwen3-30m"


def throughput(folder: Path) -> dict:
    src = open_source(str(folder), load_settings())
    _ = src.modules  # resolve the module map before measuring
    profile, peak, seconds = peak_rss_over_baseline(
        lambda: analyze(src, force=True, progress=False)
    )
    mb = profile.bf16_bytes / 1e6
    fisher = profile.fisher_seconds or 0.0
    shares = profile.rounding_seconds or 0.0  # compensation's share of the error (rounding.py)
    return {"model": src.name, "estimator": profile.estimator, "bf16_MB": round(mb),
            "seconds": round(seconds, 2), "fisher_s": round(fisher, 2),
            "rounding_s": round(shares, 2),
            "weights_pass_MB_per_s": round(mb / (seconds - fisher - shares), 1),
            "MB_per_s": round(mb / seconds, 1), "peak_rss_MB": round(peak / 1e6)}  # fmt: skip


def exact_errors(
    w: mx.array, cands: list[tuple[int, int]], quantizer: dict[str, Any]
) -> list[float]:
    """Whole-tensor relative error of ``quantizer``, row sums in float32 added up in float64 (one
    float32 sum over the whole tensor drifts by about 1%): the reference for the sample."""
    w2 = w.reshape(-1, w.shape[-1])
    ref = w2.astype(mx.float32)
    signal = np.asarray(mx.square(ref).sum(axis=1), dtype=np.float64).sum()
    out = []
    for bits, g in cands:
        d = affine.dequantize(w2, g, bits, **quantizer)
        sq = mx.square(d.astype(mx.float32) - ref).sum(axis=1)
        out.append(np.asarray(sq, dtype=np.float64).sum() / signal)
        mx.clear_cache()
    return out


def sampling_error(folder: Path, limit: int = 12) -> float:
    """Largest relative difference between sampled and exact whole-tensor error, over modules x
    candidates."""
    src = open_source(str(folder), load_settings())
    settings = load_settings()
    weights = src.weights()
    worst = 0.0
    sampled_modules = [m for m in src.modules if m.numel > settings.analysis.sample_elements]
    for m in sampled_modules[:limit]:
        w = weights.pop(f"{m.path}.weight").astype(mx.bfloat16)
        a = analyse_module(m, w, settings, "bfloat16", [mx.cpu])[1:]
        b = exact_errors(w, [(o.bits, o.group_size) for o in a], settings.quantizer.model_dump())
        worst = max(worst, max(abs(x.rel_mse / y - 1) for x, y in zip(a, b, strict=True)))
    return worst


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:  # one model, in the process that measures it
        print(json.dumps(throughput(Path(sys.argv[2]))))
        return
    rows = []
    folders = [DENSE] if DENSE.exists() else []
    if "--skip-synthetic" not in sys.argv:
        folders += [synthetic_model(), synthetic_moe()]
    for folder in folders:
        # a process each: what one analysis leaves resident would hide the next one's peak
        r = in_fresh_process([__file__, "--measure", str(folder)])
        r["sample_vs_full_max_dev_%"] = round(100 * sampling_error(folder), 2)
        rows.append(r)
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    print(json.dumps({"bench": "analyze", "results": rows}))


if __name__ == "__main__":
    main()
