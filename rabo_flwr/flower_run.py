"""``flwr`` in a private Flower home: run an app, read its real status, stop what it started.

``flwr run`` exits 0 even when the run fails, and its local SuperLink outlives the run. A
:class:`FlowerHome` gives tests, the experiment harness, the benchmark and the deployment helper
one place that: sets the offline environment (``offline.env``), uses its own
``FLWR_HOME``/``HOME``/``RAY_TMPDIR``/``TMPDIR`` and ports, runs ``flwr run`` and reads the final
status with ``flwr ls --format json``, and stops every process started in that home, by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .processes import free_port, processes_marked, stop_processes
from .scenario import APP_DIR

FLWR = str(Path(sys.executable).with_name("flwr"))  # the CLI of this environment, not whatever is on PATH


def offline_env(path: Path = APP_DIR / "offline.env") -> dict[str, str]:
    """The literal ``export KEY=VALUE`` lines of ``offline.env``: the one list of offline variables."""
    pattern = re.compile(r"^export ([A-Z_][A-Z0-9_]*)=([^$\s]+)\s*(#.*)?$")
    return {m.group(1): m.group(2) for line in path.read_text().splitlines() if (m := pattern.match(line))}


class RunFailed(RuntimeError):
    """The run did not finish with status ``finished:completed``."""


@dataclass
class RunOutcome:
    run_id: str
    status: str
    details: dict[str, Any]
    log: str


def format_config(values: Mapping[str, Any]) -> str:
    """``{"a.b": 1, "c": "x"}`` -> ``a.b=1 c="x"`` (TOML values, as ``flwr run`` expects)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in values.items())


class FlowerHome:
    """A private Flower home with its own local SuperLink ports; a context manager that cleans up.

    ``env`` adds to the offline environment (e.g. ``RABO_DATA_DIR``); every process started
    here, and every process Flower starts from them, inherits it.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        for name in ("home", "flwr", "tmp"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay under 107 bytes, so its temp dir is short, beside the rest
        self.ray_dir = Path(tempfile.mkdtemp(prefix="rabo-ray-", dir="/tmp"))
        self.flwr_home = self.workdir / "flwr"
        self.env = dict(os.environ) | offline_env() | {
            "HOME": str(self.workdir / "home"),
            "FLWR_HOME": str(self.flwr_home),
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

    def run(self, app_dir: Path, connection: str | None = None, run_config: Mapping[str, Any] | None = None,
            federation_config: Mapping[str, Any] | None = None, timeout: float = 1800) -> RunOutcome:
        """``flwr run APP [CONNECTION] --stream``; the outcome as ``flwr ls`` reports it afterwards.

        Without ``connection`` the run goes to Flower's local SuperLink (simulation).
        """
        target = [str(app_dir)] + ([connection] if connection else [])
        args = ["run", *target, "--stream"]
        if run_config:
            args += ["--run-config", format_config(run_config)]
        if federation_config:
            args += ["--federation-config", format_config(federation_config)]
        done = self.flwr(*args, timeout=timeout, cwd=app_dir)
        log = done.stdout + done.stderr
        listing = self.flwr("ls", *([connection] if connection else []), "--format", "json", cwd=app_dir)
        try:
            latest = max(json.loads(listing.stdout)["runs"], key=lambda r: r.get("pending-at", ""))
        except (ValueError, KeyError) as err:
            raise RunFailed(f"`flwr ls` gave no run list ({listing.stdout!r} {listing.stderr!r}); run log:\n{log}") from err
        return RunOutcome(str(latest["run-id"]), latest["status"], latest, log)

    def leftovers(self) -> list[int]:
        """Processes still running in this home (the SuperLink, Ray, app processes)."""
        return sorted(set(processes_marked(str(self.workdir))) | set(processes_marked(str(self.ray_dir))))

    def close(self) -> None:
        """Stop every process started in this home, with its descendants."""
        stop_processes(self.leftovers())
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def __enter__(self) -> "FlowerHome":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
