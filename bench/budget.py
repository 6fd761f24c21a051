"""What the runtime really uses beside weights and KV cache: MLX's peak memory while P sequences fill a
context of N tokens, against budget.py's formula (runtime scratch) and its KV line. The constants in
configs/defaults.toml [budget] come from this table.  Usage: python bench/budget.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

import mlx.core as mx  # noqa: E402

from bench.measure import fill_context  # noqa: E402
from ramserve.budget import activation_shape, default_shape, kv_shape, runtime_bytes  # noqa: E402
from ramserve.engine import Engine  # noqa: E402
from ramserve.fmt import human_bytes, table  # noqa: E402
from ramserve.plan import make_plan  # noqa: E402
from ramserve.profile import analyze  # noqa: E402
from ramserve.quantize import quantize  # noqa: E402
from ramserve.settings import load_settings  # noqa: E402
from ramserve.source import open_source  # noqa: E402

SHARED = ROOT.parent.parent / "shared" / "models"
CASES = [(512, 1), (512, 4), (2048, 1), (2048, 4), (4096, 2)]


def main() -> None:
    rows, results = [], []
    fixed = int(load_settings().budget.runtime_fixed_mb * 2**20)
    for name in ("code-qwen3-30m", "code-qwen3moe-27m"):
        source = open_source(str(SHARED / name), load_settings())
        folder, _ = quantize(
            source,
            make_plan(analyze(source, progress=False), "30%", settings=load_settings()),
            progress=False,
        )
        kv = kv_shape(source)
        shape = activation_shape(source)
        for context, parallel in CASES:
            engine = Engine(folder, load_settings(), parallel=parallel, prompt_cache_entries=0)
            m = fill_context(engine, context, parallel)
            engine.close()
            predicted = kv.bytes(context, parallel)
            scratch = m["peak"] - m["weights"] - m["kv"]
            runtime = default_shape(kv, source.settings, context, parallel)
            formula = runtime_bytes(kv, runtime, shape, source.settings.budget) - fixed
            r = {"model": name, "context": context, "parallel": parallel, **m,
                 "kv_predicted": predicted, "scratch": scratch, "scratch_formula": formula}  # fmt: skip
            results.append(r)
            rows.append((name, context, parallel, human_bytes(m["weights"]), human_bytes(m["kv"]),
                         human_bytes(predicted), human_bytes(m["peak"]), human_bytes(scratch),
                         human_bytes(formula), "yes" if scratch <= formula else "NO"))  # fmt: skip
            del engine
            mx.clear_cache()
    print(table(["model", "context", "P", "weights", "KV real", "KV formula", "MLX peak",
                 "scratch", "scratch formula", "covered"], rows))  # fmt: skip
    print(json.dumps({"bench": "budget", "results": results}))


if __name__ == "__main__":
    main()
