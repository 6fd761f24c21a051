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


def restart_with_huge_pages() -> None:
    """Restarts this command (same process id, arguments and environment) with glibc's malloc
    asking for transparent huge pages for its large blocks: a tunable glibc reads only at start-up.
    Measured on the 2 GB synthetic model's self-Fisher pass: 20M page faults -> 2.7M, 82 s -> 49 s.
    Does nothing where the kernel has huge pages off, or once the tunable is set."""
    if not _linux() or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        if "[never]" in THP_MODE.read_text():
            return
    except OSError:
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


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
