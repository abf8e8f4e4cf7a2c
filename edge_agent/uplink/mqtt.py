"""MQTT uplink (paho-mqtt 2.x): the outbox to the broker, in order, deleted only on success.

- Rows leave only from the outbox and leave it only when the broker answers with a success
  reason code (< 0x80). Under MQTT 5 a refused publish (e.g. 0x87 Not authorized from an ACL) is
  told apart from a delivered one only by that code (shared/DESIGN.md §6): a refused row stays,
  the uplink raises an alarm and holds the queue (order is kept), and retries later.
- At most ``inflight_window`` QoS 1 publishes are outstanding. After a reconnect, everything not
  yet acknowledged is sent again from the outbox: at least once, each message with its
  deterministic id, so the MES deduplicates.
- A retained status topic carries the birth (online), a fresh status every
  ``status_interval_s`` (outbox depth, oldest unacknowledged age, sources, open exceptions, from
  ``status``) and, as the last will, offline.
- MES commands: the session is **persistent** (MQTT 5: clean_start false and a session expiry
  interval; 3.1.1: clean_session false), subscribed at QoS 1 to ``{topic_base}/in/#``, so the
  broker queues the commands published while the agent is away and delivers them when it is
  back. Each command (its kind, the last topic level, and payload) goes to ``on_command`` on the
  event loop with an ``ack`` to call once the command is committed: the PUBACK is sent only then
  (paho's manual acknowledgement), so a command is never lost between the broker and the store.
- ``delivery = "mes-ack"``: a broker PUBACK is not delivery (shared/DESIGN.md §6): a broker that
  restarts without the MES's session drops what it accepted. In this mode a row leaves the outbox
  only when the MES acknowledges its id on ``{topic_base}/in/mes-ack``
  (``{"message_ids": [...]}``); what is not acknowledged within ``mes_ack_timeout_s`` is
  published again (same id: the MES deduplicates). Published-but-unacknowledged rows count
  against the in-flight window.

Security (docs/security.md): with ``[mqtt.tls]`` the connection is TLS only, the broker's
certificate verified against the configured CA and its name against ``mqtt.host`` (no switch
turns that off); a client certificate when configured; ``username``/``password`` with the
password read from its file or environment variable at every connection attempt (a rotated
password is picked up without a restart) and never logged. A connection that fails says why:
``mqtt_connect_failed`` carries the TCP or TLS reason (``certificate verify failed: unable to get
local issuer certificate``), ``mqtt_connect_refused`` the broker's CONNACK reason (``Not
authorized``); each once, then every 10th attempt or when the reason changes. A status the broker
refuses (its ACL) is logged as ``mqtt_status_refused``.

paho runs its network loop on its own thread; callbacks hop onto the asyncio loop with
``call_soon_threadsafe``, so every piece of uplink state is touched by the event loop only.
PUBACKs hop in batches (one wake-up of the loop for all that came meanwhile), rows are read ahead
and deleted by a task of their own: while draining a backlog the publishing path waits for
neither a query nor an fsync (docs/benchmarks.md has the before and after).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.commands import MesAck, Signing, signature_problem
from edge_agent.config import Config, MqttSection, openssl_message
from edge_agent.crashpoints import crash_point
from edge_agent.errors import ConfigError, EdgeAgentError, InputError, StoreError
from edge_agent.messages import StatusMessage
from edge_agent.metrics import LatencyHistogram

log = structlog.get_logger(__name__)

READ_AHEAD = 500  # outbox rows read in one query while draining (about 0.5 MB of messages)
ACK_GROUP_S = 0.005  # acknowledged rows wait this long for more to delete in the same commit


class UplinkError(EdgeAgentError):
    """The uplink cannot do its job (e.g. the broker refuses a publish)."""


class ConnectProblem(Exception):
    """Why a connection attempt failed, as the log tells it (never a secret)."""

    def __init__(self, reason: str, *, security: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        #: a TLS, certificate or credentials problem: a person has to act (logged as an error);
        #: otherwise the broker is unreachable (a warning: it may come back by itself)
        self.security = security


class OutboxRow(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def message_id(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


class Outbox(Protocol):
    """What the uplink needs of the store."""

    async def outbox_batch(self, limit: int, after_seq: int = 0) -> Sequence[OutboxRow]: ...
    async def acknowledge(self, seqs: Sequence[int]) -> int: ...
    async def acknowledge_ids(self, message_ids: Sequence[str]) -> int: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """The broker refused a publish: the row stays in the outbox."""

    seq: int
    message_id: str
    topic: str
    reason: str
    code: int


class MqttUplink:
    """Publishes the outbox and keeps the retained status; one per agent."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        retry_refused_s: float = 30.0,
        on_command: Callable[[str, bytes, Callable[[], None]], None] | None = None,
        status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._config = config
        self._on_command = on_command or _unsupported_command
        self._status_figures = status
        self._outbox = outbox
        self._retry_refused_s = retry_refused_s
        self.status_topic = f"{config.topic_base}/status"
        self.command_topics = f"{config.topic_base}/in/#"
        self.mes_ack_topic = f"{config.topic_base}/in/mes-ack"
        self._mes_ack = config.mqtt.delivery == "mes-ack"
        self._signing = config.commands.signing()
        self._awaiting: dict[str, float] = {}  # message id → when its PUBACK came (mes-ack)
        self._acked_ids: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        #: paho mid → (row, when it was handed to paho: time.monotonic())
        self._inflight: dict[int, tuple[OutboxRow, float]] = {}
        self._acked: list[int] = []
        # PUBACKs reach the event loop in batches: one wake-up of the loop for all the PUBACKs
        # paho read since the last one, not one per message (a wake-up is two system calls and
        # a trip round the loop: at full speed that was a quarter of the uplink's CPU)
        self._puback_lock = threading.Lock()
        self._puback_batch: list[tuple[int, ReasonCode]] = []
        self._window_free = asyncio.Event()
        self._acks_ready = asyncio.Event()
        self._epoch = 0  # bumped on every (re)connect: PUBACKs of an older session are ignored
        self.refusal: Refusal | None = None
        self._status_pending: set[int] = set()  # mids of status publishes not yet acknowledged
        self._status_refused = False
        self.published = 0
        self.reconnects = 0
        #: publish → PUBACK (as the event loop takes it), per outbox row (the metrics read it)
        self.publish_latency = LatencyHistogram()
        self.connect_failures = 0  # attempts since the last successful connect
        self._v5 = config.mqtt.protocol == "5"
        self._status_wake = asyncio.Event()
        self._ack_failing = False
        self.last_connect_problem: str | None = None  # the reason last logged
        self._connack_refused = False  # the CONNACK of this attempt said no (already reported)
        self._closing = False
        if self._v5:
            self._client = _Client(
                config.mqtt,
                CallbackAPIVersion.VERSION2,
                client_id=config.client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=True,
            )
        else:
            self._client = _Client(
                config.mqtt,
                CallbackAPIVersion.VERSION2,
                client_id=config.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
        self._client.max_inflight_messages_set(config.mqtt.inflight_window)
        self._client.max_queued_messages_set(0)
        # paho reconnects by itself on its network thread, doubling the delay up to the maximum.
        # In seconds, as configured (0.5 s by default), not rounded up to whole ones: paho types
        # them int but only adds and compares them with time.time() (its loop stop waits out the
        # current delay, so a whole second there was a second on every stop while refused)
        self._client.reconnect_delay_set(
            config.mqtt.reconnect_min_ms / 1000,  # type: ignore[arg-type]  # see above
            config.mqtt.reconnect_max_ms / 1000,  # type: ignore[arg-type]
        )
        self._client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_connect_fail = self._on_connect_fail

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> MqttUplink:
        self._loop = asyncio.get_running_loop()
        m = self._config.mqtt
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
            props.SessionExpiryInterval = m.session_expiry_s
            self._client.connect_async(
                m.host, m.port, keepalive=m.keepalive_s, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        self._client.loop_start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Publish the offline status, then disconnect cleanly (no last will)."""
        self._closing = True
        if self._connected.is_set():
            payload = await self._full_status("offline")
            info = self._client.publish(self.status_topic, payload, 1, True)
            # if the connection went meanwhile, the last will says offline instead
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        close_sockets(self._client)

    def notify(self) -> None:
        """New rows are in the outbox: wake the pump."""
        self._wake.set()

    def status_changed(self) -> None:
        """Something the status shows changed (a store fault): publish it now."""
        self._status_wake.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # ------------------------------------------------------------------ the pump

    async def run(self) -> None:
        """Publish the outbox, and the status, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._status_loop(), name="uplink.status")
            tg.create_task(self._publish_loop(), name="uplink.publish")
            tg.create_task(self._ack_loop(), name="uplink.acknowledge")

    async def _status_loop(self) -> None:
        """The retained status: soon after each connect, then every ``status_interval_s``."""
        while True:
            await self._connected.wait()
            self._status_wake.clear()
            payload = await self._full_status("online")
            if self._connected.is_set():
                self._publish_status(payload)
            await _wait_any(self._status_wake, self._config.mqtt.status_interval_s)

    async def _full_status(self, state: Literal["online", "offline"]) -> bytes:
        figures = await self._status_figures() if self._status_figures is not None else {}
        return self._status(state, figures)

    async def _publish_loop(self) -> None:
        while True:
            await self._connected.wait()
            epoch = self._epoch
            try:
                await self._pump(epoch)
            except _Reconnected:
                continue

    async def _pump(self, epoch: int) -> None:
        """Publish from the outbox head, in order, keeping the window full.

        Rows are read ahead (``READ_AHEAD`` a query) and deleted by :meth:`_ack_loop` as their
        PUBACKs come, so neither a read nor a delete's fsync stalls publishing. A fresh session
        and a rescan from the head first delete what is already acknowledged: a row the broker
        has is not sent again just because its delete had not happened yet.
        """
        after = 0
        ahead: deque[OutboxRow] = deque()
        window = self._config.mqtt.inflight_window
        await self._flush_acks()
        while True:
            self._check(epoch)
            if self.refusal is not None:
                await self._hold_after_refusal(epoch)
                after = 0
                ahead.clear()
                continue
            if self._awaiting and self._mes_ack_overdue():
                log.warning("mes_ack_overdue", unacknowledged=len(self._awaiting))
                self._awaiting.clear()
                after = 0  # publish again from the head: the MES deduplicates
                ahead.clear()
                continue
            room = window - len(self._inflight) - len(self._awaiting)
            if room <= 0:
                self._window_free.clear()
                await _wait_any(self._window_free, timeout=1.0)
                continue
            if not ahead:
                self._wake.clear()
                ahead.extend(await self._outbox.outbox_batch(max(room, READ_AHEAD), after))
                self._check(epoch)
                if not ahead:
                    await _wait_any(self._wake, timeout=1.0)
                    if not self._inflight and not self._awaiting:
                        await self._flush_acks()
                        after = 0  # rescan from the head: anything left there must go again
                    continue
            for _ in range(min(room, len(ahead))):
                row = ahead.popleft()
                info = self._client.publish(row.topic, row.payload, qos=1)
                crash_point("uplink.after_publish")
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _Reconnected  # not connected any more: wait and start again
                self._inflight[info.mid] = (row, time.monotonic())
                after = row.seq

    async def _ack_loop(self) -> None:
        """Delete acknowledged rows as they come, all that came during the last delete in one
        commit: the group grows by itself with the rate, and publishing never waits for it."""
        group = max(1, self._config.mqtt.inflight_window // 2)
        while True:
            await self._acks_ready.wait()
            if len(self._acked) < group:  # let a few more come: one fsync for many rows
                await asyncio.sleep(ACK_GROUP_S)
            self._acks_ready.clear()
            await self._flush_acks()
            if self._ack_failing:  # the store cannot commit: try again in a while
                await asyncio.sleep(1.0)
                self._acks_ready.set()

    async def _hold_after_refusal(self, epoch: int) -> None:
        """A refused row blocks the queue (order is kept) until a retry succeeds.

        While it waits, acknowledgements of the rows published before it still arrive and are
        flushed. A reconnect does not end the wait (a new connection does not change the
        broker's rules; mosquitto 2.0 even closes the connection after a refusal,
        eclipse-mosquitto/mosquitto#2579): the next retry is ``retry_refused_s`` after the
        latest connect, from the outbox head.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_refused_s
        while (remaining := deadline - loop.time()) > 0:
            await self._flush_acks()
            self._check(epoch)
            self._wake.clear()
            await _wait_any(self._wake, timeout=min(1.0, remaining))
        await self._flush_acks()
        self._check(epoch)
        self.refusal = None

    def _check(self, epoch: int) -> None:
        if epoch != self._epoch or not self._connected.is_set():
            raise _Reconnected

    async def _flush_acks(self) -> None:
        """Delete what was acknowledged. A store that cannot commit (a full disk) keeps the
        rows: they are deleted once it can (until then a restart would send them again, with
        the same ids), and publishing goes on meanwhile."""
        if self._acked or self._acked_ids:
            crash_point("uplink.before_outbox_delete")
        if self._acked:
            done, self._acked = self._acked, []
            try:
                await self._outbox.acknowledge(done)
            except StoreError as exc:
                self._acked = done + self._acked
                self._acknowledge_failed(exc)
                return
            self.published += len(done)
        if self._acked_ids:
            ids, self._acked_ids = self._acked_ids, []
            try:
                self.published += await self._outbox.acknowledge_ids(ids)
            except StoreError as exc:
                self._acked_ids = ids + self._acked_ids
                self._acknowledge_failed(exc)
                return
        if self._ack_failing:
            self._ack_failing = False
            log.info("outbox_acknowledge_recovered")

    def _acknowledge_failed(self, exc: StoreError) -> None:
        if not self._ack_failing:  # once per fault, not once per try
            self._ack_failing = True
            log.error("outbox_acknowledge_failed", error=str(exc))

    def _mes_ack_overdue(self) -> bool:
        assert self._loop is not None
        oldest = min(self._awaiting.values())
        return self._loop.time() - oldest > self._config.mqtt.mes_ack_timeout_s

    # ------------------------------------------------------------------ paho callbacks (thread)

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _seal_pubacks(self) -> None:
        """A new batch from here: the PUBACKs of a session are handled before its end."""
        with self._puback_lock:
            self._puback_batch = []

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._seal_pubacks()
        self._call(self._connected_now, rc, bool(flags.session_present))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        problem = self._client.problem or ConnectProblem("no reason given", security=False)
        self._call(self._connect_failed, problem)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._seal_pubacks()
        self._call(self._disconnected_now, rc, self._client.socket_error)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        with self._puback_lock:
            batch = self._puback_batch
            batch.append((mid, rc))
        if len(batch) == 1:  # the first of a batch: the loop takes this one and what follows
            self._call(self._pubacks, batch)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self.mes_ack_topic:
            # everything below {topic_base}/in/: a deeper topic is an unknown kind, refused
            kind = message.topic.removeprefix(self.command_topics.removesuffix("#"))
            mid, qos = message.mid, message.qos

            def ack() -> None:  # once committed (any thread: paho queues the PUBACK)
                if qos > 0:
                    client.ack(mid, qos)

            if message.retain and kind == "heartbeat":
                ack()  # a retained heartbeat is an old clock reading: never a time check
                return
            self._call(self._on_command, kind, bytes(message.payload), ack)
            return
        if message.qos > 0:
            client.ack(message.mid, message.qos)  # acknowledgements are idempotent
        if not self._mes_ack:
            return  # acknowledgements mean nothing when the broker's PUBACK is delivery
        try:
            ids = parse_mes_ack(bytes(message.payload), self._signing)
        except InputError as exc:
            log.warning("mes_ack_invalid", error=str(exc), payload=message.payload[:200])
            return
        self._call(self._mes_acked, ids)

    # ------------------------------------------------------------------ on the event loop

    def _connected_now(self, rc: ReasonCode, session_present: bool) -> None:
        if rc.is_failure:
            self._connack_refused = True  # the broker closes the connection next: not news
            self._report(
                "mqtt_connect_refused",
                ConnectProblem(str(rc), security=True),
                code=hex(rc.value),
                **({"hint": _CONNACK_HINTS[rc.value]} if rc.value in _CONNACK_HINTS else {}),
            )
            return
        self._epoch += 1
        self.connect_failures = 0
        self.last_connect_problem = None
        self._inflight.clear()
        self._awaiting.clear()  # published again from the head in this session
        if not session_present:  # a kept session keeps its subscription (and its queue)
            self._client.subscribe(self.command_topics, qos=1)
        self._publish_status(self._status("online"))
        self._connected.set()
        self._wake.set()
        self._status_wake.set()
        log.info(
            "mqtt_connected",
            host=self._config.mqtt.host,
            port=self._config.mqtt.port,
            tls=self._config.mqtt.tls is not None,
            session_present=session_present,
        )

    def _publish_status(self, payload: bytes) -> None:
        info = self._client.publish(self.status_topic, payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._status_pending.add(info.mid)

    def _connect_failed(self, problem: ConnectProblem) -> None:
        if not self._closing:
            self._report("mqtt_connect_failed", problem)

    def _report(self, event: str, problem: ConnectProblem, **fields: Any) -> None:
        """A failed attempt: logged once, then every 10th attempt, and whenever the reason
        changes (a broker down for an hour is one fact, not thousands; a broker that comes
        back but refuses the password is a new one)."""
        self.connect_failures += 1
        n = self.connect_failures
        if n == 1 or n % 10 == 0 or problem.reason != self.last_connect_problem:
            m = self._config.mqtt
            level = log.error if problem.security else log.warning
            level(event, host=m.host, port=m.port, reason=problem.reason, attempts=n, **fields)
        self.last_connect_problem = problem.reason

    def _disconnected_now(self, rc: ReasonCode, socket_error: str | None) -> None:
        was_connected = self._connected.is_set()
        if was_connected:
            self.reconnects += 1
        self._status_pending.clear()
        self._connected.clear()
        self._epoch += 1
        self._inflight.clear()  # not acknowledged: they stay in the outbox and go again
        self._awaiting.clear()
        self._window_free.set()
        if was_connected:
            log.warning("mqtt_disconnected", reason=str(rc), **_error_field(socket_error))
        elif self._connack_refused:
            self._connack_refused = False  # the end of a refused attempt, reported with its reason
        elif not self._closing:
            # the broker hung up before its CONNACK: a TLS listener spoken to in plain TCP, a
            # client certificate it refused (TLS 1.3 says so only now), too many connections
            why = f": {socket_error}" if socket_error else ""
            self._report(
                "mqtt_connect_failed",
                ConnectProblem(
                    f"the broker closed the connection before its CONNACK{why}", security=True
                ),
            )

    def _pubacks(self, batch: list[tuple[int, ReasonCode]]) -> None:
        with self._puback_lock:
            if self._puback_batch is batch:
                self._puback_batch = []  # sealed: later PUBACKs start a batch of their own
        now = time.monotonic()  # one clock read for the batch
        for mid, rc in batch:
            self._puback(mid, rc, now)

    def _puback(self, mid: int, rc: ReasonCode, now: float) -> None:
        sent = self._inflight.pop(mid, None)
        self._window_free.set()
        if sent is None:  # the status message, or a PUBACK from before a reconnect
            if mid in self._status_pending:
                self._status_pending.discard(mid)
                self._status_answered(rc)
            return
        row, at = sent
        self.publish_latency.observe(now - at)
        code = rc.value
        if code >= 0x80:
            if self.refusal is None:
                self.refusal = Refusal(row.seq, row.message_id, row.topic, str(rc), code)
                log.error(
                    "mqtt_publish_refused",
                    message_id=row.message_id,
                    topic=row.topic,
                    reason=str(rc),
                    code=hex(code),
                )
            return
        if self._mes_ack:
            assert self._loop is not None
            self._awaiting[row.message_id] = self._loop.time()
        else:
            self._acked.append(row.seq)
            self._acks_ready.set()

    def _status_answered(self, rc: ReasonCode) -> None:
        """A refused status (the broker's ACL does not allow the agent's status topic) is
        logged once until a status goes through again: the MES sees the agent as offline."""
        if rc.value >= 0x80 and not self._status_refused:
            log.error(
                "mqtt_status_refused", topic=self.status_topic, reason=str(rc), code=hex(rc.value)
            )
        self._status_refused = rc.value >= 0x80

    def _mes_acked(self, ids: list[str]) -> None:
        for message_id in ids:
            self._awaiting.pop(message_id, None)
        self._acked_ids += ids  # deleted by id, even if acknowledged after a reconnect
        self._window_free.set()
        self._acks_ready.set()

    def _status(
        self, state: Literal["online", "offline"], figures: Mapping[str, Any] | None = None
    ) -> bytes:
        """The status message: ``figures`` (outbox, sources, exceptions) when known; the last
        will and the first birth carry none."""
        p = self._config.place
        message = StatusMessage(
            agent=self._config.agent.id,
            site=p.site,
            area=p.area,
            line=p.line,
            state=state,
            software=__version__,
            at=datetime.now(UTC),
            **(figures or {}),
        )
        return message.model_dump_json(by_alias=True).encode()


#: what an operator checks when the broker refuses the connection (MQTT 5 reason codes; paho
#: maps the 3.1.1 CONNACK return codes 4 and 5 to 0x86 and 0x87)
_CONNACK_HINTS = {
    0x86: "check mqtt.username and mqtt.password against the broker's password file",
    0x87: "check mqtt.username and mqtt.password, and the broker's ACL for this account "
    "(mosquitto answers a wrong password with Not authorized too)",
}


class _Client(mqtt.Client):
    """paho's client, keeping why a connection failed: paho catches the OSError of an attempt
    (refused, timed out, a TLS handshake or a certificate that does not verify) and tells
    ``on_connect_fail`` nothing of it; a socket error on an open connection it tells only its
    logger. Each attempt also reads the password again (a rotated one needs no restart)."""

    def __init__(self, mqtt_config: MqttSection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mqtt = mqtt_config
        self.problem: ConnectProblem | None = None  # why the last attempt failed
        self.socket_error: str | None = None  # paho's last socket error on this connection
        tap = logging.Logger("edge_agent.uplink.paho", logging.ERROR)  # not in the hierarchy
        tap.addHandler(_SocketErrorTap(self))
        self.enable_logger(tap)
        if mqtt_config.tls is not None:
            try:
                context = mqtt_config.tls.ssl_context()
            except ValueError as exc:
                raise ConfigError([f"mqtt.tls: {exc}"]) from None
            context.sslsocket_class = _ClosingSSLSocket
            self.tls_set_context(context)
        self._set_credentials()

    def _set_credentials(self) -> None:
        m = self._mqtt
        if m.username is None:
            return
        try:
            password = m.password.reveal() if m.password is not None else None
        except ValueError as exc:  # names the file or variable, never the value
            raise ConfigError([f"mqtt.password: {exc}"]) from None
        self.username_pw_set(m.username, password)

    def reconnect(self) -> MQTTErrorCode:
        self.problem = None
        self.socket_error = None
        try:
            self._set_credentials()
        except ConfigError as exc:  # paho retries a failed attempt: this one fails, and says why
            self.problem = ConnectProblem("; ".join(exc.problems), security=True)
            raise _CredentialsUnreadable from None
        try:
            return super().reconnect()
        except OSError as exc:
            self.problem = _connect_problem(exc)
            raise


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho drops the socket of a failed attempt
    unclosed (a file descriptor until the garbage collector finds it, once per retry)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException as exc:
            self.close()
            if isinstance(exc, ConnectionError):  # the peer hung up on the handshake: say so
                raise _HandshakeFailed(exc.errno, exc.strerror) from exc
            raise


class _HandshakeFailed(ConnectionError):
    """The connection broke during the TLS handshake (not a TLS error: a reset, an EOF)."""


class _CredentialsUnreadable(OSError):
    """The password file or variable went away: the attempt fails (paho retries)."""


class _SocketErrorTap(logging.Handler):
    """Keeps the error paho logs when a connection breaks (``failed to receive on socket: ...``)
    as the reason of the disconnect; paho's other messages are not the agent's log."""

    def __init__(self, client: _Client) -> None:
        super().__init__(logging.ERROR)
        self._client = client

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self._client.socket_error = openssl_message(
            message.removeprefix("failed to receive on socket: ").removeprefix(
                "timeout on socket: "
            )
        )


def _connect_problem(exc: OSError) -> ConnectProblem:
    """The reason a connection attempt failed, in the words of the layer that failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        # OpenSSL's words, which an operator can search for
        return ConnectProblem(
            f"TLS: certificate verify failed: {exc.verify_message}", security=True
        )
    if isinstance(exc, ssl.SSLError):
        return ConnectProblem(f"TLS: {openssl_message(str(exc))}", security=True)
    if isinstance(exc, _HandshakeFailed):
        return ConnectProblem(
            f"TLS: the broker broke off the handshake ({exc.strerror or 'no reason'}): is the "
            "port a TLS listener?",
            security=True,
        )
    if isinstance(exc, TimeoutError):
        return ConnectProblem("timed out", security=False)
    if isinstance(exc, socket.gaierror):
        return ConnectProblem(f"cannot resolve the host name: {exc.strerror}", security=False)
    return ConnectProblem(exc.strerror or str(exc) or type(exc).__name__, security=False)


def _error_field(socket_error: str | None) -> dict[str, str]:
    return {"error": socket_error} if socket_error else {}


def _unsupported_command(kind: str, payload: bytes, ack: Callable[[], None]) -> None:
    log.warning("mes_command_not_supported", kind=kind, size=len(payload))
    ack()


def parse_mes_ack(payload: bytes, signing: Signing | None = None) -> list[str]:
    """The message ids of an MES acknowledgement (:class:`~edge_agent.commands.MesAck`);
    anything else raises InputError naming the problem (the uplink logs it and goes on). With
    ``signing``, an acknowledgement must be signed (a forged one would empty the outbox)."""
    try:
        ack = MesAck.model_validate_json(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error["loc"]) or "payload"
        raise InputError(f"mes-ack: {where}: {error['msg']}") from None
    if signing is not None:
        # valid JSON object: MesAck parsed it; an acknowledgement is idempotent, so its age
        # does not matter, only who made it
        problem = signature_problem(json.loads(payload), signing, datetime.now(UTC), timed=False)
        if problem is not None:
            raise InputError(f"mes-ack: {problem}")
    return ack.message_ids


def close_sockets(client: mqtt.Client) -> None:
    """Close the wake-up socket pair paho opens in ``loop_start``.

    paho closes it only in ``__del__``; when the client dies in a reference cycle the sockets are
    finalised first and warn ``ResourceWarning: unclosed socket``. paho has no public close.
    """
    client._reset_sockets()


async def _wait_any(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (a periodic re-check, not a deadline)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class _Reconnected(Exception):
    """The session changed under the pump: start again from the outbox head."""
