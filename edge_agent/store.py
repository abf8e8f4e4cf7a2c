"""The durable store (aiosqlite, WAL): engine state, master-data cache, outbox and audit log.

One SQLite file holds everything, so the state change a signal causes and the messages it produces
commit in one transaction (the transactional outbox, shared/DESIGN.md §2). The engine collects
writes in a :class:`UnitOfWork`; :meth:`Store.commit_units` commits many units with one COMMIT
(one fsync) under load.

Tables::

    meta(key PRIMARY KEY, value)             schema_version, created_at
    state(key PRIMARY KEY, value JSON)       counter states, consumption per order, handshakes, ...
    masterdata(kind, key, value JSON)        the master-data cache
    outbox(seq AUTOINCREMENT, message_id UNIQUE, topic, payload BLOB, created_at)
    audit(seq, at, kind, ref, payload_sha256, prev_hash, hash)
    journal(message_id PRIMARY KEY, order_id, payload BLOB, created_at)
                                             every posting sent, for a reversal by id (schema 2)

The audit log is a hash chain: ``hash = sha256(json([prev_hash, seq, at, kind, ref,
payload_sha256]))`` with compact separators, the first ``prev_hash`` being 64 zeros. Every message
entering the outbox appends an entry in the same transaction, so an edited, deleted or reordered
entry is found by :meth:`Store.verify_audit`.

A store that cannot be trusted (not SQLite, failing its integrity check, a newer schema, missing
tables) is refused with :class:`~edge_agent.errors.StoreError`; it is never replaced by an empty
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from edge_agent.crashpoints import crash_point
from edge_agent.errors import StoreError, StoreFullError

SCHEMA_VERSION = 2
GENESIS = "0" * 64
SQLITE_HEADER = b"SQLite format 3\x00"
RECOVERY = (
    "the file is left as it is: keep it (and any -wal beside it) for the audit, do not delete "
    "it; restore a backup, or recover it into a new file (sqlite3 DAMAGED .recover | sqlite3 "
    "NEW) and check that with edge-agent status, or start with a new store path and reconcile "
    "with the MES (see docs/durability.md, 'A damaged store'); the agent never replaces a store "
    "it cannot trust"
)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE masterdata (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                         PRIMARY KEY (kind, key));
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT UNIQUE NOT NULL,
                     topic TEXT NOT NULL, payload BLOB NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL,
                    ref TEXT NOT NULL, payload_sha256 TEXT NOT NULL, prev_hash TEXT NOT NULL,
                    hash TEXT NOT NULL);
"""
#: schema 2: the postings journal (a reversal names the posting it reverses by id)
_JOURNAL = """
CREATE TABLE journal (message_id TEXT PRIMARY KEY, order_id TEXT NOT NULL,
                      payload BLOB NOT NULL, created_at TEXT NOT NULL);
"""
_TABLES = {"meta", "state", "masterdata", "outbox", "audit"}


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    message_id: str
    topic: str
    payload: bytes
    created_at: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    ok: bool
    entries: int
    first_broken_seq: int | None = None
    reason: str | None = None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def chain_hash(prev: str, seq: int, at: str, kind: str, ref: str, payload_sha256: str) -> str:
    if (
        type(seq) is int
        and type(prev) is str
        and type(at) is str
        and type(kind) is str
        and type(ref) is str
        and type(payload_sha256) is str
    ):
        # what json.dumps writes for these types, a quarter of its time (it makes an encoder
        # per call): a str through json's own string encoder, an int as its repr
        q = _json_string
        encoded = f"[{q(prev)},{seq},{q(at)},{q(kind)},{q(ref)},{q(payload_sha256)}]"
    else:
        encoded = json.dumps([prev, seq, at, kind, ref, payload_sha256], separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


class UnitOfWork:
    """Writes collected by the engine for one signal; committed all together or not at all."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[Any, ...]]] = []

    def put_state(self, key: str, value: Mapping[str, Any]) -> None:
        self.ops.append(("state", (key, _json(value))))

    def delete_state(self, key: str) -> None:
        self.ops.append(("delete_state", (key,)))

    def put_masterdata(self, kind: str, key: str, value: Mapping[str, Any]) -> None:
        self.ops.append(("masterdata", (kind, key, _json(value))))

    def enqueue(self, message_id: str, topic: str, payload: bytes, created_at: str) -> None:
        """Queue a message; a message id already in the outbox is not queued twice."""
        self.ops.append(("enqueue", (message_id, topic, payload, created_at)))

    def journal(self, message_id: str, order: str, payload: bytes, created_at: str) -> None:
        """Keep a posting for later reference (a reversal by its id)."""
        self.ops.append(("journal", (message_id, order, payload, created_at)))

    def audit(self, kind: str, ref: str, payload: bytes, at: str) -> None:
        """Append an audit entry (e.g. an applied command) to the hash chain."""
        self.ops.append(("audit", (kind, ref, hashlib.sha256(payload).hexdigest(), at)))


_UPSERT_STATE = (
    "INSERT INTO state VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
_DELETE_STATE = "DELETE FROM state WHERE key = ?"
_UPSERT_MASTERDATA = (
    "INSERT INTO masterdata VALUES (?, ?, ?) "
    "ON CONFLICT(kind, key) DO UPDATE SET value = excluded.value"
)
_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, topic, payload, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(message_id) DO NOTHING"
)
_NEWEST_OUTBOX_IDS = "SELECT message_id FROM outbox ORDER BY seq DESC LIMIT ?"
_INSERT_JOURNAL = "INSERT OR IGNORE INTO journal VALUES (?, ?, ?, ?)"
_INSERT_AUDIT = "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)"
_PUT_META = "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
#: the chain's last entry ("seq:hash"), its recorded end and a recorded break, in one statement
_AUDIT_ENDS = (
    "SELECT (SELECT seq || ':' || hash FROM audit ORDER BY seq DESC LIMIT 1), "
    "(SELECT value FROM meta WHERE key = 'audit_head'), "
    "(SELECT value FROM meta WHERE key = 'audit_break')"
)


#: keys one DELETE names: a power of two under SQLite's smallest default variable limit (999)
_DELETE_CHUNK = 512


@functools.cache
def _delete_outbox_sql(column: str, count: int) -> str:
    return f"DELETE FROM outbox WHERE {column} IN ({', '.join(['?'] * count)})"


@dataclass(slots=True)
class _Batch:
    """The ops of many units sorted by table, each table's in their order in the units.

    ``state`` is runs of consecutive upserts or deletes (their relative order matters: a put
    then a delete of one key), ``chained`` the ops that may append to the audit chain
    (``enqueue`` and ``audit``), in op order."""

    state: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)
    masterdata: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)
    journal: list[tuple[Any, ...]] = field(default_factory=list)
    chained: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    @classmethod
    def of(cls, units: Sequence[UnitOfWork]) -> _Batch:
        batch = cls()
        state_run: list[tuple[Any, ...]] = []
        state_op = ""
        for unit in units:
            for op, args in unit.ops:
                if op in ("state", "delete_state"):
                    if op != state_op:
                        state_op, state_run = op, []
                        statement = _UPSERT_STATE if op == "state" else _DELETE_STATE
                        batch.state.append((statement, state_run))
                    state_run.append(args)
                elif op == "masterdata":
                    batch.masterdata.append(args)
                elif op == "enqueue":
                    batch.outbox.append(args)
                    batch.chained.append((op, args))
                elif op == "journal":
                    batch.journal.append(args)
                elif op == "audit":
                    batch.chained.append((op, args))
                else:
                    raise AssertionError(f"unknown unit-of-work operation {op!r}")
        return batch


class Store:
    """The agent's one SQLite file. Use :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self.commits = 0
        #: this store's own id (meta ``store_id``, made when it is created; "" for a store made
        #: before it existed): part of every message id, so a new store never reuses the ids
        #: an earlier one sent (the MES would drop its messages as repeats)
        self.store_id = ""
        # One connection, many coroutines (engine, uplink): a transaction and every read run
        # under this lock, so no reader ever sees the rows of a transaction not yet committed.
        self._lock = asyncio.Lock()
        self._audit_seq = 0
        self._audit_hash = GENESIS

    # ------------------------------------------------------------------ opening

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: Path, synchronous: Literal["FULL", "NORMAL"] = "FULL"
    ) -> AsyncIterator[Store]:
        """Open (or create) the store; refuse one that cannot be trusted."""
        if not os.path.lexists(path):
            await cls._create_new(path, synchronous)
        _check_file(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"store {str(path)!r} cannot be opened: {exc}; {RECOVERY}") from exc
        try:
            store = cls(db, path)
            await store._prepare(synchronous)
            store.store_id = await store._meta("store_id") or ""
            yield store
        finally:
            await db.close()

    @classmethod
    async def _create_new(cls, path: Path, synchronous: str) -> None:
        """A new store appears complete or not at all: it is built beside ``path`` and renamed
        into place, so an empty (or half-made) file at ``path`` is never the agent's own, and
        is refused like any other damage rather than taken for a new store."""
        building = path.with_name(path.name + ".creating")
        for leftover in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
            leftover.unlink(missing_ok=True)  # an interrupted creation: nothing in it yet
        try:
            async with aiosqlite.connect(building, isolation_level=None) as db:
                await cls(db, building)._prepare(synchronous)
            fd = os.open(building, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(building, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, path) from exc
            raise StoreError(f"store {str(path)!r} cannot be created: {exc}") from exc

    async def _prepare(self, synchronous: str) -> None:
        where = f"store {str(self.path)!r}"
        try:
            # nothing is written (not even the switch to WAL, which rewrites the header) until
            # the file is trusted: a refused file is left exactly as it was
            rows = await self._db.execute_fetchall("PRAGMA integrity_check")
            verdict = [str(r[0]) for r in rows]
            if verdict != ["ok"]:
                raise StoreError(f"{where} fails its integrity check: {verdict[0]}; {RECOVERY}")
            tables = {
                str(r[0])
                for r in await self._db.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            } - {"sqlite_sequence"}
            if not tables:
                await self._use_wal(synchronous)
                await self._create()
                return
            missing = _TABLES - tables
            if missing:
                raise StoreError(
                    f"{where} is not an edge-agent store or is damaged: missing tables "
                    f"{', '.join(sorted(missing))}; {RECOVERY}"
                )
            version = await self._meta("schema_version")
            if version is None or not version.isdigit():
                raise StoreError(
                    f"{where} has no readable schema version (got {version!r}): it is damaged "
                    f"or not an edge-agent store; {RECOVERY}"
                )
            if int(version) > SCHEMA_VERSION:
                raise StoreError(
                    f"{where} has schema version {version}, newer than this agent knows "
                    f"({SCHEMA_VERSION}): run the agent version that wrote it"
                )
            await self._use_wal(synchronous)
            if int(version) < 2:
                await self._db.executescript(
                    "BEGIN;" + _JOURNAL + "UPDATE meta SET value = '2' WHERE key = "
                    "'schema_version';COMMIT;"
                )
            last = await self._db.execute_fetchall(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
            )
            for seq, digest in last:
                self._audit_seq, self._audit_hash = int(seq), str(digest)
            await self._check_audit_head()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
                raise _translate(exc, self.path) from exc  # not damage: retry when there is space
            raise StoreError(f"{where} is damaged: {exc}; {RECOVERY}") from exc

    async def _use_wal(self, synchronous: str) -> None:
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={synchronous}")

    async def _create(self) -> None:
        await self._db.executescript(
            "BEGIN;"
            + _SCHEMA
            + _JOURNAL
            + "INSERT INTO meta VALUES ('schema_version', '"
            + str(SCHEMA_VERSION)
            + "'), ('created_at', '"
            + datetime.now(UTC).isoformat(timespec="milliseconds")
            + "'), ('store_id', '"
            + uuid.uuid4().hex
            + "');COMMIT;"
        )
        self.commits += 1

    async def _meta(self, key: str) -> str | None:
        rows = list(await self._db.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
        return str(rows[0][0]) if rows else None

    # ------------------------------------------------------------------ writing

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """``async with store.transaction() as tx:`` — committed on exit, nothing if it raises."""
        uow = UnitOfWork()
        yield uow
        await self.commit_units([uow])

    async def commit_units(self, units: Sequence[UnitOfWork]) -> None:
        """Commit many units in one SQLite transaction (one fsync), in order; all or none.

        The ops are sorted by table (:class:`_Batch`) and each table gets one ``executemany``,
        so a commit is a handful of round trips to aiosqlite's thread whatever its size. Ops on
        one table keep their order; ops on different tables commute inside the transaction.
        The audit chain is computed here, in op order, from what SQLite says it inserted."""
        batch = _Batch.of(units)
        async with self._lock:
            # read under the lock: a committer that waited must continue the chain as it is now
            seq, digest = self._audit_seq, self._audit_hash
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    seq, digest = await self._write(batch, seq, digest)
                    if seq != self._audit_seq:  # the head moved: record it with the entries
                        await self._db.execute(_PUT_META, ("audit_head", f"{seq}:{digest}"))
                    crash_point("store.before_commit")
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc
            self._audit_seq, self._audit_hash = seq, digest
        self.commits += 1

    async def _rollback(self) -> None:
        """Roll back what is still open, keeping the error that got us here.

        On some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, ...) SQLite has already rolled
        the transaction back itself; a ROLLBACK then fails with "no transaction is active" and,
        raised, would hide the real cause (a full disk reported as a rollback problem)."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")

    async def _write(self, batch: _Batch, seq: int, digest: str) -> tuple[int, str]:
        """Write ``batch`` inside the open transaction; returns the new head of the chain."""
        db = self._db
        for statement, rows in batch.state:
            await db.executemany(statement, rows)
        if batch.masterdata:
            await db.executemany(_UPSERT_MASTERDATA, batch.masterdata)
        fresh = await self._insert_outbox(batch.outbox)
        if batch.journal:
            await db.executemany(_INSERT_JOURNAL, batch.journal)
        entries: list[tuple[int, str, str, str, str, str, str]] = []
        for op, args in batch.chained:
            if op == "enqueue":
                message_id, _topic, payload, at = args
                if fresh is not None:
                    if message_id not in fresh:
                        continue  # already in the outbox, or enqueued earlier in this batch
                    fresh.discard(message_id)
                kind, ref, payload_sha = "outbox", message_id, hashlib.sha256(payload).hexdigest()
            else:
                kind, ref, payload_sha, at = args
            seq += 1
            prev, digest = digest, chain_hash(digest, seq, at, kind, ref, payload_sha)
            entries.append((seq, at, kind, ref, payload_sha, prev, digest))
        if fresh:
            raise AssertionError(f"outbox rows inserted but not matched to an enqueue: {fresh}")
        if entries:
            await db.executemany(_INSERT_AUDIT, entries)
        return seq, digest

    async def _insert_outbox(self, rows: list[tuple[Any, ...]]) -> set[str] | None:
        """Insert every enqueued row in op order (a message id already there is skipped, as
        one enqueued twice in the batch); returns the message ids inserted, or None for all.

        Every row goes to SQLite, duplicates too, so the seqs are those of inserting one by one
        (a skipped row still uses up an AUTOINCREMENT value). Which rows went in is SQLite's
        word, not a guess: the rowcount says how many, and only when that is fewer than were
        enqueued are their ids read back, as the newest seqs (AUTOINCREMENT puts every new row
        above all the rows there are, and nothing else writes while the transaction is open).
        """
        if not rows:
            return None
        inserted = (await self._db.executemany(_INSERT_OUTBOX, rows)).rowcount
        if inserted == len(rows):
            return None  # each statement inserts at most one row, so every one did
        if inserted == 0:
            return set()
        if not all(isinstance(row[0], str) for row in rows):
            # SQLite keeps 5 as '5': an id that is not a str cannot be matched to its row
            raise TypeError("a message id enqueued in a batch with a repeated id is not a str")
        newest = await self._db.execute_fetchall(_NEWEST_OUTBOX_IDS, (inserted,))
        fresh = {str(r[0]) for r in newest}
        if len(fresh) != inserted:
            raise AssertionError(f"{inserted} outbox rows inserted, {len(fresh)} read back")
        return fresh

    # ------------------------------------------------------------------ reading

    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        async with self._lock:
            try:
                return list(await self._db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    async def get_state(self, key: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT value FROM state WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    async def all_state(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        rows = await self._fetch(
            "SELECT key, value FROM state WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return {str(k): json.loads(v) for k, v in rows}

    async def get_masterdata(self, kind: str, key: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            "SELECT value FROM masterdata WHERE kind = ? AND key = ?", (kind, key)
        )
        return json.loads(rows[0][0]) if rows else None

    async def journal_entry(self, message_id: str) -> bytes | None:
        """The payload of a posting sent earlier, by its message id."""
        rows = await self._fetch("SELECT payload FROM journal WHERE message_id = ?", (message_id,))
        return bytes(rows[0][0]) if rows else None

    async def outbox_batch(self, limit: int, after_seq: int = 0) -> list[OutboxRow]:
        """Waiting messages in order, after ``after_seq`` (committed ones only)."""
        rows = await self._fetch(
            "SELECT seq, message_id, topic, payload, created_at FROM outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [OutboxRow(int(a), str(b), str(c), bytes(d), str(e)) for a, b, c, d, e in rows]

    async def acknowledge(self, seqs: Sequence[int]) -> int:
        """Delete acknowledged messages; returns how many were still there."""
        return await self._delete_outbox("seq", seqs)

    async def acknowledge_ids(self, message_ids: Sequence[str]) -> int:
        """Delete messages by id (the MES acknowledged them); returns how many were there."""
        return await self._delete_outbox("message_id", message_ids)

    async def _delete_outbox(
        self, column: Literal["seq", "message_id"], keys: Sequence[Any]
    ) -> int:
        if not keys:
            return 0
        chunks = [list(keys[i : i + _DELETE_CHUNK]) for i in range(0, len(keys), _DELETE_CHUNK)]
        async with self._lock:
            try:
                if len(chunks) == 1:
                    # one statement is a transaction of its own (autocommit): all or nothing,
                    # and synced like BEGIN ... COMMIT, in one round trip instead of three
                    deleted = await self._delete_in(column, chunks[0])
                else:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        deleted = 0
                        for chunk in chunks:
                            deleted += await self._delete_in(column, chunk)
                        await self._db.execute("COMMIT")
                    except BaseException:  # cancellation included: never leave it open
                        await self._rollback()
                        raise
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc
        self.commits += 1
        return deleted

    async def _delete_in(self, column: Literal["seq", "message_id"], keys: list[Any]) -> int:
        """Delete the rows whose ``column`` is one of ``keys``; returns how many there were.

        The list is padded to a power of two with repeats of its last key (a repeat deletes
        nothing more), so a few statement texts serve every size: sqlite3 keeps the prepared
        statements of the last 128 texts, the commit's among them."""
        size = 1 << (len(keys) - 1).bit_length()
        padded = keys + keys[-1:] * (size - len(keys))
        return (await self._db.execute(_delete_outbox_sql(column, size), padded)).rowcount

    async def outbox_depth(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM outbox")
        return int(rows[0][0])

    async def oldest_pending(self) -> OutboxRow | None:
        batch = await self.outbox_batch(1)
        return batch[0] if batch else None

    @property
    def audit_head(self) -> tuple[int, str] | None:
        """The audit chain's last committed entry (seq, hash); None while it has none."""
        return (self._audit_seq, self._audit_hash) if self._audit_seq else None

    async def verify_head(self, seq: int, digest: str) -> AuditReport | None:
        """The chain still holds entry ``seq`` with hash ``digest`` (a copy of an earlier end,
        kept outside this file: the MES's last status); None when it does."""
        rows = await self._fetch("SELECT hash FROM audit WHERE seq = ?", (seq,))
        count = self._audit_seq
        if not rows:
            return AuditReport(
                False, count, seq, f"the chain has no entry {seq}, the end kept outside it"
            )
        if str(rows[0][0]) != digest:
            return AuditReport(
                False,
                count,
                seq,
                "is not the entry whose hash was kept outside the store: the chain was rewritten",
            )
        return None

    async def _check_audit_head(self) -> None:
        """At open: the chain must end where the last commit recorded it ended (meta
        ``audit_head``). If not, entries were removed or changed while the agent was not
        running: that is recorded for good (meta ``audit_break``, which every verification
        reports) before the agent goes on and the head moves past the evidence.

        The ends are read in one statement (one snapshot: a running agent committing meanwhile,
        with this ``status`` beside it, cannot make them disagree); only when they disagree is
        the write lock taken, and they are read again under it before the finding is written.
        An intact store is opened without a write."""
        if not _audit_cut(*next(iter(await self._db.execute_fetchall(_AUDIT_ENDS)))):
            return
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            last, head, broken = next(iter(await self._db.execute_fetchall(_AUDIT_ENDS)))
            if _audit_cut(last, head, broken):
                found = json.dumps(
                    {"recorded_head": head, "chain_ended_at": last or "0", "found_at": _now_iso()},
                    separators=(",", ":"),
                )
                await self._db.execute(_PUT_META, ("audit_break", found))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise

    async def verify_audit(self, outbox: bool = False) -> AuditReport:
        """Recompute the hash chain and name the first entry that does not fit; the chain must
        also end where the last commit recorded (no entry removed from its end). With
        ``outbox``, every message still waiting must match the digest its entry recorded.
        Everything is read in one read transaction: a consistent snapshot, whatever an agent
        running beside commits meanwhile."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN")
                try:
                    waiting = {
                        str(m): bytes(p)
                        for m, p in (
                            await self._db.execute_fetchall(
                                "SELECT message_id, payload FROM outbox"
                            )
                            if outbox
                            else []
                        )
                    }
                    entries = list(
                        await self._db.execute_fetchall(
                            "SELECT seq, at, kind, ref, payload_sha256, prev_hash, hash "
                            "FROM audit ORDER BY seq"
                        )
                    )
                    ends = list(await self._db.execute_fetchall(_AUDIT_ENDS))
                    _last, head, broken = ends[0]
                finally:
                    await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc
        recorded: dict[str, tuple[int, str]] = {}
        report, (count, last_seq, last_hash) = _verify_chain(entries, waiting, recorded)
        if report is None:
            report = _verify_end(count, last_seq, last_hash, head, broken)
        if report is None:
            report = _verify_waiting(waiting, recorded, count)
        return report or AuditReport(True, count)


def _audit_cut(last: str | None, head: str | None, broken: str | None) -> bool:
    """The chain ends short of its recorded end, and that is not on record yet."""
    return head is not None and broken is None and head != (last or f"0:{GENESIS}")


def _verify_chain(
    rows: Sequence[Any], waiting: Mapping[str, bytes], recorded: dict[str, tuple[int, str]]
) -> tuple[AuditReport | None, tuple[int, int, str]]:
    """The chain itself: (a broken entry's report or None, (entries, last seq, last hash))."""
    prev, expected_seq, count = GENESIS, 1, 0
    for seq, at, kind, ref, psha, prev_hash, digest in rows:
        count += 1
        reason = None
        if seq != expected_seq:
            missing = AuditReport(False, count, expected_seq, f"entry {expected_seq} is missing")
            return missing, (count, seq, digest)
        if prev_hash != prev:
            reason = "does not link to the entry before it"
        elif chain_hash(prev, seq, at, kind, ref, psha) != digest:
            reason = "its content does not match its hash"
        if reason is not None:
            return AuditReport(False, count, seq, reason), (count, seq, digest)
        if kind == "outbox" and ref in waiting:
            recorded[ref] = (seq, psha)
        prev, expected_seq = digest, seq + 1
    return None, (count, expected_seq - 1, prev)


def _verify_end(
    count: int, last_seq: int, last_hash: str, head: str | None, broken: str | None
) -> AuditReport | None:
    """The chain ends where the last commit recorded, and was never found cut short."""
    if broken is not None:
        found = json.loads(broken)
        head_seq = found["recorded_head"].split(":", 1)[0]
        return AuditReport(
            False,
            count,
            int(head_seq) if head_seq.isdigit() else None,
            f"on {found['found_at']} the chain ended at entry "
            f"{found['chain_ended_at'].split(':', 1)[0]}, not at entry {head_seq} as the last "
            "commit recorded: entries were removed or changed while the agent was stopped",
        )
    if head is not None and head != f"{last_seq}:{last_hash}":
        head_seq = head.split(":", 1)[0]
        return AuditReport(
            False,
            count,
            last_seq + 1 if head_seq.isdigit() and int(head_seq) > last_seq else last_seq,
            f"the chain ends at entry {last_seq}, but the last commit recorded entry "
            f"{head_seq} as its end: entries were removed from the end, or changed",
        )
    return None


def _verify_waiting(
    waiting: Mapping[str, bytes], recorded: Mapping[str, tuple[int, str]], count: int
) -> AuditReport | None:
    """Every message still waiting is what its audit entry recorded when it was committed."""
    for message_id, payload in waiting.items():
        entry = recorded.get(message_id)
        if entry is None:
            return AuditReport(False, count, None, f"outbox message {message_id} has no entry")
        if hashlib.sha256(payload).hexdigest() != entry[1]:
            return AuditReport(
                False,
                count,
                entry[0],
                f"outbox message {message_id} is not what this entry recorded: it was changed "
                "after it was committed",
            )
    return None


def _check_file(path: Path) -> None:
    """What SQLite would not refuse, or would silently "repair", is refused before SQLite is let
    near the file: not a file, empty, not SQLite, truncated, or a write-ahead log whose
    committed transactions SQLite would discard (docs/durability.md)."""
    where = f"store {str(path)!r}"
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise StoreError(f"{where} is {kind}, not a store file; {RECOVERY}")
    size = path.stat().st_size
    if size == 0:
        raise StoreError(
            f"{where} is empty (0 bytes): the agent creates a store whole, so an empty file is "
            f"a store that lost its content, never taken for a new one; {RECOVERY}"
        )
    with path.open("rb") as f:
        header = f.read(100)
    if header[: len(SQLITE_HEADER)] != SQLITE_HEADER[: len(header)] or len(header) < len(
        SQLITE_HEADER
    ):
        if header.startswith(SQLITE_HEADER[: len(header)]):
            raise StoreError(f"{where} is truncated inside its header ({size} bytes); {RECOVERY}")
        raise StoreError(f"{where} is not an SQLite database; {RECOVERY}")
    if len(header) < 100:
        raise StoreError(f"{where} is truncated inside its header ({size} bytes); {RECOVERY}")
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        _check_wal(wal)
        return  # the main file's size is the WAL's to settle (a checkpoint in progress)
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if size % page_size:
        raise StoreError(
            f"{where} is truncated mid-page: {size} bytes is not a whole number of "
            f"{page_size}-byte pages; {RECOVERY}"
        )
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and pages > size // page_size:
        raise StoreError(
            f"{where} is truncated: it holds {size // page_size} of its {pages} pages; {RECOVERY}"
        )


_WAL_MAGIC = {0x377F0682: "<", 0x377F0683: ">"}


def _wal_checksum(data: bytes, order: str, s1: int, s2: int) -> tuple[int, int]:
    for x0, x1 in struct.iter_unpack(f"{order}II", data):
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2


def _check_wal(wal: Path) -> None:
    """Refuse a write-ahead log SQLite would silently cut short of committed transactions.

    On opening, SQLite replays the WAL up to its first frame that fails its checksum and
    discards the rest: right for the torn tail a crash leaves (an uncommitted transaction), a
    silent loss when the bad frame is damage with committed transactions after it, or when the
    WAL header itself is garbage (every transaction in it). A WAL shorter than its header, a
    torn tail, and the frames of an earlier generation (other salts) are crash recovery."""
    where = f"write-ahead log {str(wal)!r}"
    data = wal.read_bytes()
    if len(data) < 32:
        return  # a header never completed: nothing was committed in it
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    order = _WAL_MAGIC.get(magic)
    valid_size = page_size >= 512 and page_size & (page_size - 1) == 0
    if order is None or not valid_size or _wal_checksum(data[:24], order, 0, 0) != (c1, c2):
        if len(data) >= 32 + 24 + 512:
            raise StoreError(
                f"{where} has a damaged header: SQLite would discard every transaction in it; "
                f"{RECOVERY}"
            )
        return
    frame = 24 + page_size
    seed = (c1, c2)  # each frame's checksum continues from the one stored before it
    bad: int | None = None  # the first frame SQLite would stop at
    for number, offset in enumerate(range(32, len(data) - frame + 1, frame), start=1):
        head = data[offset : offset + 24]
        commit, fsalt1, fsalt2, f1, f2 = struct.unpack(">4x5I", head)
        ours = (fsalt1, fsalt2) == (salt1, salt2)  # other salts: an older generation's frame
        valid = ours and _wal_checksum(head[:8] + data[offset + 24 : offset + frame], order, *seed)
        if valid != (f1, f2):
            bad = number if bad is None else bad
        elif bad is not None and commit:
            raise StoreError(
                f"{where} is damaged at frame {bad}: SQLite would silently discard the "
                f"committed transactions after it; {RECOVERY}"
            )
        seed = (f1, f2)


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    text = str(exc)
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "full" in text.lower():
        return StoreFullError(f"the disk holding store {str(path)!r} is full: {text}")
    return StoreError(f"store {str(path)!r}: {text}")
