"""OPC UA signal source (asyncua): one connection to one PLC endpoint, one work centre.

An adapter only: it reads, subscribes, writes and reports quality; what a value means (a counter
delta, a handshake edge, a weighing) is decided by the engine.

- **Connect.** A fresh :class:`asyncua.Client` per connection. Every configured node is read
  explicitly first and emitted with ``Origin.READ`` (after ``SourceStatus(connected=True)``), in
  :data:`SIGNAL_ORDER`: the order, the counters, the handshake quantities and the scale values,
  ``complete_request`` last. Only then are the monitored items created, so every notification
  that follows is at least as new as the READ it follows (the initial notification of each item
  repeats the value read, or a newer one; the engine treats a repeat as a duplicate).
- **Security** (``[sources.security]``, docs/security.md). Before every session the client asks
  the PLC's endpoints (GetEndpoints over the unsecured discovery channel, as every OPC UA client
  does) and takes exactly the configured policy and mode, or none: no fallback to less security
  nor to more. With Basic256Sha256 the endpoint must present exactly the pinned certificate, and
  the secured channel is then opened to the pinned certificate (not to what discovery said), with
  the agent's application certificate, whose ApplicationUri the client sends. A password is sent
  encrypted (by the user token policy, or inside a SignAndEncrypt channel), never in clear; and
  asyncua's DEBUG record of the ActivateSession request, which holds it, is dropped. A refusal,
  the agent's or the PLC's (untrusted certificate, wrong user), is :class:`SecurityRefused`:
  logged as ``opcua_security_refused`` with its reason, reported in the source's status, and
  retried with the backoff like any failed connection. The files are read at every attempt.
- **Notifications.** One subscription at the configured publishing interval; one monitored item
  per signal node with the configured sampling interval and queue size (more than one, so a burst
  between two publishes is queued, not overwritten). The data changes of one publish response are
  collected and emitted sorted by source timestamp, ties broken by :data:`SIGNAL_ORDER` (the
  order before a counter zeroed by the same order change, ``complete_request`` last).
  ``emit`` is awaited by a delivery task of this source, never inside asyncua's receive path, so
  a slow engine cannot stall asyncua (the events wait in an unbounded queue meanwhile).
- **Flow refresh.** A subscription reports changes only, so a flow totalizer that stands still
  says nothing, and the engine cannot close a time slice. With ``flow`` configured, a task of
  the connection reads the flow node about every :data:`~edge_agent.sources.REFRESH_S` seconds
  (one Read service call, ``MaxAge`` 0, both timestamps). When the value read is Good and the
  same value, quality and status as the last flow event emitted, it is emitted again with
  ``Origin.REFRESH``: "the totalizer still had this value at ``source_time``".
  ``source_time`` is a moment on the server's clock (the one that stamps the PLC's values),
  never the SourceTimestamp (when the value last changed): the later of the value's
  ServerTimestamp and the moment the server answered the previous refresh read (its response
  header's timestamp). Both are at or before this read, and the totalizer only counts up, so the
  same value at the last flow event and at this read means it held all the while in between. The
  previous answer is needed because a server may give as ServerTimestamp when the value was
  last written, not when it was read (asyncua's server does), so a refresh may lag its read by
  up to ``REFRESH_S``; only a server that stamps neither its answers nor its values gets the
  moment the answer arrived (``device_time=False``). A refresh goes through the same path as the
  notifications, after those already taken from asyncua, and never with a ``source_time`` at or
  before the last flow event's (it is skipped then: it would say nothing new). A value that
  differs is skipped too: the subscription delivers that change, with its own timestamp. A read
  that fails is skipped until the next one (logged once): a dead connection is found by the
  watchdog and the subscription, and a server that refuses the read must not cost a reconnect
  (and a full READ) every second.
- **Deadband.** The configured absolute ``subscription.deadband`` applies to the analog scale
  nodes (``scale.weight``, ``scale.tare``) only. Counters, the order, the handshake quantities and
  booleans are never filtered: a suppressed counter step or edge would be a lost count.
- **Values.** Boolean → ``bool``; integer types → ``int``; Float/Double → ``Decimal`` via the
  shortest repr (never a float to the engine); String → ``str``; a null value → ``None``. A value
  of any other type (an array, a date, a structure) cannot be a signal: it is emitted as ``None``
  with ``Quality.BAD`` and status ``BadTypeMismatch`` and logged, so it never produces a posting.
- **Reconnect.** A lost connection (server stopped, socket cut, the server-state probe of
  asyncua's watchdog timing out, the subscription reported dead) emits
  ``SourceStatus(connected=False)``. The client is then dropped, not reused (reconnecting the same
  client object could hang before asyncua 2, asyncua #1660; asyncua's own ``auto_reconnect`` is
  off), and a new one connects after a back-off from ``reconnect_min_ms``, doubling to
  ``reconnect_max_ms``, with jitter; then subscribe and read everything again. It never gives up
  while running; cancelling :meth:`OpcUaSource.run` disconnects and leaves no task behind.
- **Writes.** :meth:`OpcUaSource.write` writes the value alone (no status, no timestamps: many PLCs
  refuse a write that carries them) with the node's own data type, and raises
  :class:`~edge_agent.errors.SignalError` naming the signal and node when not connected, on a
  timeout, or when the server refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.node import Node
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import struct_from_binary
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent import certs
from edge_agent.config import OpcUaSecurity, Signals
from edge_agent.config import OpcUaSource as OpcUaSourceConfig
from edge_agent.errors import EdgeAgentError, SignalError
from edge_agent.sources import (
    REFRESH_S,
    SIGNAL_ORDER,
    Emit,
    Origin,
    Quality,
    SignalEvent,
    SignalValue,
    SourceStatus,
    backoff_delay,
    run_delivering,
)

log = structlog.get_logger(__name__)

_RANK: Final = {name: rank for rank, name in enumerate(SIGNAL_ORDER)}

#: the only nodes a deadband may filter: analog values, where a small change is noise
ANALOG_SIGNALS: Final = frozenset({"scale.weight", "scale.tare"})

_INTEGER_TYPES: Final = frozenset(
    {
        ua.VariantType.SByte,
        ua.VariantType.Byte,
        ua.VariantType.Int16,
        ua.VariantType.UInt16,
        ua.VariantType.Int32,
        ua.VariantType.UInt32,
        ua.VariantType.Int64,
        ua.VariantType.UInt64,
    }
)
_INTEGER_RANGES: Final = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
#: OPC UA's null DateTime, which is no timestamp
_NULL_TIME: Final = datetime(1601, 1, 1, tzinfo=UTC)
_DISCONNECT_TIMEOUT_S: Final = 2.0

# Library errors that mean "this connection (attempt) failed"; anything else is a bug and
# propagates. ConnectionError and socket errors are OSErrors; asyncua's own are UaErrors.
_CONNECTION_ERRORS: Final = (OSError, TimeoutError, UaError)


def signal_nodes(signals: Signals) -> dict[str, str]:
    """The configured signals and their node ids, in :data:`SIGNAL_ORDER`."""
    scale = signals.scale
    configured = {
        "order": signals.order,
        "good": signals.good,
        "scrap": signals.scrap,
        "flow": signals.flow,
        "feed_lot": signals.feed_lot,
        "complete_good": signals.complete_good,
        "complete_scrap": signals.complete_scrap,
        "scale.tare": scale.tare if scale else None,
        "scale.weight": scale.weight if scale else None,
        "scale.stable": scale.stable if scale else None,
        "complete_ack": signals.complete_ack,
        "complete_request": signals.complete_request,
    }
    return {name: sig.node for name in SIGNAL_ORDER if (sig := configured[name]) is not None}


def quality_of(status: ua.StatusCode | None) -> Quality:
    """OPC UA severity → :class:`Quality` (a missing status code means Good)."""
    if status is None or status.is_good():
        return Quality.GOOD
    if status.is_uncertain():
        return Quality.UNCERTAIN
    return Quality.BAD


def status_name(status: ua.StatusCode | None) -> str:
    """The status code's name, without its info bits (e.g. the queue-overflow flag)."""
    if status is None:
        return "Good"
    return ua.StatusCode(ua.UInt32(status.value & 0xFFFF0000)).name


def has_overflow(status: ua.StatusCode | None) -> bool:
    """The monitored item's queue overflowed: values were discarded before this one."""
    # InfoType "DataValue" (bit 10) with the Overflow info bit (bit 7), OPC UA Part 4, 7.39.1
    return status is not None and status.value & 0x480 == 0x480


def convert(variant: ua.Variant | None) -> tuple[SignalValue, bool]:
    """An OPC UA value → (a signal value, whether the type can be a signal at all)."""
    if variant is None or variant.Value is None or variant.VariantType is ua.VariantType.Null:
        return None, True
    to_signal = _CONVERTERS.get(variant.VariantType)
    if to_signal is None or variant.is_array or isinstance(variant.Value, list | tuple):
        return None, False
    return to_signal(variant.Value), True


def _float32_decimal(value: float) -> Decimal:
    """The shortest decimal that reads back as the same 32-bit float (0.1f → 0.1, not the
    0.100000001490116… its double repr would give)."""
    if not math.isfinite(value):
        return Decimal(repr(value))
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            return Decimal(text)
    return Decimal(repr(value))  # pragma: no cover - 9 significant digits always round-trip


_CONVERTERS: Final[dict[ua.VariantType, Callable[[Any], SignalValue]]] = {
    ua.VariantType.Boolean: bool,
    **dict.fromkeys(_INTEGER_TYPES, int),
    ua.VariantType.Double: lambda value: Decimal(repr(float(value))),
    ua.VariantType.Float: lambda value: _float32_decimal(float(value)),
    ua.VariantType.String: str,
}


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def server_moment(moment: datetime | None) -> datetime | None:
    """A timestamp the server gave, in UTC; None when it gave none (or OPC UA's null one)."""
    moment = _aware(moment)
    return moment if moment is not None and moment > _NULL_TIME else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def in_source_order(events: Iterable[SignalEvent]) -> list[SignalEvent]:
    """Sorted by source timestamp; ties by :data:`SIGNAL_ORDER` (the order first,
    ``complete_request`` last). A value without a source timestamp cannot be placed in time:
    it goes first."""
    return sorted(
        events,
        key=lambda e: (e.source_time or _EARLIEST, _RANK.get(e.signal, len(_RANK))),
    )


# ----------------------------------------------------------------------------------- security

_MODES: Final = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_POLICY_URIS: Final = {
    "None": security_policies.SecurityPolicyNone.URI,
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256.URI,
}
_MODE_NAMES: Final = {
    ua.MessageSecurityMode.None_: "None",
    ua.MessageSecurityMode.Sign: "Sign",
    ua.MessageSecurityMode.SignAndEncrypt: "SignAndEncrypt",
}
#: status codes by which a server refuses the user (the identity token)
_USER_REFUSALS: Final = frozenset(
    {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"}
)
#: status codes by which a server refuses the agent's application certificate or channel
_CERTIFICATE_REFUSALS: Final = frozenset(
    {"BadSecurityChecksFailed", "BadSecurityPolicyRejected", "BadNoValidCertificates"}
)


class SecurityRefused(EdgeAgentError):
    """No connection: it would not be as secure as configured, or the PLC refused the agent.

    ``reason`` is a stable name (``endpoint_not_offered``, ``server_certificate_mismatch``,
    ``user_token_not_offered``, ``password_in_clear``, ``certificate_rejected``,
    ``user_rejected``, ``security_files_unreadable``); ``details`` is what a person compares to
    fix it (thumbprints, the endpoints offered), never a secret.
    """

    def __init__(self, reason: str, message: str, **details: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.details = details


@dataclass(frozen=True, slots=True)
class SecurityMaterial:
    """The agent's certificate and key and the pinned PLC certificate, as DER bytes (read at
    every connection attempt: files replaced on disk are used from the next one)."""

    certificate: bytes
    private_key: bytes
    server_certificate: bytes
    application_uri: str

    @classmethod
    def load(cls, security: OpcUaSecurity) -> SecurityMaterial:
        assert security.certificate is not None
        assert security.private_key is not None
        assert security.server_certificate is not None
        try:
            certificate = certs.read_certificate(security.certificate)
            password = security.private_key_password
            key = certs.read_private_key(
                security.private_key, password.reveal_bytes() if password else None
            )
            pinned = certs.read_certificate(security.server_certificate)
        except ValueError as exc:
            raise SecurityRefused("security_files_unreadable", str(exc)) from None
        uri = certs.application_uri(certificate)
        if uri is None or not certs.key_matches(certificate, key):
            raise SecurityRefused(
                "security_files_unreadable",
                f"{str(security.certificate)!r} and {str(security.private_key)!r} are no "
                "longer a certificate with an ApplicationUri and its key",
            )
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(certs.der(certificate), key_der, certs.der(pinned), uri)


def _endpoint_name(endpoint: ua.EndpointDescription) -> str:
    """``Basic256Sha256/SignAndEncrypt``, ``None``: policy and mode as configured."""
    policy = (endpoint.SecurityPolicyUri or "").rpartition("#")[2] or "?"
    if endpoint.SecurityMode is ua.MessageSecurityMode.None_ and policy == "None":
        return "None"
    return f"{policy}/{_MODE_NAMES.get(endpoint.SecurityMode, str(endpoint.SecurityMode))}"


def check_endpoints(
    endpoints: Iterable[ua.EndpointDescription],
    security: OpcUaSecurity,
    material: SecurityMaterial | None,
) -> ua.EndpointDescription:
    """The endpoint with exactly the configured policy and mode, presenting the pinned
    certificate and accepting the configured kind of user; :class:`SecurityRefused` otherwise.
    Never another endpoint: no fallback to less security, nor to more."""
    offered = [e for e in endpoints if (e.EndpointUrl or "").startswith(ua.OPC_TCP_SCHEME)]
    mode = _MODES[security.mode] if security.mode else ua.MessageSecurityMode.None_
    wanted = _security_name(security)
    matching = [
        e
        for e in offered
        if e.SecurityPolicyUri == _POLICY_URIS[security.policy] and e.SecurityMode == mode
    ]
    if not matching:
        names = ", ".join(dict.fromkeys(_endpoint_name(e) for e in offered)) or "nothing"
        raise SecurityRefused(
            "endpoint_not_offered",
            f"the PLC does not offer {wanted} (it offers: {names}); the agent connects with "
            "the configured security only",
            wanted=wanted,
            offered=names,
        )
    endpoint = matching[0]
    if material is not None:
        presented = certs.first_certificate(endpoint.ServerCertificate or b"")
        if presented != material.server_certificate:
            expected = certs.thumbprint(material.server_certificate)
            got = certs.thumbprint(presented) if presented else "none"
            raise SecurityRefused(
                "server_certificate_mismatch",
                f"the PLC presents a certificate with SHA-1 thumbprint {got}, not the pinned "
                f"one ({expected}): another device, or a PLC certificate that was renewed "
                "(pin the new one only after checking its thumbprint on the PLC)",
                expected_thumbprint=expected,
                offered_thumbprint=got,
            )
    tokens = {t.TokenType for t in endpoint.UserIdentityTokens or []}
    token = ua.UserTokenType.UserName if security.username else ua.UserTokenType.Anonymous
    if token not in tokens:
        names = ", ".join(sorted(t.name for t in tokens)) or "none"
        what = "a user name and password" if security.username else "anonymous sessions"
        raise SecurityRefused(
            "user_token_not_offered",
            f"the PLC does not accept {what} on {wanted} (it accepts: {names})",
            wanted=token.name,
            offered=names,
        )
    return endpoint


def _security_name(security: OpcUaSecurity) -> str:
    return f"{security.policy}/{security.mode}" if security.mode else security.policy


def _refusal(
    exc: UaStatusCodeError, security: OpcUaSecurity, material: SecurityMaterial | None
) -> SecurityRefused | None:
    """The PLC's refusal of the session as a :class:`SecurityRefused`, when it is one."""
    name = status_name(ua.StatusCode(exc.code))
    if name in _USER_REFUSALS:
        who = f"the user {security.username!r}" if security.username else "an anonymous session"
        hint = (
            "wrong user name or password, or a user the PLC does not know"
            if security.username
            else "configure username and password"
        )
        return SecurityRefused(
            "user_rejected", f"the PLC refused {who} ({name}): {hint}", status=name
        )
    if name.startswith("BadCertificate") or name in _CERTIFICATE_REFUSALS:
        if material is None:
            return SecurityRefused(
                "certificate_rejected", f"the PLC refused the connection ({name})", status=name
            )
        thumb = certs.thumbprint(material.certificate)
        return SecurityRefused(
            "certificate_rejected",
            f"the PLC refused the agent's certificate {str(security.certificate)!r} ({name}): "
            f"add it to the PLC's trusted certificates (SHA-1 thumbprint {thumb})",
            status=name,
            certificate_thumbprint=thumb,
        )
    return None


class _Client(Client):
    """asyncua's client, refusing to send a password in clear."""

    async def activate_session(
        self,
        username: str | None = None,
        password: str | None = None,
        certificate: x509.Certificate | None = None,
    ) -> ua.ActivateSessionResult:
        if password:
            # the token policy of the endpoint the session was created on (in the server's
            # signed CreateSession answer): without one of its own, the password travels
            # as it is, readable unless the channel encrypts
            policy = self.server_policy(ua.UserTokenType.UserName).SecurityPolicyUri
            plain = policy in (None, "", security_policies.SecurityPolicyNone.URI)
            if plain and self.security_policy.Mode != ua.MessageSecurityMode.SignAndEncrypt:
                raise SecurityRefused(
                    "password_in_clear",
                    "the PLC asks for the password unencrypted on a channel that does not "
                    "encrypt (mode Sign): not sent; use mode SignAndEncrypt",
                )
        return await super().activate_session(username, password, certificate)


class _NoIdentityTokens(logging.Filter):
    """Drops asyncua's debug record of each request when it is an ActivateSession: its user
    identity token holds the password (unencrypted when the channel encrypts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(arg, ua.ActivateSessionRequest) for arg in _args(record))


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)


logging.getLogger("asyncua.client.ua_client.UASocketProtocol").addFilter(_NoIdentityTokens())


@dataclass(frozen=True, slots=True)
class _Signal:
    name: str
    address: str
    node_id: ua.NodeId


class OpcUaSource:
    """One OPC UA connection serving one work centre; implements the ``Source`` protocol.

    ``request_timeout_s`` bounds every request (reads, writes, connect steps);
    ``watchdog_interval_s`` is how often asyncua probes the server state, which is how a
    connection that died without closing its socket is found.
    """

    def __init__(
        self,
        config: OpcUaSourceConfig,
        *,
        request_timeout_s: float = 4.0,
        watchdog_interval_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self._request_timeout_s = request_timeout_s
        self._watchdog_interval_s = watchdog_interval_s
        self._rng = rng or random.Random()
        self._signals = {
            name: _Signal(name, address, ua.NodeId.from_string(address))
            for name, address in signal_nodes(config.signals).items()
        }
        self._connection: _Connection | None = None

    @property
    def signals(self) -> dict[str, str]:
        """Signal name → node id, in :data:`SIGNAL_ORDER`."""
        return {name: sig.address for name, sig in self._signals.items()}

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.usable

    # ------------------------------------------------------------------ run

    async def run(self, emit: Emit) -> None:
        """Connect, read, subscribe and emit until cancelled; reconnect with back-off."""
        await run_delivering(f"opcua[{self.name}]", self._connect_loop, emit)

    async def _connect_loop(self, push: Callable[[SignalEvent | SourceStatus], None]) -> None:
        endpoint = self.config.endpoint
        reported: bool | None = None  # the connection state last emitted
        reported_detail = ""  # and why, when it was "not connected"
        attempt = 0
        while True:
            connection = _Connection(self, push)
            try:
                reads = await connection.open()
            except Exception as exc:  # whatever failed, try again: never give up
                await connection.close()
                refused = isinstance(exc, SecurityRefused)
                if not refused and not isinstance(exc, _CONNECTION_ERRORS):
                    log.error("opcua_connect_error", source=self.name, exc_info=exc)
                if refused:
                    detail = f"security refused at {endpoint}: {exc}"
                else:
                    detail = f"cannot connect to {endpoint}: {_describe(exc)}"
                if reported is not False or (refused and detail != reported_detail):
                    # a security refusal is reported again when its reason changes (the PLC was
                    # fixed one way and is still refused another)
                    push(SourceStatus(self.name, connected=False, detail=detail, at=_now()))
                    reported, reported_detail = False, detail
                delay = self._backoff(attempt)
                attempt += 1
                if isinstance(exc, SecurityRefused):  # (refused, narrowed for the type checker)
                    # an error, not a warning: it is fixed on the PLC or in the configuration,
                    # never by waiting; the source keeps trying so it connects once it is
                    log.error(
                        "opcua_security_refused",
                        source=self.name,
                        endpoint=endpoint,
                        reason=exc.reason,
                        error=str(exc),
                        **exc.details,
                        retry_in_s=round(delay, 3),
                    )
                else:
                    log.warning(
                        "opcua_connect_failed",
                        source=self.name,
                        endpoint=endpoint,
                        error=_describe(exc),
                        retry_in_s=round(delay, 3),
                    )
                await asyncio.sleep(delay)
                continue
            except BaseException:
                await connection.close()
                raise

            push(
                SourceStatus(
                    self.name, connected=True, detail=f"connected to {endpoint}", at=_now()
                )
            )
            reported = True
            for event in reads:
                push(event)
            log.info(
                "opcua_connected",
                source=self.name,
                endpoint=endpoint,
                security=_security_name(self.config.security),
            )
            self._connection = connection
            try:
                reason = await connection.serve()
            finally:
                self._connection = None
                await connection.close()
            push(SourceStatus(self.name, connected=False, detail=reason, at=_now()))
            reported, reported_detail = False, reason
            delay = self._backoff(0)
            attempt = 1
            log.warning(
                "opcua_connection_lost",
                source=self.name,
                endpoint=endpoint,
                reason=reason,
                retry_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return backoff_delay(attempt, c.reconnect_min_ms, c.reconnect_max_ms, self._rng)

    # ------------------------------------------------------------------ write

    async def write(self, signal: str, value: bool | int) -> None:
        """Write ``value`` to the node of ``signal`` (the agent writes ``complete_ack``)."""
        sig = self._signals.get(signal)
        if sig is None:
            raise SignalError(
                f"{self.name}: no signal {signal!r} is configured "
                f"(configured: {', '.join(self._signals)})"
            )
        what = f"cannot write {signal} ({sig.address}) on {self.name}"
        connection = self._connection
        if connection is None or not connection.usable:
            raise SignalError(f"{what}: not connected to {self.config.endpoint}")
        try:
            async with asyncio.timeout(self._request_timeout_s):
                status = await connection.write(sig, value)
        except TimeoutError:
            raise SignalError(f"{what}: no answer within {self._request_timeout_s} s") from None
        except _CONNECTION_ERRORS as exc:
            raise SignalError(f"{what}: {_describe(exc)}") from exc
        if not status.is_good():
            raise SignalError(f"{what}: the server refused it ({status_name(status)})")
        log.debug("opcua_written", source=self.name, signal=signal, node=sig.address, value=value)


class _Connection:
    """One asyncua client's lifetime: connect, read, subscribe, serve until lost, close."""

    def __init__(
        self, source: OpcUaSource, push: Callable[[SignalEvent | SourceStatus], None]
    ) -> None:
        self._source = source
        self._config = source.config
        self._push = push
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._by_handle: dict[int, _Signal] = {}
        self._types: dict[str, ua.VariantType] = {}
        self._pending: list[SignalEvent] = []
        self._last_flow: SignalEvent | None = None  # the last flow event emitted
        self._answered: datetime | None = None  # when the server answered the last refresh read
        self._lost = asyncio.Event()
        self._reason = ""
        self._session_open = False  # connect() completed: a session and asyncua's tasks exist

    @property
    def usable(self) -> bool:
        client = self._client
        return (
            client is not None
            and client.state is UaClientState.CONNECTED
            and not self._lost.is_set()
        )

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._reason = reason
            self._lost.set()

    async def _on_connection_lost(self, exc: Exception) -> None:
        # called by asyncua's connection supervisor task: only note it, the run loop reacts
        self._lose(f"connection lost: {_describe(exc)}")

    async def open(self) -> list[SignalEvent]:
        """Connect, read every node, subscribe; returns the READ events (not yet emitted)."""
        source = self._source
        security = self._config.security
        material = SecurityMaterial.load(security) if security.secure else None
        client = _Client(
            self._config.endpoint,
            timeout=source._request_timeout_s,
            watchdog_intervall=source._watchdog_interval_s,
        )
        client.name = client.description = f"edge-agent {source.name}"
        # a server checks that the ApplicationUri a client sends is the one its certificate
        # carries: with a certificate, it is the certificate's
        client.application_uri = (
            material.application_uri if material else f"urn:edge-agent:{source.name}"
        )
        # a dropped client's session lingers on the server until it times out; PLCs allow only a
        # few sessions, so keep that short (the client talks every watchdog interval anyway)
        client.session_timeout = 60_000
        client.connection_lost_callback = self._on_connection_lost
        self._client = client
        signals = list(source._signals.values())
        nodes = [client.get_node(sig.node_id) for sig in signals]
        async with asyncio.timeout(source._request_timeout_s * 3):
            # what the PLC offers, asked as every OPC UA client does (GetEndpoints, over an
            # unsecured channel that serves discovery only): the configured policy and mode,
            # and the pinned certificate, or no connection. The secured channel that follows is
            # opened to the pinned certificate, whatever this answer said.
            endpoints = await client.connect_and_get_server_endpoints()
            check_endpoints(endpoints, security, material)
            if material is not None:
                assert security.mode is not None  # required with a secure policy (config)
                await client.set_security(
                    security_policies.SecurityPolicyBasic256Sha256,
                    certificate=material.certificate,
                    private_key=material.private_key,
                    server_certificate=material.server_certificate,
                    mode=_MODES[security.mode],
                )
            if security.username is not None and security.password is not None:
                try:
                    password = security.password.reveal()
                except ValueError as exc:  # says what is missing, never the value
                    raise SecurityRefused(
                        "security_files_unreadable", f"the password: {exc}"
                    ) from None
                client.set_user(security.username)
                client.set_password(password)
            try:
                await client.connect()
            except UaStatusCodeError as exc:
                refused = _refusal(exc, security, material)
                if refused is None:
                    raise
                raise refused from None
        self._session_open = True
        async with asyncio.timeout(source._request_timeout_s):
            await self._read_types(client, signals, nodes)
            values = await client.read_attributes(nodes, AttributeIds.Value)
        received_at = _now()
        reads = [
            self._event(sig, dv, received_at, Origin.READ)
            for sig, dv in zip(signals, values, strict=True)
        ]
        for event in reads:  # emitted by the run loop before serve() starts the refresh
            self._note(event)
        async with asyncio.timeout(source._request_timeout_s):
            await self._subscribe(client, signals, nodes)
        return reads

    async def _read_types(self, client: Client, signals: list[_Signal], nodes: list[Node]) -> None:
        types = await client.read_attributes(nodes, AttributeIds.DataType)
        for sig, dv in zip(signals, types, strict=True):
            data_type = dv.Value.Value if dv.Value is not None else None
            if (
                isinstance(data_type, ua.NodeId)
                and data_type.NamespaceIndex == 0
                and isinstance(data_type.Identifier, int)
                and 1 <= data_type.Identifier <= 25  # the built-in types are their own ids
            ):
                self._types[sig.name] = ua.VariantType(data_type.Identifier)

    async def _subscribe(self, client: Client, signals: list[_Signal], nodes: list[Node]) -> None:
        cfg = self._config.subscription
        interval = float(cfg.publishing_interval_ms)
        keepalive = max(1, math.ceil(1000 / interval))  # a keep-alive about every second
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval,
            RequestedLifetimeCount=keepalive * 30,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        # iterator mode: asyncua queues the notifications and this connection's pump takes
        # them; should that queue ever fill, reconnect (and read everything) rather than drop
        subscription = await client.create_subscription(
            params, handler=None, queue_maxsize=100_000, overflow=OverflowPolicy.DISCONNECT
        )
        self._subscription = subscription
        requests = []
        for handle, (sig, node) in enumerate(zip(signals, nodes, strict=True), start=1):
            parameters = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=float(cfg.sampling_interval_ms),
                QueueSize=cfg.queue_size,
                DiscardOldest=True,
            )
            if cfg.deadband is not None and sig.name in ANALOG_SIGNALS:
                parameters.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute,
                    DeadbandValue=float(cfg.deadband),
                )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(
                        NodeId=node.nodeid, AttributeId=AttributeIds.Value
                    ),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=parameters,
                )
            )
            self._by_handle[handle] = sig
        results = await subscription.create_monitored_items(requests)
        for sig, result in zip(signals, results, strict=True):
            if isinstance(result, ua.StatusCode):
                log.error(
                    "opcua_monitor_failed",
                    source=self._source.name,
                    signal=sig.name,
                    node=sig.address,
                    status=status_name(result),
                )

    async def serve(self) -> str:
        """Pump notifications (and refresh the flow) until the connection is lost; returns why
        it was."""
        assert self._subscription is not None
        name = self._source.name
        tasks = [asyncio.create_task(self._pump(self._subscription), name=f"opcua[{name}].pump")]
        flow = self._source._signals.get("flow")
        if flow is not None:
            tasks.append(asyncio.create_task(self._refresh(flow), name=f"opcua[{name}].refresh"))
        try:
            await self._lost.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._flush()
        return self._reason

    async def _pump(self, subscription: Subscription) -> None:
        try:
            await self._take(subscription)
        except Exception as exc:
            log.error("opcua_pump_failed", source=self._source.name, exc_info=exc)
            self._lose(f"notification pump failed: {_describe(exc)}")
        else:
            self._lose("subscription closed")

    async def _take(self, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        async for item in subscription:
            if isinstance(item, DataChangeEvent):
                sig = self._by_handle.get(item.data.monitored_item.ClientHandle)
                if sig is None:
                    continue
                if not self._pending:
                    # asyncua queues one publish response's changes in one go, and taking them
                    # from its queue does not yield while more are there: the flush runs once
                    # the whole response is collected
                    loop.call_soon(self._flush)
                self._pending.append(
                    self._event(sig, item.data.monitored_item.Value, _now(), Origin.CHANGE)
                )
            elif isinstance(item, StatusChangeEvent):
                status = item.notification.Status
                if not status.is_good():
                    self._lose(f"subscription ended by the server: {status_name(status)}")

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        for event in in_source_order(batch):
            self._note(event)
            self._push(event)

    def _note(self, event: SignalEvent) -> None:
        if event.signal == "flow":
            self._last_flow = event

    async def _refresh(self, sig: _Signal) -> None:
        """Read the flow node about every REFRESH_S and emit it again while it is unchanged."""
        loop = asyncio.get_running_loop()
        timeout = self._source._request_timeout_s
        due = loop.time()
        failing = False
        while True:
            due = max(due + REFRESH_S, loop.time())  # a late read is not made up for
            await asyncio.sleep(due - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    value, answered = await self._read_flow(sig)
            except _CONNECTION_ERRORS as exc:
                # skipped: a dead connection is found by the watchdog and the subscription
                if not failing:
                    log.warning(
                        "opcua_refresh_failed",
                        source=self._source.name,
                        node=sig.address,
                        error=_describe(exc),
                    )
                failing = True
                continue
            except Exception as exc:  # a bug: as for the pump
                log.error("opcua_refresh_crashed", source=self._source.name, exc_info=exc)
                self._lose(f"flow refresh failed: {_describe(exc)}")
                return
            if failing:
                log.info("opcua_refresh_recovered", source=self._source.name, node=sig.address)
                failing = False
            self._refreshed(sig, value, answered, _now())

    async def _read_flow(self, sig: _Signal) -> tuple[ua.DataValue, datetime | None]:
        """One Read service call of the flow node: its value, and when the server answered."""
        client = self._client
        assert client is not None
        request = ua.ReadRequest()
        request.Parameters = ua.ReadParameters(
            MaxAge=0,  # from the device, not a cache
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[ua.ReadValueId(NodeId=sig.node_id, AttributeId=AttributeIds.Value)],
        )
        # the session's request path, as asyncua's own reads take, to keep the response header
        # (its timestamp): Client.read_attributes returns the results alone (and asks for the
        # source timestamp only, and logs every call at INFO)
        data = await client.uaclient._send_request(request)
        response = struct_from_binary(ua.ReadResponse, data)
        response.ResponseHeader.ServiceResult.check()
        if len(response.Results) != 1:
            raise UaError(f"a read of 1 node answered with {len(response.Results)} results")
        return response.Results[0], server_moment(response.ResponseHeader.Timestamp)

    def _refreshed(
        self, sig: _Signal, value: ua.DataValue, answered: datetime | None, received_at: datetime
    ) -> None:
        previous = self._answered  # before this read was made: the value at that moment ...
        self._answered = answered or previous
        self._flush()  # the notifications already taken go first, and are what it is compared to
        last = self._last_flow
        if last is None or last.quality is not Quality.GOOD:
            return
        event = self._event(sig, value, received_at, Origin.REFRESH)
        if (event.value, event.quality, event.status) != (last.value, last.quality, last.status):
            return  # changed: the subscription delivers the change, with its own timestamp
        # ... is the value now, if it was at the last event before it too (it only counts up)
        moments = [m for m in (server_moment(value.ServerTimestamp), previous) if m is not None]
        if moments:
            moment, device_time = max(moments), True
        elif answered is None:
            moment, device_time = received_at, False  # a server that stamps nothing
        else:
            return  # the first read: when it was answered serves the next
        if last.source_time is not None and moment <= last.source_time:
            return  # nothing new (or a moment the value may not have held)
        event = replace(event, source_time=moment, device_time=device_time)
        self._note(event)
        self._push(event)

    def _event(
        self, sig: _Signal, dv: ua.DataValue | None, received_at: datetime, origin: Origin
    ) -> SignalEvent:
        status = (
            dv.StatusCode if dv is not None else ua.StatusCode(ua.UInt32(StatusCodes.BadNoData))
        )
        value, usable = convert(dv.Value if dv is not None else None)
        quality, name = quality_of(status), status_name(status)
        if not usable:
            assert dv is not None
            assert dv.Value is not None
            log.error(
                "opcua_unsupported_value",
                source=self._source.name,
                signal=sig.name,
                node=sig.address,
                variant_type=dv.Value.VariantType.name,
            )
            quality, name = Quality.BAD, "BadTypeMismatch"
        if has_overflow(status):
            log.warning(
                "opcua_queue_overflow", source=self._source.name, signal=sig.name, node=sig.address
            )
        return SignalEvent(
            source=self._source.name,
            work_centre=self._config.work_centre,
            signal=sig.name,
            address=sig.address,
            value=value,
            quality=quality,
            status=name,
            source_time=_aware(dv.SourceTimestamp) if dv is not None else None,
            received_at=received_at,
            origin=origin,
        )

    async def write(self, sig: _Signal, value: bool | int) -> ua.StatusCode:
        client = self._client
        assert client is not None
        vtype = self._types.get(sig.name)
        node = client.get_node(sig.node_id)
        if vtype is None:
            vtype = await node.read_data_type_as_variant_type()
            self._types[sig.name] = vtype
        variant = _variant(sig, value, vtype)
        # the value alone: a status code or a timestamp in a write is refused by many PLCs
        datavalue = ua.DataValue(Value=variant, StatusCode=None)
        results = await client.write_values([node], [datavalue], raise_on_partial_error=False)
        return results[0]

    async def close(self) -> None:
        """Disconnect (best effort, bounded) and make sure the socket is closed."""
        client, self._client = self._client, None
        if client is None:
            return
        if not self._session_open:
            client.disconnect_socket()  # a failed connect leaves at most the socket
            return
        # asyncua's teardown awaits its own tasks and swallows a CancelledError that arrives
        # meanwhile (Client._cancel_task), which would swallow the cancellation of run(): it
        # runs in a task of its own, so a cancellation stays ours
        closing = asyncio.create_task(
            self._disconnect(client), name=f"opcua[{self._source.name}].disconnect"
        )
        try:
            await asyncio.wait({closing}, timeout=_DISCONNECT_TIMEOUT_S)
        except asyncio.CancelledError:
            await asyncio.wait({closing}, timeout=_DISCONNECT_TIMEOUT_S)
            raise
        finally:
            if not closing.done():
                closing.cancel()
            client.disconnect_socket()

    async def _disconnect(self, client: Client) -> None:
        try:
            await client.disconnect()
        except Exception as exc:  # the connection may be long gone
            log.debug("opcua_disconnect_failed", source=self._source.name, error=_describe(exc))


def _variant(sig: _Signal, value: bool | int, vtype: ua.VariantType) -> ua.Variant:
    what = f"cannot write {sig.name} ({sig.address})"
    if vtype is ua.VariantType.Boolean:
        if not isinstance(value, bool):
            raise SignalError(f"{what}: the node is Boolean, got {value!r}")
        return ua.Variant(value, vtype)
    if vtype in _INTEGER_TYPES:
        low, high = _INTEGER_RANGES[vtype]
        if isinstance(value, bool) or not low <= value <= high:
            raise SignalError(f"{what}: the node is {vtype.name} ({low}..{high}), got {value!r}")
        return ua.Variant(value, vtype)
    raise SignalError(f"{what}: the node's data type {vtype.name} is not writable by the agent")
