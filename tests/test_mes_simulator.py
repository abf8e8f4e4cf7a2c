"""The MES simulator against a real broker: validated, deduplicated, exact, and persistent.

Messages are built with the contract's own models and published with a plain paho client at
QoS 1, the way the agent's uplink publishes them.
"""

from __future__ import annotations

import contextlib
import io
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
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from edge_agent.commands import (
    CommandRejected,
    Heartbeat,
    LotStagingCommand,
    MasterDataCommand,
    ReversalCommand,
    Signing,
    WorkOrderCommand,
    parse_command,
    signature_problem,
)
from edge_agent.config import parse_config
from edge_agent.errors import InputError
from edge_agent.messages import (
    CommandReply,
    ExceptionCode,
    ExceptionMessage,
    Genealogy,
    GenealogyLink,
    LotMovement,
    MaterialConsumed,
    OrderVariance,
    ProductionConfirmation,
    Reversal,
    Severity,
    Trigger,
    VarianceLine,
    encode,
    kind_of,
    message_id,
)
from edge_agent.uplink.mqtt import close_sockets
from simulators.mes import LEDGER_VERSION, Counts, Ledger, MesSimulator, main, report_tables
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
Message = (
    MaterialConsumed
    | ProductionConfirmation
    | ExceptionMessage
    | CommandReply
    | OrderVariance
    | Genealogy
)


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


def exception(
    seq: int,
    code: ExceptionCode,
    severity: Severity = Severity.WARNING,
    resolves: str | None = None,
) -> ExceptionMessage:
    return ExceptionMessage(
        **_header(seq, "exception"),
        code=code,
        severity=severity,
        text=f"{code.value} on {ORDER}",
        order=ORDER,
        resolves=resolves,
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
        (["--broker", "localhost", "--topic-base", BASE], "--broker: must be HOST:PORT"),
        (["--broker", "127.0.0.1:99999", "--topic-base", BASE], "port from 1 to 65535"),
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


# ------------------------------------------------------------- the MES contract of issue 5


def reversal_of(seq: int, original: MaterialConsumed) -> MaterialConsumed:
    """The agent's compensating posting for ``original``: the same lots, negated."""
    return consumed(
        seq, original.material, str(-original.quantity), original.lots[0].lot
    ).model_copy(
        update={
            "reverses": original.message_id,
            "reversal": Reversal(command_id="rev-1", reason_code="wrong_lot", requested_by="qa"),
        }
    )


def reply(
    seq: int,
    command_id: str | None,
    result: Literal["accepted", "rejected"] = "accepted",
    *,
    command: str = "work-order",
    reason: str | None = None,
    duplicate: bool = False,
    produced: tuple[str, ...] = (),
) -> CommandReply:
    return CommandReply(
        **_header(seq, "command-reply"),
        command_id=command_id,
        command=command,
        result=result,
        reason=reason,
        duplicate=duplicate,
        produced=produced,
    )


def variance(seq: int, order: str = ORDER) -> OrderVariance:
    line = VarianceLine(
        operation="0010",
        material="WATER",
        uom="kg",
        method="backflush",
        planned=Decimal("10"),
        theoretical=Decimal("10.2"),
        issued=Decimal("10.35"),
        substituted=Decimal(0),
        held=Decimal(0),
        residual=None,
        actual=None,
        variance=Decimal("0.35"),
        variance_pct=Decimal("3.5"),
        flagged=True,
    )
    return OrderVariance(
        **_header(seq, "variance"),
        order=order,
        product="CREAM-50ML",
        bom_revision="B",
        finished_lot="FG-1",
        planned_quantity=Decimal(1000),
        uom="pc",
        threshold_pct=Decimal(2),
        lines=(line,),
        command_id=f"close-{order}",
    )


def genealogy(seq: int, order: str = ORDER) -> Genealogy:
    return Genealogy(
        **_header(seq, "genealogy"),
        order=order,
        product="CREAM-50ML",
        bom_revision="B",
        finished_lot="FG-1",
        good=Decimal(1000),
        scrap=Decimal(2),
        uom="pc",
        components=(
            GenealogyLink(material="WATER", lot="LOT-W1", quantity=Decimal("10.35"), uom="kg"),
        ),
        command_id=f"close-{order}",
    )


class Watcher:
    """A plain paho subscriber (the agent's side of the commands): every delivery queued."""

    def __init__(self, broker: AnyBroker, protocol: str, topic: str) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="agent-commands",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.on_message(m.topic, bytes(m.payload))
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5), f"not subscribed to {topic}"

    def on_message(self, topic: str, payload: bytes) -> None:
        self.got.put((topic, payload))

    def take(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        return [self.got.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@pytest.fixture
def commands(broker: AnyBroker, protocol: str) -> Iterator[Watcher]:
    """What reaches ``{BASE}/in/#``."""
    w = Watcher(broker, protocol, f"{BASE}/in/#")
    yield w
    w.close()


def test_a_reversal_nets_to_zero_and_a_plain_posting_does_not(
    mes: MesSimulator, publisher: Publisher
) -> None:
    original = consumed(1, "WATER", "0.1", "LOT-W1")
    plain = consumed(2, "GLYCERIN", "2.5", "LOT-G7")
    compensating = reversal_of(3, original)
    for message in (original, plain, compensating):
        publisher.message(message)
    mes.wait_for(3)

    assert mes.net_of(original.message_id) == (Decimal(0), {("LOT-W1", "WATER"): Decimal(0)})
    assert mes.net_of(plain.message_id) == (
        Decimal("2.5"),
        {("LOT-G7", "GLYCERIN"): Decimal("2.5")},
    )
    assert mes.ledger.reversals() == {original.message_id: [compensating.message_id]}
    # the totals include the compensating posting
    assert mes.consumption() == {
        (ORDER, "WATER", "kg"): Decimal(0),
        (ORDER, "GLYCERIN", "kg"): Decimal("2.5"),
    }
    with pytest.raises(KeyError, match="no material-consumed message"):
        mes.net_of("not-a-posting")


def test_replies_are_recorded_parsed_and_waited_for(
    mes: MesSimulator, publisher: Publisher
) -> None:
    sent = [
        reply(1, "cmd-1", produced=("msg-a", "msg-b")),
        reply(2, "cmd-2", "rejected", reason="order: unknown order ORD-9"),
        reply(3, "cmd-1", duplicate=True, produced=("msg-a", "msg-b")),
        reply(4, None, "rejected", command="lot-staging", reason="payload: malformed JSON"),
    ]
    for message in sent:
        publisher.message(message)

    assert mes.wait_reply("cmd-2", timeout=5) == sent[1]
    first, again = mes.wait_replies("cmd-1", 2, timeout=5)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.produced == ("msg-a", "msg-b")
    mes.wait_for(4)
    assert mes.replies() == sent  # parsed models, in arrival order
    assert mes.ledger.reply_counts() == {"accepted": 2, "rejected": 2, "duplicates": 1}
    with pytest.raises(TimeoutError, match=r"command 'cmd-404'.*cmd-1 work-order accepted"):
        mes.wait_reply("cmd-404", timeout=0.1)


def test_open_exceptions_drop_a_resolved_one(mes: MesSimulator, publisher: Publisher) -> None:
    held = exception(1, ExceptionCode.LOT_HELD)
    quality = exception(2, ExceptionCode.SIGNAL_QUALITY)
    resolved = exception(3, ExceptionCode.LOT_HELD, Severity.INFO, resolves=held.message_id)
    recovered = exception(4, ExceptionCode.SOURCE_RECOVERED, Severity.INFO)  # one-shot
    for message in (held, quality, resolved, recovered):
        publisher.message(message)
    mes.wait_for(4)

    assert mes.open_exceptions() == [quality]
    assert mes.exceptions() == {"lot_held": 2, "signal_quality": 1, "source_recovered": 1}


def test_variances_and_genealogy_are_kept_by_order_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = Ledger(tmp_path / "mes.db")
    original = consumed(1, "WATER", "0.1", "LOT-W1")
    messages: list[Message] = [
        original,
        reversal_of(2, original),
        variance(3),
        variance(4, "ORD-1002"),
        genealogy(5),
        reply(6, "cmd-1"),
        reply(7, "cmd-1", duplicate=True),
        reply(8, "cmd-2", "rejected", reason="no"),
        exception(9, ExceptionCode.UNKNOWN_ORDER),
    ]
    for message in messages:
        assert ledger.record(topic_of(message), encode(message)).outcome == "new"
    ledger.close()

    assert ledger.variances(ORDER) == [messages[2]]
    assert ledger.variances() == messages[2:4]
    assert ledger.genealogy(ORDER) == [messages[4]]
    assert ledger.genealogy("ORD-1002") == []

    assert main(["--report", "--ledger", str(tmp_path / "mes.db")]) == 0
    out = capsys.readouterr().out
    for title in ("Commands", "Variances"):
        assert title in out
    console = Console(file=io.StringIO(), width=250)
    for table in report_tables(ledger):
        console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    rows = {" ".join(line.replace("│", " ").split()) for line in text.splitlines()}
    assert "replies accepted 2" in rows
    assert "replies rejected 1" in rows
    assert "of which duplicates 1" in rows
    assert "reversals 1" in rows
    assert "open exceptions 1" in rows
    assert f"{ORDER} 0010 WATER kg 10 10.2 10.35 0 0 - - 0.35 3.5 yes" in rows
    assert "ORD-1002 0010 WATER kg 10 10.2 10.35 0 0 - - 0.35 3.5 yes" in rows


def test_a_version_1_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE messages (message_id TEXT PRIMARY KEY)")
        db.execute("PRAGMA user_version = 1")
    with pytest.raises(
        InputError, match=f"ledger version 1, this simulator reads {LEDGER_VERSION}"
    ):
        Ledger(path)
    with pytest.raises(InputError, match="user_version 1"):
        Ledger.existing(path)


def _parsed(payload: bytes, topic: str) -> Any:
    command = parse_command(topic.rsplit("/", 1)[-1], payload)
    assert not isinstance(command, CommandRejected), command.reason
    return command


def test_every_command_helper_sends_a_command_the_contract_accepts(
    mes: MesSimulator, commands: Watcher
) -> None:
    sent = {
        "master": mes.master_data({"materials": [{"material": "WATER", "uom": "kg"}]}),
        "release": mes.release_order(
            ORDER, "CREAM-50ML", 1000, revision="B", finished_lot="FG-1", work_centre="filler-1"
        ),
        "start": mes.start_order(ORDER),
        "hold": mes.hold_order(ORDER, reason="QA check"),
        "close": mes.close_order(ORDER, remnants={"LOT-W1": Decimal("1.5")}),
        "stage": mes.stage_lot(
            "LOT-W1", "WATER", "25", expiry=T0, order=ORDER, work_centre="filler-1"
        ),
        "return": mes.return_lot("LOT-W1", "1.5"),
        "quarantine": mes.quarantine_lot("LOT-W1"),
        "release_lot": mes.release_lot("LOT-W1"),
        "rebin": mes.rebin_lot("LOT-W1", order="ORD-1002"),
        "reverse": mes.reverse("msg-1", "wrong_lot", "j.doe"),
        "resolve": mes.resolve_exception("exc-1", "discard", "glitch", "j.doe"),
        "heartbeat": mes.heartbeat(T0),
    }
    assert sent["heartbeat"] == ""
    ids = [command_id for command_id in sent.values() if command_id]
    assert len(set(ids)) == len(ids) == 12
    assert all(command_id.startswith(f"{mes.client_id}-") for command_id in ids)
    assert mes.commands_sent == 13

    received = {}
    for topic, payload in commands.take(13):
        command = _parsed(payload, topic)
        received[getattr(command, "command_id", None) or ""] = (
            topic.rsplit("/", 1)[-1],
            command,
        )
    got = {name: received[command_id] for name, command_id in sent.items()}

    kinds = {name: kind for name, (kind, _) in got.items()}
    assert kinds == {
        "master": "master-data",
        **dict.fromkeys(("release", "start", "hold", "close"), "work-order"),
        **dict.fromkeys(("stage", "return", "quarantine", "release_lot", "rebin"), "lot-staging"),
        "reverse": "reversal",
        "resolve": "exception-resolution",
        "heartbeat": "heartbeat",
    }
    master = got["master"][1]
    assert isinstance(master, MasterDataCommand)
    assert master.master_data == {"materials": [{"material": "WATER", "uom": "kg"}]}
    release = got["release"][1]
    assert isinstance(release, WorkOrderCommand)
    assert (release.action, release.product, release.quantity, release.revision) == (
        "release",
        "CREAM-50ML",
        Decimal(1000),
        "B",
    )
    assert (release.finished_lot, release.work_centre) == ("FG-1", "filler-1")
    assert [c.action for _, c in (got["start"], got["hold"])] == ["start", "hold"]  # type: ignore[attr-defined]
    assert got["hold"][1].reason == "QA check"
    close = got["close"][1]
    assert isinstance(close, WorkOrderCommand)
    assert [(r.lot, r.quantity) for r in close.remnants] == [("LOT-W1", Decimal("1.5"))]
    stage = got["stage"][1]
    assert isinstance(stage, LotStagingCommand)
    assert (stage.action, stage.material, stage.quantity, stage.expiry, stage.order) == (
        "staged",
        "WATER",
        Decimal(25),
        T0,
        ORDER,
    )
    assert (got["return"][1].action, got["return"][1].quantity) == ("returned", Decimal("1.5"))
    assert got["quarantine"][1].action == "quarantined"
    assert got["release_lot"][1].action == "released"
    rebin = got["rebin"][1]
    assert (rebin.action, rebin.order, rebin.work_centre) == ("rebinned", "ORD-1002", None)
    reverse = got["reverse"][1]
    assert isinstance(reverse, ReversalCommand)
    assert (reverse.message_id, reverse.reason_code, reverse.requested_by) == (
        "msg-1",
        "wrong_lot",
        "j.doe",
    )
    heartbeat = got["heartbeat"][1]
    assert isinstance(heartbeat, Heartbeat)
    assert heartbeat.mes_time == T0


def test_a_command_id_can_be_sent_again(mes: MesSimulator, commands: Watcher) -> None:
    assert mes.start_order(ORDER, command_id="cmd-7") == "cmd-7"
    assert mes.start_order(ORDER, command_id="cmd-7") == "cmd-7"
    (_, first), (_, again) = commands.take(2)
    assert first == again
    assert json.loads(first)["command_id"] == "cmd-7"


def test_send_raw_publishes_the_bytes_as_they_are(mes: MesSimulator, commands: Watcher) -> None:
    mes.send_raw("work-order", b"not JSON {")
    mes.send_raw("recipe", b"{}")
    got = commands.take(2)
    assert got == [(f"{BASE}/in/work-order", b"not JSON {"), (f"{BASE}/in/recipe", b"{}")]
    reasons = [parse_command(topic.rsplit("/", 1)[-1], payload) for topic, payload in got]
    assert [type(r) for r in reasons] == [CommandRejected, CommandRejected]
    assert "malformed JSON" in reasons[0].reason  # type: ignore[union-attr]
    assert "unknown command kind 'recipe'" in reasons[1].reason  # type: ignore[union-attr]


def test_send_needs_a_started_simulator_with_a_topic_base(tmp_path: Path) -> None:
    mes = MesSimulator(tmp_path / "mes.db", port=free_port(), topic_base=BASE)
    with pytest.raises(RuntimeError, match="not started"):
        mes.heartbeat()
    with pytest.raises(TypeError, match="not a command model"):
        mes.send(CommandRejected(kind="x", command_id=None, reason="no"))
    mes.close()
    listener = MesSimulator(tmp_path / "other.db", topic_filter=f"{BASE}/out/#")
    with pytest.raises(RuntimeError, match="no topic_base"):
        listener.start_order(ORDER)
    listener.close()


# ------------------------------------------------------------------------------- CLI send


def _send_argv(broker: str, *args: str) -> list[str]:
    return ["send", "--broker", broker, "--topic-base", BASE, *args]


@pytest.mark.parametrize(
    ("kind", "content", "complaint"),
    [
        ("work-order", None, "cannot read the command file"),
        ("work-order", "not JSON {", "not a JSON command"),
        ("work-order", "[1, 2]", "a command is a JSON object (got list)"),
        ("work-order", '{"action": "release", "order": "ORD-1"}', "product: required"),
        ("lot-staging", '{"action": "staged", "lot": "L", "quantity": 0.5}', "never JSON numbers"),
        ("heartbeat", '{"mes_time": "yesterday"}', "not a valid heartbeat command"),
    ],
)
def test_cli_send_with_a_bad_file_exits_2_naming_the_file_and_the_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    content: str | None,
    complaint: str,
) -> None:
    path = tmp_path / "command.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(_send_argv(f"127.0.0.1:{free_port()}", kind, str(path)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert complaint in err


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["recipe"], "unknown command kind 'recipe'"),
        (["--wait-reply", "5", "heartbeat"], "a heartbeat has no reply"),
        (["--wait-reply", "0", "work-order"], "must be above 0 s"),
        (["--signing-key-file", "/nonexistent/key", "heartbeat"], "--signing-key-file: cannot"),
        (["--raw", "--signing-key-file", __file__, "heartbeat"], "it cannot sign them"),
    ],
)
def test_cli_send_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    path = tmp_path / "command.json"
    path.write_text(json.dumps({"mes_time": "2026-11-23T07:00:00.000Z"}))
    with pytest.raises(SystemExit) as exit_info:
        main(_send_argv(f"127.0.0.1:{free_port()}", *args, str(path)))
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_cli_send_without_a_broker_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hb.json"
    path.write_text(json.dumps({"mes_time": "2026-11-23T07:00:00.000Z"}))
    assert main(_send_argv(f"127.0.0.1:{free_port()}", "heartbeat", str(path))) == 1
    assert "cannot connect" in capsys.readouterr().err


@pytest.mark.parametrize(("result", "code"), [("accepted", 0), ("rejected", 1)])
def test_cli_send_adds_a_command_id_and_prints_the_reply(
    broker: AnyBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    result: Literal["accepted", "rejected"],
    code: int,
) -> None:
    protocol = broker.protocols[0]
    agent = Watcher(broker, protocol, f"{BASE}/in/#")

    def answer(topic: str, payload: bytes) -> None:  # the agent: every command answered
        agent.got.put((topic, payload))
        command = _parsed(payload, topic)
        answer = reply(1, command.command_id, result, reason="no" if result == "rejected" else None)
        agent.client.publish(f"{BASE}/out/command-reply", encode(answer), qos=1)

    agent.on_message = answer  # type: ignore[method-assign]
    path = tmp_path / "release.json"
    path.write_text(
        json.dumps({"action": "release", "order": ORDER, "product": "P", "quantity": "1000"})
    )
    try:
        argv = _send_argv(
            f"{broker.host}:{broker.port}", "--protocol", protocol, "--wait-reply", "5"
        )
        assert main([*argv, "work-order", str(path)]) == code
        ((topic, payload),) = agent.take(1)
    finally:
        agent.close()
    assert topic == f"{BASE}/in/work-order"
    command = json.loads(payload)
    assert command["schema"] == "edge-agent/work-order"
    assert command["command_id"].startswith("mes-send-")
    out = capsys.readouterr().out
    assert command["command_id"] in out
    assert result in out


def test_cli_send_signs_with_the_key_file(broker: AnyBroker, tmp_path: Path) -> None:
    protocol = broker.protocols[0]
    agent = Watcher(broker, protocol, f"{BASE}/in/#")
    key = tmp_path / "key"
    key.write_bytes(b"s" * 32 + b"\n")
    path = tmp_path / "release.json"
    release = {"action": "release", "order": ORDER, "product": "P", "quantity": "1"}
    path.write_text(json.dumps(release))
    try:
        argv = _send_argv(f"{broker.host}:{broker.port}", "--protocol", protocol)
        argv += ["--signing-key-file", str(key), "--user", "qa-lead"]
        assert main([*argv, "work-order", str(path)]) == 0
        ((_, payload),) = agent.take(1)
    finally:
        agent.close()
    command = json.loads(payload)
    assert command["issued_by"] == "qa-lead"
    now = datetime.now(UTC)
    assert signature_problem(command, Signing(b"s" * 32, 60), now) is None
    assert signature_problem(command, Signing(b"t" * 32, 60), now) is not None
