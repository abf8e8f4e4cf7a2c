"""The test broker itself: a QoS 1 round trip survives a broker restart on the same port."""

from __future__ import annotations

import queue
import socket

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import Broker, require_protocol


def _client(b: Broker, client_id: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(b.host, b.port, keepalive=10)
    return c


def test_round_trip_and_restart_on_the_same_port(broker: Broker) -> None:
    require_protocol(broker, "5")
    received: queue.Queue[bytes] = queue.Queue()
    sub = _client(broker, "fixture-sub")
    sub.on_message = lambda _c, _u, msg: received.put(msg.payload)
    sub.loop_start()
    try:
        sub.subscribe("fixture/test", qos=1)
        pub = _client(broker, "fixture-pub")
        pub.loop_start()
        info = pub.publish("fixture/test", b"one", qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        assert received.get(timeout=5) == b"one"
        pub.loop_stop()
        pub.disconnect()

        port = broker.port
        broker.stop()
        assert not broker.running
        with socket.socket() as s:
            assert s.connect_ex((broker.host, port)) != 0  # really down
        broker.start()
        assert broker.port == port
        pub2 = _client(broker, "fixture-pub-2")
        reasons: list[ReasonCode] = []
        pub2.on_publish = lambda _c, _u, _mid, rc, _p: reasons.append(rc)
        pub2.loop_start()
        info = pub2.publish("fixture/nobody", b"two", qos=1)
        info.wait_for_publish(timeout=5)
        pub2.loop_stop()
        pub2.disconnect()
        # MQTT 5 tells a PUBACK with nobody subscribed apart (shared/DESIGN.md §6)
        assert [r.value for r in reasons] == [0x10]
    finally:
        sub.loop_stop()
        sub.disconnect()
