"""A real mosquitto broker for tests: started on a free loopback port, stoppable, restartable.

The machine's own broker on 127.0.0.1:1883 is never touched: each test broker gets its own port,
configuration, persistence directory and log under the test's temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Broker:
    """One mosquitto process bound to 127.0.0.1:``port``; keeps its port across restarts."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def _write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir / 'data'}/\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 0\n"
        )

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
