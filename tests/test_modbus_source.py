"""The Modbus source against a real pymodbus server: the Modbus PLC simulator on a free port.

What the engine relies on, as for the OPC UA source: every signal arrives typed (int, bool,
Decimal, str) with its quality; everything is read after each (re)connect, then only changes;
counters polled add up exactly; the handshake completes through write(); an exception response
is bad quality naming the register and the exception; an unreachable device is one
disconnected status and the source recovers; a flow totalizer that stands still is refreshed
about once a second. Plus what is Modbus's own: one request per coalesced block, and every
word and byte order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from edge_agent.config import Config, ModbusCounter
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.domain.counters import CounterState, read_counter
from edge_agent.errors import SignalError
from edge_agent.sources import (
    REFRESH_S,
    SIGNAL_ORDER,
    Origin,
    Quality,
    SignalEvent,
    SourceStatus,
)
from edge_agent.sources.modbus import ModbusSource, triggers_first
from edge_agent.sources.modbus_codec import Field, ReadRequest, Role
from simulators.modbus_plc import ModbusPlc, Tally, main
from tests.support.broker import free_port
from tests.support.modbus import EXAMPLE, REGISTER_HANDSHAKE, modbus_config, polls
from tests.support.plc import Item, Recorder, running

MIX, FILL = "MIX-1", "FILL-1"
MIX_SIGNALS = [
    "order",
    "feed_lot",
    "good",
    "scrap",
    "flow",
    "scale.tare",
    "scale.weight",
    "scale.stable",
]
FILL_SIGNALS = ["order", "complete_good", "complete_scrap", "complete_ack", "complete_request"]
ORDERS = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
ORDER_IDS = ["ABCD", "CDAB", "BADC", "DCBA"]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return modbus_config(free_port(), tmp_path)


def port_of(config: Config) -> int:
    source = config.sources[0]
    assert isinstance(source, ModbusSourceConfig)
    return source.port


@pytest_asyncio.fixture
async def plc(config: Config) -> AsyncIterator[ModbusPlc]:
    async with ModbusPlc(config, port=port_of(config)) as line:
        yield line


def source_config(config: Config, work_centre: str) -> ModbusSourceConfig:
    (cfg,) = [s for s in config.sources if s.work_centre == work_centre]
    assert isinstance(cfg, ModbusSourceConfig)
    return cfg


def source(config: Config, work_centre: str) -> ModbusSource:
    return ModbusSource(source_config(config, work_centre))


def changes(recorder: Recorder, after: int, name: str | None = None) -> list[tuple[str, object]]:
    return [
        (e.signal, e.value)
        for e in recorder.events(origin=Origin.CHANGE, after=after)
        if name is None or e.source == name
    ]


def reads_of(recorder: Recorder, src: ModbusSource, after: int = 0) -> list[SignalEvent]:
    return [e for e in recorder.events(origin=Origin.READ, after=after) if e.source == src.name]


async def read_done(recorder: Recorder, src: ModbusSource, after: int = 0) -> None:
    await recorder.wait_for(lambda _: len(reads_of(recorder, src, after)) == len(src.signals))


# ------------------------------------------------------------------------ connect and read


@pytest.mark.parametrize("orders", range(4), ids=ORDER_IDS)
@pytest.mark.asyncio
async def test_read_after_connect_carries_every_signal_typed_then_only_changes(
    tmp_path: Path, orders: int
) -> None:
    word_order, byte_order = ORDERS[orders]
    config = modbus_config(free_port(), tmp_path, word_order=word_order, byte_order=byte_order)
    async with ModbusPlc(config, port=port_of(config)) as plc:
        await plc.set_order(MIX, "WO-7")
        await plc.produce(MIX, good=70_000, scrap=2)  # good is 32 bits: both words matter
        await plc.flow(MIX, 1_234_567)  # 12 345.67 L on the float32 totalizer
        await plc.weigh(MIX, Decimal("12.345"), Decimal("0.5"))
        await plc.set_order(FILL, "WO-7")
        mix, fill = source(config, MIX), source(config, FILL)
        rec = Recorder()
        async with running(mix, rec), running(fill, rec):
            await read_done(rec, mix)
            await read_done(rec, fill)
            for src, names in ((mix, MIX_SIGNALS), (fill, FILL_SIGNALS)):
                items = [i for i in rec.items if i.source == src.name]
                # connected first, then the READ of every signal in the documented order
                assert isinstance(items[0], SourceStatus)
                assert items[0].connected is True
                reads = reads_of(rec, src)
                assert [e.signal for e in reads] == names
                assert [e.signal for e in reads] == [n for n in SIGNAL_ORDER if n in names]
                assert items[1 : 1 + len(names)] == reads
                for event in reads:
                    assert (event.quality, event.status) == (Quality.GOOD, "Good")
                    assert event.address == src.signals[event.signal]
                    assert event.work_centre == src.config.work_centre
                    assert event.source_time is not None
                    assert event.source_time.utcoffset() == timedelta(0)
                    assert event.source_time <= event.received_at
                # one poll, one moment
                assert len({e.source_time for e in reads}) == 1
            read = {e.signal: e.value for e in reads_of(rec, mix)}
            assert read == {
                "order": "WO-7",
                "feed_lot": "",  # no lot in the tank yet
                "good": 70_000,
                "scrap": 2,
                "flow": 1_234_567,
                "scale.weight": Decimal("12.345"),
                "scale.tare": Decimal("0.500"),
                "scale.stable": True,
            }
            assert [type(read[n]) for n in MIX_SIGNALS] == [
                str,
                str,
                int,
                int,
                int,
                Decimal,
                Decimal,
                bool,
            ]
            assert str(read["scale.weight"]) == "12.345"  # not 12.3450002670288…
            assert reads_of(rec, mix)[6].address == "input:0 (unit 2)"  # the scale's own unit
            fill_read = {e.signal: e.value for e in reads_of(rec, fill)}
            assert fill_read == {
                "order": "WO-7",
                "complete_good": 0,
                "complete_scrap": 0,
                "complete_ack": False,
                "complete_request": False,
            }

            # then only what changes, as it changes
            mark = rec.mark()
            await plc.produce(MIX, good=1)
            event = await rec.wait_value("good", 70_001, after=mark)
            assert (event.origin, event.quality) == (Origin.CHANGE, Quality.GOOD)
            assert event.source_time is not None
            first_read = reads_of(rec, mix)[0].source_time
            assert first_read is not None
            assert event.source_time > first_read
            await polls(plc, 12)  # a few more polls of both sources: nothing else changed
            assert changes(rec, mark) == [("good", 70_001)]


@pytest.mark.asyncio
async def test_one_request_per_coalesced_block_not_one_per_signal(
    plc: ModbusPlc, config: Config, tmp_path: Path
) -> None:
    mix = source(config, MIX)
    assert [(r.unit, r.table, r.address, r.count) for r in mix.requests] == [
        (2, "input", 0, 5),  # the scale indicator (weight, tare, status word): stable is a trigger
        (1, "holding", 0, 32),  # order, good, scrap, the flow totalizer and the tank's lot
    ]
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        start = len(plc.requests)
        await polls(plc, 20)
    served = plc.requests[start:]
    while served[0].unit != 2:  # the test may have resumed in the middle of a poll
        served = served[1:]
    blocks = {(r.unit, r.table, r.address, r.count) for r in served}
    assert blocks == {(1, "holding", 0, 32), (2, "input", 0, 5)}
    # a poll is one request per block, in plan order
    polled = [(r.unit, r.address) for r in served]
    pairs = polled[: len(polled) // 2 * 2]
    assert pairs == [(2, 0), (1, 0)] * (len(pairs) // 2)

    # with no gap allowed, the totalizer (8 registers further) and the tank's lot right after it
    # are a request of their own
    tight = source(modbus_config(free_port(), tmp_path, max_gap=0), MIX)
    assert [(r.table, r.address, r.count) for r in tight.requests] == [
        ("input", 0, 5),
        ("holding", 0, 13),
        ("holding", 20, 12),
    ]


# ------------------------------------------------------------------------------- counters


def _counted(rec: Recorder, src: ModbusSource, signal: str) -> int:
    """What an engine counts from the events: deltas of consecutive readings."""
    cfg = getattr(src.config.signals, signal)
    assert isinstance(cfg, ModbusCounter)
    spec = cfg.counter_spec()
    state, total = CounterState(), 0
    for event in rec.events(signal):
        if event.quality is not Quality.GOOD:
            continue
        assert isinstance(event.value, int)
        assert event.source_time is not None
        reading = read_counter(spec, state, event.value, event.source_time)
        state, total = reading.state, total + reading.counts
    return total


@pytest.mark.asyncio
async def test_polled_counters_add_up_exactly_across_missed_values_and_rollovers(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-2")
    await plc.set_counter(MIX, "scrap", 65_530)  # a uint16: wraps after 65 535
    await plc.set_counter(MIX, "flow", 9_999_000)  # the float32 totalizer wraps at 100 000 L
    mix = source(config, MIX)
    rec = Recorder()
    rng = random.Random(7)
    made = {"good": 0, "scrap": 0, "flow": 0}
    async with running(mix, rec):
        await read_done(rec, mix)
        for _ in range(60):
            # bursts between polls: most intermediate values are never seen
            for _ in range(rng.randrange(1, 30)):
                good, scrap, flow = rng.randrange(0, 3), rng.randrange(0, 2), rng.randrange(0, 40)
                await plc.produce(MIX, good=good, scrap=scrap)
                await plc.flow(MIX, flow)
                made["good"] += good
                made["scrap"] += scrap
                made["flow"] += flow
            if rng.random() < 0.5:
                await polls(plc, 2)
        target = {n: plc.value(MIX, n) for n in made}
        for name, value in target.items():
            await rec.wait_for(
                lambda _, n=name, v=value: any(e.value == v for e in rec.events(n)[-1:])
            )
    assert plc.value(MIX, "scrap") < 65_530  # it did roll over
    assert plc.value(MIX, "flow") < 9_999_000  # and so did the totalizer
    seen = len(rec.events("good"))
    assert seen < made["good"]  # polls missed values ...
    counted = {name: _counted(rec, mix, name) for name in made}
    assert counted == made  # ... and every count is there, once
    assert plc.totals[("WO-2", MIX)] == Tally(
        good=made["good"], scrap=made["scrap"], flow=made["flow"]
    )


# ------------------------------------------------------------------------------ handshake


@pytest.mark.parametrize(
    "fill_signals", [None, REGISTER_HANDSHAKE], ids=["coil pair", "bits of a holding register"]
)
@pytest.mark.asyncio
async def test_handshake_completes_when_the_source_writes_the_acknowledge(
    tmp_path: Path, fill_signals: dict[str, object] | None
) -> None:
    config = modbus_config(free_port(), tmp_path, fill_signals=fill_signals)
    async with ModbusPlc(config, port=port_of(config)) as plc:
        await plc.set_order(FILL, "WO-3")
        fill = source(config, FILL)

        async def engine(item: Item) -> None:
            # acknowledge what the PLC requests; drop the acknowledge when it drops the request
            if (
                isinstance(item, SignalEvent)
                and item.signal == "complete_request"
                and item.quality is Quality.GOOD
                and isinstance(item.value, bool)
            ):
                await fill.write("complete_ack", item.value)

        rec = Recorder(engine)
        async with running(fill, rec):
            await read_done(rec, fill)
            mark = rec.mark()
            await plc.complete(FILL, good=5, scrap=1, timeout=10)
            await plc.complete(FILL, good=7, scrap=0, timeout=10)
            await rec.wait_for(
                lambda _: (
                    [e.value for e in rec.events("complete_ack", after=mark)]
                    == [True, False, True, False]
                )
            )
            assert plc.totals[("WO-3", FILL)] == Tally(
                confirmed_good=12, confirmed_scrap=1, handshakes=2
            )
            first = changes(rec, mark)[:4]
            # the quantities come with the request, in one poll, request last
            assert first == [
                ("complete_good", 5),
                ("complete_scrap", 1),
                ("complete_request", True),
                ("complete_ack", True),
            ]
            if fill_signals:  # the mask write left the PLC's request bit alone
                assert plc.value(FILL, "complete_request") is False

            await plc.run_production(
                FILL, 4, rate_per_s=200, scrap_every=2, batch=2, ack_timeout=10
            )
            assert plc.totals[("WO-3", FILL)] == Tally(
                confirmed_good=14, confirmed_scrap=3, handshakes=4
            )


@pytest.mark.asyncio
async def test_write_refusals_name_the_signal_the_register_and_why(
    plc: ModbusPlc, config: Config
) -> None:
    mix, fill = source(config, MIX), source(config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await rec.wait_for(lambda _: len(rec.statuses()) == 2)
        # the PLC lets the agent write its acknowledge only
        with pytest.raises(
            SignalError, match=r"good \(holding:10\).*refused it \(IllegalDataAddress\)"
        ):
            await mix.write("good", 1)
        with pytest.raises(SignalError, match=r"scale.stable \(input:4.0 \(unit 2\)\).*read-only"):
            await mix.write("scale.stable", True)
        with pytest.raises(SignalError, match=r"complete_ack \(coil:1\).*True or False"):
            await fill.write("complete_ack", 1)
        with pytest.raises(SignalError, match="no signal 'complete_ack'"):
            await mix.write("complete_ack", True)
        await fill.write("complete_ack", True)
        assert plc.value(FILL, "complete_ack") is True
        await fill.write("complete_ack", False)
        assert plc.value(FILL, "complete_ack") is False


# ------------------------------------------------------------------------------- quality


@pytest.mark.asyncio
async def test_an_exception_response_is_bad_quality_naming_register_and_exception(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-9")
    await plc.produce(MIX, good=3)
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        mark = rec.mark()
        await plc.set_exception(MIX, "good", "IllegalDataAddress")
        await rec.wait_for(lambda _: len(rec.events(after=mark)) == 5)
        bad = rec.events(after=mark)
        # every signal of the refused request, none of the scale's (another request)
        assert [(e.signal, e.address, e.value) for e in bad] == [
            ("order", "holding:0", None),
            ("feed_lot", "holding:22", None),
            ("good", "holding:10", None),
            ("scrap", "holding:12", None),
            ("flow", "holding:20", None),
        ]
        assert {(e.quality, e.status, e.origin) for e in bad} == {
            (Quality.BAD, "IllegalDataAddress", Origin.CHANGE)
        }
        await polls(plc, 10)
        assert len(rec.events(after=mark)) == 5  # said once, not once per poll

        await plc.produce(MIX, good=2)  # counted meanwhile
        mark = rec.mark()
        await plc.set_exception(MIX, "good", None)
        back = await rec.wait_value("good", 5, after=mark)
        assert (back.quality, back.status) == (Quality.GOOD, "Good")
        assert {e.signal for e in rec.events(after=mark)} == {
            "order",
            "feed_lot",
            "good",
            "scrap",
            "flow",
        }

        mark = rec.mark()
        await plc.set_exception(MIX, "scale.stable", "DeviceBusy")
        busy = await rec.wait_for(
            lambda i: isinstance(i, SignalEvent) and i.signal == "scale.stable", after=mark
        )
        assert isinstance(busy, SignalEvent)
        assert (busy.quality, busy.status, busy.address) == (
            Quality.BAD,
            "DeviceBusy",
            "input:4.0 (unit 2)",
        )
        assert mix.connected  # an exception response is an answer: the connection stays


@pytest.mark.asyncio
async def test_every_weighing_is_seen_as_a_drop_and_a_rise_of_stable(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.weigh(MIX, Decimal("1.5"))  # no client yet: stable is high when the READ comes
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        mark = rec.mark()
        await plc.weigh(MIX, Decimal("10.5"), Decimal("0.25"))
        await plc.weigh(MIX, Decimal("12.125"))  # at once: the second motion is seen too
        await rec.wait_for(
            lambda _: (
                [e.value for e in rec.events("scale.stable", after=mark)]
                == [False, True, False, True]
            )
        )
        scale = [
            (e.signal, e.value) for e in rec.events(after=mark) if e.signal.startswith("scale.")
        ]
        # the new weight arrives with (before) the rise it belongs to
        assert scale == [
            ("scale.stable", False),
            ("scale.tare", Decimal("0.250")),
            ("scale.weight", Decimal("10.500")),
            ("scale.stable", True),
            ("scale.stable", False),
            ("scale.tare", Decimal("0.000")),
            ("scale.weight", Decimal("12.125")),
            ("scale.stable", True),
        ]


@pytest.mark.asyncio
async def test_a_nan_register_is_passed_on_as_it_is_for_the_engine_to_refuse(
    plc: ModbusPlc, config: Config
) -> None:
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        mark = rec.mark()
        await plc.set_registers(MIX, "scale.weight", [0x0000, 0x7FC0])  # NaN, low word first
        nan = await rec.wait_for(
            lambda i: isinstance(i, SignalEvent) and i.signal == "scale.weight", after=mark
        )
        assert isinstance(nan, SignalEvent)
        assert isinstance(nan.value, Decimal)
        assert nan.value.is_nan()
        assert (nan.quality, nan.status) == (Quality.GOOD, "Good")
        # the same NaN at the next polls is no change: emitted once
        await polls(plc, 5)
        assert [e for e in rec.events(after=mark) if e.signal == "scale.weight"] == [nan]
        mark = rec.mark()
        await plc.weigh(MIX, Decimal("2.5"))
        good = await rec.wait_value("scale.weight", Decimal("2.5"), after=mark)
        assert good.quality is Quality.GOOD


# --------------------------------------------------------------------------- flow refresh


def refreshes_of(recorder: Recorder, src: ModbusSource, after: int = 0) -> list[SignalEvent]:
    return [e for e in recorder.events(origin=Origin.REFRESH, after=after) if e.source == src.name]


async def refreshed(
    recorder: Recorder, src: ModbusSource, count: int, after: int = 0
) -> list[SignalEvent]:
    """The first ``count`` REFRESH events of ``src`` from position ``after`` on, once there."""
    await recorder.wait_for(lambda _: len(refreshes_of(recorder, src, after)) >= count, after=after)
    return refreshes_of(recorder, src, after)[:count]


def stamp(event: SignalEvent) -> datetime:
    assert event.source_time is not None
    return event.source_time


@pytest.mark.asyncio
async def test_a_flow_standing_still_is_refreshed_about_every_second(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-12")
    await plc.flow(MIX, 1_000)
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        (read,) = [e for e in reads_of(rec, mix) if e.signal == "flow"]
        first, second = await refreshed(rec, mix, 2)  # nothing changes meanwhile
        for event in (first, second):
            assert (event.signal, event.value, event.quality, event.status, event.address) == (
                "flow",
                read.value,
                Quality.GOOD,
                "Good",
                "holding:20",
            )
            assert not event.device_time  # when the agent polled, as for every Modbus event
            assert stamp(event) <= event.received_at
        assert stamp(read) < stamp(first) < stamp(second)
        # not once a poll (every 20 ms here) but about once a second: a loose bound, machines
        # are busy
        assert stamp(second) - stamp(first) >= timedelta(seconds=REFRESH_S / 2)

        # a change is still a CHANGE, and the next refresh is a second after it
        mark = rec.mark()
        await plc.flow(MIX, 250)
        change = await rec.wait_value("flow", 1_250, after=mark)
        assert change.origin is Origin.CHANGE
        (after,) = await refreshed(rec, mix, 1, after=rec.items.index(change))
        assert after.value == 1_250
        assert stamp(after) - stamp(change) >= timedelta(seconds=REFRESH_S / 2)
        flows = [stamp(e) for e in rec.events("flow")]
        assert flows == sorted(set(flows))  # one poll, one event of a signal
        assert {e.signal for e in rec.events(origin=Origin.REFRESH)} == {"flow"}


@pytest.mark.asyncio
async def test_a_source_without_flow_refreshes_nothing(plc: ModbusPlc, config: Config) -> None:
    mix, fill = source(config, MIX), source(config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await refreshed(rec, mix, 2)  # time enough for the other's, had it any
        assert refreshes_of(rec, fill) == []


@pytest.mark.asyncio
async def test_a_bad_flow_is_not_refreshed(plc: ModbusPlc, config: Config) -> None:
    await plc.flow(MIX, 40)
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        await plc.set_exception(MIX, "flow", "DeviceBusy")
        bad = await rec.wait_for(
            lambda i: isinstance(i, SignalEvent) and i.signal == "flow" and i.quality is Quality.BAD
        )
        mark = rec.mark()
        loop = asyncio.get_running_loop()
        since = loop.time()
        while loop.time() - since < 3 * REFRESH_S:  # polls for three refresh periods
            await polls(plc, 2)
        assert refreshes_of(rec, mix, mark) == []
        assert mix.connected

        await plc.set_exception(MIX, "flow", None)
        good = await rec.wait_value("flow", 40, after=mark)
        assert (good.origin, good.quality) == (Origin.CHANGE, Quality.GOOD)
        (again,) = await refreshed(rec, mix, 1, after=rec.items.index(good))
        assert again.value == 40
        assert stamp(bad) < stamp(good) < stamp(again)


# ------------------------------------------------------------------------------ reconnect


@pytest.mark.asyncio
async def test_an_unreachable_device_is_one_disconnected_status_and_the_source_recovers(
    config: Config,
) -> None:
    fill = source(config, FILL)
    rec = Recorder()
    with structlog.testing.capture_logs() as logs:
        async with running(fill, rec):
            down = await rec.wait_status(False)
            assert "cannot connect to 127.0.0.1:" in down.detail
            with pytest.raises(SignalError, match=r"complete_ack \(coil:1\).*not connected"):
                await fill.write("complete_ack", True)
            async with asyncio.timeout(10):  # several attempts, with back-off
                while sum(e["event"] == "modbus_connect_failed" for e in logs) < 3:
                    await asyncio.sleep(0.01)
            assert len(rec.statuses()) == 1  # one disconnected, not one per attempt

            async with ModbusPlc(config, port=port_of(config)) as plc:
                await plc.set_order(FILL, "WO-6")
                up = await rec.wait_status(True)
                assert up.detail.startswith("connected to 127.0.0.1:")
                await rec.wait_value("order", "WO-6", origin=Origin.READ)
                await fill.write("complete_ack", True)
                assert plc.value(FILL, "complete_ack") is True
            # the device goes away again: one more disconnected status
            await rec.wait_for(lambda _: len(rec.statuses()) == 3)
    assert [s.connected for s in rec.statuses()] == [False, True, False]
    events = [e["event"] for e in logs]
    assert "modbus_connected" in events
    assert "modbus_connection_lost" in events


@pytest.mark.asyncio
async def test_a_power_cycle_is_seen_and_what_changed_meanwhile_is_read(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-5")
    await plc.produce(MIX, good=10)
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        mark = rec.mark()
        await plc.stop()
        lost = await rec.wait_status(False, after=mark)
        assert lost.detail == "connection closed by the device"
        await plc.set_counter(MIX, "good", 77)  # counted while the agent could not see
        await plc.start()
        back = await rec.wait_status(True, after=mark)
        after_back = rec.items.index(back)
        await read_done(rec, mix, after_back)
        reads = reads_of(rec, mix, after_back)
        assert [e.signal for e in reads] == MIX_SIGNALS
        assert [i for i in rec.items[after_back:] if i.source == mix.name][1:9] == reads
        assert {e.signal: e.value for e in reads}["good"] == 77
        mark = rec.mark()
        await plc.produce(MIX, good=1)
        await rec.wait_value("good", 78, after=mark, origin=Origin.CHANGE)


@pytest.mark.asyncio
async def test_a_cut_or_hung_connection_reconnects_and_reads_everything_again(
    plc: ModbusPlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-10")
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        mark = rec.mark()
        assert plc.drop_connections() == 1
        await plc.produce(MIX, good=4)
        await rec.wait_status(False, after=mark)
        back = await rec.wait_status(True, after=mark)
        await rec.wait_value("good", 4, after=rec.items.index(back), origin=Origin.READ)

        mark = rec.mark()
        assert plc.hang_connections() == 1  # the socket stays open: only the timeout tells
        await plc.produce(MIX, good=2)
        lost = await rec.wait_status(False, after=mark)
        assert "TimeoutError" in lost.detail
        back = await rec.wait_status(True, after=mark)
        await rec.wait_value("good", 6, after=rec.items.index(back), origin=Origin.READ)
        plc.drop_connections()  # the hung one, which nobody reads any more


@pytest.mark.asyncio
async def test_cancelling_run_closes_the_connection_and_leaves_nothing_behind(
    plc: ModbusPlc, config: Config
) -> None:
    before = asyncio.all_tasks()
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await read_done(rec, mix)
        assert mix.connected
        assert len(plc._connections()) == 1
    assert not mix.connected
    async with asyncio.timeout(5):
        while plc._connections() or asyncio.all_tasks() - before:
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------- simulator


@pytest.mark.asyncio
async def test_simulator_counts_production_flow_and_lot_changes(config: Config) -> None:
    line = ModbusPlc(config, port=port_of(config))  # not started: values and totals all the same
    await line.set_order(MIX, "WO-8")
    await line.set_counter(MIX, "scrap", 65_534)
    await line.produce(MIX, good=3, scrap=3)
    assert line.value(MIX, "scrap") == 1
    await line.set_counter(MIX, "flow", 9_999_999)
    await line.flow(MIX, 2)
    assert line.value(MIX, "flow") == 1
    await line.weigh(MIX, Decimal("1.5"), Decimal("0.25"))
    await line.run_production(MIX, 5, rate_per_s=500, scrap_every=5, flow_per_unit=10)
    change = await line.change_lot(MIX, "L-WATER-2")
    assert (change.work_centre, change.material, change.lot) == (MIX, "RM-WATER", "L-WATER-2")
    assert change.totalizer == 51
    assert line.totals == {
        ("WO-8", MIX): Tally(
            good=7, scrap=4, flow=52, weighings=[(Decimal("1.5"), Decimal("0.25"))]
        )
    }
    with pytest.raises(ValueError, match="rolls over at 65536"):
        await line.set_counter(MIX, "scrap", 65_536)
    with pytest.raises(ValueError, match="no 'good' signal"):
        await line.produce(FILL, good=1)
    with pytest.raises(ValueError, match="unknown Modbus exception 'Busy'"):
        await line.set_exception(MIX, "good", "Busy")
    # a flow rate runs the meter until set to 0
    async with line:
        before = line.value(MIX, "flow")
        await line.set_flow_rate(MIX, 2000)
        async with asyncio.timeout(10):
            while line.value(MIX, "flow") == before:
                await asyncio.sleep(0.01)
        await line.set_flow_rate(MIX, 0)
        stopped = line.value(MIX, "flow")
        assert isinstance(stopped, int)
        assert isinstance(before, int)
        assert line.totals[("WO-8", MIX)].flow == 52 + stopped - before


def test_simulator_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    config = modbus_config(free_port(), tmp_path)
    clash = modbus_config(free_port(), tmp_path, device_id=1)  # both sources on unit 1
    with pytest.raises(ValueError, match="share holding:0 of unit 1"):
        ModbusPlc(clash)
    assert ModbusPlc(config).endpoint == "127.0.0.1:5020"


def test_simulator_command_line_refuses_bad_arguments_and_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(EXAMPLE), "--rate", "0"])
    assert exc.value.code == 2
    assert "must be greater than 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(EXAMPLE), "--port", "70000"])
    assert exc.value.code == 2
    broken = tmp_path / "line.toml"
    broken.write_text(EXAMPLE.read_text().replace('work_centre = "FILL-1"', 'work_centre = "X"'))
    assert main(["--config", str(broken)]) == 2
    assert "sources[1].work_centre" in capsys.readouterr().err
    opcua = Path(__file__).resolve().parents[1] / "config" / "line.toml"
    assert main(["--config", str(opcua)]) == 2
    assert "no Modbus source" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_each_poll_reads_the_handshake_request_before_its_quantities(config: Config) -> None:
    """A poll is several requests, not one snapshot: the request's block is read first, so the
    quantities read after it are the ones the PLC raised it with (never the previous ones)."""
    fill = source(config, FILL)
    first = fill.requests[0]
    assert "complete_request" in {f.signal for f in first.fields}
    later = {f.signal for r in fill.requests[1:] for f in r.fields}
    assert {"complete_good", "complete_scrap"} <= later  # separate blocks in the example


def test_triggers_are_read_before_the_values_they_qualify() -> None:
    def request(address: int, *signals: str) -> ReadRequest:
        fields = tuple(
            Field(signal=s, table="holding", address=address + i, type="uint16", role=Role.QUANTITY)
            for i, s in enumerate(signals)
        )
        return ReadRequest(1, "holding", address, len(signals), fields)

    values = request(0, "complete_good", "scale.weight")
    stable = request(100, "scale.stable")
    handshake = request(200, "complete_request")
    ordered = triggers_first([values, stable, handshake])
    assert ordered[-1] is values
    assert {id(r) for r in ordered[:2]} == {id(stable), id(handshake)}
