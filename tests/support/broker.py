"""A real mosquitto broker for tests: started on a free loopback port, stoppable, restartable.

The machine's own broker on 127.0.0.1:1883 is never touched: each test broker gets its own port,
configuration, persistence directory and log under the test's temporary directory.
"""

from __future__ import annotations

import getpass
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be handed to an outgoing
    connection while the broker is stopped, e.g. a client's reconnect attempt, and then the
    restarted broker finds its own port taken ("Address already in use").
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low - 1))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


@dataclass
class Broker:
    """One mosquitto process bound to 127.0.0.1:``port``; keeps its port across restarts."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    acl: str | None = None  # mosquitto ACL file content; anonymous rules come first
    process: subprocess.Popen[bytes] | None = None

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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto on a free port, stopped at the end of the test."""
    if not has_mosquitto():
        pytest.fail("mosquitto is not installed: .ci/run installs it (apt-get install mosquitto)")
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()
