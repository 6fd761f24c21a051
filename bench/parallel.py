"""Pipeline or tensor parallelism over 2 ranks (issue 25): greedy decoding of one sequence of the shared
dense model, same plan, in one process, split by layers over 2 ranks (ramserve's pipeline: ranks take
turns, each holding its own layers), and split inside every layer over 2 ranks (mlx-lm's
tensor-parallel ``shard``: every rank runs every layer on half of each weight, with an all-reduce after
attention and after the MLP). The ranks run on this machine over loopback (MLX's ring back end), so they
share its cores and its memory bandwidth: on real Macs each has its own.
Usage: python bench/parallel.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("RAMSERVE_HOME", tempfile.mkdtemp(prefix="ramserve-bench-"))

MODEL = ROOT.parent / "models" / "code-qwen3-30m"
PROMPT = "def fibonacci(n):"
TOKENS = 64


def decode(scheme: str, folder: Path) -> dict[str, Any]:
    """This rank's greedy decoding under ``scheme``: its tokens and decode rate."""
    import mlx.core as mx

    from ramserve.engine import load_model
    from ramserve.pipeline import greedy, stager
    from ramserve.settings import load_settings

    stage = None
    if scheme == "pipeline":
        group = mx.distributed.init(strict=True, backend="ring")
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        bounds = [0, layers // 2, layers]
        stage = stager(folder, bounds, group.rank(), load_settings().kinds)
    model, tokenizer = load_model(folder, stage=stage)
    if scheme == "tensor":
        group = mx.distributed.init(strict=True, backend="ring")
        model.shard(group)
        mx.eval(model.parameters())
    prompt = tokenizer.encode(PROMPT)
    greedy(model, prompt, 4)  # warm up
    start = time.perf_counter()
    first = greedy(model, prompt, 1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens = greedy(model, prompt, TOKENS)
    total = time.perf_counter() - start
    rank = mx.distributed.init().rank() if scheme != "one" else 0
    return {"scheme": scheme, "rank": rank, "tokens": tokens, "first": first,
            "tok_s": (TOKENS - 1) / max(total - prefill, 1e-9)}  # fmt: skip


def launched(scheme: str, folder: Path) -> dict[str, Any]:
    from tests.serving import free_port

    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
           "--starting-port", str(free_port()), "--python", sys.executable, "--",
           str(Path(__file__).resolve()), "rank", scheme, str(folder)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"{scheme} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    first = next(r for r in ranks if r["rank"] == 0)  # a pipeline's other ranks sample nothing
    return {**first, "ranks": len(ranks)}


def main() -> None:
    if sys.argv[1:2] == ["rank"]:
        print(json.dumps(decode(sys.argv[2], Path(sys.argv[3]))), flush=True)
        return
    from ramserve.fmt import table
    from ramserve.plan import make_plan
    from ramserve.profile import analyze
    from ramserve.quantize import quantize
    from ramserve.settings import load_settings
    from ramserve.source import open_source

    src = open_source(str(MODEL), load_settings())
    plan = make_plan(analyze(src, progress=False), "4.5bpw", settings=load_settings())
    folder, _ = quantize(src, plan, progress=False)
    one = {**decode("one", folder), "ranks": 1}
    rows = [one, launched("pipeline", folder), launched("tensor", folder)]
    print(table(["scheme", "ranks", "tok/s (one stream)", "x one process", "same tokens"],
                [(r["scheme"], r["ranks"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / one['tok_s']:.2f}",
                  "yes" if r["tokens"] == one["tokens"] else "no") for r in rows]))  # fmt: skip
    print(json.dumps({"bench": "parallel", "rows": [{k: v for k, v in r.items() if k != "tokens"}
                                                     for r in rows]}))  # fmt: skip


if __name__ == "__main__":
    main()
