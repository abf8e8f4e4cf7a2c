"""MES commands through the engine (the one writer), with a real SQLite store.

Each command is applied as the agent applies it (``Engine.prepared`` then ``apply``), committed,
and judged by what reached the outbox and what the store holds: every command gets a reply, a
rejected one changes nothing, a command id is applied once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edge_agent.domain.lots import LotStatus
from edge_agent.engine import CommandEvent, Engine
from edge_agent.messages import (
    CommandReply,
    ExceptionMessage,
    Genealogy,
    MaterialConsumed,
    OrderVariance,
    ProductionConfirmation,
)
from edge_agent.store import Store
from tests.test_engine import LOTS, MASTER, ORDERS, Clock, Line, commit, make_config, outbox

pytestmark = pytest.mark.asyncio
MASTER_DOC = json.loads((Path(__file__).parents[1] / "config" / "masterdata.json").read_text())


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


class Mes:
    """Builds commands and applies them to an engine as the agent does."""

    def __init__(self, engine: Engine, store: Store, clock: Clock) -> None:
        self.engine, self.store, self.clock = engine, store, clock
        self.n = 0

    def payload(self, kind: str, command_id: str | None = None, **fields: Any) -> bytes:
        self.n += 1
        body = {
            "schema": f"edge-agent/{kind}",
            "version": 1,
            "command_id": command_id or f"c-{self.n}",
            **fields,
        }
        return json.dumps(body).encode()

    async def raw(self, kind: str, payload: bytes) -> CommandReply:
        event = await self.engine.prepared(
            self.store, CommandEvent(kind, payload, self.clock.tick())
        )
        self.engine.apply(event)
        await commit(self.engine, self.store)
        replies = [m for m in await outbox(self.store) if isinstance(m, CommandReply)]
        return replies[-1]

    async def heartbeat(self, skew: timedelta) -> None:
        """The MES clock ``skew`` behind the agent's. A heartbeat is not a command: no reply."""
        before = len(await outbox(self.store))
        at = self.clock.tick()
        payload = {"schema": "edge-agent/heartbeat", "version": 1, "mes_time": _wire(at - skew)}
        self.engine.apply(CommandEvent("heartbeat", json.dumps(payload).encode(), at))
        await commit(self.engine, self.store)
        assert not [m for m in (await outbox(self.store))[before:] if isinstance(m, CommandReply)]

    async def send(self, kind: str, command_id: str | None = None, **fields: Any) -> CommandReply:
        return await self.raw(kind, self.payload(kind, command_id, **fields))


async def setup(
    tmp_path: Path, store: Store, lots: Any = LOTS, **config: Any
) -> tuple[Engine, Mes, Line, Clock]:
    clock = Clock()
    engine = await Engine.load(
        make_config(tmp_path, **config), store, MASTER, ORDERS, lots, clock, master_doc=MASTER_DOC
    )
    engine.connected = dict.fromkeys(engine.connected, True)
    await commit(engine, store)
    return engine, Mes(engine, store, clock), Line(clock), clock


def postings(messages: list[Any], material: str | None = None) -> list[MaterialConsumed]:
    return [
        m
        for m in messages
        if isinstance(m, MaterialConsumed) and (material is None or m.material == material)
    ]


def exceptions(messages: list[Any], code: str) -> list[ExceptionMessage]:
    return [m for m in messages if isinstance(m, ExceptionMessage) and m.code == code]


def lot_balance(engine: Engine, lot: str) -> Decimal:
    return next(x.quantity for x in engine.lots if x.lot == lot)


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything a command may change, except the engine sequence and the command record."""
    state = await store.all_state()
    return {k: v for k, v in state.items() if k != "engine" and not k.startswith("command/")}


# ------------------------------------------------------------------------------ lot staging


async def test_a_held_requirement_posts_once_a_lot_is_staged(tmp_path: Path, store: Store) -> None:
    lots = [lot for lot in LOTS if lot.material != "RM-PERFUME"]
    engine, mes, line, _ = await setup(tmp_path, store, lots)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 10))
    await commit(engine, store)
    caps = postings(await outbox(store), "RM-PERFUME")
    assert [(m.quantity, m.lots, m.held.quantity if m.held else None) for m in caps] == [
        (Decimal("0.010"), (), Decimal("0.010"))
    ]
    (held,) = exceptions(await outbox(store), "lot_held")
    assert engine.status_figures()["open_exceptions"][0]["message_id"] == held.message_id

    reply = await mes.send(
        "lot-staging", action="staged", lot="PERF-9001", material="RM-PERFUME", quantity="1"
    )
    assert (reply.result, reply.reason) == ("accepted", None)
    messages = await outbox(store)
    caps = postings(messages, "RM-PERFUME")
    flushed = caps[-1]
    assert flushed.quantity == 0  # posted before: only now bound to a lot
    assert flushed.held_released == Decimal("0.010")
    assert [(m.lot, m.quantity) for m in flushed.lots] == [("PERF-9001", Decimal("0.010"))]
    assert flushed.held is None
    assert flushed.trigger.source == "mes"
    assert flushed.message_id in reply.produced
    assert lot_balance(engine, "PERF-9001") == Decimal("0.990")
    resolved = [m for m in exceptions(messages, "lot_held") if m.resolves == held.message_id]
    assert len(resolved) == 1
    assert engine.open_exceptions == {}
    # what the MES sees per lot adds up to the consumption
    assert sum(m.quantity for m in caps) == sum(mv.quantity for m in caps for mv in m.lots)


async def test_a_feed_lot_held_in_quarantine_is_drawn_from_that_lot_once_released(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, clock = await setup(tmp_path, store)
    await mes.send("lot-staging", action="quarantined", lot="TANK-2-2612")
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "feed_lot", "TANK-2-2612"))
    engine.apply(line.event("MIX-1", "flow", 1000))
    clock.tick(30_000)
    engine.apply(line.event("MIX-1", "flow", 1500))  # 50 L (10 L units of 0.1 L)
    clock.tick(30_000)
    engine.apply(line.event("MIX-1", "flow", 1500, at=clock.now))
    await commit(engine, store)
    water = postings(await outbox(store), "RM-WATER")
    held = sum((m.held.quantity for m in water if m.held), Decimal(0))
    assert held > 0
    assert all(m.held is None or m.held.lot == "TANK-2-2612" for m in water)
    before = {lot.lot: lot.quantity for lot in engine.lots}

    reply = await mes.send("lot-staging", action="released", lot="TANK-2-2612")
    assert reply.result == "accepted"
    flushed = postings(await outbox(store), "RM-WATER")[-1]
    assert flushed.held_released == held
    assert [(m.lot, m.quantity) for m in flushed.lots] == [("TANK-2-2612", held)]
    # drawn from its own lot, never first-expiry-first from another tank
    after = {lot.lot: lot.quantity for lot in engine.lots}
    assert {k: before[k] - after[k] for k in after if before[k] != after[k]} == {
        "TANK-2-2612": held
    }


async def test_lot_staging_actions(tmp_path: Path, store: Store) -> None:
    engine, mes, _, _ = await setup(tmp_path, store)
    assert (
        await mes.send("lot-staging", action="returned", lot="PERF-0042", quantity="0.5")
    ).result == "accepted"
    assert lot_balance(engine, "PERF-0042") == Decimal("1.500")
    await mes.send("lot-staging", action="quarantined", lot="PERF-0042")
    assert next(x for x in engine.lots if x.lot == "PERF-0042").status is LotStatus.QUARANTINED
    await mes.send("lot-staging", action="released", lot="PERF-0042")
    assert next(x for x in engine.lots if x.lot == "PERF-0042").status is LotStatus.RELEASED
    await mes.send("lot-staging", action="rebinned", lot="PERF-0042", work_centre="FILL-1")
    lot = next(x for x in engine.lots if x.lot == "PERF-0042")
    assert (lot.order, lot.work_centre) == (None, "FILL-1")


async def test_a_lot_rebinned_elsewhere_is_not_drawn(tmp_path: Path, store: Store) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    await mes.send("lot-staging", action="rebinned", lot="PERF-0042", order="WO-8")
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 5))
    await commit(engine, store)
    (cap,) = postings(await outbox(store), "RM-PERFUME")
    assert cap.lots == ()
    assert cap.held is not None
    assert cap.held.reason == "no_stage"
    await mes.send("lot-staging", action="rebinned", lot="PERF-0042")  # back to the line
    cap = postings(await outbox(store), "RM-PERFUME")[-1]
    assert [(m.lot, m.quantity) for m in cap.lots] == [("PERF-0042", Decimal("0.005"))]


# ------------------------------------------------------------------------------ work orders


async def test_counts_for_an_unknown_order_post_once_it_is_released(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-9"))
    engine.apply(line.event("MIX-1", "good", 4))
    await commit(engine, store)
    (unknown,) = exceptions(await outbox(store), "unknown_order")
    assert postings(await outbox(store)) == []
    reply = await mes.send(
        "work-order",
        action="release",
        order="WO-9",
        product="FG-100",
        quantity="40",
        finished_lot="FG-2611-09",
        work_centre="FILL-1",
    )
    assert reply.result == "accepted"
    messages = await outbox(store)
    confirmation = [m for m in messages if isinstance(m, ProductionConfirmation)]
    assert [(m.order, m.good) for m in confirmation] == [("WO-9", Decimal(4))]
    assert {m.finished_lot for m in postings(messages)} == {"FG-2611-09"}
    assert [m.resolves for m in exceptions(messages, "unknown_order")] == [
        None,
        unknown.message_id,
    ]
    # the release is kept: a restarted engine knows the order without the orders file
    again = await Engine.load(
        engine.config, store, MASTER, ORDERS, LOTS, mes.clock, master_doc=MASTER_DOC
    )
    assert again.orders["WO-9"].finished_lot == "FG-2611-09"
    assert again.order_states["WO-9"].revision == "C"


async def test_a_release_pins_its_revision_and_is_not_changed(tmp_path: Path, store: Store) -> None:
    _, mes, _, _ = await setup(tmp_path, store)
    fields = {"action": "release", "order": "WO-10", "product": "FG-100", "quantity": "10"}
    assert (await mes.send("work-order", revision="B", **fields)).result == "accepted"
    assert (await mes.send("work-order", revision="B", **fields)).result == "accepted"  # same
    other = await mes.send("work-order", revision="C", **fields)
    assert other.result == "rejected"
    assert other.reason is not None
    assert "already released" in other.reason


async def test_counts_for_a_held_order_are_kept_until_it_is_started(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 2))
    assert (await mes.send("work-order", action="hold", order="WO-7")).result == "accepted"
    engine.apply(line.event("MIX-1", "good", 5))
    engine.apply(line.event("MIX-1", "good", 6))
    await commit(engine, store)
    messages = await outbox(store)
    assert [m.good for m in messages if isinstance(m, ProductionConfirmation)] == [Decimal(2)]
    (held,) = exceptions(messages, "order_held")  # once, not per count
    assert (await mes.send("work-order", action="start", order="WO-7")).result == "accepted"
    messages = await outbox(store)
    goods = [m.good for m in messages if isinstance(m, ProductionConfirmation)]
    assert goods == [Decimal(2), Decimal(3), Decimal(1)]
    assert [m.resolves for m in exceptions(messages, "order_held")] == [None, held.message_id]


async def test_close_reports_variance_genealogy_and_remnants(tmp_path: Path, store: Store) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 100))
    await commit(engine, store)
    assert lot_balance(engine, "PERF-0042") == Decimal("1.900")
    reply = await mes.send(
        "work-order",
        action="close",
        order="WO-7",
        remnants=[{"lot": "PERF-0042", "quantity": "1.895"}],
    )
    assert reply.result == "accepted"
    messages = await outbox(store)
    (variance,) = [m for m in messages if isinstance(m, OrderVariance)]
    (genealogy,) = [m for m in messages if isinstance(m, Genealogy)]
    assert {variance.message_id, genealogy.message_id} <= set(reply.produced)
    cap = next(line for line in variance.lines if line.material == "RM-PERFUME")
    assert (cap.theoretical, cap.issued, cap.residual, cap.actual) == (
        Decimal("0.1"),
        Decimal("0.1"),
        Decimal("0.005"),
        Decimal("0.105"),
    )
    assert cap.variance == Decimal("0.005")
    assert cap.flagged  # 5 % over a 2 % threshold
    assert [(r.lot, r.balance, r.quantity, r.residual) for r in variance.remnants] == [
        ("PERF-0042", Decimal("1.900"), Decimal("1.895"), Decimal("0.005"))
    ]
    assert lot_balance(engine, "PERF-0042") == 0  # back in stock: no longer on the line
    links = {(g.material, g.lot): g.quantity for g in genealogy.components}
    assert links[("RM-PERFUME", "PERF-0042")] == Decimal("0.1")
    assert genealogy.good == Decimal(100)
    # counts after the close are kept, never posted to a closed order
    engine.apply(line.event("MIX-1", "good", 101))
    await commit(engine, store)
    assert len(exceptions(await outbox(store), "order_closed")) == 1
    assert engine.order_states["WO-7"].pending
    again = await mes.send("work-order", action="start", order="WO-7")
    assert again.result == "rejected"


async def test_a_flagged_variance_stays_open_until_someone_approves_it(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 100))
    await commit(engine, store)
    close = await mes.send(
        "work-order",
        action="close",
        order="WO-7",
        remnants=[{"lot": "PERF-0042", "quantity": "1.895"}],  # 5 % over on RM-PERFUME
    )
    messages = await outbox(store)
    (variance,) = [m for m in messages if isinstance(m, OrderVariance)]
    (opened,) = exceptions(messages, "usage_variance")
    assert opened.message_id in close.produced
    assert opened.details == {"variance_message_id": variance.message_id}
    assert opened.order == "WO-7"
    assert "RM-PERFUME" in opened.text
    assert [e["code"] for e in engine.status_figures()["open_exceptions"]] == ["usage_variance"]

    fields = {"exception_id": opened.message_id, "reason_code": "SPILL", "requested_by": "qa-lead"}
    before = await snapshot(store)
    for action, reason in (
        ("discard", "action: a usage variance is approved (action approve), not discarded"),
        ("post", "action: a usage variance is approved (action approve), not posted"),
    ):
        refused = await mes.send("exception-resolution", action=action, **fields)
        assert (refused.result, refused.reason) == ("rejected", reason)
    assert await snapshot(store) == before

    approved = await mes.send(
        "exception-resolution", action="approve", comment="tube line purge, see shift log", **fields
    )
    assert approved.result == "accepted", approved.reason
    resolved = exceptions(await outbox(store), "usage_variance")[-1]
    assert resolved.resolves == opened.message_id
    assert resolved.text == (
        "resolved: the usage variance of order WO-7 is approved by qa-lead (SPILL): "
        "tube line purge, see shift log"
    )
    assert engine.status_figures()["open_exceptions"] == []
    again = await mes.send("exception-resolution", action="approve", **fields)
    assert again.result == "rejected"  # approved once


async def test_approve_is_only_for_a_usage_variance(tmp_path: Path, store: Store) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-404"))
    engine.apply(line.event("MIX-1", "good", 4))
    await commit(engine, store)
    (unknown,) = exceptions(await outbox(store), "unknown_order")
    reply = await mes.send(
        "exception-resolution",
        exception_id=unknown.message_id,
        action="approve",
        reason_code="TEST",
        requested_by="jdoe",
    )
    assert (reply.result, reply.reason) == (
        "rejected",
        "action: approve is for a usage_variance exception, not unknown_order",
    )
    assert engine.order_states["WO-404"].pending  # kept


# ------------------------------------------------------------------------------ reversal


async def test_a_reversal_posts_a_compensating_message(tmp_path: Path, store: Store) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 10))
    await commit(engine, store)
    (original,) = postings(await outbox(store), "RM-PERFUME")
    balance = lot_balance(engine, "PERF-0042")
    reply = await mes.send(
        "reversal", message_id=original.message_id, reason_code="WRONG_LOT", requested_by="jdoe"
    )
    assert reply.result == "accepted", reply.reason
    compensating = postings(await outbox(store), "RM-PERFUME")[-1]
    assert compensating.message_id in reply.produced
    assert compensating.reverses == original.message_id
    assert compensating.reversal is not None
    assert compensating.reversal.requested_by == "jdoe"
    assert compensating.quantity == -original.quantity
    assert [(m.lot, m.quantity) for m in compensating.lots] == [
        (m.lot, -m.quantity) for m in original.lots
    ]
    assert compensating.issued == 0
    assert lot_balance(engine, "PERF-0042") == balance + original.quantity
    # the next count posts only what is new: the reversed quantity is not posted again
    engine.apply(line.event("MIX-1", "good", 12))
    await commit(engine, store)
    latest = postings(await outbox(store), "RM-PERFUME")[-1]
    assert (latest.quantity, latest.issued) == (Decimal("0.002"), Decimal("0.002"))
    twice = await mes.send(
        "reversal", message_id=original.message_id, reason_code="WRONG_LOT", requested_by="jdoe"
    )
    assert twice.result == "rejected"
    assert twice.reason is not None
    assert "already reversed" in twice.reason
    unknown = await mes.send("reversal", message_id="nope", reason_code="X", requested_by="jdoe")
    assert unknown.result == "rejected"


# ------------------------------------------------------------------------------ master data


async def test_master_data_adds_a_revision_and_never_changes_one(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, _, _ = await setup(tmp_path, store)
    doc = json.loads((Path(__file__).parents[1] / "config" / "masterdata.json").read_text())
    bom = next(b for b in doc["boms"] if b["product"] == "FG-100" and b["revision"] == "C")
    new = {**bom, "revision": "D", "effective_from": "2027-01-01T00:00:00Z"}
    reply = await mes.send("master-data", master_data={"boms": [new]})
    assert reply.result == "accepted", reply.reason
    assert [b.revision for b in engine.master.revisions("FG-100")][-1] == "D"
    assert await store.get_masterdata("document", "masterdata") == engine.master_doc
    changed = {**bom, "base_quantity": "2"}
    refused = await mes.send("master-data", master_data={"boms": [changed]})
    assert refused.result == "rejected"
    assert refused.reason is not None
    assert "never changes" in refused.reason
    unit = await mes.send(
        "master-data",
        master_data={"materials": [{"id": "RM-PERFUME", "uom": "L", "increment": "1"}]},
    )
    assert unit.result == "rejected"


# ------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    ("kind", "payload", "names"),
    [
        ("work-order", b"{not json", "malformed JSON"),
        ("work-order", b"[1, 2]", "JSON object"),
        (
            "work-order",
            b'{"schema": "edge-agent/work-order", "version": 2, "command_id": "x"}',
            "unknown schema version 2",
        ),
        (
            "work-order",
            b'{"schema": "edge-agent/work-order", "version": 1, "command_id": "x", '
            b'"action": "hold", "order": 7}',
            "order: Input should be a valid string",
        ),
        (
            "work-order",
            b'{"schema": "edge-agent/work-order", "version": 1, "command_id": "x", '
            b'"action": "hold", "order": "WO-404"}',
            "unknown order 'WO-404'",
        ),
        (
            "lot-staging",
            b'{"schema": "edge-agent/lot-staging", "version": 1, "command_id": "x", '
            b'"action": "returned", "lot": "PERF-0042", "quantity": "2.001"}',
            "never goes below zero",
        ),
        ("lot-staging", b'{"padding": "' + b"x" * 1_100_000 + b'"}', "over the limit"),
        ("recipe", b"{}", "unknown command kind 'recipe'"),
    ],
)
async def test_a_bad_command_is_rejected_and_changes_nothing(
    tmp_path: Path, store: Store, kind: str, payload: bytes, names: str
) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    await commit(engine, store)
    before = await snapshot(store)
    reply = await mes.raw(kind, payload)
    assert reply.result == "rejected"
    assert reply.reason is not None
    assert names in reply.reason
    assert await snapshot(store) == before
    # and the engine goes on
    engine.apply(line.event("MIX-1", "good", 1))
    await commit(engine, store)
    assert postings(await outbox(store), "RM-PERFUME")


async def test_a_command_id_is_applied_once(tmp_path: Path, store: Store) -> None:
    engine, mes, _, _ = await setup(tmp_path, store)
    fields = {"action": "returned", "lot": "PERF-0042", "quantity": "0.010"}
    first = await mes.send("lot-staging", command_id="ret-1", **fields)
    second = await mes.send("lot-staging", command_id="ret-1", **fields)
    assert (first.result, first.duplicate, second.result, second.duplicate) == (
        "accepted",
        False,
        "accepted",
        True,
    )
    assert lot_balance(engine, "PERF-0042") == Decimal("1.990")
    reused = await mes.send("lot-staging", command_id="ret-1", **{**fields, "quantity": "0.005"})
    assert reused.result == "rejected"
    assert lot_balance(engine, "PERF-0042") == Decimal("1.990")
    # and after a restart: the command ids are in the store
    again = await Engine.load(
        engine.config, store, MASTER, ORDERS, LOTS, mes.clock, master_doc=MASTER_DOC
    )
    mes.engine = again
    third = await mes.send("lot-staging", command_id="ret-1", **fields)
    assert third.duplicate
    assert lot_balance(again, "PERF-0042") == Decimal("1.990")


# ------------------------------------------------------------------------------ time


async def test_postings_are_held_under_clock_skew_and_released_when_time_is_trusted(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, clock = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    skew = timedelta(seconds=30)
    await mes.heartbeat(skew)
    (alarm,) = exceptions(await outbox(store), "clock_unsynchronized")
    assert not engine.clock_state.trusted
    engine.apply(line.event("MIX-1", "good", 10))
    await commit(engine, store)
    assert postings(await outbox(store)) == []  # held, not lost
    assert engine.work_centres["MIX-1"].counters["good"].raw == 10  # counting goes on
    held_at = clock.now
    # a restart while held keeps the held postings
    engine = await Engine.load(engine.config, store, MASTER, ORDERS, LOTS, clock)
    mes.engine = engine
    await mes.heartbeat(-timedelta(milliseconds=200))
    messages = await outbox(store)
    released = postings(messages, "RM-PERFUME")
    assert [m.quantity for m in released] == [Decimal("0.010")]
    (cap,) = released
    assert cap.clock is not None
    assert cap.clock.offset_s == Decimal(30)
    assert cap.clock.agent_time == held_at
    assert cap.created_at == held_at - skew
    assert cap.trigger.source_time == held_at - timedelta(milliseconds=0)
    assert [m.resolves for m in exceptions(messages, "clock_unsynchronized")] == [
        None,
        alarm.message_id,
    ]


async def test_a_plc_clock_ahead_holds_postings(tmp_path: Path, store: Store) -> None:
    engine, _, line, clock = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    ahead = line.event("MIX-1", "good", 3)
    ahead = replace(ahead, source_time=clock.now + timedelta(minutes=5))
    engine.apply(ahead)
    await commit(engine, store)
    assert exceptions(await outbox(store), "clock_unsynchronized")
    assert postings(await outbox(store)) == []
    later = line.event("MIX-1", "good", 4)
    engine.apply(replace(later, source_time=clock.now + timedelta(minutes=5)))  # still ahead
    await commit(engine, store)
    assert postings(await outbox(store)) == []
    engine.apply(line.event("MIX-1", "scale.tare", Decimal(0)))  # the PLC's clock is right again
    await commit(engine, store)
    assert [m.quantity for m in postings(await outbox(store), "RM-PERFUME")] == [
        Decimal("0.003"),
        Decimal("0.001"),
    ]


def _wire(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------ resolutions


async def jumpy(tmp_path: Path, store: Store) -> tuple[Engine, Mes, Line]:
    """The example line with MIX-1's good counter limited to 5 tubes a second."""
    config = make_config(tmp_path)
    mix = config.sources[0]
    assert mix.signals.good is not None
    good = mix.signals.good.model_copy(update={"max_rate": Decimal(5)})
    signals = mix.signals.model_copy(update={"good": good})
    config = config.model_copy(
        update={"sources": (mix.model_copy(update={"signals": signals}), *config.sources[1:])}
    )
    clock = Clock()
    engine = await Engine.load(config, store, MASTER, ORDERS, LOTS, clock, master_doc=MASTER_DOC)
    engine.connected = dict.fromkeys(engine.connected, True)
    return engine, Mes(engine, store, clock), Line(clock)


@pytest.mark.parametrize("action", ["post", "discard"])
async def test_an_implausible_counter_jump_waits_for_the_mes(
    tmp_path: Path, store: Store, action: str
) -> None:
    engine, mes, line = await jumpy(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 3))
    engine.apply(line.event("MIX-1", "good", 1000))  # 997 tubes in 10 ms
    engine.apply(line.event("MIX-1", "good", 1003, at=mes.clock.tick(2000)))  # 3 in 2 s: fine
    await commit(engine, store)
    messages = await outbox(store)
    goods = [m.good for m in messages if isinstance(m, ProductionConfirmation)]
    assert goods == [Decimal(3), Decimal(3)]  # the jump is kept, not posted
    (jump,) = exceptions(messages, "counter_jump")
    assert jump.details["rise"] == "997"
    assert engine.status_figures()["open_exceptions"][0]["code"] == "counter_jump"
    reply = await mes.send(
        "exception-resolution",
        exception_id=jump.message_id,
        action=action,
        reason_code="CHECKED",
        requested_by="jdoe",
    )
    assert reply.result == "accepted", reply.reason
    messages = await outbox(store)
    goods = [m.good for m in messages if isinstance(m, ProductionConfirmation)]
    assert goods == ([Decimal(3), Decimal(3), Decimal(997)] if action == "post" else goods[:2])
    assert [m.resolves for m in exceptions(messages, "counter_jump")] == [None, jump.message_id]
    assert [e["code"] for e in engine.open_exceptions.values() if e["code"] == "counter_jump"] == []
    assert engine.parked == {}
    again = await mes.send(
        "exception-resolution",
        exception_id=jump.message_id,
        action="post",
        reason_code="CHECKED",
        requested_by="jdoe",
    )
    assert again.result == "rejected"  # resolved once: not an open exception any more


async def test_counts_kept_for_an_unknown_order_can_be_discarded(
    tmp_path: Path, store: Store
) -> None:
    engine, mes, line, _ = await setup(tmp_path, store)
    engine.apply(line.event("MIX-1", "order", "WO-404"))
    engine.apply(line.event("MIX-1", "good", 4))
    await commit(engine, store)
    (unknown,) = exceptions(await outbox(store), "unknown_order")
    fields = {"exception_id": unknown.message_id, "reason_code": "TEST", "requested_by": "jdoe"}
    post = await mes.send("exception-resolution", action="post", **fields)
    assert post.result == "rejected"
    assert post.reason is not None
    assert "released" in post.reason
    assert engine.order_states["WO-404"].pending  # a rejected command changed nothing
    discard = await mes.send("exception-resolution", action="discard", **fields)
    assert discard.result == "accepted"
    assert engine.order_states["WO-404"].pending == []
    resolved = exceptions(await outbox(store), "unknown_order")[-1]
    assert resolved.resolves == unknown.message_id
    assert "discard by jdoe" in resolved.text


async def test_an_exception_that_clears_by_itself_is_not_resolved_by_command(
    tmp_path: Path, store: Store
) -> None:
    lots = [lot for lot in LOTS if lot.material != "RM-PERFUME"]
    engine, mes, line, _ = await setup(tmp_path, store, lots)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 10))
    await commit(engine, store)
    (held,) = exceptions(await outbox(store), "lot_held")
    reply = await mes.send(
        "exception-resolution",
        exception_id=held.message_id,
        action="discard",
        reason_code="X",
        requested_by="jdoe",
    )
    assert reply.result == "rejected"
    assert reply.reason is not None
    assert "clears by itself" in reply.reason
