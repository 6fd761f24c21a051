"""The C runtime under ramserve: where large blocks of memory come from and when they go back.

MLX's CPU back end allocates every array with ``malloc``. glibc maps each block above its mmap threshold
afresh and unmaps it at ``free``, so the kernel faults in and zeroes every 4 KiB page of every large
temporary, again and again: analysing the 2 GB synthetic model took 20 million page faults and spent as
long in the kernel as in its own code. Backed by transparent huge pages, one fault brings in 2 MiB.
(Linux with glibc only; elsewhere these are no-ops.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _huge_pages(env: dict[str, str]) -> bool:
    """Asks glibc's malloc for transparent huge pages for its large blocks, unless asked already or
    the kernel has them off. Measured on the 2 GB synthetic model's self-Fisher pass: 20M page
    faults -> 2.7M, 82 s -> 49 s."""
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if "[never]" in THP_MODE.read_text():
            return False
    except OSError:
        return False
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES])
    return True


def _fast_blas(env: dict[str, str]) -> bool:
    """Preloads the OpenBLAS that scripts/fast-blas put beside the environment (``make setup``), as
    the Makefile does: MLX's Linux wheel calls the reference BLAS, about 3 GFLOP/s here against
    OpenBLAS's 150, and the self-Fisher pass and evaluation are all matmuls."""
    found = sorted(Path(sys.prefix, "fastblas").glob("usr/lib/*/openblas-pthread/libblas.so.3"))
    if not found or "libblas" in env.get("LD_PRELOAD", ""):
        return False
    lib = found[0]
    paths = [str(lib.parent.parent), str(lib.parent), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    return True


def restart_tuned() -> None:
    """Restarts this command (same process id, arguments and output) with the C runtime set as the
    analysis wants it: settings glibc and the dynamic loader read only at start-up. Does nothing
    where both are set already, or nothing applies (not Linux)."""
    if not _linux():
        return
    env = dict(os.environ)
    if _huge_pages(env) | _fast_blas(env):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _mmap_threshold(size: int) -> None:
    if _linux():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Makes glibc give freed tensors back to the system while it lasts. It serves blocks under its
    adaptive mmap threshold (which rises to 32 MB) from the heap and keeps them when freed, so resident
    memory grows with every tensor read and dropped; a fixed 1 MiB threshold maps each one on its own.
    Measured on the 2 GB synthetic model's analysis: peak RSS 673 -> 551 MB. Afterwards the threshold
    goes to glibc's own ceiling: serving reuses the same scratch every step, and mapping it afresh each
    time costs the CPU decode page faults on every step."""
    _mmap_threshold(1 << 20)
    try:
        yield
    finally:
        _mmap_threshold(32 << 20)


def blas_threads(count: int) -> None:
    """Caps OpenBLAS's threads where it is loaded (the Makefile preloads it on Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).openblas_set_num_threads(count)


@contextlib.contextmanager
def blas_threads_as_at_start() -> Iterator[None]:
    """OpenBLAS at one thread per core for the duration, then as it was. A product's rounding
    depends on how many threads split it; compensated rounding turns such differences into other
    codes, and a server (which caps the threads, ``cpu.adapt_to_cpu``) must write the same bytes for
    a plan as the command line does."""
    try:
        before = int(ctypes.CDLL(None).openblas_get_num_threads())
    except (OSError, AttributeError):
        yield
        return
    blas_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        blas_threads(before)
