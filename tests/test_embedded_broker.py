"""The embedded broker (amqtt, in a subprocess): what `edge-agent demo` runs without a broker.

Each test keeps one measured fact about it: QoS 1 round trips at MQTT 3.1.1, a stop frees the port
and a restart takes it again, MQTT 5 is refused, persistent sessions work while it runs, a restart
forgets them unless they are declared, and a normal run logs nothing.
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.uplink.mqtt import close_sockets
from simulators.broker import EmbeddedBroker, main
from simulators.mes import MesSimulator
from tests.test_mes_simulator import BASE, ORDER, Publisher, consumed


class Client:
    """A paho 3.1.1 client that queues what it receives and the session flag of each CONNACK."""

    def __init__(
        self,
        broker: EmbeddedBroker,
        client_id: str,
        clean_session: bool = True,
        topic: str = "",
        manual_ack: bool = False,  # True: receives, and never acknowledges
    ) -> None:
        self.received: queue.Queue[bytes] = queue.Queue()
        self.dup_flags: list[bool] = []
        self.connacks: queue.Queue[tuple[bool, ReasonCode]] = queue.Queue()
        self.subscribed: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            manual_ack=manual_ack,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subscribed.put(rcs)
        self.client.on_message = self._on_message
        self.topic = topic
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        rc: ReasonCode,
        _p: object,
    ) -> None:
        self.connacks.put((flags.session_present, rc))
        if self.topic:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.dup_flags.append(bool(msg.dup))
        self.received.put(bytes(msg.payload))

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(tmp_path / "embedded")
    b.start()
    yield b
    b.stop()


def _nobody_listens(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def test_qos1_round_trip_stop_frees_the_port_and_restart_takes_it_again(
    embedded: EmbeddedBroker,
) -> None:
    sub = Client(embedded, "sub", topic="line/#")
    pub = Client(embedded, "pub")
    try:
        assert sub.subscribed.get(timeout=5)[0].value == 1  # granted QoS 1
        pub.publish("line/1", b"one")
        assert sub.received.get(timeout=5) == b"one"
    finally:
        pub.close()
        sub.close()

    port = embedded.port
    embedded.stop()
    assert not embedded.running
    assert _nobody_listens(embedded.host, port)
    with socket.socket() as s:  # free: a server can bind it (as the broker does, SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((embedded.host, port))

    embedded.start()
    assert embedded.running
    assert embedded.port == port
    sub = Client(embedded, "sub-2", topic="line/#")
    pub = Client(embedded, "pub-2")
    try:
        sub.subscribed.get(timeout=5)
        pub.publish("line/1", b"two")
        assert sub.received.get(timeout=5) == b"two"
    finally:
        pub.close()
        sub.close()
    # a normal run, stop and restart included, prints and logs nothing
    embedded.stop()
    assert (embedded.workdir / "amqtt.stderr").read_text() == ""
    assert embedded.log_file.read_text() == ""


def test_an_mqtt5_connect_is_refused(embedded: EmbeddedBroker) -> None:
    """amqtt speaks MQTT 3.1.1 only (shared/DESIGN.md §6): paho sees 0x84 at CONNACK."""
    assert embedded.protocols == ("3.1.1",)
    refused: queue.Queue[ReasonCode] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, rc, _p: refused.put(rc)
    client.connect(embedded.host, embedded.port, keepalive=10)
    client.loop_start()
    try:
        rc = refused.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
        close_sockets(client)
    assert rc.is_failure
    assert rc.value == 0x84
    assert str(rc) == "Unsupported protocol version"


def test_a_persistent_session_is_queued_for_while_the_client_is_away(
    embedded: EmbeddedBroker,
) -> None:
    """Only because LoopbackAuth does not mark sessions anonymous (amqtt drops those)."""
    mes = Client(embedded, "mes", clean_session=False, topic="line/#")
    mes.subscribed.get(timeout=5)
    mes.close()
    pub = Client(embedded, "pub")
    pub.publish("line/1", b"while away")
    pub.close()
    mes = Client(embedded, "mes", clean_session=False)  # no new subscription
    try:
        assert mes.connacks.get(timeout=5)[0] is True  # session present
        assert mes.received.get(timeout=5) == b"while away"
    finally:
        mes.close()


def test_an_unacknowledged_delivery_is_sent_again_when_the_client_returns(
    embedded: EmbeddedBroker,
) -> None:
    """As MQTT requires and mosquitto does; bare amqtt drops it: keep_unacknowledged_deliveries."""
    mes = Client(embedded, "mes", clean_session=False, topic="line/#", manual_ack=True)
    pub = Client(embedded, "pub")
    try:
        mes.subscribed.get(timeout=5)
        pub.publish("line/1", b"in flight")
        assert mes.received.get(timeout=5) == b"in flight"  # and never acknowledged
        mes.close()  # as if the MES died before its PUBACK
        mes = Client(embedded, "mes", clean_session=False)
        assert mes.received.get(timeout=5) == b"in flight"
        assert mes.dup_flags == [True]
    finally:
        mes.close()
        pub.close()


def test_a_restart_forgets_every_session(embedded: EmbeddedBroker) -> None:
    """amqtt keeps sessions in memory: what it queued for an absent client dies with it."""
    mes = Client(embedded, "mes", clean_session=False, topic="line/#")
    assert mes.connacks.get(timeout=5)[0] is False
    mes.subscribed.get(timeout=5)
    mes.close()
    embedded.restart()
    mes = Client(embedded, "mes", clean_session=False)
    try:
        assert mes.connacks.get(timeout=5)[0] is False  # no session present any more
    finally:
        mes.close()


def test_declared_sessions_queue_from_every_start_so_a_restart_loses_nothing(
    tmp_path: Path,
) -> None:
    """The demo's set-up: the MES session exists before any client connects, restart or not."""
    broker = EmbeddedBroker(tmp_path / "embedded", sessions=(("mes-sim", f"{BASE}/out/#"),))
    with broker:
        publisher = Publisher(broker, "3.1.1")
        publisher.message(consumed(1, "WATER", "0.1", "LOT-W1"))  # before the MES ever connected
        publisher.close()
        mes = MesSimulator(
            tmp_path / "mes.db",
            host=broker.host,
            port=broker.port,
            topic_base=BASE,
            protocol="3.1.1",
        )
        with mes:
            mes.wait_for(1)
            broker.restart()  # the MES reconnects by itself
            publisher = Publisher(broker, "3.1.1")
            publisher.message(consumed(2, "WATER", "0.1", "LOT-W1"))  # maybe before it has
            publisher.close()
            mes.wait_for(2)
            assert mes.consumption() == {(ORDER, "WATER", "kg"): Decimal("0.2")}


def test_start_fails_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(tmp_path / "embedded", port=port)
        with pytest.raises(RuntimeError, match=r"exited at start-up: .*address already in use"):
            broker.start()
        assert not broker.running


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--host", "0.0.0.0", "--port", "1883"], "loopback"),
        (["--port", "0"], "1..65535"),
        (["--port", "1883", "--session", "mes-sim"], "CLIENT_ID=TOPIC_FILTER"),
        ([], "--port"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_embedded_broker_binds_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(tmp_path, host="0.0.0.0")


def test_the_broker_ends_with_the_process_that_started_it(embedded: EmbeddedBroker) -> None:
    """Its standard input is a pipe from the parent, closed when the parent dies (even kill -9)."""
    process = embedded.process
    assert process is not None
    assert process.stdin is not None
    process.stdin.close()  # what the kernel does when the parent dies
    assert process.wait(timeout=10) == 0
    assert not embedded.running
    assert _nobody_listens(embedded.host, embedded.port)
