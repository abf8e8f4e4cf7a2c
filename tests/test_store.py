"""The durable store against real SQLite files: schema, units of work, outbox, audit chain.

shared/DESIGN.md §2 (transactional outbox, group commit) and §3 (nothing lost or doubled, an
audit chain where a gap or an edit is detectable, a store that cannot be trusted is refused and
never replaced). Every check reads back what SQLite holds, through the store or through a
separate ``sqlite3`` connection on the same file.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from edge_agent.errors import StoreError
from edge_agent.store import GENESIS, SCHEMA_VERSION, Store, UnitOfWork, chain_hash

TOPIC = "acme/hamburg/creams/line-1/line1-edge/out/material-consumed"
AT = "2026-11-22T08:00:00.000Z"
TABLES = {"meta", "state", "masterdata", "outbox", "audit", "journal"}


# ---------------------------------------------------------------------------------- helpers


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


def sql(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a separate plain sqlite3 connection (committed), return its rows."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(query, params).fetchall()
        conn.commit()
    return rows


def payload(message_id: str) -> bytes:
    return json.dumps({"id": message_id, "qty": "12.500", "unit": "kg"}).encode()


def msg_unit(*message_ids: str) -> UnitOfWork:
    unit = UnitOfWork()
    for message_id in message_ids:
        unit.enqueue(message_id, TOPIC, payload(message_id), AT)
    return unit


def audit_rows(path: Path) -> list[tuple[Any, ...]]:
    return sql(
        path, "SELECT seq, at, kind, ref, payload_sha256, prev_hash, hash FROM audit ORDER BY seq"
    )


def outbox_ids(path: Path) -> list[str]:
    return [str(r[0]) for r in sql(path, "SELECT message_id FROM outbox ORDER BY seq")]


def files_in(directory: Path) -> dict[str, bytes | list[str]]:
    return {
        p.name: p.read_bytes() if p.is_file() else sorted(x.name for x in p.iterdir())
        for p in sorted(directory.iterdir())
    }


async def fill(path: Path, count: int = 300) -> None:
    """A store with enough rows to span many pages, closed (the WAL checkpointed into it)."""
    async with Store.open(path) as s:
        units = []
        for i in range(count):
            unit = msg_unit(f"msg-{i:05d}")
            unit.put_state(f"counter/{i:05d}", {"last": i})
            units.append(unit)
        await s.commit_units(units)
    assert not Path(f"{path}-wal").exists(), "the WAL must be checkpointed before damaging the file"


# ------------------------------------------------------------------- 1. creating, reopening


@pytest.mark.asyncio
async def test_new_store_has_the_schema_and_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    assert not path.exists()
    async with Store.open(path) as s:
        assert path.exists()
        # seen from a second connection while the store is open
        assert sql(path, "PRAGMA journal_mode") == [("wal",)]
        assert await s.outbox_depth() == 0
        assert (await s.verify_audit()).entries == 0
    tables = {str(r[0]) for r in sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables - {"sqlite_sequence"} == TABLES
    meta = dict(sql(path, "SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert meta["created_at"].endswith("+00:00")
    # WAL is a property of the file: it is still on after the store is closed
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.asyncio
async def test_reopening_keeps_state_masterdata_and_outbox(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    bom = {"material": "CREAM-50", "revision": "C", "components": [{"qty": "0.125", "uom": "kg"}]}
    async with Store.open(path) as s:
        async with s.transaction() as tx:
            tx.put_state("counter/line-1/good", {"last": 65535, "carry": "0.0004"})
            tx.put_masterdata("bom", "CREAM-50", bom)
            for i in range(3):
                tx.enqueue(f"m-{i}", TOPIC, payload(f"m-{i}"), AT)
        created_at = sql(path, "SELECT value FROM meta WHERE key = 'created_at'")
        before = await s.outbox_batch(10)
        await s.acknowledge([before[-1].seq])  # the highest seq is gone before reopening

    async with Store.open(path) as s:
        assert await s.get_state("counter/line-1/good") == {"last": 65535, "carry": "0.0004"}
        assert await s.get_masterdata("bom", "CREAM-50") == bom
        assert await s.outbox_batch(10) == before[:2]  # seq, id, topic, payload, created_at
        assert [r.payload for r in before[:2]] == [payload("m-0"), payload("m-1")]
        async with s.transaction() as tx:
            tx.enqueue("m-3", TOPIC, payload("m-3"), AT)
        rows = await s.outbox_batch(10)
        # a seq is never reused, not even that of an acknowledged row
        assert rows[-1].message_id == "m-3"
        assert rows[-1].seq > before[-1].seq
        assert (await s.verify_audit()).entries == 4
    assert sql(path, "SELECT value FROM meta WHERE key = 'created_at'") == created_at
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]


# ------------------------------------------------------------------------ 2. transaction()


@pytest.mark.asyncio
async def test_transaction_commits_on_exit(store: Store) -> None:
    commits = store.commits
    async with store.transaction() as tx:
        tx.put_state("order/4711", {"confirmed": "12"})
        tx.put_masterdata("material", "SUGAR", {"uom": "kg"})
        tx.enqueue("m-1", TOPIC, payload("m-1"), AT)
        tx.audit("command", "cmd-1", b'{"close": "4711"}', AT)
        # nothing is written before the block ends
        assert await store.get_state("order/4711") is None
        assert await store.outbox_depth() == 0
    assert store.commits == commits + 1
    assert await store.get_state("order/4711") == {"confirmed": "12"}
    assert await store.get_masterdata("material", "SUGAR") == {"uom": "kg"}
    assert [r.message_id for r in await store.outbox_batch(10)] == ["m-1"]
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == 2
    assert [r[2:4] for r in audit_rows(store.path)] == [("outbox", "m-1"), ("command", "cmd-1")]


class Boom(Exception):
    pass


@pytest.mark.asyncio
async def test_transaction_whose_body_raises_writes_nothing(store: Store) -> None:
    async with store.transaction() as tx:
        tx.put_state("order/4711", {"confirmed": "10"})
        tx.enqueue("m-0", TOPIC, payload("m-0"), AT)
    commits = store.commits

    async def failing_unit() -> None:
        async with store.transaction() as tx:
            tx.put_state("order/4711", {"confirmed": "99"})
            tx.put_state("order/4712", {"confirmed": "1"})
            tx.delete_state("order/4711")
            tx.put_masterdata("material", "SUGAR", {"uom": "kg"})
            tx.enqueue("m-1", TOPIC, payload("m-1"), AT)
            tx.audit("command", "cmd-1", b"{}", AT)
            raise Boom

    with pytest.raises(Boom):
        await failing_unit()

    assert store.commits == commits
    assert await store.all_state() == {"order/4711": {"confirmed": "10"}}
    assert await store.get_masterdata("material", "SUGAR") is None
    assert outbox_ids(store.path) == ["m-0"]
    assert len(audit_rows(store.path)) == 1
    # and the store carries on normally afterwards
    async with store.transaction() as tx:
        tx.enqueue("m-2", TOPIC, payload("m-2"), AT)
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == 2


# ------------------------------------------------------------------ 3. group commit of units


@pytest.mark.asyncio
async def test_commit_units_is_one_transaction_in_unit_order(store: Store) -> None:
    commits = store.commits
    units = []
    for i in range(50):
        unit = msg_unit(f"u{i:02d}-a", f"u{i:02d}-b")
        unit.put_state("engine/seq", {"seq": i})  # the last unit's value wins
        unit.audit("signal", f"sig-{i}", str(i).encode(), AT)
        units.append(unit)
    await store.commit_units(units)

    assert store.commits == commits + 1
    expected = [f"u{i:02d}-{x}" for i in range(50) for x in "ab"]
    rows = await store.outbox_batch(1000)
    assert [r.message_id for r in rows] == expected
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert await store.get_state("engine/seq") == {"seq": 49}
    refs = [str(r[3]) for r in audit_rows(store.path)]
    assert refs == [x for i in range(50) for x in (f"u{i:02d}-a", f"u{i:02d}-b", f"sig-{i}")]
    assert (await store.verify_audit()).ok


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("bad_payload", "error"),
    [
        pytest.param("not bytes", TypeError, id="str-payload-fails-after-its-insert"),
        pytest.param(None, StoreError, id="null-payload-fails-inside-sqlite"),
    ],
)
async def test_a_failing_op_rolls_back_every_unit_of_the_commit(
    store: Store, bad_payload: Any, error: type[Exception]
) -> None:
    await store.commit_units([msg_unit("before-1", "before-2")])
    audit_before = audit_rows(store.path)
    commits = store.commits

    units = [msg_unit(f"doomed-{i}") for i in range(5)]
    for i, unit in enumerate(units):
        unit.put_state(f"doomed/{i}", {"i": i})
        unit.put_masterdata("lot", f"L{i}", {"qty": "1"})
        unit.audit("signal", f"doomed-sig-{i}", b"x", AT)
    units[3].enqueue("doomed-bad", TOPIC, bad_payload, AT)  # mid-way: units 0-2 already applied
    with pytest.raises(error):
        await store.commit_units(units)

    assert store.commits == commits
    assert outbox_ids(store.path) == ["before-1", "before-2"]
    assert await store.all_state("doomed/") == {}
    assert await store.get_masterdata("lot", "L0") is None
    assert audit_rows(store.path) == audit_before

    # the in-memory audit position did not move: the next entries continue the chain
    await store.commit_units([msg_unit("after-1"), msg_unit("after-2")])
    report = await store.verify_audit()
    assert report.ok, report
    assert report.entries == 4
    assert [r[0] for r in audit_rows(store.path)] == [1, 2, 3, 4]
    assert outbox_ids(store.path) == ["before-1", "before-2", "after-1", "after-2"]


# ---------------------------------------------------------------- 4. idempotent enqueueing


@pytest.mark.asyncio
async def test_enqueuing_a_present_message_id_adds_no_row_and_no_audit_entry(
    store: Store,
) -> None:
    await store.commit_units([msg_unit("m-1", "m-2")])
    first = await store.outbox_batch(10)

    again = UnitOfWork()
    again.enqueue("m-1", f"{TOPIC}/other", b"a different payload", "2027-01-01T00:00:00.000Z")
    again.enqueue("m-3", TOPIC, payload("m-3"), AT)
    again.enqueue("m-3", TOPIC, payload("m-3"), AT)  # twice in the same unit, too
    await store.commit_units([again, msg_unit("m-2")])

    rows = await store.outbox_batch(10)
    assert [r.message_id for r in rows] == ["m-1", "m-2", "m-3"]
    assert rows[:2] == first  # the first copy is kept unchanged
    assert await store.outbox_depth() == 3
    assert [r[3] for r in audit_rows(store.path)] == ["m-1", "m-2", "m-3"]
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == 3


# ------------------------------------------------------------------ 5. paging, acknowledging


@pytest.mark.asyncio
async def test_outbox_batch_pages_in_seq_order(store: Store) -> None:
    ids = [f"m-{i:02d}" for i in range(10)]
    # in several commits, so seq order is not just one statement's order
    await store.commit_units([msg_unit(*ids[:4])])
    await store.commit_units([msg_unit(*ids[4:7]), msg_unit(*ids[7:])])

    pages, after = [], 0
    while page := await store.outbox_batch(3, after_seq=after):
        assert len(page) <= 3
        pages.append(page)
        after = page[-1].seq
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    rows = [r for p in pages for r in p]
    assert [r.message_id for r in rows] == ids
    assert [r.seq for r in rows] == sorted({r.seq for r in rows})
    assert all(r.topic == TOPIC and r.created_at == AT for r in rows)
    assert [r.payload for r in rows] == [payload(i) for i in ids]
    assert await store.outbox_batch(5, after_seq=rows[-1].seq) == []
    assert await store.oldest_pending() == rows[0]


@pytest.mark.asyncio
async def test_acknowledge_deletes_exactly_those_rows(store: Store) -> None:
    await store.commit_units([msg_unit(*(f"m-{i}" for i in range(6)))])
    rows = await store.outbox_batch(10)
    seqs = [r.seq for r in rows]
    assert await store.outbox_depth() == 6

    # two present rows and one seq that never existed
    assert await store.acknowledge([seqs[1], seqs[4], seqs[-1] + 100]) == 2
    assert await store.outbox_depth() == 4
    assert [r.message_id for r in await store.outbox_batch(10)] == ["m-0", "m-2", "m-3", "m-5"]
    # acknowledging the same rows again finds nothing to delete
    assert await store.acknowledge([seqs[1], seqs[4]]) == 0
    assert await store.outbox_depth() == 4
    assert await store.acknowledge([]) == 0

    assert await store.acknowledge(seqs) == 4
    assert await store.outbox_depth() == 0
    assert await store.oldest_pending() is None
    assert sql(store.path, "SELECT count(*) FROM outbox") == [(0,)]
    # acknowledging removes messages, never audit entries
    assert (await store.verify_audit()).entries == 6


# ----------------------------------------------------------------------------- 6. audit chain


@pytest.mark.asyncio
async def test_audit_chain_verifies_across_many_commits_and_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    for session in range(3):
        async with Store.open(path) as s:
            for c in range(10):
                unit = msg_unit(f"s{session}-c{c}-a", f"s{session}-c{c}-b")
                unit.audit("command", f"s{session}-cmd-{c}", b'{"reversal": true}', AT)
                await s.commit_units([unit, msg_unit(f"s{session}-c{c}-a")])  # a duplicate
                if c % 3 == 0:
                    await s.acknowledge([r.seq for r in await s.outbox_batch(2)])
            report = await s.verify_audit()
            assert report.ok, report
            assert report.entries == 30 * (session + 1)

    rows = audit_rows(path)
    assert [r[0] for r in rows] == list(range(1, 91))
    # recompute the chain independently, from the documented formula
    prev = "0" * 64
    assert prev == GENESIS
    for seq, at, kind, ref, payload_sha, prev_hash, digest in rows:
        assert prev_hash == prev
        encoded = json.dumps([prev, seq, at, kind, ref, payload_sha], separators=(",", ":"))
        assert digest == hashlib.sha256(encoded.encode()).hexdigest()
        if kind == "outbox":
            assert payload_sha == hashlib.sha256(payload(ref)).hexdigest()
        else:
            assert payload_sha == hashlib.sha256(b'{"reversal": true}').hexdigest()
        prev = digest
    # the first entry of each later session links to the last entry of the session before
    assert rows[30][5] == rows[29][6]
    assert rows[60][5] == rows[59][6]


TAMPERING = [
    pytest.param("UPDATE audit SET ref = 'forged' WHERE seq = 3", 3, id="edited-ref"),
    pytest.param(
        "UPDATE audit SET payload_sha256 = '" + "ab" * 32 + "' WHERE seq = 3", 3, id="edited-sha"
    ),
    pytest.param("UPDATE audit SET kind = 'command' WHERE seq = 5", 5, id="edited-kind"),
    pytest.param("UPDATE audit SET at = '2020-01-01T00:00:00.000Z' WHERE seq = 2", 2, id="at"),
    pytest.param("DELETE FROM audit WHERE seq = 3", 3, id="deleted-middle-entry"),
    pytest.param("DELETE FROM audit WHERE seq = 1", 1, id="deleted-first-entry"),
    pytest.param("UPDATE audit SET prev_hash = '" + "0" * 64 + "' WHERE seq = 4", 4, id="prev"),
    pytest.param("UPDATE audit SET hash = '" + "f" * 64 + "' WHERE seq = 4", 4, id="hash"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("tamper", "first_broken"), TAMPERING)
async def test_audit_tampering_is_detected_at_the_first_broken_entry(
    tmp_path: Path, tamper: str, first_broken: int
) -> None:
    path = tmp_path / "agent.db"
    async with Store.open(path) as s:
        for i in range(6):
            await s.commit_units([msg_unit(f"m-{i}")])
        assert (await s.verify_audit()).ok
    sql(path, tamper)  # a separate connection, as anyone with the file could
    async with Store.open(path) as s:
        report = await s.verify_audit()
    assert not report.ok
    assert report.first_broken_seq == first_broken
    assert report.reason


@pytest.mark.asyncio
async def test_audit_tampering_while_the_store_is_open_is_detected(store: Store) -> None:
    for i in range(4):
        await store.commit_units([msg_unit(f"m-{i}")])
    sql(store.path, "UPDATE audit SET ref = 'm-9' WHERE seq = 2")
    report = await store.verify_audit()
    assert not report.ok
    assert report.first_broken_seq == 2


# ------------------------------------------------------------------------------ 7. refusals


async def not_sqlite(path: Path) -> str:
    path.write_text("line,order,qty\n1,4711,12.5\n" * 50)
    return "is not an SQLite database"


async def newer_schema(path: Path) -> str:
    async with Store.open(path) as s:
        await s.commit_units([msg_unit("m-1")])
    sql(path, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    return f"schema version {SCHEMA_VERSION + 1}, newer"


async def foreign_db(path: Path) -> str:
    sql(path, "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name TEXT)")
    sql(path, "INSERT INTO widgets (name) VALUES ('sprocket')")
    return "missing tables audit, masterdata, meta, outbox, state"


async def partial_store(path: Path) -> str:
    async with Store.open(path) as s:
        await s.commit_units([msg_unit("m-1")])
    sql(path, "DROP TABLE audit")
    sql(path, "DROP TABLE outbox")
    return "missing tables audit, outbox"


def assert_really_damaged(path: Path) -> None:
    """Plain SQLite must agree that the file is damaged, or the test proves nothing."""
    try:
        verdict = sql(path, "PRAGMA integrity_check")
    except sqlite3.DatabaseError:
        return
    assert verdict != [("ok",)]


async def garbage_page(path: Path) -> str:
    """The root page of the outbox table overwritten with 0xFF (not a valid b-tree page)."""
    await fill(path)
    page_size = sql(path, "PRAGMA page_size")[0][0]
    root = sql(path, "SELECT rootpage FROM sqlite_master WHERE name = 'outbox'")[0][0]
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    assert_really_damaged(path)
    return "damaged|integrity check"


async def index_mismatch(path: Path) -> str:
    """One state key changed in place: the table row and its primary-key index disagree.

    The file stays structurally readable, so it is PRAGMA integrity_check that finds it.
    """
    await fill(path)
    raw = bytearray(path.read_bytes())
    key = b"counter/00150"
    assert raw.count(key) == 2  # the table row and its index entry
    at = raw.find(key)
    raw[at : at + len(key)] = b"counter/0015X"
    path.write_bytes(bytes(raw))
    assert_really_damaged(path)
    return "fails its integrity check"


def truncated_at(
    offset: Callable[[int, int], int], message: str
) -> Callable[[Path], Awaitable[str]]:
    """A store cut at ``offset(size, page_size)`` bytes (a copy that stopped, a lost tail)."""

    async def make(path: Path) -> str:
        await fill(path)
        page_size = sql(path, "PRAGMA page_size")[0][0]
        os.truncate(path, offset(path.stat().st_size, page_size))
        return message

    return make


async def garbage_over_page(path: Path, page: int) -> str:
    await fill(path)
    page_size = sql(path, "PRAGMA page_size")[0][0]
    with path.open("r+b") as f:
        f.seek((page - 1) * page_size + (100 if page == 1 else 0))  # page 1: after the header
        f.write(random.Random(page).randbytes(page_size - (100 if page == 1 else 0)))
    assert_really_damaged(path)
    return "is damaged: database disk image is malformed"


async def empty_file(path: Path) -> str:
    path.write_bytes(b"")
    return r"is empty \(0 bytes\)"


async def directory(path: Path) -> str:
    path.mkdir()
    (path / "inside").write_text("something")
    return "is a directory"


async def crashed_with_wal(path: Path) -> Path:
    """A store as a kill -9 leaves it: committed transactions still in its -wal (copied while
    the store is open, so nothing was checkpointed)."""
    source = path.parent / "running"
    source.mkdir()
    async with Store.open(source / "agent.db") as s:
        await s.commit_units([msg_unit(*(f"a-{i}" for i in range(50)))])
        for i in range(20):
            await s.commit_units([msg_unit(f"b-{i}")])
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{source / 'agent.db'}{suffix}", f"{path}{suffix}")
    shutil.rmtree(source)
    return Path(f"{path}-wal")


async def wal_header_garbage(path: Path) -> str:
    wal = await crashed_with_wal(path)
    with wal.open("r+b") as f:
        f.write(random.Random(1).randbytes(32))
    return "write-ahead log .*-wal' has a damaged header"


async def wal_frame_garbage(path: Path) -> str:
    wal = await crashed_with_wal(path)
    with wal.open("r+b") as f:
        f.seek(wal.stat().st_size // 3)
        f.write(random.Random(2).randbytes(4096))
    return "write-ahead log .*-wal' is damaged at frame"


BadFile = Callable[[Path], Awaitable[str]]
BAD_FILES = [
    pytest.param(
        truncated_at(lambda size, page: 50, "truncated inside its header"), id="cut-in-header"
    ),
    pytest.param(
        truncated_at(lambda size, page: 3 * page + 1000, "truncated mid-page"), id="cut-mid-page"
    ),
    pytest.param(
        truncated_at(lambda size, page: 3 * page, "truncated: it holds 3 of its"),
        id="cut-at-page-boundary",
    ),
    pytest.param(
        truncated_at(lambda size, page: size - page, "truncated: it holds"), id="last-page-lost"
    ),
    pytest.param(lambda p: garbage_over_page(p, 6), id="garbage-over-a-middle-page"),
    pytest.param(lambda p: garbage_over_page(p, 1), id="garbage-after-the-header"),
    pytest.param(lambda p: garbage_over_page(p, 2), id="garbage-over-page-2"),
    pytest.param(empty_file, id="zero-length"),
    pytest.param(directory, id="a-directory"),
    pytest.param(wal_header_garbage, id="wal-header-garbage"),
    pytest.param(wal_frame_garbage, id="wal-frame-garbage"),
    pytest.param(not_sqlite, id="not-sqlite"),
    pytest.param(newer_schema, id="newer-schema"),
    pytest.param(foreign_db, id="foreign-db"),
    pytest.param(partial_store, id="partial-store"),
    pytest.param(garbage_page, id="garbage-page"),
    pytest.param(index_mismatch, id="index-mismatch"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("make_bad", BAD_FILES)
async def test_untrustworthy_file_is_refused_naming_the_file(
    tmp_path: Path, make_bad: BadFile
) -> None:
    path = tmp_path / "agent.db"
    expected = await make_bad(path)
    with pytest.raises(StoreError, match=expected) as caught:
        async with Store.open(path):
            pytest.fail("an untrustworthy store was opened")
    assert str(path) in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("make_bad", BAD_FILES)
async def test_refused_file_is_left_untouched(tmp_path: Path, make_bad: BadFile) -> None:
    path = tmp_path / "agent.db"
    await make_bad(path)
    before = files_in(tmp_path)
    assert set(before) <= {"agent.db", "agent.db-wal"}
    for _ in range(2):  # a restart loop must not wear it down either
        with pytest.raises(StoreError):
            async with Store.open(path):
                pass
    assert files_in(tmp_path) == before


@pytest.mark.asyncio
async def test_a_torn_wal_tail_is_crash_recovery_not_damage(tmp_path: Path) -> None:
    """The tail of the WAL cut off (a write torn by a crash): SQLite drops the incomplete last
    transaction and keeps every one before it; the agent opens the store."""
    path = tmp_path / "agent.db"
    wal = await crashed_with_wal(path)
    os.truncate(wal, wal.stat().st_size - 1000)
    async with Store.open(path) as s:
        assert await s.outbox_depth() == 69  # all but the torn last commit
        assert (await s.verify_audit()).ok


@pytest.mark.asyncio
async def test_a_new_store_is_never_left_as_an_empty_file(tmp_path: Path) -> None:
    """The store is built beside its path and renamed in: a start interrupted while creating
    it leaves no empty file at the path (which the next start would refuse)."""
    path = tmp_path / "agent.db"
    (tmp_path / "agent.db.creating").write_bytes(b"")  # an interrupted earlier creation
    async with Store.open(path) as s:
        assert await s.outbox_depth() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.db"]
    async with Store.open(path) as s:  # and it opens as the agent's store
        assert await s.outbox_depth() == 0


@pytest.mark.asyncio
async def test_unreadable_schema_version_is_refused_with_store_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    async with Store.open(path):
        pass
    sql(path, "UPDATE meta SET value = 'one' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version") as caught:
        async with Store.open(path):
            pass
    assert str(path) in str(caught.value)


# --------------------------------------------------------------------------- 8. concurrency


@pytest.mark.asyncio
async def test_committer_and_acknowledger_run_concurrently(store: Store) -> None:
    commits, per_unit = 60, 3
    writing = True
    delivered: list[str] = []
    seqs: list[int] = []
    rounds_while_writing = 0

    async def committer() -> None:
        nonlocal writing
        for c in range(commits):
            await store.commit_units(
                [msg_unit(*(f"c{c:03d}-u{u}-{m}" for m in range(per_unit))) for u in range(2)]
            )
        writing = False

    async def acknowledger() -> None:
        nonlocal rounds_while_writing
        while True:
            was_writing = writing
            batch = await store.outbox_batch(7)
            if not batch:
                if not was_writing:
                    return
                await asyncio.sleep(0)
                continue
            assert await store.acknowledge([r.seq for r in batch]) == len(batch)
            delivered.extend(r.message_id for r in batch)
            seqs.extend(r.seq for r in batch)
            rounds_while_writing += was_writing

    async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
        tg.create_task(committer())
        tg.create_task(acknowledger())

    assert rounds_while_writing > 0  # the two really overlapped
    assert delivered == [
        f"c{c:03d}-u{u}-{m}" for c in range(commits) for u in range(2) for m in range(per_unit)
    ]
    assert seqs == sorted(set(seqs))
    assert await store.outbox_depth() == 0
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == commits * 2 * per_unit


@pytest.mark.asyncio
async def test_reader_never_sees_rows_of_a_commit_that_rolls_back(store: Store) -> None:
    rounds = 5
    doomed_in_flight = False
    writing = True
    polls_during_doomed = 0
    seen: set[str] = set()

    async def writer() -> None:
        nonlocal doomed_in_flight, writing
        for r in range(rounds):
            doomed = [msg_unit(*(f"doomed-{r}-{u}-{i}" for i in range(40))) for u in range(3)]
            for u, unit in enumerate(doomed):
                unit.put_state(f"doomed/{r}/{u}", {"r": r})
            doomed[-1].enqueue(f"doomed-{r}-bad", TOPIC, "not bytes", AT)  # fails last
            doomed_in_flight = True
            with pytest.raises(TypeError):
                await store.commit_units(doomed)
            doomed_in_flight = False
            await store.commit_units([msg_unit(f"kept-{r}-{i}") for i in range(3)])
        writing = False

    async def reader() -> None:
        nonlocal polls_during_doomed
        while writing:
            during = doomed_in_flight
            rows = await store.outbox_batch(10_000)
            state = await store.all_state("doomed/")
            depth = await store.outbox_depth()
            seen.update(r.message_id for r in rows)
            assert not [r.message_id for r in rows if r.message_id.startswith("doomed")]
            assert state == {}
            assert depth <= 3 * rounds  # 120 doomed rows per round would show here
            polls_during_doomed += during
            await asyncio.sleep(0)

    async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        tg.create_task(reader())

    assert polls_during_doomed > 0  # the reader did poll while a doomed commit was under way
    assert not [m for m in seen if m.startswith("doomed")]
    kept = [f"kept-{r}-{i}" for r in range(rounds) for i in range(3)]
    assert outbox_ids(store.path) == kept
    report = await store.verify_audit()
    assert report.ok, report
    assert report.entries == len(kept)


@pytest.mark.asyncio
async def test_two_concurrent_committers_both_succeed(store: Store) -> None:
    async def committer(name: str) -> None:
        for i in range(10):
            await store.commit_units([msg_unit(f"{name}-{i}")])

    async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
        tg.create_task(committer("engine"))
        tg.create_task(committer("commands"))

    assert await store.outbox_depth() == 20
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == 20


@pytest.mark.asyncio
async def test_a_failed_acknowledge_leaves_the_store_usable(store: Store) -> None:
    await store.commit_units([msg_unit("m-1", "m-2")])
    first = (await store.outbox_batch(1))[0].seq
    with pytest.raises(StoreError):
        await store.acknowledge([first, object()])  # type: ignore[list-item]
    assert await store.outbox_depth() == 2  # a failed acknowledge deletes nothing
    await store.commit_units([msg_unit("m-3")])
    assert await store.outbox_depth() == 3


# ---------------------------------------------------------------- 9. state and master data


@pytest.mark.asyncio
async def test_state_round_trips_json_and_filters_by_literal_prefix(store: Store) -> None:
    values: dict[str, dict[str, Any]] = {
        "counter/line-1/good": {"last": 65535, "width": 16, "carry": "0.0004", "ok": True},
        "counter/line-1/scrap": {"last": 0, "seen": [1, 2, 3], "note": None},
        "counter_x": {"not": "a counter/ key"},
        "counterAB": {"also": "not"},
        "order/4711": {"consumed": {"SUGAR": "12.500 kg"}, "name": "Crème brûlée ✓"},
        "Ä/1": {"umlaut": "ä"},
        "Ä/2": {"umlaut": "ö"},
    }
    async with store.transaction() as tx:
        for key, value in values.items():
            tx.put_state(key, value)

    for key, value in values.items():
        assert await store.get_state(key) == value
    assert await store.get_state("counter/line-2/good") is None
    assert await store.all_state() == values
    assert list(await store.all_state()) == sorted(values)
    assert list(await store.all_state("counter/")) == [
        "counter/line-1/good",
        "counter/line-1/scrap",
    ]
    # prefixes are literal: '_' and '%' are not wildcards, non-ASCII counts in characters
    assert list(await store.all_state("counter_")) == ["counter_x"]
    assert await store.all_state("counter%") == {}
    assert list(await store.all_state("Ä/")) == ["Ä/1", "Ä/2"]
    assert await store.all_state("nothing/") == {}

    async with store.transaction() as tx:
        tx.put_state("counter/line-1/good", {"last": 3, "width": 16})  # replaced, not merged
        tx.delete_state("counter/line-1/scrap")
        tx.delete_state("never/existed")
    assert await store.get_state("counter/line-1/good") == {"last": 3, "width": 16}
    assert await store.get_state("counter/line-1/scrap") is None
    assert list(await store.all_state("counter/")) == ["counter/line-1/good"]
    # state writes are not audit entries
    assert (await store.verify_audit()).entries == 0


@pytest.mark.asyncio
async def test_masterdata_round_trips_json_per_kind_and_key(store: Store) -> None:
    bom = {
        "material": "CREAM-50",
        "revision": "C",
        "base": {"qty": "100", "uom": "kg"},
        "components": [{"material": "SUGAR", "qty": "12.5", "uom": "kg", "scrap": "0.02"}],
    }
    async with store.transaction() as tx:
        tx.put_masterdata("bom", "CREAM-50", bom)
        tx.put_masterdata("material", "CREAM-50", {"uom": "kg", "precision": 3})
    assert await store.get_masterdata("bom", "CREAM-50") == bom
    assert await store.get_masterdata("material", "CREAM-50") == {"uom": "kg", "precision": 3}
    assert await store.get_masterdata("bom", "SUGAR") is None
    assert await store.get_masterdata("lot", "CREAM-50") is None

    async with store.transaction() as tx:
        tx.put_masterdata("bom", "CREAM-50", {"material": "CREAM-50", "revision": "D"})
    assert await store.get_masterdata("bom", "CREAM-50") == {
        "material": "CREAM-50",
        "revision": "D",
    }
    assert await store.get_masterdata("material", "CREAM-50") == {"uom": "kg", "precision": 3}
    assert sql(store.path, "SELECT count(*) FROM masterdata") == [(2,)]


@pytest.mark.asyncio
async def test_a_schema_1_store_gains_the_postings_journal(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    async with Store.open(path) as s, s.transaction() as tx:
        tx.put_state("engine", {"sequence": 7})
    sql(path, "DROP TABLE journal")
    sql(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    async with Store.open(path) as s:
        assert await s.get_state("engine") == {"sequence": 7}
        async with s.transaction() as tx:
            tx.journal("m-1", "WO-7", b'{"x": 1}', "2026-11-23T07:00:00.000Z")
        assert await s.journal_entry("m-1") == b'{"x": 1}'
        assert await s.journal_entry("m-2") is None
    assert dict(sql(path, "SELECT key, value FROM meta"))["schema_version"] == str(SCHEMA_VERSION)


# ------------------------------------------------- 10. a batched commit is the per-op commit


class PerOpStore:
    """The reference: every op its own statement, in op order, on a plain sqlite3 connection;
    an enqueue gets an audit entry when its own INSERT inserted a row (rowcount 1). The way the
    store committed before it batched per table; kept here, small enough to read at a glance.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.seq, self.head = 0, GENESIS
        self.repeats = 0  # enqueues of a message id the outbox held already

    def commit(self, units: list[UnitOfWork]) -> str | None:
        """Commit all units or nothing; returns the kind of error that stopped it, if any."""
        seq, head = self.seq, self.head
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for unit in units:
                for op, args in unit.ops:
                    seq, head = self.apply(op, args, seq, head)
        except (sqlite3.Error, TypeError) as exc:
            self.db.execute("ROLLBACK")
            return "store" if isinstance(exc, sqlite3.Error) else "type"
        self.db.execute("COMMIT")
        self.seq, self.head = seq, head
        return None

    def apply(self, op: str, args: tuple[Any, ...], seq: int, head: str) -> tuple[int, str]:
        db = self.db
        if op == "state":
            db.execute(
                "INSERT INTO state VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                args,
            )
        elif op == "delete_state":
            db.execute("DELETE FROM state WHERE key = ?", args)
        elif op == "masterdata":
            db.execute(
                "INSERT INTO masterdata VALUES (?, ?, ?) "
                "ON CONFLICT(kind, key) DO UPDATE SET value = excluded.value",
                args,
            )
        elif op == "enqueue":
            cursor = db.execute(
                "INSERT INTO outbox (message_id, topic, payload, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(message_id) DO NOTHING",
                args,
            )
            if cursor.rowcount == 1:
                message_id, _topic, body, at = args
                return self.chain(seq, head, at, "outbox", message_id, sha(body))
            self.repeats += 1
        elif op == "journal":
            db.execute("INSERT OR IGNORE INTO journal VALUES (?, ?, ?, ?)", args)
        else:
            assert op == "audit"
            kind, ref, payload_sha, at = args
            return self.chain(seq, head, at, kind, ref, payload_sha)
        return seq, head

    def chain(
        self, seq: int, prev: str, at: str, kind: str, ref: str, payload_sha: str
    ) -> tuple[int, str]:
        seq += 1
        encoded = json.dumps([prev, seq, at, kind, ref, payload_sha], separators=(",", ":"))
        digest = sha(encoded.encode())
        self.db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, at, kind, ref, payload_sha, prev, digest),
        )
        return seq, digest

    def acknowledge(self, column: str, keys: list[Any]) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        deleted = self.db.executemany(
            f"DELETE FROM outbox WHERE {column} = ?", [(k,) for k in keys]
        ).rowcount
        self.db.execute("COMMIT")
        return deleted


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the store holds (meta aside: its created_at and store_id differ by design)."""
    tables = ["state", "masterdata", "outbox", "journal", "audit", "sqlite_sequence"]
    return {t: sql(path, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}


# small pools, so keys, message ids and refs repeat within a unit, a batch and across batches
KEYS = ["engine", "lots", "order/4711", "wc/1"]
IDS = [f"m-{i}" for i in range(6)]
OPS = st.one_of(
    st.tuples(st.just("state"), st.sampled_from(KEYS), st.integers(0, 3)),
    st.tuples(st.just("delete_state"), st.sampled_from(KEYS)),
    st.tuples(st.just("masterdata"), st.sampled_from(["bom", "lot"]), st.sampled_from("xy")),
    st.tuples(st.just("enqueue"), st.sampled_from(IDS), st.integers(0, 2)),
    st.tuples(st.just("journal"), st.sampled_from(IDS), st.integers(0, 2)),
    st.tuples(st.just("audit"), st.sampled_from(["command", "signal"]), st.sampled_from(IDS)),
)
#: a payload SQLite refuses (NOT NULL: a StoreError) or hashlib refuses (str: a TypeError)
POISON = st.tuples(st.sampled_from([None, "not bytes"]), st.sampled_from([*IDS, "new"]))
BATCH = st.tuples(
    st.lists(st.lists(OPS, max_size=8), min_size=1, max_size=6), st.none() | POISON, st.randoms()
)
ACK = st.tuples(st.sampled_from(["seq", "message_id"]), st.lists(st.integers(0, 9), max_size=5))


def build(spec: tuple[Any, ...], n: int) -> tuple[str, tuple[Any, ...]]:
    """One op (spec from OPS); ``n`` is unique to it, so which copy of a repeated key or
    message id was kept, and in what order, shows in the rows and in the audit chain."""
    unit = UnitOfWork()
    match spec:
        case ("state", key, v):
            unit.put_state(key, {"v": v, "op": n})
        case ("delete_state", key):
            unit.delete_state(key)
        case ("masterdata", kind, key):
            unit.put_masterdata(kind, key, {"op": n})
        case ("enqueue", message_id, v):
            unit.enqueue(message_id, f"{TOPIC}/{v}", f"{message_id}/{v}/{n}".encode(), f"at-{n}")
        case ("journal", message_id, v):
            unit.journal(message_id, f"WO-{v}", f"{message_id}/{n}".encode(), f"at-{n}")
        case ("audit", kind, ref):
            unit.audit(kind, ref, f"{kind}/{ref}/{n}".encode(), f"at-{n}")
    return unit.ops[0]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(BATCH, st.none() | ACK), min_size=1, max_size=5))
def test_a_batched_commit_writes_what_committing_op_by_op_writes(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[Any, ...]]
) -> None:
    """Random units (keys, message ids and refs repeated inside a unit, a batch and across
    batches; puts and deletes of one key interleaved; batches that fail; acknowledgements that
    free message ids to be enqueued again): the store's batched commit leaves the same rows,
    the same outbox seqs and the same audit chain as the per-op reference, and fails when and
    how it fails."""
    directory = tmp_path_factory.mktemp("batch")
    asyncio.run(compare_with_per_op(directory, steps))


async def compare_with_per_op(directory: Path, steps: list[tuple[Any, ...]]) -> None:
    async with Store.open(directory / "reference.db"):
        pass  # the same schema, applied to by hand
    reference = PerOpStore(directory / "reference.db")
    made = itertools.count()
    try:
        async with Store.open(directory / "agent.db") as store:
            for batch, ack in steps:
                await commit_both(store, reference, batch, made)
                if ack is not None:
                    await acknowledge_both(store, reference, ack)
            report = await store.verify_audit()
            assert report.ok, report
    finally:
        reference.db.close()


def same_content(store: Store, reference: PerOpStore) -> None:
    assert content(store.path) == content(reference.path)
    assert (store._audit_seq, store._audit_hash) == (reference.seq, reference.head)


async def commit_both(
    store: Store, reference: PerOpStore, batch: tuple[Any, ...], made: Iterator[int]
) -> None:
    specs, poison, rnd = batch
    units = []
    for unit_specs in specs:
        unit = UnitOfWork()
        unit.ops = [build(spec, next(made)) for spec in unit_specs]
        units.append(unit)
    if poison is not None:  # anywhere in any unit
        body, message_id = poison
        ops = rnd.choice(units).ops
        ops.insert(rnd.randint(0, len(ops)), ("enqueue", (message_id, TOPIC, body, "at")))
    repeats = reference.repeats
    expected = reference.commit(units)
    event(f"commit failed: {expected}")
    event(f"an enqueued message id was there already: {reference.repeats > repeats}")
    error = None
    try:
        await store.commit_units(units)
    except StoreError:
        error = "store"
    except TypeError:
        error = "type"
    assert error == expected
    same_content(store, reference)


async def acknowledge_both(store: Store, reference: PerOpStore, ack: tuple[Any, ...]) -> None:
    column, picks = ack  # rows picked by position, repeats included, and one never there
    rows = sql(store.path, f"SELECT {column} FROM outbox ORDER BY seq")
    keys = [rows[i % len(rows)][0] if rows else i for i in picks]
    keys += [10_000] if column == "seq" else ["never-enqueued"]
    expected = reference.acknowledge(column, keys)
    event(f"acknowledged by {column}: {'some' if expected else 'none'}")
    acknowledge = store.acknowledge if column == "seq" else store.acknowledge_ids
    assert await acknowledge(keys) == expected
    same_content(store, reference)


@pytest.mark.asyncio
async def test_a_commit_makes_as_many_round_trips_for_500_units_as_for_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call on the aiosqlite connection is a hop to its thread and back: a commit makes
    one per table it writes, not one per op (which capped grouped commits at ~6 % of raw
    sqlite3)."""
    calls: list[str] = []
    for name in ("execute", "executemany", "execute_fetchall"):
        method = getattr(store._db, name)

        def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
            calls.append(_name)
            return _method(*args)

        monkeypatch.setattr(store._db, name, counted)

    def units(count: int, first: int) -> list[UnitOfWork]:
        made = []
        for i in range(first, first + count):
            unit = msg_unit(f"m-{i}")
            unit.put_state("engine", {"sequence": i})
            unit.put_masterdata("document", f"d-{i % 7}", {"i": i})
            unit.journal(f"m-{i}", "WO-1", payload(f"m-{i}"), AT)
            unit.audit("command", f"cmd-{i}", b"{}", AT)
            made.append(unit)
        return made

    await store.commit_units(units(1, 0))
    one = list(calls)
    calls.clear()
    await store.commit_units(units(500, 1))
    # BEGIN, state, masterdata, outbox, journal, audit, the chain's head (meta), COMMIT
    assert calls == one == ["execute"] + ["executemany"] * 5 + ["execute", "execute"]
    calls.clear()
    await store.commit_units([*units(250, 501), *units(250, 1)])  # half of them repeats
    # and the ids SQLite inserted read back, once
    assert calls == [
        "execute",
        *["executemany"] * 3,
        "execute_fetchall",
        *["executemany"] * 2,
        "execute",
        "execute",
    ]
    # new units: an outbox and a command entry; repeats: the command entry only
    assert (await store.verify_audit()).entries == 2 * 501 + 2 * 250 + 250


@example(texts=["\ud800", "Crème ✓", '"\\/', "\x00\x1f\x7f", "\U0001f600"], seq=2**63 - 1)
@given(
    texts=st.lists(st.text(st.characters(exclude_categories=())), min_size=5, max_size=5),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_chain_hash_is_the_documented_formula(texts: list[str], seq: int) -> None:
    """The hash is ``sha256(json([prev_hash, seq, at, kind, ref, payload_sha256]))`` with
    compact separators, for any text (non-ASCII, control characters, lone surrogates)."""
    prev, at, kind, ref, payload_sha = texts
    encoded = json.dumps([prev, seq, at, kind, ref, payload_sha], separators=(",", ":"))
    assert chain_hash(prev, seq, at, kind, ref, payload_sha) == sha(encoded.encode())


@pytest.mark.asyncio
async def test_a_message_id_not_a_str_fails_a_batch_that_repeats_an_id(store: Store) -> None:
    """Which rows a batch inserted is read back by message id, and SQLite keeps the id 5 as
    '5': such an id (the annotation says str) cannot be matched, so that commit fails whole
    rather than chain the wrong row. (Without a repeated id nothing needs matching.)"""
    await store.commit_units([msg_unit("m-1")])
    unit = msg_unit("m-1", "m-2")
    unit.enqueue(5, TOPIC, payload("5"), AT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a str"):
        await store.commit_units([unit])
    assert outbox_ids(store.path) == ["m-1"]
    unit = msg_unit("m-2")
    unit.enqueue(5, TOPIC, payload("5"), AT)  # type: ignore[arg-type]
    await store.commit_units([unit])
    assert outbox_ids(store.path) == ["m-1", "m-2", "5"]
    assert (await store.verify_audit()).entries == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("column", ["seq", "message_id"])
async def test_acknowledging_more_keys_than_one_statement_takes_is_one_transaction(
    store: Store, column: str
) -> None:
    """Past 512 keys the deletes go in several statements inside one transaction: repeats
    (across statements too) and absent keys are counted once and not at all, and a key that
    fails in a later statement leaves every row there."""
    await store.commit_units([msg_unit(*(f"m-{i:04d}" for i in range(1200)))])
    rows = await store.outbox_batch(2000)
    keys = [r.seq if column == "seq" else r.message_id for r in rows]
    acknowledge = store.acknowledge if column == "seq" else store.acknowledge_ids
    absent = 10**6 if column == "seq" else "never-enqueued"

    with pytest.raises(StoreError):
        await acknowledge([*keys[:700], object()])  # in the second statement
    assert await store.outbox_depth() == 1200

    wanted = [*keys[:700], keys[0], keys[600], absent, keys[3]]
    assert await acknowledge(wanted) == 700
    assert [r.message_id for r in await store.outbox_batch(2000)] == [
        r.message_id for r in rows[700:]
    ]
    assert await acknowledge(keys) == 500
    assert await store.outbox_depth() == 0


@pytest.mark.asyncio
async def test_an_acknowledgement_is_one_round_trip(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to 512 keys are deleted with one statement, its own transaction in autocommit mode
    (BEGIN IMMEDIATE, the deletes and COMMIT were three hops to aiosqlite's thread)."""
    await store.commit_units([msg_unit(*(f"m-{i}" for i in range(600)))])
    seqs = [r.seq for r in await store.outbox_batch(1000)]
    statements: list[str] = []
    execute = store._db.execute

    def counted(sql: str, *args: Any) -> Any:
        statements.append(sql.partition(" (")[0])
        return execute(sql, *args)

    monkeypatch.setattr(store._db, "execute", counted)
    assert await store.acknowledge(seqs[:3]) == 3
    assert await store.acknowledge_ids(["m-3", "m-3", "m-4"]) == 2
    assert await store.acknowledge(seqs[5:517]) == 512
    assert statements == [
        "DELETE FROM outbox WHERE seq IN",
        "DELETE FROM outbox WHERE message_id IN",
        "DELETE FROM outbox WHERE seq IN",
    ]
    assert await store.outbox_depth() == 600 - 517
