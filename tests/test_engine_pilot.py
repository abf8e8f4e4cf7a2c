"""Shadow mode for a pilot (issue 9) through the engine, with a real store: a shadowed backflush
is published as material-consumed-shadow and moves no stock; the MES's actual issues of it are
kept with the order; everything rejected changes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edge_agent.config import PilotSection
from edge_agent.domain.masterdata import PostingMethod
from edge_agent.engine import Engine, actual_issued
from edge_agent.messages import MaterialConsumed, OrderVariance, ShadowConsumption
from edge_agent.store import Store
from tests.test_engine import LOTS, MASTER, ORDERS, Clock, Line, commit, make_config, outbox
from tests.test_engine_commands import MASTER_DOC, Mes, exceptions, lot_balance, snapshot

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


async def pilot(
    tmp_path: Path, store: Store, lots: Any = LOTS, **section: Any
) -> tuple[Engine, Mes, Line]:
    config = make_config(tmp_path).model_copy(update={"pilot": PilotSection(**section)})
    clock = Clock()
    engine = await Engine.load(config, store, MASTER, ORDERS, lots, clock, master_doc=MASTER_DOC)
    engine.connected = dict.fromkeys(engine.connected, True)
    await commit(engine, store)
    return engine, Mes(engine, store, clock), Line(clock)


def issue(**fields: Any) -> dict[str, Any]:
    return {
        "order": "WO-7",
        "material": "RM-PERFUME",
        "lot": "PERF-0042",
        "quantity": "0.060",
        "uom": "kg",
        "at": "2026-11-23T06:00:00.000Z",
        **fields,
    }


async def run_wo7(engine: Engine, store: Store, line: Line, good: int = 100) -> list[Any]:
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", good))
    await commit(engine, store)
    return await outbox(store)


async def test_a_shadowed_material_is_published_apart_and_moves_no_stock(
    tmp_path: Path, store: Store
) -> None:
    engine, _, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    base_before = lot_balance(engine, "BASE-2610-07")
    messages = await run_wo7(engine, store, line)
    (shadow,) = [m for m in messages if isinstance(m, ShadowConsumption)]
    assert (shadow.material, shadow.quantity, shadow.lots, shadow.held) == (
        "RM-PERFUME",
        Decimal("0.100"),
        (),
        None,
    )
    assert lot_balance(engine, "PERF-0042") == Decimal("2.000")  # nothing drawn
    stock = [m for m in messages if isinstance(m, MaterialConsumed)]
    assert {m.material for m in stock} == {"RM-BASE"}  # the rest posts as before
    assert lot_balance(engine, "BASE-2610-07") < base_before
    rows = await store.outbox_batch(100)
    topics = {r.topic.rsplit("/", 1)[1] for r in rows}
    assert {"material-consumed", "material-consumed-shadow"} <= topics


async def test_a_shadowed_requirement_with_no_lot_is_not_held(tmp_path: Path, store: Store) -> None:
    lots = [lot for lot in LOTS if lot.material != "RM-PERFUME"]
    engine, _, line = await pilot(tmp_path, store, lots, shadow_materials=("RM-PERFUME",))
    messages = await run_wo7(engine, store, line)
    assert exceptions(messages, "lot_held") == []
    assert [m.quantity for m in messages if isinstance(m, ShadowConsumption)] == [Decimal("0.1")]


async def test_a_shadowed_order_shadows_every_backflushed_material(
    tmp_path: Path, store: Store
) -> None:
    engine, _, line = await pilot(tmp_path, store, shadow_orders=("WO-7",))
    messages = await run_wo7(engine, store, line)
    assert not [m for m in messages if isinstance(m, MaterialConsumed)]
    assert {m.material for m in messages if isinstance(m, ShadowConsumption)} == {
        "RM-BASE",
        "RM-PERFUME",
    }
    assert engine.order_states["WO-7"].shadow == ["*"]


async def test_an_orders_shadow_set_is_fixed_when_it_starts(tmp_path: Path, store: Store) -> None:
    engine, _, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    await run_wo7(engine, store, line)
    # the pilot's configuration changes, and the agent restarts: WO-7 keeps its shadow set
    config = engine.config.model_copy(update={"pilot": PilotSection()})
    again = await Engine.load(
        config, store, MASTER, ORDERS, LOTS, line.clock, master_doc=MASTER_DOC
    )
    again.connected = dict.fromkeys(again.connected, True)
    assert again.order_states["WO-7"].shadow == ["RM-PERFUME"]
    again.apply(line.event("MIX-1", "good", 200))
    await commit(again, store)
    latest = [m for m in await outbox(store) if isinstance(m, ShadowConsumption)]
    assert [m.quantity for m in latest] == [Decimal("0.1"), Decimal("0.1")]


async def test_actual_issues_are_kept_with_the_order(tmp_path: Path, store: Store) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    await run_wo7(engine, store, line)
    replies = [
        await mes.send("actual-issue", **issue(quantity="5", uom="g", phase="setup")),
        await mes.send("actual-issue", **issue(quantity="0.100", phase="running")),
        await mes.send("actual-issue", **issue(lot="PERF-0043", quantity="0.010")),
        await mes.send("actual-issue", **issue(quantity="-0.002", phase="running")),  # a return
    ]
    assert [r.result for r in replies] == ["accepted"] * 4, [r.reason for r in replies]
    state = engine.order_states["WO-7"]
    record = state.actuals[("10", "RM-PERFUME", PostingMethod.BACKFLUSH)]
    assert actual_issued(record) == Decimal("0.113")
    assert record == {
        "setup": "0.005",
        "running": "0.098",
        "untagged": "0.01",
        "issues": 4,
        "lots": {"PERF-0042": "0.103", "PERF-0043": "0.01"},
    }
    assert lot_balance(engine, "PERF-0042") == Decimal("2.000")  # the MES moves the stock
    # kept across a restart
    reloaded = await Engine.load(
        engine.config, store, MASTER, ORDERS, LOTS, Clock(), master_doc=MASTER_DOC
    )
    assert reloaded.order_states["WO-7"].actuals == state.actuals


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"material": "RM-BASE"}, "material: order WO-7 does not backflush RM-BASE in shadow"),
        ({"order": "WO-404"}, "order: unknown order 'WO-404'"),
        ({"material": "PK-TUBE"}, "does not backflush PK-TUBE in shadow"),
        ({"operation": "20"}, "operation: RM-PERFUME is backflushed at 10, not 20"),
        ({"uom": "L"}, "uom:"),
        ({"quantity": "-0.5"}, "quantity: returns of RM-PERFUME to order WO-7 would exceed"),
    ],
)
async def test_a_refused_actual_issue_changes_nothing(
    tmp_path: Path, store: Store, fields: dict[str, Any], reason: str
) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    await run_wo7(engine, store, line)
    before = await snapshot(store)
    reply = await mes.send("actual-issue", **issue(**fields))
    assert reply.result == "rejected"
    assert reply.reason is not None
    assert reason in reply.reason, reply.reason
    assert await snapshot(store) == before


async def test_a_setup_issue_may_come_before_the_first_count(tmp_path: Path, store: Store) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    before = await snapshot(store)
    refused = await mes.send("actual-issue", **issue(material="RM-BASE", phase="setup"))
    assert refused.result == "rejected"
    assert await snapshot(store) == before  # no order state made for a refused issue
    assert "WO-7" not in engine.order_states
    setup = await mes.send("actual-issue", **issue(quantity="0.020", phase="setup"))
    assert setup.result == "accepted", setup.reason
    assert engine.order_states["WO-7"].shadow == ["RM-PERFUME"]  # fixed from here
    messages = await run_wo7(engine, store, line)
    assert [m.quantity for m in messages if isinstance(m, ShadowConsumption)] == [Decimal("0.1")]
    record = engine.order_states["WO-7"].actuals[("10", "RM-PERFUME", PostingMethod.BACKFLUSH)]
    assert (actual_issued(record), record["setup"]) == (Decimal("0.02"), "0.02")


async def test_a_zero_or_malformed_actual_issue_is_rejected_by_its_field(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    await run_wo7(engine, store, line)
    zero = await mes.send("actual-issue", **issue(quantity="0"))
    assert zero.reason is not None
    assert "quantity: an actual issue moves something" in zero.reason
    bad = await mes.raw(
        "actual-issue",
        json.dumps(
            {"schema": "edge-agent/actual-issue", "version": 1, "command_id": "x", **issue()}
            | {"phase": "cleanup"}
        ).encode(),
    )
    assert bad.reason is not None
    assert bad.reason.startswith("phase:")


async def test_a_shadow_posting_cannot_be_reversed(tmp_path: Path, store: Store) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    messages = await run_wo7(engine, store, line)
    (shadow,) = [m for m in messages if isinstance(m, ShadowConsumption)]
    reply = await mes.send(
        "reversal", message_id=shadow.message_id, reason_code="X", requested_by="jdoe"
    )
    assert reply.result == "rejected"
    assert reply.reason is not None
    assert "is not a material-consumed posting" in reply.reason


async def test_the_close_variance_of_a_shadowed_material_is_its_actual_issues(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line = await pilot(tmp_path, store, shadow_materials=("RM-PERFUME",))
    await run_wo7(engine, store, line)
    assert (await mes.send("actual-issue", **issue(quantity="0.104"))).result == "accepted"
    assert (await mes.send("work-order", action="close", order="WO-7")).result == "accepted"
    (variance,) = [m for m in await outbox(store) if isinstance(m, OrderVariance)]
    perfume = next(v for v in variance.lines if v.material == "RM-PERFUME")
    assert (perfume.theoretical, perfume.issued, perfume.variance) == (
        Decimal("0.1"),
        Decimal("0.104"),
        Decimal("0.004"),
    )
    assert perfume.flagged  # 4 % over a 2 % threshold
    closed = await mes.send("actual-issue", **issue())
    assert closed.reason == "order: WO-7 is closed"
