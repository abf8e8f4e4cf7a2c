"""The MES side of the wire contract: a subscriber with a persistent session and a ledger.

It proves "nothing lost, nothing doubled" (shared/DESIGN.md §3.1) for the end-to-end test and
`edge-agent demo`:

- **Persistent session.** A fixed client id, MQTT 5 with a session expiry interval (or MQTT 3.1.1
  with clean_session=False, for the embedded broker), subscribed at QoS 1 to
  ``{topic_base}/out/#``: the broker queues for the MES while it is away.
- **Acknowledged only once recorded.** Each message is validated with
  :func:`edge_agent.messages.parse_message` and committed to the ledger *before* its PUBACK is sent
  (paho's manual acknowledgement), so a simulator killed at any instant loses nothing: the broker
  delivers again what was not acknowledged, and the ledger counts that as a duplicate.
- **Deduplicated by message id.** The first delivery of an id is the message; every later one is
  recorded in ``duplicates`` (with whether its content was identical, since the same id must always
  carry the same message). Invalid messages go to ``rejected`` with the error naming every bad
  field; they never stop the simulator.
- **End-to-end acknowledgement** (``mes_ack``, for the agent's ``delivery = "mes-ack"``): once a
  message is in the ledger (first delivery or repeat), its id is acknowledged on
  ``{topic_base}/in/mes-ack`` as ``{"message_ids": [...]}``, so the agent keeps it in its outbox
  until the MES has it, even across a broker that forgets sessions (the embedded one).
- **Exact totals.** Quantities are kept as the decimal strings of the wire and summed as
  :class:`~decimal.Decimal` in Python, never as SQL floats.
- **The rest of the contract** (issue 5): compensating postings are kept with the id they
  ``reverses`` (:meth:`Ledger.net_of` shows a reversal netting to zero), command replies,
  order variances and genealogy in tables of their own, and exceptions with what they
  ``resolves`` (:meth:`Ledger.open_exceptions`).
- **Commands.** :meth:`MesSimulator.send` and its helpers (``release_order``, ``stage_lot``,
  ``reverse``, ``heartbeat``, ...) publish the MES's commands at QoS 1 to
  ``{topic_base}/in/{kind}``; the agent's ``command-reply`` arrives on ``out/`` like any other
  message, and :meth:`MesSimulator.wait_reply` waits for it in the ledger.

The ledger is an SQLite file that survives a restart of the simulator (open the same file again).
Run it on its own with ``python -m simulators.mes --help``; ``python -m simulators.mes send``
publishes one command file.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import queue
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from edge_agent.commands import (
    COMMAND_MODELS,
    ActualIssueCommand,
    CommandRejected,
    ExceptionResolutionCommand,
    Heartbeat,
    LotStagingCommand,
    MasterDataCommand,
    RemnantCount,
    ReversalCommand,
    WorkOrderCommand,
    parse_command,
    sign,
)
from edge_agent.config import Config, parse_host_port
from edge_agent.domain.lots import LotStatus
from edge_agent.domain.quantities import fmt
from edge_agent.errors import InputError
from edge_agent.logs import configure_logging
from edge_agent.messages import (
    AnyMessage,
    CommandReply,
    ExceptionMessage,
    Genealogy,
    MaterialConsumed,
    OrderVariance,
    ProductionConfirmation,
    Severity,
    ShadowConsumption,
    kind_of,
    parse_message,
    wire_time,
)
from edge_agent.uplink.mqtt import close_sockets

log = structlog.get_logger(__name__)

Protocol = Literal["5", "3.1.1"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

#: 2: reversals, command replies, variances, genealogy, resolved exceptions (issue 5);
#: 3: shadow consumption (a pilot, issue 9)
LEDGER_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    message_id  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    topic       TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS duplicates (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages (message_id),
    topic       TEXT NOT NULL,
    received_at TEXT NOT NULL,
    identical   INTEGER NOT NULL  -- 0: the same id carried a different message (a defect)
);
CREATE TABLE IF NOT EXISTS rejected (
    id          INTEGER PRIMARY KEY,
    topic       TEXT NOT NULL,
    received_at TEXT NOT NULL,
    error       TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consumption (
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    order_id    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    material    TEXT NOT NULL,
    uom         TEXT NOT NULL,
    quantity    TEXT NOT NULL,  -- the wire's decimal string
    reverses    TEXT            -- a compensating posting: the message id it reverses
);
CREATE INDEX IF NOT EXISTS consumption_reverses ON consumption (reverses);
CREATE TABLE IF NOT EXISTS shadow_consumption (  -- a pilot's backflush: no stock movement
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    order_id    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    material    TEXT NOT NULL,
    uom         TEXT NOT NULL,
    quantity    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lot_movements (
    message_id  TEXT NOT NULL REFERENCES messages (message_id),
    idx         INTEGER NOT NULL,
    order_id    TEXT NOT NULL,
    lot         TEXT NOT NULL,
    material    TEXT NOT NULL,
    quantity    TEXT NOT NULL,
    reverses    TEXT,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX IF NOT EXISTS lot_movements_reverses ON lot_movements (reverses);
CREATE TABLE IF NOT EXISTS confirmations (
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    order_id    TEXT NOT NULL,
    operation   TEXT NOT NULL,
    good        TEXT NOT NULL,
    scrap       TEXT NOT NULL,
    uom         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exceptions (
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    code        TEXT NOT NULL,
    severity    TEXT NOT NULL,
    order_id    TEXT,
    material    TEXT,
    text        TEXT NOT NULL,
    resolves    TEXT  -- a "resolved" message: the exception that has cleared
);
CREATE INDEX IF NOT EXISTS exceptions_resolves ON exceptions (resolves);
CREATE TABLE IF NOT EXISTS replies (
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    command_id  TEXT,  -- NULL: the command was too broken to carry one
    command     TEXT NOT NULL,
    result      TEXT NOT NULL,  -- accepted | rejected
    reason      TEXT,
    duplicate   INTEGER NOT NULL,
    produced    TEXT NOT NULL  -- JSON array of message ids
);
CREATE INDEX IF NOT EXISTS replies_command ON replies (command_id);
CREATE TABLE IF NOT EXISTS variances (
    message_id  TEXT PRIMARY KEY REFERENCES messages (message_id),
    order_id    TEXT NOT NULL,
    command_id  TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS genealogy (
    message_id   TEXT PRIMARY KEY REFERENCES messages (message_id),
    order_id     TEXT NOT NULL,
    finished_lot TEXT,
    command_id   TEXT NOT NULL,
    payload      BLOB NOT NULL
);
CREATE VIEW IF NOT EXISTS totals AS SELECT
    (SELECT count(*) FROM messages) AS received,
    (SELECT count(*) FROM duplicates) AS duplicates,
    (SELECT count(*) FROM rejected) AS rejected,
    (SELECT count(*) FROM duplicates WHERE NOT identical) AS conflicts;
CREATE VIEW IF NOT EXISTS received_by_kind AS
    SELECT kind, count(*) AS messages FROM messages GROUP BY kind;
CREATE VIEW IF NOT EXISTS exception_counts AS
    SELECT code, count(*) AS messages FROM exceptions GROUP BY code;
"""

#: command model → its kind (the last level of ``{topic_base}/in/{kind}``)
COMMAND_KINDS: dict[type[BaseModel], str] = {model: kind for kind, model in COMMAND_MODELS.items()}

K = TypeVar("K")
M = TypeVar("M", bound=BaseModel)


class Counts(NamedTuple):
    """What reached the MES: unique messages, repeat deliveries, invalid ones.

    ``conflicts`` counts repeat deliveries whose content differed from the first delivery of
    their id: always a defect on the sending side.
    """

    received: int
    duplicates: int
    rejected: int
    conflicts: int


class Recorded(NamedTuple):
    """What the ledger made of one delivery."""

    outcome: Literal["new", "duplicate", "rejected"]
    message_id: str | None  # None when rejected
    error: str | None = None  # why it was rejected


class Rejection(NamedTuple):
    topic: str
    received_at: str
    error: str
    payload: bytes


def _now() -> str:
    return wire_time(datetime.now(UTC))


class Ledger:
    """The MES's record of every delivery, in one SQLite file.

    ``record`` is called on paho's network thread; it has its own connection, guarded by a lock.
    Every report opens a short-lived connection of its own (WAL: readers never block the writer),
    so reports work from any thread, while the simulator runs, and from another process.
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if create:
            with self._lock:
                self._writer()

    @classmethod
    def existing(cls, path: Path | str) -> Ledger:
        """Open a ledger that must exist, for reports only; InputError says what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{path}: not an SQLite database ({exc})") from None
        if version != LEDGER_VERSION:
            raise InputError(f"{path}: not an MES simulator ledger (user_version {version})")
        return cls(path, create=False)

    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            # a commit in the WAL survives a crash of this process, which is what the
            # acknowledgement after commit relies on; the MES is a simulator, not a book of record
            db.execute("PRAGMA synchronous = NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, LEDGER_VERSION):
                db.close()
                raise InputError(
                    f"{self.path}: ledger version {version}, this simulator reads {LEDGER_VERSION}"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {LEDGER_VERSION}")
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------------ recording

    def record(self, topic: str, payload: bytes) -> Recorded:
        """Validate and record one delivery, committed when this returns."""
        received_at = _now()
        try:
            message = parse_message(payload)
            kind = kind_of(message).value
            topic_kind = topic.rsplit("/", 1)[-1]
            if topic_kind != kind:
                raise InputError(
                    f"topic kind {topic_kind!r} does not match the message's schema "
                    f"{message.schema_name!r}"
                )
        except InputError as exc:
            with self._lock:
                db = self._writer()
                db.execute(
                    "INSERT INTO rejected (topic, received_at, error, payload) VALUES (?, ?, ?, ?)",
                    (topic, received_at, str(exc), payload),
                )
            return Recorded("rejected", None, str(exc))
        with self._lock, self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO messages (message_id, kind, topic, received_at, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                (message.message_id, kind, topic, received_at, payload),
            ).rowcount
            if not inserted:
                (first,) = db.execute(
                    "SELECT payload FROM messages WHERE message_id = ?", (message.message_id,)
                ).fetchone()
                db.execute(
                    "INSERT INTO duplicates (message_id, topic, received_at, identical) "
                    "VALUES (?, ?, ?, ?)",
                    (message.message_id, topic, received_at, parse_message(first) == message),
                )
                return Recorded("duplicate", message.message_id)
            _insert_details(db, message, payload)
            return Recorded("new", message.message_id)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._writer()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ------------------------------------------------------------------------ reports

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path)
        try:
            yield db
        finally:
            db.close()

    def counts(self) -> Counts:
        with self._reader() as db:
            return Counts(*db.execute("SELECT * FROM totals").fetchone())

    def received_by_kind(self) -> dict[str, int]:
        with self._reader() as db:
            return dict(db.execute("SELECT kind, messages FROM received_by_kind"))

    def consumption(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, material, uom) → the sum of material-consumed ``quantity`` (corrections too)."""
        with self._reader() as db:
            rows = db.execute("SELECT order_id, material, uom, quantity FROM consumption")
            return _sum(((order, material, uom), qty) for order, material, uom, qty in rows)

    def shadow_consumption(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, material, uom) → the sum of material-consumed-shadow ``quantity``: a pilot's
        backflush, never a stock movement (not in :meth:`consumption`)."""
        with self._reader() as db:
            rows = db.execute("SELECT order_id, material, uom, quantity FROM shadow_consumption")
            return _sum(((order, material, uom), qty) for order, material, uom, qty in rows)

    def lot_movements(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, lot, material) → the sum of the lot movements of material-consumed."""
        with self._reader() as db:
            rows = db.execute("SELECT order_id, lot, material, quantity FROM lot_movements")
            return _sum(((order, lot, material), qty) for order, lot, material, qty in rows)

    def confirmations(self) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
        """(order, operation) → (good, scrap) summed over production confirmations."""
        out: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        with self._reader() as db:
            rows = db.execute("SELECT order_id, operation, good, scrap FROM confirmations")
            for order, operation, good, scrap in rows:
                g, s = out.get((order, operation), (Decimal(0), Decimal(0)))
                out[order, operation] = (g + Decimal(good), s + Decimal(scrap))
        return out

    def exceptions(self) -> dict[str, int]:
        """Exception code → how many exception messages carried it."""
        with self._reader() as db:
            return dict(db.execute("SELECT code, messages FROM exception_counts ORDER BY code"))

    def rejections(self) -> list[Rejection]:
        with self._reader() as db:
            rows = db.execute("SELECT topic, received_at, error, payload FROM rejected ORDER BY id")
            return [Rejection(t, at, e, bytes(p)) for t, at, e, p in rows]

    def net_of(self, message_id: str) -> tuple[Decimal, dict[tuple[str, str], Decimal]]:
        """A material-consumed message plus every message that reverses it: the net quantity,
        and the net per (lot, material) of their lot movements (an entry that nets to zero is
        kept, so a fully reversed posting shows its lots at 0).

        Only the messages whose ``reverses`` names ``message_id`` count, not a reversal of a
        reversal. KeyError when no material-consumed message has that id.
        """
        with self._reader() as db:
            rows = db.execute(
                "SELECT quantity FROM consumption WHERE message_id = ? OR reverses = ?",
                (message_id, message_id),
            ).fetchall()
            if not db.execute(
                "SELECT 1 FROM consumption WHERE message_id = ?", (message_id,)
            ).fetchone():
                raise KeyError(f"no material-consumed message {message_id!r} in the ledger")
            lots = db.execute(
                "SELECT lot, material, quantity FROM lot_movements "
                "WHERE message_id = ? OR reverses = ? ORDER BY rowid",
                (message_id, message_id),
            )
            by_lot = _sum(((lot, material), qty) for lot, material, qty in lots)
        return sum((Decimal(q) for (q,) in rows), Decimal(0)), by_lot

    def reversals(self) -> dict[str, list[str]]:
        """Original message id → the ids of the compensating postings, in arrival order."""
        out: dict[str, list[str]] = {}
        with self._reader() as db:
            rows = db.execute(
                "SELECT reverses, message_id FROM consumption WHERE reverses IS NOT NULL "
                "ORDER BY rowid"
            )
            for original, compensating in rows:
                out.setdefault(original, []).append(compensating)
        return out

    def replies(self, command_id: str | None = None) -> list[CommandReply]:
        """The agent's command replies (all, or those of one command id), in arrival order."""
        where, args = (
            ("WHERE r.command_id = ?", (command_id,)) if command_id is not None else ("", ())
        )
        return self._parsed(CommandReply, "replies", where, args)

    def variances(self, order: str | None = None) -> list[OrderVariance]:
        """The variance messages (all, or those of one order), in arrival order."""
        where, args = ("WHERE r.order_id = ?", (order,)) if order is not None else ("", ())
        return self._parsed(OrderVariance, "variances", where, args)

    def genealogy(self, order: str | None = None) -> list[Genealogy]:
        """The genealogy messages (all, or those of one order), in arrival order."""
        where, args = ("WHERE r.order_id = ?", (order,)) if order is not None else ("", ())
        return self._parsed(Genealogy, "genealogy", where, args)

    def open_exceptions(self) -> list[ExceptionMessage]:
        """Exceptions still open, in arrival order: not ``info``, not themselves a "resolved"
        message, and not resolved by another exception (whatever the arrival order)."""
        where = (
            "WHERE r.severity != ? AND r.resolves IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM exceptions AS x WHERE x.resolves = r.message_id)"
        )
        return self._parsed(ExceptionMessage, "exceptions", where, (Severity.INFO.value,))

    def _parsed(self, model: type[M], table: str, where: str, args: Sequence[object]) -> list[M]:
        with self._reader() as db:
            rows = db.execute(
                f"SELECT m.payload FROM {table} AS r JOIN messages AS m USING (message_id) "
                f"{where} ORDER BY r.rowid",
                args,
            ).fetchall()
        out: list[M] = []
        for (payload,) in rows:
            message = parse_message(payload)
            assert isinstance(message, model), (table, type(message))
            out.append(message)
        return out

    def reply_counts(self) -> dict[str, int]:
        """``accepted``, ``rejected`` (replies by result) and ``duplicates`` (replies to a
        command id seen before)."""
        with self._reader() as db:
            counts = dict.fromkeys(("accepted", "rejected"), 0)
            counts.update(db.execute("SELECT result, count(*) FROM replies GROUP BY result"))
            (counts["duplicates"],) = db.execute(
                "SELECT count(*) FROM replies WHERE duplicate"
            ).fetchone()
        return counts


def _insert_details(db: sqlite3.Connection, message: AnyMessage, payload: bytes) -> None:
    mid = message.message_id
    if isinstance(message, MaterialConsumed):
        db.execute(
            "INSERT INTO consumption "
            "(message_id, order_id, operation, material, uom, quantity, reverses) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                mid,
                message.order,
                message.operation,
                message.material,
                message.uom,
                fmt(message.quantity),
                message.reverses,
            ),
        )
        db.executemany(
            "INSERT INTO lot_movements "
            "(message_id, idx, order_id, lot, material, quantity, reverses) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (mid, i, message.order, m.lot, m.material, fmt(m.quantity), message.reverses)
                for i, m in enumerate(message.lots)
            ],
        )
    elif isinstance(message, ShadowConsumption):
        db.execute(
            "INSERT INTO shadow_consumption "
            "(message_id, order_id, operation, material, uom, quantity) VALUES (?, ?, ?, ?, ?, ?)",
            (
                mid,
                message.order,
                message.operation,
                message.material,
                message.uom,
                fmt(message.quantity),
            ),
        )
    elif isinstance(message, ProductionConfirmation):
        db.execute(
            "INSERT INTO confirmations (message_id, order_id, operation, good, scrap, uom) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                mid,
                message.order,
                message.operation,
                fmt(message.good),
                fmt(message.scrap),
                message.uom,
            ),
        )
    elif isinstance(message, ExceptionMessage):
        db.execute(
            "INSERT INTO exceptions "
            "(message_id, code, severity, order_id, material, text, resolves) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                mid,
                message.code.value,
                message.severity.value,
                message.order,
                message.material,
                message.text,
                message.resolves,
            ),
        )
    elif isinstance(message, CommandReply):
        db.execute(
            "INSERT INTO replies "
            "(message_id, command_id, command, result, reason, duplicate, produced) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                mid,
                message.command_id,
                message.command,
                message.result,
                message.reason,
                message.duplicate,
                json.dumps(list(message.produced)),
            ),
        )
    elif isinstance(message, OrderVariance):
        db.execute(
            "INSERT INTO variances (message_id, order_id, command_id, payload) VALUES (?, ?, ?, ?)",
            (mid, message.order, message.command_id, payload),
        )
    else:
        db.execute(
            "INSERT INTO genealogy (message_id, order_id, finished_lot, command_id, payload) "
            "VALUES (?, ?, ?, ?, ?)",
            (mid, message.order, message.finished_lot, message.command_id, payload),
        )


def _sum(rows: Iterable[tuple[K, str]]) -> dict[K, Decimal]:
    out: dict[K, Decimal] = {}
    for key, quantity in rows:
        out[key] = out.get(key, Decimal(0)) + Decimal(quantity)
    return out


# ---------------------------------------------------------------------------------- simulator


class MesSimulator:
    """The MES: a persistent MQTT session at QoS 1 that records every delivery in a ledger.

    ``start`` connects (and, with a ``timeout``, waits until subscribed); paho reconnects by
    itself with a backoff from ``reconnect_min_s`` (never zero: a client retrying without pause
    can take a restarting broker's port) doubling up to ``reconnect_max_s``. ``stop`` disconnects
    cleanly and keeps the session on the broker; ``start`` again resumes it. Reports read the
    ledger and work whether or not the simulator is connected.
    """

    def __init__(
        self,
        ledger: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        topic_base: str | None = None,
        topic_filter: str | None = None,
        protocol: Protocol = "5",
        client_id: str = "mes-sim",
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 8,
        mes_ack: bool = False,
        signing_key: bytes | None = None,
        user: str = "mes-sim",
    ) -> None:
        if (topic_base is None) == (topic_filter is None):
            raise ValueError("give exactly one of topic_base and topic_filter")
        if mes_ack and topic_base is None:
            raise ValueError("mes_ack needs topic_base: acknowledgements go to {topic_base}/in/")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
        if reconnect_min_s < 1 or reconnect_max_s < reconnect_min_s:
            raise ValueError("need 1 <= reconnect_min_s <= reconnect_max_s")
        self.host = host
        self.port = port
        #: where commands go (``{topic_base}/in/{kind}``); None: this simulator only listens
        self.topic_base = topic_base
        self.topic_filter = topic_filter if topic_filter is not None else f"{topic_base}/out/#"
        self.protocol: Protocol = protocol
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        #: where recorded message ids are acknowledged (None: no end-to-end acknowledgement)
        self.ack_topic = f"{topic_base}/in/mes-ack" if mes_ack else None
        #: commands and acknowledgements are signed with this key (the agent's
        #: ``[commands] signing_key``), issued by ``user``
        self.signing_key = signing_key
        self.user = user
        self.ledger = Ledger(ledger)
        #: end-to-end acknowledgements published
        self.acks_sent = 0
        #: commands (and raw payloads) published and acknowledged by the broker
        self.commands_sent = 0
        #: deliveries the ledger could not record (not acknowledged: the broker sends them again)
        self.errors = 0
        #: the last refusal (connect or subscribe) seen from the broker
        self.last_error: str | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()

    @classmethod
    def for_agent(cls, config: Config, ledger: Path | str, **kwargs: Any) -> MesSimulator:
        """The MES of one agent: its broker, protocol and ``{topic_base}/out/#``.

        ``kwargs`` override any of these and set the rest (client id, backoff, ...).
        """
        options: dict[str, Any] = {
            "host": config.mqtt.host,
            "port": config.mqtt.port,
            "protocol": config.mqtt.protocol,
            "topic_base": config.topic_base,
            "mes_ack": config.mqtt.delivery == "mes-ack",
        }
        if config.commands.signing_key is not None:
            options["signing_key"] = config.commands.signing_key.reveal_bytes()
        options.update(kwargs)
        return cls(ledger, **options)

    # ------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float | None = 10.0) -> None:
        """Connect; with a ``timeout``, wait until subscribed (else stop and raise TimeoutError)."""
        if self._client is not None:
            raise RuntimeError("the MES simulator is already started")
        v5 = self.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 5 sets its session through clean_start and the expiry interval instead
            clean_session=None if v5 else False,
            manual_ack=True,  # PUBACK only once the ledger has committed the message
        )
        client.reconnect_delay_set(self.reconnect_min_s, self.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
            props.SessionExpiryInterval = self.session_expiry_s
            client.connect_async(
                self.host, self.port, self.keepalive_s, clean_start=False, properties=props
            )
        else:
            client.connect_async(self.host, self.port, self.keepalive_s)
        client.loop_start()
        if timeout is not None and not self._subscribed.wait(timeout):
            error = self.last_error
            self.stop()
            raise TimeoutError(
                f"MES simulator not subscribed to {self.topic_filter!r} on "
                f"{self.host}:{self.port} within {timeout} s" + (f" ({error})" if error else "")
            )

    def stop(self) -> None:
        """Disconnect cleanly; the broker keeps the session and queues for it."""
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()
        close_sockets(client)
        self._connected.clear()
        self._subscribed.clear()
        self.ledger.close()

    def close(self) -> None:
        self.stop()
        self.ledger.close()

    def __enter__(self) -> MesSimulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    # ------------------------------------------------------------------------ reports

    def counts(self) -> Counts:
        return self.ledger.counts()

    def received_by_kind(self) -> dict[str, int]:
        return self.ledger.received_by_kind()

    def consumption(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, material, uom) → quantity consumed, corrections included."""
        return self.ledger.consumption()

    def shadow_consumption(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, material, uom) → a pilot's shadow backflush (no stock movement)."""
        return self.ledger.shadow_consumption()

    def lot_movements(self) -> dict[tuple[str, str, str], Decimal]:
        """(order, lot, material) → quantity drawn from the lot (returns negative)."""
        return self.ledger.lot_movements()

    def confirmations(self) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
        """(order, operation) → (good, scrap)."""
        return self.ledger.confirmations()

    def exceptions(self) -> dict[str, int]:
        """Exception code → count."""
        return self.ledger.exceptions()

    def rejections(self) -> list[Rejection]:
        return self.ledger.rejections()

    def replies(self, command_id: str | None = None) -> list[CommandReply]:
        return self.ledger.replies(command_id)

    def open_exceptions(self) -> list[ExceptionMessage]:
        return self.ledger.open_exceptions()

    def net_of(self, message_id: str) -> tuple[Decimal, dict[tuple[str, str], Decimal]]:
        return self.ledger.net_of(message_id)

    def wait_for(
        self,
        condition: int | Callable[[MesSimulator], bool],
        timeout: float = 20.0,
        interval: float = 0.05,
    ) -> None:
        """Poll the ledger until ``condition`` holds: a count of unique messages, or a predicate.

        Raises TimeoutError (with the counts so far) when it does not hold within ``timeout``.
        """
        check: Callable[[MesSimulator], bool]
        if isinstance(condition, int):
            wanted = condition

            def check(mes: MesSimulator) -> bool:
                return mes.counts().received >= wanted

            what = f"{wanted} unique messages"
        else:
            check, what = condition, "the condition"
        deadline = time.monotonic() + timeout
        while not check(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"MES simulator: {what} not reached within {timeout} s ({self.counts()})"
                )
            time.sleep(interval)

    # ------------------------------------------------------------------------ commands

    def send(self, command: BaseModel, timeout: float = 10.0) -> str:
        """Publish a command (a model of :data:`edge_agent.commands.COMMAND_MODELS`) at QoS 1
        on ``{topic_base}/in/{kind}`` and wait for the broker's PUBACK; its command id (``''``
        for a heartbeat, which has none)."""
        kind = COMMAND_KINDS.get(type(command))
        if kind is None:
            raise TypeError(f"not a command model: {type(command).__name__}")
        payload = command.model_dump_json(by_alias=True).encode()
        if self.signing_key is not None:
            payload = self.signed(json.loads(payload), timed=kind != "heartbeat")
        self.send_raw(kind, payload, timeout)
        command_id = getattr(command, "command_id", None) or ""
        assert isinstance(command_id, str)
        return command_id if kind != "heartbeat" else ""

    def send_raw(self, kind: str, payload: bytes, timeout: float = 10.0) -> None:
        """Publish any bytes on ``{topic_base}/in/{kind}`` at QoS 1 (a command the agent must
        reject, a kind it does not know) and wait for the broker's PUBACK (a heartbeat: QoS 0,
        sent)."""
        if self.topic_base is None:
            raise RuntimeError("the MES simulator has no topic_base: it cannot send commands")
        client = self._client
        if client is None:
            raise RuntimeError("the MES simulator is not started: start it before sending")
        if not self._connected.is_set():
            raise RuntimeError(f"the MES simulator is not connected to {self.host}:{self.port}")
        topic = f"{self.topic_base}/in/{kind}"
        # a heartbeat goes at QoS 0: the broker does not queue it for an agent that is away,
        # whose clock would otherwise be compared with a stale reading when it is back
        qos = 0 if kind == "heartbeat" else 1
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"{topic}: no PUBACK from the broker within {timeout} s")
        self.commands_sent += 1

    def signed(self, data: dict[str, Any], timed: bool = True) -> bytes:
        assert self.signing_key is not None, "no signing key"
        return signed_payload(data, self.signing_key, self.user, timed)

    def new_command_id(self) -> str:
        """A fresh command id: the client id and 12 random hex digits."""
        return f"{self.client_id}-{uuid.uuid4().hex[:12]}"

    def master_data(self, doc: dict[str, Any], *, command_id: str | None = None) -> str:
        """Send materials and BOM revisions (the JSON ``edge-agent calc`` reads)."""
        return self.send(
            MasterDataCommand(command_id=command_id or self.new_command_id(), master_data=doc)
        )

    def release_order(
        self,
        order: str,
        product: str,
        quantity: Decimal | int | str,
        revision: str | None = None,
        finished_lot: str | None = None,
        work_centre: str | None = None,
        *,
        command_id: str | None = None,
    ) -> str:
        return self._work_order(
            command_id,
            action="release",
            order=order,
            product=product,
            quantity=Decimal(quantity),
            revision=revision,
            finished_lot=finished_lot,
            work_centre=work_centre,
        )

    def start_order(self, order: str, *, command_id: str | None = None) -> str:
        """Start a released order (or resume a held one)."""
        return self._work_order(command_id, action="start", order=order)

    def hold_order(
        self, order: str, reason: str | None = None, *, command_id: str | None = None
    ) -> str:
        return self._work_order(command_id, action="hold", order=order, reason=reason)

    def close_order(
        self,
        order: str,
        remnants: Mapping[str, Decimal | int | str] | None = None,
        *,
        command_id: str | None = None,
    ) -> str:
        """Close an order; ``remnants``: lot → counted quantity returned to stock."""
        counts = tuple(
            RemnantCount(lot=lot, quantity=Decimal(q)) for lot, q in (remnants or {}).items()
        )
        return self._work_order(command_id, action="close", order=order, remnants=counts)

    def _work_order(self, command_id: str | None, **fields: Any) -> str:
        return self.send(WorkOrderCommand(command_id=command_id or self.new_command_id(), **fields))

    def stage_lot(
        self,
        lot: str,
        material: str,
        quantity: Decimal | int | str,
        expiry: datetime | None = None,
        status: LotStatus | str = LotStatus.RELEASED,
        order: str | None = None,
        work_centre: str | None = None,
        *,
        command_id: str | None = None,
    ) -> str:
        return self._lot(
            command_id,
            action="staged",
            lot=lot,
            material=material,
            quantity=Decimal(quantity),
            expiry=expiry,
            status=LotStatus(status),
            order=order,
            work_centre=work_centre,
        )

    def return_lot(
        self, lot: str, quantity: Decimal | int | str, *, command_id: str | None = None
    ) -> str:
        return self._lot(command_id, action="returned", lot=lot, quantity=Decimal(quantity))

    def quarantine_lot(self, lot: str, *, command_id: str | None = None) -> str:
        return self._lot(command_id, action="quarantined", lot=lot)

    def release_lot(self, lot: str, *, command_id: str | None = None) -> str:
        return self._lot(command_id, action="released", lot=lot)

    def rebin_lot(
        self,
        lot: str,
        order: str | None = None,
        work_centre: str | None = None,
        *,
        command_id: str | None = None,
    ) -> str:
        """Rebin a lot to an order and/or work centre (None: any)."""
        return self._lot(
            command_id, action="rebinned", lot=lot, order=order, work_centre=work_centre
        )

    def _lot(self, command_id: str | None, **fields: Any) -> str:
        return self.send(
            LotStagingCommand(command_id=command_id or self.new_command_id(), **fields)
        )

    def reverse(
        self,
        message_id: str,
        reason_code: str,
        requested_by: str,
        *,
        comment: str | None = None,
        command_id: str | None = None,
    ) -> str:
        """Ask the agent to reverse the material-consumed message ``message_id``."""
        return self.send(
            ReversalCommand(
                command_id=command_id or self.new_command_id(),
                message_id=message_id,
                reason_code=reason_code,
                requested_by=requested_by,
                comment=comment,
            )
        )

    def resolve_exception(
        self,
        exception_id: str,
        action: Literal["post", "discard", "approve"],
        reason_code: str,
        requested_by: str,
        *,
        comment: str | None = None,
        command_id: str | None = None,
    ) -> str:
        """Decide on the open exception ``exception_id``: the counts of an implausible counter
        jump (post or discard), counts for an unknown, held or closed order (discard), a flagged
        order-close variance (approve)."""
        return self.send(
            ExceptionResolutionCommand(
                command_id=command_id or self.new_command_id(),
                exception_id=exception_id,
                action=action,
                reason_code=reason_code,
                requested_by=requested_by,
                comment=comment,
            )
        )

    def actual_issue(
        self,
        order: str,
        material: str,
        quantity: Decimal | int | str,
        uom: str,
        *,
        at: datetime | None = None,
        operation: str | None = None,
        lot: str | None = None,
        phase: Literal["setup", "running"] | None = None,
        command_id: str | None = None,
    ) -> str:
        """A pilot's actual issue of ``material`` to ``order`` (scanned or weighed at the line;
        a negative ``quantity`` is a return), ``at`` now unless given."""
        return self.send(
            ActualIssueCommand(
                command_id=command_id or self.new_command_id(),
                order=order,
                operation=operation,
                material=material,
                lot=lot,
                quantity=Decimal(quantity),
                uom=uom,
                at=at or datetime.now(UTC),
                phase=phase,
            )
        )

    def heartbeat(self, mes_time: datetime | None = None) -> str:
        """Send the MES's clock (now, by default); ``''``: a heartbeat has no id and no reply."""
        return self.send(Heartbeat(mes_time=mes_time or datetime.now(UTC)))

    def wait_reply(self, command_id: str, timeout: float = 20.0) -> CommandReply:
        """The agent's (first) reply to ``command_id``, polling the ledger."""
        return self.wait_replies(command_id, 1, timeout)[0]

    def wait_replies(self, command_id: str, n: int, timeout: float = 20.0) -> list[CommandReply]:
        """The first ``n`` replies to ``command_id`` (a command sent ``n`` times), polling the
        ledger; TimeoutError names the command id and the replies seen so far."""
        deadline = time.monotonic() + timeout
        while len(replies := self.ledger.replies(command_id)) < n:
            if time.monotonic() >= deadline:
                seen = [
                    f"{r.command_id} {r.command} {r.result}"
                    + (f" ({r.reason})" if r.reason else "")
                    for r in self.ledger.replies()
                ]
                raise TimeoutError(
                    f"MES simulator: {len(replies)} of {n} replies to command {command_id!r} "
                    f"within {timeout} s; replies so far: {seen or 'none'}"
                )
            time.sleep(0.02)
        return replies[:n]

    # ------------------------------------------------------------------ paho callbacks (thread)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            log.warning("mes_connect_refused", reason=str(rc))
            return
        self._connected.set()
        log.info(
            "mes_connected",
            host=self.host,
            port=self.port,
            client_id=self.client_id,
            session_present=flags.session_present,
        )
        # every time: a broker that lost the session (restarted without persistence) forgot it
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            self.last_error = f"subscription to {self.topic_filter!r} refused: {refused[0]}"
            log.error("mes_subscribe_refused", topic=self.topic_filter, reason=refused[0])
            return
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was_connected and rc.is_failure:
            log.warning("mes_disconnected", reason=str(rc))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            recorded = self.ledger.record(message.topic, bytes(message.payload))
        except Exception:
            # not recorded, so not acknowledged: the broker delivers it again on reconnect
            self.errors += 1
            log.exception("mes_ledger_error", topic=message.topic)
            return
        if recorded.message_id is None:
            log.warning("mes_message_rejected", topic=message.topic, error=recorded.error)
        elif self.ack_topic is not None:
            # a repeat is acknowledged again: the agent sent it because it missed the first ack
            ids = {"message_ids": [recorded.message_id]}
            ack = self.signed(ids, timed=False) if self.signing_key else json.dumps(ids).encode()
            client.publish(self.ack_topic, ack, qos=1)
            self.acks_sent += 1
        client.ack(message.mid, message.qos)


# ---------------------------------------------------------------------------------------- CLI


def signed_payload(data: dict[str, Any], key: bytes, user: str, timed: bool = True) -> bytes:
    """``data`` signed with ``key`` as the MES signs (:func:`edge_agent.commands.sign`);
    ``timed``: issued now by ``user`` unless it says otherwise (a command, not a heartbeat or an
    acknowledgement)."""
    data = {k: v for k, v in data.items() if k != "signature"}
    if timed:
        data["issued_at"] = data.get("issued_at") or wire_time(datetime.now(UTC))
        data["issued_by"] = data.get("issued_by") or user
    return json.dumps(sign(data, key)).encode()


def _key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--signing-key-file",
        type=Path,
        metavar="FILE",
        help="sign commands and acknowledgements with this key (the agent's "
        "[commands] signing_key)",
    )


def _read_key(parser: argparse.ArgumentParser, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        parser.error(f"--signing-key-file: cannot read {str(path)!r}: {exc.strerror}")
    if not key:
        parser.error(f"--signing-key-file: {str(path)!r} is empty")
    return key


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < len(columns) - 1 else "right")
    for row in rows:
        table.add_row(*(fmt(v) if isinstance(v, Decimal) else str(v) for v in row))
    return table


def report_tables(ledger: Ledger) -> list[Table]:
    """The ledger's totals as rich tables, one per report."""
    counts = ledger.counts()
    messages = _table(
        "Messages",
        ["", "count"],
        [
            ("received (unique)", counts.received),
            *sorted((f"  {kind}", n) for kind, n in ledger.received_by_kind().items()),
            ("duplicate deliveries", counts.duplicates),
            ("  of which conflicting", counts.conflicts),
            ("rejected", counts.rejected),
        ],
    )
    consumption = _table(
        "Consumption",
        ["order", "material", "uom", "quantity"],
        [(*key, qty) for key, qty in sorted(ledger.consumption().items())],
    )
    lots = _table(
        "Lot movements",
        ["order", "lot", "material", "quantity"],
        [(*key, qty) for key, qty in sorted(ledger.lot_movements().items())],
    )
    confirmations = Table(title="Confirmations", title_justify="left")
    for column in ("order", "operation"):
        confirmations.add_column(column)
    for column in ("good", "scrap"):
        confirmations.add_column(column, justify="right")
    for (order, operation), (good, scrap) in sorted(ledger.confirmations().items()):
        confirmations.add_row(order, operation, fmt(good), fmt(scrap))
    exceptions = _table("Exceptions", ["code", "count"], sorted(ledger.exceptions().items()))
    replies = ledger.reply_counts()
    commands = _table(
        "Commands",
        ["", "count"],
        [
            ("replies accepted", replies["accepted"]),
            ("replies rejected", replies["rejected"]),
            ("  of which duplicates", replies["duplicates"]),
            ("reversals", sum(len(ids) for ids in ledger.reversals().values())),
            ("open exceptions", len(ledger.open_exceptions())),
        ],
    )
    return [
        messages,
        consumption,
        lots,
        confirmations,
        exceptions,
        commands,
        variance_table(ledger),
    ]


def variance_table(ledger: Ledger) -> Table:
    """One row per variance line of each closed order, in the order the variances arrived."""
    table = Table(title="Variances", title_justify="left")
    # fourteen columns: a narrow terminal wraps a value ("fold"), never cuts it to "…"
    for column in ("order", "op", "material", "uom"):
        table.add_column(column, overflow="fold")
    numbers = ("planned", "theoretical", "issued", "substituted", "held", "residual", "actual")
    headers = ("planned", "theor.", "issued", "subst.", "held", "resid.", "actual")
    for column in (*headers, "var.", "%", "flag"):
        table.add_column(column, justify="right", overflow="fold")

    def show(value: Decimal | None) -> str:
        return "-" if value is None else fmt(value)

    for variance in ledger.variances():
        for line in variance.lines:
            table.add_row(
                variance.order,
                line.operation,
                line.material,
                line.uom,
                *(show(getattr(line, column)) for column in numbers),
                show(line.variance),
                show(line.variance_pct),
                "yes" if line.flagged else "",
            )
    return table


def reply_table(reply: CommandReply) -> Table:
    """One command reply, field by field."""
    return _table(
        "Command reply",
        ["field", "value"],
        [
            ("command_id", reply.command_id or "-"),
            ("command", reply.command),
            ("result", reply.result),
            ("reason", reply.reason or "-"),
            ("duplicate", "yes" if reply.duplicate else "no"),
            ("produced", ", ".join(reply.produced) or "-"),
            ("message_id", reply.message_id),
            ("created_at", wire_time(reply.created_at)),
        ],
    )


def print_report(ledger: Ledger, console: Console) -> None:
    for table in report_tables(ledger):
        console.print(table)


def _check_topic(value: str, wildcards: bool) -> str:
    levels = value.split("/")
    if not value or any(not level for level in levels):
        raise ValueError(f"must be topic levels separated by '/', none empty (got {value!r})")
    if not wildcards and any(c in value for c in "+#"):
        raise ValueError(f"must not contain the wildcards '+' or '#' (got {value!r})")
    return value


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulators.mes [options]`` listens (or reports); ``... send`` sends."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["send"]:
        return send_main(args_list[1:])
    return listen_main(args_list)


def _listen_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.mes",
        description="The MES side of the agent's MQTT contract: receives, validates and "
        "deduplicates the agent's messages into an SQLite ledger; Ctrl-C prints the totals.",
        epilog="To publish one command to the agent: python -m simulators.mes send --help",
    )
    parser.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    parser.add_argument(
        "--topic-base",
        help="the agent's {root}/{site}/{area}/{line}/{agent}; subscribes to .../out/#",
    )
    parser.add_argument("--topic", help="subscribe to this topic filter instead")
    parser.add_argument("--ledger", type=Path, required=True, help="the SQLite ledger file")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="5", help="MQTT version")
    parser.add_argument("--client-id", default="mes-sim", help="the persistent session's id")
    parser.add_argument(
        "--mes-ack",
        action="store_true",
        help="acknowledge each recorded id on {topic-base}/in/mes-ack (the agent's "
        'delivery = "mes-ack")',
    )
    parser.add_argument(
        "--report", action="store_true", help="only print the totals of an existing ledger"
    )
    _key_argument(parser)
    return parser


def listen_main(argv: Sequence[str]) -> int:
    """The simulator: subscribe and record until interrupted (or ``--report`` a ledger)."""
    parser = _listen_parser()
    args = parser.parse_args(argv)
    console = Console()

    if args.report:
        try:
            ledger = Ledger.existing(args.ledger)
        except InputError as exc:
            parser.error(f"--ledger: {exc}")
        print_report(ledger, console)
        return 0

    try:
        host, port = parse_host_port(args.broker)
    except ValueError as exc:
        parser.error(f"--broker: {exc}")
    if (args.topic_base is None) == (args.topic is None):
        parser.error("give --topic-base (or, instead, --topic)")
    if args.mes_ack and args.topic_base is None:
        parser.error("--mes-ack needs --topic-base: acknowledgements go to {topic-base}/in/")
    try:
        if args.topic_base is not None:
            _check_topic(args.topic_base, wildcards=False)
        else:
            _check_topic(args.topic, wildcards=True)
    except ValueError as exc:
        parser.error(f"--topic-base/--topic: {exc}")
    if args.ledger.exists() and not args.ledger.is_file():
        parser.error(f"--ledger: {args.ledger} is not a file")
    try:
        mes = MesSimulator(
            args.ledger,
            host=host,
            port=port,
            topic_base=args.topic_base,
            topic_filter=args.topic,
            protocol=args.protocol,
            client_id=args.client_id,
            mes_ack=args.mes_ack,
            signing_key=_read_key(parser, args.signing_key_file),
        )
    except (InputError, sqlite3.DatabaseError) as exc:
        parser.error(f"--ledger: {exc}")

    configure_logging("info")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        mes.start(timeout=None)
        console.print(
            f"MES simulator [bold]{mes.client_id}[/] on {host}:{port} (MQTT {mes.protocol}): "
            f"{mes.topic_filter} → {args.ledger}. Ctrl-C prints the totals."
        )
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        mes.close()
    print_report(mes.ledger, console)
    return 0


def _command_payload(
    parser: argparse.ArgumentParser, kind: str, path: Path, raw: bool
) -> tuple[bytes, str]:
    """The payload to publish and its command id (``''`` for a heartbeat or a raw file);
    ``parser.error`` names the file and the problem."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        parser.error(f"{path}: cannot read the command file ({exc.strerror or exc})")
    if raw:
        return text, ""
    if kind not in COMMAND_MODELS:
        parser.error(f"KIND: unknown command kind {kind!r} (known: {', '.join(COMMAND_MODELS)})")
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        parser.error(f"{path}: not a JSON command ({exc})")
    if not isinstance(data, dict):
        parser.error(f"{path}: a command is a JSON object (got {type(data).__name__})")
    data.setdefault("schema", f"edge-agent/{kind}")
    data.setdefault("version", 1)
    if kind != "heartbeat" and not data.get("command_id"):
        data["command_id"] = f"mes-send-{uuid.uuid4().hex[:12]}"
    command = parse_command(kind, json.dumps(data).encode())
    if isinstance(command, CommandRejected):
        parser.error(f"{path}: not a valid {kind} command: {command.reason}")
    return command.model_dump_json(by_alias=True).encode(), getattr(command, "command_id", "")


def publish_command(
    host: str,
    port: int,
    topic_base: str,
    kind: str,
    payload: bytes,
    *,
    protocol: Protocol = "5",
    client_id: str | None = None,
    reply_to: str | None = None,
    timeout: float = 10.0,
) -> CommandReply | None:
    """Publish one command with a short-lived clean session (it never takes over a running
    simulator's persistent session) and, with ``reply_to`` (a command id), wait ``timeout`` s
    for the agent's reply on ``{topic_base}/out/command-reply``.

    ConnectionError when the broker cannot be reached or refuses; TimeoutError when the PUBACK
    or the reply does not come.
    """
    replies: queue.Queue[CommandReply] = queue.Queue()
    connected, subscribed = threading.Event(), threading.Event()
    refused: list[str] = []
    reply_topic = f"{topic_base}/out/command-reply"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"mes-send-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        if rc.is_failure:
            refused.append(str(rc))
        else:
            connected.set()
        if reply_to is not None and not rc.is_failure:
            c.subscribe(reply_topic, qos=1)

    def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(InputError):
            reply = parse_message(bytes(message.payload))
            if isinstance(reply, CommandReply) and reply.command_id == reply_to:
                replies.put(reply)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {host}:{port} ({exc})") from None
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        if not connected.wait(timeout):
            why = f"refused: {refused[0]}" if refused else f"no CONNACK within {timeout} s"
            raise ConnectionError(f"{host}:{port}: {why}")
        if reply_to is not None and not subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{reply_topic}: not subscribed within {timeout} s")
        topic = f"{topic_base}/in/{kind}"
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise TimeoutError(f"{topic}: no PUBACK from the broker within {timeout} s")
        if reply_to is None:
            return None
        try:
            return replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no reply to command {reply_to!r} on {reply_topic} within {timeout} s"
            ) from None
    finally:
        client.disconnect()
        client.loop_stop()
        close_sockets(client)


def send_main(argv: Sequence[str]) -> int:
    """``python -m simulators.mes send``: publish one command file to the agent."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.mes send",
        description="Publish one MES command (a JSON file) to the agent on "
        "{topic-base}/in/{KIND}; schema, version and a command_id are added when the file has "
        "none, and the command is checked against the contract before it is sent.",
    )
    parser.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    parser.add_argument(
        "--topic-base", required=True, help="the agent's {root}/{site}/{area}/{line}/{agent}"
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="5", help="MQTT version")
    parser.add_argument("--client-id", help="default: mes-send-<random> (a clean session)")
    parser.add_argument(
        "--wait-reply",
        type=float,
        metavar="SECONDS",
        help="wait this long for the agent's command-reply and print it",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="publish the file's bytes as they are: nothing added, nothing checked",
    )
    parser.add_argument("--user", default=getpass.getuser(), help="issued_by of a signed command")
    _key_argument(parser)
    parser.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(COMMAND_MODELS)}")
    parser.add_argument("file", metavar="FILE.json", type=Path, help="the command")
    args = parser.parse_args(argv)
    key = _read_key(parser, args.signing_key_file)
    if key is not None and args.raw:
        parser.error("--raw publishes the file's bytes as they are: it cannot sign them")

    try:
        host, port = parse_host_port(args.broker)
    except ValueError as exc:
        parser.error(f"--broker: {exc}")
    try:
        _check_topic(args.topic_base, wildcards=False)
        _check_topic(args.kind, wildcards=False)
    except ValueError as exc:
        parser.error(f"--topic-base/KIND: {exc}")
    if args.wait_reply is not None and args.wait_reply <= 0:
        parser.error(f"--wait-reply: must be above 0 s (got {args.wait_reply})")
    payload, command_id = _command_payload(parser, args.kind, args.file, args.raw)
    if key is not None:
        payload = signed_payload(json.loads(payload), key, args.user, args.kind != "heartbeat")
    wait = args.wait_reply is not None
    if wait and not command_id:
        parser.error(
            "--wait-reply: "
            + ("a heartbeat has no reply" if args.kind == "heartbeat" else "the command has no id")
        )

    console = Console()
    try:
        reply = publish_command(
            host,
            port,
            args.topic_base,
            args.kind,
            payload,
            protocol=args.protocol,
            client_id=args.client_id,
            reply_to=command_id if wait else None,
            timeout=args.wait_reply if wait else 10.0,
        )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        print(f"python -m simulators.mes send: {exc}", file=sys.stderr)
        return 1
    topic = f"{args.topic_base}/in/{args.kind}"
    console.print(f"sent {args.kind} {command_id or '(no command id)'} → {topic}")
    if reply is None:
        return 0
    console.print(reply_table(reply))
    return 0 if reply.result == "accepted" else 1


if __name__ == "__main__":
    sys.exit(main())
