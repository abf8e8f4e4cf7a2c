"""``edge-agent genealogy``: the lots in an order, from the store, checked against the postings."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.test_daemon import _a_short_run, runnable, write_config


def _drawn_by_postings(db: Path, order: str) -> dict[str, Decimal]:
    """What the outbox's material-consumed messages of ``order`` drew, per lot: the oracle."""
    drawn: dict[str, Decimal] = {}
    with sqlite3.connect(db) as conn:
        for (payload,) in conn.execute("SELECT payload FROM outbox"):
            message = json.loads(payload)
            if message.get("schema") != "edge-agent/material-consumed":
                continue
            if message["order"] != order:
                continue
            for movement in message["lots"]:
                lot = movement["lot"]
                drawn[lot] = drawn.get(lot, Decimal(0)) + Decimal(movement["quantity"])
    return {lot: q for lot, q in drawn.items() if q}


def test_genealogy_prints_each_lot_an_order_drew_as_its_postings_say(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, runnable(tmp_path))
    db = tmp_path / "agent.db"
    assert main(["genealogy", str(config), "--order", "WO-7"]) == 1  # no store yet
    capsys.readouterr()
    asyncio.run(_a_short_run(config, db))
    capsys.readouterr()  # the run's own log lines
    expected = _drawn_by_postings(db, "WO-7")
    assert expected  # the run really drew from lots
    assert main(["genealogy", str(config), "--order", "WO-7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("order WO-7:")
    for lot, quantity in expected.items():
        assert f"lot {lot}: {quantity.normalize():f}" in out or f"lot {lot}: {quantity}" in out, (
            lot,
            quantity,
            out,
        )
    assert out.count("lot ") - out.count("finished lot") == len(expected)


def test_genealogy_by_finished_lot_and_unknown_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, runnable(tmp_path))
    db = tmp_path / "agent.db"
    asyncio.run(_a_short_run(config, db))
    with sqlite3.connect(db) as conn:  # as the MES's release records it: with a finished lot
        conn.execute(
            "UPDATE state SET value = json_set(value, '$.work_order', json(?)) "
            "WHERE key = 'order/WO-7'",
            ('{"product": "FG-100", "quantity": "250", "finished_lot": "FG-7-LOT"}',),
        )
    capsys.readouterr()
    assert main(["genealogy", str(config), "--finished-lot", "FG-7-LOT"]) == 0
    assert capsys.readouterr().out.startswith("order WO-7: FG-100 rev")
    assert main(["genealogy", str(config), "--order", "WO-404"]) == 1
    assert "order WO-404 is not in the store" in capsys.readouterr().out
    assert main(["genealogy", str(config), "--finished-lot", "NO-SUCH-LOT"]) == 1
    assert "no order of this store makes finished lot NO-SUCH-LOT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["genealogy", str(config)])  # neither --order nor --finished-lot
    assert exc.value.code == 2
