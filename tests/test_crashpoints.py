"""Crash points: armed by name through the environment, they kill the process where they stand."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.crashpoints import ENV, POINTS, parse


def test_parse_takes_names_and_probabilities() -> None:
    assert parse("") == {}
    assert parse("store.before_commit") == {"store.before_commit": 1.0}
    assert parse(" uplink.after_publish:0.25 , engine.after_commit:1 ") == {
        "uplink.after_publish": 0.25,
        "engine.after_commit": 1.0,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("store.befor_commit", "unknown crash point 'store.befor_commit'"),
        ("store.before_commit:0", "probability must be in (0, 1]"),
        ("store.before_commit:1.5", "probability must be in (0, 1]"),
    ],
)
def test_parse_refuses_what_it_does_not_know(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edge_agent.store import Store

    async def main() -> None:
        async with Store.open(Path(sys.argv[1])) as store:
            async with store.transaction() as tx:
                tx.put_state("kept", {"n": 1})
            print("first committed", flush=True)
            async with store.transaction() as tx:
                tx.put_state("lost", {"n": 2})
            print("second committed", flush=True)

    asyncio.run(main())
    """
)


def run_store_script(path: Path, armed: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if armed:
        env[ENV] = armed
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_a_point_armed_for_sure_kills_the_process_inside_the_commit(tmp_path: Path) -> None:
    """The second transaction's rows are written, COMMIT is not: after the kill the store has
    the first transaction and not a trace of the second, and is intact."""
    path = tmp_path / "agent.db"
    assert run_store_script(path, "").returncode == 0  # creates the store
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    done = run_store_script(path, "store.before_commit:1")
    # the store's creation is a commit too: the first one to pass the point dies
    assert done.returncode == -signal.SIGKILL
    assert '"point": "store.before_commit"' in done.stderr
    assert "committed" not in done.stdout


def test_the_store_keeps_what_was_committed_before_the_kill(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    assert run_store_script(path, "").returncode == 0
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM state WHERE key IN ('kept', 'lost')")
    # half of the commits survive on average; run until one dies after the first committed
    for _ in range(40):
        done = run_store_script(path, "store.before_commit:0.5")
        if done.returncode == -signal.SIGKILL and "first committed" in done.stdout:
            break
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM state WHERE key IN ('kept', 'lost')")
    else:
        pytest.fail("the crash point never fired between the two commits in 40 runs")
    with sqlite3.connect(path) as db:
        keys = {k for (k,) in db.execute("SELECT key FROM state")}
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert "kept" in keys
    assert "lost" not in keys


def test_unarmed_points_do_nothing(tmp_path: Path) -> None:
    done = run_store_script(tmp_path / "agent.db", "")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["first committed", "second committed"]


def test_every_point_is_placed_in_the_code() -> None:
    root = Path(__file__).resolve().parents[1] / "edge_agent"
    source = "".join(p.read_text() for p in root.rglob("*.py") if p.name != "crashpoints.py")
    for point in POINTS:
        assert f'crash_point("{point}")' in source, point
