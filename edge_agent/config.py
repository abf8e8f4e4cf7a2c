"""Typed, validated configuration of one agent on one line (TOML).

Every error names its path the way a person finds it in the file: ``sources[1].signals.good.node``.
An invalid configuration never starts the agent: `edge-agent validate` lists every problem and
exits 2, and so will `edge-agent run`.

Sections: ``[agent]`` (its id), ``[place]`` (the line's ISA-95 place: site, area, line, work
centres), ``[store]`` (the SQLite file), ``[mqtt]`` (the uplink), ``[masterdata]`` (an optional
initial master-data document, until the MES sends one), and ``[[sources]]``: one per PLC
connection and work centre, with its signal map.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from edge_agent.domain.masterdata import DecimalStr
from edge_agent.domain.quantities import unit
from edge_agent.errors import ConfigError, UnitError


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


Name = Annotated[str, AfterValidator(_name)]
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

    @model_validator(mode="after")
    def _unique(self) -> Self:
        dupes = sorted({w for w in self.work_centres if self.work_centres.count(w) > 1})
        if dupes:
            raise ValueError(f"work centre listed twice: {', '.join(dupes)}")
        return self


class StoreSection(_Section):
    path: Path
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class MqttSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
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

    @model_validator(mode="after")
    def _backoff(self) -> Self:
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ValueError("reconnect_max_ms must not be less than reconnect_min_ms")
        return self


class MasterDataSection(_Section):
    """The documents the agent starts from until the MES sends its own (issue 5).

    ``path`` (materials and BOMs) and ``orders`` are read at every start; ``lots`` seeds the lot
    balances once, when the store has none (afterwards the balances are the store's state).
    """

    path: Path
    lots: Path | None = None
    orders: Path | None = None


class NodeSignal(_Section):
    node: NodeId


class CounterSignal(NodeSignal):
    """A cumulative counter: its width in bits and engineering units per count."""

    width: Literal[16, 32, 64] = 32
    scale: DecimalStr = Field(default=Decimal(1), gt=0)


class FlowSignal(CounterSignal):
    """A flow-meter totalizer feeding a `meter` BOM line."""

    uom: UnitCode
    material: str = Field(min_length=1)


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
    scale: ScaleSignals | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        handshake = (self.complete_request, self.complete_ack)
        if any(handshake) and not all(handshake):
            raise ValueError(
                "complete_request and complete_ack go together: the agent acknowledges each "
                "request it has committed"
            )
        if (self.complete_good or self.complete_scrap) and not self.complete_request:
            raise ValueError("complete_good/complete_scrap need the complete_request handshake")
        if not (self.good or self.complete_request or self.flow or self.scale):
            raise ValueError(
                "nothing to post from: configure a good counter, the operation-complete "
                "handshake, a flow totalizer or a scale"
            )
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


class Subscription(_Section):
    publishing_interval_ms: int = Field(default=100, ge=10, le=60_000)
    sampling_interval_ms: int = Field(default=50, ge=0, le=60_000)
    # more than one, so a burst of changes between publishes is queued, not overwritten
    queue_size: int = Field(default=10, ge=2, le=10_000)
    deadband: DecimalStr | None = Field(default=None, ge=0)


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
    signals: Signals


class Config(_Section):
    agent: AgentSection
    place: PlaceSection
    store: StoreSection
    mqtt: MqttSection = MqttSection()
    masterdata: MasterDataSection | None = None
    sources: tuple[OpcUaSource, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_references(self) -> Self:
        problems = []
        names: set[str] = set()
        for i, source in enumerate(self.sources):
            if source.name in names:
                problems.append(f"sources[{i}].name: source {source.name!r} is defined twice")
            names.add(source.name)
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
    """A pydantic location as a path a person finds in the file: ``sources[1].signals.good``."""
    out = ""
    for key in loc:
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
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
            problems.append(f"{path or 'config'}: {msg}{shown}")
    return problems


def parse_config(data: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a configuration mapping; relative paths are resolved against ``base``."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    if base is None:
        return config
    store = config.store.model_copy(update={"path": base / config.store.path})
    masterdata = None
    if config.masterdata is not None:
        m = config.masterdata
        masterdata = m.model_copy(
            update={
                "path": base / m.path,
                "lots": base / m.lots if m.lots is not None else None,
                "orders": base / m.orders if m.orders is not None else None,
            }
        )
    return config.model_copy(update={"store": store, "masterdata": masterdata})


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"cannot read {str(path)!r}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    return parse_config(data, path.resolve().parent)
