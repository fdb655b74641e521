"""Run the app with ``flwr run`` in an isolated Flower home, check its real status, clean up.

``flwr run`` exits 0 even when the run fails, and its local SuperLink outlives the run. This
module gives tests, the experiment harness and users one place that: sets the offline
environment, uses its own ``FLWR_HOME``/``HOME``/``RAY_TMPDIR``/ports, reads the final status
with ``flwr ls --format json``, and stops every process it started (by pid).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else `uv sync` runs and the run fails (code 608)
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


FLWR = str(Path(sys.executable).with_name("flwr"))  # the CLI of this environment, not whatever is on PATH


class RunFailed(RuntimeError):
    """The run did not finish with status ``finished:completed``."""


@dataclass
class RunOutcome:
    run_id: str
    status: str
    details: dict[str, Any]
    log: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_config(values: Mapping[str, Any]) -> str:
    """``{"a.b": 1, "c": "x"}`` -> ``a.b=1 c="x"`` (TOML values, as ``flwr run`` expects)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in values.items())


def ancestors() -> set[int]:
    """This process and its parents, which a cleanup must never signal."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (our private FLWR_HOME or Ray temp dir)."""
    pids, spared = [], ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LocalFederation:
    """A private Flower home with its own local SuperLink ports; a context manager that cleans up."""

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        for name in ("home", "flwr", "tmp"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay under 107 bytes, so its temp dir is short, beside the rest
        self.ray_dir = Path(tempfile.mkdtemp(prefix="rabo-ray-", dir="/tmp"))
        self.env = dict(os.environ) | OFFLINE_ENV | {
            "HOME": str(self.workdir / "home"),
            "FLWR_HOME": str(self.workdir / "flwr"),
            "RAY_TMPDIR": str(self.ray_dir),
            "TMPDIR": str(self.workdir / "tmp"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            # flwr starts flower-superlink by name: find this environment's first
            "PATH": os.pathsep.join([str(Path(FLWR).parent), os.environ.get("PATH", "")]),
        } | dict(env or {})

    def flwr(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([FLWR, *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def run(self, app_dir: Path, run_config: Mapping[str, Any] | None = None,
            federation_config: Mapping[str, Any] | None = None, timeout: float = 1800) -> RunOutcome:
        """``flwr run APP --stream``; returns the outcome read back with ``flwr ls``."""
        args = ["run", str(app_dir), "--stream"]
        if run_config:
            args += ["--run-config", format_config(run_config)]
        if federation_config:
            args += ["--federation-config", format_config(federation_config)]
        done = self.flwr(*args, timeout=timeout, cwd=app_dir)
        log = done.stdout + done.stderr
        listing = self.flwr("ls", "--format", "json", cwd=app_dir)
        try:
            runs = json.loads(listing.stdout)["runs"]
        except (ValueError, KeyError) as err:
            raise RunFailed(f"`flwr ls` gave no run list ({listing.stdout!r} {listing.stderr!r}); run log:\n{log}") from err
        latest = max(runs, key=lambda r: r.get("pending-at", ""))
        return RunOutcome(str(latest["run-id"]), latest["status"], latest, log)

    def close(self) -> None:
        """Stop the SuperLink and any Ray or simulation process this federation started."""
        def alive() -> list[int]:
            return [p for m in (str(self.workdir), str(self.ray_dir)) for p in processes_mentioning(m)]

        for pid in alive():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in alive():
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
