"""Analysis throughput (MB of bf16 weights per second), peak memory, and sampled-vs-full accuracy.

Targets (issues 3, 21): >= 50 MB/s on the synthetic 2 GB dense model and on the 3.0 GB MoE (32
experts a layer, stacked as mlx-lm stacks them), peak RSS < 1 GB over the interpreter's baseline; the sampled
reconstruction error within 2% of the full computation. Both models are analysed
with the streamed self-Fisher pass (ramserve/fisher.py; its seconds shown apart), the path every
model takes, however large.

Several machines (issue 25), ``--hosts``: the shared dense model analysed and quantized by one process,
then by 2 ranks of ``ramserve run --hosts`` on this machine (stated memory: an uneven split), each rank
its own layers. The CPU seconds each process spent until the model was ready show how the work divides;
the wall clock here cannot, the ranks sharing this machine's cores.
Usage: python bench/analyze.py [--skip-synthetic | --hosts]
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
from memory import peak_rss_over_baseline  # noqa: E402
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


HOSTS_MIB = (24, 46)  # weights each rank's stated memory leaves room for
ONE_PROCESS = """
import sys, time
from pathlib import Path
from ramserve.budget import Ask
from ramserve.hosts import read_hostfile, split
from ramserve.profile import analyze
from ramserve.quantize import quantize
from ramserve.settings import load_settings
from ramserve.source import open_source
source = open_source(sys.argv[1], load_settings())
start = time.perf_counter()
profile = analyze(source, progress=False)
analysed = time.perf_counter()
done = split(source, profile, read_hostfile(Path(sys.argv[2])), Ask(context=1024, parallel=2))
quantize(source, done.plan, progress=False)
print(analysed - start, time.perf_counter() - start)
"""


def hosts_rows() -> list[dict[str, Any]]:
    """Analysis and quantization by one process on one core, then by 2 ranks on a core each (as two
    one-core machines would run them): each rank's analysis seconds, and the wall clock until the
    model is ready (the ranks' includes starting the server)."""
    import subprocess
    import threading
    import time

    import psutil

    from ramserve.budget import Ask
    from tests.serving import free_ports, host_memory_gb, ramserve_run, run_env

    homes = [Path(tempfile.mkdtemp(prefix="ramserve-bench-hosts-")) for _ in range(2)]
    for home in homes:
        (home / "config.toml").write_text(f"[hosts]\ncontrol_port = {free_ports(4)}\n")
    hostfile = homes[0] / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "memory_gb":
                                     host_memory_gb(DENSE, m, Ask(context=1024, parallel=2))}
                                    for m in HOSTS_MIB]))  # fmt: skip
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # what this starts runs on core 0
    try:
        out = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(DENSE), str(hostfile)],
                             env=run_env(homes[0]), check=True, capture_output=True, text=True)  # fmt: skip
        analysis, ready = (float(x) for x in out.stdout.split()[-2:])
        rows = [{"run": "one process, 1 core", "rank": 0, "layers analysed": "all",
                 "analysis_s": round(analysis, 1), "ready_s": round(ready, 1)}]  # fmt: skip
        stop = threading.Event()

        def move_rank_1() -> None:  # rank 0 starts rank 1 on its own core; it gets core 1
            while not stop.is_set():
                for p in psutil.process_iter():
                    try:
                        if str(hostfile) in p.cmdline() and p.environ().get("MLX_RANK") == "1":
                            p.cpu_affinity([1])
                            return
                    except (psutil.Error, OSError):
                        continue
                time.sleep(0.05)

        mover = threading.Thread(target=move_rank_1, daemon=True)
        mover.start()
        start = time.perf_counter()
        args = ["--hosts", str(hostfile), "--context", "1024", "--parallel", "2"]
        with ramserve_run(str(DENSE), *args, env=run_env(homes[1])) as (_, lines):
            ready = time.perf_counter() - start
            stop.set()
        head = next(i for i, ln in enumerate(lines) if "layers analysed" in ln)
        print("\n".join(lines[head : head + 2 + len(HOSTS_MIB)]))  # where each rank's time went
        for r, ln in enumerate(lines[head + 2 : head + 2 + len(HOSTS_MIB)]):
            cells = ln.split()
            rows.append({"run": "2 ranks, 1 core each", "rank": r, "layers analysed": cells[2],
                         "analysis_s": float(cells[-1]), "ready_s": round(ready, 1)})  # fmt: skip
    finally:
        os.sched_setaffinity(0, cores)
    return rows


def print_hosts_rows(rows: list[dict[str, Any]]) -> None:
    alone = rows[0]
    print(table(["run", "rank", "layers analysed", "analysis s", "x one process", "until ready s",
                 "x one process"],
                [(r["run"], r["rank"], r["layers analysed"], r["analysis_s"],
                  f"{r['analysis_s'] / alone['analysis_s']:.2f}", r["ready_s"],
                  f"{r['ready_s'] / alone['ready_s']:.2f}") for r in rows]))  # fmt: skip


def main() -> None:
    if "--hosts" in sys.argv:
        rows = hosts_rows()
        print_hosts_rows(rows)
        print(json.dumps({"bench": "analyze", "hosts": rows}))
        return
    rows = []
    folders = [DENSE] if DENSE.exists() else []
    if "--skip-synthetic" not in sys.argv:
        folders += [synthetic_model(), synthetic_moe()]
    for folder in folders:
        r = throughput(folder)
        r["sample_vs_full_max_dev_%"] = round(100 * sampling_error(folder), 2)
        rows.append(r)
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    print(json.dumps({"bench": "analyze", "results": rows}))


if __name__ == "__main__":
    main()
