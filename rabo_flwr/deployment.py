"""A real Flower deployment on this machine: one SuperLink, SuperNodes, ``flwr run``, clean stop.

Simulation runs every client inside one Ray cluster; a deployment runs each client in its own
``flower-supernode`` process, as on edge devices, with its capacity announced in its node
config. This module starts those processes on 127.0.0.1 in a private
:class:`~rabo_flwr.flower_run.FlowerHome` (offline environment, run-and-status, cleanup), names
the SuperLink in that home's ``config.toml`` (deployments are named there, not in
pyproject.toml), and stops every process it started, with their descendants.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

from .files import atomic_write
from .flower_run import FLWR, FlowerHome, RunOutcome, format_config
from .processes import free_port, stop_processes

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
    # start from Flower's own default, so `flwr run` without a name still finds "local"
    text = path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
    current = tomllib.loads(text).get("superlink", {}).get(name)
    if current == entry:
        return
    if current is not None:
        raise ValueError(f"{path} already defines [superlink.{name}] as {current}; choose another name")
    lines = [f"\n[superlink.{json.dumps(name)}]"] + [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    atomic_write(path, lambda file: file.write(text + "\n".join(lines) + "\n"), "w")


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

    ``env`` adds to the home's offline environment, e.g. ``RABO_DATA_DIR``; every process
    started here (and the ServerApp and ClientApp processes Flower starts from them) inherits it.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None, connection: str = "local-deployment"):
        self.home = FlowerHome(workdir, {"PYTHONUNBUFFERED": "1", **(env or {})})
        self.connection = connection  # the SuperLink's name in config.toml: `flwr run APP CONNECTION`
        self.flwr_home = self.home.flwr_home
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
        """``flwr run APP CONNECTION --stream``; the outcome as ``flwr ls CONNECTION`` reports it."""
        return self.home.run(app_dir, self.connection, run_config, timeout=timeout)

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(s.log_tail(chars) for s in self.services)

    def leftovers(self) -> list[int]:
        """Processes still running in this deployment's Flower home."""
        return self.home.leftovers()

    def close(self) -> None:
        """Stop every started process and its descendants, then whatever else still runs in the private home."""
        stop_processes([s.process.pid for s in self.services] + self.leftovers())
        for service in self.services:
            service.process.wait(timeout=5)  # reap our own children
        self.home.close()

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
