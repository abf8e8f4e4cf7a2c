"""The engine on the example line, fed SignalEvents directly, with a real SQLite store.

The expected quantities are computed independently from the pure rules (one confirmation of the
whole count), so the engine's many small postings must add up to them exactly.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edge_agent.config import Config, parse_config
from edge_agent.documents import load_lots_file, load_master, load_orders_file
from edge_agent.domain.backflush import ConsumptionState, confirm
from edge_agent.domain.counters import HandshakePhase
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import PostingMethod
from edge_agent.engine import Engine
from edge_agent.errors import SignalError
from edge_agent.messages import parse_message
from edge_agent.sources import Origin, Quality, SignalEvent, SourceStatus
from edge_agent.store import Store, UnitOfWork

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
MASTER = load_master(CONFIG_DIR / "masterdata.json")
LOTS = load_lots_file(CONFIG_DIR / "lots.json", MASTER)
ORDERS = load_orders_file(CONFIG_DIR / "orders.json", MASTER)


def make_config(tmp_path: Path, **source_extra: Any) -> Config:
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["store"]["path"] = str(tmp_path / "agent.db")
    for s in data["sources"]:
        s.update(source_extra)
    return parse_config(data, CONFIG_DIR)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, ms: int = 10) -> datetime:
        self.now += timedelta(milliseconds=ms)
        return self.now


class Line:
    """Events as the two example sources would emit them, with increasing source times."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def event(
        self,
        wc: str,
        signal: str,
        value: object,
        quality: Quality = Quality.GOOD,
        status: str = "Good",
        origin: Origin = Origin.CHANGE,
        at: datetime | None = None,
    ) -> SignalEvent:
        t = at or self.clock.tick()
        return SignalEvent(
            source="mix-plc" if wc == "MIX-1" else "fill-plc",
            work_centre=wc,
            signal=signal,
            address=f"ns=2;s={wc}.{signal}",
            value=value,  # type: ignore[arg-type]
            quality=quality,
            status=status,
            source_time=t,
            received_at=t,
            origin=origin,
        )


class Writer:
    """Records acknowledge writes; fails while ``down`` (the PLC connection is gone)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, bool | int]] = []
        self.down = False

    async def write(self, source: str, signal: str, value: bool | int) -> None:
        if self.down:
            raise SignalError(f"{source}: not connected")
        self.writes.append((source, signal, value))


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


async def load(config: Config, store: Store, clock: Clock) -> Engine:
    engine = await Engine.load(config, store, MASTER, ORDERS, LOTS, clock)
    engine.connected = dict.fromkeys(engine.connected, True)
    return engine


async def commit(engine: Engine, store: Store) -> None:
    uow = UnitOfWork()
    engine.stage(uow)
    await store.commit_units([uow])


async def outbox(store: Store) -> list[Any]:
    return [parse_message(r.payload) for r in await store.outbox_batch(100_000)]


def consumed(messages: Iterable[Any]) -> dict[tuple[str, str], Decimal]:
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for m in messages:
        if m.schema_name == "edge-agent/material-consumed":
            totals[(m.order, m.material)] += m.quantity
    return dict(totals)


def expected(order: str, operation: str, good: int, scrap: int) -> dict[tuple[str, str], Decimal]:
    """One confirmation of the whole count: the rounded theoretical total per material."""
    bom = explode(MASTER, MASTER.bom("FG-100", "C", T0), T0)
    result = confirm(MASTER, bom, ConsumptionState(), operation, Decimal(good), Decimal(scrap))
    return {(order, p.material): p.quantity for p in result.postings if p.quantity}


@pytest.mark.asyncio
async def test_counter_deltas_add_up_to_the_theoretical_total(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 0))
    for good in (7, 19, 19, 40, 41, 100, 133):  # 19 twice: a duplicate counts once
        engine.apply(line.event("MIX-1", "good", good))
    engine.apply(line.event("MIX-1", "scrap", 3))
    await commit(engine, store)
    messages = await outbox(store)
    assert consumed(messages) == expected("WO-7", "10", 133, 3)
    confirmations = [m for m in messages if m.schema_name.endswith("production-confirmation")]
    assert sum(m.good for m in confirmations) == 133
    assert confirmations[-1].cumulative_scrap == 3
    ids = [m.message_id for m in messages]
    assert len(ids) == len(set(ids))
    assert all(m.trigger is not None for m in messages)


@pytest.mark.asyncio
async def test_a_value_read_again_after_a_restart_counts_nothing_new(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 50))
    await commit(engine, store)
    before = await outbox(store)

    again = await load(config, store, clock)  # the agent restarted: state from the store
    assert again.sequence == engine.sequence
    read_at = clock.now  # the PLC's value and timestamp are what they were
    again.apply(line.event("MIX-1", "order", "WO-7", origin=Origin.READ, at=read_at))
    again.apply(line.event("MIX-1", "good", 50, origin=Origin.READ, at=read_at))
    assert again.pending_messages == 0
    again.apply(line.event("MIX-1", "good", 60))  # counting goes on from 50
    await commit(again, store)
    after = await outbox(store)
    assert consumed(after) == expected("WO-7", "10", 60, 0)
    assert {m.message_id for m in before} < {m.message_id for m in after}


@pytest.mark.asyncio
async def test_a_reordered_notification_is_ignored(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    early = clock.tick()
    engine.apply(line.event("MIX-1", "good", 20))
    engine.apply(line.event("MIX-1", "good", 10, at=early))  # older than the 20: stale
    await commit(engine, store)
    assert consumed(await outbox(store)) == expected("WO-7", "10", 20, 0)


@pytest.mark.asyncio
async def test_rollover_and_reset(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "scrap", 65530))  # scrap is a 16-bit counter
    engine.apply(line.event("MIX-1", "scrap", 4))  # wrapped: 10 more
    engine.apply(line.event("MIX-1", "good", 100))
    engine.apply(line.event("MIX-1", "good", 5))  # a reset (PLC restart): 5 counted, flagged
    await commit(engine, store)
    messages = await outbox(store)
    assert consumed(messages) == expected("WO-7", "10", 105, 65540)
    resets = [m for m in messages if getattr(m, "code", None) == "counter_reset"]
    assert len(resets) == 1
    assert resets[0].details == {"previous": "100", "value": "5"}


@pytest.mark.asyncio
async def test_an_order_change_starts_counting_from_zero(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 40))
    engine.apply(line.event("MIX-1", "order", "WO-8"))
    engine.apply(line.event("MIX-1", "good", 0))  # the PLC zeroed its counter: not a reset
    engine.apply(line.event("MIX-1", "good", 25))
    await commit(engine, store)
    messages = await outbox(store)
    assert consumed(messages) == expected("WO-7", "10", 40, 0) | expected("WO-8", "10", 25, 0)
    assert not [m for m in messages if m.schema_name.endswith("exception")]


@pytest.mark.asyncio
async def test_bad_quality_never_posts_and_raises_one_exception(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 10))
    for _ in range(3):
        engine.apply(
            line.event("MIX-1", "good", 99, Quality.BAD, "BadSensorFailure"),
        )
    engine.apply(line.event("MIX-1", "good", 98, Quality.UNCERTAIN, "UncertainLastUsableValue"))
    engine.apply(line.event("MIX-1", "good", 12))
    await commit(engine, store)
    messages = await outbox(store)
    assert consumed(messages) == expected("WO-7", "10", 12, 0)
    quality = [m for m in messages if m.schema_name.endswith("exception")]
    assert [(m.code.value, m.details.get("status"), m.severity.value) for m in quality] == [
        ("signal_quality", "BadSensorFailure", "warning"),
        ("signal_quality", "UncertainLastUsableValue", "warning"),
        ("signal_quality", None, "info"),  # resolved when the signal is good again
    ]
    # each one closes the one before: the uncertain supersedes the bad, good resolves it
    assert [m.resolves for m in quality] == [None, quality[0].message_id, quality[1].message_id]
    assert engine.open_exceptions == {}


@pytest.mark.asyncio
async def test_handshake_is_processed_once_and_acknowledged_after_the_commit(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)
    writer = Writer()
    engine.apply(line.event("FILL-1", "order", "WO-7"))
    engine.apply(line.event("FILL-1", "complete_good", 120))
    engine.apply(line.event("FILL-1", "complete_scrap", 3))
    writes = engine.apply(line.event("FILL-1", "complete_request", True))
    assert [(w.signal, w.value) for w in writes] == [("complete_ack", True)]
    assert engine.work_centres["FILL-1"].handshake is HandshakePhase.COMMITTED
    await commit(engine, store)

    # the agent dies before the acknowledge is written; the PLC still shows the request
    again = await load(config, store, clock)
    writer.down = True
    writes = again.apply(line.event("FILL-1", "complete_request", True, origin=Origin.READ))
    assert again.pending_messages == 0  # not processed a second time
    await again._perform(store, writer, writes, lambda: None)
    assert again.work_centres["FILL-1"].handshake is HandshakePhase.COMMITTED  # write failed
    writer.down = False
    await again._perform(store, writer, again.retry_acknowledges(), lambda: None)
    assert writer.writes == [("fill-plc", "complete_ack", True)]
    assert again.work_centres["FILL-1"].handshake is HandshakePhase.ACKNOWLEDGED
    writes = again.apply(line.event("FILL-1", "complete_request", False))
    await again._perform(store, writer, writes, lambda: None)
    assert writer.writes[-1] == ("fill-plc", "complete_ack", False)
    assert again.work_centres["FILL-1"].handshake is HandshakePhase.IDLE

    # the next request is a new one
    again.apply(line.event("FILL-1", "complete_good", 30))
    again.apply(line.event("FILL-1", "complete_scrap", 0))
    again.apply(line.event("FILL-1", "complete_request", True))
    await commit(again, store)
    messages = await outbox(store)
    assert consumed(messages) == expected("WO-7", "20", 150, 3)
    tubes = [m for m in messages if getattr(m, "material", None) == "PK-TUBE"]
    # 126 then 31 tubes: the primary lot's last 24, then the alternate for the rest
    assert [[(lot.lot, lot.quantity, lot.substitution) for lot in m.lots] for m in tubes] == [
        [("TUBE-7781", Decimal(126), False)],
        [("TUBE-7781", Decimal(24), False), ("TUBEB-0310", Decimal(7), True)],
    ]


async def acknowledged_request(
    engine: Engine, store: Store, line: Line, writer: Writer, good: int
) -> None:
    """Request with ``good`` units processed, committed and acknowledged, as the run loop does."""
    engine.apply(line.event("FILL-1", "complete_good", good))
    engine.apply(line.event("FILL-1", "complete_scrap", 0))
    writes = engine.apply(line.event("FILL-1", "complete_request", True))
    await commit(engine, store)
    await engine._perform(store, writer, writes, lambda: None)
    assert engine.work_centres["FILL-1"].handshake is HandshakePhase.ACKNOWLEDGED


@pytest.mark.asyncio
@pytest.mark.parametrize("device_time", [True, False], ids=["opcua", "modbus"])
async def test_the_acknowledge_is_cleared_write_ahead_so_the_next_request_is_never_taken_for_it(
    tmp_path: Path, store: Store, device_time: bool
) -> None:
    """Found by the fault suite (crash point engine.after_plc_ack): the agent cleared the
    acknowledge of request N and died before committing that; the PLC raised N+1; the restarted
    agent, its committed phase saying N was not finished, took N+1 for N and acknowledged it
    unposted (a lost posting). The phase IDLE is now committed before the clear is written."""
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)
    writer = Writer()
    engine.apply(line.event("FILL-1", "order", "WO-7"))
    await acknowledged_request(engine, store, line, writer, 10)
    writes = engine.apply(line.event("FILL-1", "complete_request", False))
    assert [(w.signal, w.value) for w in writes] == [("complete_ack", False)]
    assert engine.work_centres["FILL-1"].handshake is HandshakePhase.IDLE  # before the write
    await commit(engine, store)
    await engine._perform(store, writer, writes, lambda: None)  # written; then the agent dies

    again = await load(config, store, clock)
    assert again.work_centres["FILL-1"].handshake is HandshakePhase.IDLE
    # the PLC saw the acknowledge low and raised request N+1; read after the restart
    for signal, value in (("complete_good", 20), ("complete_scrap", 1)):
        again.apply(replace(line.event("FILL-1", signal, value), device_time=device_time))
    request = line.event("FILL-1", "complete_request", True, origin=Origin.READ)
    writes = again.apply(replace(request, device_time=device_time))
    assert [(w.signal, w.value) for w in writes] == [("complete_ack", True)]
    await commit(again, store)
    assert consumed(await outbox(store)) == expected("WO-7", "20", 30, 1)


@pytest.mark.asyncio
async def test_an_acknowledge_left_high_in_idle_is_cleared_again(
    tmp_path: Path, store: Store
) -> None:
    """The agent committed IDLE and died before clearing the acknowledge: the PLC, its request
    dropped, waits for the acknowledge to go low. The restart clears it (nothing is posted)."""
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)
    writer = Writer()
    engine.apply(line.event("FILL-1", "order", "WO-7"))
    await acknowledged_request(engine, store, line, writer, 10)
    engine.apply(line.event("FILL-1", "complete_request", False))
    await commit(engine, store)  # IDLE committed; the clear never written
    posted = len(await outbox(store))

    again = await load(config, store, clock)
    writes = again.apply(line.event("FILL-1", "complete_request", False, origin=Origin.READ))
    writes += again.apply(line.event("FILL-1", "complete_ack", True, origin=Origin.READ))
    assert {(w.signal, w.value) for w in writes} == {("complete_ack", False)}
    writer.down = True  # and the write fails: it is retried once the PLC is back
    await again._perform(store, writer, writes, lambda: None)
    writer.down = False
    retry = again.retry_acknowledges()
    assert [(w.signal, w.value) for w in retry] == [("complete_ack", False)]
    await again._perform(store, writer, retry, lambda: None)
    assert writer.writes == [
        ("fill-plc", "complete_ack", True),
        ("fill-plc", "complete_ack", False),
    ]
    assert again.retry_acknowledges() == []
    assert len(await outbox(store)) == posted


@pytest.mark.asyncio
async def test_an_unknown_order_is_kept_and_posted_once_known(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await Engine.load(config, store, MASTER, {}, LOTS, clock)  # no orders known
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 30))
    engine.apply(line.event("MIX-1", "good", 45))
    await commit(engine, store)
    first = await outbox(store)
    assert consumed(first) == {}
    assert [m.code.value for m in first if m.schema_name.endswith("exception")] == ["unknown_order"]
    again = await Engine.load(config, store, MASTER, ORDERS, LOTS, clock)  # orders now known
    await commit(again, store)
    assert consumed(await outbox(store)) == expected("WO-7", "10", 45, 0)


@pytest.mark.asyncio
async def test_flow_and_weighing(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "feed_lot", "TANK-2-2611"))  # the water tank's lot
    for total in (0, 246, 551, 769, 773):  # totalizer counts of 0.01 L
        engine.apply(line.event("MIX-1", "flow", total))
    # posted per 60 s slice: a refresh past the minute closes the first
    engine.apply(
        line.event("MIX-1", "flow", 773, origin=Origin.REFRESH, at=T0 + timedelta(seconds=61))
    )
    engine.apply(line.event("MIX-1", "scale.stable", False))
    engine.apply(line.event("MIX-1", "scale.tare", Decimal("0.5")))
    engine.apply(line.event("MIX-1", "scale.weight", Decimal("1.2")))  # far off target
    taken = line.event("MIX-1", "scale.stable", True)
    engine.apply(taken)
    engine.apply(taken)  # the same notification again: not a new weighing
    engine.apply(line.event("MIX-1", "scale.stable", False))
    # 250 tubes × 0.005 kg = 1.25 kg; a double from the PLC, rounded to the 0.001 resolution
    engine.apply(line.event("MIX-1", "scale.weight", Decimal("1.7539999999999998")))
    engine.apply(line.event("MIX-1", "scale.stable", True))
    await commit(engine, store)
    messages = await outbox(store)
    totals = consumed(messages)
    assert totals[("WO-7", "RM-WATER")] == Decimal("7.7")  # 7.73 L metered, 0.1 L increment
    assert totals[("WO-7", "RM-ACTIVE")] == Decimal("1.254")
    rejected = [m for m in messages if m.schema_name.endswith("exception")]
    assert [m.details["reason"] for m in rejected] == ["out_of_tolerance"]
    weighed = [m for m in messages if getattr(m, "method", None) == PostingMethod.WEIGH.value]
    assert [lot.lot for lot in weighed[0].lots] == ["API-0077"]


@pytest.mark.asyncio
async def test_run_commits_batches_and_stops_cleanly(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    writer = Writer()
    await engine.submit(SourceStatus("mix-plc", True, "connected", clock.now))
    await engine.submit(line.event("MIX-1", "order", "WO-7"))
    for n in range(1, 201):
        await engine.submit(line.event("MIX-1", "good", n))
    commits_before = store.commits
    notified: list[int] = []
    engine.stop()
    await engine.run(store, writer, lambda: notified.append(1))
    assert store.commits - commits_before <= 2  # group commit: not one per event
    assert notified
    assert consumed(await outbox(store)) == expected("WO-7", "10", 200, 0)
    state = await store.get_state("engine")
    assert state == {"sequence": engine.sequence}
    report = await store.verify_audit()
    assert report.ok
    assert report.entries == await store.outbox_depth()
    json.dumps(engine.work_centres["MIX-1"].to_dict())  # persisted as JSON


@pytest.mark.asyncio
async def test_a_weighing_finished_while_the_agent_was_away_is_taken_once(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "scale.stable", True))  # first sight: a baseline only
    engine.apply(line.event("MIX-1", "scale.tare", Decimal("0.5")))
    await commit(engine, store)
    # the agent is away; the scale goes unstable, is loaded and settles: no event is seen
    engine.apply(line.event("MIX-1", "scale.weight", Decimal("1.75")))
    settled = line.event("MIX-1", "scale.stable", True)
    again = await load(config, store, clock)  # restarted: the reads after connecting
    for event in (
        line.event("MIX-1", "scale.weight", Decimal("1.75"), origin=Origin.READ),
        line.event("MIX-1", "scale.tare", Decimal("0.5"), origin=Origin.READ),
        settled,
        settled,
    ):
        again.apply(event)
    await commit(again, store)
    totals = consumed(await outbox(store))
    assert totals == {("WO-7", "RM-ACTIVE"): Decimal("1.250")}


@pytest.mark.asyncio
async def test_a_lost_plc_connection_is_reported_once_and_its_return_too(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    for connected in (False, False, False, True, True, False):  # retries report no news
        engine.apply(SourceStatus("mix-plc", connected, "ConnectionRefusedError", clock.tick()))
    await commit(engine, store)
    codes = [m.code.value for m in await outbox(store) if m.schema_name.endswith("exception")]
    assert codes == ["source_unreachable", "source_recovered", "source_unreachable"]


@pytest.mark.asyncio
async def test_without_device_timestamps_a_reread_never_doubles_a_weighing(
    tmp_path: Path, store: Store
) -> None:
    """Modbus stamps values with the poll time: a re-read after a restart looks "newer"."""
    clock = Clock()
    line = Line(clock)
    config = make_config(tmp_path)
    engine = await load(config, store, clock)

    def polled(signal: str, value: object, origin: Origin = Origin.CHANGE) -> SignalEvent:
        return replace(line.event("MIX-1", signal, value, origin=origin), device_time=False)

    for signal, value in (
        ("order", "WO-7"),
        ("scale.stable", False),
        ("scale.tare", Decimal("0.5")),
        ("scale.weight", Decimal("1.75")),
        ("scale.stable", True),  # the weighing: a change the agent saw
        ("scale.stable", True),  # the next poll: the same state
    ):
        engine.apply(polled(signal, value))
    await commit(engine, store)
    again = await load(config, store, clock)  # restarted: everything is read again
    for signal, value in (("scale.weight", Decimal("1.75")), ("scale.stable", True)):
        again.apply(polled(signal, value, Origin.READ))
    await commit(again, store)
    messages = await outbox(store)
    assert consumed(messages) == {("WO-7", "RM-ACTIVE"): Decimal("1.250")}
    assert not [m for m in messages if m.schema_name.endswith("exception")]


@pytest.mark.asyncio
async def test_a_new_store_never_reuses_the_message_ids_of_an_old_one(tmp_path: Path) -> None:
    """Found reading the contract: ids came from the agent id and the store's sequence alone,
    so an agent started on a new store (the damaged one set aside) sent its first messages under
    the ids the old store had used, and the MES, deduplicating by id, dropped them as repeats.
    The same store still gives the same ids (a re-send after a restart is the same message)."""
    config = make_config(tmp_path)

    async def first_ids(path: Path) -> list[str]:
        clock = Clock()
        line = Line(clock)
        async with Store.open(path) as store:
            engine = await load(config, store, clock)
            engine.apply(line.event("MIX-1", "order", "WO-7"))
            engine.apply(line.event("MIX-1", "good", 0))
            engine.apply(line.event("MIX-1", "good", 10))
            uow = UnitOfWork()
            engine.stage(uow)
            return [args[0] for op, args in uow.ops if op == "enqueue"]

    old = await first_ids(tmp_path / "old.db")
    new = await first_ids(tmp_path / "new.db")
    assert old
    assert len(new) == len(old)
    assert not set(old) & set(new)
    async with Store.open(tmp_path / "old.db") as a, Store.open(tmp_path / "new.db") as b:
        assert a.store_id
        assert b.store_id
        assert a.store_id != b.store_id
    async with Store.open(tmp_path / "old.db") as again:  # kept across opens
        assert again.store_id == a.store_id


@pytest.mark.asyncio
async def test_an_order_change_the_agent_did_not_see_is_said_not_guessed(
    tmp_path: Path, store: Store
) -> None:
    """Found by the first full fault run: an order change (counters reset with it) made while
    the PLC could not be read loses what the old order counted after the agent's last reading;
    nothing said so. Seen first in the read after a reconnect, it raises counter_reset."""
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "good", 10))
    engine.apply(line.event("MIX-1", "order", "WO-8"))  # seen live: nothing to say
    assert not [m for m in pending(engine) if getattr(m, "code", None) == "counter_reset"]
    engine.apply(line.event("MIX-1", "good", 5))
    engine.apply(line.event("MIX-1", "order", "WO-7", origin=Origin.READ))  # after a reconnect
    (said,) = [m for m in pending(engine) if getattr(m, "code", None) == "counter_reset"]
    assert said.order == "WO-8"
    assert said.details["new_order"] == "WO-7"
    assert said.details["last_reading"]
    engine.apply(line.event("MIX-1", "order", "WO-7", origin=Origin.READ))  # the same: nothing
    assert len([m for m in pending(engine) if getattr(m, "code", None) == "counter_reset"]) == 1


def pending(engine: Engine) -> list[Any]:
    return [o.message for o in engine._outgoing]
