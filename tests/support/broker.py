"""A real MQTT broker for tests: started on a free loopback port, stoppable, restartable.

mosquitto when it is installed; otherwise the embedded amqtt broker (simulators/broker.py), which
speaks MQTT 3.1.1 only: ``broker.protocols`` says which versions the broker speaks, and a test
that needs MQTT 5 calls ``require_protocol(broker, "5")`` to skip itself on the embedded broker.
``EDGE_AGENT_TEST_BROKER=embedded`` (or ``mosquitto``) forces the choice.

The machine's own broker on 127.0.0.1:1883 is never touched: each test broker gets its own port,
configuration, persistence directory and log under the test's temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.broker import EmbeddedBroker, free_port
from simulators.mosquitto import Broker, has_mosquitto

__all__ = ["Broker", "EmbeddedBroker", "broker", "free_port", "has_mosquitto", "require_protocol"]


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
