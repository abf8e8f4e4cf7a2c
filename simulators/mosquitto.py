"""mosquitto as a child process: on a loopback port, stoppable, restartable, optionally bridged.

The tests' broker fixture and the fault suite use it. Each broker gets its own port, configuration,
persistence directory and log under a working directory; the machine's own broker on
127.0.0.1:1883 is never touched. A broker with a ``bridge`` forwards the agent's topics to a second
("plant") broker and the MES's commands back, as a line broker does in a plant topology.

The security tests give a broker a TLS listener (``tls``), accounts (``users``, written to a
password file with ``mosquitto_passwd``), ``allow_anonymous = False`` and an ACL; or the whole
configuration (``config_text``), to prove an example configuration starts.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from simulators.broker import free_port

__all__ = ["MOSQUITTO", "MOSQUITTO_PASSWD", "Bridge", "Broker", "BrokerTls", "has_mosquitto"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the broker's certificate and key, the CA that client certificates must
    chain to, and whether a client must present one (``use_identity_as_username``: its
    certificate's CN is then its user name, for the ACL)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False

    def config(self) -> str:
        lines = [
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"require_certificate {str(self.require_certificate).lower()}",
            f"use_identity_as_username {str(self.use_identity_as_username).lower()}",
        ]
        return "".join(f"{line}\n" for line in lines)


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
    tls: BrokerTls | None = None  # the listener speaks TLS only
    users: Mapping[str, str] | None = None  # user name → password: a password file
    allow_anonymous: bool = True
    #: the whole mosquitto.conf instead of the options above (a ``user`` line is put first)
    config_text: str | None = None
    process: subprocess.Popen[bytes] | None = None

    protocols: ClassVar[tuple[str, ...]] = ("5", "3.1.1")

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        # started as root, mosquitto drops to its own user and cannot read the test's files
        user = f"user {getpass.getuser()}\n"
        if self.config_text is not None:
            self.config_file.write_text(user + self.config_text)
            return
        self.config_file.write_text(
            user + f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {str(self.allow_anonymous).lower()}\n"
            "persistence true\n"
            f"persistence_location {self.workdir / 'data'}/\n"
            f"log_dest file {self.log_file}\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 0\n"
        )
        if self.tls is not None:
            with self.config_file.open("a") as f:
                f.write(self.tls.config())
        if self.users is not None:
            password_file = self.workdir / "passwd"
            write_password_file(password_file, self.users)
            with self.config_file.open("a") as f:
                f.write(f"password_file {password_file}\n")
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


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """A mosquitto password file (hashed by ``mosquitto_passwd``) for ``users``."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for name, password in users.items():
        # -b takes the password as an argument: fine for a test broker, not for a real one
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(path), name, password],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )


def has_mosquitto() -> bool:
    return Path(MOSQUITTO).is_file()
