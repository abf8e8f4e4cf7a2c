"""MQTT uplink against a real mosquitto and a real SQLite outbox.

Nothing leaves the outbox until the broker acknowledges it with a success reason code; a broker
outage loses nothing; a refused publish stays; the retained status carries birth and last will.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import socket
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import Config, parse_config
from edge_agent.store import Store
from edge_agent.uplink.mqtt import MqttUplink, close_sockets
from tests.support.broker import Broker, has_mosquitto, require_protocol

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "line.toml"
BASE = "acme/hamburg/creams/line-1/line1-edge"


def make_config(broker: Broker, protocol: str = "5", **mqtt_extra: Any) -> Config:
    data = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    data["mqtt"].update(
        {
            "host": broker.host,
            "port": broker.port,
            "protocol": protocol,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
            **mqtt_extra,
        }
    )
    data["store"]["path"] = str(broker.workdir / "agent.db")
    return parse_config(data)


class Subscriber:
    """The MES side: a persistent MQTT 5 session, so the broker queues for it while it is away."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="mes-sim", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 2)
        self.topic = topic
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()

    def take(self, n: int, timeout: float = 20.0) -> list[tuple[str, bytes, bool]]:
        return [self.messages.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@pytest.fixture(autouse=True)
def _mqtt5(request: pytest.FixtureRequest) -> None:
    """These tests speak MQTT 5 (reason codes, session expiry): not on the embedded broker."""
    if "broker" in request.fixturenames:
        require_protocol(request.getfixturevalue("broker"), "5")
    if "acl_broker" in request.fixturenames and not has_mosquitto():
        pytest.skip("the ACL test needs mosquitto")


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker, f"{BASE}/out/#")
    yield s
    s.close()


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


async def enqueue(store: Store, first: int, count: int, kind: str = "material-consumed") -> None:
    async with store.transaction() as tx:
        for n in range(first, first + count):
            tx.enqueue(
                f"msg-{n:05d}",
                f"{BASE}/out/{kind}",
                json.dumps({"n": n}).encode(),
                "2026-11-22T08:00:00.000Z",
            )


async def drained(store: Store, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while await store.outbox_depth():
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_outbox_is_published_in_order_and_deleted_after_puback(
    broker: Broker, subscriber: Subscriber, store: Store, protocol: str
) -> None:
    await enqueue(store, 0, 300)
    async with MqttUplink(make_config(broker, protocol, inflight_window=20), store) as uplink:
        pump = asyncio.create_task(uplink.run())
        await drained(store)
        pump.cancel()
    got = await asyncio.to_thread(subscriber.take, 300)
    assert [json.loads(p)["n"] for _, p, _ in got] == list(range(300))
    assert uplink.published == 300


@pytest.mark.asyncio
async def test_a_broker_outage_loses_nothing(
    broker: Broker, subscriber: Subscriber, store: Store
) -> None:
    async with MqttUplink(make_config(broker), store) as uplink:
        pump = asyncio.create_task(uplink.run())
        await enqueue(store, 0, 50)
        uplink.notify()
        await drained(store)
        broker.stop()
        await enqueue(store, 50, 50)  # the line keeps running while the broker is down
        uplink.notify()
        await asyncio.sleep(0.3)
        assert await store.outbox_depth() == 50  # nothing left without an acknowledgement
        await asyncio.to_thread(broker.start)
        await drained(store)
        pump.cancel()
    received: set[int] = set()
    while len(received) < 100:
        _, payload, _ = await asyncio.to_thread(subscriber.messages.get, True, 20)
        received.add(json.loads(payload)["n"])  # a resend after reconnect may repeat one
    assert received == set(range(100))
    assert uplink.reconnects >= 1


@pytest.mark.asyncio
async def test_retained_status_birth_and_clean_offline(broker: Broker, store: Store) -> None:
    watcher = Subscriber(broker, f"{BASE}/status")
    try:
        async with MqttUplink(make_config(broker), store) as uplink:
            await uplink.wait_connected(10)
            _, birth, _ = await asyncio.to_thread(watcher.messages.get, True, 10)
            assert json.loads(birth)["state"] == "online"
            assert json.loads(birth)["agent"] == "line1-edge"
        _, bye, _ = await asyncio.to_thread(watcher.messages.get, True, 10)
        assert json.loads(bye)["state"] == "offline"
    finally:
        watcher.close()
    late = Subscriber(broker, f"{BASE}/status")  # a newcomer gets the retained state
    try:
        _, payload, retained = await asyncio.to_thread(late.messages.get, True, 10)
        assert retained
        assert json.loads(payload)["state"] == "offline"
    finally:
        late.close()


@pytest.mark.asyncio
async def test_last_will_says_offline_when_the_connection_drops(
    broker: Broker, store: Store
) -> None:
    watcher = Subscriber(broker, f"{BASE}/status")
    try:
        async with MqttUplink(make_config(broker), store) as uplink:
            await uplink.wait_connected(10)
            states = [
                json.loads((await asyncio.to_thread(watcher.messages.get, True, 10))[1])["state"]
            ]
            sock = uplink._client.socket()  # cut the TCP connection under paho, as a cable would
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            while len(states) < 3:  # online, offline (the will), online again (reconnected)
                _, payload, _ = await asyncio.to_thread(watcher.messages.get, True, 15)
                states.append(json.loads(payload)["state"])
        assert states[:3] == ["online", "offline", "online"]
    finally:
        watcher.close()


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(
        tmp_path / "acl-broker", acl=f"topic write {BASE}/status\ntopic write {BASE}/out/allowed\n"
    )
    b.start()
    yield b
    b.stop()


@pytest.mark.asyncio
async def test_a_refused_publish_stays_in_the_outbox_and_raises_an_alarm(
    acl_broker: Broker, store: Store
) -> None:
    await enqueue(store, 0, 2, kind="allowed")
    await enqueue(store, 2, 1, kind="forbidden")
    async with MqttUplink(make_config(acl_broker), store, retry_refused_s=60) as uplink:
        pump = asyncio.create_task(uplink.run())
        async with asyncio.timeout(10):
            while uplink.refusal is None or await store.outbox_depth() > 1:
                await asyncio.sleep(0.02)
        pump.cancel()
    assert uplink.refusal is not None
    assert uplink.refusal.message_id == "msg-00002"
    assert uplink.refusal.code == 0x87  # MQTT 5: Not authorized
    rows = await store.outbox_batch(10)
    assert [r.message_id for r in rows] == ["msg-00002"]


class AckingMes(Subscriber):
    """An MES that acknowledges each message id it receives, once ``acking`` is on."""

    def __init__(self, broker: Broker) -> None:
        self.acking = False
        self.seen: list[str] = []
        super().__init__(broker, f"{BASE}/out/#")
        self.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        message_id = json.loads(m.payload)["id"]
        self.seen.append(message_id)
        if self.acking:
            ack = json.dumps({"message_ids": [message_id]})
            client.publish(f"{BASE}/in/mes-ack", ack, qos=1)


@pytest.mark.asyncio
async def test_mes_ack_mode_keeps_rows_until_the_mes_acknowledges(
    broker: Broker, store: Store
) -> None:
    mes = AckingMes(broker)
    try:
        async with store.transaction() as tx:
            for n in range(5):
                tx.enqueue(f"m{n}", f"{BASE}/out/x", json.dumps({"id": f"m{n}"}).encode(), "t")
        config = make_config(broker, delivery="mes-ack", mes_ack_timeout_s=0.5)
        async with MqttUplink(config, store) as uplink:
            pump = asyncio.create_task(uplink.run())
            async with asyncio.timeout(20):
                while mes.seen.count("m0") < 2:  # not acknowledged: published again
                    await asyncio.sleep(0.02)
            assert await store.outbox_depth() == 5  # a broker PUBACK removed nothing
            mes.acking = True
            await drained(store)
            pump.cancel()
        assert set(mes.seen) == {f"m{n}" for n in range(5)}
    finally:
        mes.close()


@pytest.mark.asyncio
async def test_an_unreachable_broker_is_logged_once_not_per_attempt(
    tmp_path: Path, store: Store
) -> None:
    nobody = Broker(tmp_path / "nobody")  # a free port where no broker listens
    with structlog.testing.capture_logs() as logs:
        async with MqttUplink(make_config(nobody), store) as uplink:
            async with asyncio.timeout(20):
                while uplink.connect_failures < 3:
                    await asyncio.sleep(0.05)
    failures = [e for e in logs if e["event"] == "mqtt_connect_failed"]
    assert failures == [
        {
            "event": "mqtt_connect_failed",
            "log_level": "warning",
            "host": "127.0.0.1",
            "port": nobody.port,
            "reason": "Connection refused",
            "attempts": 1,
        }
    ]
    assert not uplink.connected


@pytest.mark.asyncio
async def test_mes_commands_reach_the_handler_by_kind(broker: Broker, store: Store) -> None:
    received: list[tuple[str, bytes]] = []
    got = asyncio.Event()

    def on_command(kind: str, payload: bytes, ack: Callable[[], None]) -> None:
        received.append((kind, payload))
        ack()
        got.set()

    mes = Subscriber(broker, f"{BASE}/status")
    try:
        async with MqttUplink(make_config(broker), store, on_command=on_command) as uplink:
            await uplink.wait_connected(10)
            await asyncio.to_thread(mes.take, 1)  # the agent is online, so subscribed
            mes.client.publish(f"{BASE}/in/orders", b'{"orders": []}', qos=1)
            # a deeper topic is not the kind of its last level: the engine refuses it by name
            mes.client.publish(f"{BASE}/in/x/work-order", b"{}", qos=1)
            async with asyncio.timeout(10):
                while len(received) < 2:
                    got.clear()
                    await got.wait()
    finally:
        mes.close()
    assert received == [("orders", b'{"orders": []}'), ("x/work-order", b"{}")]
