"""Signal values the agent cannot use, in the engine: the wrong type, NaN and infinity, negative
counts, fractions where counts are expected, values past a counter's width.

Required of each: no posting, no crash, one ``signal_invalid`` exception per transition naming
the signal, its node or register and the value; the last valid state untouched, so that when a
valid value returns counting resumes from the last valid value (the whole delta, once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_agent.engine import Engine
from edge_agent.messages import ExceptionMessage, MaterialConsumed, ProductionConfirmation
from edge_agent.sources import Origin, Quality
from edge_agent.store import Store
from tests.test_engine import (
    LOTS,
    MASTER,
    ORDERS,
    T0,
    Clock,
    Line,
    commit,
    consumed,
    expected,
    load,
    make_config,
    outbox,
)
from tests.test_engine_commands import MASTER_DOC

CONFIG = make_config(Path("/nonexistent-signal-values"))


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "agent.db") as s:
        yield s


asyncio = pytest.mark.asyncio

invalid_counts: list[Any] = [
    "12",
    True,
    None,
    Decimal("12.5"),
    Decimal("12"),  # a Double on a counter node: counts are integers
    Decimal("NaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    -5,
    2**32,  # past a 32-bit counter
]


def messages(engine: Engine) -> list[Any]:
    return [o.message for o in engine._outgoing]


def invalid(msgs: list[Any]) -> list[ExceptionMessage]:
    return [m for m in msgs if isinstance(m, ExceptionMessage) and m.code.value == "signal_invalid"]


@asyncio
@pytest.mark.parametrize("value", invalid_counts, ids=repr)
@pytest.mark.parametrize("signal", ["good", "scrap"])
async def test_an_invalid_counter_value_posts_nothing_and_counting_resumes(
    tmp_path: Path, store: Store, signal: str, value: Any
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", signal, 10))
    for _ in range(3):
        assert engine.apply(line.event("MIX-1", signal, value)) == []
    state = engine.work_centres["MIX-1"].counters[signal]
    assert state.raw == 10  # the last valid reading stands
    engine.apply(line.event("MIX-1", signal, 14))
    await commit(engine, store)
    msgs = await outbox(store)
    good, scrap = (14, 0) if signal == "good" else (0, 14)
    assert consumed(msgs) == expected("WO-7", "10", good, scrap)
    raised, resolved = invalid(msgs)
    address = f"ns=2;s=MIX-1.{signal}"
    assert raised.severity.value == "error"
    assert signal in raised.text
    assert address in raised.text
    assert raised.details["value"] in raised.text
    assert raised.details["address"] == address
    assert raised.trigger is not None
    assert raised.trigger.value == (None if value is None else str(value))
    assert resolved.resolves == raised.message_id
    assert engine.open_exceptions == {}


@pytest.mark.parametrize(
    "value",
    [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), -1, Decimal("-0.50"), "7", None],
    ids=repr,
)
@asyncio
async def test_an_invalid_totalizer_value_is_not_metered(
    tmp_path: Path, store: Store, value: Any
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "feed_lot", "TANK-2-2611"))
    for total in (0, 246):
        engine.apply(line.event("MIX-1", "flow", total))
    engine.apply(line.event("MIX-1", "flow", value))
    engine.apply(line.event("MIX-1", "flow", value))
    assert engine.work_centres["MIX-1"].counters["flow"].raw == 246
    for total in (551, 769, 773):
        engine.apply(line.event("MIX-1", "flow", total))
    # posted per 60 s slice: a refresh past the minute closes the first
    engine.apply(
        line.event("MIX-1", "flow", 773, origin=Origin.REFRESH, at=T0 + timedelta(seconds=61))
    )
    await commit(engine, store)
    msgs = await outbox(store)
    assert consumed(msgs)[("WO-7", "RM-WATER")] == Decimal("7.7")  # 7.73 L, 0.1 L increment
    assert [m.details.get("value") for m in invalid(msgs)] == [_shown(value), None]


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else "null" if value is None else str(value)


@pytest.mark.parametrize(
    ("signal", "value"),
    [
        ("scale.weight", Decimal("NaN")),
        ("scale.weight", Decimal("Infinity")),
        ("scale.weight", Decimal("-Infinity")),
        ("scale.weight", "1.254"),
        ("scale.weight", True),
        ("scale.tare", Decimal("NaN")),
        ("scale.tare", Decimal("Infinity")),
    ],
    ids=repr,
)
@asyncio
async def test_a_weighing_with_an_invalid_weight_or_tare_is_not_taken(
    tmp_path: Path, store: Store, signal: str, value: Any
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "scale.stable", False))
    engine.apply(line.event("MIX-1", "scale.tare", Decimal("0.5")))
    engine.apply(line.event("MIX-1", "scale.weight", Decimal("1.754")))
    engine.apply(line.event("MIX-1", signal, value))  # the scale shows garbage now
    engine.apply(line.event("MIX-1", "scale.stable", True))  # not the last valid weight: none
    engine.apply(line.event("MIX-1", "scale.stable", False))
    engine.apply(line.event("MIX-1", signal, Decimal("1.754" if signal.endswith("t") else "0.5")))
    engine.apply(line.event("MIX-1", "scale.stable", True))
    await commit(engine, store)
    msgs = await outbox(store)
    assert consumed(msgs)[("WO-7", "RM-ACTIVE")] == Decimal("1.254")  # once, after it is valid
    codes = [m.code.value for m in msgs if isinstance(m, ExceptionMessage)]
    assert codes == ["signal_invalid", "weighing_rejected", "signal_invalid"]
    rejected = next(
        m for m in msgs if isinstance(m, ExceptionMessage) and m.code.value != "signal_invalid"
    )
    assert f"{signal} has no valid value now" in rejected.text


@asyncio
async def test_a_weighing_while_the_weight_has_bad_quality_is_not_taken(
    tmp_path: Path, store: Store
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "scale.stable", False))
    engine.apply(line.event("MIX-1", "scale.weight", Decimal("1.254")))
    engine.apply(line.event("MIX-1", "scale.weight", None, Quality.BAD, "BadSensorFailure"))
    engine.apply(line.event("MIX-1", "scale.stable", True))
    await commit(engine, store)
    msgs = await outbox(store)
    assert not [m for m in msgs if isinstance(m, MaterialConsumed)]
    codes = [m.code.value for m in msgs if isinstance(m, ExceptionMessage)]
    assert codes == ["signal_quality", "weighing_rejected"]


@pytest.mark.parametrize(("signal", "value"), [("complete_good", -3), ("complete_scrap", "3")])
@asyncio
async def test_an_invalid_handshake_quantity_is_not_confirmed(
    tmp_path: Path, store: Store, signal: str, value: Any
) -> None:
    clock = Clock()
    line = Line(clock)
    engine = await load(make_config(tmp_path), store, clock)
    engine.apply(line.event("FILL-1", "order", "WO-7"))
    engine.apply(line.event("FILL-1", signal, value))
    assert getattr(engine.work_centres["FILL-1"], signal) is None
    (raised,) = invalid(messages(engine))
    assert signal in raised.text
    assert raised.details["value"] == _shown(value)


# ------------------------------------------------------------------------------- property

valid_or_not = st.one_of(
    st.integers(0, 3).map(lambda step: ("step", step)),
    st.sampled_from(invalid_counts).map(lambda v: ("invalid", v)),
    st.sampled_from(["bad"]).map(lambda v: ("bad", v)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_or_not, min_size=1, max_size=25))
def test_invalid_values_among_valid_ones_count_exactly_the_valid_ones(
    readings: list[tuple[str, Any]],
) -> None:
    """A counter read with valid values (rising), invalid values and bad quality mixed: the
    confirmed good is the last valid value; one exception per valid → invalid transition and
    one "resolved" per invalid → valid."""
    clock = Clock()
    line = Line(clock)
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, clock, MASTER_DOC)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    value, transitions, resolutions, broken = 0, 0, 0, False
    for kind, x in readings:
        if kind == "step":
            value += x
            engine.apply(line.event("MIX-1", "good", value))
            resolutions += broken
            broken = False
        elif kind == "invalid":
            engine.apply(line.event("MIX-1", "good", x))
            transitions += not broken
            broken = True
        else:
            engine.apply(line.event("MIX-1", "good", None, Quality.BAD, "BadSensorFailure"))
        event(kind)
    msgs = messages(engine)
    confirmed = sum(m.good for m in msgs if isinstance(m, ProductionConfirmation))
    assert confirmed == value
    found = invalid(msgs)
    assert len([m for m in found if m.resolves is None]) == transitions
    assert len([m for m in found if m.resolves is not None]) == resolutions
    assert ("signal_invalid/mix-plc/good" in engine.open_exceptions) is broken


def test_a_scrap_counter_jump_above_max_rate_is_held_not_posted() -> None:
    """max_rate on the scrap counter too: a jump is a counter_jump exception, kept."""
    mix = CONFIG.sources[0]
    assert mix.signals.scrap is not None
    scrap = mix.signals.scrap.model_copy(update={"max_rate": Decimal(5)})
    signals = mix.signals.model_copy(update={"scrap": scrap})
    config = CONFIG.model_copy(
        update={"sources": (mix.model_copy(update={"signals": signals}), *CONFIG.sources[1:])}
    )
    clock = Clock()
    line = Line(clock)
    engine = Engine(config, MASTER, ORDERS, LOTS, clock, MASTER_DOC)
    engine.apply(line.event("MIX-1", "order", "WO-7"))
    engine.apply(line.event("MIX-1", "scrap", 2))
    engine.apply(line.event("MIX-1", "scrap", 900))  # 898 in 10 ms
    msgs = messages(engine)
    assert [m.scrap for m in msgs if isinstance(m, ProductionConfirmation)] == [Decimal(2)]
    (jump,) = [
        m for m in msgs if isinstance(m, ExceptionMessage) and m.code.value == "counter_jump"
    ]
    assert jump.details["rise"] == "898"
    assert len(engine.parked) == 1
