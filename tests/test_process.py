"""The command restarts itself once with the C runtime tuned (ramserve/process.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ramserve.process import THP_MODE

PRINT_ENV = (
    "import os; from ramserve.process import restart_tuned; restart_tuned(); "
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), os.environ.get('LD_PRELOAD', ''))"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and ld.so settings")
def test_restart_tunes_once_in_the_same_process() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    proc = subprocess.Popen([sys.executable, "-c", PRINT_ENV], env=env, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert len(lines) == 1, out  # restarted at most once: the second start changes nothing
    pid = lines[0].split(" ")[0]
    assert int(pid) == proc.pid  # exec, not a child process
    huge = THP_MODE.exists() and "[never]" not in THP_MODE.read_text()
    assert ("glibc.malloc.hugetlb=1" in lines[0]) == huge
    blas = list(Path(sys.prefix, "fastblas").glob("usr/lib/*/openblas-pthread/libblas.so.3"))
    assert ("openblas-pthread/libblas.so.3" in lines[0]) == bool(blas)
