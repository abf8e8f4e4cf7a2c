"""A line PLC over OPC UA (asyncua server) for the tests and the demo.

It serves every node the agent configuration's signal maps name, so the agent and the simulator
share one config file: ``LinePlc(config, port=...)`` listens on
``opc.tcp://{host}:{port}/edge-agent/sim/`` with the namespace ``urn:edge-agent:sim`` at index 2.

- **Types by role.** ``order`` and ``feed_lot`` String; ``good``, ``scrap``, ``flow`` the
  unsigned integer of the counter's configured width (UInt16/32/64); ``complete_request``,
  ``complete_ack`` and ``scale.stable`` Boolean; ``complete_good``, ``complete_scrap`` UInt32;
  ``scale.weight``, ``scale.tare`` Double. Only ``complete_ack`` is writable by clients.
- **Timestamps.** Every value the simulator sets carries an explicit SourceTimestamp (UTC),
  strictly increasing across all its writes, so no two changes share one; a client's write to
  ``complete_ack`` is stamped the same way, as a PLC stamps what it receives.
- **Quality.** Good unless :meth:`LinePlc.set_quality` says otherwise. A node keeps its quality
  until told again; while it is Bad the server serves no value (OPC UA Part 4, 7.7.1: a Bad
  value is null), and restoring Good serves the last value again. asyncua 2.1's server cannot
  notify a Bad value through a deadband filter (its deadband check fails on the null value and
  the change is dropped): with ``subscription.deadband`` set, a Bad scale weight or tare is seen
  only by a read.
- **Power cycle.** :meth:`LinePlc.stop` closes the listener, every connection and every session
  (a power-cycled PLC forgets them); values survive into the next :meth:`LinePlc.start` unless
  it is told to reset. While stopped, the PLC keeps counting: a value set meanwhile is what a
  client reads after the restart.
- **Totals.** :attr:`LinePlc.totals` is what the PLC counted per (order, work centre): counter
  increments, acknowledged handshakes (kept apart), totalizer counts and weighings. Only what was
  really written counts; :meth:`set_counter` and an order change's reset are not production.
- **Flow.** :meth:`LinePlc.set_flow_rate` runs the flow meter at a rate (counts per second)
  until set to 0; :meth:`LinePlc.change_lot` writes a new tank (feed) lot to ``feed_lot`` (when
  configured; its SourceTimestamp is the change's moment) and records it with the totalizer
  reading, in :attr:`LinePlc.lot_changes`; :meth:`LinePlc.meter_history` is every write of the
  totalizer (stamped as the node is) with the counts metered so far, so
  :func:`simulators.feeds.expected_by_lot` can tell which lot the flow belongs to.

- **Security.** Without ``security`` the PLC offers one endpoint, with no security. With a
  :class:`PlcSecurity` it is a secured PLC: it offers only Basic256Sha256 endpoints (Sign and/or
  SignAndEncrypt, no None), presents its own certificate, opens a session only for a client
  whose application certificate it trusts (the exact certificate, as a PLC's trust list holds
  it) and only over a secured channel, and with ``users`` accepts only those user names and
  passwords (no anonymous session). :func:`write_certificate` creates a certificate for it.

Run it on its own: ``python -m simulators.opcua_plc --config config/line.toml`` (``--help``;
``--certificate``, ``--private-key``, ``--trust`` and ``--user`` secure it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import os
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, cast

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.address_space import NodeData
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from rich.table import Table

from edge_agent import certs
from edge_agent.config import Config, CounterSignal
from edge_agent.config import OpcUaSource as OpcUaSourceConfig
from edge_agent.sources.opcua import signal_nodes
from simulators.cli import run_simulator
from simulators.feeds import FlowMeter, LotChange, MeterStep

NAMESPACE: Final = "urn:edge-agent:sim"
COUNTERS: Final = ("good", "scrap", "flow")
_BOOLEANS: Final = frozenset({"complete_request", "complete_ack", "scale.stable"})
_UNSIGNED: Final = {16: ua.VariantType.UInt16, 32: ua.VariantType.UInt32, 64: ua.VariantType.UInt64}
_INITIAL: Final[dict[ua.VariantType, Any]] = {
    ua.VariantType.String: "",
    ua.VariantType.Boolean: False,
    ua.VariantType.Double: 0.0,
}
_TICK: Final = timedelta(microseconds=1)


@dataclass
class Tally:
    """What the PLC counted for one order at one work centre."""

    good: int = 0  # counter increments
    scrap: int = 0
    confirmed_good: int = 0  # acknowledged operation-complete handshakes
    confirmed_scrap: int = 0
    handshakes: int = 0
    flow: int = 0  # totalizer counts (raw; the config's scale makes them litres)
    weighings: list[tuple[Decimal, Decimal]] = field(default_factory=list)  # (gross, tare)


@dataclass
class _Variable:
    signal: str
    address: str
    node_id: ua.NodeId
    vtype: ua.VariantType
    width: int | None  # counters: wraps at 2**width
    value: Any
    stamp: datetime
    status: ua.StatusCode = field(default_factory=ua.StatusCode)
    #: the value and stamp before the last write (a late notification replays them)
    previous: tuple[Any, datetime] | None = None

    def datavalue(self) -> ua.DataValue:
        return ua.DataValue(
            Value=ua.Variant(self.value, self.vtype),
            StatusCode=self.status,
            SourceTimestamp=_ua_time(self.stamp),
            ServerTimestamp=_ua_time(self.stamp),
        )


@dataclass
class _WorkCentre:
    source: OpcUaSourceConfig
    variables: dict[str, _Variable]
    ack_changed: asyncio.Event = field(default_factory=asyncio.Event)
    handshake: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "idle"
    meter: FlowMeter | None = None  # once a flow rate was set
    metered: int = 0  # totalizer counts added, in all (not wrapped, not reset)
    history: list[MeterStep] = field(default_factory=list)  # every write of the totalizer

    @property
    def name(self) -> str:
        return self.source.work_centre


_MODE_NAMES: Final = {
    ua.MessageSecurityMode.None_: "None",
    ua.MessageSecurityMode.Sign: "Sign",
    ua.MessageSecurityMode.SignAndEncrypt: "SignAndEncrypt",
}
SECURE_MODES: Final = {
    "Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


@dataclass(frozen=True)
class PlcSecurity:
    """A secured PLC: its certificate and key, the client certificates it trusts, the modes it
    offers (Basic256Sha256 only) and its users (user name → password; none: anonymous)."""

    certificate: Path
    private_key: Path
    trusted: tuple[Path, ...] = ()
    modes: tuple[Literal["Sign", "SignAndEncrypt"], ...] = ("Sign", "SignAndEncrypt")
    users: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("a secured PLC offers at least one mode")


#: the files :func:`write_certificate` writes: the certificate (DER) and its key (PEM)
CERTIFICATE_NAMES: Final = ("plc-cert.der", "plc-key.pem")


def write_certificate(directory: Path, hostname: str | None = None) -> tuple[Path, Path]:
    """A new certificate and key for the simulated PLC in ``directory`` (replacing any):
    ``(certificate, private key)``; ``hostname`` defaults to this machine's."""
    hostname = hostname or socket.gethostname()
    created = certs.create(
        application_uri=f"urn:{hostname}:edge-agent:sim-plc",
        common_name="edge-agent line PLC simulator",
        hostname=hostname,
    )
    written = certs.write_pair(directory, created, force=True, names=CERTIFICATE_NAMES)
    return written.certificate, written.key


class _Users(UserManager):
    """The secured PLC's user manager (asyncua's interface): a session only over a secured
    channel (asyncua's server would open one over the unsecured discovery channel too), and
    only for a known user with its password, or anonymous when it knows no users."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if certificate is None:  # the channel's peer certificate: none means not secured
            return None
        if not self._users:
            return User(role=UserRole.User)
        known = self._users.get(username or "")
        if known is None or password is None:
            return None
        if not hmac.compare_digest(known.encode(), password.encode()):
            return None
        return User(role=UserRole.User, name=username)


class _TrustList:
    """The secured PLC's check of a client's application certificate at CreateSession: valid
    now, carrying the ApplicationUri the client sends, and trusted (exactly this certificate)."""

    def __init__(self, trusted: Collection[bytes]) -> None:
        self._trusted = set(trusted)
        self._basic = CertificateValidator(
            CertificateValidatorOptions.BASIC_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        )

    async def __call__(self, certificate: x509.Certificate, app: ua.ApplicationDescription) -> None:
        await self._basic(certificate, app)
        if certs.der(certificate) not in self._trusted:
            raise ServiceError(StatusCodes.BadCertificateUntrusted)


class LinePlc:
    """The line's PLCs as one OPC UA server; an async context manager (start … stop)."""

    def __init__(
        self,
        config: Config,
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        security: PlcSecurity | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.security = security
        self._server: Server | None = None
        self._last_stamp = datetime.now(UTC) - timedelta(seconds=1)
        self._work_centres: dict[str, _WorkCentre] = {}
        self._variables: dict[str, _Variable] = {}
        self._totals: dict[tuple[str, str], Tally] = {}
        #: every feed lot change, in the order made (:meth:`change_lot`)
        self.lot_changes: list[LotChange] = []
        self._flow_of: dict[str, _WorkCentre] = {}  # a totalizer's node → its work centre
        #: nodes given a value of another variant type (set_raw): retyped at the next write
        self._retyped: set[str] = set()
        for source in config.sources:
            if not isinstance(source, OpcUaSourceConfig):
                continue  # a Modbus source: simulators/modbus_plc.py serves it
            if source.work_centre in self._work_centres:
                raise ValueError(f"work centre {source.work_centre!r} has two sources")
            variables = {}
            for signal, address in signal_nodes(source.signals).items():
                variable = self._variable(source, signal, address)
                if address in self._variables:
                    raise ValueError(f"node {address} is configured twice")
                self._variables[address] = variables[signal] = variable
            wc = self._work_centres[source.work_centre] = _WorkCentre(source, variables)
            if "flow" in variables:
                self._flow_of[variables["flow"].address] = wc
                self._metered_step(variables["flow"])

    def _variable(self, source: OpcUaSourceConfig, signal: str, address: str) -> _Variable:
        node_id = ua.NodeId.from_string(address)
        if node_id.NamespaceIndex < 2:
            raise ValueError(
                f"{source.name}: node {address}: the simulator serves namespace 2 "
                f"({NAMESPACE}) and above"
            )
        width = None
        if signal in COUNTERS:
            counter = getattr(source.signals, signal)
            assert isinstance(counter, CounterSignal)
            width = counter.width
            vtype = _UNSIGNED[width]
        elif signal in _BOOLEANS:
            vtype = ua.VariantType.Boolean
        elif signal in ("order", "feed_lot"):
            vtype = ua.VariantType.String
        elif signal in ("complete_good", "complete_scrap"):
            vtype = ua.VariantType.UInt32
        else:  # scale.weight, scale.tare
            vtype = ua.VariantType.Double
        value = _INITIAL.get(vtype, 0)
        return _Variable(signal, address, node_id, vtype, width, value, self._stamp())

    # ------------------------------------------------------------------ lifecycle

    @property
    def work_centres(self) -> list[str]:
        """The work centres this simulator serves."""
        return list(self._work_centres)

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/edge-agent/sim/"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def server(self) -> Server | None:
        """The asyncua server while running (for a test that needs to go around the PLC)."""
        return self._server

    async def __aenter__(self) -> LinePlc:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for wc in self._work_centres.values():
            if wc.meter is not None:
                await wc.meter.stop()
        await self.stop()

    async def start(self, reset: bool = False) -> None:
        """Power on: serve every node with the values it had (initial values if ``reset``)."""
        if self._server is not None:
            return
        if reset:
            for variable in self._variables.values():
                variable.value = _INITIAL.get(variable.vtype, 0)
                variable.status = ua.StatusCode()
                variable.stamp = self._stamp()
                self._metered_step(variable)
        security = self.security
        server = Server(user_manager=_Users(security.users) if security else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent line PLC simulator")
        if security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await self._secure(server, security)
        server.disable_clock()
        await self._build(server)
        await server.start()
        self._server = server

    async def _secure(self, server: Server, security: PlcSecurity) -> None:
        certificate = certs.read_certificate(security.certificate)
        await server.load_certificate(certs.der(certificate))
        await server.load_private_key(security.private_key)
        uri = certs.application_uri(certificate)
        if uri is not None:  # a server's ApplicationUri is the one its certificate carries
            await server.set_application_uri(uri)
        server.set_security_policy([SECURE_MODES[mode] for mode in security.modes])
        server.set_identity_tokens(
            [ua.UserNameIdentityToken] if security.users else [ua.AnonymousIdentityToken]
        )
        trusted = [certs.der(certs.read_certificate(path)) for path in security.trusted]
        server.set_certificate_validator(_TrustList(trusted))

    async def _build(self, server: Server) -> None:
        needed = max(v.node_id.NamespaceIndex for v in self._variables.values())
        index = await server.register_namespace(NAMESPACE)
        assert index == 2, f"namespace {NAMESPACE} got index {index}"
        for extra in range(3, needed + 1):
            await server.register_namespace(f"{NAMESPACE}:ns{extra}")
        for wc in self._work_centres.values():
            folder = await server.nodes.objects.add_object(2, wc.name)
            for variable in wc.variables.values():
                node = await folder.add_variable(
                    variable.node_id,
                    ua.QualifiedName(
                        _browse_name(wc.name, variable), variable.node_id.NamespaceIndex
                    ),
                    variable.value,
                    variable.vtype,
                )
                if variable.signal == "complete_ack":
                    await node.set_writable()
                    server.set_attribute_value_setter(
                        variable.node_id, self._ack_setter(wc, variable), AttributeIds.Value
                    )
                await server.write_attribute_value(variable.node_id, variable.datavalue())

    async def stop(self) -> None:
        """Power off: close the listener, every connection and session; the port is free after."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop()
        # a power-cycled PLC forgets its sessions; asyncua keeps an activated session with
        # subscriptions for its timeout after the socket closed (so a client may resume it),
        # and its tasks with it. There is no public way to end them.
        for session in list(server.iserver._external_sessions.values()):
            await session.close_session(True)
        await _wait_port_free(self.host, self.port)

    async def restart(self, reset: bool = False) -> None:
        """A power cycle."""
        await self.stop()
        await self.start(reset=reset)

    def drop_connections(self) -> int:
        """Cut every client connection (a network fault); the PLC keeps running and listening.
        Returns how many were cut."""
        transports = list(self._server.iserver.asyncio_transports) if self._server else []
        for transport in transports:
            transport.close()
        return len(transports)

    def sessions(self) -> list[tuple[str, str | None]]:
        """Every connection with an activated session: its security (``"None/None"``,
        ``"Basic256Sha256/SignAndEncrypt"``, ...) and the user name it was opened with."""
        out = []
        for transport in list(self._server.iserver.asyncio_transports) if self._server else []:
            processor = getattr(transport.get_protocol(), "processor", None)
            session = getattr(processor, "session", None)
            if session is None or not session.is_activated():
                continue
            policy = processor._connection.security_policy  # type: ignore[union-attr]
            name = policy.URI.rpartition("#")[2]
            user = session.user.name if session.user is not None else None
            out.append((f"{name}/{_MODE_NAMES[policy.Mode]}", user))
        return out

    def hang_connections(self) -> int:
        """Stop answering on every open connection, without closing it (a hung CPU or a
        half-open network path: nothing tells the client). New connections are served.
        Returns how many hang; :meth:`drop_connections` ends them."""
        transports = list(self._server.iserver.asyncio_transports) if self._server else []
        for transport in transports:
            transport.pause_reading()
        return len(transports)

    # ------------------------------------------------------------------ writing values

    def _stamp(self) -> datetime:
        now = datetime.now(UTC)
        self._last_stamp = now if now > self._last_stamp else self._last_stamp + _TICK
        return self._last_stamp

    async def _set(self, variable: _Variable, value: Any) -> None:
        variable.previous = (variable.value, variable.stamp)
        variable.value = value
        variable.stamp = self._stamp()
        self._metered_step(variable)
        await self._publish(variable)

    def _metered_step(self, variable: _Variable) -> None:
        """A write of a totalizer is a step of its history, stamped as the node is."""
        wc = self._flow_of.get(variable.address)
        if wc is not None:
            wc.history.append(MeterStep(variable.stamp, wc.metered))

    async def _publish(self, variable: _Variable) -> None:
        if self._server is not None:
            if variable.address in self._retyped:
                self._retype(variable)
                self._retyped.discard(variable.address)
            await self._server.write_attribute_value(variable.node_id, variable.datavalue())

    def _retype(self, variable: _Variable) -> None:
        """Let the next write give the node a value of another variant type: asyncua's server
        refuses a type other than the stored value's (BadTypeMismatch), unless none is stored,
        and a PLC whose program writes the wrong type is what :meth:`set_raw` plays."""
        assert self._server is not None
        node = self._server.iserver.aspace._nodes[variable.node_id]
        node.attributes[AttributeIds.Value].value = None

    def _ack_setter(self, wc: _WorkCentre, variable: _Variable) -> Any:
        def setter(node: NodeData, attr: AttributeIds, datavalue: ua.DataValue) -> None:
            if datavalue.SourceTimestamp is None:  # a client's write: stamp it as a PLC would
                datavalue.SourceTimestamp = datavalue.ServerTimestamp = _ua_time(self._stamp())
            if datavalue.StatusCode is None:
                datavalue.StatusCode = ua.StatusCode()
            node.attributes[attr].value = datavalue
            if datavalue.Value is not None and datavalue.Value.Value is not None:
                variable.value = datavalue.Value.Value
                variable.stamp = datavalue.SourceTimestamp or self._stamp()
            wc.ack_changed.set()

        return setter

    def _wc(self, work_centre: str) -> _WorkCentre:
        try:
            return self._work_centres[work_centre]
        except KeyError:
            raise ValueError(
                f"no work centre {work_centre!r} (known: {', '.join(self._work_centres)})"
            ) from None

    def _var(self, wc: _WorkCentre, signal: str) -> _Variable:
        try:
            return wc.variables[signal]
        except KeyError:
            raise ValueError(
                f"{wc.name} has no {signal!r} signal (configured: {', '.join(wc.variables)})"
            ) from None

    def _tally(self, wc: _WorkCentre) -> Tally:
        key = (str(wc.variables["order"].value), wc.name)
        return self._totals.setdefault(key, Tally())

    @property
    def totals(self) -> dict[tuple[str, str], Tally]:
        """(order, work centre) → what the PLC counted (a copy)."""
        return {key: replace(t, weighings=list(t.weighings)) for key, t in self._totals.items()}

    def value(self, work_centre: str, signal: str) -> Any:
        """The value a node holds now (what a client would read, were its quality Good)."""
        return self._var(self._wc(work_centre), signal).value

    # ------------------------------------------------------------------ the line's actions

    async def set_order(self, work_centre: str, order_id: str, reset_counters: bool = True) -> None:
        """A new order at the work centre: the order id first, then the counters zeroed."""
        wc = self._wc(work_centre)
        await self._set(wc.variables["order"], order_id)
        if reset_counters:
            for name in COUNTERS:
                if name in wc.variables:
                    await self._set(wc.variables[name], 0)

    async def produce(self, work_centre: str, good: int = 0, scrap: int = 0) -> None:
        """Count parts on the cumulative counters (wrapping at their width)."""
        wc = self._wc(work_centre)
        for name, count in (("good", good), ("scrap", scrap)):
            if count < 0:
                raise ValueError(f"{name} must not be negative (got {count})")
            if count:
                await self._increment(self._var(wc, name), count)
        tally = self._tally(wc)
        tally.good += good
        tally.scrap += scrap

    async def flow(self, work_centre: str, counts: int) -> None:
        """Add totalizer counts (wrapping at its width)."""
        if counts < 0:
            raise ValueError(f"counts must not be negative (got {counts})")
        wc = self._wc(work_centre)
        variable = self._var(wc, "flow")
        wc.metered += counts  # before the write, which records the step
        await self._increment(variable, counts)
        self._tally(wc).flow += counts

    async def _increment(self, variable: _Variable, count: int) -> None:
        assert variable.width is not None
        await self._set(variable, (int(variable.value) + count) % (1 << variable.width))

    async def set_counter(self, work_centre: str, signal: str, raw: int) -> None:
        """Set a counter to any raw value (a rollover or reset test); not counted as production."""
        wc = self._wc(work_centre)
        if signal not in COUNTERS:
            raise ValueError(f"{signal!r} is not a counter ({', '.join(COUNTERS)})")
        variable = self._var(wc, signal)
        assert variable.width is not None
        if not 0 <= raw < 1 << variable.width:
            raise ValueError(f"{signal} is {variable.width} bits wide: {raw} does not fit")
        await self._set(variable, raw)

    async def replay_late(self, work_centre: str, signal: str) -> bool:
        """A re-ordered and a duplicated notification of a counter, counting nothing: first the
        value it had before its last write, with that write's own stamp (a notification that
        arrives late, after the newer one), then the current value again with a new stamp (a
        duplicate). False (nothing written) when the counter was never written."""
        wc = self._wc(work_centre)
        if signal not in COUNTERS:
            raise ValueError(f"{signal!r} is not a counter ({', '.join(COUNTERS)})")
        variable = self._var(wc, signal)
        if variable.previous is None:
            return False
        current = variable.value
        variable.value, variable.stamp = variable.previous
        await self._publish(variable)
        variable.value, variable.stamp = current, self._stamp()
        await self._publish(variable)
        return True

    async def weigh(self, work_centre: str, gross: Decimal, tare: Decimal = Decimal(0)) -> None:
        """A weighing: stable drops, gross and tare are written, stable rises (the agent takes
        the weighing on that rising edge)."""
        wc = self._wc(work_centre)
        stable = self._var(wc, "scale.stable")
        weight = self._var(wc, "scale.weight")
        tare_node = wc.variables.get("scale.tare")
        if tare_node is None and tare:
            raise ValueError(f"{wc.name} has no scale.tare signal: tare must be 0")
        await self._set(stable, False)
        await self._set(weight, float(gross))
        if tare_node is not None:
            await self._set(tare_node, float(tare))
        await self._set(stable, True)
        self._tally(wc).weighings.append((gross, tare))

    async def complete(
        self, work_centre: str, good: int, scrap: int = 0, timeout: float | None = 10.0
    ) -> None:
        """The operation-complete handshake, as a PLC does it.

        Waits for complete_ack to be low, writes complete_good and complete_scrap, raises
        complete_request; waits until a client writes complete_ack = True (then the handshake
        counts); drops complete_request; waits until complete_ack is False again.
        ``timeout`` (seconds, None: wait for ever) bounds each wait: TimeoutError if the agent
        does not acknowledge in time (the request is then withdrawn and nothing is counted).
        """
        wc = self._wc(work_centre)
        request = self._var(wc, "complete_request")
        ack = self._var(wc, "complete_ack")
        quantities = (("complete_good", good), ("complete_scrap", scrap))
        for name, count in quantities:
            if count < 0 or (count and name not in wc.variables):
                raise ValueError(f"{wc.name}: cannot report {name} = {count}")
        async with wc.handshake:
            state = wc.state
            try:
                wc.state = "waiting for ack low"
                await self._wait_ack(wc, ack, False, timeout)
                for name, count in quantities:
                    if name in wc.variables:
                        await self._set(wc.variables[name], count)
                await self._set(request, True)
                wc.state = "waiting for ack"
                try:
                    await self._wait_ack(wc, ack, True, timeout)
                except TimeoutError as exc:
                    await self._set(request, False)  # withdrawn
                    if ack.value is not True:  # and the agent did not answer meanwhile
                        raise TimeoutError(f"{exc}; request withdrawn") from None
                    self._count_handshake(wc, good, scrap)
                else:
                    self._count_handshake(wc, good, scrap)
                    await self._set(request, False)
                wc.state = "waiting for ack low"
                await self._wait_ack(wc, ack, False, timeout)
            finally:
                wc.state = state

    def _count_handshake(self, wc: _WorkCentre, good: int, scrap: int) -> None:
        tally = self._tally(wc)
        tally.confirmed_good += good
        tally.confirmed_scrap += scrap
        tally.handshakes += 1

    async def _wait_ack(
        self, wc: _WorkCentre, ack: _Variable, target: bool, timeout: float | None
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while ack.value is not target:
                    wc.ack_changed.clear()
                    # a re-check every 50 ms as well, in case the write came in some other way
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await wc.ack_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{wc.name}: complete_ack did not become {target} within {timeout} s"
            ) from None

    async def set_raw(
        self, work_centre: str, signal: str, value: Any, vtype: ua.VariantType
    ) -> None:
        """Publish any value of any variant type on a signal's node (a string on a counter, a
        NaN weight): a PLC program gone wrong. Not kept: the node's own value (which
        :meth:`produce` counts on) is what the next regular write builds on."""
        variable = self._var(self._wc(work_centre), signal)
        variable.stamp = self._stamp()
        if self._server is not None:
            moment = _ua_time(variable.stamp)
            self._retype(variable)
            self._retyped.add(variable.address)
            await self._server.write_attribute_value(
                variable.node_id,
                ua.DataValue(
                    Value=ua.Variant(value, vtype),
                    StatusCode=variable.status,
                    SourceTimestamp=moment,
                    ServerTimestamp=moment,
                ),
            )

    async def set_quality(self, work_centre: str, signal: str, status: str) -> None:
        """Set a node's StatusCode by name ("BadSensorFailure", "UncertainLastUsableValue",
        "Good", ...), keeping its value, with a new timestamp."""
        code = getattr(StatusCodes, status, None)
        if not isinstance(code, int):
            raise ValueError(f"unknown OPC UA status code {status!r}")
        variable = self._var(self._wc(work_centre), signal)
        variable.status = ua.StatusCode(ua.UInt32(code))
        variable.stamp = self._stamp()
        await self._publish(variable)

    # ------------------------------------------------------------------ flow meter, tank lots

    async def set_flow_rate(self, work_centre: str, counts_per_s: Decimal | Fraction | int) -> None:
        """Run the flow meter at ``counts_per_s`` (0 stops it); counted as :meth:`flow`."""
        wc = self._wc(work_centre)
        self._var(wc, "flow")
        if wc.meter is None:
            wc.meter = FlowMeter(
                functools.partial(self.flow, wc.name), name=f"line-plc[{wc.name}].meter"
            )
        await wc.meter.set_rate(counts_per_s)

    async def change_lot(self, work_centre: str, lot: str) -> LotChange:
        """A new lot feeds the work centre's flow meter (a tank switched over): written to the
        ``feed_lot`` node when configured (the change's moment is the node's SourceTimestamp, as
        the agent sees it), and recorded with the totalizer's counts, in :attr:`lot_changes`."""
        wc = self._wc(work_centre)
        totalizer = self._var(wc, "flow").value
        flow = wc.source.signals.flow
        assert flow is not None
        node = wc.variables.get("feed_lot")
        if node is not None:
            await self._set(node, lot)
            at = node.stamp
        else:
            at = self._stamp()
        change = LotChange(at, wc.name, flow.material, lot, int(totalizer))
        self.lot_changes.append(change)
        return change

    def meter_history(self, work_centre: str) -> list[MeterStep]:
        """Every write of the work centre's totalizer, with the counts metered by then (a copy):
        see :class:`simulators.feeds.MeterStep`."""
        wc = self._wc(work_centre)
        self._var(wc, "flow")
        return list(wc.history)

    # ------------------------------------------------------------------ production

    async def run_production(
        self,
        work_centre: str,
        units: int | None,
        rate_per_s: float,
        scrap_every: int = 0,
        *,
        batch: int = 1,
        flow_per_unit: int = 0,
        ack_timeout: float | None = None,
    ) -> None:
        """Produce ``units`` (None: until cancelled) at about ``rate_per_s``.

        Every ``scrap_every``-th unit is scrap (0: none). A work centre with the handshake
        confirms every ``batch`` units with :meth:`complete` (waiting ``ack_timeout`` for the
        agent, None: as long as it takes, as a line that waits for its confirmation); one with
        counters counts each unit on them. ``flow_per_unit`` totalizer counts go with each unit.
        """
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive (got {rate_per_s})")
        wc = self._wc(work_centre)
        wc.state = "producing"
        try:
            await produce_units(
                self,
                wc.name,
                set(wc.variables),
                units,
                rate_per_s,
                scrap_every,
                batch,
                flow_per_unit,
                ack_timeout,
            )
        finally:
            wc.state = "idle"

    # ------------------------------------------------------------------ display

    def table(self) -> Table:
        """The live state of every work centre, for the command line."""
        state = "running" if self.running else "stopped"
        table = Table(title=f"line PLC simulator · {self.endpoint} · {state}")
        for column in (
            "work centre",
            "order",
            "good",
            "scrap",
            "confirmed",
            "flow",
            "weighings",
            "state",
        ):
            table.add_column(
                column, justify="left" if column in ("work centre", "order", "state") else "right"
            )
        for wc in self._work_centres.values():
            order = str(wc.variables["order"].value)
            tally = self._totals.get((order, wc.name), Tally())
            table.add_row(
                wc.name,
                order or "-",
                str(tally.good),
                str(tally.scrap),
                f"{tally.confirmed_good}+{tally.confirmed_scrap}",
                str(tally.flow),
                str(len(tally.weighings)),
                wc.state,
            )
        return table


class LineActions(Protocol):
    """What :func:`produce_units` needs of a PLC simulator (OPC UA or Modbus)."""

    async def flow(self, work_centre: str, counts: int) -> None: ...
    async def produce(self, work_centre: str, good: int = 0, scrap: int = 0) -> None: ...
    async def complete(
        self, work_centre: str, good: int, scrap: int = 0, timeout: float | None = 10.0
    ) -> None: ...


async def produce_units(
    plc: LineActions,
    work_centre: str,
    signals: Collection[str],
    units: int | None,
    rate_per_s: float,
    scrap_every: int,
    batch: int,
    flow_per_unit: int,
    ack_timeout: float | None,
) -> None:
    """The production loop of ``run_production``, for any simulator with these actions:
    ``signals`` are the work centre's configured signal names."""
    handshake = "complete_request" in signals
    loop = asyncio.get_running_loop()
    period = 1 / rate_per_s
    due = loop.time()
    made = good = scrap = 0
    while units is None or made < units:
        # a line that waited (for an acknowledge) does not make up for the time lost
        due = max(due + period, loop.time())
        await asyncio.sleep(due - loop.time())
        made += 1
        is_scrap = scrap_every > 0 and made % scrap_every == 0
        if flow_per_unit and "flow" in signals:
            await plc.flow(work_centre, flow_per_unit)
        if handshake:
            good += not is_scrap
            scrap += is_scrap
            if good + scrap >= batch or made == units:
                await plc.complete(work_centre, good, scrap, timeout=ack_timeout)
                good = scrap = 0
        elif is_scrap:
            if "scrap" in signals:
                await plc.produce(work_centre, scrap=1)
        elif "good" in signals:
            await plc.produce(work_centre, good=1)


def _ua_time(moment: datetime) -> ua.DateTime:
    # asyncua types its timestamps as ua.DateTime, a bare subclass of datetime; it encodes any
    # datetime (and fills these fields with datetime.now() itself)
    return cast(ua.DateTime, moment)


def _browse_name(work_centre: str, variable: _Variable) -> str:
    identifier = variable.node_id.Identifier
    if isinstance(identifier, str):
        return identifier.removeprefix(f"{work_centre}.") or identifier
    return variable.signal


async def _wait_port_free(host: str, port: int, timeout: float = 5.0) -> None:
    """Until the listening port can be bound again (closed transports finish on later loop
    iterations)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError:
                if loop.time() > deadline:
                    raise
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.opcua_plc",
        description="Serve the OPC UA nodes of an agent configuration and produce on every "
        "work centre until Ctrl-C.",
    )
    parser.add_argument("--config", type=Path, required=True, help="agent configuration (TOML)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=4840, help="port (default 4840)")
    parser.add_argument("--order", default="WO-1", help="order id set on every work centre")
    parser.add_argument(
        "--rate", type=_positive, default=5.0, help="units per second per work centre"
    )
    parser.add_argument("--scrap-every", type=int, default=0, help="every N-th unit is scrap")
    parser.add_argument("--flow-per-unit", type=int, default=100, help="totalizer counts per unit")
    secured = parser.add_argument_group(
        "security",
        "with --certificate the PLC offers only Basic256Sha256 endpoints and opens sessions only "
        "for trusted client certificates",
    )
    secured.add_argument(
        "--new-certificate",
        type=Path,
        metavar="DIR",
        help=f"write a new PLC certificate and key into DIR ({', '.join(CERTIFICATE_NAMES)}), "
        "print their thumbprints and exit",
    )
    secured.add_argument("--certificate", type=Path, help="the PLC's certificate (DER or PEM)")
    secured.add_argument("--private-key", type=Path, help="the PLC certificate's private key")
    secured.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="CERT",
        help="a client certificate to trust (e.g. the agent's agent-cert.der); repeatable",
    )
    secured.add_argument(
        "--mode",
        choices=list(SECURE_MODES),
        action="append",
        help="a mode to offer (default both); repeatable",
    )
    secured.add_argument(
        "--user",
        metavar="NAME",
        help="accept only this user, with the password in the environment variable "
        "named by --password-env",
    )
    secured.add_argument(
        "--password-env",
        default="PLC_PASSWORD",
        metavar="VAR",
        help="the environment variable holding --user's password (default PLC_PASSWORD)",
    )
    return parser


def plc_security(args: argparse.Namespace) -> PlcSecurity | None:
    """The security the command line asks for; ValueError when it does not add up."""
    if args.certificate is None:
        if args.private_key or args.trust or args.mode or args.user:
            raise ValueError("--private-key, --trust, --mode and --user need --certificate")
        return None
    if args.private_key is None:
        raise ValueError("--certificate needs --private-key")
    for path in (args.certificate, *args.trust):
        certs.read_certificate(path)  # a clear error now, not at the first connection
    certs.read_private_key(args.private_key)
    users = {}
    if args.user is not None:
        password = os.environ.get(args.password_env)
        if not password:
            raise ValueError(
                f"--user {args.user}: the environment variable {args.password_env} is not set"
            )
        users[args.user] = password
    return PlcSecurity(
        args.certificate,
        args.private_key,
        tuple(args.trust),
        tuple(args.mode) if args.mode else ("Sign", "SignAndEncrypt"),
        users,
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535 (got {port})")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 (got {text})")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    if args.new_certificate is not None:
        cert_path, key_path = write_certificate(args.new_certificate)
        certificate = certs.read_certificate(cert_path)
        print(f"{cert_path}  SHA-1 {certs.thumbprint(certificate)}")
        print(f"{key_path}")
        return 0
    return run_simulator(
        parser,
        argv,
        lambda c, h, p: LinePlc(c, host=h, port=p, security=plc_security(args)),
        "asyncua",
    )


if __name__ == "__main__":
    sys.exit(main())
