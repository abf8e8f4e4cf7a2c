"""The fault suite, reduced to CI's size (``make faults`` and ``make faults-full`` run it whole;
outages with delivery on the broker's PUBACK run in CI as tests/test_end_to_end.py's shift).

Each test runs real rigs (mosquitto, the PLC simulator, the MES simulator, the agent as a child
process) with faults injected while the line produces, and holds the reconciliation to zero:
nothing lost, nothing doubled, exact consumption, order kept. The reconciliation itself is tested
first, against ledgers that are wrong on purpose, so a green row means something.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console

from edge_agent.crashpoints import POINTS
from edge_agent.store import Store
from simulators.faults import (
    CRASH_PROBABILITY,
    FAULTS,
    FULL,
    QUICK,
    FaultRow,
    _reconcile,
    report_table,
    run_fault,
)
from simulators.mes import MesSimulator
from tests.support.broker import has_mosquitto

needs_mosquitto = pytest.mark.skipif(
    not has_mosquitto(), reason="the fault rigs run mosquitto (apt-get install mosquitto)"
)


def seed() -> int:
    """A fresh seed each run, printed on failure (rerun it with python -m simulators.faults
    --seed N --only KIND)."""
    return random.SystemRandom().randrange(1 << 31)


def check(row: FaultRow, at_least: int) -> None:
    details = f"{row}\n" + "\n".join(row.off)
    assert row.error is None, details
    assert row.iterations >= at_least, details
    assert row.lines > 0, details
    assert row.lost == 0, details
    assert row.duplicated == 0, details
    assert row.lines_off == 0, details
    assert row.out_of_order == 0 or row.bridged, details
    assert row.expected == row.received, details
    assert row.ok


# ---------------------------------------------------------------------- the reconciliation


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[MesSimulator]:
    mes = MesSimulator(tmp_path / "ledger.db", topic_filter="x/#")
    yield mes
    mes.close()


def agent_store(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "agent.db"

    async def write() -> None:
        async with Store.open(path) as store, store.transaction() as tx:
            for message_id in ids:
                tx.enqueue(message_id, "t", b"{}", "2026-11-29T00:00:00.000Z")

    asyncio.run(write())
    return path


def deliver(
    mes: MesSimulator, message_id: str, order: str, sequence: int, quantity: str = "1"
) -> None:
    """A material-consumed row as the ledger records it (its tables, not its validation)."""
    payload = json.dumps({"order": order, "sequence": sequence}).encode()
    with sqlite3.connect(mes.ledger.path) as db:
        db.execute(
            "INSERT INTO messages VALUES (?, 'material-consumed', 't', '', ?)",
            (message_id, payload),
        )
        db.execute(
            "INSERT INTO consumption VALUES (?, ?, '10', 'RM-BASE', 'kg', ?, NULL)",
            (message_id, order, quantity),
        )


def reconciled(mes: MesSimulator, store: Path, expected: dict[str, str]) -> FaultRow:
    row = FaultRow("t", "t", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0.0)
    _reconcile(row, {(o, "RM-BASE", "kg"): Decimal(q) for o, q in expected.items()}, mes, store)
    return row


def test_a_complete_ledger_reconciles(tmp_path: Path, ledger: MesSimulator) -> None:
    store = agent_store(tmp_path, ["a", "b"])
    deliver(ledger, "a", "WO-1", 1)
    deliver(ledger, "b", "WO-1", 2)
    row = reconciled(ledger, store, {"WO-1": "2"})
    assert (row.expected, row.received, row.lost, row.lines, row.lines_off) == (2, 2, 0, 1, 0)
    assert row.ok


def test_a_message_the_mes_never_got_is_lost(tmp_path: Path, ledger: MesSimulator) -> None:
    store = agent_store(tmp_path, ["a", "b"])
    deliver(ledger, "a", "WO-1", 1)
    row = reconciled(ledger, store, {"WO-1": "2"})
    assert (row.lost, row.lines_off) == (1, 1)
    assert row.off == ["WO-1/RM-BASE/kg: expected 2, received 1"]
    assert not row.ok


def test_a_posting_made_twice_under_two_ids_is_off(tmp_path: Path, ledger: MesSimulator) -> None:
    store = agent_store(tmp_path, ["a", "b"])
    deliver(ledger, "a", "WO-1", 1)
    deliver(ledger, "b", "WO-1", 2)
    row = reconciled(ledger, store, {"WO-1": "1"})
    assert row.lines_off == 1
    assert not row.ok


def test_an_id_with_two_contents_and_a_sequence_going_back_fail(
    tmp_path: Path, ledger: MesSimulator
) -> None:
    store = agent_store(tmp_path, ["a", "b"])
    deliver(ledger, "b", "WO-1", 2)
    deliver(ledger, "a", "WO-1", 1)
    with sqlite3.connect(ledger.ledger.path) as db:
        db.execute("INSERT INTO duplicates VALUES (1, 'a', 't', '', 0)")
    row = reconciled(ledger, store, {"WO-1": "2"})
    assert (row.duplicated, row.redelivered, row.out_of_order) == (1, 1, 1)
    assert not row.ok
    row.duplicated = 0
    assert not row.ok  # out of order on one broker fails
    row.bridged = True
    assert row.ok  # through a bridge it is counted, and the MES orders by sequence


def test_the_report_prints_every_row_and_the_total() -> None:
    ok = FaultRow("broker-short", "x", 3, 10, 10, 2, 0, 0, 4, 0, 0, 1.0)
    bad = FaultRow("agent-kill", "x", 2, 10, 9, 0, 1, 0, 4, 1, 0, 1.0)
    console = Console(width=200, record=True)
    console.print(report_table([ok, bad], "t"))
    text = console.export_text()
    assert "broker-short" in text
    assert "agent-kill" in text
    assert "FAIL" in text
    assert "│ all " in text


# ---------------------------------------------------------------------- the rigs


@needs_mosquitto
def test_mixed_faults_on_the_bridged_line(tmp_path: Path) -> None:
    """Broker and bridge outages, kills, crash points, PLC restarts and dropped connections,
    late notifications and the MES away, drawn at random on one line: mes-ack delivery through a
    line broker bridged to the plant broker."""
    row = asyncio.run(run_fault(FAULTS["mixed"], 8, tmp_path, seed()))
    check(row, 8)


@needs_mosquitto
def test_modbus_device_restarts(tmp_path: Path) -> None:
    row = asyncio.run(run_fault(FAULTS["modbus-restart"], 2, tmp_path, seed()))
    check(row, 2)


@needs_mosquitto
@pytest.mark.parametrize("width", [16, 32])
def test_counters_wrap(tmp_path: Path, width: int) -> None:
    row = asyncio.run(run_fault(FAULTS[f"rollover-{width}"], 2, tmp_path, seed()))
    check(row, 2)


def test_every_fault_kind_is_in_both_plans_and_the_full_run_makes_over_1000_faults() -> None:
    assert set(QUICK) == set(FAULTS) == set(FULL)
    assert sum(FULL.values()) >= 1000
    assert {f"crash:{point}" for point in POINTS} <= set(FAULTS)
    assert set(CRASH_PROBABILITY) == set(POINTS)
