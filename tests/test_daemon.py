"""`edge-agent run` refuses to start on what it cannot trust, with the same messages as
`validate` and the documented exit codes (2: configuration or documents, 3: the store)."""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from edge_agent.agent import cancel_until_done, load_documents
from edge_agent.cli import main
from edge_agent.config import load_config
from edge_agent.engine import Engine
from edge_agent.sources import Quality, SignalEvent
from edge_agent.store import Store, UnitOfWork
from tests import test_store
from tests.test_config import SECTION_ERRORS, example

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def runnable(tmp_path: Path) -> dict[str, Any]:
    """The example with its files made absolute and its store in ``tmp_path``."""
    data = copy.deepcopy(example())
    data["store"]["path"] = str(tmp_path / "agent.db")
    for key in ("path", "orders", "lots"):
        data["masterdata"][key] = str(CONFIG_DIR / data["masterdata"][key])
    return data


@pytest.mark.parametrize(("change", "expected"), SECTION_ERRORS)
def test_run_refuses_an_invalid_configuration_like_validate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[dict[str, Any]], None],
    expected: str,
) -> None:
    data = runnable(tmp_path)
    change(data)
    path = write_config(tmp_path, data)
    assert main(["validate", str(path)]) == 2
    validated = capsys.readouterr().err
    assert main(["run", str(path)]) == 2
    refused = capsys.readouterr().err
    assert refused == validated
    assert f"edge-agent: {path}: {expected}" in refused
    assert not (tmp_path / "agent.db").exists()  # nothing was started


@pytest.mark.parametrize(
    ("document", "content", "expected"),
    [
        ("path", {"materials": [], "boms": [{"product": "X"}]}, "boms[0]"),
        (
            "orders",
            {"orders": [{"order": "WO-1", "product": "NOPE", "quantity": "5"}]},
            "orders[0] (WO-1) › product: no BOM for product 'NOPE'",
        ),
        (
            "lots",
            {"lots": [{"lot": "L1", "material": "RM-BASE", "quantity": 1.5, "staged_at": "2026"}]},
            "quantity",
        ),
    ],
)
def test_run_refuses_invalid_documents_naming_the_file_and_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    document: str,
    content: dict[str, Any],
    expected: str,
) -> None:
    bad = tmp_path / f"{document}.json"
    bad.write_text(json.dumps(content))
    data = runnable(tmp_path)
    data["masterdata"][document] = str(bad)
    assert main(["run", str(write_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert expected in err


def test_run_refuses_a_store_it_cannot_trust_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "agent.db"
    store.write_bytes(b"this is a text file, not the agent's store\n")
    before = store.read_bytes()
    assert main(["run", str(write_config(tmp_path, runnable(tmp_path)))]) == 3
    err = capsys.readouterr().err
    assert str(store) in err
    assert "not an SQLite database" in err
    assert store.read_bytes() == before


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(test_store.truncated_at(lambda size, page: 3 * page, ""), id="truncated"),
        pytest.param(lambda p: test_store.garbage_over_page(p, 6), id="garbage-page"),
        pytest.param(test_store.empty_file, id="zero-length"),
        pytest.param(test_store.directory, id="a-directory"),
        pytest.param(test_store.wal_frame_garbage, id="damaged-wal"),
    ],
)
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_damaged_store_stops_run_and_status_with_exit_3_and_the_recovery_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    make_bad: Callable[[Path], Any],
) -> None:
    store = tmp_path / "agent.db"
    asyncio.run(make_bad(store))
    config = write_config(tmp_path, runnable(tmp_path))
    before = test_store.files_in(tmp_path)
    assert main([command, str(config)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # one clear message
    assert str(store) in err
    assert "keep it" in err
    assert "docs/durability.md" in err
    assert test_store.files_in(tmp_path) == before  # byte for byte, -wal included


def test_status_shows_the_store_and_a_broken_audit_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, runnable(tmp_path))
    assert main(["status", str(config_path)]) == 0
    assert "does not exist yet" in capsys.readouterr().out
    asyncio.run(_a_short_run(config_path, tmp_path / "agent.db"))
    assert main(["status", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "audit chain intact" in out
    assert "MIX-1" in out
    assert "WO-7" in out
    assert "good=12" in out

    asyncio.run(_a_short_run(config_path, tmp_path / "agent.db", (("order", "WO-404"),)))
    asyncio.run(_a_short_run(config_path, tmp_path / "agent.db", (("good", 13),)))
    assert main(["status", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "open exceptions" in out
    assert "unknown_order" in out
    assert "WO-404" in out

    with sqlite3.connect(tmp_path / "agent.db") as db:  # an auditor's nightmare: an edited entry
        db.execute("UPDATE audit SET ref = 'edited' WHERE seq = 3")
    assert main(["status", str(config_path)]) == 1
    assert "audit chain BROKEN at entry 3" in capsys.readouterr().out


async def _a_short_run(
    config_path: Path,
    db: Path,
    signals: tuple[tuple[str, object], ...] = (("order", "WO-7"), ("good", 12), ("scrap", 1)),
) -> None:
    config = load_config(config_path)
    async with Store.open(db) as store:
        docs = await load_documents(config, store)
        engine = await Engine.load(config, store, docs.master, docs.orders, docs.lots)
        at = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
        for n, (signal, value) in enumerate(signals):
            t = at + timedelta(seconds=n)
            engine.apply(
                SignalEvent("mix-plc", "MIX-1", signal, "n", value, Quality.GOOD, "Good", t, t)
            )
        uow = UnitOfWork()
        engine.stage(uow)
        await store.commit_units([uow])


@pytest.mark.asyncio
async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    """A library that swallows one cancellation must not hang the agent's shutdown."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 3:
                    raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_until_done([task], every_s=0.01)
    assert task.cancelled()
    assert swallowed == 3
