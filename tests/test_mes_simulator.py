"""The MES simulator against a real broker: validated, deduplicated, exact, and persistent.

Messages are built with the contract's own models and published with a plain paho client at
QoS 1, the way the agent's uplink publishes them.
"""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import parse_config
from edge_agent.errors import InputError
from edge_agent.messages import (
    ExceptionCode,
    ExceptionMessage,
    LotMovement,
    MaterialConsumed,
    ProductionConfirmation,
    Severity,
    Trigger,
    encode,
    kind_of,
    message_id,
)
from edge_agent.uplink.mqtt import close_sockets
from simulators.mes import Counts, Ledger, MesSimulator, main
from tests.support.broker import Broker, EmbeddedBroker, free_port, require_protocol

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "line.toml"
BASE = "acme/hamburg/creams/line-1/line1-edge"  # the topic base of the example configuration
AGENT = "line1-edge"
ORDER = "ORD-1001"
T0 = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
TRIGGER = Trigger(
    source="filler-plc",
    signal="good",
    address="ns=2;s=Line1.Filler.Good",
    value="10",
    quality="good",
    source_time=T0,
    received_at=T0,
)

AnyBroker = Broker | EmbeddedBroker
Message = MaterialConsumed | ProductionConfirmation | ExceptionMessage


def _header(seq: int, kind: str) -> dict[str, Any]:
    return {
        "message_id": message_id(AGENT, ORDER, "0010", seq, kind, 0),
        "agent": AGENT,
        "site": "hamburg",
        "area": "creams",
        "line": "line-1",
        "work_centre": "filler-1",
        "sequence": seq,
        "created_at": T0,
    }


def consumed(seq: int, material: str, quantity: str, lot: str) -> MaterialConsumed:
    return MaterialConsumed(
        **_header(seq, "material-consumed"),
        order=ORDER,
        product="CREAM-50ML",
        bom_revision="B",
        operation="0010",
        material=material,
        quantity=Decimal(quantity),
        uom="kg",
        method="backflush",
        theoretical=Decimal(quantity),
        issued=Decimal(quantity),
        rule_version="1",
        lots=(LotMovement(lot=lot, material=material, quantity=Decimal(quantity)),),
        trigger=TRIGGER,
    )


def confirmed(seq: int, good: str, scrap: str) -> ProductionConfirmation:
    return ProductionConfirmation(
        **_header(seq, "production-confirmation"),
        order=ORDER,
        product="CREAM-50ML",
        bom_revision="B",
        operation="0010",
        good=Decimal(good),
        scrap=Decimal(scrap),
        uom="pc",
        cumulative_good=Decimal(good),
        cumulative_scrap=Decimal(scrap),
        trigger=TRIGGER,
    )


def exception(seq: int, code: ExceptionCode) -> ExceptionMessage:
    return ExceptionMessage(
        **_header(seq, "exception"),
        code=code,
        severity=Severity.WARNING,
        text=f"{code.value} on {ORDER}",
        order=ORDER,
    )


def topic_of(message: Message) -> str:
    return f"{BASE}/out/{kind_of(message).value}"


class Publisher:
    """The agent's side, reduced to a plain paho client publishing at QoS 1."""

    def __init__(self, broker: AnyBroker, protocol: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="agent-sim",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def message(self, message: Message) -> None:
        self.send(topic_of(message), encode(message))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@pytest.fixture(params=["5", "3.1.1"])
def protocol(request: pytest.FixtureRequest, broker: AnyBroker) -> str:
    value: str = request.param
    require_protocol(broker, value)
    return value


@pytest.fixture
def publisher(broker: AnyBroker, protocol: str) -> Iterator[Publisher]:
    p = Publisher(broker, protocol)
    yield p
    p.close()


def simulator(broker: AnyBroker, ledger: Path, protocol: str) -> MesSimulator:
    return MesSimulator(
        ledger,
        host=broker.host,
        port=broker.port,
        topic_base=BASE,
        protocol="5" if protocol == "5" else "3.1.1",
    )


@pytest.fixture
def mes(broker: AnyBroker, tmp_path: Path, protocol: str) -> Iterator[MesSimulator]:
    with simulator(broker, tmp_path / "mes.db", protocol) as m:
        yield m


def test_every_kind_lands_in_the_ledger_and_the_totals_are_exact(
    mes: MesSimulator, publisher: Publisher
) -> None:
    messages: list[Message] = [
        consumed(1, "WATER", "0.1", "LOT-W1"),
        consumed(2, "WATER", "0.1", "LOT-W1"),
        consumed(3, "WATER", "0.1", "LOT-W1"),
        consumed(4, "GLYCERIN", "2.5", "LOT-G7"),
        consumed(5, "GLYCERIN", "-0.5", "LOT-G7"),  # a correction
        confirmed(6, "10", "1"),
        confirmed(7, "5", "0"),
        exception(8, ExceptionCode.LOT_HELD),
        exception(9, ExceptionCode.LOT_HELD),
        exception(10, ExceptionCode.SIGNAL_QUALITY),
    ]
    for message in messages:
        publisher.message(message)
    mes.wait_for(len(messages))

    assert mes.counts() == Counts(received=10, duplicates=0, rejected=0, conflicts=0)
    consumption = mes.consumption()
    assert consumption == {
        (ORDER, "WATER", "kg"): Decimal("0.3"),
        (ORDER, "GLYCERIN", "kg"): Decimal("2.0"),
    }
    assert (
        str(consumption[ORDER, "WATER", "kg"]) == "0.3"
    )  # 0.1 three times, not 0.30000000000000004
    assert mes.lot_movements() == {
        (ORDER, "LOT-W1", "WATER"): Decimal("0.3"),
        (ORDER, "LOT-G7", "GLYCERIN"): Decimal("2.0"),
    }
    assert mes.confirmations() == {(ORDER, "0010"): (Decimal(15), Decimal(1))}
    assert mes.exceptions() == {"lot_held": 2, "signal_quality": 1}
    assert mes.received_by_kind() == {
        "material-consumed": 5,
        "production-confirmation": 2,
        "exception": 3,
    }
    assert mes.errors == 0


def test_a_repeated_message_id_counts_once_and_is_recorded_as_a_duplicate(
    mes: MesSimulator, publisher: Publisher
) -> None:
    first = consumed(1, "WATER", "0.1", "LOT-W1")
    publisher.message(first)
    publisher.message(first)  # a resend after a reconnect: the same id, the same message
    tampered = first.model_copy(update={"quantity": Decimal("0.2")})
    publisher.message(tampered)  # the same id with other content: a defect, counted apart
    mes.wait_for(lambda m: m.counts().duplicates == 2)

    assert mes.counts() == Counts(received=1, duplicates=2, rejected=0, conflicts=1)
    assert mes.consumption() == {(ORDER, "WATER", "kg"): Decimal("0.1")}
    assert mes.lot_movements() == {(ORDER, "LOT-W1", "WATER"): Decimal("0.1")}


def test_invalid_payloads_are_rejected_counted_and_the_simulator_keeps_working(
    mes: MesSimulator, publisher: Publisher
) -> None:
    good = consumed(1, "WATER", "0.1", "LOT-W1")
    topic = topic_of(good)
    as_float = json.loads(encode(good))
    as_float["quantity"] = 0.1  # a JSON number with a fraction: a float to most parsers
    missing = json.loads(encode(good))
    del missing["order"]
    publisher.send(topic, json.dumps(as_float).encode())
    publisher.send(topic, json.dumps(missing).encode())
    publisher.send(topic, b"this is not JSON {")
    publisher.send(f"{BASE}/out/exception", encode(good))  # right message, wrong topic kind
    publisher.message(good)
    mes.wait_for(lambda m: m.counts().received == 1 and m.counts().rejected == 4)

    assert mes.counts() == Counts(received=1, duplicates=0, rejected=4, conflicts=0)
    errors = [r.error for r in mes.rejections()]
    assert "quantity" in errors[0]
    assert "never JSON numbers" in errors[0]
    assert "order" in errors[1]
    assert "Field required" in errors[1]
    assert "Invalid JSON" in errors[2]
    assert "does not match" in errors[3]
    assert mes.rejections()[2].payload == b"this is not JSON {"
    assert mes.consumption() == {(ORDER, "WATER", "kg"): Decimal("0.1")}
    assert mes.errors == 0


def test_the_persistent_session_queues_while_the_simulator_is_away(
    broker: AnyBroker, publisher: Publisher, tmp_path: Path, protocol: str
) -> None:
    ledger = tmp_path / "mes.db"
    with simulator(broker, ledger, protocol) as mes:
        publisher.message(consumed(1, "WATER", "0.1", "LOT-W1"))
        mes.wait_for(1)
    # the MES is away: the broker queues for its session
    publisher.message(consumed(2, "WATER", "0.1", "LOT-W1"))
    publisher.message(consumed(3, "WATER", "0.1", "LOT-W1"))
    with simulator(broker, ledger, protocol) as mes:  # a new process would do the same
        mes.wait_for(3)
        assert mes.counts() == Counts(received=3, duplicates=0, rejected=0, conflicts=0)
        assert mes.consumption() == {(ORDER, "WATER", "kg"): Decimal("0.3")}


def test_mes_ack_acknowledges_every_recorded_id_and_no_rejected_one(
    broker: AnyBroker, publisher: Publisher, tmp_path: Path, protocol: str
) -> None:
    acks: queue.Queue[list[str]] = queue.Queue()
    subscribed = threading.Event()
    watcher = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="agent-acks",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )
    watcher.on_subscribe = lambda *_: subscribed.set()
    watcher.on_message = lambda _c, _u, m: acks.put(json.loads(m.payload)["message_ids"])
    watcher.connect(broker.host, broker.port, keepalive=10)
    watcher.loop_start()
    watcher.subscribe(f"{BASE}/in/mes-ack", qos=1)
    try:
        assert subscribed.wait(5)
        first = consumed(1, "WATER", "0.1", "LOT-W1")
        second = consumed(2, "WATER", "0.1", "LOT-W1")
        with MesSimulator(
            tmp_path / "mes.db",
            host=broker.host,
            port=broker.port,
            topic_base=BASE,
            protocol="5" if protocol == "5" else "3.1.1",
            mes_ack=True,
        ) as mes:
            publisher.message(first)
            publisher.message(first)  # acknowledged again: the agent missed the first ack
            publisher.send(topic_of(second), b"not JSON")  # rejected: never acknowledged
            publisher.message(second)
            got = [acks.get(timeout=10) for _ in range(3)]
            assert mes.acks_sent == 3
        assert got == [[first.message_id], [first.message_id], [second.message_id]]
    finally:
        watcher.disconnect()
        watcher.loop_stop()
        close_sockets(watcher)


def test_for_agent_takes_broker_protocol_topics_and_delivery_from_the_config(
    broker: AnyBroker, tmp_path: Path
) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    data["mqtt"].update(
        {"host": broker.host, "port": broker.port, "protocol": "3.1.1", "delivery": "mes-ack"}
    )
    config = parse_config(data)
    mes = MesSimulator.for_agent(config, tmp_path / "mes.db", client_id="mes-2")
    assert (mes.host, mes.port, mes.protocol) == (broker.host, broker.port, "3.1.1")
    assert mes.topic_filter == f"{BASE}/out/#"
    assert mes.ack_topic == f"{BASE}/in/mes-ack"
    assert mes.client_id == "mes-2"
    mes.close()


def test_mes_ack_needs_the_topic_base(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mes_ack needs topic_base"):
        MesSimulator(tmp_path / "mes.db", topic_filter="a/#", mes_ack=True)


def test_wait_for_raises_timeout_error_with_the_counts(mes: MesSimulator) -> None:
    with pytest.raises(TimeoutError, match="received=0"):
        mes.wait_for(1, timeout=0.2)


def test_start_times_out_when_no_broker_listens(tmp_path: Path) -> None:
    mes = MesSimulator(tmp_path / "mes.db", port=free_port(), topic_base=BASE)
    with pytest.raises(TimeoutError, match="not subscribed"):
        mes.start(timeout=0.5)
    assert not mes.connected
    mes.close()


# ---------------------------------------------------------------------------------------- CLI


def test_report_prints_the_totals_of_an_existing_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = Ledger(tmp_path / "mes.db")
    for seq in (1, 2, 3):
        message = consumed(seq, "WATER", "0.1", "LOT-W1")
        assert ledger.record(topic_of(message), encode(message)).outcome == "new"
    ledger.close()
    assert main(["--report", "--ledger", str(tmp_path / "mes.db")]) == 0
    out = capsys.readouterr().out
    assert "Consumption" in out
    assert "0.3" in out
    assert "LOT-W1" in out


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--broker", "localhost", "--topic-base", BASE], "--broker: expected HOST:PORT"),
        (["--broker", "127.0.0.1:99999", "--topic-base", BASE], "port 1..65535"),
        ([], "give --topic-base"),
        (["--topic-base", "acme/+/x"], "wildcards"),
        (["--protocol", "4", "--topic-base", BASE], "invalid choice"),
        (["--report"], "no such file"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--ledger", str(tmp_path / "missing.db")])
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_report_refuses_a_file_that_is_not_a_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.db"
    other.write_text("not a database")
    with pytest.raises(SystemExit) as exit_info:
        main(["--report", "--ledger", str(other)])
    assert exit_info.value.code == 2
    assert "not an SQLite database" in capsys.readouterr().err


def _received_any(ledger: Path) -> bool:
    try:
        return Ledger.existing(ledger).counts().received > 0
    except (InputError, sqlite3.Error):
        return False  # not created yet


def test_run_until_interrupted_then_print_the_totals(broker: AnyBroker, tmp_path: Path) -> None:
    protocol = broker.protocols[0]
    ledger = tmp_path / "mes.db"
    command = [
        sys.executable,
        "-m",
        "simulators.mes",
        "--broker",
        f"{broker.host}:{broker.port}",
        "--topic-base",
        BASE,
        "--ledger",
        str(ledger),
        "--protocol",
        protocol,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        publisher = Publisher(broker, protocol)
        try:
            # the simulator subscribes in its own time: publish until a message arrives
            deadline = time.monotonic() + 20
            sent = 0
            while not _received_any(ledger):
                assert process.poll() is None, "the MES simulator exited"
                assert time.monotonic() < deadline, "the MES simulator received nothing"
                sent += 1
                publisher.message(consumed(sent, "WATER", "0.1", "LOT-W1"))
                time.sleep(0.1)
        finally:
            publisher.close()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "Messages" in text
    assert "Consumption" in text
    assert "WATER" in text
