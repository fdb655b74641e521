"""A real Flower deployment on this machine: one SuperLink, SuperNodes, ``flwr run``, clean stop.

Simulation (:class:`rabo_flwr.flower_run.LocalFederation`) runs every client inside one Ray
cluster; a deployment runs each client in its own ``flower-supernode`` process, as on edge
devices, with its capacity announced in its node config. This module starts those processes on
127.0.0.1 in LocalFederation's private Flower home and offline environment, names the SuperLink
in that home's ``config.toml`` (deployments are named there, not in pyproject.toml), reads a
run's real status with ``flwr ls`` (``flwr run`` exits 0 even when the run fails), and stops
every process it started by pid, with their descendants: Flower starts each SuperExec in a new
session, so neither a process group nor a command line finds them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

from .flower_run import FLWR, LocalFederation, RunFailed, RunOutcome, ancestors, format_config, free_port, processes_mentioning

FLOWER_SUPERLINK = str(Path(FLWR).with_name("flower-superlink"))
FLOWER_SUPERNODE = str(Path(FLWR).with_name("flower-supernode"))
HOST = "127.0.0.1"


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and the SuperLink's certificate and key (``scripts/make_test_certs.sh``)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> "TlsFiles":
        """The file names ``scripts/make_test_certs.sh`` writes."""
        directory = Path(directory).resolve()
        return cls(directory / "ca.crt", directory / "server.pem", directory / "server.key")


@dataclass
class Service:
    """A started SuperLink or SuperNode: its process, its address and its log file."""

    name: str
    process: subprocess.Popen
    address: str
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} ({self.log}) ---\n" + self.log.read_text(errors="replace")[-chars:]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Add ``[superlink.NAME]`` to ``FLWR_HOME/config.toml`` so ``flwr run APP NAME`` reaches ``address``.

    ``address`` is the SuperLink's Control API (in Flower 1.41 the same HTTP port as its Fleet
    API). Without ``root_certificates`` the connection is insecure (plain HTTP).
    """
    path = Path(flwr_home) / "config.toml"
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())  # flwr wants an absolute path
    if not path.exists():  # start from Flower's own default, so `flwr run` without a name still finds "local"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DEFAULT_FLOWER_CONFIG_TOML)
    existing = tomllib.loads(path.read_text())
    current = existing.get("superlink", {}).get(name)
    if current == entry:
        return
    if current is not None:
        raise ValueError(f"{path} already defines [superlink.{name}] as {current}; choose another name")
    lines = [f"\n[superlink.{json.dumps(name)}]"] + [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    with path.open("a") as file:
        file.write("\n".join(lines) + "\n")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (``/proc/PID/task/*/children`` is not always available)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def process_tree(pids: Iterable[int]) -> set[int]:
    """The pids and all their descendants (collected before a parent's death re-parents them)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie holds its pid until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids whose environment has ``key=value``: every descendant of a process we started inherits it."""
    marker = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_processes(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM the pids and their descendants, SIGKILL what is left after ``grace`` seconds."""
    tree = process_tree(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        tree |= process_tree(p for p in tree if _running(p))
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(_running(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(_running(p) for p in tree):
            return


def _wait_for_port(service: Service, timeout: float) -> None:
    host, port = service.address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode}\n{service.log_tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{service.name} did not listen on {service.address} within {timeout:.0f} s\n{service.log_tail()}")


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 in a private Flower home; a context manager that stops them.

    ``env`` adds to LocalFederation's offline environment, e.g. ``RABO_DATA_DIR``; every
    process started here (and the ServerApp and ClientApp processes Flower starts from them)
    inherits it.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None, connection: str = "local-deployment"):
        self.home = LocalFederation(workdir, {"PYTHONUNBUFFERED": "1", **(env or {})})
        self.connection = connection  # the SuperLink's name in config.toml: `flwr run APP CONNECTION`
        self.flwr_home = Path(self.home.env["FLWR_HOME"])
        self.logs = self.home.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.services: list[Service] = []

    def _start(self, name: str, args: list[str], address: str) -> Service:
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(args, env=self.home.env, cwd=self.home.workdir, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        service = Service(name, process, address, log)
        self.services.append(service)
        return service

    def start_superlink(self, tls: TlsFiles | None = None, supernode_auth: bool = False, timeout: float = 60) -> Service:
        """``flower-superlink`` (no ``--simulation``) on a free port, named ``self.connection`` in config.toml.

        One HTTP port serves the Fleet API (SuperNodes), the Control API (``flwr``) and the
        ServerApp's runtime API. ``supernode_auth`` admits only SuperNodes whose public key was
        registered with ``flwr supernode register`` (Flower requires TLS for it).
        """
        port = free_port()
        args = [FLOWER_SUPERLINK, "--host", HOST, "--port", str(port)]
        args += ["--insecure"] if tls is None else [
            "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if supernode_auth:
            args.append("--enable-supernode-auth")
        service = self._start("superlink", args, f"{HOST}:{port}")
        _wait_for_port(service, timeout)
        write_connection(self.flwr_home, self.connection, service.address, tls.ca if tls else None)
        return service

    def register_supernode(self, public_key: Path) -> None:
        """``flwr supernode register``: admit the SuperNode holding the matching private key."""
        done = self.home.flwr("supernode", "register", str(public_key), self.connection)
        if done.returncode != 0:
            raise RuntimeError(f"`flwr supernode register {public_key}` failed: {done.stdout}{done.stderr}")

    def start_supernode(self, superlink: Service, node_config: Mapping[str, Any], root_certificates: Path | None = None,
                        auth_private_key: Path | None = None) -> Service:
        """``flower-supernode`` connected to ``superlink``, with its own free runtime API port.

        ``node_config`` is what the ClientApp reads from ``context.node_config``
        (``partition-id``, ``capacity``).
        """
        port = free_port()
        args = [FLOWER_SUPERNODE, "--superlink", superlink.address, "--host", HOST, "--port", str(port),
                "--node-config", format_config(node_config)]
        args += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
        if auth_private_key is not None:
            args += ["--auth-supernode-private-key", str(auth_private_key)]
        number = sum(s.name.startswith("supernode") for s in self.services)
        return self._start(f"supernode-{number}", args, f"{HOST}:{port}")

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink sees online (``flwr supernode ls``)."""
        listing = self.home.flwr("supernode", "ls", self.connection, "--format", "json")
        try:
            nodes = json.loads(listing.stdout)["nodes"]
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"`flwr supernode ls` gave no node list: {listing.stdout!r} {listing.stderr!r}") from err
        return sum(node.get("status") == "online" for node in nodes)

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        """Fail early, with the logs, if SuperNodes die or never connect (the run would wait for them)."""
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            dead = [s for s in self.services if s.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{count} SuperNodes not online (exited: {[s.name for s in dead]})\n{self.logs_tail()}")
            time.sleep(1)

    def run(self, app_dir: Path, run_config: Mapping[str, Any] | None = None, timeout: float = 1800) -> RunOutcome:
        """``flwr run APP CONNECTION --stream``; returns the outcome read back with ``flwr ls CONNECTION``."""
        args = ["run", str(app_dir), self.connection, "--stream"]
        if run_config:
            args += ["--run-config", format_config(run_config)]
        done = self.home.flwr(*args, timeout=timeout, cwd=app_dir)
        log = done.stdout + done.stderr
        listing = self.home.flwr("ls", self.connection, "--format", "json")
        try:
            latest = max(json.loads(listing.stdout)["runs"], key=lambda r: r.get("pending-at", ""))
        except (ValueError, KeyError) as err:
            raise RunFailed(f"`flwr ls` gave no run list ({listing.stdout!r} {listing.stderr!r}); run log:\n{log}") from err
        return RunOutcome(str(latest["run-id"]), latest["status"], latest, log)

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(s.log_tail(chars) for s in self.services)

    def leftovers(self) -> list[int]:
        """Processes still running in this deployment's Flower home (by environment or command line).

        Our own ancestors are left out: the command that started us may name the work directory.
        """
        pids = set(processes_with_env("FLWR_HOME", str(self.flwr_home))) | set(processes_mentioning(str(self.home.workdir)))
        return sorted(p for p in pids - ancestors() if _running(p))

    def close(self) -> None:
        """Stop every started process and its descendants, then whatever else still runs in the private home."""
        stop_processes([s.process.pid for s in self.services] + self.leftovers())
        for service in self.services:
            service.process.wait(timeout=5)  # reap our own children
        shutil.rmtree(self.home.ray_dir, ignore_errors=True)  # LocalFederation's; a deployment starts no Ray

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
