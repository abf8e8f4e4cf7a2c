"""A real MQTT broker for tests: started on a free loopback port, stoppable, restartable.

mosquitto when it is installed; otherwise the embedded amqtt broker (simulators/broker.py), which
speaks MQTT 3.1.1 only: ``broker.protocols`` says which versions the broker speaks, and a test
that needs MQTT 5 calls ``require_protocol(broker, "5")`` to skip itself on the embedded broker.
``EDGE_AGENT_TEST_BROKER=embedded`` (or ``mosquitto``) forces the choice.

The machine's own broker on 127.0.0.1:1883 is never touched: each test broker gets its own port,
configuration, persistence directory and log under the test's temporary directory.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from simulators.broker import EmbeddedBroker, free_port

__all__ = ["Broker", "EmbeddedBroker", "broker", "free_port", "has_mosquitto", "require_protocol"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    """One mosquitto process bound to 127.0.0.1:``port``; keeps its port across restarts."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    acl: str | None = None  # mosquitto ACL file content; anonymous rules come first
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


def require_protocol(b: Broker | EmbeddedBroker, protocol: str) -> None:
    """Skip the calling test when the broker does not speak ``protocol`` ("5" or "3.1.1")."""
    if protocol not in b.protocols:
        pytest.skip(f"the {type(b).__name__} speaks MQTT {', '.join(b.protocols)}, not {protocol}")


def _use_mosquitto() -> bool:
    choice = os.environ.get("EDGE_AGENT_TEST_BROKER", "")
    if choice not in ("", "mosquitto", "embedded"):
        pytest.fail(f"EDGE_AGENT_TEST_BROKER must be mosquitto or embedded (got {choice!r})")
    if choice == "mosquitto" and not has_mosquitto():
        pytest.fail("mosquitto is not installed: .ci/run installs it (apt-get install mosquitto)")
    return choice != "embedded" and has_mosquitto()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker | EmbeddedBroker]:
    """A fresh broker on a free port, stopped at the end of the test.

    mosquitto first; the embedded amqtt broker when mosquitto is not installed.
    """
    b: Broker | EmbeddedBroker = (
        Broker(tmp_path / "broker") if _use_mosquitto() else EmbeddedBroker(tmp_path / "broker")
    )
    b.start()
    try:
        yield b
    finally:
        b.stop()
