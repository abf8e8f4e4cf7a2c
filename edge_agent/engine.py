"""The engine: the one writer. Applies signal events to the backflush rules, in order.

Every event from every source enters one queue; one task applies them to the in-memory state
(the pure rules in ``edge_agent.domain`` decide everything) and collects what they produce:
state changes and messages. A batch of events (as many as are waiting, up to ``MAX_BATCH`` events
or ``MAX_BATCH_MESSAGES`` messages) is committed in **one** SQLite transaction with the messages
it produced (the transactional outbox, group commit), and only then is anything written back to
the PLC: the operation-complete acknowledge means "committed", never "about to be".

What makes a lost or doubled posting impossible here:

- counters are cumulative: the state persisted with a posting is the last counter value it
  consumed, so a value read again after a reconnect or a restart yields only what is new;
- a handshake request is processed once: its result commits with the phase ``committed``; seen
  again it only has its acknowledge (re)written;
- message ids are derived from the engine's persisted ``sequence``, committed with the messages,
  so a re-sent message is recognisably the same one;
- a crash before a commit loses nothing that cannot be re-derived: the PLC still shows the
  cumulative counts and the unacknowledged request.

State keys in the store: ``engine`` (sequence), ``wc/{work centre}``, ``order/{order}``, ``lots``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal, Protocol, TypeVar

import structlog

from edge_agent.commands import (
    COMMAND_MODELS,
    ActualIssueCommand,
    Command,
    CommandRejected,
    ExceptionResolutionCommand,
    Heartbeat,
    LotStagingCommand,
    MasterDataCommand,
    ReversalCommand,
    WorkOrderCommand,
    parse_command,
)
from edge_agent.config import (
    Config,
    CounterConfig,
    CounterSignal,
    FlowSignal,
    ModbusCounter,
    ModbusFlow,
    SourceConfig,
)
from edge_agent.crashpoints import crash_point
from edge_agent.domain.backflush import (
    RULE_VERSION,
    ComponentPosting,
    ConsumptionState,
    ScaleReading,
    confirm,
    meter,
    theoretical,
    weigh,
    weighing_target,
)
from edge_agent.domain.counters import (
    CounterChange,
    CounterState,
    HandshakeAction,
    HandshakePhase,
    after,
    clearing,
    implausible,
    on_request,
    quantity,
    read_counter,
)
from edge_agent.domain.explosion import ComponentKey, ExplodedBom, explode
from edge_agent.domain.feeds import (
    EPOCH,
    FeedCarry,
    FeedStaging,
    SlicePart,
    TotalizerReading,
    due_slices,
    reading_gap,
    record_slice,
    slice_feed,
    totalizer_at,
)
from edge_agent.domain.lots import (
    Binding,
    BindingState,
    Held,
    Lot,
    LotDraw,
    LotStatus,
    bind,
    retry_held,
    reverse_posting,
)
from edge_agent.domain.masterdata import (
    MasterData,
    PostingMethod,
    load_master_data,
    merge_master_doc,
    parse_decimal,
)
from edge_agent.domain.orders import WorkOrder
from edge_agent.domain.quantities import (
    Exact,
    Rounding,
    conversion_factor,
    convert,
    fmt,
    round_to_increment,
    to_decimal,
)
from edge_agent.domain.variance import ComponentVariance, close_variance
from edge_agent.errors import (
    ConsumptionError,
    EdgeAgentError,
    InputError,
    MasterDataError,
    SignalError,
    StoreError,
    StoreFullError,
    UnitError,
)
from edge_agent.messages import (
    KIND_OF,
    POSTINGS,
    AnyMessage,
    ClockCorrection,
    CommandReply,
    ExceptionCode,
    ExceptionMessage,
    FeedWindow,
    Genealogy,
    GenealogyLink,
    HeldPart,
    LotMovement,
    MaterialConsumed,
    OrderVariance,
    ProductionConfirmation,
    Remnant,
    Reversal,
    Severity,
    ShadowConsumption,
    SubstitutionLine,
    Trigger,
    VarianceLine,
    encode,
    kind_of,
    message_id,
    parse_message,
    wire_time,
)
from edge_agent.sources import Origin, Quality, SignalEvent, SignalValue, SourceStatus
from edge_agent.store import Store, UnitOfWork

log = structlog.get_logger(__name__)

MAX_BATCH = 500
#: a batch also ends once its events have produced this many messages: memory and the
#: transaction stay bounded whatever the BOM's size (500 counts × 100 lines was 50,000 messages)
MAX_BATCH_MESSAGES = 2_000
#: a store that cannot commit is retried after retry_interval, doubling up to this
MAX_STORE_RETRY_S = 15.0
COUNTERS = ("good", "scrap", "flow")
_HANDSHAKE_SIGNALS = frozenset({"complete_request", "complete_ack"})
NO_ORDER = ""

FlowConfig = FlowSignal | ModbusFlow


class PlcWriter(Protocol):
    async def write(self, source: str, signal: str, value: bool | int) -> None: ...


# ----------------------------------------------------------------------------- state


@dataclass
class FeedState:
    """A work centre's flow meter as a continuous feed (docs/feeds.md): persisted in its
    ``wc/{name}`` state, in one transaction with the postings and the counter state.

    ``total`` is the flow counted so far (the flow signal's unit, exact, unwrapped from
    rollovers and resets), ``readings`` the (moment, total) readings after ``until``, the end of
    the last slice posted, where the total was ``until_total`` (None: no reading yet).
    ``staging`` is the feed's lot history (moment, lot id as the PLC shows it), ``orders`` which
    order was in effect from when, ``boundaries`` the extra slice ends still to post (operation
    completes, order changes). Each is pruned to what the next slice can still need.
    """

    total: Decimal = Decimal(0)
    until: datetime | None = None
    until_total: Fraction = Fraction(0)
    readings: list[tuple[datetime, Decimal]] = field(default_factory=list)
    staging: list[tuple[datetime, str]] = field(default_factory=list)
    orders: list[tuple[datetime, str | None]] = field(default_factory=list)
    boundaries: list[datetime] = field(default_factory=list)

    @property
    def last(self) -> tuple[datetime, Fraction] | None:
        """The latest reading (the anchor at ``until`` when none came since)."""
        if self.readings:
            at, total = self.readings[-1]
            return at, Fraction(total)
        return None if self.until is None else (self.until, self.until_total)

    def timeline(self) -> list[TotalizerReading]:
        """The readings from ``until`` on, the anchor first (in the flow signal's unit)."""
        assert self.until is not None
        return [
            TotalizerReading(self.until, self.until_total),
            *(TotalizerReading(at, total) for at, total in self.readings if at > self.until),
        ]

    def order_at(self, moment: datetime) -> str | None:
        order = None
        for start, value in self.orders:
            if start > moment:
                break
            order = value
        return order

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": str(self.total),
            "until": self.until.isoformat() if self.until else None,
            "until_total": str(self.until_total),
            "readings": [[at.isoformat(), str(total)] for at, total in self.readings],
            "staging": [[at.isoformat(), lot] for at, lot in self.staging],
            "orders": [[at.isoformat(), order] for at, order in self.orders],
            "boundaries": [at.isoformat() for at in self.boundaries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeedState:
        until = d.get("until")
        return cls(
            parse_decimal(d.get("total", "0")),
            datetime.fromisoformat(until) if until else None,
            Fraction(d.get("until_total", "0")),
            [(datetime.fromisoformat(a), parse_decimal(t)) for a, t in d.get("readings", [])],
            [(datetime.fromisoformat(a), lot) for a, lot in d.get("staging", [])],
            [(datetime.fromisoformat(a), order) for a, order in d.get("orders", [])],
            [datetime.fromisoformat(a) for a in d.get("boundaries", [])],
        )


@dataclass
class WorkCentreState:
    """What the engine knows of one work centre: persisted under ``wc/{name}``."""

    order: str | None = None
    counters: dict[str, CounterState] = field(default_factory=dict)
    handshake: HandshakePhase = HandshakePhase.IDLE
    request: bool | None = None  # the last value of complete_request seen
    #: the acknowledge tag as last written by the agent or read from the PLC
    ack: bool | None = None
    complete_good: int | None = None
    complete_scrap: int | None = None
    weight: Decimal | None = None
    tare: Decimal | None = None
    stable: bool | None = None
    #: source time of the stable=True last taken as a weighing (or baselined on first sight)
    weighed_at: datetime | None = None
    bad_signals: dict[str, str] = field(default_factory=dict)  # signal → status, while not good
    feed: FeedState | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "counters": {
                k: {
                    "raw": c.raw,
                    "source_time": c.source_time.isoformat() if c.source_time else None,
                }
                for k, c in self.counters.items()
            },
            "handshake": self.handshake.value,
            "request": self.request,
            "ack": self.ack,
            "complete_good": self.complete_good,
            "complete_scrap": self.complete_scrap,
            "weight": str(self.weight) if self.weight is not None else None,
            "tare": str(self.tare) if self.tare is not None else None,
            "stable": self.stable,
            "weighed_at": self.weighed_at.isoformat() if self.weighed_at else None,
            "bad_signals": self.bad_signals,
            "feed": self.feed.to_dict() if self.feed else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkCentreState:
        return cls(
            order=d.get("order"),
            counters={
                k: CounterState(
                    c["raw"],
                    datetime.fromisoformat(c["source_time"]) if c["source_time"] else None,
                )
                for k, c in d.get("counters", {}).items()
            },
            handshake=HandshakePhase(d.get("handshake", "idle")),
            request=d.get("request"),
            ack=d.get("ack"),
            complete_good=d.get("complete_good"),
            complete_scrap=d.get("complete_scrap"),
            weight=parse_decimal(d["weight"]) if d.get("weight") is not None else None,
            tare=parse_decimal(d["tare"]) if d.get("tare") is not None else None,
            stable=d.get("stable"),
            weighed_at=datetime.fromisoformat(d["weighed_at"]) if d.get("weighed_at") else None,
            bad_signals=dict(d.get("bad_signals", {})),
            feed=FeedState.from_dict(d["feed"]) if d.get("feed") else None,
        )


@dataclass
class OrderState:
    """One order's progress: persisted under ``order/{id}``.

    ``product``/``revision`` are fixed when the order is first seen with known master data.
    ``pending`` keeps what was counted while the order was unknown, to post once it is known.
    """

    order: str
    product: str | None = None
    revision: str | None = None
    consumption: ConsumptionState = field(default_factory=ConsumptionState)
    bindings: dict[ComponentKey, BindingState] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)
    reported_unknown: bool = False
    #: released → running → held ⇄ running → closed (an order from the orders file: released)
    status: str = "released"
    #: the order as the MES released it (None: from the orders file)
    work_order: dict[str, Any] | None = None
    #: reversed posting id → the compensating posting's id
    reversals: dict[str, str] = field(default_factory=dict)
    #: quantity reversed per component (the wire's ``issued`` is net of it)
    reversed: dict[ComponentKey, Decimal] = field(default_factory=dict)
    #: the close's variance per line, as the variance message carried it (material, uom,
    #: theoretical, variance, flagged; decimal strings): the metrics sum them (None: open, or
    #: closed before the agent kept them)
    variance: list[dict[str, Any]] | None = None
    #: the materials this order backflushes in shadow (a pilot; ``["*"]``: all), fixed from
    #: ``[pilot]`` at its first posting (None: not decided yet)
    shadow: list[str] | None = None
    #: a pilot's actual issues per shadowed component: totals by phase as decimal strings
    #: ("setup", "running", "untagged"), "issues" and "lots" (lot → quantity); the total is
    #: :func:`actual_issued`
    actuals: dict[ComponentKey, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "product": self.product,
            "revision": self.revision,
            "status": self.status,
            "work_order": self.work_order,
            "reversals": self.reversals,
            "reversed": [
                {"operation": op, "material": m, "method": method.value, "quantity": str(q)}
                for (op, m, method), q in self.reversed.items()
            ],
            "consumption": self.consumption.to_dict(),
            "bindings": [
                {"operation": op, "material": m, "method": method.value, "state": b.to_dict()}
                for (op, m, method), b in self.bindings.items()
            ],
            "pending": self.pending,
            "reported_unknown": self.reported_unknown,
            "variance": self.variance,
            "shadow": self.shadow,
            "actuals": [
                {"operation": op, "material": m, "method": method.value, **record}
                for (op, m, method), record in self.actuals.items()
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrderState:
        return cls(
            order=d["order"],
            product=d.get("product"),
            revision=d.get("revision"),
            consumption=ConsumptionState.from_dict(d.get("consumption", {})),
            bindings={
                (b["operation"], b["material"], PostingMethod(b["method"])): BindingState.from_dict(
                    b["state"]
                )
                for b in d.get("bindings", [])
            },
            pending=list(d.get("pending", [])),
            reported_unknown=bool(d.get("reported_unknown", False)),
            status=d.get("status", "released"),
            work_order=d.get("work_order"),
            reversals=dict(d.get("reversals", {})),
            reversed={
                (r["operation"], r["material"], PostingMethod(r["method"])): parse_decimal(
                    r["quantity"]
                )
                for r in d.get("reversed", [])
            },
            variance=d.get("variance"),
            shadow=d.get("shadow"),
            actuals={
                (a["operation"], a["material"], PostingMethod(a["method"])): {
                    k: v for k, v in a.items() if k not in ("operation", "material", "method")
                }
                for a in d.get("actuals", [])
            },
        )

    def shadowed(self, material: str) -> bool:
        """Whether ``material`` is backflushed in shadow on this order (decided)."""
        shadow = self.shadow or []
        return "*" in shadow or material in shadow


@dataclass
class ClockState:
    """ "No time sync, no posting": persisted under ``clock``.

    ``mes_offset_s`` is the agent's clock minus the MES heartbeat's (None: no heartbeat yet);
    ``plc_ahead_s`` how far a PLC's own timestamp was ahead of the agent's clock (None: not).
    While not ``trusted``, postings wait in ``held`` (topic, payload, offset) instead of the
    outbox; counting goes on.
    """

    trusted: bool = True
    mes_offset_s: Decimal | None = None
    plc_ahead_s: Decimal | None = None
    plc_source: str | None = None
    held: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trusted": self.trusted,
            "mes_offset_s": None if self.mes_offset_s is None else str(self.mes_offset_s),
            "plc_ahead_s": None if self.plc_ahead_s is None else str(self.plc_ahead_s),
            "plc_source": self.plc_source,
            "held": self.held,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClockState:
        return cls(
            bool(d.get("trusted", True)),
            parse_decimal(d["mes_offset_s"]) if d.get("mes_offset_s") is not None else None,
            parse_decimal(d["plc_ahead_s"]) if d.get("plc_ahead_s") is not None else None,
            d.get("plc_source"),
            list(d.get("held", [])),
        )


@dataclass(frozen=True, slots=True)
class CommandEvent:
    """A command from the MES as received (``kind``: the topic's last level), queued for the
    engine like a signal; ``original`` is the journal payload a reversal names, fetched by
    :meth:`Engine.run` before it is applied."""

    kind: str
    payload: bytes
    received_at: datetime
    original: bytes | None = None
    #: tells the broker the command is safe (its PUBACK): called once it is committed
    ack: Callable[[], None] | None = field(default=None, compare=False)


class CommandRefused(EdgeAgentError):
    """A command that makes no sense for the agent's state: rejected, nothing changed."""


@dataclass(frozen=True, slots=True)
class PlcWrite:
    """An acknowledge to write once the batch that decided it is committed."""

    source: str
    work_centre: str
    signal: str
    value: bool
    action: HandshakeAction


@dataclass(frozen=True, slots=True)
class Outgoing:
    message: AnyMessage
    topic: str
    #: the wire form, when it was already encoded (a posting's journal copy): encoded once
    payload: bytes | None = None


@dataclass
class EngineStats:
    """Counts since the engine started (the metrics endpoint reads them: edge_agent/metrics.py).

    ``events`` counts every event applied, ``commands`` and ``connection_changes`` the MES
    commands and source connection changes among them; ``messages`` what went to the outbox by
    kind; ``exceptions`` the exception messages raised by code, ``resolved`` their "resolved"
    messages; ``reconnects`` the established PLC connections lost, by source."""

    events: int = 0
    commands: int = 0
    connection_changes: int = 0
    batches: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    resolved: Counter[str] = field(default_factory=Counter)
    reconnects: Counter[str] = field(default_factory=Counter)
    acks_written: int = 0
    ack_failures: int = 0


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Applies events in order; see the module docstring. Build it with :meth:`load`."""

    def __init__(
        self,
        config: Config,
        master: MasterData,
        orders: Mapping[str, WorkOrder],
        lots: Sequence[Lot],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        master_doc: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._signing = config.commands.signing()  # the key is read once, at start
        self.master = master
        #: the master data as JSON (what a master-data command merges into)
        self.master_doc: dict[str, Any] = dict(master_doc or {"materials": [], "boms": []})
        self.orders = dict(orders)
        self.lots: tuple[Lot, ...] = tuple(lots)
        self.clock = clock
        self.sequence = 0
        #: the store's own id, part of every message id (see messages.message_id)
        self.store_id = ""
        self.work_centres: dict[str, WorkCentreState] = {}
        self.order_states: dict[str, OrderState] = {}
        self.stats = EngineStats()
        self.sources: dict[str, SourceConfig] = {s.name: s for s in config.sources}
        self.connected: dict[str, bool] = {s.name: False for s in config.sources}
        self._boms: dict[tuple[str, str], ExplodedBom] = {}
        self._dirty: set[str] = set()
        self._outgoing: list[Outgoing] = []
        #: command id → {digest, result, reason, produced}: a command is applied once
        self.commands: dict[str, dict[str, Any]] = {}
        #: open exception key → {message_id, code, order, material, since, text}
        self.open_exceptions: dict[str, dict[str, Any]] = {}
        self.clock_state = ClockState()
        #: counts kept for the MES to decide on (an implausible jump), by exception message id
        self.parked: dict[str, dict[str, Any]] = {}
        self._journal: list[tuple[str, str, bytes, str]] = []  # postings to keep (uncommitted)
        self._recent: dict[str, bytes] = {}  # postings not yet committed, by id
        self._documents: dict[str, dict[str, Any]] = {}  # documents changed by a command
        self._audits: list[tuple[str, str, bytes]] = []
        self._produced: list[str] | None = None  # ids a command's handling emitted
        self._begin_step()
        self._queue: asyncio.Queue[SignalEvent | SourceStatus | CommandEvent | None] = (
            asyncio.Queue()
        )
        #: set while the store cannot commit: {code, since, text} (the status shows it)
        self.store_fault: dict[str, Any] | None = None
        self._stopping = asyncio.Event()
        self._on_alarm: Callable[[], None] = lambda: None
        self._retry_interval = 1.0
        #: what :meth:`load` was given, to rebuild the committed state after a failed commit
        self._origin: tuple[Mapping[str, WorkOrder], tuple[Lot, ...], MasterData, Any] = (
            self.orders.copy(),
            self.lots,
            master,
            master_doc,
        )

    # ------------------------------------------------------------------ persistence

    @classmethod
    async def load(
        cls,
        config: Config,
        store: Store,
        master: MasterData,
        orders: Mapping[str, WorkOrder],
        initial_lots: Sequence[Lot] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        master_doc: Mapping[str, Any] | None = None,
    ) -> Engine:
        """The engine as last committed; lots are seeded from ``initial_lots`` only once.

        ``orders`` (the orders file) are joined by the orders the MES released (kept in their
        ``order/`` state)."""
        state = await store.all_state()
        lots_state = state.get("lots")
        lots = (
            [Lot.from_dict(x) for x in lots_state["lots"]]
            if lots_state is not None
            else list(initial_lots)
        )
        engine = cls(config, master, orders, lots, clock, master_doc)
        engine.store_id = store.store_id
        engine._origin = (dict(orders), tuple(initial_lots), master, master_doc)
        if lots_state is None:
            engine._dirty.add("lots")
        engine.sequence = int(state.get("engine", {}).get("sequence", 0))
        engine.open_exceptions = dict(state.get("exceptions", {}).get("open", {}))
        engine.parked = dict(state.get("exceptions", {}).get("parked", {}))
        if "clock" in state:
            engine.clock_state = ClockState.from_dict(state["clock"])
        for key, value in state.items():
            if key.startswith("wc/"):
                engine.work_centres[key[3:]] = WorkCentreState.from_dict(value)
            elif key.startswith("order/"):
                order_state = OrderState.from_dict(value)
                engine.order_states[key[6:]] = order_state
                if order_state.work_order is not None:
                    engine.orders[order_state.order] = _work_order(order_state)
            elif key.startswith("command/"):
                engine.commands[key[8:]] = value
        engine._replay_pending(clock())
        return engine

    def _state_value(self, key: str) -> dict[str, Any]:  # noqa: PLR0911 - one per state key
        if key == "engine":
            return {"sequence": self.sequence}
        if key == "lots":
            return {"lots": [lot.to_dict() for lot in self.lots]}
        if key == "exceptions":
            return {"open": self.open_exceptions, "parked": self.parked}
        if key == "clock":
            return self.clock_state.to_dict()
        if key.startswith("command/"):
            return self.commands[key[8:]]
        if key.startswith("wc/"):
            return self.work_centres[key[3:]].to_dict()
        if key.startswith("order/"):
            return self.order_states[key[6:]].to_dict()
        raise AssertionError(f"unknown state key {key!r}")

    def stage(self, uow: UnitOfWork) -> int:
        """Move what the applied events produced into ``uow``; returns the message count."""
        for key in sorted(self._dirty):
            uow.put_state(key, self._state_value(key))
        self._dirty.clear()
        created = wire_time(self.clock())
        for name, doc in self._documents.items():
            uow.put_masterdata("document", name, doc)
        self._documents.clear()
        for kind, ref, payload in self._audits:
            uow.audit(kind, ref, payload, created)
        self._audits.clear()
        for posting_id, order, payload, at in self._journal:
            uow.journal(posting_id, order, payload, at)
        self._journal.clear()
        self._recent.clear()
        for out in self._outgoing:
            payload = out.payload if out.payload is not None else encode(out.message)
            uow.enqueue(out.message.message_id, out.topic, payload, created)
            self.stats.messages[kind_of(out.message).value] += 1
        n = len(self._outgoing)
        self._outgoing.clear()
        return n

    @property
    def pending_messages(self) -> int:
        return len(self._outgoing)

    def status_figures(self) -> dict[str, Any]:
        """What the retained status reports of the engine: sources, clock, open exceptions."""
        sources = {}
        for source in self.config.sources:
            wc = self.work_centres.get(source.work_centre)
            sources[source.name] = {
                "connected": self.connected.get(source.name, False),
                "bad_signals": dict(wc.bad_signals) if wc else {},
            }
        return {
            "sources": sources,
            "store_fault": dict(self.store_fault) if self.store_fault else None,
            "clock_trusted": self.clock_state.trusted,
            "held_for_clock": len(self.clock_state.held),
            "open_exceptions": [
                {
                    "message_id": e["message_id"],
                    "code": e["code"],
                    "order": e["order"],
                    "material": e["material"],
                    "since": e["since"],
                    "text": e["text"],
                }
                for e in self.open_exceptions.values()
            ],
        }

    # ------------------------------------------------------------------ the loop

    async def submit(self, event: SignalEvent | SourceStatus) -> None:
        """A source's ``emit``: queue an event for the engine task."""
        await self._queue.put(event)

    def submit_command(
        self, kind: str, payload: bytes, ack: Callable[[], None] | None = None
    ) -> None:
        """The uplink's ``on_command``: queue an MES command (applied in order with the
        signals, by the one writer); ``ack`` is called once its effects are committed."""
        self._queue.put_nowait(CommandEvent(kind, payload, self.clock(), ack=ack))

    def stop(self) -> None:
        """Finish what is queued, commit it, and return from :meth:`run` (while the store
        cannot commit: return at once; what is held was never acknowledged to anyone)."""
        self._stopping.set()
        self._queue.put_nowait(None)

    async def run(
        self,
        store: Store,
        writer: PlcWriter,
        on_commit: Callable[[], None] = lambda: None,
        retry_interval: float = 1.0,
        on_alarm: Callable[[], None] = lambda: None,
    ) -> None:
        """Apply, commit, acknowledge; until :meth:`stop` (or cancellation).

        A commit that fails (a full disk, an I/O error) is held, see :meth:`_hold`; ``on_alarm``
        is called when the store stops and starts committing again (the status changed)."""
        self._on_alarm = on_alarm
        self._retry_interval = retry_interval
        if (self._dirty or self._outgoing) and await self._commit_or_hold(
            store, on_commit, [], ([], [])
        ) is None:
            return
        while True:
            try:
                async with asyncio.timeout(retry_interval):
                    first = await self._queue.get()
            except TimeoutError:
                writes = self.retry_acknowledges()
                # a clear is written ahead: its IDLE is committed before the write
                if (
                    self._dirty
                    and await self._commit_or_hold(store, on_commit, [], ([], [])) is None
                ):
                    return
                await self._perform(store, writer, writes, on_commit)
                continue
            # as many events as are waiting, up to MAX_BATCH events or MAX_BATCH_MESSAGES
            # messages, each applied as it is taken (a reversal finds a posting made earlier
            # in the same batch)
            events: list[SignalEvent | SourceStatus | CommandEvent] = []
            writes = []
            acks: list[Callable[[], None]] = []
            stopping = False
            item = first
            while True:
                if item is None:
                    stopping = True
                else:
                    event = item
                    if isinstance(event, CommandEvent) and event.kind == "reversal":
                        event = await self.prepared(store, event)
                    events.append(event)
                    more_writes, more_acks = self._apply_batch((event,))
                    writes += more_writes
                    acks += more_acks
                if (
                    self._queue.empty()
                    or len(events) >= MAX_BATCH
                    or self.pending_messages >= MAX_BATCH_MESSAGES
                ):
                    break
                item = self._queue.get_nowait()
            self.stats.batches += 1
            done = await self._commit_or_hold(store, on_commit, events, (writes, acks))
            if done is None:
                return  # stopped while the store could not commit
            writes, acks = done
            for ack in acks:
                ack()
            await self._perform(store, writer, writes, on_commit)
            if stopping:
                return

    def _apply_batch(
        self, events: Sequence[SignalEvent | SourceStatus | CommandEvent]
    ) -> tuple[list[PlcWrite], list[Callable[[], None]]]:
        writes: list[PlcWrite] = []
        acks: list[Callable[[], None]] = []
        for event in events:
            if isinstance(event, CommandEvent) and event.ack is not None:
                acks.append(event.ack)
            writes += self.apply(event)
        return writes, acks

    async def _commit_or_hold(
        self,
        store: Store,
        on_commit: Callable[[], None],
        events: Sequence[SignalEvent | SourceStatus | CommandEvent],
        done: tuple[list[PlcWrite], list[Callable[[], None]]],
    ) -> tuple[list[PlcWrite], list[Callable[[], None]]] | None:
        """Commit what ``events`` did; returns the PLC writes and command acks now owed:
        ``done`` (what applying them returned) when the commit worked, those of applying them
        again when it worked only after :meth:`_hold`, None when stopped meanwhile."""
        try:
            await self._commit(store, on_commit)
        except StoreError as exc:
            return await self._hold(store, on_commit, events, exc)
        return done

    async def _hold(
        self,
        store: Store,
        on_commit: Callable[[], None],
        events: Sequence[SignalEvent | SourceStatus | CommandEvent],
        error: StoreError,
    ) -> tuple[list[PlcWrite], list[Callable[[], None]]] | None:
        """The store could not commit: forget what was applied, take no new work, retry.

        The in-memory state goes back to the last commit (nothing may run ahead of the store),
        no PLC acknowledge or MES command PUBACK is given for the batch, and the queue is not
        drained meanwhile: the PLC's cumulative counters and its unacknowledged requests keep
        the counts, the broker keeps the unacknowledged commands. After ``retry_interval``
        (doubling up to ``MAX_STORE_RETRY_S``) the held ``events`` are applied again to the
        committed state (the same sequence, so the same message ids) and committed with a
        raised-and-resolved exception saying how long the store was down. None: :meth:`stop`
        was called before it worked.
        """
        since = self.clock()
        code = (
            ExceptionCode.STORE_FULL
            if isinstance(error, StoreFullError)
            else ExceptionCode.STORE_WRITE_FAILED
        )
        wait = self._retry_interval
        while True:
            try:
                await self._restore(store)
            except StoreError as exc:  # the store unreadable too: wait, and try again
                error = exc
            if self.store_fault is None:
                self.store_fault = {
                    "code": code.value,
                    "since": wire_time(since),
                    "text": f"{error}: no new work is taken until the store can commit again "
                    "(the PLC's counters keep the counts); retried every "
                    f"{fmt(Decimal(str(self._retry_interval)))} s to "
                    f"{fmt(Decimal(str(MAX_STORE_RETRY_S)))} s",
                }
                log.error(
                    "store_commit_failed", code=code.value, error=str(error), held=len(events)
                )
                self._on_alarm()
            try:
                async with asyncio.timeout(wait):
                    await self._stopping.wait()
                log.warning("engine_stopped_while_store_failing", held=len(events))
                return None
            except TimeoutError:
                pass
            writes, acks = self._apply_batch(events)
            self._store_recovered(code, since)
            try:
                await self._commit(store, on_commit)
            except StoreError as exc:
                error = exc
                wait = min(wait * 2, max(self._retry_interval, MAX_STORE_RETRY_S))
                continue
            log.info("store_committing_again", code=code.value, since=wire_time(since))
            self.store_fault = None
            self._on_alarm()
            return writes, acks

    def _store_recovered(self, code: ExceptionCode, since: datetime) -> None:
        """The store-fault exception, raised and resolved, to commit with the held work."""
        self._begin_step()
        key = f"{code.value}/{wire_time(since)}"
        self._exception(
            None,
            code,
            Severity.ERROR,
            f"the store could not commit from {wire_time(since)}"
            + (" (its disk was full)" if code is ExceptionCode.STORE_FULL else "")
            + ": no new work was taken meanwhile; the PLC's counters kept the counts",
            None,
            None,
            details={"since": wire_time(since)},
            open_key=key,
        )
        self._resolve(key, "the store commits again; what was counted meanwhile follows")

    async def _restore(self, store: Store) -> None:
        """Back to the state as last committed: whatever was applied since is forgotten.

        The engine is rebuilt as :meth:`load` builds it at start-up (the same code path a
        restart takes) and takes its place; only what is not the store's (the queue, the
        sources' connection flags, the statistics) is kept."""
        orders, initial_lots, master, master_doc = self._origin
        doc = await store.get_masterdata("document", "masterdata")
        if doc is not None and doc != master_doc:
            master, master_doc = load_master_data(doc), doc
        fresh = await Engine.load(
            self.config, store, master, orders, initial_lots, self.clock, master_doc
        )
        keep = {"_queue", "connected", "stats", "store_fault", "_stopping", "_origin"}
        keep |= {"_on_alarm", "_retry_interval"}
        for name, value in vars(fresh).items():
            if name not in keep:
                setattr(self, name, value)

    async def _commit(self, store: Store, on_commit: Callable[[], None]) -> None:
        if not self._dirty and not self._outgoing:
            return
        uow = UnitOfWork()
        n = self.stage(uow)
        await store.commit_units([uow])
        crash_point("engine.after_commit")
        if n:
            on_commit()

    async def _perform(
        self,
        store: Store,
        writer: PlcWriter,
        writes: Iterable[PlcWrite],
        on_commit: Callable[[], None],
    ) -> None:
        """Write acknowledges (after the commit); a failed write leaves the phase as it was, so
        the write is retried, never the posting."""
        done = False
        for w in writes:
            try:
                crash_point("engine.before_plc_ack")
                await writer.write(w.source, w.signal, w.value)
                crash_point("engine.after_plc_ack")
                ok = True
                self.stats.acks_written += 1
            except SignalError as exc:
                ok = False
                self.stats.ack_failures += 1
                log.warning(
                    "handshake_ack_failed", work_centre=w.work_centre, value=w.value, error=str(exc)
                )
            wc = self.work_centres[w.work_centre]
            if ok and wc.ack is not w.value:
                wc.ack = bool(w.value)
                self._dirty.add(f"wc/{w.work_centre}")
                done = True
            phase = after(wc.handshake, w.action, written=ok)
            if phase is not wc.handshake:
                wc.handshake = phase
                self._dirty.add(f"wc/{w.work_centre}")
                done = True
        if done:
            # a failed commit here leaves the phase as committed: the acknowledge is written
            # again (it is idempotent) once the store commits again
            await self._commit_or_hold(store, on_commit, [], ([], []))

    async def prepared(self, store: Store, event: CommandEvent) -> CommandEvent:
        """A reversal with the posting it names, from the journal (or this uncommitted
        batch); a payload that names none is left for :meth:`apply` to reject."""
        try:
            target = json.loads(event.payload).get("message_id")
        except (ValueError, AttributeError, RecursionError):
            return event
        if not isinstance(target, str):
            return event
        original = self._recent.get(target) or await store.journal_entry(target)
        return replace(event, original=original)

    def retry_acknowledges(self) -> list[PlcWrite]:
        """Acknowledge writes still owed to the PLC (a failed write, a restart in between)."""
        writes = []
        for source in self.config.sources:
            if not self.connected.get(source.name) or source.signals.complete_request is None:
                continue
            wc = self.work_centres.get(source.work_centre)
            if wc is None or wc.request is None:
                continue
            action = on_request(wc.handshake, wc.request, wc.ack)
            if action is HandshakeAction.CLEAR_ACK:
                self._clear_ahead(source, wc)
            if action in (HandshakeAction.WRITE_ACK, HandshakeAction.CLEAR_ACK):
                writes.append(self._ack(source, action))
        return writes

    # ------------------------------------------------------------------ applying one event

    def apply(self, event: SignalEvent | SourceStatus | CommandEvent) -> list[PlcWrite]:
        """Apply one event to the in-memory state; returns the PLC writes it calls for."""
        self.stats.events += 1
        self._begin_step()
        if isinstance(event, SourceStatus):
            self.stats.connection_changes += 1
            self._source_status(event)
            return []
        if isinstance(event, CommandEvent):
            self.stats.commands += 1
            self._command(event)
            return []
        self._plc_clock(event)
        source = self.sources.get(event.source)
        if source is None:
            log.warning("event_from_unknown_source", source=event.source)
            return []
        wc = self._wc(source.work_centre)
        if event.quality is not Quality.GOOD:
            self._bad_quality(source, wc, event)
            return []
        if wc.bad_signals.pop(event.signal, None) is not None:
            self._dirty.add(f"wc/{source.work_centre}")
            log.info("signal_quality_restored", signal=event.signal, address=event.address)
            self._resolve(
                f"signal_quality/{source.name}/{event.signal}",
                f"{event.signal} ({event.address}) is good again: its values are used",
                source.work_centre,
            )
        invalid = f"signal_invalid/{source.name}/{event.signal}"
        try:
            writes = self._apply_signal(source, wc, event)
        except SignalError as exc:
            # once per transition, like bad quality: a PLC showing NaN at every poll is one
            # exception, open until a valid value is used; nothing of the value is kept
            self._exception(
                source.work_centre,
                ExceptionCode.SIGNAL_INVALID,
                Severity.ERROR,
                f"{event.signal} ({event.address}): {exc}: the value is not used, the last "
                "valid one stands until a valid value is read",
                wc.order,
                source.operation,
                details={
                    "signal": event.signal,
                    "address": event.address,
                    "value": _shown(event.value),
                    "error": str(exc),
                },
                trigger=_trigger(event),
                open_key=invalid,
                supersede=False,
            )
            return []
        if invalid in self.open_exceptions:
            log.info("signal_valid_again", signal=event.signal, address=event.address)
            self._resolve(
                invalid,
                f"{event.signal} ({event.address}) has a valid value again ({_shown(event.value)})",
                source.work_centre,
            )
        return writes

    def _source_status(self, status: SourceStatus) -> None:
        """A lost (or never made) PLC connection is an exception once, and its return another:
        nothing is counted meanwhile, and the read after reconnecting catches up."""
        if self.connected.get(status.source) and not status.connected:
            self.stats.reconnects[status.source] += 1
        self.connected[status.source] = status.connected
        log.info("source_status", source=status.source, connected=status.connected)
        source = self.sources.get(status.source)
        if source is None:
            return
        wc = self.work_centres.get(source.work_centre)
        order = wc.order if wc else None
        key = f"source_unreachable/{status.source}"
        if not status.connected and key not in self.open_exceptions:
            self._exception(
                source.work_centre,
                ExceptionCode.SOURCE_UNREACHABLE,
                Severity.ERROR,
                f"PLC connection {status.source} of work centre {source.work_centre} is down "
                f"({status.detail}): nothing is counted until it is back; the counters are then "
                "read and the difference posted",
                order,
                source.operation,
                details={"source": status.source, "detail": status.detail},
                open_key=key,
            )
        elif status.connected and key in self.open_exceptions:
            resolves = self.open_exceptions.pop(key)["message_id"]
            self._dirty.add("exceptions")
            self._exception(
                source.work_centre,
                ExceptionCode.SOURCE_RECOVERED,
                Severity.INFO,
                f"PLC connection {status.source} of work centre {source.work_centre} is back",
                order,
                source.operation,
                details={"source": status.source, "detail": status.detail},
                resolves=resolves,
            )

    def _wc(self, name: str) -> WorkCentreState:
        if name not in self.work_centres:
            self.work_centres[name] = WorkCentreState()
            self._dirty.add(f"wc/{name}")
        return self.work_centres[name]

    def _bad_quality(self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent) -> None:
        """Bad or uncertain: the value is never used; one exception per transition."""
        if wc.bad_signals.get(event.signal) == event.status:
            return
        wc.bad_signals[event.signal] = event.status
        self._dirty.add(f"wc/{source.work_centre}")
        self._exception(
            source.work_centre,
            ExceptionCode.SIGNAL_QUALITY,
            Severity.WARNING,
            f"{event.signal} ({event.address}) has quality {event.quality.value} "
            f"({event.status}): its values are not used until it is good again",
            wc.order,
            source.operation,
            details={"status": event.status, "quality": event.quality.value},
            trigger=_trigger(event),
            open_key=f"signal_quality/{source.name}/{event.signal}",
        )

    def _apply_signal(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent
    ) -> list[PlcWrite]:
        signal, key = event.signal, f"wc/{source.work_centre}"
        sigs = source.signals
        if signal in _HANDSHAKE_SIGNALS:
            handler = self._request if signal == "complete_request" else self._ack_read
            return handler(source, wc, event)
        if signal == "order":
            self._order_changed(source, wc, event)
        elif signal in ("good", "scrap"):
            spec = sigs.good if signal == "good" else sigs.scrap
            assert spec is not None
            since = wc.counters.get(signal, CounterState()).source_time
            counts = self._count(source, wc, event, spec)
            if counts:
                q = quantity(spec.counter_spec(), counts)
                good, scrap = (q, Decimal(0)) if signal == "good" else (Decimal(0), q)
                at = event.source_time or event.received_at
                if implausible(spec.counter_spec(), counts, since, at, spec.max_rate):
                    self._park_jump(source, wc, event, good, scrap, since)
                else:
                    self._confirm(source, wc.order, good, scrap, event)
        elif signal == "flow":
            assert sigs.flow is not None
            counts = self._count(source, wc, event, sigs.flow)
            self._feed_reading(source, wc, event, quantity(sigs.flow.counter_spec(), counts))
        elif signal == "feed_lot":
            self._feed_lot(source, wc, event)
        elif signal in ("complete_good", "complete_scrap"):
            value = _int(event)
            if value < 0:
                raise SignalError(f"a quantity cannot be negative (got {value})")
            setattr(wc, signal, value)
            self._dirty.add(key)
        elif signal in {"scale.weight", "scale.tare"}:
            assert sigs.scale is not None
            reading = round_to_increment(Fraction(_decimal(event)), sigs.scale.resolution, _HALF_UP)
            setattr(wc, signal.removeprefix("scale."), reading)
            self._dirty.add(key)
        elif signal == "scale.stable":
            self._stable(source, wc, event)
        return []

    def _stable(self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent) -> None:
        """A weighing is the scale's stable=True, identified by its source timestamp.

        Not only a False→True edge: a weighing finished while the agent was away (or whose
        edge was still queued when it stopped) shows up as a True newer than the last one taken.
        A duplicate or older notification is not a new weighing; on a fresh agent the first
        True seen is a baseline (it may be an old weighing), as with counters. This needs the
        device's own timestamp; without one (Modbus) only a False→True change is a weighing.
        """
        stable = _bool(event)
        at = event.source_time or event.received_at
        if stable and not event.device_time:
            # a poll time (Modbus) is new at every read, so it cannot identify a weighing: only
            # a False→True change the agent saw is one (a re-read never doubles a weighing)
            if wc.stable is False:
                wc.weighed_at = at
                self._weighing(source, wc, event)
        elif stable:
            first_sight = wc.stable is None and wc.weighed_at is None
            if first_sight or wc.weighed_at is None or at > wc.weighed_at:
                wc.weighed_at = at
                self._dirty.add(f"wc/{source.work_centre}")
                if not first_sight:
                    self._weighing(source, wc, event)
        if stable is not wc.stable:
            wc.stable = stable
            self._dirty.add(f"wc/{source.work_centre}")

    def _order_changed(self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent) -> None:
        value = event.value
        if value is not None and not isinstance(value, str):
            raise SignalError(f"an order id must be a string (got {value!r})")
        order = value.strip() if value else None
        if order == wc.order:
            return
        log.info("order_changed", work_centre=source.work_centre, order=order, previous=wc.order)
        if (
            event.origin is Origin.READ
            and wc.order
            and source.counters_reset_on_order_change
            and any(_counter(source, name) for name in COUNTERS)
        ):
            self._unseen_order_change(source, wc, event, order)
        wc.order = order or None
        at = event.source_time or event.received_at
        self._feed_order(source, wc, at, wc.order, _trigger(event))
        if source.counters_reset_on_order_change:
            wc.counters = {name: CounterState(0, at) for name in COUNTERS if _counter(source, name)}
        self._dirty.add(f"wc/{source.work_centre}")
        if order:
            self._order(order)  # pins the BOM revision in effect now

    def _unseen_order_change(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent, order: str | None
    ) -> None:
        """The order changed while the agent could not read the PLC (first seen in the read
        after a (re)connect or a start): the counters were reset with it, so what the previous
        order counted after the agent's last reading is gone from the PLC. Said, not guessed."""
        last = max(
            (c.source_time for c in wc.counters.values() if c.source_time is not None),
            default=None,
        )
        self._exception(
            source.work_centre,
            ExceptionCode.COUNTER_RESET,
            Severity.WARNING,
            f"order {wc.order} changed to {order or 'none'} at {source.work_centre} while the PLC "
            "could not be read: its counters were reset with the change, so counts of "
            f"{wc.order} after the agent's last reading cannot be known (the operation-complete "
            "handshake has no such gap)",
            wc.order,
            source.operation,
            details={
                "new_order": order or "",
                "last_reading": wire_time(last) if last is not None else "",
            },
            trigger=_trigger(event),
        )

    def _count(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent, cfg: CounterConfig
    ) -> int:
        raw = _int(event)
        state = wc.counters.get(event.signal, CounterState())
        reading = read_counter(
            cfg.counter_spec(), state, raw, event.source_time or event.received_at
        )
        if reading.change is CounterChange.STALE:
            return 0
        if reading.change is CounterChange.UNCHANGED and event.origin is Origin.REFRESH:
            return 0  # "still the same": nothing to count, nothing to persist
        if reading.state != state:
            wc.counters[event.signal] = reading.state
            self._dirty.add(f"wc/{source.work_centre}")
        if reading.change is CounterChange.RESET:
            self._exception(
                source.work_centre,
                ExceptionCode.COUNTER_RESET,
                Severity.WARNING,
                f"counter {event.signal} ({event.address}) went back from {state.raw} to {raw}: "
                f"counted as restarted from zero; counts between the last reading and the reset "
                "cannot be known",
                wc.order,
                source.operation,
                details={"previous": str(state.raw), "value": str(raw)},
                trigger=_trigger(event),
            )
        return reading.counts

    def _request(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent
    ) -> list[PlcWrite]:
        request = _bool(event)
        if wc.request is not request:
            wc.request = request
            self._dirty.add(f"wc/{source.work_centre}")
        action = on_request(wc.handshake, request, wc.ack)
        if action is HandshakeAction.NONE:
            return []
        if action is HandshakeAction.CLEAR_ACK:
            self._clear_ahead(source, wc)
        if action is HandshakeAction.PROCESS:
            self._feed_boundary(source, wc, event.source_time or event.received_at)
            good, scrap = Decimal(wc.complete_good or 0), Decimal(wc.complete_scrap or 0)
            self._confirm(source, wc.order, good, scrap, event)
            wc.handshake = after(wc.handshake, action)
            self._dirty.add(f"wc/{source.work_centre}")
            action = HandshakeAction.WRITE_ACK
        return [self._ack(source, action)]

    def _ack_read(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent
    ) -> list[PlcWrite]:
        """The acknowledge tag as the PLC shows it: one left high with no request is cleared."""
        ack = _bool(event)
        if wc.ack is not ack:
            wc.ack = ack
            self._dirty.add(f"wc/{source.work_centre}")
        if wc.request is False and on_request(wc.handshake, False, ack) is (
            HandshakeAction.CLEAR_ACK
        ):
            self._clear_ahead(source, wc)
            return [self._ack(source, HandshakeAction.CLEAR_ACK)]
        return []

    def _clear_ahead(self, source: SourceConfig, wc: WorkCentreState) -> None:
        """Commit IDLE with the batch, before the acknowledge is cleared (write-ahead)."""
        phase = clearing(wc.handshake, HandshakeAction.CLEAR_ACK)
        if phase is not wc.handshake:
            wc.handshake = phase
            self._dirty.add(f"wc/{source.work_centre}")

    def _ack(self, source: SourceConfig, action: HandshakeAction) -> PlcWrite:
        return PlcWrite(
            source.name,
            source.work_centre,
            "complete_ack",
            action is HandshakeAction.WRITE_ACK,
            action,
        )

    # ------------------------------------------------------------------ orders and postings

    def _order(self, order: str) -> OrderState:
        state = self.order_states.get(order)
        if state is None:
            state = self.order_states[order] = OrderState(order)
            self._dirty.add(f"order/{order}")
        if state.product is None and order in self.orders:
            wo = self.orders[order]
            state.product = wo.product
            state.revision = self.master.bom(wo.product, wo.revision, self.clock()).revision
            self._dirty.add(f"order/{order}")
        return state

    def _bom(self, state: OrderState) -> ExplodedBom:
        assert state.product is not None
        assert state.revision is not None
        return self._exploded(state.product, state.revision)

    def _exploded(self, product: str, revision: str) -> ExplodedBom:
        key = (product, revision)
        if key not in self._boms:
            self._boms[key] = explode(self.master, self.master.bom(*key), self.clock())
        return self._boms[key]

    def _known(
        self, source: SourceConfig, order: str | None, pending: dict[str, Any], trigger: Trigger
    ) -> OrderState | None:
        """The order's state when its master data is known and it may be posted to; else keep
        ``pending`` for later (an unknown order, or one the MES holds or has closed)."""
        state = self._order(order or NO_ORDER)
        if state.product is not None and state.status in ("held", "closed"):
            state.pending.append(pending)
            self._dirty.add(f"order/{state.order}")
            held = state.status == "held"
            self._exception(
                source.work_centre,
                ExceptionCode.ORDER_HELD if held else ExceptionCode.ORDER_CLOSED,
                Severity.ERROR,
                f"counts for order {state.order} on work centre {source.work_centre}, which the "
                + (
                    "MES holds: they are kept and posted when the order is started again"
                    if held
                    else "MES has closed: they are kept, not posted (listed in the status)"
                ),
                state.order,
                source.operation,
                trigger=trigger,
                open_key=f"order_{state.status}/{state.order}",
                supersede=False,
            )
            return None
        if state.product is not None:
            return state
        state.pending.append(pending)
        self._dirty.add(f"order/{state.order}")
        if not state.reported_unknown:
            state.reported_unknown = True
            what = f"order {order!r} is not known" if order else "no order is set"
            self._exception(
                source.work_centre,
                ExceptionCode.UNKNOWN_ORDER,
                Severity.ERROR,
                f"{what} on work centre {source.work_centre}: its counts are kept and posted "
                "once the order is known",
                order,
                source.operation,
                trigger=trigger,
                open_key=f"unknown_order/{state.order}",
            )
        return None

    def _park_jump(
        self,
        source: SourceConfig,
        wc: WorkCentreState,
        event: SignalEvent,
        good: Decimal,
        scrap: Decimal,
        since: datetime | None,
    ) -> None:
        """An implausible rise: counted (the counter moves on), kept, raised; posted or
        discarded when the MES resolves the exception."""
        spec = _counter(source, event.signal)
        assert spec is not None
        item = self._confirm_item(source, good, scrap, event)
        item["order"] = wc.order
        rise = good + scrap
        message_id = self._exception(
            source.work_centre,
            ExceptionCode.COUNTER_JUMP,
            Severity.ERROR,
            f"{event.signal} ({event.address}) rose by {fmt(rise)} since "
            f"{since.isoformat() if since else 'the last reading'}, faster than its max_rate of "
            f"{fmt(spec.max_rate or Decimal(0))} a second: the counts are kept, not posted, until "
            "the MES posts or discards them (exception-resolution)",
            wc.order,
            source.operation,
            details={
                "rise": fmt(rise),
                "value": str(event.value),
                "max_rate": fmt(spec.max_rate or Decimal(0)),
            },
            trigger=_trigger(event),
            open_key=f"counter_jump/{source.name}/{event.signal}/{event.received_at.isoformat()}",
        )
        assert message_id is not None
        self.parked[message_id] = item
        self._dirty.add("exceptions")

    def _confirm_item(
        self, source: SourceConfig, good: Decimal, scrap: Decimal, event: SignalEvent
    ) -> dict[str, Any]:
        """A confirmation as kept for later (pending, parked): JSON."""
        return {
            "kind": "confirm",
            "work_centre": source.work_centre,
            "source": source.name,
            "operation": source.operation,
            "good": str(good),
            "scrap": str(scrap),
            "trigger": _trigger(event).model_dump(mode="json"),
        }

    def _confirm(
        self,
        source: SourceConfig,
        order: str | None,
        good: Decimal,
        scrap: Decimal,
        event: SignalEvent,
    ) -> None:
        pending = self._confirm_item(source, good, scrap, event)
        state = self._known(source, order, pending, _trigger(event))
        if state is not None:
            self._post_confirmation(
                source.work_centre, state, source.operation, good, scrap, _trigger(event), event
            )

    def _post_confirmation(
        self,
        work_centre: str,
        state: OrderState,
        operation: str,
        good: Decimal,
        scrap: Decimal,
        trigger: Trigger,
        event: SignalEvent | None,
    ) -> None:
        bom = self._bom(state)
        now = event.received_at if event else self.clock()
        try:
            result = confirm(self.master, bom, state.consumption, operation, good, scrap)
        except ConsumptionError as exc:
            self._rejected(work_centre, state, operation, exc, trigger)
            return
        state.consumption = result.state
        self._dirty.add(f"order/{state.order}")
        uom = bom.uom
        self._emit(
            ProductionConfirmation(
                **self._header(work_centre, state.order, operation, "production-confirmation"),
                order=state.order,
                product=bom.product,
                bom_revision=bom.revision,
                operation=operation,
                good=good,
                scrap=scrap,
                uom=uom,
                cumulative_good=result.progress.good,
                cumulative_scrap=result.progress.scrap,
                trigger=trigger,
            )
        )
        for posting in result.postings:
            self._post(work_centre, state, posting, trigger, now)

    # ------------------------------------------------------------------ continuous feeds

    def _feed(self, wc: WorkCentreState) -> FeedState:
        if wc.feed is None:
            wc.feed = FeedState()
        return wc.feed

    def _feed_reading(
        self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent, amount: Decimal
    ) -> None:
        """A totalizer reading: kept on the feed's timeline, then the slices it makes due are
        posted. A reading that only says "unchanged" (a refresh) is kept only when it closes a
        slice, so a still meter does not write the store every second."""
        flow = source.signals.flow
        assert flow is not None
        feed, key = self._feed(wc), f"wc/{source.work_centre}"
        at = event.source_time or event.received_at
        feed.total += amount
        last = feed.last
        if last is None:  # the first reading: slicing starts here
            feed.until, feed.until_total = at, Fraction(feed.total)
            feed.orders = [(at, wc.order)]
            self._dirty.add(key)
            return
        if at <= last[0]:
            if amount == 0:
                return
            at = last[0] + _MICROSECOND  # counted in the same poll as what came before
        if amount == 0 and not self._due(flow, feed, at):
            return
        if len(feed.readings) >= 2 and feed.readings[-2][1] == feed.readings[-1][1] == feed.total:
            feed.readings[-1] = (at, feed.total)  # still standing: move the flat end
        else:
            feed.readings.append((at, feed.total))
        self._dirty.add(key)
        self._slice_due(source, wc, _trigger(event))

    def _due(self, flow: FlowConfig, feed: FeedState, now: datetime) -> bool:
        assert feed.until is not None
        return bool(due_slices(feed.until, now, timedelta(seconds=flow.slice_s), feed.boundaries))

    def _feed_lot(self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent) -> None:
        """The lot in the feed, as the PLC shows it: a change-over from this moment (a lot
        seen before any other is taken as in the feed from the start)."""
        value = event.value
        if value is not None and not isinstance(value, str):
            raise SignalError(f"a lot id must be a string (got {value!r})")
        lot = (value or "").strip()
        feed = self._feed(wc)
        if feed.staging and feed.staging[-1][1] == lot:
            return
        at = event.source_time or event.received_at
        if not feed.staging:
            at = EPOCH
        elif at <= feed.staging[-1][0]:
            at = feed.staging[-1][0] + _MICROSECOND
        feed.staging.append((at, lot))
        self._dirty.add(f"wc/{source.work_centre}")
        log.info("feed_lot_changed", work_centre=source.work_centre, lot=lot, at=at.isoformat())

    def _feed_order(
        self,
        source: SourceConfig,
        wc: WorkCentreState,
        at: datetime,
        order: str | None,
        trigger: Trigger,
    ) -> None:
        """An order change ends a slice: what passed the meter before it is the old order's.
        When the PLC zeroes its counters with the change, the totalizer is taken as standing
        between the last reading and the change (what it counted meanwhile is lost with the
        reset, as for the good counter)."""
        if source.signals.flow is None:
            return
        feed = wc.feed
        if feed is None or feed.until is None:
            if source.counters_reset_on_order_change:  # counting starts from 0 now
                feed = self._feed(wc)
                feed.until, feed.until_total, feed.orders = at, Fraction(feed.total), [(at, order)]
                self._dirty.add(f"wc/{source.work_centre}")
            return
        start = max(at, feed.until)
        feed.orders = [(t, o) for t, o in feed.orders if t < start] + [(start, order)]
        last = feed.last
        assert last is not None
        if source.counters_reset_on_order_change and at > last[0]:
            feed.readings.append((at, feed.total))
        self._feed_boundary(source, wc, at)
        self._slice_due(source, wc, trigger)

    def _feed_boundary(self, source: SourceConfig, wc: WorkCentreState, at: datetime) -> None:
        """An extra slice end (an operation complete, an order change), posted once the
        totalizer has been read at or after it."""
        feed = wc.feed
        if source.signals.flow is None or feed is None or feed.until is None:
            return
        if at > feed.until and at not in feed.boundaries:
            feed.boundaries.append(at)
            feed.boundaries.sort()
            self._dirty.add(f"wc/{source.work_centre}")

    def _slice_due(self, source: SourceConfig, wc: WorkCentreState, trigger: Trigger) -> None:
        flow = source.signals.flow
        feed = wc.feed
        assert flow is not None
        assert feed is not None
        last = feed.last
        assert feed.until is not None
        assert last is not None
        for start, end in due_slices(
            feed.until, last[0], timedelta(seconds=flow.slice_s), feed.boundaries
        ):
            self._begin_step()
            self._post_slice(source, wc, feed, start, end, trigger)
        # what the next slice cannot need any more
        until, lag = feed.until, _lag(flow)
        feed.readings = [(t, v) for t, v in feed.readings if t > until]
        feed.boundaries = [t for t in feed.boundaries if t > until]
        feed.orders = _from_latest(feed.orders, until)
        feed.staging = _from_latest(feed.staging, until - lag)
        self._dirty.add(f"wc/{source.work_centre}")

    def _post_slice(
        self,
        source: SourceConfig,
        wc: WorkCentreState,
        feed: FeedState,
        start: datetime,
        end: datetime,
        trigger: Trigger,
    ) -> None:
        """Post the slice [start, end) for the order in effect at its start; advance the feed."""
        flow = source.signals.flow
        assert flow is not None
        assert feed.until == start
        timeline = feed.timeline()
        end_total = totalizer_at(timeline, end)
        amount = end_total - feed.until_total
        gap = reading_gap(timeline, start, end)
        feed.until, feed.until_total = end, end_total
        if amount == 0:
            return
        order = feed.order_at(start)
        pending = {
            "kind": "meter",
            "work_centre": source.work_centre,
            "source": source.name,
            "operation": source.operation,
            "material": flow.material,
            "amount": str(amount),
            "uom": flow.uom,
            "window": [start.isoformat(), end.isoformat()],
            "trigger": trigger.model_dump(mode="json"),
        }
        state = self._known(source, order, pending, trigger)
        if state is None:
            return
        window = FeedWindow(
            start=start,
            end=end,
            lag_s=flow.lag_s if source.signals.feed_lot is not None else None,
            reading_gap_s=Decimal(gap // _MICROSECOND) / 1_000_000,
        )
        if source.signals.feed_lot is None:  # no lot signal: bound first-expiry-first
            self._post_meter(
                source.work_centre,
                state,
                source.operation,
                flow.material,
                amount,
                flow.uom,
                trigger,
                start,
                window,
            )
            return
        component = self._bom(state).component(source.operation, flow.material, PostingMethod.METER)
        if component is None:
            self._no_line(
                source.work_centre, state.order, source.operation, flow.material, "meter", trigger
            )
            return
        material = self.master.materials[component.material]
        factor = conversion_factor(flow.uom, material.uom, material.density)
        progress = state.consumption.component(component.key)
        carry = FeedCarry(
            start, Fraction(timeline[0].cumulative) * factor, progress.measured, progress.issued
        )
        lots = {lot.lot: lot for lot in self.lots}
        # a lot the line has not staged keeps the metered material: the rules hold it as such
        staging = [
            FeedStaging(lot, lots[lot].material if lot in lots else material.id, at)
            for at, lot in feed.staging
        ]
        try:
            consumption, posting = meter(
                self.master, state.consumption, component, amount, flow.uom
            )
            result = slice_feed(
                [TotalizerReading(r.at, Fraction(r.cumulative) * factor) for r in timeline],
                start,
                end,
                staging,
                _lag(flow),
                carry,
                material,
                lots,
            )
        except EdgeAgentError as exc:
            self._rejected(source.work_centre, state, source.operation, exc, trigger, material.id)
            return
        assert result.posted == posting.quantity, (result.posted, posting.quantity)
        state.consumption = consumption
        state.bindings[component.key] = record_slice(
            state.bindings.get(component.key, BindingState()), result
        )
        self.lots = tuple(result.lots.get(lot.lot, lot) for lot in self.lots)
        self._dirty.update({f"order/{state.order}", "lots"})
        if posting.quantity == 0:
            return
        held = [p for p in result.parts if p.held is not None]
        self._consumed(
            source.work_centre,
            state,
            posting,
            trigger,
            lots=tuple(
                LotMovement(
                    lot=p.lot,
                    material=p.material,
                    quantity=p.drawn,
                    window_from=p.window_from,
                    window_to=p.window_to,
                    cause=p.cause.value,
                )
                for p in result.parts
                if p.lot and p.drawn > 0
            ),
            held=_held_part(held),
            window=window,
        )
        for part in held:
            assert part.held is not None
            self._held(
                source.work_centre,
                state,
                component.material,
                component.uom,
                component.operation,
                part.held,
                trigger,
                part.lot,
            )

    def _post_meter(
        self,
        work_centre: str,
        state: OrderState,
        operation: str,
        material: str,
        amount: Exact,
        uom: str,
        trigger: Trigger,
        now: datetime,
        window: FeedWindow | None = None,
    ) -> None:
        """A metered quantity bound first-expiry-first (a line without a feed lot signal, or
        one counted while its order was unknown)."""
        component = self._bom(state).component(operation, material, PostingMethod.METER)
        if component is None:
            self._no_line(work_centre, state.order, operation, material, "meter", trigger)
            return
        try:
            state.consumption, posting = meter(
                self.master, state.consumption, component, amount, uom
            )
        except EdgeAgentError as exc:
            self._rejected(work_centre, state, operation, exc, trigger, material)
            return
        self._dirty.add(f"order/{state.order}")
        self._post(work_centre, state, posting, trigger, now, window)

    def _weighing(self, source: SourceConfig, wc: WorkCentreState, event: SignalEvent) -> None:
        scale = source.signals.scale
        assert scale is not None
        trigger = _trigger(event)
        state = self._order(wc.order or NO_ORDER)
        # a weight or tare that is bad, or whose last value was invalid, is not the weight on
        # the scale now: the last valid one would be posted for a weighing it never measured
        unusable = [
            part
            for part in ("scale.weight", "scale.tare")
            if part in wc.bad_signals
            or f"signal_invalid/{source.name}/{part}" in self.open_exceptions
        ]
        if state.product is None or wc.weight is None or unusable:
            why = (
                "no weight has been read"
                if wc.weight is None
                else f"{' and '.join(unusable)} has no valid value now"
                if unusable
                else "the order is not known"
            )
            self._exception(
                source.work_centre,
                ExceptionCode.WEIGHING_REJECTED,
                Severity.ERROR,
                f"weighing of {scale.material} not taken: {why}",
                wc.order,
                source.operation,
                material=scale.material,
                trigger=trigger,
            )
            return
        bom = self._bom(state)
        component = bom.component(source.operation, scale.material, PostingMethod.WEIGH)
        if component is None:
            self._no_line(
                source.work_centre, state.order, source.operation, scale.material, "weigh", trigger
            )
            return
        material = self.master.materials[component.material]
        planned = self.orders[state.order].quantity
        remaining = weighing_target(component, planned, with_setup=True) - (
            state.consumption.component(component.key).measured
        )
        target = round_to_increment(
            max(remaining, Fraction(0)), material.increment, material.rounding
        )
        reading = ScaleReading(wc.weight, wc.tare or Decimal(0), scale.uom, True)
        outcome = weigh(self.master, state.consumption, component, reading, target)
        if outcome.posting is None:
            assert outcome.rejection is not None
            deviation = (
                fmt(round_to_increment(outcome.deviation_pct, Decimal("0.01"), _HALF_UP))
                if outcome.deviation_pct is not None
                else "n/a"
            )
            self._exception(
                source.work_centre,
                ExceptionCode.WEIGHING_REJECTED,
                Severity.WARNING,
                f"weighing of {scale.material} rejected ({outcome.rejection.value}): net "
                f"{fmt(reading.net)} {scale.uom}, target {fmt(target)} {material.uom} "
                f"± {fmt(component.tolerance_pct or 0)} %, deviation {deviation} %",
                state.order,
                source.operation,
                material=scale.material,
                details={
                    "reason": outcome.rejection.value,
                    "gross": fmt(reading.gross),
                    "tare": fmt(reading.tare),
                    "net": fmt(reading.net),
                    "uom": scale.uom,
                    "target": fmt(target),
                    "deviation_pct": deviation,
                },
                trigger=trigger,
            )
            return
        state.consumption = outcome.state
        self._dirty.add(f"order/{state.order}")
        self._post(source.work_centre, state, outcome.posting, trigger, event.received_at)

    def _post(
        self,
        work_centre: str,
        state: OrderState,
        posting: ComponentPosting,
        trigger: Trigger,
        now: datetime,
        window: FeedWindow | None = None,
    ) -> None:
        """One component posting: bind it to lots first-expiry-first and publish it (a zero
        posting moves nothing and is carried silently in the cumulative ``issued``)."""
        if posting.quantity == 0:
            return
        c = posting.component
        if c.method is PostingMethod.BACKFLUSH and self._shadow(state, c.material):
            # a pilot: the same figures, no stock movement (the MES books the actual issues)
            self._consumed(work_centre, state, posting, trigger, (), None, shadow=True)
            return
        binding = self._bind(state, posting, now)
        self._consumed(
            work_centre,
            state,
            posting,
            trigger,
            lots=tuple(
                LotMovement(
                    lot=d.lot, material=d.material, quantity=d.quantity, substitution=d.substitution
                )
                for d in binding.draws
            ),
            held=(
                HeldPart(
                    quantity=binding.held.quantity,
                    reason=binding.held.reason.value,
                    detail=binding.held.detail,
                )
                if binding.held
                else None
            ),
            held_cancelled=binding.held_cancelled,
            window=window,
        )
        if binding.held is not None:
            self._held(work_centre, state, c.material, c.uom, c.operation, binding.held, trigger)

    def _consumed(
        self,
        work_centre: str,
        state: OrderState,
        posting: ComponentPosting,
        trigger: Trigger,
        lots: tuple[LotMovement, ...],
        held: HeldPart | None,
        held_cancelled: Decimal = Decimal(0),
        window: FeedWindow | None = None,
        shadow: bool = False,
    ) -> None:
        bom = self._bom(state)
        c = posting.component
        model = ShadowConsumption if shadow else MaterialConsumed
        self._emit(
            model(
                **self._header(work_centre, state.order, c.operation, KIND_OF[model].value),
                order=state.order,
                product=bom.product,
                bom_revision=bom.revision,
                operation=c.operation,
                material=c.material,
                quantity=posting.quantity,
                uom=c.uom,
                method=c.method.value,
                theoretical=to_decimal(posting.theoretical),
                issued=posting.issued - state.reversed.get(c.key, Decimal(0)),
                setup_included=posting.setup_included,
                rule_version=RULE_VERSION,
                bom_lines=tuple(" > ".join(path) for path in c.origin),
                lots=lots,
                held=held,
                held_cancelled=held_cancelled,
                window=window,
                finished_lot=self._finished_lot(state.order),
                trigger=trigger,
            )
        )

    def _shadow(self, state: OrderState, material: str) -> bool:
        """Whether the order backflushes ``material`` in shadow; the order's shadow set is
        fixed from ``[pilot]`` the first time it is asked (its first posting)."""
        if state.shadow is None:
            state.shadow = list(self.config.pilot.shadows(state.order))
            self._dirty.add(f"order/{state.order}")
        return state.shadowed(material)

    def _finished_lot(self, order: str) -> str | None:
        wo = self.orders.get(order)
        return wo.finished_lot if wo is not None else None

    def _held(
        self,
        work_centre: str,
        state: OrderState,
        material: str,
        uom: str,
        operation: str,
        held: Held,
        trigger: Trigger,
        lot: str | None = None,
    ) -> None:
        details = {"quantity": fmt(held.quantity), "uom": uom, "reason": held.reason.value}
        if lot:
            details["lot"] = lot
        self._exception(
            work_centre,
            ExceptionCode.LOT_HELD,
            Severity.ERROR,
            f"{fmt(held.quantity)} {uom} of {material} held ({held.reason.value}): {held.detail}"
            + (f"; it can only come from lot {lot}" if lot else "")
            + ". More may be held until a lot is staged: see the postings' held parts",
            state.order,
            operation,
            material=material,
            details=details,
            trigger=trigger,
            open_key=_held_key(state.order, operation, material, lot),
            supersede=False,
        )

    def _bind(self, state: OrderState, posting: ComponentPosting, now: datetime) -> Binding:
        key = posting.component.key
        visible = self._lots_for(state.order)
        binding = bind(
            self.master,
            visible,
            state.bindings.get(key, BindingState()),
            posting.material,
            posting.quantity,
            now,
            posting.component.alternates,
        )
        state.bindings[key] = binding.state
        if binding.draws:
            self._update_lots(binding.lots)
        return binding

    def _work_centre_of(self, order: str) -> str | None:
        """Where ``order`` runs: the work centre the MES released it for, else the one whose
        PLC shows it."""
        wo = self.orders.get(order)
        if wo is not None and wo.work_centre is not None:
            return wo.work_centre
        for name, wc in self.work_centres.items():
            if wc.order == order:
                return name
        return None

    def _lots_for(self, order: str) -> tuple[Lot, ...]:
        """The lots staged where ``order`` may draw from (a lot staged for another order or
        work centre is not its stock)."""
        wc = self._work_centre_of(order)
        return tuple(lot for lot in self.lots if lot.serves(order, wc))

    def _update_lots(self, changed: Iterable[Lot]) -> None:
        by_id = {lot.lot: lot for lot in changed}
        self.lots = tuple(by_id.get(lot.lot, lot) for lot in self.lots)
        self._dirty.add("lots")

    def _rejected(
        self,
        work_centre: str,
        state: OrderState,
        operation: str,
        exc: EdgeAgentError,
        trigger: Trigger,
        material: str | None = None,
    ) -> None:
        """The rules refused a posting (e.g. a correction below zero): nothing changed."""
        self._exception(
            work_centre,
            ExceptionCode.POSTING_REJECTED,
            Severity.ERROR,
            str(exc),
            state.order,
            operation,
            material=material,
            trigger=trigger,
        )

    def _no_line(
        self,
        work_centre: str,
        order: str,
        operation: str,
        material: str,
        method: str,
        trigger: Trigger,
    ) -> None:
        self._exception(
            work_centre,
            ExceptionCode.NO_BOM_LINE,
            Severity.ERROR,
            f"the BOM of order {order} has no {method} line for {material} at operation "
            f"{operation}: the reading was not posted",
            order,
            operation,
            material=material,
            trigger=trigger,
        )

    def _replay_pending(self, now: datetime) -> None:
        """Post what was counted for orders that were unknown and now are (in arrival order)."""
        for state in list(self.order_states.values()):
            if not state.pending or state.order not in self.orders:
                continue
            if state.status in ("held", "closed"):
                continue
            self._order(state.order)
            pending, state.pending = state.pending, []
            self._dirty.add(f"order/{state.order}")
            log.info("pending_counts_replayed", order=state.order, items=len(pending))
            self._begin_step()
            for key in (f"unknown_order/{state.order}", f"order_held/{state.order}"):
                self._resolve(
                    key, f"order {state.order}: the {len(pending)} kept count(s) are posted now"
                )
            for item in pending:
                self._replay_item(state, item, now)

    def _replay_item(self, state: OrderState, item: Mapping[str, Any], now: datetime) -> None:
        """Post one kept count (a confirmation or a metered slice) to ``state``'s order."""
        self._begin_step()
        trigger = Trigger.model_validate(item["trigger"])
        if item["kind"] == "confirm":
            self._post_confirmation(
                item["work_centre"],
                state,
                item["operation"],
                parse_decimal(item["good"]),
                parse_decimal(item["scrap"]),
                trigger,
                None,
            )
        else:  # a metered slice: its window is past, so it is bound FEFO now
            window = item.get("window")
            self._post_meter(
                item["work_centre"],
                state,
                item["operation"],
                item["material"],
                Fraction(item["amount"]),
                item["uom"],
                trigger,
                now,
                FeedWindow(start=window[0], end=window[1], reading_gap_s=Decimal(0))
                if window
                else None,
            )

    # ------------------------------------------------------------------ MES commands

    def _command(self, event: CommandEvent) -> None:
        """Validate, apply once, reply: a rejected command changes nothing but the reply."""
        if event.kind in COMMAND_MODELS and event.kind not in self.config.commands.accept:
            if event.kind == "heartbeat":  # a beacon, never answered: not a warning each time
                log.debug("heartbeat_ignored", reason="not in [commands] accept")
                return
            accepted = ", ".join(self.config.commands.accept)
            refused = f"topic: this agent does not accept {event.kind!r} (accepted: {accepted})"
            log.warning("command_rejected", kind=event.kind, reason=refused)
            self._reply(event.kind, None, "rejected", refused)
            return
        parsed = parse_command(
            event.kind,
            event.payload,
            self.config.mqtt.max_command_bytes,
            self._signing,
            event.received_at,
        )
        if isinstance(parsed, Heartbeat):
            self._heartbeat(parsed, event.received_at)
            return
        if isinstance(parsed, CommandRejected):
            log.warning("command_rejected", kind=event.kind, reason=parsed.reason)
            self._reply(event.kind, parsed.command_id, "rejected", parsed.reason)
            return
        digest = hashlib.sha256(event.payload).hexdigest()
        prior = self.commands.get(parsed.command_id)
        if prior is not None:
            if prior["digest"] != digest:
                self._reply(
                    event.kind,
                    parsed.command_id,
                    "rejected",
                    f"command_id: {parsed.command_id!r} was used by another command on "
                    f"{prior['at']}; a command id names one command",
                )
                return
            self._reply(
                event.kind,
                parsed.command_id,
                "accepted" if prior["result"] == "accepted" else "rejected",
                prior["reason"],
                duplicate=True,
                produced=tuple(prior["produced"]),
            )
            return
        trigger = Trigger(
            source="mes",
            signal=event.kind,
            address=f"{self.config.topic_base}/in/{event.kind}",
            value=parsed.command_id,
            quality="good",
            source_time=parsed.issued_at,
            received_at=event.received_at,
        )
        self._produced = []
        result: Literal["accepted", "rejected"] = "accepted"
        reason = None
        try:
            self._apply_command(parsed, event.original, trigger)
        except (CommandRefused, InputError) as exc:
            result, reason = "rejected", str(exc)
        produced, self._produced = tuple(self._produced), None
        if result == "rejected":
            assert not produced, "a handler refuses before it changes anything"
        log.info("command_applied", kind=event.kind, command_id=parsed.command_id, result=result)
        self.commands[parsed.command_id] = {
            "digest": digest,
            "kind": event.kind,
            "result": result,
            "reason": reason,
            "produced": list(produced),
            "at": wire_time(event.received_at),
        }
        self._dirty.add(f"command/{parsed.command_id}")
        self._audits.append((f"command:{event.kind}", parsed.command_id, event.payload))
        self._reply(event.kind, parsed.command_id, result, reason, produced=produced)

    def _apply_command(self, command: Command, original: bytes | None, trigger: Trigger) -> None:
        """Apply a valid command (CommandRefused: it makes no sense for the agent's state)."""
        if isinstance(command, MasterDataCommand):
            self._master_data(command)
        elif isinstance(command, WorkOrderCommand):
            self._work_order_command(command, trigger)
        elif isinstance(command, LotStagingCommand):
            self._lot_staging(command, trigger)
        elif isinstance(command, ExceptionResolutionCommand):
            self._exception_resolution(command, trigger)
        elif isinstance(command, ActualIssueCommand):
            self._actual_issue(command)
        else:
            self._reversal(command, original, trigger)

    def _reply(
        self,
        kind: str,
        command_id: str | None,
        result: Literal["accepted", "rejected"],
        reason: str | None,
        duplicate: bool = False,
        produced: tuple[str, ...] = (),
    ) -> None:
        self._begin_step()
        self._emit(
            CommandReply(
                **self._header(None, NO_ORDER, "", "command-reply"),
                command_id=command_id,
                command=kind,
                result=result,
                reason=reason,
                duplicate=duplicate,
                produced=produced,
            )
        )

    # ........................................................ master data

    def _master_data(self, command: MasterDataCommand) -> None:
        merged = merge_master_doc(self.master_doc, command.master_data)
        try:
            master = load_master_data(merged)
        except MasterDataError as exc:
            raise CommandRefused("master_data: " + "; ".join(exc.problems)) from None
        self.master, self.master_doc = master, merged
        self._boms.clear()  # revisions never change: the same pinned BOMs explode the same
        self._documents["masterdata"] = merged
        log.info("master_data_merged", materials=len(master.materials), boms=len(merged["boms"]))

    # ........................................................ work orders

    def _work_order_command(self, command: WorkOrderCommand, trigger: Trigger) -> None:
        order = command.order
        known = self.orders.get(order)
        state = self.order_states.get(order)
        if command.action == "release":
            self._release(command, trigger)
            return
        if known is None:
            raise CommandRefused(f"order: unknown order {order!r} (release it first)")
        status = state.status if state is not None else "released"
        if status == "closed":
            raise CommandRefused(f"order: {order} is closed")
        if command.action == "close":
            self._close(command, trigger)
            return
        state = self._order(order)
        if command.action == "hold":
            state.status = "held"
        else:  # start (or resume)
            state.status = "running"
            self._replay_pending(trigger.received_at)
        self._dirty.add(f"order/{order}")
        log.info("order_status", order=order, status=state.status)

    def _release(self, command: WorkOrderCommand, trigger: Trigger) -> None:
        order = command.order
        assert command.product is not None
        assert command.quantity is not None
        self._check_work_centre(command.work_centre)
        wanted = WorkOrder(
            order,
            command.product,
            command.quantity,
            command.revision,
            command.finished_lot,
            command.work_centre,
        )
        known = self.orders.get(order)
        state = self.order_states.get(order)
        if known is not None:
            if known == wanted:
                return  # released again as it is: nothing to do
            raise CommandRefused(
                f"order: {order} is already released (product {known.product}, quantity "
                f"{fmt(known.quantity)}, revision {known.revision or 'in effect'}): a released "
                "order is not changed"
            )
        try:
            bom = self.master.bom(command.product, command.revision, trigger.received_at)
        except MasterDataError as exc:
            field = "revision" if command.revision else "product"
            raise CommandRefused(f"{field}: " + "; ".join(exc.problems)) from None
        if state is not None and state.product is not None and state.product != bom.product:
            raise CommandRefused(f"order: {order} was counted as product {state.product}")
        self.orders[order] = wanted
        state = self._order(order)
        state.revision = state.revision or bom.revision
        state.work_order = {
            "product": wanted.product,
            "quantity": str(wanted.quantity),
            "revision": state.revision,
            "finished_lot": wanted.finished_lot,
            "work_centre": wanted.work_centre,
            "released_at": wire_time(trigger.received_at),
        }
        self._dirty.add(f"order/{order}")
        log.info("order_released", order=order, product=wanted.product, revision=state.revision)
        self._replay_pending(trigger.received_at)

    def _check_work_centre(self, work_centre: str | None) -> None:
        place = self.config.place
        if work_centre is not None and work_centre not in place.work_centres:
            raise CommandRefused(
                f"work_centre: {work_centre!r} is not a work centre of line {place.line!r} "
                f"({', '.join(place.work_centres)})"
            )

    def _close(self, command: WorkOrderCommand, trigger: Trigger) -> None:
        """Variance and genealogy; remnant lots leave the line with their counted quantity."""
        order = command.order
        lots = {lot.lot: lot for lot in self.lots}
        remnants: list[Remnant] = []
        residual: dict[str, Decimal] = {}
        seen: set[str] = set()
        for i, r in enumerate(command.remnants):
            lot = lots.get(r.lot)
            if lot is None:
                raise CommandRefused(f"remnants[{i}].lot: lot {r.lot!r} is not staged")
            if r.lot in seen:
                raise CommandRefused(f"remnants[{i}].lot: lot {r.lot!r} is listed twice")
            seen.add(r.lot)
            rest = lot.quantity - r.quantity
            residual[lot.material] = residual.get(lot.material, Decimal(0)) + rest
            remnants.append(
                Remnant(
                    lot=lot.lot,
                    material=lot.material,
                    uom=self.master.materials[lot.material].uom,
                    quantity=r.quantity,
                    balance=lot.quantity,
                    residual=rest,
                )
            )
        state = self._order(order)  # the order is known (checked): its BOM is pinned
        assert state.product is not None
        bom = self._bom(state)
        wo = self.orders[order]
        lines = close_variance(
            self.master,
            bom,
            state.consumption,
            wo.quantity,
            self.config.orders.variance_threshold_pct,
            state.bindings,
            residual=residual,
            actual_issues={k: actual_issued(a) for k, a in state.actuals.items()},
        )
        # the remnants are back in stock: they leave the line's staging
        self._update_lots(replace(lots[r.lot], quantity=Decimal(0)) for r in remnants)
        variance_lines = tuple(_variance_line(v) for v in lines)
        state.status = "closed"
        state.variance = [
            {
                "material": x.material,
                "uom": x.uom,
                "theoretical": str(x.theoretical),
                "variance": str(x.variance),
                "flagged": x.flagged,
            }
            for x in variance_lines
        ]
        self._dirty.add(f"order/{order}")
        self._begin_step()
        common = {
            "order": order,
            "product": bom.product,
            "bom_revision": bom.revision,
            "finished_lot": wo.finished_lot,
            "uom": bom.uom,
            "command_id": trigger.value or "",
        }
        variance = OrderVariance(
            **self._header(wo.work_centre, order, "", "variance"),
            **common,
            planned_quantity=wo.quantity,
            threshold_pct=self.config.orders.variance_threshold_pct,
            lines=variance_lines,
            remnants=tuple(remnants),
        )
        self._emit(variance)
        flagged = [v.material for v in lines if v.flagged]
        if flagged:  # open until someone answers for it (exception-resolution "approve")
            self._exception(
                wo.work_centre,
                ExceptionCode.USAGE_VARIANCE,
                Severity.WARNING,
                f"order {order} closed with a usage variance beyond "
                f"{fmt(self.config.orders.variance_threshold_pct)} % for "
                f"{', '.join(flagged)}: open until approved",
                order,
                None,
                details={"variance_message_id": variance.message_id},
                open_key=f"variance/{order}",
            )
        good, scrap = Decimal(0), Decimal(0)
        for op in bom.operations:
            progress = state.consumption.operation(op)
            if progress.good or progress.scrap:
                good, scrap = progress.good, progress.scrap
        self._emit(
            Genealogy(
                **self._header(wo.work_centre, order, "", "genealogy"),
                **common,
                good=good,
                scrap=scrap,
                components=_genealogy(self.master, state.bindings),
            )
        )
        log.info("order_closed", order=order, remnants=len(remnants))

    # ........................................................ lot staging

    def _lot_staging(self, command: LotStagingCommand, trigger: Trigger) -> None:
        lots = {lot.lot: lot for lot in self.lots}
        lot = lots.get(command.lot)
        now = trigger.received_at
        if command.order is not None and command.order not in self.orders:
            raise CommandRefused(f"order: unknown order {command.order!r}")
        self._check_work_centre(command.work_centre)
        if command.action == "staged":
            self._stage(command, lot, now)
        else:
            if lot is None:
                raise CommandRefused(f"lot: lot {command.lot!r} is not staged")
            if command.action == "returned":
                assert command.quantity is not None
                if command.quantity > lot.quantity:
                    raise CommandRefused(
                        f"quantity: {fmt(command.quantity)} is more than lot {lot.lot} holds "
                        f"({fmt(lot.quantity)}): a lot never goes below zero"
                    )
                changed = replace(lot, quantity=lot.quantity - command.quantity)
            elif command.action == "quarantined":
                changed = replace(lot, status=LotStatus.QUARANTINED)
            elif command.action == "released":
                changed = replace(lot, status=LotStatus.RELEASED)
            else:  # rebinned
                changed = replace(lot, order=command.order, work_centre=command.work_centre)
            self._update_lots([changed])
        log.info("lot_staging", lot=command.lot, action=command.action)
        self._retry_held(now, trigger)

    def _stage(self, command: LotStagingCommand, lot: Lot | None, now: datetime) -> None:
        assert command.material is not None
        assert command.quantity is not None
        material = self.master.materials.get(command.material)
        if material is None:
            raise CommandRefused(f"material: unknown material {command.material!r}")
        if command.uom is not None and command.uom != material.uom:
            raise CommandRefused(
                f"uom: lot quantities are in the material's issue unit {material.uom!r} "
                f"(got {command.uom!r})"
            )
        if lot is not None and lot.quantity > 0:
            raise CommandRefused(
                f"lot: {lot.lot} is already staged ({fmt(lot.quantity)} "
                f"{self.master.materials[lot.material].uom} left): return it first"
            )
        staged = Lot(
            command.lot,
            material.id,
            command.quantity,
            command.staged_at or now,
            command.expiry,
            command.status,
            command.order,
            command.work_centre,
        )
        self.lots = (*(x for x in self.lots if x.lot != command.lot), staged)
        self._dirty.add("lots")

    def _retry_held(self, now: datetime, trigger: Trigger) -> None:
        """Bind what is held to the lots now staged ("no stage, no flush", then flush)."""
        for state in self.order_states.values():
            if state.product is None or state.status == "closed":
                continue
            bom = self._bom(state)
            for key, before in list(state.bindings.items()):
                if before.held <= 0:
                    continue
                component = bom.component(*key)
                if component is None:
                    continue
                binding = retry_held(
                    self.master,
                    self._lots_for(state.order),
                    before,
                    component.material,
                    now,
                    component.alternates,
                )
                if not binding.draws:
                    continue
                state.bindings[key] = binding.state
                self._update_lots(binding.lots)
                self._dirty.add(f"order/{state.order}")
                released = before.held - binding.state.held
                work_centre = self._work_centre_of(state.order)
                progress = state.consumption.component(key)
                self._begin_step()
                self._emit(
                    MaterialConsumed(
                        **self._header(
                            work_centre, state.order, component.operation, "material-consumed"
                        ),
                        order=state.order,
                        product=bom.product,
                        bom_revision=bom.revision,
                        operation=component.operation,
                        material=component.material,
                        quantity=Decimal(0),
                        uom=component.uom,
                        method=component.method.value,
                        theoretical=to_decimal(progress.measured)
                        if component.method is not PostingMethod.BACKFLUSH
                        else self._theoretical(state, component),
                        issued=progress.issued - state.reversed.get(key, Decimal(0)),
                        rule_version=RULE_VERSION,
                        bom_lines=tuple(" > ".join(path) for path in component.origin),
                        lots=tuple(
                            LotMovement(
                                lot=d.lot,
                                material=d.material,
                                quantity=d.quantity,
                                substitution=d.substitution,
                            )
                            for d in binding.draws
                        ),
                        held=(
                            HeldPart(
                                quantity=binding.state.held,
                                reason="insufficient",
                                detail="still held after the lots staged were drawn",
                            )
                            if binding.state.held > 0
                            else None
                        ),
                        held_released=released,
                        finished_lot=self._finished_lot(state.order),
                        trigger=trigger,
                    )
                )
                self._settle_holds(state, component.operation, component.material, key)

    def _theoretical(self, state: OrderState, component: Any) -> Decimal:
        return to_decimal(theoretical(component, state.consumption.operation(component.operation)))

    def _settle_holds(
        self, state: OrderState, operation: str, material: str, key: ComponentKey
    ) -> None:
        """Resolve the lot_held exceptions of a component whose held quantity is bound."""
        binding = state.bindings.get(key, BindingState())
        prefix = f"lot_held/{state.order}/{operation}/{material}/"
        for open_key in [k for k in self.open_exceptions if k.startswith(prefix)]:
            lot = open_key[len(prefix) :]
            cleared = (
                binding.held_lots.get(lot, Decimal(0)) <= 0 if lot else (binding.held_any_lot <= 0)
            )
            if cleared:
                self._resolve(
                    open_key,
                    f"the held {material} of order {state.order} is bound to "
                    + (f"lot {lot}" if lot else "staged lots"),
                )

    # ........................................................ reversal

    def _reversal(
        self, command: ReversalCommand, original_payload: bytes | None, trigger: Trigger
    ) -> None:
        if original_payload is None:
            raise CommandRefused(
                f"message_id: {command.message_id!r} is not a material-consumed posting of "
                f"agent {self.config.agent.id}"
            )
        original = parse_message(original_payload)
        assert isinstance(original, MaterialConsumed)
        state = self.order_states.get(original.order)
        if state is None or state.product is None:
            raise CommandRefused(f"message_id: order {original.order} is not known any more")
        if original.reverses is not None:
            raise CommandRefused(
                f"message_id: {command.message_id} is itself a reversal (of "
                f"{original.reverses}): post the correction in the MES"
            )
        if command.message_id in state.reversals:
            raise CommandRefused(
                f"message_id: {command.message_id} is already reversed by "
                f"{state.reversals[command.message_id]}"
            )
        if original.quantity <= 0:
            raise CommandRefused(
                f"message_id: {command.message_id} posted {fmt(original.quantity)} "
                f"{original.uom}: only a consumption (above zero) can be reversed"
            )
        if state.status == "closed":
            raise CommandRefused(f"order: {original.order} is closed")
        key = (original.operation, original.material, PostingMethod(original.method))
        draws = [
            LotDraw(m.lot, m.material, m.quantity, m.substitution)
            for m in original.lots
            if m.quantity > 0
        ]
        held = original.held.quantity if original.held else Decimal(0)
        try:
            binding = reverse_posting(
                self.lots, state.bindings.get(key, BindingState()), draws, held
            )
        except ConsumptionError as exc:
            raise CommandRefused(f"message_id: {exc}") from None
        state.bindings[key] = binding.state
        self._update_lots(binding.lots)
        state.reversed[key] = state.reversed.get(key, Decimal(0)) + original.quantity
        self._dirty.add(f"order/{state.order}")
        self._begin_step()
        header = self._header(
            original.work_centre, original.order, original.operation, "material-consumed"
        )
        state.reversals[command.message_id] = header["message_id"]
        self._emit(
            original.model_copy(
                update={
                    **header,
                    "quantity": -original.quantity,
                    "issued": self._issued_now(state, key),
                    "lots": tuple(
                        m.model_copy(update={"quantity": -m.quantity})
                        for m in original.lots
                        if m.quantity > 0
                    ),
                    "held": None,
                    "held_cancelled": held,
                    "held_released": Decimal(0),
                    "reverses": command.message_id,
                    "reversal": Reversal(
                        command_id=command.command_id,
                        reason_code=command.reason_code,
                        requested_by=command.requested_by,
                        comment=command.comment,
                    ),
                    "trigger": trigger,
                    "clock": None,
                }
            )
        )
        self._settle_holds(state, original.operation, original.material, key)
        log.info("posting_reversed", original=command.message_id, order=original.order)

    def _issued_now(self, state: OrderState, key: ComponentKey) -> Decimal:
        return state.consumption.component(key).issued - state.reversed.get(key, Decimal(0))

    # ........................................................ exception resolution

    def _exception_resolution(self, command: ExceptionResolutionCommand, trigger: Trigger) -> None:
        key = next(
            (k for k, e in self.open_exceptions.items() if e["message_id"] == command.exception_id),
            None,
        )
        if key is None:
            raise CommandRefused(
                f"exception_id: {command.exception_id!r} is not an open exception of agent "
                f"{self.config.agent.id}"
            )
        record = self.open_exceptions[key]
        code, order = record["code"], record["order"]
        by = f"by {command.requested_by} ({command.reason_code})" + (
            f": {command.comment}" if command.comment else ""
        )
        how = f"{command.action} {by}"
        if code == ExceptionCode.USAGE_VARIANCE:
            if command.action != "approve":
                raise CommandRefused(
                    f"action: a usage variance is approved (action approve), not {command.action}ed"
                )
            self._resolve(key, f"the usage variance of order {order} is approved {by}")
            return
        if command.action == "approve":
            raise CommandRefused(f"action: approve is for a usage_variance exception, not {code}")
        if code == ExceptionCode.COUNTER_JUMP:
            item = self.parked.pop(command.exception_id)
            self._dirty.add("exceptions")
            self._resolve(key, f"the counts of the jump are {how}")
            if command.action == "post":
                state = self._order(item["order"] or NO_ORDER)
                if state.product is None or state.status in ("held", "closed"):
                    state.pending.append({k: v for k, v in item.items() if k != "order"})
                    self._dirty.add(f"order/{state.order}")
                    self._replay_pending(trigger.received_at)
                else:
                    self._replay_item(state, item, trigger.received_at)
            return
        if code in (
            ExceptionCode.UNKNOWN_ORDER,
            ExceptionCode.ORDER_HELD,
            ExceptionCode.ORDER_CLOSED,
        ):
            if command.action == "post":
                raise CommandRefused(
                    f"action: the counts kept for order {order} are posted when the order is "
                    + ("released" if code == ExceptionCode.UNKNOWN_ORDER else "started")
                    + (
                        "; a closed order takes no more postings: discard them (and post in the "
                        "MES by hand if they belong there)"
                        if code == ExceptionCode.ORDER_CLOSED
                        else ""
                    )
                )
            state = self._order(order or NO_ORDER)
            dropped, state.pending = len(state.pending), []
            self._dirty.add(f"order/{state.order}")
            self._resolve(key, f"the {dropped} count(s) kept for order {order} are {how}")
            return
        raise CommandRefused(
            f"exception_id: a {code} exception clears by itself (it is resolved when its cause "
            "is gone); only counter_jump, unknown_order, order_held, order_closed and "
            "usage_variance are resolved by the MES"
        )

    # ........................................................ pilot

    def _actual_issue(self, command: ActualIssueCommand) -> None:
        """A pilot's actual issue of a shadowed material: kept with the order, beside the
        shadow backflush, for ``edge-agent pilot report``. Only for a material the order
        backflushes in shadow: otherwise the backflush is the stock movement, and recording an
        issue as well would count it twice. It may come before the order's first count (a
        setup issue). Everything is checked before anything changes."""
        order = command.order
        wo = self.orders.get(order)
        if wo is None:
            raise CommandRefused(f"order: unknown order {order!r} (release it first)")
        known = self.order_states.get(order)
        if known is not None and known.status == "closed":
            raise CommandRefused(f"order: {order} is closed")
        shadow = (
            known.shadow
            if known is not None and known.shadow is not None
            else list(self.config.pilot.shadows(order))
        )
        if "*" not in shadow and command.material not in shadow:
            raise CommandRefused(
                f"material: order {order} does not backflush {command.material} in shadow "
                f"([pilot] shadow: {', '.join(shadow) or 'none'}): its backflush is the stock "
                "movement, and an actual issue as well would count it twice"
            )
        if known is not None and known.product is not None:
            bom = self._bom(known)
        else:
            pinned = self.master.bom(wo.product, wo.revision, self.clock()).revision
            bom = self._exploded(wo.product, pinned)
        key = _shadow_component(bom, order, command)
        material = self.master.materials[command.material]
        try:
            quantity = convert(command.quantity, command.uom, material.uom, material.density)
        except UnitError as exc:
            raise CommandRefused(f"uom: {exc}") from None
        record = (known.actuals.get(key) if known is not None else None) or {
            "setup": "0",
            "running": "0",
            "untagged": "0",
            "issues": 0,
            "lots": {},
        }
        exact = to_decimal(quantity)
        issued = actual_issued(record)
        if issued + exact < 0:
            raise CommandRefused(
                f"quantity: returns of {command.material} to order {order} would exceed its "
                f"issues ({fmt(issued)} {material.uom} issued)"
            )
        phase = command.phase or "untagged"
        # every check passed: the order's state, and its shadow set, are fixed from here
        state = self._order(order)
        self._shadow(state, command.material)
        lots = dict(record["lots"])
        if command.lot is not None:
            lots[command.lot] = fmt(parse_decimal(lots.get(command.lot, "0")) + exact)
        state.actuals[key] = {
            **record,
            phase: fmt(parse_decimal(record[phase]) + exact),
            "issues": int(record["issues"]) + 1,
            "lots": lots,
        }
        self._dirty.add(f"order/{order}")
        log.info("actual_issue", order=order, material=command.material, quantity=fmt(exact))

    # ........................................................ time

    def _heartbeat(self, heartbeat: Heartbeat, received_at: datetime) -> None:
        offset = received_at - heartbeat.mes_time
        self.clock_state.mes_offset_s = Decimal(offset // _MICROSECOND) / 1_000_000
        self._dirty.add("clock")
        self._check_clock(received_at, "the MES heartbeat")

    def _plc_clock(self, event: SignalEvent) -> None:
        """A PLC's own timestamp ahead of the agent's clock by more than the limit (a past one
        proves nothing: a value read after an outage carries the time it changed)."""
        if not event.device_time or event.source_time is None:
            return
        ahead = event.source_time - event.received_at
        seconds = Decimal(ahead // _MICROSECOND) / 1_000_000
        limit = self.config.clock.max_skew_s
        state = self.clock_state
        if limit > 0 and seconds > limit:
            if state.plc_ahead_s is None or state.plc_source != event.source:
                state.plc_ahead_s, state.plc_source = seconds, event.source
                self._dirty.add("clock")
                self._check_clock(event.received_at, f"PLC {event.source}")
        elif state.plc_source == event.source and state.plc_ahead_s is not None:
            state.plc_ahead_s, state.plc_source = None, None
            self._dirty.add("clock")
            self._check_clock(event.received_at, f"PLC {event.source}")

    def _check_clock(self, now: datetime, by: str) -> None:
        limit = self.config.clock.max_skew_s
        state = self.clock_state
        mes = state.mes_offset_s
        problems = []
        if limit > 0 and mes is not None and abs(mes) > limit:
            problems.append(f"the agent's clock is {fmt(mes)} s off the MES heartbeat")
        if limit > 0 and state.plc_ahead_s is not None:
            problems.append(
                f"PLC {state.plc_source}'s timestamps are {fmt(state.plc_ahead_s)} s ahead of "
                "the agent's clock"
            )
        if problems and state.trusted:
            state.trusted = False
            self._dirty.add("clock")
            self._begin_step()
            self._exception(
                None,
                ExceptionCode.CLOCK_UNSYNCHRONIZED,
                Severity.ERROR,
                "; ".join(problems)
                + f" (limit {fmt(limit)} s): postings are held, counting goes on, until time "
                "is trusted again",
                None,
                None,
                details={"mes_offset_s": fmt(mes) if mes is not None else "", "by": by},
                open_key="clock",
            )
        elif not problems and not state.trusted:
            state.trusted = True
            self._dirty.add("clock")
            held, state.held = state.held, []
            self._begin_step()
            self._resolve("clock", f"time is trusted again: {len(held)} held posting(s) sent")
            for item in held:
                message = parse_message(item["payload"])
                offset = parse_decimal(item["offset_s"])
                corrected = message.created_at - timedelta(microseconds=int(offset * 1_000_000))
                self._outgoing.append(
                    Outgoing(
                        message.model_copy(
                            update={
                                "created_at": corrected,
                                "clock": ClockCorrection(
                                    agent_time=message.created_at,
                                    offset_s=offset,
                                    released_at=now,
                                ),
                            }
                        ),
                        item["topic"],
                    )
                )
            log.info("clock_trusted", released=len(held))

    # ------------------------------------------------------------------ messages

    def _begin_step(self) -> None:
        """One event (or one replayed item) is one engine step: its messages share a sequence."""
        self._step_sequence: int | None = None
        self._step_index = 0

    def _header(
        self, work_centre: str | None, order: str, operation: str, kind: str
    ) -> dict[str, Any]:
        """Common fields; the id derives from the step's sequence, committed with the message."""
        if self._step_sequence is None:
            self.sequence += 1
            self._step_sequence = self.sequence
            self._dirty.add("engine")
        index, self._step_index = self._step_index, self._step_index + 1
        p = self.config.place
        return {
            "message_id": message_id(
                self.config.agent.id,
                order,
                operation,
                self._step_sequence,
                kind,
                index,
                self.store_id,
            ),
            "agent": self.config.agent.id,
            "site": p.site,
            "area": p.area,
            "line": p.line,
            "work_centre": work_centre,
            "sequence": self._step_sequence,
            "created_at": self.clock(),
        }

    def _emit(self, message: AnyMessage) -> None:
        topic = f"{self.config.topic_base}/out/{kind_of(message)}"
        if self._produced is not None:
            self._produced.append(message.message_id)
        payload: bytes | None = None
        if isinstance(message, MaterialConsumed):
            payload = encode(message)
            self._journal.append(
                (message.message_id, message.order, payload, wire_time(message.created_at))
            )
            self._recent[message.message_id] = payload
        if not self.clock_state.trusted and isinstance(message, POSTINGS):
            offset = self.clock_state.mes_offset_s or Decimal(0)
            wire = payload if payload is not None else encode(message)
            self.clock_state.held.append(
                {"topic": topic, "payload": wire.decode(), "offset_s": str(offset)}
            )
            self._dirty.add("clock")
            return
        self._outgoing.append(Outgoing(message, topic, payload))

    def _exception(
        self,
        work_centre: str | None,
        code: ExceptionCode,
        severity: Severity,
        text: str,
        order: str | None,
        operation: str | None,
        material: str | None = None,
        details: dict[str, str] | None = None,
        trigger: Trigger | None = None,
        open_key: str | None = None,
        supersede: bool = True,
        resolves: str | None = None,
    ) -> str | None:
        """Publish an exception (its message id; None when not published again). With
        ``open_key`` it stays open (listed in the status) until
        :meth:`_resolve` publishes its "resolved" message; raised again while open it either
        supersedes the open one (its message ``resolves`` the earlier) or, with
        ``supersede=False``, is not published again."""
        prior = self.open_exceptions.get(open_key) if open_key else None
        if prior is not None:
            if not supersede:
                return None
            resolves = prior["message_id"]
        self.stats.exceptions[code.value] += 1
        log.warning("exception_raised", code=code.value, text=text, work_centre=work_centre)
        message = ExceptionMessage(
            **self._header(work_centre, order or NO_ORDER, operation or "", "exception"),
            code=code,
            severity=severity,
            text=text,
            order=order,
            operation=operation,
            material=material,
            details=details or {},
            trigger=trigger,
            resolves=resolves,
        )
        self._emit(message)
        if open_key is not None:
            self.open_exceptions[open_key] = {
                "message_id": message.message_id,
                "code": code.value,
                "order": order,
                "material": material,
                "work_centre": work_centre,
                "operation": operation,
                "since": wire_time(message.created_at),
                "text": text,
            }
            self._dirty.add("exceptions")
        return message.message_id

    def _resolve(self, key: str, text: str, work_centre: str | None = None) -> None:
        """The open exception ``key`` has cleared: publish its "resolved" message."""
        prior = self.open_exceptions.pop(key, None)
        if prior is None:
            return
        self._dirty.add("exceptions")
        self.stats.resolved[prior["code"]] += 1
        log.info("exception_resolved", code=prior["code"], key=key)
        self._emit(
            ExceptionMessage(
                **self._header(
                    prior.get("work_centre", work_centre),
                    prior["order"] or NO_ORDER,
                    prior.get("operation") or "",
                    "exception",
                ),
                code=ExceptionCode(prior["code"]),
                severity=Severity.INFO,
                text=f"resolved: {text}",
                order=prior["order"],
                operation=prior.get("operation"),
                material=prior["material"],
                resolves=prior["message_id"],
            )
        )


# ----------------------------------------------------------------------------- helpers

_HALF_UP = Rounding.HALF_UP
_MICROSECOND = timedelta(microseconds=1)


def actual_issued(record: Mapping[str, Any]) -> Decimal:
    """The actual issues of one shadowed component (:attr:`OrderState.actuals`), net of
    returns: the sum of its phases."""
    return sum((parse_decimal(record[p]) for p in ("setup", "running", "untagged")), Decimal(0))


def _shadow_component(bom: ExplodedBom, order: str, command: ActualIssueCommand) -> ComponentKey:
    """The backflushed component an actual issue is for: its operation as given, or the one
    operation of the order's BOM that backflushes the material."""
    operations = [
        c.operation
        for c in bom.components
        if c.material == command.material and c.method is PostingMethod.BACKFLUSH
    ]
    if not operations:
        raise CommandRefused(
            f"material: {command.material} is not backflushed by {bom.ref} (order {order})"
        )
    if command.operation is None:
        if len(set(operations)) > 1:
            raise CommandRefused(
                f"operation: {command.material} is backflushed at {', '.join(operations)}: "
                "say which"
            )
        return (operations[0], command.material, PostingMethod.BACKFLUSH)
    if command.operation not in operations:
        raise CommandRefused(
            f"operation: {command.material} is backflushed at {', '.join(operations)}, "
            f"not {command.operation}"
        )
    return (command.operation, command.material, PostingMethod.BACKFLUSH)


def _variance_line(v: ComponentVariance) -> VarianceLine:
    return VarianceLine(
        operation=v.operation,
        material=v.material,
        uom=v.uom,
        method=v.method.value,
        planned=to_decimal(v.planned),
        theoretical=to_decimal(v.theoretical),
        issued=v.issued,
        substituted=v.substituted,
        held=v.held,
        residual=-v.returned if v.returned is not None else None,
        actual=v.actual,
        variance=to_decimal(v.variance),
        variance_pct=to_decimal(v.variance_pct) if v.variance_pct is not None else None,
        flagged=v.flagged,
        substitutions=tuple(
            SubstitutionLine(material=x.material, covers=x.covers, quantity=x.quantity, uom=x.uom)
            for x in v.substitutions
        ),
    )


def _genealogy(
    master: MasterData, bindings: Mapping[ComponentKey, BindingState]
) -> tuple[GenealogyLink, ...]:
    """Every component lot the order drew from, net of returns and reversals."""
    drawn: dict[tuple[str, str, bool], Decimal] = {}
    for binding in bindings.values():
        for key, given in binding.given_by_lot().items():
            drawn[key] = drawn.get(key, Decimal(0)) + given
    return tuple(
        GenealogyLink(
            material=material,
            lot=lot,
            quantity=quantity,
            uom=master.materials[material].uom,
            substitution=substitution,
        )
        for (material, lot, substitution), quantity in sorted(drawn.items())
        if quantity > 0
    )


def _held_key(order: str, operation: str, material: str, lot: str | None) -> str:
    return f"lot_held/{order}/{operation}/{material}/{lot or ''}"


def _work_order(state: OrderState) -> WorkOrder:
    wo = state.work_order
    assert wo is not None
    return WorkOrder(
        state.order,
        wo["product"],
        parse_decimal(wo["quantity"]),
        wo.get("revision"),
        wo.get("finished_lot"),
        wo.get("work_centre"),
    )


def _lag(flow: FlowConfig) -> timedelta:
    """The configured hold-up lag, to the microsecond (a timedelta's resolution)."""
    return timedelta(microseconds=int(flow.lag_s * 1_000_000))


T = TypeVar("T")


def _from_latest(entries: list[tuple[datetime, T]], moment: datetime) -> list[tuple[datetime, T]]:
    """The entries after ``moment`` and the latest at or before it (the one in effect then)."""
    before = [e for e in entries if e[0] <= moment]
    return before[-1:] + [e for e in entries if e[0] > moment]


def _held_part(parts: Sequence[SlicePart]) -> HeldPart | None:
    """A slice's held parts as one: their sum, the reason of the largest, every detail."""
    held = [p for p in parts if p.held is not None]
    if not held:
        return None
    largest = max(held, key=lambda p: p.held.quantity if p.held else Decimal(0))
    assert largest.held is not None
    return HeldPart(
        quantity=sum((p.held.quantity for p in held if p.held), Decimal(0)),
        reason=largest.held.reason.value,
        detail="; ".join(p.held.detail for p in held if p.held),
        lot=largest.lot,
    )


def _counter(source: SourceConfig, name: str) -> CounterConfig | None:
    value = getattr(source.signals, name)
    return value if isinstance(value, CounterSignal | ModbusCounter) else None


def _shown(value: SignalValue) -> str:
    """A signal value as an exception names it: its type when that is the problem."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _what(value: SignalValue) -> str:
    kind = {bool: "a boolean", str: "text", type(None): "no value"}.get(type(value))
    if kind is not None:
        return f"{kind} ({_shown(value)})"
    if isinstance(value, Decimal) and not value.is_finite():
        return f"{value}, not a number"
    return _shown(value)


def _int(event: SignalEvent) -> int:
    """Whole counts: an integer, never a boolean, text, a fraction or NaN."""
    value = event.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignalError(f"expected whole counts, an integer (got {_what(value)})")
    return value


def _bool(event: SignalEvent) -> bool:
    if not isinstance(event.value, bool):
        raise SignalError(f"expected a boolean (got {_what(event.value)})")
    return event.value


def _decimal(event: SignalEvent) -> Decimal:
    """A finite number: NaN or infinity from a scale (a float register, an OPC UA Double) is
    no weight."""
    value = event.value
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise SignalError(f"expected a number (got {_what(value)})")
    if not Decimal(value).is_finite():
        raise SignalError(f"expected a finite number (got {_what(value)})")
    return Decimal(value)


def _trigger(event: SignalEvent) -> Trigger:
    return Trigger(
        source=event.source,
        signal=event.signal,
        address=event.address,
        value=None if event.value is None else str(event.value),
        quality=event.quality.value,
        source_time=event.source_time,
        received_at=event.received_at,
    )
