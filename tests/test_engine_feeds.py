"""The engine's continuous feeds: a flow totalizer posted per time slice and bound to the lot in
the feed at the time, shifted by the hold-up lag (docs/feeds.md), fed SignalEvents directly, with
a real SQLite store.

The first test is the worked example of docs/feeds.md run through the engine: the same readings,
the same change-over, the same operation complete, so the same postings to the 0.1 L.
"""

from __future__ import annotations

import copy
import tomllib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import Config, parse_config
from edge_agent.documents import load_lots_file, load_master, load_orders_file
from edge_agent.domain.lots import Lot, LotStatus
from edge_agent.engine import Engine
from edge_agent.messages import parse_message
from edge_agent.sources import Origin, Quality, SignalEvent
from edge_agent.store import Store, UnitOfWork

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
MASTER = load_master(CONFIG_DIR / "masterdata.json")
ORDERS = load_orders_file(CONFIG_DIR / "orders.json", MASTER)
T8 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
STAGED = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


def water(lot: str, quantity: str = "5000.0", status: LotStatus = LotStatus.RELEASED) -> Lot:
    return Lot(lot, "RM-WATER", Decimal(quantity), STAGED, None, status)


LOTS = [
    *(
        lot
        for lot in load_lots_file(CONFIG_DIR / "lots.json", MASTER)
        if lot.material != "RM-WATER"
    ),
    water("W-0815"),
    water("W-0816"),
]


def make_config(
    tmp_path: Path, *, feed_lot: bool = True, reset: bool = False, **flow: Any
) -> Config:
    """line.toml with the mixer's water meter as a feed: 60 s slices, 30 s hold-up, the tank's
    lot on a node, and an operation-complete handshake at the mixer. The totalizer runs on
    across orders unless ``reset``."""
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["store"]["path"] = str(tmp_path / "agent.db")
    mix = next(s for s in data["sources"] if s["work_centre"] == "MIX-1")
    mix["counters_reset_on_order_change"] = reset
    signals = mix["signals"]
    signals["flow"].update({"slice_s": 60, "lag_s": "30", **flow})
    signals.pop("feed_lot", None)
    if feed_lot:
        signals["feed_lot"] = {"node": "ns=2;s=MIX-1.TankLot"}
    signals["complete_request"] = {"node": "ns=2;s=MIX-1.Complete.Request"}
    signals["complete_ack"] = {"node": "ns=2;s=MIX-1.Complete.Ack"}
    return parse_config(data, CONFIG_DIR)


def event(signal: str, value: object, at: datetime, origin: Origin = Origin.CHANGE) -> SignalEvent:
    return SignalEvent(
        source="mix-plc",
        work_centre="MIX-1",
        signal=signal,
        address=f"ns=2;s=MIX-1.{signal}",
        value=value,  # type: ignore[arg-type]
        quality=Quality.GOOD,
        status="Good",
        source_time=at,
        received_at=at,
        origin=origin,
    )


def at(minutes: int, seconds: float) -> datetime:
    return T8 + timedelta(minutes=minutes, seconds=seconds)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


async def load(config: Config, store: Store, lots: Iterable[Lot] = LOTS) -> Engine:
    engine = await Engine.load(config, store, MASTER, ORDERS, list(lots), lambda: T8)
    engine.connected = dict.fromkeys(engine.connected, True)
    return engine


async def commit(engine: Engine, store: Store) -> None:
    uow = UnitOfWork()
    engine.stage(uow)
    await store.commit_units([uow])


async def outbox(store: Store) -> list[Any]:
    return [parse_message(r.payload) for r in await store.outbox_batch(100_000)]


def water_postings(messages: Iterable[Any]) -> list[Any]:
    return [
        m
        for m in messages
        if m.schema_name == "edge-agent/material-consumed" and m.material == "RM-WATER"
    ]


def by_lot(messages: Iterable[Any]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for m in water_postings(messages):
        for movement in m.lots:
            totals[movement.lot] += movement.quantity
    return dict(totals)


def the_example(engine: Engine, *, restart_after: int | None = None) -> list[SignalEvent]:
    """docs/feeds.md: W-0815 in the tank, W-0816 in at 08:00:40, 30 s hold-up, operation 10
    completes at 08:01:17; totalizer (0.01 L counts) 1000 → 1006.75 → 1013.5 → 1019.5 L."""
    return [
        event("order", "WO-7", at(0, -5)),
        event("feed_lot", "W-0815", at(0, -5)),
        event("flow", 100_000, at(0, 0)),
        event("feed_lot", "W-0816", at(0, 40)),
        event("flow", 100_675, at(0, 45)),
        event("complete_request", True, at(1, 17)),
        event("flow", 101_350, at(1, 30)),
        event("flow", 101_950, at(2, 30)),
    ]


@pytest.mark.asyncio
async def test_the_worked_example_of_the_docs_through_the_engine(
    tmp_path: Path, store: Store
) -> None:
    engine = await load(make_config(tmp_path), store)
    for e in the_example(engine):
        engine.apply(e)
    await commit(engine, store)
    postings = water_postings(await outbox(store))
    assert [m.quantity for m in postings] == [Decimal("9.0"), Decimal("2.6"), Decimal("4.9")]
    assert [(m.window.start, m.window.end) for m in postings] == [
        (at(0, 0), at(1, 0)),
        (at(1, 0), at(1, 17)),
        (at(1, 17), at(2, 0)),
    ]
    split = postings[1].lots
    assert [(x.lot, x.quantity, x.cause) for x in split] == [
        ("W-0815", Decimal("1.5"), "slice"),
        ("W-0816", Decimal("1.1"), "changeover"),
    ]
    assert (split[0].window_to, split[1].window_from) == (at(1, 10), at(1, 10))
    assert all(m.window.lag_s == Decimal(30) for m in postings)
    assert by_lot(postings) == {"W-0815": Decimal("10.5"), "W-0816": Decimal("6.0")}
    balances = {lot.lot: lot.quantity for lot in engine.lots}
    assert balances["W-0815"] == Decimal("4989.5")
    assert balances["W-0816"] == Decimal("4994.0")
    assert postings[-1].issued == Decimal("16.5")  # the order's cumulative: the rounded total


@pytest.mark.asyncio
async def test_a_restart_mid_slice_posts_the_same(tmp_path: Path, store: Store) -> None:
    """Readings and the carry are committed with the counter state: an agent restarted between
    any two events posts exactly what one that ran through posts."""
    events = the_example(await load(make_config(tmp_path / "a"), store))
    async with Store.open(tmp_path / "through.db") as through_store:
        through = await load(make_config(tmp_path / "b"), through_store)
        for e in events:
            through.apply(e)
        await commit(through, through_store)
        expected = [
            (m.quantity, m.lots, m.window) for m in water_postings(await outbox(through_store))
        ]
    for cut in range(1, len(events)):
        async with Store.open(tmp_path / f"cut{cut}.db") as s:
            first = await load(make_config(tmp_path / "c"), s)
            for e in events[:cut]:
                first.apply(e)
            await commit(first, s)
            second = await load(make_config(tmp_path / "c"), s)
            for e in events[cut:]:
                second.apply(e)
            await commit(second, s)
            got = [(m.quantity, m.lots, m.window) for m in water_postings(await outbox(s))]
        assert got == expected, f"restart after event {cut}"


@pytest.mark.asyncio
async def test_a_quarantined_lot_in_the_feed_is_held_with_its_window(
    tmp_path: Path, store: Store
) -> None:
    lots = [lot for lot in LOTS if lot.lot != "W-0816"] + [
        water("W-0816", status=LotStatus.QUARANTINED)
    ]
    engine = await load(make_config(tmp_path), store, lots)
    for e in the_example(engine):
        engine.apply(e)
    await commit(engine, store)
    messages = await outbox(store)
    postings = water_postings(messages)
    assert [m.quantity for m in postings] == [Decimal("9.0"), Decimal("2.6"), Decimal("4.9")]
    assert by_lot(postings) == {"W-0815": Decimal("10.5")}
    assert postings[1].held is not None
    assert (postings[1].held.quantity, postings[1].held.reason) == (Decimal("1.1"), "quarantined")
    assert postings[1].held.lot == "W-0816"
    held = [m for m in messages if m.schema_name.endswith("exception") and m.code == "lot_held"]
    # one exception while it lasts (the postings' held parts carry every quantity)
    assert [(m.details["lot"], m.details["quantity"]) for m in held] == [("W-0816", "1.1")]
    assert engine.open_exceptions["lot_held/WO-7/10/RM-WATER/W-0816"]["message_id"] == (
        held[0].message_id
    )
    assert {lot.lot: lot.quantity for lot in engine.lots}["W-0816"] == Decimal("5000.0")


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.asyncio
async def test_an_order_change_ends_the_slice(tmp_path: Path, store: Store, reset: bool) -> None:
    """Without a counter reset the totalizer runs on: the slice is cut at the change, by
    interpolation. With a reset the PLC zeroed the totalizer at the change: what came after it
    is the new order's."""
    engine = await load(make_config(tmp_path, reset=reset), store)
    engine.apply(event("order", "WO-7", at(0, -5)))
    engine.apply(event("feed_lot", "W-0815", at(0, -5)))
    engine.apply(event("flow", 1_000, at(0, 0)))
    engine.apply(event("flow", 2_000, at(0, 10)))  # 10 L in 10 s
    engine.apply(event("order", "WO-8", at(0, 15)))
    if reset:
        engine.apply(event("flow", 500, at(0, 20)))  # counted from 0 at the change
    else:
        engine.apply(event("flow", 3_000, at(0, 20)))  # 10 L more, half of it before the change
    engine.apply(event("flow", 3_000 if not reset else 500, at(1, 1), Origin.REFRESH))
    await commit(engine, store)
    postings = water_postings(await outbox(store))
    windows = [(m.order, m.window.start, m.window.end, m.quantity) for m in postings]
    if reset:  # counted from the first change on: 10 L by 08:00:00, 10 L more by the change
        assert windows == [
            ("WO-7", at(0, -5), at(0, 0), Decimal("10.0")),
            ("WO-7", at(0, 0), at(0, 15), Decimal("10.0")),
            ("WO-8", at(0, 15), at(1, 0), Decimal("5.0")),
        ]
    else:  # the first reading is where counting starts; 5 of the last 10 L before the change
        assert windows == [
            ("WO-7", at(0, 0), at(0, 15), Decimal("15.0")),
            ("WO-8", at(0, 15), at(1, 0), Decimal("5.0")),
        ]


@pytest.mark.asyncio
async def test_a_still_meter_writes_nothing_until_a_slice_closes(
    tmp_path: Path, store: Store
) -> None:
    engine = await load(make_config(tmp_path), store)
    engine.apply(event("order", "WO-7", at(0, -5)))
    engine.apply(event("feed_lot", "W-0815", at(0, -5)))
    engine.apply(event("flow", 1_000, at(0, 0)))
    engine.apply(event("flow", 1_250, at(0, 5)))
    await commit(engine, store)
    for second in range(6, 60):
        engine.apply(event("flow", 1_250, at(0, second), Origin.REFRESH))
        assert not engine._dirty, f"a refresh at {second} s changed the state"
    engine.apply(event("flow", 1_250, at(1, 0), Origin.REFRESH))
    await commit(engine, store)
    assert [m.quantity for m in water_postings(await outbox(store))] == [Decimal("2.5")]


@pytest.mark.asyncio
async def test_without_a_feed_lot_signal_slices_are_bound_first_expiry_first(
    tmp_path: Path, store: Store
) -> None:
    engine = await load(make_config(tmp_path, feed_lot=False), store)
    engine.apply(event("order", "WO-7", at(0, -5)))
    engine.apply(event("flow", 1_000, at(0, 0)))
    engine.apply(event("flow", 4_333, at(0, 50)))
    engine.apply(event("flow", 4_333, at(2, 0), Origin.REFRESH))
    await commit(engine, store)
    postings = water_postings(await outbox(store))
    assert [m.quantity for m in postings] == [Decimal("33.3")]
    assert postings[0].window.lag_s is None
    assert [(x.lot, x.quantity) for x in postings[0].lots] == [("W-0815", Decimal("33.3"))]


# --------------------------------------------------------------------------- a property


@st.composite
def feed_runs(draw: st.DrawFn) -> list[tuple[str, object, int]]:
    """A random run at the mixer: (signal, value, milliseconds since 08:00) with the totalizer
    rising in random steps at random moments, tank lot changes, operation completes (request up
    and down) and refreshes; times strictly increase."""
    ms, counts, request = 0, 100_000, False
    steps: list[tuple[str, object, int]] = [("feed_lot", "W-0815", -1), ("flow", counts, 0)]
    for _ in range(draw(st.integers(1, 40))):
        ms += draw(st.integers(1, 40_000))
        kind = draw(st.sampled_from(["flow", "flow", "flow", "lot", "complete", "refresh"]))
        if kind == "flow":
            counts += draw(st.integers(0, 5_000))
            steps.append(("flow", counts, ms))
        elif kind == "refresh":
            steps.append(("refresh", counts, ms))
        elif kind == "lot":
            steps.append(("feed_lot", draw(st.sampled_from(["W-0815", "W-0816", "W-BAD"])), ms))
        else:
            request = not request
            steps.append(("complete_request", request, ms))
    steps.append(("refresh", counts, ms + 3_600_000))  # an hour later: every slice is closed
    return steps


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    run=feed_runs(),
    lag_s=st.sampled_from(["0", "0.5", "7", "30", "95"]),
    slice_s=st.sampled_from([1, 10, 60]),
    cut=st.integers(0, 50),
)
@pytest.mark.asyncio
async def test_slices_add_up_to_the_totalizer_whatever_the_lots_lag_and_restarts(
    tmp_path_factory: pytest.TempPathFactory,
    run: list[tuple[str, object, int]],
    lag_s: str,
    slice_s: int,
    cut: int,
) -> None:
    """Whatever the slice length, the lag, the lot changes, the operation completes and where
    the agent restarts: the water posted is the totalizer's delta rounded to 0.1 L, every posted
    litre is drawn from a lot or held (W-BAD is not staged: held), and the lots' balances went
    down by exactly what was drawn from them."""
    tmp = tmp_path_factory.mktemp("feed")
    config = make_config(tmp, lag_s=lag_s, slice_s=slice_s)
    async with Store.open(tmp / "agent.db") as s:
        engine = await load(config, s)
        engine.apply(event("order", "WO-7", at(0, -5)))
        for i, (signal, value, ms) in enumerate(run):
            if i == cut:
                await commit(engine, s)
                engine = await load(config, s)
            when = T8 + timedelta(milliseconds=ms)
            if signal == "refresh":
                engine.apply(event("flow", value, when, Origin.REFRESH))
            else:
                engine.apply(event(signal, value, when))
        await commit(engine, s)
        postings = water_postings(await outbox(s))
    metered = Decimal(run[-1][1]) / 100 - 1000  # type: ignore[arg-type]
    assert sum(m.quantity for m in postings) == metered.quantize(Decimal("0.1"), ROUND_HALF_UP)
    for m in postings:
        held = m.held.quantity if m.held else Decimal(0)
        assert sum(x.quantity for x in m.lots) + held == m.quantity
        assert all(x.lot != "W-BAD" for x in m.lots)
    drawn = by_lot(postings)
    balances = {lot.lot: lot.quantity for lot in engine.lots}
    for lot in ("W-0815", "W-0816"):
        assert balances[lot] == Decimal("5000.0") - drawn.get(lot, Decimal(0))
