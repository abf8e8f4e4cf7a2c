"""MQTT security against a real mosquitto: TLS with the broker's certificate and name verified,
client certificates, broker accounts and the ACL of config/mosquitto.acl. Each refusal is
reported clearly (what failed, at which broker, why) and loses nothing: the outbox keeps every
posting until the cause is fixed, then the MES gets each exactly once.

Each test fails when the protection it is about is removed (docs/security.md). One PKI for the
session (tests/support/pki.py); every broker on its own free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import queue
import re
import ssl
import threading
import tomllib
import uuid
from collections import Counter
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
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.cli import main
from edge_agent.config import Config, parse_config
from edge_agent.errors import ConfigError
from edge_agent.store import Store
from edge_agent.uplink.mqtt import MqttUplink, close_sockets
from simulators.mosquitto import Broker, BrokerTls, has_mosquitto
from tests.support.pki import Pki, make_pki

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "line.toml"
EXAMPLE_ACL = ROOT / "config" / "mosquitto.acl"
EXAMPLE_BROKER = ROOT / "config" / "mosquitto-tls.conf"
AGENT = "line1-edge"
BASE = f"acme/hamburg/creams/line-1/{AGENT}"
OTHER = "acme/hamburg/creams/line-1/line2-edge"  # another agent's topic base
PROBE = "acme/hamburg/creams/line-1/mes-probe/in/probe"  # the MES writes it, no agent reads it
# distinctive, so that a leak anywhere is found by a plain search
PASSWORD = "pw-agent-Zq81kX"
WRONG_PASSWORD = "pw-wrong-Hv37tM"
MES_PASSWORD = "pw-mes-Lp45sD"
ACCOUNTS = {AGENT: PASSWORD, "line2-edge": "pw-line2-Tq63nB", "mes": MES_PASSWORD}

needs_mosquitto = pytest.mark.skipif(not has_mosquitto(), reason="needs mosquitto")


# ------------------------------------------------------------------------------ set-up


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), AGENT)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers for a test (``start(name, **options)``); all are stopped at its end."""
    brokers: list[Broker] = []

    def _start(name: str, **options: Any) -> Broker:
        b = Broker(tmp_path / name, **options)
        b.start()
        brokers.append(b)
        return b

    yield _start
    for b in brokers:
        b.stop()


def server_tls(pki: Pki, **options: Any) -> BrokerTls:
    return BrokerTls(pki.ca, pki.server_cert, pki.server_key, **options)


def make_config(
    broker: Broker,
    *,
    tls: dict[str, Any] | None = None,
    username: str | None = None,
    password_file: Path | None = None,
    **mqtt_extra: Any,
) -> Config:
    data = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    data["mqtt"].update(
        {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
            **mqtt_extra,
        }
    )
    if tls is not None:
        data["mqtt"]["tls"] = {k: v if isinstance(v, dict) else str(v) for k, v in tls.items()}
    if username is not None:
        data["mqtt"]["username"] = username
    if password_file is not None:
        data["mqtt"]["password"] = {"file": str(password_file)}
    data["store"]["path"] = str(broker.workdir / "unused.db")
    return parse_config(data)


def ids(n: int, first: int = 0) -> list[str]:
    return [f"msg-{i:05d}" for i in range(first, first + n)]


async def enqueue(store: Store, message_ids: list[str], base: str = BASE) -> None:
    async with store.transaction() as tx:
        for message_id in message_ids:
            payload = json.dumps({"id": message_id}).encode()
            tx.enqueue(message_id, f"{base}/out/material-consumed", payload, "2026-11-22T08:00Z")


async def outbox(store: Store) -> list[str]:
    return [row.message_id for row in await store.outbox_batch(1000)]


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def drained(store: Store, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while await store.outbox_depth():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(config: Config, store: Store, **options: Any) -> AsyncIterator[MqttUplink]:
    """An uplink publishing the outbox until the block ends."""
    async with MqttUplink(config, store, **options) as uplink:
        pump = asyncio.create_task(uplink.run())
        try:
            yield uplink
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


class Mes:
    """The MES: a persistent MQTT 5 session (over TLS, with its own account, when the broker
    asks for them) subscribed to every agent's postings; records each message id it
    receives."""

    def __init__(self, broker: Broker, pki: Pki, *, account: bool = False) -> None:
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.received: list[str] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="mes", protocol=mqtt.MQTTv5
        )
        if broker.tls is not None:
            context = ssl.create_default_context(cafile=pki.ca)
            context.load_cert_chain(pki.client_cert, pki.client_key)
            self.client.tls_set_context(context)
        if account:
            self.client.username_pw_set("mes", MES_PASSWORD)
        self.client.reconnect_delay_set(1, 1)
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c.subscribe([("acme/+/+/+/+/out/#", 1), (PROBE, 1)])

        def on_subscribe(_c: Any, _u: Any, _m: Any, codes: list[ReasonCode], _p: Any) -> None:
            assert all(code.value < 0x80 for code in codes), codes
            subscribed.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = lambda _c, _u, m: self._inbox.put((m.topic, m.payload))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert subscribed.wait(10), "the MES did not subscribe"

    def flush(self, timeout: float = 10.0) -> list[str]:
        """Every message id received so far: what the broker routed to the MES before the
        probe the MES publishes now comes before the probe."""
        token = uuid.uuid4().bytes
        self.client.publish(PROBE, token, qos=1)
        while True:
            topic, payload = self._inbox.get(timeout=timeout)
            if topic == PROBE:
                if payload == token:
                    return list(self.received)
                continue
            self.received.append(json.loads(payload)["id"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@pytest.fixture
def mes_for(pki: Pki) -> Iterator[Callable[..., Mes]]:
    made: list[Mes] = []

    def _mes(broker: Broker, **options: Any) -> Mes:
        made.append(Mes(broker, pki, **options))
        return made[-1]

    yield _mes
    for m in made:
        m.close()


def delivered_once(mes: Mes, expected: list[str]) -> None:
    got = mes.flush()
    assert Counter(got) == Counter(expected), "each message exactly once"


async def refused_attempt(
    config: Config, store: Store, event: str, **options: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run an uplink until its first failed connection attempt is logged: that event, and the
    whole log."""
    with structlog.testing.capture_logs() as logs:
        async with running(config, store, **options) as uplink:
            await until(lambda: bool(events(logs, event)))
            assert not uplink.connected
    return events(logs, event)[0], logs


# ------------------------------------------------------------------------------ configuration


def test_tls_and_an_account_configure_a_verified_connection(pki: Pki, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    config = make_config(
        Broker(tmp_path),
        tls={"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key},
        username=AGENT,
        password_file=secret,
    )
    assert config.mqtt.tls is not None
    context = config.mqtt.tls.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert config.mqtt.password is not None
    assert config.mqtt.password.reveal() == PASSWORD
    # the configuration as text (a log, an error) never holds the password, only where it is
    assert PASSWORD not in repr(config)
    assert PASSWORD not in config.model_dump_json()
    # the MQTT-over-TLS port unless one is given
    data = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    del data["mqtt"]["port"]
    data["mqtt"]["tls"] = {"ca_file": str(pki.ca)}
    assert parse_config(data).mqtt.port == 8883


def _tls(**keys: Any) -> Callable[[Pki, Path], dict[str, Any]]:
    def mqtt(pki: Pki, tmp: Path) -> dict[str, Any]:
        tls = {k: str(v(pki, tmp)) if callable(v) else v for k, v in keys.items()}
        return {"tls": tls}

    return mqtt


def _write(name: str, text: str) -> Callable[[Pki, Path], Path]:
    def path(_pki: Pki, tmp: Path) -> Path:
        (tmp / name).write_text(text)
        return tmp / name

    return path


KEY_PASSWORD_FILE = _write("key-password", "key-password-for-tests\n")


@pytest.mark.parametrize(
    ("mqtt", "problem"),
    [
        pytest.param(
            _tls(ca_file="missing.crt"),
            r"mqtt\.tls\.ca_file: cannot read '.*missing\.crt': No such file or directory",
            id="missing-ca",
        ),
        pytest.param(
            _tls(ca_file=lambda p, _: p.client_key),
            r"mqtt\.tls\.ca_file: '.*' is not a PEM CA certificate \(no certificate or crl found\)",
            id="ca-not-a-certificate",
        ),
        pytest.param(
            _tls(ca_file=lambda p, _: p.ca, cert_file=lambda p, _: p.client_cert),
            r"mqtt\.tls: cert_file and key_file go together",
            id="cert-without-key",
        ),
        pytest.param(
            _tls(
                ca_file=lambda p, _: p.ca,
                cert_file=lambda p, _: p.client_cert,
                key_file=lambda p, _: p.server_key,
            ),
            r"mqtt\.tls: key_file '.*server\.key' is not the key of cert_file '.*client\.crt'",
            id="key-of-another-certificate",
        ),
        pytest.param(
            _tls(
                ca_file=lambda p, _: p.ca,
                cert_file=lambda p, _: p.client_cert,
                key_file=lambda p, _: p.client_cert,
            ),
            r"mqtt\.tls\.key_file: '.*client\.crt' holds no PEM private key",
            id="key-file-without-a-key",
        ),
        pytest.param(
            _tls(
                ca_file=lambda p, _: p.ca,
                cert_file=lambda p, _: p.client_cert,
                key_file=lambda p, _: p.client_key_encrypted,
            ),
            r"mqtt\.tls: key_file '.*' is encrypted: give key_password",
            id="encrypted-key-without-password",
        ),
        pytest.param(
            _tls(
                ca_file=lambda p, _: p.ca,
                cert_file=lambda p, _: p.client_cert,
                key_file=lambda p, _: p.client_key_encrypted,
                key_password={"env": "EDGE_AGENT_TEST_UNSET_VARIABLE"},
            ),
            r"mqtt\.tls\.key_password: environment variable EDGE_AGENT_TEST_UNSET_VARIABLE is "
            "not set",
            id="key-password-unset",
        ),
        pytest.param(
            _tls(ca_file=lambda p, _: p.ca, insecure=True),
            r"mqtt\.tls\.insecure: unknown key",
            id="no-switch-turns-verification-off",
        ),
        pytest.param(
            lambda _p, tmp: {"password": {"file": str(_write("pw", PASSWORD)(_p, tmp))}},
            r"mqtt: password needs username",
            id="password-without-username",
        ),
        pytest.param(
            lambda _p, _t: {"username": AGENT, "password": PASSWORD},
            r"mqtt\.password: a secret is never written in the configuration",
            id="password-written-in-the-file",
        ),
        pytest.param(
            lambda _p, tmp: {
                "host": "10.20.0.5",
                "username": AGENT,
                "password": {"file": str(_write("pw", PASSWORD)(_p, tmp))},
            },
            r"mqtt: password: it would cross the network to 10\.20\.0\.5 in clear text",
            id="password-in-clear-text-over-the-network",
        ),
    ],
)
def test_a_bad_tls_or_account_setting_is_named_by_its_key(
    pki: Pki,
    tmp_path: Path,
    mqtt: Callable[[Pki, Path], dict[str, Any]],
    problem: str,
) -> None:
    data = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    data["mqtt"].update(mqtt(pki, tmp_path))
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base=tmp_path)
    assert any(re.match(problem, p) for p in caught.value.problems), caught.value.problems
    assert not any(PASSWORD in p for p in caught.value.problems)


@pytest.mark.parametrize("doc", ["configuration.md", "security.md"])
def test_the_documented_mqtt_block_validates(pki: Pki, tmp_path: Path, doc: str) -> None:
    """The ``[mqtt]`` + ``[mqtt.tls]`` example of the docs, its paths pointed at test files."""
    text = (ROOT / "docs" / doc).read_text()
    [block] = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[mqtt.tls]" in b]
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    for documented, real in {
        "/etc/edge-agent/tls/plant-ca.crt": pki.ca,
        "/etc/edge-agent/tls/line1-edge.crt": pki.client_cert,
        "/run/credentials/edge-agent.service/mqtt-client.key": pki.client_key,
        "/run/credentials/edge-agent.service/mqtt-password": secret,
    }.items():
        assert documented in block, documented
        block = block.replace(documented, str(real))
    data = copy.deepcopy(tomllib.loads(EXAMPLE.read_text()))
    data["mqtt"] = tomllib.loads(block)["mqtt"]
    config = parse_config(data)
    assert config.mqtt.port == 8883
    assert config.mqtt.tls is not None
    assert config.mqtt.tls.cert_file == pki.client_cert


def test_an_encrypted_client_key_loads_with_its_password(pki: Pki, tmp_path: Path) -> None:
    config = make_config(
        Broker(tmp_path),
        tls={
            "ca_file": pki.ca,
            "cert_file": pki.client_cert,
            "key_file": pki.client_key_encrypted,
            "key_password": {"file": str(KEY_PASSWORD_FILE(pki, tmp_path))},
        },
    )
    assert config.mqtt.tls is not None
    config.mqtt.tls.ssl_context()


def test_validate_exits_2_naming_the_key_without_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = EXAMPLE.read_text().replace(
        'topic_root = "acme"',
        f'topic_root = "acme"\nusername = "{AGENT}"\npassword = "{PASSWORD}"\n'
        '[mqtt.tls]\nca_file = "no-such-ca.crt"',
    )
    for name in ("masterdata.json", "orders.json", "lots.json"):
        (tmp_path / name).write_bytes((EXAMPLE.parent / name).read_bytes())
    bad = tmp_path / "line.toml"
    bad.write_text(text)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "mqtt.tls.ca_file: cannot read" in err
    assert "mqtt.password: a secret is never written in the configuration" in err
    assert PASSWORD not in err


# ------------------------------------------------------------------------------ TLS


@needs_mosquitto
@pytest.mark.asyncio
async def test_an_untrusted_server_certificate_is_refused_then_the_plant_ca_delivers_all_once(
    pki: Pki, start: Callable[..., Broker], mes_for: Callable[..., Mes], store: Store
) -> None:
    broker = start("tls", tls=server_tls(pki))
    mes = mes_for(broker)
    await enqueue(store, ids(20))

    rogue = make_config(broker, tls={"ca_file": pki.rogue_ca})
    failed, logs = await refused_attempt(rogue, store, "mqtt_connect_failed")
    assert failed["log_level"] == "error"
    assert failed["host"] == "127.0.0.1"
    assert failed["port"] == broker.port
    assert re.fullmatch(
        r"TLS: certificate verify failed: (self-signed certificate in certificate chain|"
        r"unable to get local issuer certificate)",
        failed["reason"],
    ), failed["reason"]
    assert not events(logs, "mqtt_connected")
    assert await outbox(store) == ids(20)  # nothing lost
    assert mes.flush() == []

    async with running(make_config(broker, tls={"ca_file": pki.ca}), store) as uplink:
        await drained(store)
    assert uplink.published == 20
    delivered_once(mes, ids(20))


@needs_mosquitto
@pytest.mark.asyncio
async def test_a_certificate_of_the_plant_ca_for_another_name_is_refused(
    pki: Pki, start: Callable[..., Broker], store: Store
) -> None:
    """A certificate the plant CA issued to another device does not make a broker: its name
    must be the host the agent connects to."""
    broker = start("elsewhere", tls=BrokerTls(pki.ca, pki.other_name_cert, pki.other_name_key))
    await enqueue(store, ids(3))
    failed, _ = await refused_attempt(
        make_config(broker, tls={"ca_file": pki.ca}), store, "mqtt_connect_failed"
    )
    assert failed["log_level"] == "error"
    assert re.fullmatch(
        r"TLS: certificate verify failed: IP address mismatch, certificate is not valid for "
        r"'127\.0\.0\.1'\.",
        failed["reason"],
    ), failed["reason"]
    assert await outbox(store) == ids(3)


@needs_mosquitto
@pytest.mark.asyncio
async def test_tls_and_plain_tcp_never_meet_silently(
    pki: Pki, start: Callable[..., Broker], store: Store
) -> None:
    """An agent configured for TLS never falls back to plain TCP, and one configured without
    TLS pointed at a TLS listener is told, not left waiting."""
    plain = start("plain")
    tls = start("tls", tls=server_tls(pki))
    await enqueue(store, ids(3))

    failed, logs = await refused_attempt(
        make_config(plain, tls={"ca_file": pki.ca}), store, "mqtt_connect_failed"
    )
    assert failed["log_level"] == "error"
    assert failed["reason"].startswith("TLS: "), failed["reason"]
    assert not events(logs, "mqtt_connected")

    failed, logs = await refused_attempt(make_config(tls), store, "mqtt_connect_failed")
    assert failed["log_level"] == "error"
    assert failed["port"] == tls.port
    assert failed["reason"].startswith("the broker closed the connection before its CONNACK")
    assert not events(logs, "mqtt_connected")
    assert await outbox(store) == ids(3)


@needs_mosquitto
@pytest.mark.asyncio
async def test_a_broker_that_requires_a_client_certificate_accepts_only_the_plant_s(
    pki: Pki, start: Callable[..., Broker], mes_for: Callable[..., Mes], store: Store
) -> None:
    broker = start("mtls", tls=server_tls(pki, require_certificate=True))
    mes = mes_for(broker)
    await enqueue(store, ids(5))

    for name, tls in [
        ("none", {"ca_file": pki.ca}),
        (
            "rogue",
            {
                "ca_file": pki.ca,
                "cert_file": pki.rogue_client_cert,
                "key_file": pki.rogue_client_key,
            },
        ),
    ]:
        failed, logs = await refused_attempt(
            make_config(broker, tls=tls), store, "mqtt_connect_failed"
        )
        assert failed["log_level"] == "error", name
        # TLS 1.3: the broker's verdict on the client certificate comes after the handshake
        assert failed["reason"].startswith("the broker closed the connection before its CONNACK"), (
            name,
            failed,
        )
        assert not events(logs, "mqtt_connected"), name
    assert await outbox(store) == ids(5)
    assert mes.flush() == []

    own = {"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key}
    async with running(make_config(broker, tls=own), store):
        await drained(store)
    delivered_once(mes, ids(5))


# ------------------------------------------------------------------------------ accounts


@needs_mosquitto
@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_wrong_password_is_refused_reported_and_the_right_one_delivers_all_once(
    start: Callable[..., Broker],
    mes_for: Callable[..., Mes],
    store: Store,
    password_file: Path,
    protocol: str,
) -> None:
    broker = start("accounts", users=ACCOUNTS, allow_anonymous=False)
    mes = mes_for(broker, account=True)
    await enqueue(store, ids(10))
    password_file.write_text(WRONG_PASSWORD + "\n")
    config = make_config(broker, username=AGENT, password_file=password_file, protocol=protocol)

    with structlog.testing.capture_logs() as logs:
        async with running(config, store) as uplink:
            await until(lambda: bool(events(logs, "mqtt_connect_refused")))
            refused = events(logs, "mqtt_connect_refused")[0]
            assert await outbox(store) == ids(10)  # nothing lost
            assert mes.flush() == []
            # the operator puts the right password in the file: the next attempt reads it
            password_file.write_text(PASSWORD + "\n")
            await drained(store)
            assert uplink.connected
    # mosquitto 2.0 answers a wrong password with "Not authorized" (MQTT 5: 0x87; 3.1.1: 5)
    assert refused == {
        "event": "mqtt_connect_refused",
        "log_level": "error",
        "host": "127.0.0.1",
        "port": broker.port,
        "reason": "Not authorized",
        "code": "0x87",
        "attempts": 1,
        "hint": refused["hint"],
    }
    assert "mqtt.password" in refused["hint"]
    # one refused attempt is one fact: not also a "disconnected" warning
    before = logs[: logs.index(events(logs, "mqtt_connected")[0])]
    assert not events(before, "mqtt_disconnected")
    delivered_once(mes, ids(10))


@needs_mosquitto
@pytest.mark.asyncio
async def test_the_password_never_appears_in_a_log(
    start: Callable[..., Broker],
    store: Store,
    password_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither the wrong nor the right password reaches the log, whatever happens: refused,
    connected, disconnected (the stdlib log included, at every level)."""
    broker = start("accounts", users=ACCOUNTS, allow_anonymous=False)
    await enqueue(store, ids(2))
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        password_file.write_text(WRONG_PASSWORD)
        config = make_config(broker, username=AGENT, password_file=password_file)
        async with running(config, store):
            await until(lambda: bool(events(logs, "mqtt_connect_refused")))
        password_file.write_text(PASSWORD)
        async with running(config, store) as uplink:
            await drained(store)
            broker.stop()
            await until(lambda: not uplink.connected)
            broker.start()
            await until(lambda: uplink.connected)
    text = repr(logs) + caplog.text + repr([r.__dict__ for r in caplog.records])
    assert events(logs, "mqtt_connect_refused")
    assert events(logs, "mqtt_connected")
    assert events(logs, "mqtt_disconnected")
    assert WRONG_PASSWORD not in text
    assert PASSWORD not in text


# ------------------------------------------------------------------------------ ACL


class Account:
    """A plain MQTT 5 client logged in as one of the broker's accounts."""

    def __init__(self, broker: Broker, user: str) -> None:
        self.results: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[str] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acl-{user}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(user, ACCOUNTS[user])
        self.client.reconnect_delay_set(0.1, 0.1)  # type: ignore[arg-type]  # seconds; a stop waits it out
        self.client.on_publish = lambda _c, _u, _m, rc, _p: self.results.put(rc.value)
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: self.results.put(codes[0].value)
        self.client.on_message = lambda _c, _u, m: self.messages.put(m.topic)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str) -> int:
        """The PUBACK's reason code."""
        self.client.publish(topic, b"{}", qos=1)
        return self.results.get(timeout=5)

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return self.results.get(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        close_sockets(self.client)


@needs_mosquitto
def test_the_example_acl_confines_the_agent_to_its_own_topics(
    start: Callable[..., Broker],
) -> None:
    """config/mosquitto.acl, as it is: the agent's account publishes only under its topic base
    (postings and status) and reads only its own commands; the MES commands, but does not post
    as an agent."""
    broker = start("acl", users=ACCOUNTS, allow_anonymous=False, acl=EXAMPLE_ACL.read_text())
    accounts: list[Account] = []

    def account(user: str) -> Account:
        accounts.append(Account(broker, user))
        return accounts[-1]

    not_authorized = 0x87
    try:
        # what the agent may publish (nobody subscribed: "No matching subscribers", 0x10)
        agent = account(AGENT)
        assert agent.publish(f"{BASE}/out/material-consumed") < 0x80
        assert agent.publish(f"{BASE}/status") < 0x80
        # ... and nothing else: not another agent's postings or status, not a command (not
        # even to itself). A fresh connection each: mosquitto 2.0 closes the connection after
        # a refused publish (eclipse-mosquitto/mosquitto#2579)
        for topic in (
            f"{OTHER}/out/material-consumed",
            f"{OTHER}/status",
            f"{BASE}/in/work-order",
            "acme/hamburg/creams/line-1/unrelated",
        ):
            assert account(AGENT).publish(topic) == not_authorized, topic
        # what it reads: mosquitto grants any subscription and applies the ACL to each message
        # it would deliver; of all these, the agent gets its own command only
        reader = account(AGENT)
        assert reader.subscribe("#") < 0x80
        other, mes = account("line2-edge"), account("mes")
        assert other.publish(f"{OTHER}/out/material-consumed") < 0x80
        assert other.publish(f"{OTHER}/status") < 0x80
        assert agent.publish(f"{BASE}/out/material-consumed") < 0x80
        assert mes.publish(f"{OTHER}/in/work-order") < 0x80
        assert mes.publish(f"{BASE}/in/work-order") < 0x80  # the last one routed
        assert reader.messages.get(timeout=5) == f"{BASE}/in/work-order"
        assert reader.messages.empty()
        # the MES does not post as an agent
        assert account("mes").publish(f"{BASE}/out/material-consumed") == not_authorized
    finally:
        for a in accounts:
            a.close()


@needs_mosquitto
@pytest.mark.asyncio
async def test_a_publish_outside_the_acl_stays_in_the_outbox_until_the_acl_allows_it(
    start: Callable[..., Broker],
    mes_for: Callable[..., Mes],
    store: Store,
    password_file: Path,
) -> None:
    """Rows queued under another topic base (an agent renamed with messages still waiting) are
    refused with MQTT 5 "Not authorized": the refused row stays in the outbox, is reported,
    holds the rows not yet sent behind it, and goes once the broker's ACL allows it.

    mosquitto 2.0 also closes the connection after a refusal (eclipse-mosquitto/mosquitto#2579),
    sometimes before the PUBACKs it owes, and handles what was pipelined behind the refused
    message (or not): messages in flight around it may arrive twice (same id: the MES
    deduplicates, DESIGN.md §3.1) or before it. Nothing is lost."""
    acl = EXAMPLE_ACL.read_text()
    broker = start("acl", users=ACCOUNTS, allow_anonymous=False, acl=acl)
    mes = mes_for(broker, account=True)
    await enqueue(store, ids(2))
    await enqueue(store, ids(1, 2), base=OTHER)
    await enqueue(store, ids(2, 3))
    config = make_config(broker, username=AGENT, password_file=password_file)

    with structlog.testing.capture_logs() as logs:
        async with running(config, store, retry_refused_s=0.3) as uplink:
            await until(lambda: uplink.refusal is not None)
            assert uplink.refusal is not None
            assert uplink.refusal.message_id == "msg-00002"
            assert uplink.refusal.code == 0x87
            assert "msg-00002" in await outbox(store)
            got = mes.flush()
            assert "msg-00002" not in got
            # the operator allows the old topic base; the broker restarts with it
            broker.acl = acl + f"\nuser {AGENT}\ntopic write {OTHER}/out/#\n"
            await asyncio.to_thread(broker.restart)
            await drained(store)
    assert events(logs, "mqtt_publish_refused")[0] == {
        "event": "mqtt_publish_refused",
        "log_level": "error",
        "message_id": "msg-00002",
        "topic": f"{OTHER}/out/material-consumed",
        "reason": "Not authorized",
        "code": "0x87",
    }
    assert set(mes.flush()) == set(ids(5))  # every message, once the MES deduplicates


@needs_mosquitto
@pytest.mark.asyncio
async def test_a_refused_status_is_reported(
    start: Callable[..., Broker], store: Store, password_file: Path
) -> None:
    """An ACL without the agent's status topic: the MES would see the agent as never online;
    the agent says why."""
    acl = EXAMPLE_ACL.read_text().replace("pattern write acme/+/+/+/%u/status\n", "")
    broker = start("acl", users=ACCOUNTS, allow_anonymous=False, acl=acl)
    config = make_config(broker, username=AGENT, password_file=password_file)
    with structlog.testing.capture_logs() as logs:
        async with running(config, store):
            await until(lambda: bool(events(logs, "mqtt_status_refused")))
    assert events(logs, "mqtt_status_refused")[0] == {
        "event": "mqtt_status_refused",
        "log_level": "error",
        "topic": f"{BASE}/status",
        "reason": "Not authorized",
        "code": "0x87",
    }


@needs_mosquitto
@pytest.mark.asyncio
async def test_mqtt_3_1_1_hides_an_acl_refusal_and_only_mes_ack_keeps_the_row(
    start: Callable[..., Broker], tmp_path: Path, password_file: Path
) -> None:
    """The limitation, measured: under MQTT 3.1.1 mosquitto answers an ACL-denied publish
    with a successful PUBACK and drops it. With delivery = "broker" the row is gone (so: use
    MQTT 5, the default); with delivery = "mes-ack" it stays until the MES acknowledges it,
    and is published again meanwhile."""
    broker = start("acl", users=ACCOUNTS, allow_anonymous=False, acl=EXAMPLE_ACL.read_text())
    for delivery in ("broker", "mes-ack"):
        async with Store.open(tmp_path / f"{delivery}.db") as store:
            await enqueue(store, ids(1), base=OTHER)
            config = make_config(
                broker,
                username=AGENT,
                password_file=password_file,
                protocol="3.1.1",
                delivery=delivery,
                mes_ack_timeout_s=0.2,
            )
            with structlog.testing.capture_logs() as logs:
                async with running(config, store) as uplink:
                    if delivery == "broker":
                        await drained(store)  # deleted, though nobody received it
                    else:
                        # mosquitto closes the connection after the denied publish (#2579):
                        # the row goes again after each reconnect, and stays
                        await until(lambda: uplink.reconnects >= 2)
                        assert await outbox(store) == ids(1)
            assert uplink.refusal is None
            assert not events(logs, "mqtt_publish_refused")  # 3.1.1 cannot tell


# ------------------------------------------------------------------------------ the example


def _with(conf: str, replace: dict[str, str]) -> str:
    """``conf`` with the value of each option named in ``replace`` replaced (each must be
    there: the example keeps the options this test depends on)."""
    out = []
    seen = set()
    for line in conf.splitlines():
        key = line.split(" ", 1)[0]
        if key in replace:
            seen.add(key)
        out.append(f"{key} {replace[key]}" if key in replace else line)
    assert seen == set(replace), f"the example lost {set(replace) - seen}"
    return "\n".join(out) + "\n"


@needs_mosquitto
@pytest.mark.asyncio
async def test_the_example_broker_configuration_serves_the_agent_and_the_mes(
    pki: Pki,
    start: Callable[..., Broker],
    mes_for: Callable[..., Mes],
    store: Store,
    tmp_path: Path,
    password_file: Path,
) -> None:
    """config/mosquitto-tls.conf with config/mosquitto.acl, paths and port replaced: a real
    mosquitto starts with it, refuses an agent without a client certificate or without an
    account, and delivers for one configured as docs/security.md says."""
    from simulators.mosquitto import write_password_file  # noqa: PLC0415 (used here only)
    from tests.support.broker import free_port  # noqa: PLC0415

    work = tmp_path / "example"
    (work / "data").mkdir(parents=True)
    write_password_file(work / "passwd", ACCOUNTS)
    port = free_port()
    conf = _with(
        EXAMPLE_BROKER.read_text(),
        {
            "listener": f"{port} 127.0.0.1",
            "cafile": str(pki.ca),
            "certfile": str(pki.server_cert),
            "keyfile": str(pki.server_key),
            "password_file": str(work / "passwd"),
            "acl_file": str(EXAMPLE_ACL),
            "persistence_location": f"{work / 'data'}/",
            "log_dest": f"file {work / 'mosquitto.log'}",
        },
    )
    broker = start(
        "example",
        port=port,
        config_text=conf,
        tls=server_tls(pki, require_certificate=True),  # what the MES connects with
    )
    mes = mes_for(broker, account=True)
    await enqueue(store, ids(5))
    own = {"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key}
    # it asks for both: a client certificate, and an account
    account = {"username": AGENT, "password_file": password_file}
    failed, _ = await refused_attempt(
        make_config(broker, tls={"ca_file": pki.ca}, **account), store, "mqtt_connect_failed"
    )
    assert failed["reason"].startswith("the broker closed the connection before its CONNACK")
    refused, _ = await refused_attempt(make_config(broker, tls=own), store, "mqtt_connect_refused")
    assert refused["reason"] == "Not authorized"
    assert await outbox(store) == ids(5)

    async with running(make_config(broker, tls=own, **account), store):
        await drained(store)
    delivered_once(mes, ids(5))
