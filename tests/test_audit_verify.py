"""``edge-agent audit verify``: the hash-chained audit log, and each kind of tampering caught.

Each test edits a real store file with sqlite3, as someone with access to the line PC could, and
checks that the verification names what was done. Each fails when its protection is removed:
the chain's hashes (an edited entry), its sequence (a removed entry), the recorded head (the end
cut off), the break kept across a restart (cut off, then the agent ran on), the outbox check (a
waiting message edited).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.store import Store, UnitOfWork, chain_hash
from tests.test_daemon import runnable, write_config

AT = "2026-11-29T06:00:00.000Z"


async def _commits(db: Path, first: int, n: int) -> None:
    """``n`` commits, each one queued message and one applied command: 2 entries each."""
    async with Store.open(db) as store:
        for i in range(first, first + n):
            uow = UnitOfWork()
            uow.enqueue(f"msg-{i:03d}", "acme/out/material-consumed", f'{{"n":{i}}}'.encode(), AT)
            uow.audit("command", f"cmd-{i:03d}", f'{{"id":"cmd-{i:03d}"}}'.encode(), AT)
            await store.commit_units([uow])


def _store(tmp_path: Path, commits: int = 5) -> tuple[str, Path]:
    config = write_config(tmp_path, runnable(tmp_path))
    db = tmp_path / "agent.db"
    asyncio.run(_commits(db, 0, commits))
    return str(config), db


def _verify(config: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", config])
    return code, capsys.readouterr().out


def test_an_untouched_store_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _db = _store(tmp_path)
    code, out = _verify(config, capsys)
    assert code == 0
    assert "intact, 10 entries" in out
    assert "the 5 message(s) waiting match their entries" in out


@pytest.mark.parametrize(
    ("edit", "reported"),
    [
        pytest.param(
            ("UPDATE audit SET ref = 'cmd-999' WHERE seq = 4", ()),
            "BROKEN at entry 4: its content does not match its hash",
            id="an-edited-entry",
        ),
        pytest.param(
            ("DELETE FROM audit WHERE seq = 6", ()),
            "BROKEN at entry 6: entry 6 is missing",
            id="a-removed-entry",
        ),
        pytest.param(
            ("DELETE FROM audit WHERE seq > 7", ()),
            "the chain ended at entry 7, not at entry 10 as the last commit recorded",
            id="entries-cut-off-the-end-found-at-the-next-open",
        ),
        pytest.param(
            ("UPDATE outbox SET payload = ? WHERE message_id = 'msg-002'", (b'{"n":9}',)),
            "BROKEN at entry 5: outbox message msg-002 is not what this entry recorded",
            id="a-waiting-message-edited",
        ),
    ],
)
def test_an_edit_to_the_file_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: tuple[str, tuple[object, ...]],
    reported: str,
) -> None:
    config, db = _store(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute(*edit)
    code, out = _verify(config, capsys)
    assert code == 1
    assert reported in out


def test_an_entry_recomputed_to_hide_an_edit_breaks_the_link_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, db = _store(tmp_path)
    with sqlite3.connect(db) as conn:
        seq, at, kind, _ref, sha, prev = conn.execute(
            "SELECT seq, at, kind, ref, payload_sha256, prev_hash FROM audit WHERE seq = 4"
        ).fetchone()
        forged = chain_hash(prev, seq, at, kind, "cmd-999", sha)
        conn.execute("UPDATE audit SET ref = 'cmd-999', hash = ? WHERE seq = 4", (forged,))
    code, out = _verify(config, capsys)
    assert code == 1
    assert "BROKEN at entry 5: does not link to the entry before it" in out


@pytest.mark.asyncio
async def test_entries_cut_off_the_end_while_the_store_is_open_are_caught(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    await _commits(db, 0, 5)
    async with Store.open(db) as store:
        with sqlite3.connect(db) as conn:  # the chain that is left is consistent in itself
            conn.execute("DELETE FROM audit WHERE seq > 7")
        report = await store.verify_audit()
    assert not report.ok
    assert report.first_broken_seq == 8
    assert report.reason is not None
    assert "the chain ends at entry 7, but the last commit recorded entry 10 as its end" in (
        report.reason
    )


def test_a_cut_found_at_a_restart_stays_on_record_after_the_agent_ran_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, db = _store(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 7")
    asyncio.run(_commits(db, 5, 3))  # the agent starts again and appends to what is left
    code, out = _verify(config, capsys)
    assert code == 1
    assert "BROKEN at entry 10: on 20" in out
    assert "the chain ended at entry 7, not at entry 10 as the last commit recorded" in out


def test_a_store_that_never_ran_and_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, runnable(tmp_path))
    assert main(["audit", "verify", str(config)]) == 0
    assert "does not exist yet" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "nope.toml")]) == 2


@pytest.mark.asyncio
async def test_status_beside_a_running_agent_never_finds_a_false_break(tmp_path: Path) -> None:
    """Opening and verifying the store while the agent commits (``status`` on a live line)
    reads the chain's end and its recorded end in one snapshot: never a false alarm."""
    db = tmp_path / "agent.db"
    await _commits(db, 0, 1)
    stop = asyncio.Event()

    async def agent() -> int:
        n = 0
        async with Store.open(db) as store:
            while not stop.is_set():
                uow = UnitOfWork()
                uow.audit("command", f"live-{n}", b"{}", AT)
                await store.commit_units([uow])
                n += 1
                await asyncio.sleep(0)
        return n

    running = asyncio.create_task(agent())
    reports = []
    for _ in range(15):
        async with Store.open(db) as beside:
            reports.append(await beside.verify_audit(outbox=True))
    stop.set()
    commits = await running
    assert commits > 15  # the agent really committed while the checks ran
    assert all(r.ok for r in reports), [r.reason for r in reports if not r.ok]
    async with Store.open(db) as store:
        assert (await store.verify_audit()).ok
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'audit_break'").fetchone() is None


def _head(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()[0])


def test_a_chain_rewritten_whole_is_caught_only_by_an_end_kept_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, db = _store(tmp_path)
    kept = _head(db)  # what the MES kept from the agent's last status
    assert main(["audit", "verify", config, "--head", kept]) == 0
    assert "entry 10 is the one kept outside the store" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:  # a forger edits entry 4 and recomputes everything after
        rows = conn.execute(
            "SELECT seq, at, kind, ref, payload_sha256 FROM audit ORDER BY seq"
        ).fetchall()
        prev = "0" * 64
        for seq, at, kind, ref, sha in rows:
            forged = "cmd-999" if seq == 4 else ref
            digest = chain_hash(prev, seq, at, kind, forged, sha)
            conn.execute(
                "UPDATE audit SET ref = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (forged, prev, digest, seq),
            )
            prev = digest
        conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (f"10:{prev}",))
    code, _out = _verify(config, capsys)
    assert code == 0  # consistent in itself: the limit of a chain kept in one file
    assert main(["audit", "verify", config, "--head", kept]) == 1
    assert "BROKEN at entry 10: is not the entry whose hash was kept outside the store" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("head", ["10", "x:abc", "0:" + "a" * 64, "3:" + "a" * 63])
def test_a_malformed_head_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], head: str
) -> None:
    config, _db = _store(tmp_path, commits=1)
    assert main(["audit", "verify", config, "--head", head]) == 2
    assert "--head: expected SEQ:HASH" in capsys.readouterr().err
