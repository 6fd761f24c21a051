"""The cache under ``RAMSERVE_HOME``: its layout, disk budget, eviction, locks and listing.

Layout::

    profiles/<fingerprint>.json          a model's profile (``.partial.json``: analysis checkpoint)
    models/<fingerprint>/<plan-hash>/   a quantized model (``.<hash>.*.partial``: being written)
    locks/<key>.use, locks/<key>.write   flock files, one pair per entry

Whoever uses an entry (a server that loaded it, a run quantizing it) holds its ``.use`` lock shared;
eviction takes it exclusive without waiting and skips the entry when it cannot. A writer holds its
``.write`` lock exclusive while it writes, so a partial file whose lock is free is a crashed run's and
may be removed. The kernel drops both when a process dies, kill -9 included, so nothing stays locked.

The cache is bounded by ``[cache] max_gb``: before anything is written the bytes it needs are reserved,
evicting the least recently used entries nobody holds, and the disk must keep ``min_free_gb`` free
after the write. A write that cannot fit is refused before its first byte.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .atomic import read_json
from .errors import RamserveError
from .fmt import human_bytes
from .records import Plan
from .settings import CacheSettings, ramserve_home

log = logging.getLogger("ramserve.cache")

GB = 1_000_000_000  # decimal, as human_bytes prints sizes
# OS errors that mean "this disk cannot take the write": what to tell the user, and the fix.
FULL = "free some space (`ramserve prune`) or point RAMSERVE_HOME at a bigger disk"
LOCKED = "point RAMSERVE_HOME at a folder you can write"
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", FULL),
    errno.EDQUOT: ("the disk quota is exhausted", FULL),
    errno.EFBIG: ("the file size limit was reached", FULL),
    errno.EROFS: ("the file system is read-only", LOCKED),
    errno.EACCES: ("permission denied", LOCKED),
    errno.EPERM: ("permission denied", LOCKED),
}


class CacheError(RamserveError):
    """The cache cannot take a write (budget, free space, permissions), or an entry is in use."""


# -- layout -----------------------------------------------------------------------------------


def profile_path(fingerprint: str) -> Path:
    return ramserve_home() / "profiles" / f"{fingerprint}.json"


def model_dir(fingerprint: str, plan_hash: str) -> Path:
    return ramserve_home() / "models" / fingerprint / plan_hash


def entry_key(path: Path) -> str:
    """The lock name of a cache entry (a profile file or a model folder, final or partial)."""
    path = Path(path)
    if path.parent.name == "profiles":
        return "profile-" + path.name.lstrip(".").split(".")[0]
    name = path.name
    if name.startswith("."):  # a staging folder: .<hash>.<random>.partial
        name = name[1:].split(".")[0]
    return f"model-{path.parent.name}-{name}"


def _lock_file(key: str, kind: str) -> Path:
    return ramserve_home() / "locks" / f"{key}.{kind}"


def _use_lock(entry: Path) -> str:
    return str(_lock_file(entry_key(entry), "use"))


# -- locks ------------------------------------------------------------------------------------

# Open lock files of this process, by path: flock belongs to the open file, so the table is process
# state by nature (a second open of the same file would be a second, independent lock).
_held: dict[str, int] = {}


def _open_lock(path: Path) -> int | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None  # a read-only home: nothing can be evicted or written there either


def _in_cache(entry: Path) -> bool:
    return Path(entry).resolve().is_relative_to(ramserve_home().resolve())


def hold(entry: Path) -> None:
    """Mark ``entry`` in use by this process until ``release`` (or the process ends)."""
    if not _in_cache(entry):
        return  # a folder of the user's (`ramserve serve DIR`, `quantize -o DIR`) is never evicted
    key = _use_lock(entry)
    if key in _held:
        return
    fd = _open_lock(Path(key))
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _held[key] = fd


def release(entry: Path) -> None:
    fd = _held.pop(_use_lock(entry), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(path: Path, wait: bool) -> Iterator[bool]:
    """Whether this process got ``path``'s lock exclusive (always, when waiting)."""
    fd = _open_lock(path)
    if fd is None:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(entry: Path) -> Iterator[None]:
    """Held while ``entry`` is checked and written: another writer of the same entry waits for this
    one, and the entry is in use (never evicted) meanwhile. A caller that will load the entry holds
    it first (``hold``), so it stays in use after the write as well."""
    if not _in_cache(entry):
        yield
        return
    held_before = _use_lock(entry) in _held
    hold(entry)
    try:
        if being_written(entry):  # another process is writing it: say why this one waits
            log.warning("waiting for another ramserve writing %s", entry)
        with _exclusive(_lock_file(entry_key(entry), "write"), wait=True):
            yield
    finally:
        if not held_before:
            release(entry)


def in_use(entry: Path) -> bool:
    if _use_lock(entry) in _held:
        return True
    with _exclusive(Path(_use_lock(entry)), wait=False) as got:
        return not got


def being_written(entry: Path) -> bool:
    with _exclusive(_lock_file(entry_key(entry), "write"), wait=False) as got:
        return not got


def touch(entry: Path) -> None:
    """Record a use now (eviction is least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


# -- writes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def disk_errors(what: str, where: Path) -> Iterator[None]:
    """Turn a disk that refuses a write (full, read-only, no permission) into a CacheError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        why, fix = DISK_ERRORS[e.errno]
        raise CacheError(f"cannot write {what} under {where}: {why}; nothing was kept. To fix: {fix}"
                         ) from e  # fmt: skip


# -- listing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One thing the cache holds."""

    kind: Literal["profile", "model"]
    path: Path
    bytes: int
    fingerprint: str
    name: str  # the source model's
    last_used: float
    in_use: bool
    partial: bool  # an analysis checkpoint or a model folder not yet renamed into place
    plan_hash: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # a model's plan: budget, bpw, damage

    @property
    def label(self) -> str:
        if self.kind == "profile":
            return f"{self.name} (profile)"
        budget = self.summary.get("budget")
        return f"{self.name}@{budget}" if budget else f"{self.name}@{self.plan_hash}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["label"] = self.label
        return d


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _profile_entry(path: Path, names: dict[str, str]) -> Entry:
    partial = path.name.endswith((".partial.json", ".tmp"))
    fp = path.name.lstrip(".").split(".")[0]
    name = "" if partial else str((read_json(path) or {}).get("name", ""))
    return Entry("profile", path, _size(path), fp, name or names.get(fp, "?"),
                 path.stat().st_mtime, in_use(path) or being_written(path), partial)  # fmt: skip


def _model_entry(path: Path) -> Entry:
    partial = path.name.startswith(".")
    plan = None if partial else Plan.in_folder(path)  # a damaged one: listed by its folder
    busy = in_use(path) or being_written(path)
    return Entry("model", path, _size(path), path.parent.name, plan.name if plan else "?",
                 path.stat().st_mtime, busy, partial, plan.hash if plan else entry_key(path)[-16:],
                 plan.summary() if plan else {})  # fmt: skip


def entries() -> list[Entry]:
    """Everything in the cache, least recently used first."""
    home = ramserve_home()
    found: list[Entry] = []
    names: dict[str, str] = {}
    for folder in sorted((home / "models").glob("*/*")):
        if folder.is_dir():
            e = _model_entry(folder)
            found.append(e)
            if e.name != "?":
                names[e.fingerprint] = e.name
    for path in sorted((home / "profiles").glob("*")):
        if path.is_file():
            found.append(_profile_entry(path, names))
    return sorted(found, key=lambda e: e.last_used)


@dataclass(frozen=True)
class Usage:
    """The cache against its budget, and the disk it lives on."""

    used: int
    max_bytes: int
    disk_free: int
    min_free: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def usage(cfg: CacheSettings) -> Usage:
    return Usage(sum(e.bytes for e in entries()), int(cfg.max_gb * GB),
                 disk_free(ramserve_home()), int(cfg.min_free_gb * GB))  # fmt: skip


# -- removal ----------------------------------------------------------------------------------


def _delete(e: Entry) -> bool:
    """Remove an entry nobody holds (its lock taken while deleting, so a loader cannot race it)."""
    with _exclusive(Path(_use_lock(e.path)), wait=False) as free:
        if not free or (e.partial and being_written(e.path)):
            return False
        if e.path.is_dir():
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
        if e.kind == "model" and e.path.parent.is_dir() and not any(e.path.parent.iterdir()):
            e.path.parent.rmdir()
    return not e.path.exists()


def evictable(found: list[Entry], keep: Path | None = None) -> list[Entry]:
    """Of ``found``, the entries that may go, in eviction order: crashed runs' partial files first,
    then least recently used. Never one in use or being written, never ``keep``."""
    out = [e for e in found if not e.in_use and (keep is None or e.path != keep)]
    return sorted(out, key=lambda e: (not e.partial, e.last_used))


def _evict(found: list[Entry], limit: int, keep: Path | None,
           every_partial: bool) -> tuple[list[Entry], int]:  # fmt: skip
    """Delete evictable entries of ``found`` until at most ``limit`` bytes are left (with
    ``every_partial``, crashed runs' files even then); what was deleted, and the bytes left."""
    used, removed = sum(e.bytes for e in found), []
    for e in evictable(found, keep):
        if used <= limit and not (every_partial and e.partial):
            break
        if _delete(e):
            removed.append(e)
            used -= e.bytes
    return removed, used


def remove(found: list[Entry]) -> list[Entry]:
    """Delete these entries; the ones in use are left and not returned."""
    return [e for e in found if _delete(e)]


def prune(keep_bytes: int) -> list[Entry]:
    """Evict until the cache holds at most ``keep_bytes`` (always removing stale partial files)."""
    return _evict(entries(), keep_bytes, None, every_partial=True)[0]


def select(model: str) -> list[Entry]:
    """The entries ``ramserve rm`` means by MODEL or MODEL@BUDGET (a name, fingerprint or plan hash)."""
    base, _, spec = model.partition("@")
    found = []
    for e in entries():
        if base not in (e.name, e.fingerprint) and not e.fingerprint.startswith(base):
            continue
        if not spec or (e.kind == "model" and spec in (e.summary.get("budget"), e.plan_hash)):
            found.append(e)
    return found


# -- reservations -----------------------------------------------------------------------------


def reserve(needed: int, what: str, cfg: CacheSettings, keep: Path | None = None) -> list[Entry]:
    """Make room for ``needed`` bytes of ``what`` before it is written, or refuse with nothing
    written: evicts least recently used entries to stay under ``[cache] max_gb``, then requires the
    disk to keep ``min_free_gb`` free. Returns what was evicted."""
    limit = int(cfg.max_gb * GB)
    if needed > limit:
        raise CacheError(
            f"{what} needs {human_bytes(needed)}, more than the whole cache budget "
            f"([cache] max_gb = {cfg.max_gb:g}); raise it in {ramserve_home() / 'config.toml'}"
        )
    found = entries()
    evicted, used = _evict(found, limit - needed, keep, every_partial=False)
    found = [e for e in found if e not in evicted]
    for e in evicted:
        log.warning("cache: evicted %s (%s, last used %s) to make room for %s", e.label,
                    human_bytes(e.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(
                        e.last_used)), what)  # fmt: skip
    if used + needed > limit:
        busy = sum(e.bytes for e in found if e.in_use)
        raise CacheError(
            f"{what} needs {human_bytes(needed)}, but the cache holds {human_bytes(used)} of its "
            f"{human_bytes(limit)} budget and {human_bytes(busy)} of it is in use; stop the server "
            "using it, or raise [cache] max_gb"
        )
    require_free(needed, ramserve_home(), what, cfg, keep, found)
    return evicted


def require_free(needed: int, where: Path, what: str, cfg: CacheSettings,
                 keep: Path | None = None, found: list[Entry] | None = None) -> None:  # fmt: skip
    """Refuse, before writing, a write that would leave less than ``[cache] min_free_gb`` free, or
    that the folder cannot take at all (read-only, no permission)."""
    with disk_errors(what, where):
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    free, margin = disk_free(where), int(cfg.min_free_gb * GB)
    if free - needed < margin:
        prunable = sum(e.bytes for e in evictable(entries() if found is None else found, keep))
        raise CacheError(
            f"not enough disk for {what}: it needs {human_bytes(needed)} and {human_bytes(margin)} "
            f"must stay free ([cache] min_free_gb), but only {human_bytes(free)} is free on the disk "
            f"of {where}; `ramserve prune` could free {human_bytes(prunable)} of the cache. Nothing "
            "was written"
        )


def render_entries(found: list[dict[str, Any]], total: dict[str, Any]) -> str:
    from .fmt import table

    def ago(t: float) -> str:
        s = max(0.0, time.time() - t)
        for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
            if s >= n:
                return f"{s / n:.0f}{unit} ago"
        return "just now"

    rows = []
    for e in found:
        s = e["summary"]
        bpw = f"{s['bits_per_weight']:.2f}" if s.get("bits_per_weight") else "-"
        dmg = f"{s['predicted_damage']:.3g}" if s.get("predicted_damage") is not None else "-"
        state = "partial" if e["partial"] else ("in use" if e["in_use"] else "")
        rows.append((e["label"], e["kind"], human_bytes(e["bytes"]), bpw, dmg, ago(e["last_used"]),
                     state))  # fmt: skip
    head = table(["entry", "kind", "size", "bpw", "damage", "last used", "state"], rows)
    foot = (f"{human_bytes(total['used'])} of {human_bytes(total['max_bytes'])} cache budget; "
            f"{human_bytes(total['disk_free'])} free on disk ({ramserve_home()})")  # fmt: skip
    return (head + "\n" if rows else "the cache is empty\n") + foot


def render_removed(d: dict[str, Any]) -> str:
    listing = render_entries(d["removed"], d["total"])
    return (
        "removed:\n" + listing if d["removed"] else "nothing removed; " + listing.splitlines()[-1]
    )
