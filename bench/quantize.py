"""Quantize throughput (MB of bf16 source per second) and peak memory over baseline, on the synthetic
2 GB dense model and the 3.0 GB MoE (32 experts a layer, stacked as mlx-lm stacks them), or on the
shared 30M-parameter model (``small``), rounded to nearest and with compensated rounding
(ramserve/rounding.py): once taking the sequences the analysis drew (the profile keeps them), once
sampling them again as it must where the profile has none. Targets (issues 5, 21): nearest >= 50 MB/s,
compensated >= 25 MB/s, peak < 1 GB over baseline.
Usage: python bench/quantize.py [dense|moe|small ...] [--rows nearest,compensated,...]
       (default: dense moe, every row)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

from ramserve.process import restart_tuned  # noqa: E402

restart_tuned()  # as the `ramserve` command does

from memory import in_fresh_process, peak_rss_over_baseline  # noqa: E402
from synthetic import synthetic_model, synthetic_moe  # noqa: E402

from ramserve.cache import profile_path  # noqa: E402
from ramserve.fmt import table  # noqa: E402
from ramserve.plan import make_plan  # noqa: E402
from ramserve.profile import analyze  # noqa: E402
from ramserve.quantize import quantize  # noqa: E402
from ramserve.records import Plan  # noqa: E402
from ramserve.settings import load_settings  # noqa: E402
from ramserve.source import open_source  # noqa: E402

SMALL = ROOT.parent / "models" / "code-qwen3-30m"
MODELS = {"dense": synthetic_model, "moe": synthetic_moe, "small": lambda: SMALL}
# how each row rounds: the plan's method, and whether the profile keeps the analysis's sequences
ROWS = {"nearest": ("nearest", True), "compensated": ("compensated", True),
        "compensated (sampling again)": ("compensated", False)}  # fmt: skip


def measure(key: str, label: str) -> dict:
    """One row, in the process that runs it: the profile from the cache, a plan, and quantize."""
    method = ROWS[label][0]
    src = open_source(str(MODELS[key]()), load_settings())
    profile = analyze(src, progress=False)
    settings = load_settings()
    settings = settings.model_copy(update={
        "rounding": settings.rounding.model_copy(update={"method": method})})  # fmt: skip
    plan = make_plan(profile, "4.5bpw", settings=settings)
    with tempfile.TemporaryDirectory(dir=os.environ["RAMSERVE_HOME"]) as tmp:
        (folder, _), peak, seconds = peak_rss_over_baseline(
            lambda: quantize(src, plan, Path(tmp) / "out", progress=False)
        )
        written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        manifest = Plan.read(folder / "plan.json").written
    mb = profile.bf16_bytes / 1e6
    ratio = manifest.rounding_error_ratio if manifest else None
    return {"model": src.name, "rounding": label, "bf16_MB": round(mb),
            "written_MB": round(written / 1e6), "seconds": round(seconds, 2),
            "rounding_s": round(manifest.rounding_seconds or 0, 2) if manifest else 0,
            "MB_per_s": round(mb / seconds, 1), "peak_rss_MB": round(peak / 1e6),
            "error_vs_nearest": round(ratio, 3) if ratio else "-"}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", help=f"of {', '.join(MODELS)} (default: dense moe)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--measure", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(*a.measure)))
        return
    wanted = {label: ROWS[label] for label in a.rows.split(",")}
    rows, results = [], []
    for key in a.models or ["dense", "moe"]:
        src = open_source(str(MODELS[key]()), load_settings())
        profile = analyze(src, progress=False)
        for label, (_, samples_kept) in wanted.items():
            if not samples_kept:  # as a profile written before it kept them
                replace(profile, samples=None).write(profile_path(src.fingerprint))
            # each row in a process of its own: memory an earlier row left with the process
            # would raise the next one's baseline and hide its peak
            r = in_fresh_process([__file__, "--measure", key, label])
            rows.append(list(r.values()))
            results.append(r)
            print(table(list(results[0]), rows), file=sys.stderr)
        profile.write(profile_path(src.fingerprint))  # with its sequences again
    print(table(list(results[0]), rows))
    print(json.dumps({"bench": "quantize", "budget": "4.5bpw", "results": results}))


if __name__ == "__main__":
    main()
