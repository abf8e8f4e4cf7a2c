"""The messages the agent publishes to the MES: typed, versioned, exact (the wire contract).

Every message is JSON with a ``schema`` name and a ``version``, a deterministic ``message_id``
(the same message re-sent after a reconnect or a restart carries the same id, so the MES
deduplicates on it), the agent and its ISA-95 place, and the engine ``sequence`` that produced it.
Quantities are decimal strings with their unit, never JSON numbers; times are UTC ISO-8601 with
milliseconds (``2026-11-23T07:00:00.123Z``).

Kinds (the last topic level, under ``{root}/{site}/{area}/{line}/{agent}/out/``):

- ``material-consumed``: one component posting (backflush, meter or weigh), its lot movements and
  any quantity held for want of an eligible lot;
- ``material-consumed-shadow``: a backflush posting in shadow mode (a pilot): no stock movement;
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
from typing import Annotated, Literal

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
    """UTC ISO-8601 with milliseconds (truncated, as ``isoformat`` does) and a ``Z``.

    Formatted by hand: on every message, several times, and ``astimezone().isoformat()`` was
    5 % of the agent's time under load (tests/test_messages_time.py checks it is the same)."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


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


def message_id(
    agent: str, order: str, operation: str, sequence: int, kind: str, index: int, store: str = ""
) -> str:
    """Deterministic id: the same engine step always yields the same ids.

    ``sequence`` is the engine's persisted step number; ``index`` numbers the messages one step
    produces; ``store`` is the store's own id, so a new store (after a damaged one was set
    aside) never reuses an id the old one sent, which the MES would drop as a repeat. A uuid5
    over the JSON of the parts, so no separator inside an order id can make two different
    messages collide.
    """
    parts: list[object] = [agent, order, operation, sequence, kind, index]
    if store:  # a store made before store ids keeps the ids it always had
        parts.insert(1, store)
    name = json.dumps(parts, separators=(",", ":"))
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))


class Kind(StrEnum):
    MATERIAL_CONSUMED = "material-consumed"
    MATERIAL_CONSUMED_SHADOW = "material-consumed-shadow"
    PRODUCTION_CONFIRMATION = "production-confirmation"
    EXCEPTION = "exception"
    VARIANCE = "variance"
    GENEALOGY = "genealogy"
    COMMAND_REPLY = "command-reply"


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
    ORDER_HELD = "order_held"  # counts for an order the MES holds: kept until it is started
    ORDER_CLOSED = "order_closed"  # counts for an order already closed: kept, not posted
    CLOCK_UNSYNCHRONIZED = "clock_unsynchronized"  # skew beyond the limit: postings held
    COUNTER_JUMP = "counter_jump"  # a count rose implausibly fast: kept until the MES decides
    USAGE_VARIANCE = "usage_variance"  # a flagged order-close variance: open until approved
    STORE_FULL = "store_full"  # the store's disk was full: no new work taken meanwhile
    STORE_WRITE_FAILED = "store_write_failed"  # the store could not commit (I/O): work held


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


class ClockCorrection(_Wire):
    """A message held while the agent's clock was not trusted (``clock_unsynchronized``):
    ``created_at`` is corrected by ``offset_s`` (the agent's clock minus the MES's, measured
    when the message was made); ``agent_time`` is what the agent's clock said then."""

    agent_time: WireTime
    offset_s: Quantity
    released_at: WireTime


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
    #: set when the message was held for an untrusted clock and released later
    clock: ClockCorrection | None = None


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


class Reversal(_Wire):
    """Why a posting was reversed: the MES's reversal command."""

    command_id: str
    reason_code: str
    requested_by: str
    comment: str | None = None


class _Consumption(_Header):
    """The fields of a component posting, stock movement or shadow."""

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
    #: earlier held quantity now bound to lots (``quantity`` is then 0: it was posted before)
    held_released: Quantity = Decimal(0)
    #: the finished lot the material went into (the order's, when the MES released one)
    finished_lot: str | None = None
    #: a compensating posting: the message it reverses, and who asked why
    reverses: str | None = None
    reversal: Reversal | None = None
    trigger: Trigger


class MaterialConsumed(_Consumption):
    schema_name: Literal["edge-agent/material-consumed"] = Field(
        default="edge-agent/material-consumed", alias="schema"
    )


class ShadowConsumption(_Consumption):
    """A backflush posting computed in shadow mode (a pilot, ``[pilot]``, docs/pilot.md): the
    same figures as a ``material-consumed``, on its own topic, and never a stock movement: it
    binds no lot (``lots`` is empty, nothing is held), the MES books the actual issues instead."""

    schema_name: Literal["edge-agent/material-consumed-shadow"] = Field(
        default="edge-agent/material-consumed-shadow", alias="schema"
    )


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
    #: a "resolved" message: the id of the exception that has cleared (same ``code``)
    resolves: str | None = None


class SubstitutionLine(_Wire):
    """An alternate drawn in place of the primary: ``covers`` is in the primary's unit."""

    material: str
    covers: Quantity
    quantity: Quantity
    uom: str


class VarianceLine(_Wire):
    """One component at order close (exact values, to 12 decimal places at most)."""

    operation: str
    material: str
    uom: str
    method: Literal["backflush", "meter", "weigh"]
    planned: Quantity
    theoretical: Quantity
    #: primary material bound to lots, net of reversals
    issued: Quantity
    #: primary-unit quantity covered by alternates (mix variance)
    substituted: Quantity
    #: posted but still waiting for an eligible lot
    held: Quantity
    #: material gone from the remnant lots without a posting (balance − counted remnant)
    residual: Quantity | None
    #: issued + substituted + residual (None when no remnant was counted)
    actual: Quantity | None
    variance: Quantity
    variance_pct: Quantity | None
    flagged: bool
    substitutions: tuple[SubstitutionLine, ...] = ()


class Remnant(_Wire):
    """A lot returned to stock at close: counted ``quantity`` against the agent's balance."""

    lot: str
    material: str
    uom: str
    quantity: Quantity
    balance: Quantity
    residual: Quantity


class OrderVariance(_Header):
    schema_name: Literal["edge-agent/variance"] = Field(
        default="edge-agent/variance", alias="schema"
    )
    order: str
    product: str
    bom_revision: str
    finished_lot: str | None
    planned_quantity: Quantity
    uom: str
    threshold_pct: Quantity
    lines: tuple[VarianceLine, ...]
    remnants: tuple[Remnant, ...] = ()
    command_id: str


class GenealogyLink(_Wire):
    material: str
    lot: str
    quantity: Quantity
    uom: str
    substitution: bool = False


class Genealogy(_Header):
    """Finished lot → the component lots (and quantities) that went into it, at order close."""

    schema_name: Literal["edge-agent/genealogy"] = Field(
        default="edge-agent/genealogy", alias="schema"
    )
    order: str
    product: str
    bom_revision: str
    finished_lot: str | None
    good: Quantity
    scrap: Quantity
    uom: str
    components: tuple[GenealogyLink, ...]
    command_id: str


class CommandReply(_Header):
    """The agent's answer to every MES command: accepted (applied, or already applied) or
    rejected with the reason; a rejected command changed nothing."""

    schema_name: Literal["edge-agent/command-reply"] = Field(
        default="edge-agent/command-reply", alias="schema"
    )
    #: None when the payload was too broken to carry one
    command_id: str | None
    #: the command's kind (the topic's last level)
    command: str
    result: Literal["accepted", "rejected"]
    reason: str | None = None
    #: the command id was seen before: it was applied once, this is the same answer again
    duplicate: bool = False
    #: ids of the messages the command produced (a compensating posting, a variance, ...)
    produced: tuple[str, ...] = ()


class SourceState(_Wire):
    connected: bool
    #: a signal not good right now → its status
    bad_signals: dict[str, str] = Field(default_factory=dict)


class OpenException(_Wire):
    """An exception not yet resolved: its message id (a later message ``resolves`` it)."""

    message_id: str
    code: ExceptionCode
    order: str | None = None
    material: str | None = None
    since: WireTime
    text: str


class StoreFault(_Wire):
    """The store cannot commit (a full disk, an I/O error): the agent takes no new work and
    retries; this alarm is in the status because it cannot go through the outbox."""

    code: ExceptionCode
    since: WireTime
    text: str


class AuditHead(_Wire):
    """The end of the store's audit chain when the status was made: an MES that keeps the
    latest one holds a copy of the chain's end outside the line PC, which shows a rewritten
    chain (``edge-agent audit verify --head SEQ:HASH``)."""

    seq: int
    hash: str


class StatusMessage(_Wire):
    """The retained ``{topic_base}/status``: the birth (online), updated every
    ``status_interval_s``, and the last will (offline, with no figures: the broker publishes it
    when the agent is gone, so only what was known at connect time)."""

    schema_name: Literal["edge-agent/status"] = Field(default="edge-agent/status", alias="schema")
    version: Literal[1] = 1
    agent: str
    site: str
    area: str
    line: str
    state: Literal["online", "offline"]
    software: str
    at: WireTime
    outbox_depth: int | None = None
    #: age of the oldest message still waiting for its acknowledgement (None: none waiting)
    oldest_unacknowledged_s: Quantity | None = None
    sources: dict[str, SourceState] = Field(default_factory=dict)
    clock_trusted: bool | None = None
    #: postings held while the clock is not trusted (not in the outbox yet)
    held_for_clock: int | None = None
    open_exceptions: tuple[OpenException, ...] = ()
    #: set while the store cannot commit (no new work is taken meanwhile)
    store_fault: StoreFault | None = None
    #: the audit chain's last committed entry (None: the last will, or no entry yet)
    audit_head: AuditHead | None = None


AnyMessage = (
    MaterialConsumed
    | ShadowConsumption
    | ProductionConfirmation
    | ExceptionMessage
    | OrderVariance
    | Genealogy
    | CommandReply
)
Message = Annotated[AnyMessage, Field(discriminator="schema_name")]
_MESSAGE: TypeAdapter[AnyMessage] = TypeAdapter(Message)

KIND_OF: dict[type[_Header], Kind] = {
    MaterialConsumed: Kind.MATERIAL_CONSUMED,
    ShadowConsumption: Kind.MATERIAL_CONSUMED_SHADOW,
    ProductionConfirmation: Kind.PRODUCTION_CONFIRMATION,
    ExceptionMessage: Kind.EXCEPTION,
    OrderVariance: Kind.VARIANCE,
    Genealogy: Kind.GENEALOGY,
    CommandReply: Kind.COMMAND_REPLY,
}
#: postings: held while the agent's clock is not trusted (exceptions and replies are not)
POSTINGS = (MaterialConsumed, ShadowConsumption, ProductionConfirmation, OrderVariance, Genealogy)


def kind_of(message: AnyMessage) -> Kind:
    return KIND_OF[type(message)]


def encode(message: AnyMessage) -> bytes:
    """The wire form: compact JSON, field names as in the contract."""
    return message.model_dump_json(by_alias=True).encode()


def parse_message(payload: bytes | str) -> AnyMessage:
    """Validate a received message; :class:`InputError` names every bad field."""
    try:
        return _MESSAGE.validate_json(payload)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()
        ]
        raise InputError("invalid message: " + "; ".join(problems)) from None
