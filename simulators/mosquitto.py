"""mosquitto as a child process: on a loopback port, stoppable, restartable, optionally bridged.

The tests' broker fixture and the fault suite use it. Each broker gets its own port, configuration,
persistence directory and log under a working directory; the machine's own broker on
127.0.0.1:1883 is never touched. A broker with a ``bridge`` forwards the agent's topics to a second
("plant") broker and the MES's commands back, as a line broker does in a plant topology.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from simulators.broker import free_port

__all__ = ["MOSQUITTO", "Bridge", "Broker", "has_mosquitto"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class Bridge:
    """A mosquitto bridge to the broker at ``host:port``: ``out`` topic patterns are forwarded to
    it, ``into`` patterns are brought back, both at QoS 1 with a persistent bridge session (a
    link that is cut keeps what it has to forward, and resumes)."""

    host: str
    port: int
    out: tuple[str, ...]
    into: tuple[str, ...]
    name: str = "plant"

    def config(self) -> str:
        lines = [
            f"connection {self.name}",
            f"address {self.host}:{self.port}",
            f"remote_clientid bridge-{self.name}",
            "cleansession false",
            "keepalive_interval 5",
            "restart_timeout 1 2",
            "start_type automatic",
            "bridge_protocol_version mqttv311",
            *(f"topic {t} out 1" for t in self.out),
            *(f"topic {t} in 1" for t in self.into),
        ]
        return "".join(f"{line}\n" for line in lines)


@dataclass
class Broker:
    """One mosquitto process bound to 127.0.0.1:``port``; keeps its port across restarts."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    acl: str | None = None  # mosquitto ACL file content; anonymous rules come first
    bridge: Bridge | None = None  # forward topics to (and from) another broker
    process: subprocess.Popen[bytes] | None = None

    protocols: ClassVar[tuple[str, ...]] = ("5", "3.1.1")

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def _write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            # started as root, mosquitto drops to its own user and cannot read the test's files
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir / 'data'}/\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 0\n"
        )
        if self.bridge is not None:
            with self.config_file.open("a") as f:
                f.write(self.bridge.config())
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl)
            with self.config_file.open("a") as f:
                f.write(f"acl_file {acl_file}\n")

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None, "already running"
        self._write_config()
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                if self.process.stderr:
                    self.process.stderr.close()
                self.process = None
                raise RuntimeError(f"mosquitto exited at start-up: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} in {timeout} s")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); its port is free again when this returns."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def has_mosquitto() -> bool:
    return Path(MOSQUITTO).is_file()
