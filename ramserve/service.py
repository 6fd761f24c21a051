"""The launchd agent: ``ramserve run`` started at login and restarted if it dies (macOS).

The run options live in ``$RAMSERVE_HOME/service.json``, not in the plist: every install renders the
plist afresh from launchd/ramserve.plist and those settings, so upgrading ramserve (a new template, a
new interpreter path) never loses them and never leaves a stale hand-edited plist behind.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .errors import RamserveError
from .settings import CONFIG_DIR, ServerSettings, ramserve_home

TEMPLATE = CONFIG_DIR.parent / "launchd" / "ramserve.plist"
LABEL = "dev.ramserve.server"
# Environment passed through to the agent when set here (launchd starts it with almost none).
CONSOLE = Path("/dev/console")  # its owner is the user logged in at the screen
PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "RAMSERVE_API_KEY")


class ServiceError(RamserveError):
    """launchctl is missing or refused, or no service settings are saved."""


@dataclass(frozen=True)
class Paths:
    plist: Path
    logs: Path
    settings: Path

    @classmethod
    def here(cls, label: str = LABEL) -> Paths:
        home = Path.home()
        return cls(home / "Library" / "LaunchAgents" / f"{label}.plist",
                   home / "Library" / "Logs" / "ramserve", ramserve_home() / "service.json")  # fmt: skip


def load_service_settings(paths: Paths) -> dict[str, Any]:
    try:
        data = json.loads(paths.settings.read_text())
    except (OSError, ValueError) as e:
        raise ServiceError(
            f"no saved service settings at {paths.settings}: run `ramserve service install MODEL` first"
        ) from e
    return dict(data)


def render_plist(settings: dict[str, Any], paths: Paths, label: str = LABEL) -> bytes:
    """The agent's plist: the template, filled from the saved settings and this interpreter."""
    fill = {"label": label, "home": str(Path.home()), "logs": str(paths.logs)}
    with TEMPLATE.open("rb") as f:
        plist = plistlib.load(f)
    plist = {k: v.format(**fill) if isinstance(v, str) else v for k, v in plist.items()}
    plist["ProgramArguments"] = [sys.executable, "-m", "ramserve.cli", "run", settings["model"],
                                 *settings["options"]]  # fmt: skip
    env = {"RAMSERVE_HOME": str(ramserve_home()),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")}  # fmt: skip
    env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
    plist["EnvironmentVariables"] = env
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML)


def domain() -> str:
    """``gui/<uid>`` for the user at the console, ``user/<uid>`` otherwise (e.g. over SSH)."""
    uid = os.getuid()
    try:
        console_owner = CONSOLE.stat().st_uid
    except OSError:
        console_owner = -1
    return f"gui/{uid}" if console_owner == uid else f"user/{uid}"


def install_commands(paths: Paths, label: str = LABEL) -> list[list[str]]:
    d = domain()
    return [["launchctl", "bootout", f"{d}/{label}"],
            ["launchctl", "enable", f"{d}/{label}"],
            ["launchctl", "bootstrap", d, str(paths.plist)]]  # fmt: skip


def uninstall_commands(label: str = LABEL) -> list[list[str]]:
    return [["launchctl", "bootout", f"{domain()}/{label}"]]


def require_launchctl() -> None:
    if shutil.which("launchctl") is None:
        raise ServiceError("launchctl is not available: `ramserve service` manages a macOS launchd "
                           "agent (use --dry-run to see the plist and the commands)")  # fmt: skip


def _launchctl(args: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    require_launchctl()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise ServiceError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def install(model: str | None, options: list[str], *, dry_run: bool = False) -> dict[str, Any]:
    """Save the options (or reuse the saved ones), render the plist, and load it into launchd."""
    paths = Paths.here()
    if model is None:
        settings = load_service_settings(paths)
    else:
        settings = {"model": model, "options": options}
    plist = render_plist(settings, paths)
    commands = install_commands(paths)
    if dry_run:
        return {"plist": plist.decode(), "path": str(paths.plist), "commands": commands}
    require_launchctl()  # before anything is written
    if model is not None:
        atomic.write_json(paths.settings, settings)
    paths.logs.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(paths.plist, plist)
    bootout, *rest = commands
    _launchctl(bootout, check=False)  # not loaded yet is fine
    for cmd in rest:
        _launchctl(cmd, check=True)
    return {"plist": plist.decode(), "path": str(paths.plist), "commands": commands}


def uninstall(*, purge: bool = False, dry_run: bool = False) -> dict[str, Any]:
    paths = Paths.here()
    commands = uninstall_commands()
    removed = [str(paths.plist)] + ([str(paths.settings), str(paths.logs)] if purge else [])
    if dry_run:
        return {"commands": commands, "removes": removed}
    for cmd in commands:
        _launchctl(cmd, check=False)
    paths.plist.unlink(missing_ok=True)
    if purge:
        paths.settings.unlink(missing_ok=True)
        shutil.rmtree(paths.logs, ignore_errors=True)
    return {"commands": commands, "removes": removed}


def status(server: ServerSettings) -> dict[str, Any]:
    """launchd's view of the agent and a probe of its /health."""
    import httpx

    paths = Paths.here()
    done = _launchctl(["launchctl", "print", f"{domain()}/{LABEL}"], check=False)
    fields = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key in ("state", "pid", "last exit code", "runs"):
            fields[key] = value
    out: dict[str, Any] = {"label": LABEL, "installed": paths.plist.is_file(),
                           "loaded": done.returncode == 0, **fields}  # fmt: skip
    settings = load_service_settings(paths) if paths.settings.is_file() else None
    if settings:
        out["model"] = settings["model"]
        url = service_url(settings, server)
        try:
            out["health"] = httpx.get(f"{url}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError) as e:
            out["health"] = f"no answer from {url}: {type(e).__name__}"
    return out


def service_url(settings: dict[str, Any], server: ServerSettings) -> str:
    """The base URL the saved service's server listens on (a wildcard host reached by loopback)."""
    host = _option(settings, "--host", server.host)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{_option(settings, '--port', server.port)}"


def _option(settings: dict[str, Any], flag: str, default: object) -> str:
    opts = settings["options"]
    return str(opts[opts.index(flag) + 1] if flag in opts[:-1] else default)


def log_files() -> list[Path]:
    logs = Paths.here().logs
    return [logs / "ramserve.out.log", logs / "ramserve.err.log"]


def follow_logs(files: list[Path], lines: int, follow: bool) -> None:
    """Print the last ``lines`` of each log, then (``follow``) what is appended, as ``tail -f``."""
    import time

    for path in files:
        if path.is_file():
            print(f"==> {path} <==")
            print(
                "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]), end=""
            )
    if not follow:
        return
    offsets = {p: p.stat().st_size if p.is_file() else 0 for p in files}
    while True:
        for path in files:
            if path.is_file() and path.stat().st_size > offsets[path]:
                with path.open() as f:
                    f.seek(offsets[path])
                    print(f.read(), end="", flush=True)
                    offsets[path] = f.tell()
        time.sleep(0.5)
