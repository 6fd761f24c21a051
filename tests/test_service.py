"""The launchd agent: plists rendered from the template, launchctl driven through a stand-in."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ramserve import service

STAND_IN = """#!/bin/sh
echo "$@" >> "{log}"
if [ "$1" = print ]; then
  printf 'state = running\\npid = 4242\\nruns = 1\\n'
fi
exit 0
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "user"
    for folder in ("LaunchAgents", "Logs"):  # as on every Mac
        (h / "Library" / folder).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


@pytest.fixture
def launchctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A launchctl on PATH that records its arguments, one call a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launchctl.log"
    script = bin_dir / "launchctl"
    script.write_text(STAND_IN.format(log=log))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.parametrize(
    "options",
    [[], ["--budget", "30%"], ["--budget", "m4-pro-48", "--context", "8192", "--port", "9000"]],
)
def test_plist_has_every_key_with_its_type(home: Path, options: list[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HOME", "/data/hf")
    paths = service.Paths.here()
    data = plistlib.loads(service.render_plist({"model": "org/model", "options": options}, paths))
    assert data["Label"] == service.LABEL
    args = data["ProgramArguments"]
    assert Path(args[0]).is_absolute() and args[0] == sys.executable
    assert args[1:5] == ["-m", "ramserve.cli", "run", "org/model"] and args[5:] == options
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(data["ThrottleInterval"], int) and data["ThrottleInterval"] > 0
    assert isinstance(data["ProcessType"], str)
    logs = home / "Library" / "Logs" / "ramserve"
    assert data["StandardOutPath"] == str(logs / "ramserve.out.log")
    assert data["StandardErrorPath"] == str(logs / "ramserve.err.log")
    env = data["EnvironmentVariables"]
    assert env["RAMSERVE_HOME"] == os.environ["RAMSERVE_HOME"] and env["HF_HOME"] == "/data/hf"
    assert all(isinstance(v, str) for v in env.values())
    if shutil.which("plutil"):
        path = home / "check.plist"
        path.write_bytes(service.render_plist({"model": "m", "options": options}, paths))
        assert subprocess.run(["plutil", "-lint", str(path)], check=False).returncode == 0


@pytest.mark.parametrize("console", ["mine", "absent"])
def test_launchctl_commands_for_both_domains(home: Path, launchctl: Path, tmp_path: Path,
                                             console: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    mine = tmp_path / "console"
    mine.touch()
    monkeypatch.setattr(service, "CONSOLE", mine if console == "mine" else tmp_path / "none")
    domain = f"{'gui' if console == 'mine' else 'user'}/{os.getuid()}"
    service.install("org/model", ["--budget", "30%"])
    plist = home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"
    assert launchctl.read_text().splitlines() == [
        f"bootout {domain}/{service.LABEL}",
        f"enable {domain}/{service.LABEL}",
        f"bootstrap {domain} {plist}",
    ]
    service.uninstall()
    assert launchctl.read_text().splitlines()[-1] == f"bootout {domain}/{service.LABEL}"


def snapshot(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ramserve.cli", *args], capture_output=True,
                          text=True, check=False, env=dict(os.environ))  # fmt: skip


def test_install_status_uninstall_leaves_no_trace(home: Path, launchctl: Path,
                                                  ramserve_home: Path) -> None:  # fmt: skip
    before = snapshot(home, ramserve_home)
    done = run_cli("service", "install", "org/model", "--budget", "30%", "--port", "8311")
    assert done.returncode == 0, done.stderr
    plist = home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"
    original = plist.read_bytes()
    status = run_cli("service", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"state": "running"' in status.stdout and '"pid": "4242"' in status.stdout
    assert "no answer from http://127.0.0.1:8311" in status.stdout  # nothing serves there
    # Reinstalling without a model regenerates the plist from the saved settings.
    plist.write_text("hand-edited")
    assert run_cli("service", "install").returncode == 0
    assert plist.read_bytes() == original
    assert run_cli("service", "uninstall", "--purge").returncode == 0
    assert snapshot(home, ramserve_home) == before


def test_without_launchctl_commands_are_refused_but_dry_run_works(home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PATH", "/nonexistent")
    for args in (
        ["service", "install", "org/model"],
        ["service", "status"],
        ["service", "uninstall"],
    ):
        done = run_cli(*args)
        assert done.returncode == 2 and "launchctl is not available" in done.stderr, args
        assert "Traceback" not in done.stderr
    dry = run_cli("service", "install", "org/model", "--budget", "30%", "--dry-run")
    assert dry.returncode == 0 and "<key>ProgramArguments</key>" in dry.stdout
    assert "would run: launchctl bootstrap" in dry.stdout
    assert snapshot(home) == {str(home / "Library"), str(home / "Library" / "LaunchAgents"),
                              str(home / "Library" / "Logs")}  # fmt: skip


def test_reinstall_without_saved_settings_says_what_to_do(home: Path, launchctl: Path) -> None:
    done = run_cli("service", "install")
    assert done.returncode == 2 and "ramserve service install MODEL" in done.stderr
