"""The simulators' continuous feeds: tank lot changes on both PLCs, the flow meter's history, and
:func:`simulators.feeds.expected_by_lot`, the harness's own answer to "which lot did the metered
flow come from" (docs/feeds.md, rules 1 and 2), with no knowledge of the agent."""

from __future__ import annotations

import asyncio
import copy
import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.client.client import Client
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.config import Config, ModbusSource, parse_config
from edge_agent.sources.modbus import signal_fields
from edge_agent.sources.modbus_codec import decode
from simulators.feeds import LotChange, MeterStep, changes_at, expected_by_lot
from simulators.modbus_plc import ModbusPlc
from simulators.opcua_plc import LinePlc
from simulators.shift import FeedLot, _feed_lots
from tests.support.broker import free_port
from tests.support.modbus import modbus_config
from tests.support.plc import EXAMPLE, line_config

MIX, FILL = "MIX-1", "FILL-1"
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
LITRE = Decimal("0.01")  # the example water meter: 0.01 L per count


def at(seconds: float | str) -> datetime:
    return T0 + timedelta(microseconds=int(Decimal(str(seconds)) * 1_000_000))


def history(*points: tuple[float | str, int]) -> list[MeterStep]:
    return [MeterStep(at(s), c) for s, c in points]


def change(seconds: float | str, lot: str, work_centre: str = MIX) -> LotChange:
    return LotChange(at(seconds), work_centre, "RM-WATER", lot, 0)


#: 100 counts every 10 s: 0 → 100 → 200 at 0 s, 10 s, 20 s
STEADY = history((0, 0), (10, 100), (20, 200))


# ------------------------------------------------------------------------------ expected_by_lot


def test_a_change_over_splits_the_step_it_falls_in_linearly() -> None:
    by_lot = expected_by_lot(STEADY, [change(15, "B")], initial="A", per_count=LITRE)
    assert by_lot == {"A": Decimal("1.5"), "B": Decimal("0.5")}
    assert all(isinstance(q, Fraction) for q in by_lot.values())


def test_a_lag_pushes_the_change_over_into_a_later_interval() -> None:
    changes = [change(5, "B")]  # made in the first step's interval ...
    assert expected_by_lot(STEADY, changes, initial="A") == {"A": 50, "B": 150}
    # ... it reaches the meter 10 s later, in the second: the whole first step is still A's
    assert expected_by_lot(STEADY, changes, lag_s=10, initial="A") == {"A": 150, "B": 50}
    # a lag that is not whole seconds, as the configuration's lag_s is a decimal string
    assert expected_by_lot(STEADY, changes, lag_s=Decimal("2.5"), initial="A") == {
        "A": 75,
        "B": 125,
    }


def test_two_change_overs_close_together_share_one_step() -> None:
    close = [change(12, "B"), change(13, "C")]
    assert expected_by_lot(STEADY, close, initial="A") == {"A": 120, "B": 10, "C": 70}
    # the lag moves both alike: B still gets the one second between them
    assert expected_by_lot(STEADY, close, lag_s=5, initial="A") == {"A": 170, "B": 10, "C": 20}
    # a microsecond apart: exact, not rounded away
    closer = [change(12, "B"), change("12.000001", "C")]
    assert expected_by_lot(STEADY, closer, initial="A")["B"] == Fraction(1, 100_000)
    # made in order, reaching the meter after the history ends: nothing metered for them yet
    assert expected_by_lot(STEADY, close, lag_s=60, initial="A") == {"A": 200, "B": 0, "C": 0}


def test_before_the_first_change_over_reaches_the_meter_the_lot_is_the_initial_one() -> None:
    changes = [change(10, "B")]
    assert expected_by_lot(STEADY, changes, lag_s=5) == {None: 150, "B": 50}
    assert expected_by_lot(STEADY, changes, lag_s=5, initial="A") == {"A": 150, "B": 50}
    # the first lot reached the meter before the flow started: no None
    assert expected_by_lot(STEADY, [change(-5, "B")], lag_s=2) == {"B": 200}
    # no lot change at all: everything is the initial lot's
    assert expected_by_lot(STEADY, [], initial="A") == {"A": 200}
    assert expected_by_lot(STEADY, []) == {None: 200}


def test_the_meter_stands_still_outside_its_history_and_between_equal_steps() -> None:
    # an order change's reset at 10 s is a step without counts: the flow is from 10 s to 20 s
    steps = history((0, 0), (10, 0), (20, 100))
    assert expected_by_lot(steps, [change(5, "B")], initial="A") == {"A": 0, "B": 100}
    assert expected_by_lot(steps, [change(15, "B")], initial="A") == {"A": 50, "B": 50}
    assert expected_by_lot([], [change(1, "B")], initial="A") == {"A": 0, "B": 0}
    assert expected_by_lot(history((3, 40)), [change(1, "B")]) == {"B": 0}


def test_a_lot_changed_to_again_right_after_itself_is_one_stay() -> None:
    again = [change(5, "B"), change(8, "B"), change(15, "C")]
    assert expected_by_lot(STEADY, again, initial="A") == {"A": 50, "B": 100, "C": 50}
    # and a lot back in the tank later gets both of its stays
    back = [change(5, "B"), change(10, "A"), change(15, "B")]
    assert expected_by_lot(STEADY, back, initial="A") == {"A": 100, "B": 100}


@given(
    steps=st.lists(
        st.tuples(st.integers(1, 5_000_000), st.integers(0, 1_000)), min_size=1, max_size=12
    ),
    moments=st.lists(st.integers(-2_000_000, 40_000_000), max_size=6, unique=True),
    lag_us=st.integers(0, 10_000_000),
)
def test_the_lots_add_up_to_everything_the_history_metered(
    steps: list[tuple[int, int]], moments: list[int], lag_us: int
) -> None:
    points, moment, total = [], T0, 0
    for gap, counts in steps:
        moment += timedelta(microseconds=gap)
        total += counts
        points.append(MeterStep(moment, total))
    changes = [
        LotChange(T0 + timedelta(microseconds=m), MIX, "RM-WATER", f"L{i % 3}", 0)
        for i, m in enumerate(moments)
    ]
    by_lot = expected_by_lot(points, changes, Fraction(lag_us, 1_000_000), LITRE, initial="L0")
    assert sum(by_lot.values()) == (total - points[0].cumulative) * Fraction(LITRE)
    assert all(q >= 0 for q in by_lot.values())


def test_what_cannot_be_a_history_or_a_lot_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="forward in time and never down"):
        expected_by_lot(history((0, 10), (5, 9)), [])
    with pytest.raises(ValueError, match="forward in time and never down"):
        expected_by_lot(history((5, 0), (5, 10)), [])
    with pytest.raises(ValueError, match="of one work centre"):
        expected_by_lot(STEADY, [change(1, "B"), change(2, "C", work_centre=FILL)])
    with pytest.raises(ValueError, match="both changed to at"):
        expected_by_lot(STEADY, [change(1, "B"), change(1, "C")])
    with pytest.raises(ValueError, match="must not be negative"):
        expected_by_lot(STEADY, [], lag_s=-1)
    mixed = [change(1, "B"), change(2, "C", work_centre=FILL)]
    assert changes_at(mixed, FILL) == [mixed[1]]


# ------------------------------------------------------------------------------ OPC UA simulator


def _without_feed_lot(port: int, tmp_path: Path) -> Config:
    """The example line with no feed_lot node: a tank whose lot the PLC does not show."""
    data: dict[str, Any] = copy.deepcopy(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")))
    for source in data["sources"]:
        source["endpoint"] = f"opc.tcp://127.0.0.1:{port}/edge-agent/sim/"
        source["signals"].pop("feed_lot", None)
    data["store"]["path"] = str(tmp_path / "agent.db")
    data.pop("masterdata", None)
    return parse_config(data)


@pytest.mark.asyncio
async def test_opcua_simulator_writes_the_lot_and_keeps_the_meter_history(
    tmp_path: Path,
) -> None:
    port = free_port()
    line = LinePlc(line_config(port, tmp_path))  # not started: all the same, unserved
    assert line.value(MIX, "feed_lot") == ""
    await line.set_order(MIX, "WO-7")
    first = await line.change_lot(MIX, "TANK-2-2611")
    await line.flow(MIX, 310)
    second = await line.change_lot(MIX, "TANK-2-2612")
    assert line.value(MIX, "feed_lot") == "TANK-2-2612"
    assert (second.work_centre, second.material, second.lot) == (MIX, "RM-WATER", "TANK-2-2612")
    assert (first.totalizer, second.totalizer) == (0, 310)
    assert line.lot_changes == [first, second]
    # a wrap and an order change's reset are steps of the history, but meter nothing
    await line.set_counter(MIX, "flow", (1 << 32) - 1)
    await line.flow(MIX, 2)
    assert line.value(MIX, "flow") == 1
    await line.set_order(MIX, "WO-8")
    await line.flow(MIX, 5)
    steps = line.meter_history(MIX)
    assert [s.cumulative for s in steps] == [0, 0, 310, 310, 312, 312, 317]
    assert [s.at for s in steps] == sorted({s.at for s in steps})
    assert steps[1].at < first.at < steps[2].at < second.at < steps[3].at
    by_lot = expected_by_lot(steps, line.lot_changes, per_count=LITRE)
    assert sum(by_lot.values()) == Decimal("3.17")
    assert set(by_lot) == {None, "TANK-2-2611", "TANK-2-2612"}
    with pytest.raises(ValueError, match="no 'flow' signal"):
        await line.change_lot(FILL, "TANK-2-2611")
    with pytest.raises(ValueError, match="no 'flow' signal"):
        line.meter_history(FILL)

    # without a feed_lot node the change is recorded all the same
    plain = LinePlc(_without_feed_lot(port, tmp_path))
    change = await plain.change_lot(MIX, "TANK-2-2611")
    assert plain.lot_changes == [change]
    with pytest.raises(ValueError, match="no 'feed_lot' signal"):
        plain.value(MIX, "feed_lot")


@pytest.mark.asyncio
async def test_opcua_simulator_serves_the_lot_as_a_string_stamped_with_the_change(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = line_config(port, tmp_path)
    async with LinePlc(config, port=port) as line:
        change = await line.change_lot(MIX, "TANK-2-2612")
        async with Client(line.endpoint, timeout=5) as client:
            node = client.get_node("ns=2;s=MIX-1.TankLot")
            value = await node.read_data_value()
            assert value.Value is not None
            assert (value.Value.Value, value.Value.VariantType) == (
                "TANK-2-2612",
                ua.VariantType.String,
            )
            assert value.SourceTimestamp == change.at  # the moment the agent stages the lot at
        # the flow meter at a rate, as on the Modbus simulator: counted and in the history
        before = line.meter_history(MIX)[-1].cumulative
        await line.set_flow_rate(MIX, 2000)
        async with asyncio.timeout(10):
            while line.meter_history(MIX)[-1].cumulative == before:
                await asyncio.sleep(0.01)
        await line.change_lot(MIX, "TANK-2-2613")
        async with asyncio.timeout(10):
            while line.meter_history(MIX)[-1].at <= line.lot_changes[-1].at:
                await asyncio.sleep(0.01)
        await line.set_flow_rate(MIX, 0)
        metered = line.meter_history(MIX)[-1].cumulative
        assert line.totals[("", MIX)].flow == metered
        by_lot = expected_by_lot(line.meter_history(MIX), line.lot_changes, per_count=LITRE)
        assert sum(by_lot.values()) == metered * LITRE
        assert by_lot["TANK-2-2613"] > 0
        with pytest.raises(ValueError, match="must not be negative"):
            await line.set_flow_rate(MIX, -1)


# ------------------------------------------------------------------------------ Modbus simulator


@pytest.mark.asyncio
async def test_modbus_simulator_writes_the_lot_as_the_order_is_encoded(tmp_path: Path) -> None:
    config = modbus_config(free_port(), tmp_path)
    source = config.sources[0]
    assert isinstance(source, ModbusSource)
    line = ModbusPlc(config, port=source.port)
    field = signal_fields(source)["feed_lot"]
    assert (field.table, field.address, field.size) == ("holding", 22, 10)
    await line.set_order(MIX, "WO-7")
    await line.flow(MIX, 310)
    change = await line.change_lot(MIX, "TANK-2-2612")
    assert change.totalizer == 310
    assert line.value(MIX, "feed_lot") == "TANK-2-2612"
    assert decode(field, line.registers(MIX, "feed_lot")) == "TANK-2-2612"
    assert line.registers(MIX, "feed_lot")[0] == (ord("T") << 8) | ord("A")
    # 21 characters do not fit 10 registers: refused, nothing written or recorded
    with pytest.raises(ValueError, match="longer than 20 characters"):
        await line.change_lot(MIX, "TANK-2-2612-AND-MORE!")
    assert line.value(MIX, "feed_lot") == "TANK-2-2612"
    assert line.lot_changes == [change]
    steps = line.meter_history(MIX)
    assert [s.cumulative for s in steps] == [0, 0, 310]
    assert steps[-1].at < change.at

    # served: a client reads the lot where the configuration says
    async with line:
        client = AsyncModbusTcpClient("127.0.0.1", port=source.port)
        await client.connect()
        try:
            answer = await client.read_holding_registers(22, count=10, device_id=1)
            assert not answer.isError()
            assert decode(field, list(answer.registers)) == "TANK-2-2612"
        finally:
            client.close()


# ------------------------------------------------------------------------------ the shift's data


class _Ledger:
    """What :func:`simulators.shift._feed_lots` reads of the MES simulator."""

    def __init__(
        self,
        movements: dict[tuple[str, str, str], Decimal],
        consumption: dict[tuple[str, str, str], Decimal],
    ) -> None:
        self._movements, self._consumption = movements, consumption

    def lot_movements(self) -> dict[tuple[str, str, str], Decimal]:
        return self._movements

    def consumption(self) -> dict[tuple[str, str, str], Decimal]:
        return self._consumption


def test_the_reconciliation_puts_each_lots_expected_flow_beside_what_the_mes_drew() -> None:
    config = line_config(free_port(), Path("/nonexistent"))
    expected = {
        ("RM-WATER", None): Fraction(1, 3),
        ("RM-WATER", "TANK-2-2611"): Fraction(310, 3),
        ("RM-WATER", "TANK-2-2612"): Fraction(50),
    }
    mes = _Ledger(
        {
            ("WO-7", "TANK-2-2611", "RM-WATER"): Decimal("103.4"),
            ("WO-8", "TANK-2-2611", "RM-WATER"): Decimal("0"),
            ("WO-8", "TANK-2-2612", "RM-WATER"): Decimal("49.9"),
            ("WO-7", "BASE-2611-01", "RM-BASE"): Decimal("7.5"),  # not a fed material
        },
        {
            ("WO-7", "RM-WATER", "L"): Decimal("103.7"),
            ("WO-8", "RM-WATER", "L"): Decimal("49.9"),
            ("WO-7", "RM-BASE", "kg"): Decimal("7.5"),
        },
    )
    assert _feed_lots(expected, config, mes) == {  # type: ignore[arg-type]
        None: FeedLot(Fraction(1, 3), Decimal("0.3")),  # posted with no lot (or held)
        "TANK-2-2611": FeedLot(Fraction(310, 3), Decimal("103.4")),
        "TANK-2-2612": FeedLot(Fraction(50), Decimal("49.9")),
    }
    assert _feed_lots({}, config, mes) == {}  # type: ignore[arg-type]
