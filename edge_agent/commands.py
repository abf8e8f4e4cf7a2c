"""What the MES sends the agent (the inbound half of the wire contract): typed, versioned, checked.

Each command is JSON on ``{topic_base}/in/{kind}`` with a ``schema`` (``edge-agent/{kind}``), a
``version`` and a ``command_id`` the MES chooses; the agent answers every command on
``.../out/command-reply`` (accepted, or rejected with the reason) and applies a command id once
(a repeat is answered again, as a duplicate, and changes nothing). Kinds:

- ``master-data``: materials and BOM revisions, the same JSON as ``edge-agent calc`` reads,
  merged into the agent's cached master data (a released revision never changes);
- ``work-order``: ``release`` / ``start`` / ``hold`` / ``close`` of a work order;
- ``lot-staging``: a lot ``staged``, ``returned`` to stock, ``quarantined``, ``released`` or
  ``rebinned`` to another order or work centre;
- ``reversal``: reverse a posted ``material-consumed`` message by its id;
- ``exception-resolution``: post or discard the counts the agent keeps for an exception (an
  implausible counter jump; counts for an unknown, held or closed order);
- ``actual-issue``: a pilot's actual issue of a material in shadow mode (``[pilot]``), to
  compare with the backflush the agent computed beside it;
- ``heartbeat``: the MES's clock, for the agent's clock check (a beacon: not a command, so it
  has no id and no reply).

:func:`parse_command` turns a received payload into a command or a :class:`CommandRejected`
naming the problem: a payload over the size limit, malformed JSON, not an object, a schema that
does not match the topic, an unknown schema version, a missing or wrongly typed field. Whether
the command makes sense (an unknown order, a lot that is not staged) is the engine's decision.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from edge_agent.domain.lots import LotStatus
from edge_agent.domain.masterdata import _DECIMAL_SYNTAX, parse_decimal, parse_timestamp
from edge_agent.messages import SCHEMA_PREFIX, VERSION, WireTime, _Wire

#: a quantity in a command: a decimal string (or a JSON integer), never a JSON number with a
#: fraction (a float to most parsers); the schema says so too
Quantity = Annotated[
    Decimal,
    BeforeValidator(parse_decimal),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": f"^{_DECIMAL_SYNTAX.pattern}$"},
                {"type": "integer"},
            ],
            "title": "Quantity",
        }
    ),
]

#: the default limit of a command's payload (a master-data document is the largest)
MAX_COMMAND_BYTES = 1_048_576

Id = Field(min_length=1, max_length=200)


class Signature(_Wire):
    """An HMAC-SHA256 over the command's canonical form (:func:`canonical_form`), in hex."""

    alg: Literal["HMAC-SHA256"] = "HMAC-SHA256"
    value: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class _Command(_Wire):
    version: Literal[1] = 1
    command_id: str = Id
    issued_at: WireTime | None = None
    issued_by: str | None = None
    signature: Signature | None = None


class MasterDataCommand(_Command):
    """Materials and BOM revisions, merged into the cached master data: a material or a
    revision that is new is added, one that is the same is kept; a revision already known
    with other content, or a material whose unit changes, rejects the whole command."""

    schema_name: Literal["edge-agent/master-data"] = Field(
        default="edge-agent/master-data", alias="schema"
    )
    master_data: dict[str, Any]


class RemnantCount(_Wire):
    lot: str = Id
    quantity: Quantity = Field(ge=0)


class WorkOrderCommand(_Command):
    """``release`` (with ``product``, ``quantity``; ``revision`` pins a BOM revision, else the
    one in effect at release is pinned), ``start`` (also resumes a held order), ``hold``
    (counts are kept, not posted, until started again), ``close`` (variance and genealogy;
    ``remnants`` are the lots returned to stock with their counted quantity)."""

    schema_name: Literal["edge-agent/work-order"] = Field(
        default="edge-agent/work-order", alias="schema"
    )
    action: Literal["release", "start", "hold", "close"]
    order: str = Id
    product: str | None = Field(default=None, min_length=1)
    revision: str | None = Field(default=None, min_length=1)
    quantity: Quantity | None = None
    finished_lot: str | None = Field(default=None, min_length=1)
    work_centre: str | None = Field(default=None, min_length=1)
    remnants: tuple[RemnantCount, ...] = ()
    reason: str | None = None

    @model_validator(mode="after")
    def _fields_of_action(self) -> Self:
        if self.action == "release":
            if self.product is None:
                raise ValueError("product: required to release an order")
            if self.quantity is None or self.quantity <= 0:
                raise ValueError(
                    f"quantity: a released order needs a quantity above 0 (got {self.quantity})"
                )
        elif self.product or self.revision or self.quantity is not None or self.finished_lot:
            raise ValueError(
                f"product, revision, quantity, finished_lot: only for release, not {self.action}"
            )
        if self.remnants and self.action != "close":
            raise ValueError(f"remnants: only for close, not {self.action}")
        return self


class LotStagingCommand(_Command):
    """``staged`` (``material``, ``quantity`` in the material's issue unit, optional
    ``expiry``, ``status``, and ``order``/``work_centre`` to stage it for one only),
    ``returned`` (``quantity`` back to stock), ``quarantined``, ``released``, ``rebinned``
    (``order`` and ``work_centre``: null means any)."""

    schema_name: Literal["edge-agent/lot-staging"] = Field(
        default="edge-agent/lot-staging", alias="schema"
    )
    action: Literal["staged", "returned", "quarantined", "released", "rebinned"]
    lot: str = Id
    material: str | None = Field(default=None, min_length=1)
    quantity: Quantity | None = None
    uom: str | None = None
    expiry: WireTime | None = None
    staged_at: WireTime | None = None
    status: LotStatus = LotStatus.RELEASED
    order: str | None = Field(default=None, min_length=1)
    work_centre: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fields_of_action(self) -> Self:
        if self.action == "staged":
            if self.material is None:
                raise ValueError("material: required to stage a lot")
            if self.quantity is None or self.quantity < 0:
                raise ValueError(
                    f"quantity: a staged lot needs a quantity ≥ 0 (got {self.quantity})"
                )
        elif self.action == "returned":
            if self.quantity is None or self.quantity <= 0:
                raise ValueError(
                    f"quantity: a return needs a quantity above 0 (got {self.quantity})"
                )
        elif self.quantity is not None:
            raise ValueError(f"quantity: not used by {self.action}")
        return self


class ReversalCommand(_Command):
    """Reverse the ``material-consumed`` message ``message_id``: the agent posts a compensating
    message that references it (the original is never edited)."""

    schema_name: Literal["edge-agent/reversal"] = Field(
        default="edge-agent/reversal", alias="schema"
    )
    message_id: str = Id
    reason_code: str = Id
    requested_by: str = Id
    comment: str | None = Field(default=None, max_length=2000)


class ExceptionResolutionCommand(_Command):
    """The MES decides what happens to counts the agent keeps for it: ``post`` the counts of an
    implausible counter jump (``counter_jump``) or ``discard`` them; ``discard`` the counts kept
    for an unknown, held or closed order (``unknown_order``, ``order_held``, ``order_closed``);
    ``approve`` a flagged order-close variance (``usage_variance``), as a signature: who
    (``requested_by``), why (``reason_code``, ``comment``). ``exception_id`` is the open
    exception's message id."""

    schema_name: Literal["edge-agent/exception-resolution"] = Field(
        default="edge-agent/exception-resolution", alias="schema"
    )
    exception_id: str = Id
    action: Literal["post", "discard", "approve"]
    reason_code: str = Id
    requested_by: str = Id
    comment: str | None = Field(default=None, max_length=2000)


class ActualIssueCommand(_Command):
    """A pilot's actual issue (scanned or weighed at the line) of a material in shadow mode to
    an order: what left stock for it, to compare with the shadow backflush (docs/pilot.md).
    A negative ``quantity`` is a return. ``operation`` may be left out when the material is
    backflushed at one operation of the order's BOM; ``phase`` tags it as setup or running
    (the comparison splits the two when every issue of the component is tagged)."""

    schema_name: Literal["edge-agent/actual-issue"] = Field(
        default="edge-agent/actual-issue", alias="schema"
    )
    order: str = Id
    operation: str | None = Field(default=None, min_length=1)
    material: str = Id
    lot: str | None = Field(default=None, min_length=1, max_length=200)
    quantity: Quantity
    uom: str = Field(min_length=1)
    at: WireTime
    phase: Literal["setup", "running"] | None = None

    @model_validator(mode="after")
    def _not_zero(self) -> Self:
        if self.quantity == 0:
            raise ValueError("quantity: an actual issue moves something (got 0)")
        return self


class Heartbeat(_Wire):
    """The MES's clock: the agent compares it with its own (``[clock] max_skew_s``)."""

    schema_name: Literal["edge-agent/heartbeat"] = Field(
        default="edge-agent/heartbeat", alias="schema"
    )
    version: Literal[1] = 1
    mes_time: WireTime
    #: allowed (an MES may number everything) but unused: a heartbeat is not applied or answered
    command_id: str | None = None
    signature: Signature | None = None


class MesAck(BaseModel):
    """The MES acknowledges message ids it has recorded (``delivery = "mes-ack"``, topic
    ``…/in/mes-ack``): those rows leave the agent's outbox. Keys beside ``message_ids`` are
    ignored; an acknowledgement is not answered."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    message_ids: list[str]
    #: required when the agent has a ``[commands] signing_key`` (over the whole payload)
    signature: Signature | None = None


Command = (
    MasterDataCommand
    | WorkOrderCommand
    | LotStagingCommand
    | ReversalCommand
    | ExceptionResolutionCommand
    | ActualIssueCommand
)

#: the last topic level → its model
COMMAND_MODELS: dict[str, type[BaseModel]] = {
    "master-data": MasterDataCommand,
    "work-order": WorkOrderCommand,
    "lot-staging": LotStagingCommand,
    "reversal": ReversalCommand,
    "exception-resolution": ExceptionResolutionCommand,
    "actual-issue": ActualIssueCommand,
    "heartbeat": Heartbeat,
}


class CommandRejected(BaseModel):
    """A command refused before it reached the engine; ``command_id`` when one was readable."""

    kind: str
    command_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Signing:
    """Signed commands (``[commands] signing_key``): every command must carry a
    :class:`Signature` made with ``key``, its ``issued_by`` and an ``issued_at`` within
    ``max_age_s`` of the agent's clock (either way)."""

    key: bytes = field(repr=False)  # never in a log
    max_age_s: float


def canonical_form(data: dict[str, Any]) -> bytes:
    """What a signature covers: the whole command but its ``signature`` member, as JSON with
    the keys sorted (by code point) at every level, no spaces, UTF-8 (non-ASCII as is)."""
    unsigned = {k: v for k, v in data.items() if k != "signature"}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sign(data: dict[str, Any], key: bytes) -> dict[str, Any]:
    """``data`` with its signature (the MES's side; the simulator and the tests use it)."""
    value = hmac.new(key, canonical_form(data), hashlib.sha256).hexdigest()
    return {**data, "signature": {"alg": "HMAC-SHA256", "value": value}}


def signature_problem(  # noqa: PLR0911 - one return per problem, in the order checked
    data: dict[str, Any], signing: Signing, now: datetime, timed: bool = True
) -> str | None:
    """Why ``data`` (a parsed command) is not an acceptably signed command, or None.

    ``timed``: the command must name its user and a fresh ``issued_at`` (a heartbeat's time is
    its ``mes_time``, which the clock check judges; an acknowledgement names no user).
    """
    given = data.get("signature")
    if given is None:
        return "signature: required (this agent accepts signed commands only)"
    value = given.get("value") if isinstance(given, dict) else None
    if not isinstance(value, str) or given.get("alg") != "HMAC-SHA256":
        return 'signature: must be {"alg": "HMAC-SHA256", "value": "<64 hex digits>"}'
    try:
        expected = hmac.new(signing.key, canonical_form(data), hashlib.sha256).hexdigest()
    except ValueError:  # a NaN or infinity has no canonical form
        return "signature: the command has no canonical JSON form (NaN or Infinity)"
    if not hmac.compare_digest(expected, value.lower()):
        return "signature: does not match the command (another key, or the command was altered)"
    if not timed:
        return None
    if not isinstance(data.get("issued_by"), str) or not data["issued_by"]:
        return "issued_by: required in a signed command (the user who issued it)"
    raw = data.get("issued_at")
    try:
        issued = parse_timestamp(raw) if isinstance(raw, str) else None
    except ValueError:
        issued = None
    if issued is None:
        return f"issued_at: required in a signed command, an ISO-8601 time (got {raw!r})"
    age = now - issued
    if abs(age) > timedelta(seconds=signing.max_age_s):
        return (
            f"issued_at: {raw} is {abs(age.total_seconds()):.0f} s "
            f"{'before' if age > timedelta(0) else 'after'} the agent's clock (more than "
            f"max_age_s = {signing.max_age_s:g}): a stale or replayed command"
        )
    return None


def parse_command(  # noqa: PLR0911 - one return per rejection, in the order checked
    kind: str,
    payload: bytes,
    max_bytes: int = MAX_COMMAND_BYTES,
    signing: Signing | None = None,
    now: datetime | None = None,
) -> Command | Heartbeat | CommandRejected:
    """A received command (``kind`` is its topic's last level), or why it is rejected.

    With ``signing``, an unsigned, mis-signed or stale command (``now``: the agent's clock) is
    rejected before its content is looked at.
    """

    def rejected(reason: str, command_id: str | None = None) -> CommandRejected:
        return CommandRejected(kind=kind, command_id=command_id, reason=reason)

    if len(payload) > max_bytes:
        return rejected(f"payload: {len(payload)} bytes, over the limit of {max_bytes} bytes")
    model = COMMAND_MODELS.get(kind)
    if model is None:
        known = ", ".join(sorted(COMMAND_MODELS))
        return rejected(f"topic: unknown command kind {kind!r} (known: {known})")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return rejected(f"payload: malformed JSON ({str(exc)[:200]})")
    if not isinstance(data, dict):
        return rejected(f"payload: a command is a JSON object (got {type(data).__name__})")
    raw_id = data.get("command_id")
    command_id = raw_id if isinstance(raw_id, str) and raw_id else None
    if signing is not None:
        assert now is not None, "a signature's age needs the agent's clock"
        problem = signature_problem(data, signing, now, timed=kind != "heartbeat")
        if problem is not None:
            return rejected(problem, command_id)
    schema = data.get("schema")
    wanted = f"{SCHEMA_PREFIX}{kind}"
    if schema != wanted:
        return rejected(f"schema: {schema!r} on topic {kind!r} (expected {wanted!r})", command_id)
    version = data.get("version")
    if version != VERSION:
        return rejected(
            f"version: unknown schema version {version!r} of {wanted} (this agent reads {VERSION})",
            command_id,
        )
    try:
        command = model.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'command'}: {e['msg']}"
            + (
                f" (got {_short(e['input'])})"
                if e["type"] != "missing" and "got" not in e["msg"]
                else ""
            )
            for e in exc.errors()
        ]
        return rejected("; ".join(problems), command_id)
    assert isinstance(command, Command | Heartbeat)
    return command


def _short(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, Decimal) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
