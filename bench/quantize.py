"""Quantize throughput (MB of bf16 source per second) and peak memory over baseline, on the synthetic
2 GB model. Targets (issue 5): >= 50 MB/s and < 600 MB peak.  Usage: python bench/quantize.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

from memory import peak_rss_over_baseline  # noqa: E402
from synthetic import synthetic_model  # noqa: E402

from ramserve.fmt import table  # noqa: E402
from ramserve.plan import make_plan  # noqa: E402
from ramserve.profile import analyze  # noqa: E402
from ramserve.quantize import quantize  # noqa: E402
from ramserve.settings import load_settings  # noqa: E402
from ramserve.source import open_source  # noqa: E402


def main() -> None:
    src = open_source(str(synthetic_model()), load_settings())
    profile = analyze(src, progress=False)
    rows, results = [], []
    for spec in ("4.5bpw", "30%"):
        plan = make_plan(profile, spec, settings=load_settings())
        with tempfile.TemporaryDirectory(dir=os.environ["RAMSERVE_HOME"]) as tmp:
            (folder, _), peak, seconds = peak_rss_over_baseline(
                lambda: quantize(src, plan, Path(tmp) / "out", progress=False)  # noqa: B023
            )
            written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        mb = profile.bf16_bytes / 1e6
        r = {"budget": spec, "bf16_MB": round(mb), "written_MB": round(written / 1e6),
             "seconds": round(seconds, 2), "MB_per_s": round(mb / seconds, 1),
             "peak_rss_MB": round(peak / 1e6)}  # fmt: skip
        rows.append(list(r.values()))
        results.append(r)
    print(table(list(results[0]), rows))
    print(json.dumps({"bench": "quantize", "model": src.name, "results": results}))


if __name__ == "__main__":
    main()
