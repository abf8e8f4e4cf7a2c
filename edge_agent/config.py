"""Typed, validated configuration of one agent on one line (TOML).

Every error names its path the way a person finds it in the file: ``sources[1].signals.good.node``.
An invalid configuration never starts the agent: `edge-agent validate` lists every problem and
exits 2, and so will `edge-agent run`.

Sections: ``[agent]`` (its id), ``[place]`` (the line's ISA-95 place: site, area, line, work
centres), ``[store]`` (the SQLite file), ``[mqtt]`` (the uplink), ``[masterdata]`` (an optional
initial master-data document, until the MES sends one), ``[metrics]`` (the optional Prometheus
endpoint, loopback unless told otherwise), and ``[[sources]]``: one per PLC
connection and work centre, with its signal map: ``kind = "opcua"`` (the default; an
``endpoint`` and a node per signal) or ``kind = "modbus"`` (a ``host``, a unit id and a register
per signal, see :class:`ModbusSource`). The signal names and rules are the same for both.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edge_agent import certs
from edge_agent.commands import COMMAND_MODELS, Signing
from edge_agent.domain.counters import CounterSpec
from edge_agent.domain.masterdata import DecimalStr
from edge_agent.domain.quantities import unit
from edge_agent.errors import ConfigError, UnitError
from edge_agent.sources.modbus_codec import (
    BIT_TABLES,
    INTEGER_TYPES,
    REGISTERS,
    WIDTH,
    WRITABLE_TABLES,
)
from edge_agent.sources.modbus_codec import DataType as ModbusType
from edge_agent.sources.modbus_codec import Order as ModbusOrder
from edge_agent.sources.modbus_codec import Table as ModbusTable


def _name(value: str) -> str:
    # names become MQTT topic levels: no separators, no wildcards, nothing a broker treats apart
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ValueError(
            "must be letters, digits, '_', '.' or '-', starting with a letter or digit "
            "(it becomes an MQTT topic level)"
        )
    return value


def _topic_root(value: str) -> str:
    levels = value.split("/")
    if not value or any(not level for level in levels):
        raise ValueError("must be one or more topic levels separated by '/', none empty")
    for level in levels:
        _name(level)
    return value


def _node_id(value: str) -> str:
    # the string forms of an OPC UA NodeId: ns=<index>;<i|s|g|b>=<identifier>
    if not re.fullmatch(r"(ns=\d+;)?[isgb]=.+", value):
        raise ValueError("must be an OPC UA NodeId such as 'ns=2;s=Line1.Filler.Good' or 'i=2258'")
    return value


def _known_unit(value: str) -> str:
    try:
        unit(value)
    except UnitError as exc:
        raise ValueError(str(exc)) from None
    return value


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    # a relative path is relative to the configuration file (``parse_config``'s ``base``)
    base = info.context.get("base") if isinstance(info.context, dict) else None
    return base / value if base is not None and not value.is_absolute() else value


Name = Annotated[str, AfterValidator(_name)]
#: a file named in the configuration: a relative path is relative to the configuration file
ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]
NodeId = Annotated[str, AfterValidator(_node_id)]
UnitCode = Annotated[str, AfterValidator(_known_unit)]


class _Section(BaseModel):
    # unknown keys are refused: a misspelt "scrap" signal silently ignored is scrap never counted
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Section):
    id: Name


class PlaceSection(_Section):
    """The line's place in the ISA-95 equipment hierarchy."""

    site: Name
    area: Name
    line: Name
    work_centres: tuple[Name, ...] = Field(min_length=1)

    @field_validator("work_centres")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({w for w in value if value.count(w) > 1})
        if dupes:
            raise ValueError(f"work centre listed twice: {', '.join(dupes)}")
        return value


#: the shortest HMAC key accepted (RFC 2104: at least the hash's output length is advised)
MIN_SIGNING_KEY_BYTES = 32


def _not_a_literal_secret(value: Any) -> Any:
    if not isinstance(value, dict | _SecretSource):
        # its own error type: describe() never shows the input of this one (it is the secret)
        raise PydanticCustomError(
            "secret_literal",
            'a secret is never written in the configuration: give { file = "..." } (a file '
            'only the agent reads) or { env = "NAME" } (an environment variable)',
        )
    return value


class _SecretSource(_Section):
    """A password or key, read from a file or an environment variable when the agent starts:
    never written in the configuration, never on the command line, never logged."""

    file: ConfigPath | None = None
    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None

    @model_validator(mode="after")
    def _readable(self) -> Self:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        if not self.reveal_bytes():
            raise ValueError(f"{self._where()} is empty")
        return self

    def _where(self) -> str:
        return f"file {str(self.file)!r}" if self.file is not None else f"${self.env}"

    def reveal_bytes(self) -> bytes:
        """The secret (a trailing line break is not part of it); ValueError names what is
        missing, never the value."""
        if self.file is not None:
            try:
                data = self.file.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {self._where()}: {exc.strerror}") from None
        else:
            assert self.env is not None
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"environment variable {self.env} is not set")
            data = value.encode()
        return data.rstrip(b"\r\n")

    def reveal(self) -> str:
        try:
            return self.reveal_bytes().decode()
        except UnicodeDecodeError:
            raise ValueError(f"{self._where()} is not UTF-8 text") from None


#: a secret: ``{ file = "..." }`` or ``{ env = "NAME" }``, never the value itself
Secret = Annotated[_SecretSource, BeforeValidator(_not_a_literal_secret)]


class StoreSection(_Section):
    path: ConfigPath
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class MqttTls(_Section):
    """TLS to the broker (``[mqtt.tls]``): the broker's certificate must chain to ``ca_file`` and
    name ``mqtt.host``; there is no switch that turns either check off.

    ``cert_file`` and ``key_file`` (both or neither): the agent's client certificate, for a broker
    that requires one (mosquitto ``require_certificate true``); ``key_password``: a
    :data:`Secret` for an encrypted key. Every file is loaded at validation, so a wrong path, a
    file that is not PEM, an encrypted key without its password or a certificate and key that do
    not belong together stop ``edge-agent validate``, not the first connection on the line.
    """

    ca_file: ConfigPath
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    key_password: Secret | None = None

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _certificate_loads(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:  # a certificate (and its chain) loads as a trust anchor too
            try:
                ssl.create_default_context().load_verify_locations(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                what = (
                    "a PEM CA certificate" if info.field_name == "ca_file" else "a PEM certificate"
                )
                raise ValueError(_pem_problem(value, exc, what)) from None
        return value

    @field_validator("key_file")
    @classmethod
    def _key_readable(cls, value: Path | None) -> Path | None:
        if value is not None and b"PRIVATE KEY-----" not in _read(value):
            raise ValueError(f"{str(value)!r} holds no PEM private key")
        return value

    @model_validator(mode="after")
    def _client_certificate(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file go together: the client certificate and its key"
            )
        if self.key_password is not None and self.key_file is None:
            raise ValueError("key_password is the password of key_file: give key_file")
        if self.key_file is not None and self.key_password is None and _encrypted(self.key_file):
            raise ValueError(f"key_file {str(self.key_file)!r} is encrypted: give key_password")
        self.ssl_context()  # the pair loads together (raises ValueError naming the keys)
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """The client context: TLS 1.2 or later, the server certificate verified against
        ``ca_file`` and its name checked against the host connected to; the client certificate
        loaded when given. ValueError names the key that is wrong, never a secret."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # the defaults of a SERVER_AUTH context, said here so no one loosens them unseen
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        if self.cert_file is not None and self.key_file is not None:
            password = self.key_password
            try:
                # a callable: OpenSSL asks for a password only for an encrypted key, and never
                # on a terminal (a daemon would hang there)
                context.load_cert_chain(
                    self.cert_file,
                    self.key_file,
                    password=lambda: password.reveal_bytes() if password is not None else b"",
                )
            except ssl.SSLError as exc:
                if exc.reason == "KEY_VALUES_MISMATCH":
                    raise ValueError(
                        f"key_file {str(self.key_file)!r} is not the key of cert_file "
                        f"{str(self.cert_file)!r}"
                    ) from None
                if _encrypted(self.key_file):
                    raise ValueError(
                        f"key_file {str(self.key_file)!r}: cannot decrypt it with key_password"
                    ) from None
                raise ValueError(
                    f"cert_file/key_file: cannot load them ({_ssl_reason(exc)})"
                ) from None
            except OSError as exc:
                raise ValueError(f"cert_file/key_file: cannot read: {exc.strerror}") from None
        return context


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from None


def _encrypted(key_file: Path) -> bool:
    # PKCS#8 "ENCRYPTED PRIVATE KEY", or a traditional key with "Proc-Type: 4,ENCRYPTED"
    return b"ENCRYPTED" in _read(key_file)


def _ssl_reason(exc: ssl.SSLError) -> str:
    return openssl_message(str(exc.args[1]) if len(exc.args) > 1 else str(exc))


def openssl_message(text: str) -> str:
    """An OpenSSL message without its ``[LIB: CODE]`` prefix and ``(_ssl.c:NNN)`` suffix:
    ``[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)`` → ``wrong version
    number``."""
    return re.sub(r"^\[[A-Z0-9_]+(: [A-Z0-9_]+)?\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or text


def _pem_problem(path: Path, exc: OSError | ssl.SSLError, what: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"{str(path)!r} is not {what} ({_ssl_reason(exc)})"
    return f"cannot read {str(path)!r}: {exc.strerror}"


def _loopback(host: str) -> bool:
    """``localhost`` or a loopback address (the MQTT password and the metrics endpoint check
    it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MqttSection(_Section):
    host: str = "127.0.0.1"
    #: default 1883, or 8883 with ``[mqtt.tls]``
    port: int = Field(default=1883, ge=1, le=65535)
    #: TLS to the broker; without it the connection is plain TCP
    tls: MqttTls | None = None
    #: the broker account; ``password`` (a :data:`Secret`) needs it
    username: Annotated[str, Field(min_length=1, pattern=r"^[^\x00-\x1f:]+$")] | None = None
    password: Secret | None = None
    client_id: Name | None = None  # default: the agent id
    protocol: Literal["5", "3.1.1"] = "5"
    qos: Literal[1] = 1
    topic_root: Annotated[str, AfterValidator(_topic_root)] = "edge"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    inflight_window: int = Field(default=100, ge=1, le=65535)
    reconnect_min_ms: int = Field(default=500, ge=10)
    reconnect_max_ms: int = Field(default=30_000, ge=10)
    #: when a message may leave the outbox: "broker" on the broker's success PUBACK (the MES
    #: must hold a persistent session subscribed at QoS 1), "mes-ack" when the MES acknowledges
    #: its id on {topic_base}/in/mes-ack (end to end: survives a broker that forgets sessions)
    delivery: Literal["broker", "mes-ack"] = "broker"
    #: mes-ack: publish again what the MES has not acknowledged after this long
    mes_ack_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    #: how long the broker keeps the agent's session (and queues MES commands for it) while
    #: the agent is away; MQTT 3.1.1 has no expiry (clean_session = false keeps it for ever)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    #: the retained status is published again this often (outbox depth, sources, exceptions)
    status_interval_s: float = Field(default=10.0, gt=0, le=3600)
    #: a command over this size is rejected unread
    max_command_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tls") is not None and "port" not in data:
            return {**data, "port": 8883}  # MQTT over TLS (IANA)
        return data

    @model_validator(mode="after")
    def _backoff(self) -> Self:
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ValueError("reconnect_max_ms must not be less than reconnect_min_ms")
        return self

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username: the broker account it is the password of")
        if self.password is not None and self.tls is None and not _loopback(self.host):
            raise ValueError(
                f"password: it would cross the network to {self.host} in clear text: configure "
                "[mqtt.tls] (a broker on this machine, 127.0.0.1 or localhost, may go without)"
            )
        return self


class ClockSection(_Section):
    """ "No time sync, no posting": beyond ``max_skew_s`` between the agent's clock and the
    MES heartbeat (or a PLC timestamp ahead of it) postings are held until time is trusted
    again (0: no check)."""

    max_skew_s: DecimalStr = Field(default=Decimal(5), ge=0, le=3600)


class CommandsSection(_Section):
    """What the agent takes from the MES on ``{topic_base}/in/{kind}`` (docs/security.md).

    ``accept``: the command kinds this agent applies; any other is rejected (e.g. leave out
    ``master-data`` where the BOMs come only from files). ``signing_key``: a key shared with the
    MES; when set, every command (and heartbeat, and MES acknowledgement) must carry an
    HMAC-SHA256 signature made with it, and a command its user and an ``issued_at`` within
    ``max_age_s`` of the agent's clock.
    """

    accept: tuple[str, ...] = tuple(COMMAND_MODELS)
    signing_key: Secret | None = None
    max_age_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)

    @field_validator("accept")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in COMMAND_MODELS]
        if unknown:
            raise ValueError(
                f"unknown command kind {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(COMMAND_MODELS)})"
            )
        return value

    @field_validator("signing_key")
    @classmethod
    def _long_enough(cls, value: _SecretSource | None) -> _SecretSource | None:
        if value is not None and len(value.reveal_bytes()) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(
                f"a signing key needs at least {MIN_SIGNING_KEY_BYTES} bytes "
                f"(e.g. `openssl rand -hex 32 > key`)"
            )
        return value

    def signing(self) -> Signing | None:
        """The key, read once at start (None: commands need no signature)."""
        if self.signing_key is None:
            return None
        return Signing(self.signing_key.reveal_bytes(), self.max_age_s)


class PilotSection(_Section):
    """Shadow mode for a pilot line (docs/pilot.md). The backflush of the materials in
    ``shadow_materials``, and of every material of the orders in ``shadow_orders``, is computed
    and published as ``material-consumed-shadow``: never a stock movement, no lot drawn; the MES
    sends the actual issues (``actual-issue``) and ``edge-agent pilot report`` compares the two.
    Only backflushed lines are shadowed (metered and weighed lines are measurements already).
    An order's shadow set is fixed at its first posting: a change here applies to orders that
    start afterwards."""

    shadow_materials: tuple[str, ...] = ()
    shadow_orders: tuple[str, ...] = ()

    def shadows(self, order: str) -> tuple[str, ...]:
        """The materials ``order`` backflushes in shadow (``("*",)``: all of them)."""
        return ("*",) if order in self.shadow_orders else self.shadow_materials


class OrdersSection(_Section):
    #: a component's order-close variance beyond this (either way) is flagged
    variance_threshold_pct: DecimalStr = Field(default=Decimal(2), ge=0)


class MasterDataSection(_Section):
    """The documents the agent starts from until the MES sends its own (issue 5).

    ``path`` (materials and BOMs) and ``orders`` are read at every start; ``lots`` seeds the lot
    balances once, when the store has none (afterwards the balances are the store's state).
    """

    path: ConfigPath
    lots: ConfigPath | None = None
    orders: ConfigPath | None = None


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for an IPv6 literal) as (host, port); ValueError naming
    what is wrong (the metrics endpoint, and the command lines' ``--broker``)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address is written in brackets, e.g. '[::1]:9464'")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"must be HOST:PORT with a port from 1 to 65535, e.g. '127.0.0.1:1883' (got {value!r})"
        )
    return host, int(port)


class MetricsSection(_Section):
    """The Prometheus endpoint (docs/metrics.md): served while the agent runs when the section
    is present. Loopback only unless ``allow_remote``: the endpoint has no authentication, and
    what it shows (orders, materials, variances) is the plant's business."""

    #: declared before ``listen``, whose check reads it
    allow_remote: bool = False
    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str, info: ValidationInfo) -> str:
        host, _ = parse_host_port(value)
        if not _loopback(host) and not info.data.get("allow_remote", False):
            raise ValueError(
                f"{host} is not a loopback address: the endpoint has no authentication; "
                "set metrics.allow_remote = true to serve it on the network "
                "(and let a firewall decide who may scrape it)"
            )
        return value

    @property
    def host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.listen)[1]


class NodeSignal(_Section):
    node: NodeId


class CounterSignal(NodeSignal):
    """A cumulative counter: its width in bits and engineering units per count."""

    width: Literal[16, 32, 64] = 32
    scale: DecimalStr = Field(default=Decimal(1), gt=0)
    #: good/scrap: a rise faster than this (engineering units a second, between two readings'
    #: timestamps, over at least a second) is implausible: kept, not posted, until the MES says
    max_rate: DecimalStr | None = Field(default=None, gt=0)

    def counter_spec(self) -> CounterSpec:
        """How the engine counts this counter's values (raw counts of ``scale`` each)."""
        return CounterSpec(self.width, self.scale)


class FeedTiming(_Section):
    """How a flow totalizer is posted: per time slice, bound to the feed's lots after a lag.

    ``slice_s``: a posting every this many seconds (on the minute grid for 60 s), and at every
    operation complete and order change. ``lag_s``: the hold-up between the feed (tank, silo,
    IBC) and the meter: material passing the meter at t left the feed at t − lag, so a lot
    change-over in the feed reaches the meter ``lag_s`` later. See docs/feeds.md.
    """

    slice_s: int = Field(default=60, ge=1, le=86_400)
    lag_s: DecimalStr = Field(default=Decimal(0), ge=0, le=86_400)


class FlowSignal(CounterSignal, FeedTiming):
    """A flow-meter totalizer feeding a `meter` BOM line."""

    uom: UnitCode
    material: str = Field(min_length=1)

    @model_validator(mode="after")
    def _no_max_rate(self) -> Self:
        _no_rate_check(self.max_rate)
        return self


class ScaleSignals(_Section):
    """A scale indicator: weight, stable flag and optional tare, at a stated resolution."""

    weight: NodeSignal
    stable: NodeSignal
    tare: NodeSignal | None = None
    uom: UnitCode
    resolution: DecimalStr = Field(gt=0)
    material: str = Field(min_length=1)


class Signals(_Section):
    """Which PLC node carries what, for one work centre."""

    order: NodeSignal
    good: CounterSignal | None = None
    scrap: CounterSignal | None = None
    complete_request: NodeSignal | None = None
    complete_ack: NodeSignal | None = None
    complete_good: NodeSignal | None = None
    complete_scrap: NodeSignal | None = None
    flow: FlowSignal | None = None
    #: the lot in the feed (tank, silo, IBC) of the flow meter, as the PLC shows it
    feed_lot: NodeSignal | None = None
    scale: ScaleSignals | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_signal_set(self)
        nodes: dict[str, str] = {}
        for name, signal in self._nodes():
            if signal in nodes:
                raise ValueError(f"{name} and {nodes[signal]} read the same node {signal!r}")
            nodes[signal] = name
        return self

    def _nodes(self) -> list[tuple[str, str]]:
        out = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, NodeSignal):
                out.append((name, value.node))
            elif isinstance(value, ScaleSignals):
                out += [
                    (f"{name}.{part}", sig.node)
                    for part in ("weight", "stable", "tare")
                    if (sig := getattr(value, part)) is not None
                ]
        return out


def _check_signal_set(signals: Signals | ModbusSignals) -> None:
    """The rules every signal map keeps, whatever the protocol."""
    handshake = (signals.complete_request, signals.complete_ack)
    if any(handshake) and not all(handshake):
        raise ValueError(
            "complete_request and complete_ack go together: the agent acknowledges each "
            "request it has committed"
        )
    if signals.feed_lot is not None and signals.flow is None:
        raise ValueError("feed_lot is the lot feeding the flow meter: it needs a flow signal")
    if (signals.complete_good or signals.complete_scrap) and not signals.complete_request:
        raise ValueError("complete_good/complete_scrap need the complete_request handshake")
    if not (signals.good or signals.complete_request or signals.flow or signals.scale):
        raise ValueError(
            "nothing to post from: configure a good counter, the operation-complete "
            "handshake, a flow totalizer or a scale"
        )


class Subscription(_Section):
    publishing_interval_ms: int = Field(default=100, ge=10, le=60_000)
    sampling_interval_ms: int = Field(default=50, ge=0, le=60_000)
    # more than one, so a burst of changes between publishes is queued, not overwritten
    queue_size: int = Field(default=10, ge=2, le=10_000)
    deadband: DecimalStr | None = Field(default=None, ge=0)


_SECURE_KEYS: Final = ("mode", "certificate", "private_key", "server_certificate")


def _user_name(value: str) -> str:
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be a user name without control characters")
    return value


class OpcUaSecurity(_Section):
    """How one OPC UA source secures its connection (``[sources.security]``); see
    docs/security.md.

    ``policy = "None"`` (the default) is an unsecured connection and takes no other key.
    ``"Basic256Sha256"`` needs the ``mode`` (``Sign`` or ``SignAndEncrypt``), the agent's
    application ``certificate`` and ``private_key`` (``edge-agent certs`` creates them), and the
    PLC's ``server_certificate``: the agent connects only to a PLC presenting exactly that one.
    ``username`` and ``password`` (a secret) authenticate the user; they need a secure policy,
    so a password never crosses the network in clear. Every file is read and checked here: a
    certificate that does not load, a key that is not the certificate's are configuration errors.
    """

    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["Sign", "SignAndEncrypt"] | None = Field(default=None, validate_default=True)
    certificate: ConfigPath | None = Field(default=None, validate_default=True)
    #: the private key's passphrase, when its file is encrypted (before the key: it is needed
    #: to check the key)
    private_key_password: Secret | None = None
    private_key: ConfigPath | None = Field(default=None, validate_default=True)
    server_certificate: ConfigPath | None = Field(default=None, validate_default=True)
    username: Annotated[str, AfterValidator(_user_name)] | None = None
    password: Secret | None = Field(default=None, validate_default=True)

    @property
    def secure(self) -> bool:
        return self.policy != "None"

    @field_validator(*_SECURE_KEYS)
    @classmethod
    def _with_policy(cls, value: Any, info: ValidationInfo) -> Any:
        policy = info.data.get("policy")
        if policy is None:
            return value  # the policy's own error is reported
        if policy == "None" and value is not None:
            raise ValueError(
                f'only with a secure policy: policy is "None" (set policy = "Basic256Sha256", '
                f"or remove {info.field_name})"
            )
        if policy != "None" and value is None:
            raise ValueError(f"required with policy {policy!r}")
        return value

    @field_validator("certificate")
    @classmethod
    def _agent_certificate(cls, value: Path | None) -> Path | None:
        if value is not None:
            certificate = certs.read_certificate(value)
            certs.check_key_size(certs.rsa_public_key(certificate))
            if certs.application_uri(certificate) is None:
                raise ValueError(
                    f"{str(value)!r} has no ApplicationUri (a URI subjectAltName): OPC UA "
                    "servers refuse such a client; `edge-agent certs` creates a certificate "
                    "with one"
                )
        return value

    @field_validator("private_key")
    @classmethod
    def _agent_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        secret = info.data.get("private_key_password")
        key = certs.read_private_key(value, secret.reveal_bytes() if secret else None)
        certificate_path = info.data.get("certificate")
        if certificate_path is not None:  # else the certificate's own error is reported
            certificate = certs.read_certificate(certificate_path)
            if not certs.key_matches(certificate, key):
                raise ValueError(
                    f"{str(value)!r} is not the private key of the certificate "
                    f"{str(certificate_path)!r} (SHA-1 {certs.thumbprint(certificate)})"
                )
        return value

    @field_validator("server_certificate")
    @classmethod
    def _pinned_certificate(cls, value: Path | None) -> Path | None:
        if value is not None:
            certs.read_certificate(value)
        return value

    @field_validator("password")
    @classmethod
    def _password_with_user(cls, value: Any, info: ValidationInfo) -> Any:
        if "username" not in info.data:
            return value  # the user name's own error is reported
        username = info.data["username"]
        if value is None and username is not None:
            raise ValueError(f"required with a username (the password of {username!r})")
        if value is not None and username is None:
            raise ValueError("needs a username: the password of which user?")
        if value is not None and info.data.get("policy") == "None":
            raise ValueError(
                'only with a secure policy: with policy "None" the password would cross the '
                'network in clear (set policy = "Basic256Sha256")'
            )
        return value


class OpcUaSource(_Section):
    """One OPC UA connection serving one work centre, and its signal map."""

    kind: Literal["opcua"] = "opcua"
    name: Name
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://[^/\s:]+(:\d+)?(/\S*)?$")]
    work_centre: Name
    operation: str = Field(min_length=1)
    subscription: Subscription = Subscription()
    reconnect_min_ms: int = Field(default=500, ge=10)
    reconnect_max_ms: int = Field(default=30_000, ge=10)
    #: the PLC zeroes its good/scrap/flow counters when the order changes: counting for the new
    #: order starts from 0 (false: counting continues from the last value seen)
    counters_reset_on_order_change: bool = True
    #: no security unless configured (policy "None"); see :class:`OpcUaSecurity`
    security: OpcUaSecurity = OpcUaSecurity()
    signals: Signals


# ------------------------------------------------------------------------------------- Modbus

_ENCODED_TYPES: tuple[ModbusType, ...] = (
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float32",
    "string",
)


class ModbusRegister(_Section):
    """Where and how one signal sits in a Modbus device.

    ``address`` is the 0-based protocol address in ``table`` (holding register 40001 in the
    Modicon notation is ``holding`` address 0). ``unit`` overrides the source's ``device_id``
    (a scale indicator or flow meter behind the same gateway). A ``bool`` is a coil or discrete
    input, or ``bit`` 0..15 of a register. ``word_order``/``byte_order`` say where the high word
    and the high byte are ("big": first). ``scale`` and ``offset`` are decimal strings; a float32
    is rounded to ``resolution``. See :mod:`edge_agent.sources.modbus_codec`.
    """

    #: what this signal is (in messages), and the types it may have
    _what: ClassVar[str] = "a value"
    _types: ClassVar[tuple[ModbusType, ...]] = (*_ENCODED_TYPES, "bool")

    table: ModbusTable = "holding"
    address: int = Field(ge=0, le=65535)
    unit: int | None = Field(default=None, ge=0, le=255)
    bit: int | None = Field(default=None, ge=0, le=15)
    type: ModbusType | None = Field(default=None, validate_default=True)
    length: int | None = Field(default=None, ge=1, le=125, validate_default=True)
    word_order: ModbusOrder = "big"
    byte_order: ModbusOrder = "big"
    scale: DecimalStr = Field(default=Decimal(1), validate_default=True)
    offset: DecimalStr = Field(default=Decimal(0), validate_default=True)
    resolution: DecimalStr | None = Field(default=None, gt=0, validate_default=True)

    @field_validator("bit")
    @classmethod
    def _bit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("table") in BIT_TABLES:
            raise ValueError("a coil or discrete input is one bit: bit is for registers only")
        return value

    @field_validator("type")
    @classmethod
    def _type(cls, value: ModbusType | None, info: ValidationInfo) -> ModbusType:
        if "table" not in info.data:
            return value or "bool"  # the table is wrong: reported on its own field
        table, bit = info.data["table"], info.data.get("bit")
        if value is None:
            if table not in BIT_TABLES and bit is None:
                choices = ", ".join(t for t in cls._types if t != "bool")
                raise ValueError(f"required for a {table} register ({choices})")
            value = "bool"
        if value not in cls._types:
            raise ValueError(f"{cls._what} must be {' or '.join(cls._types)}")
        if table in BIT_TABLES and value != "bool":
            raise ValueError(f"a {table} holds one bool, not a {value}")
        if bit is not None and value != "bool":
            raise ValueError(f"bit {bit} is set: type must be bool")
        if value == "bool" and table not in BIT_TABLES and bit is None:
            raise ValueError("a bool in a register needs its bit (0..15)")
        return value

    @field_validator("length")
    @classmethod
    def _length(cls, value: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("type")
        if kind == "string" and value is None:
            raise ValueError("required for a string: registers of 2 characters each")
        if kind not in ("string", None) and value is not None:
            raise ValueError("only a string has a length")
        return value

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: Decimal) -> Decimal:
        if value == 0:
            raise ValueError("must not be 0")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is not None and info.data.get("type") not in ("float32", None):
            raise ValueError("only a float32 is rounded to a resolution")
        return value

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.address + self.size > 65536:
            raise ValueError(f"{self.table}:{self.address} + {self.size} registers run past 65535")
        return self

    @property
    def size(self) -> int:
        """Registers (or bits) the value occupies."""
        if self.table in BIT_TABLES:
            return 1
        if self.type == "string":
            return self.length or 1
        return REGISTERS.get(self.type or "uint16", 1)


class _ExactRegister(ModbusRegister):
    """A value taken as it is: no scale, no offset (a count, a flag, text)."""

    @field_validator("scale", "offset")
    @classmethod
    def _unscaled(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        if value != (1 if info.field_name == "scale" else 0):
            raise ValueError(f"{cls._what} is taken as it is: no {info.field_name}")
        return value


class ModbusText(_ExactRegister):
    """The order id: an ASCII string of ``length`` registers."""

    _what: ClassVar[str] = "the order id"
    _types: ClassVar[tuple[ModbusType, ...]] = ("string",)


class ModbusLot(ModbusText):
    """The lot id in a feed (tank, silo, IBC): an ASCII string of ``length`` registers."""

    _what: ClassVar[str] = "the lot id"


class ModbusFlag(_ExactRegister):
    """A flag: a coil, a discrete input, a bit of a register, or a whole register (not 0)."""

    _what: ClassVar[str] = "a flag"
    _types: ClassVar[tuple[ModbusType, ...]] = ("bool", "uint16", "int16")


class ModbusAck(ModbusFlag):
    """The operation-complete acknowledge: written by the agent, so a coil or a holding
    register (a bit of one is written with mask write, function 22)."""

    @field_validator("table")
    @classmethod
    def _writable(cls, value: ModbusTable) -> ModbusTable:
        if value not in WRITABLE_TABLES:
            raise ValueError(
                f"the agent writes complete_ack: a coil or a holding register, not a {value}"
            )
        return value


class ModbusQuantity(_ExactRegister):
    """A handshake quantity (complete_good, complete_scrap): an integer."""

    _what: ClassVar[str] = "a quantity"
    _types: ClassVar[tuple[ModbusType, ...]] = INTEGER_TYPES


class ModbusCounter(ModbusRegister):
    """A cumulative counter or totalizer, emitted as integer counts.

    An unsigned integer is counted as it is, ``scale`` engineering units per count, and rolls
    over at its width (or at ``rollover``, engineering units, when the device wraps earlier). A
    float32 totalizer is counted in steps of its ``resolution`` and rolls over at ``rollover``
    (required: a float32 resolves fewer steps the larger it gets, so how far it may go decides
    whether the resolution can be kept).
    """

    _what: ClassVar[str] = "a counter"
    _types: ClassVar[tuple[ModbusType, ...]] = ("uint16", "uint32", "uint64", "float32")

    rollover: DecimalStr | None = Field(default=None, gt=0, validate_default=True)
    #: a decrease of at most this much (engineering units, whole counts) is a wobble of the
    #: device's value, not a reset: it counts nothing and what rises past the last value counts
    jitter: DecimalStr = Field(default=Decimal(0), ge=0)
    #: good/scrap: a rise faster than this (engineering units a second) is implausible (as on
    #: an OPC UA counter)
    max_rate: DecimalStr | None = Field(default=None, gt=0)

    @field_validator("scale")
    @classmethod
    def _positive(cls, value: Decimal) -> Decimal:
        if value < 0:
            raise ValueError("a counter's scale must be greater than 0")
        return value

    @field_validator("offset")
    @classmethod
    def _no_offset(cls, value: Decimal) -> Decimal:
        if value != 0:
            raise ValueError("a counter counts from 0: no offset")
        return value

    @field_validator("resolution")
    @classmethod
    def _needs_resolution(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is None and info.data.get("type") == "float32":
            raise ValueError("required for a float32 counter: it is counted in these steps")
        return value

    @field_validator("rollover")
    @classmethod
    def _rollover(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        kind, scale = info.data.get("type"), info.data.get("scale")
        if kind is None or scale is None:
            return value  # reported on its own field
        if kind == "float32":
            resolution = info.data.get("resolution")
            if value is None:
                raise ValueError(
                    "required for a float32 totalizer: where it shows 0 again (its steps grow "
                    "with its value, so the agent must know how far it goes)"
                )
            if resolution is None:
                return value
            steps = Fraction(value) / Fraction(resolution)
            if steps.denominator != 1 or steps < 2:
                raise ValueError(
                    f"must be a whole number of steps of the resolution {resolution}, 2 or more"
                )
            step = _float32_step_below(Fraction(value) / Fraction(scale)) * Fraction(scale)
            if step >= resolution:
                raise ValueError(
                    f"a float32 just below {value} moves in steps of {float(step):g}, not finer "
                    f"than the resolution {resolution}: counts would be lost; use a rollover of "
                    f"at most {_float32_exact_limit(Fraction(resolution), Fraction(scale))} or "
                    "a coarser resolution"
                )
            return value
        if value is not None:
            steps = Fraction(value) / Fraction(scale)
            width = WIDTH[kind]
            if steps.denominator != 1 or not 2 <= steps <= 1 << width:
                raise ValueError(
                    f"must be a whole number of counts of {scale}, from 2 to 2**{width} counts"
                )
        return value

    @model_validator(mode="after")
    def _jitter_in_counts(self) -> Self:
        step = self._step()
        if step is not None and (Fraction(self.jitter) / Fraction(step)).denominator != 1:
            raise ValueError(f"jitter {self.jitter} must be a whole number of counts of {step}")
        return self

    def _step(self) -> Decimal | None:
        return self.resolution if self.type == "float32" else self.scale

    def counter_spec(self) -> CounterSpec:
        """How the engine counts the counts the source emits: ``scale`` (a float32: its
        ``resolution``) engineering units each, rolling over at the width or ``rollover``."""
        step = self._step()
        assert step is not None
        jitter = int(Fraction(self.jitter) / Fraction(step))
        if self.type == "float32":
            assert self.rollover is not None
            return CounterSpec(None, step, rollover_at=self._counts(step), jitter=jitter)
        assert self.type is not None
        width = WIDTH[self.type]
        rollover_at = self._counts(self.scale) if self.rollover is not None else None
        return CounterSpec(width, self.scale, rollover_at=rollover_at, jitter=jitter)

    def _counts(self, step: Decimal) -> int:
        assert self.rollover is not None
        counts = Fraction(self.rollover) / Fraction(step)
        assert counts.denominator == 1
        return int(counts)


class ModbusFlow(ModbusCounter, FeedTiming):
    """A flow-meter totalizer feeding a `meter` BOM line."""

    uom: UnitCode
    material: str = Field(min_length=1)

    @model_validator(mode="after")
    def _no_max_rate(self) -> Self:
        _no_rate_check(self.max_rate)
        return self


def _no_rate_check(max_rate: Decimal | None) -> None:
    if max_rate is not None:
        raise ValueError(
            "max_rate: only for good and scrap counters (a totalizer is posted per time slice)"
        )


class ModbusAnalog(ModbusRegister):
    """A measurement (gross weight, tare): ``raw × scale + offset``; a float32 is rounded to its
    ``resolution`` (default: the scale's)."""

    _what: ClassVar[str] = "a measurement"
    _types: ClassVar[tuple[ModbusType, ...]] = (*INTEGER_TYPES, "float32")


class ModbusScaleSignals(_Section):
    """A scale indicator over Modbus: weight, stable flag and optional tare."""

    weight: ModbusAnalog
    stable: ModbusFlag
    tare: ModbusAnalog | None = None
    uom: UnitCode
    resolution: DecimalStr = Field(gt=0)
    material: str = Field(min_length=1)


class ModbusSignals(_Section):
    """Which registers carry what, for one work centre: the signal names and rules of
    :class:`Signals`, with a register in place of a node."""

    order: ModbusText
    good: ModbusCounter | None = None
    scrap: ModbusCounter | None = None
    complete_request: ModbusFlag | None = None
    complete_ack: ModbusAck | None = None
    complete_good: ModbusQuantity | None = None
    complete_scrap: ModbusQuantity | None = None
    flow: ModbusFlow | None = None
    feed_lot: ModbusLot | None = None
    scale: ModbusScaleSignals | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_signal_set(self)
        return self

    def registers(self) -> dict[str, ModbusRegister]:
        """Signal name (``scale.weight`` for a scale's) → its register, in field order."""
        out: dict[str, ModbusRegister] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, ModbusRegister):
                out[name] = value
            elif isinstance(value, ModbusScaleSignals):
                for part in ("weight", "stable", "tare"):
                    if (register := getattr(value, part)) is not None:
                        out[f"{name}.{part}"] = register
        return out


class ModbusSource(_Section):
    """One Modbus TCP device (or gateway) serving one work centre, polled, and its signal map."""

    kind: Literal["modbus"]
    name: Name
    host: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    port: int = Field(default=502, ge=1, le=65535)
    #: the unit id (slave id) of the device; a register's ``unit`` overrides it
    device_id: int = Field(default=1, ge=0, le=255)
    work_centre: Name
    operation: str = Field(min_length=1)
    poll_interval_ms: int = Field(default=200, ge=10, le=60_000)
    #: a request not answered in time means the connection is lost (reconnect, read again)
    timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    reconnect_min_ms: int = Field(default=500, ge=10)
    reconnect_max_ms: int = Field(default=30_000, ge=10)
    counters_reset_on_order_change: bool = True
    #: unused registers one read may bridge to reach the next signal (0: only adjacent ones)
    max_gap: int = Field(default=8, ge=0, le=124)
    signals: ModbusSignals

    @field_validator("signals")
    @classmethod
    def _no_overlap(cls, value: ModbusSignals, info: ValidationInfo) -> ModbusSignals:
        device = info.data.get("device_id", 1)
        seen: dict[tuple[int, str, int], list[tuple[str, int | None]]] = {}
        for name, register in value.registers().items():
            unit = device if register.unit is None else register.unit
            for address in range(register.address, register.address + register.size):
                users = seen.setdefault((unit, register.table, address), [])
                for other, bit in users:
                    # two bits of one status word are two signals; anything else is one read twice
                    if bit is None or register.bit is None or bit == register.bit:
                        raise ValueError(
                            f"{name} and {other} overlap at {register.table}:{address} "
                            f"(unit {unit})"
                        )
                users.append((name, register.bit))
        return value

    @model_validator(mode="after")
    def _backoff(self) -> Self:
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ValueError("reconnect_max_ms must not be less than reconnect_min_ms")
        return self


def _float32_step_below(limit: Fraction) -> Fraction:
    """The distance between adjacent float32 values just below ``limit`` (> 0)."""
    exponent = limit.numerator.bit_length() - limit.denominator.bit_length()
    while Fraction(2) ** exponent >= limit:
        exponent -= 1
    while Fraction(2) ** (exponent + 1) < limit:
        exponent += 1
    return Fraction(2) ** (exponent - 23)


def _float32_exact_limit(resolution: Fraction, scale: Fraction) -> str:
    """The largest power of two (in engineering units) below which a float32 still moves in
    steps finer than ``resolution``."""
    exponent = 0
    while Fraction(2) ** (exponent - 24) * scale < resolution:
        exponent += 1
    while Fraction(2) ** (exponent - 24) * scale >= resolution:
        exponent -= 1
    limit = Fraction(2) ** exponent * scale
    return format(Decimal(limit.numerator) / Decimal(limit.denominator), "f")


def _source_kind(value: Any) -> str | None:
    """Which model validates a source: its shape when that is plain (an ``endpoint`` is OPC UA,
    a ``host`` is Modbus: a contradicting ``kind`` is then named as the error), else its
    ``kind`` (default "opcua")."""
    if not isinstance(value, dict):
        return getattr(value, "kind", None)
    if "endpoint" in value and "host" not in value:
        return "opcua"
    if "host" in value and "endpoint" not in value:
        return "modbus"
    kind = value.get("kind", "opcua")
    return kind if kind in SOURCE_KINDS else None


SOURCE_KINDS = ("opcua", "modbus")

#: every kind of source configuration
SourceConfig = OpcUaSource | ModbusSource
#: every counter-like signal configuration: each has ``counter_spec()``
CounterConfig = CounterSignal | ModbusCounter

_AnySource = Annotated[
    Annotated[OpcUaSource, Tag("opcua")] | Annotated[ModbusSource, Tag("modbus")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="unknown kind of source",
    ),
]


class Config(_Section):
    agent: AgentSection
    place: PlaceSection
    store: StoreSection
    mqtt: MqttSection = MqttSection()
    clock: ClockSection = ClockSection()
    commands: CommandsSection = CommandsSection()
    orders: OrdersSection = OrdersSection()
    pilot: PilotSection = PilotSection()
    masterdata: MasterDataSection | None = None
    #: the Prometheus endpoint; off without the section (several agents on one PC each need
    #: their own port, and a port in use stops start-up: docs/metrics.md)
    metrics: MetricsSection | None = None
    sources: tuple[_AnySource, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_references(self) -> Self:
        problems = []
        names: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if source.name in names:
                problems.append(
                    f"sources[{i}].name: source {source.name!r} is defined twice (also "
                    f"sources[{names[source.name]}].name)"
                )
            names.setdefault(source.name, i)
            if source.work_centre not in self.place.work_centres:
                problems.append(
                    f"sources[{i}].work_centre: {source.work_centre!r} is not a work centre of "
                    f"line {self.place.line!r} (place.work_centres: "
                    f"{', '.join(self.place.work_centres)})"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.agent.id

    @property
    def topic_base(self) -> str:
        """``{root}/{site}/{area}/{line}/{agent}``: where this agent publishes and listens."""
        p = self.place
        return f"{self.mqtt.topic_root}/{p.site}/{p.area}/{p.line}/{self.agent.id}"


def error_path(loc: Sequence[int | str]) -> str:
    """A pydantic location as a path a person finds in the file: ``sources[1].signals.good``
    (the kind of source pydantic puts after ``sources[1]`` is not in the file: left out)."""
    out = ""
    for i, key in enumerate(loc):
        if key in SOURCE_KINDS and i >= 2 and loc[i - 2] == "sources":
            continue
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out


def describe(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        path = error_path(err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key (misspelt?)")
        elif err["type"] == "value_error" and not path:
            problems += msg.splitlines()  # cross-reference problems carry their own paths
        elif err["type"] == "missing":
            problems.append(f"{path}: required")
        elif err["type"] == "secret_literal":
            problems.append(f"{path}: {msg}")  # the input is the secret itself: not shown
        elif err["type"] == "source_kind":
            value = err.get("input")
            kind = value.get("kind") if isinstance(value, dict) else None
            problems.append(
                f"{path}.kind: must be {' or '.join(map(repr, SOURCE_KINDS))} (got {kind!r})"
            )
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
            problems.append(f"{path or 'config'}: {msg}{shown}")
    return problems


def parse_config(data: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a configuration mapping; relative paths are resolved against ``base``."""
    try:
        return Config.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"cannot read {str(path)!r}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x})"]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    return parse_config(data, path.resolve().parent)
