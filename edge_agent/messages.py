"""The messages the agent publishes to the MES: typed, versioned, exact (the wire contract).

Every message is JSON with a ``schema`` name and a ``version``, a deterministic ``message_id``
(the same message re-sent after a reconnect or a restart carries the same id, so the MES
deduplicates on it), the agent and its ISA-95 place, and the engine ``sequence`` that produced it.
Quantities are decimal strings with their unit, never JSON numbers; times are UTC ISO-8601 with
milliseconds (``2026-11-23T07:00:00.123Z``).

Kinds (the last topic level, under ``{root}/{site}/{area}/{line}/{agent}/out/``):

- ``material-consumed``: one component posting (backflush, meter or weigh), its lot movements and
  any quantity held for want of an eligible lot;
- ``production-confirmation``: good and scrap confirmed at an operation of an order;
- ``exception``: something the MES or a person must look at (a held requirement, a rejected
  weighing, bad signal quality, a counter reset, an unknown order).

The models parse as strictly as they write: the MES simulator validates with them, and
:func:`parse_message` is what a receiver calls.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
)

from edge_agent.domain.masterdata import parse_decimal, parse_timestamp
from edge_agent.domain.quantities import fmt
from edge_agent.errors import InputError

SCHEMA_PREFIX = "edge-agent/"
VERSION = 1

#: uuid5 namespace of message ids (a fixed, arbitrary UUID: changing it changes every id)
MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c1f0e-6a43-5b8e-9d55-3c1f2b7a0e11")


def wire_time(dt: datetime) -> str:
    """UTC ISO-8601 with milliseconds and a ``Z``."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Quantity = Annotated[
    Decimal,
    BeforeValidator(parse_decimal),
    PlainSerializer(fmt, return_type=str),
]
WireTime = Annotated[
    datetime,
    BeforeValidator(parse_timestamp),
    PlainSerializer(wire_time, return_type=str),
]


def message_id(agent: str, order: str, operation: str, sequence: int, kind: str, index: int) -> str:
    """Deterministic id: the same engine step always yields the same ids.

    ``sequence`` is the engine's persisted step number; ``index`` numbers the messages one step
    produces. A uuid5 over the JSON of the parts, so no separator inside an order id can make two
    different messages collide.
    """
    name = json.dumps([agent, order, operation, sequence, kind, index], separators=(",", ":"))
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))


class Kind(StrEnum):
    MATERIAL_CONSUMED = "material-consumed"
    PRODUCTION_CONFIRMATION = "production-confirmation"
    EXCEPTION = "exception"


class ExceptionCode(StrEnum):
    LOT_HELD = "lot_held"  # a requirement no eligible lot covers: held, posted once staged
    WEIGHING_REJECTED = "weighing_rejected"  # unstable, not positive or out of tolerance
    SIGNAL_QUALITY = "signal_quality"  # bad/uncertain status: the value was not used
    SIGNAL_INVALID = "signal_invalid"  # a value the agent cannot use (type, range)
    COUNTER_RESET = "counter_reset"  # a counter went back outside its rollover window
    UNKNOWN_ORDER = "unknown_order"  # counts for an order the agent has no master data for
    NO_BOM_LINE = "no_bom_line"  # a flow or scale signal with no matching meter/weigh line
    POSTING_REJECTED = "posting_rejected"  # the rules refused a confirmation (e.g. below zero)
    SOURCE_UNREACHABLE = "source_unreachable"  # a PLC connection is lost or cannot be made
    SOURCE_RECOVERED = "source_recovered"  # ... and is back (its counters are read again)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Trigger(_Wire):
    """What caused a message: the signal, where it was read, its value and both timestamps."""

    source: str
    signal: str
    address: str
    value: str | None
    quality: str
    source_time: WireTime | None
    received_at: WireTime


class _Header(_Wire):
    version: Literal[1] = 1
    message_id: str = Field(min_length=1)
    agent: str
    site: str
    area: str
    line: str
    work_centre: str | None
    sequence: int = Field(ge=0)
    created_at: WireTime


class LotMovement(_Wire):
    """A draw (positive) from or return (negative) to one staged lot.

    A continuous feed's movement also says when its material passed the meter
    (``window_from``..``window_to``) and why its window starts there (``cause``: ``slice``, a
    lot ``changeover`` in the feed reaching the meter after the hold-up lag, or the lot's
    ``expiry``).
    """

    lot: str
    material: str
    quantity: Quantity
    substitution: bool = False
    window_from: WireTime | None = None
    window_to: WireTime | None = None
    cause: Literal["slice", "changeover", "expiry"] | None = None


class HeldPart(_Wire):
    quantity: Quantity
    reason: str
    detail: str
    #: a continuous feed's part: the lot in the feed then (None: none, or not a feed)
    lot: str | None = None


class FeedWindow(_Wire):
    """The time slice [start, end) of a continuous feed a meter posting covers: the material
    that passed the meter then, bound to the lot in the feed ``lag_s`` earlier (``lag_s`` is
    None when the line has no feed lot signal and the slice was bound FEFO).
    ``reading_gap_s`` is the longest interval between the totalizer readings the slice was
    interpolated over: a long one (an outage) means the flow, and a split, was assumed even."""

    start: WireTime
    end: WireTime
    lag_s: Quantity | None = None
    reading_gap_s: Quantity


class MaterialConsumed(_Header):
    schema_name: Literal["edge-agent/material-consumed"] = Field(
        default="edge-agent/material-consumed", alias="schema"
    )
    order: str
    product: str
    bom_revision: str
    operation: str
    material: str
    #: this posting, in ``uom``; negative for a correction
    quantity: Quantity
    uom: str
    method: Literal["backflush", "meter", "weigh"]
    #: cumulative over the order and operation: unrounded theoretical and rounded issued
    theoretical: Quantity
    issued: Quantity
    setup_included: bool = False
    rule_version: str
    bom_lines: tuple[str, ...] = ()
    lots: tuple[LotMovement, ...] = ()
    held: HeldPart | None = None
    held_cancelled: Quantity = Decimal(0)
    #: a meter line posted per time slice: the slice
    window: FeedWindow | None = None
    trigger: Trigger


class ProductionConfirmation(_Header):
    schema_name: Literal["edge-agent/production-confirmation"] = Field(
        default="edge-agent/production-confirmation", alias="schema"
    )
    order: str
    product: str
    bom_revision: str
    operation: str
    good: Quantity
    scrap: Quantity
    uom: str
    cumulative_good: Quantity
    cumulative_scrap: Quantity
    trigger: Trigger


class ExceptionMessage(_Header):
    schema_name: Literal["edge-agent/exception"] = Field(
        default="edge-agent/exception", alias="schema"
    )
    code: ExceptionCode
    severity: Severity
    text: str
    order: str | None = None
    operation: str | None = None
    material: str | None = None
    details: dict[str, str] = Field(default_factory=dict)
    trigger: Trigger | None = None


Message = Annotated[
    MaterialConsumed | ProductionConfirmation | ExceptionMessage,
    Field(discriminator="schema_name"),
]
_MESSAGE: TypeAdapter[MaterialConsumed | ProductionConfirmation | ExceptionMessage] = TypeAdapter(
    Message
)

KIND_OF: dict[type[_Header], Kind] = {
    MaterialConsumed: Kind.MATERIAL_CONSUMED,
    ProductionConfirmation: Kind.PRODUCTION_CONFIRMATION,
    ExceptionMessage: Kind.EXCEPTION,
}


def kind_of(message: MaterialConsumed | ProductionConfirmation | ExceptionMessage) -> Kind:
    return KIND_OF[type(message)]


def encode(message: MaterialConsumed | ProductionConfirmation | ExceptionMessage) -> bytes:
    """The wire form: compact JSON, field names as in the contract."""
    return message.model_dump_json(by_alias=True).encode()


def parse_message(
    payload: bytes | str,
) -> MaterialConsumed | ProductionConfirmation | ExceptionMessage:
    """Validate a received message; :class:`InputError` names every bad field."""
    try:
        return _MESSAGE.validate_json(payload)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()
        ]
        raise InputError("invalid message: " + "; ".join(problems)) from None


#: the JSON Schema dialect of the generated schemas
SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message kind, by kind (for the MES side), generated from the
    same pydantic models the agent writes and the MES simulator parses with."""
    out = {}
    for model, kind in KIND_OF.items():
        schema = model.model_json_schema(by_alias=True, mode="serialization")
        out[kind.value] = {
            "$schema": SCHEMA_DRAFT,
            "$id": f"{SCHEMA_PREFIX}{kind.value}/v{VERSION}",
            **schema,
        }
    return out


def schema_files() -> dict[str, str]:
    """File name → text of every message kind's schema: ``{kind}.v{version}.schema.json``,
    stable (sorted keys, two-space indent, a final newline) so a drift shows as a diff."""
    return {
        f"{kind}.v{VERSION}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for kind, schema in json_schemas().items()
    }


def write_schemas(directory: Path) -> list[Path]:
    """Write :func:`schema_files` into ``directory`` (created if missing); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
