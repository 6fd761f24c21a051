"""A model split over 2 and 3 ranks on this machine (MLX's ring back end over loopback, started by
``mlx.launch`` as MLX's own Linux CI does): every rank's greedy tokens equal one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ramserve.pipeline import greedy, share_of

from .serving import free_port


def single_process(folder: Path, prompt: str, tokens: int) -> list[int]:
    from mlx_lm.utils import load

    model, tokenizer = load(str(folder))
    return greedy(model, tokenizer.encode(prompt), tokens)


@pytest.mark.parametrize("bounds", ["0,3,7", "0,1,5,7"])
def test_a_split_model_decodes_as_one_process_does(served_dense: Path, bounds: str) -> None:
    prompt, tokens = "def fibonacci(n):", 12
    ramserve = Path(sys.executable).parent / "ramserve"
    ranks = len(bounds.split(",")) - 1
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring",
           "--starting-port", str(free_port()), "--python", sys.executable, str(ramserve),
           "pipeline", str(served_dense), "--bounds", bounds, "--prompt", prompt,
           "--tokens", str(tokens)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert sorted(ln["rank"] for ln in lines) == list(range(ranks))
    expected = single_process(served_dense, prompt, tokens)
    assert next(ln["tokens"] for ln in lines if ln["rank"] == 0) == expected


def test_bounds_must_rise_from_zero() -> None:
    from ramserve.errors import RamserveError

    assert share_of([0, 3, 7], 1).start == 3 and share_of([0, 3, 7], 1).last
    for bad in ([1, 3, 7], [0, 3, 3, 7], [0, 5, 2]):
        with pytest.raises(RamserveError, match="must rise from 0"):
            share_of(bad, 0)
