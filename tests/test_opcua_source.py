"""The OPC UA source against a real asyncua server: the line PLC simulator on a free port.

What the engine relies on: every signal arrives with the right type, quality and both
timestamps; everything is read explicitly after each (re)connect; a publish response's changes
arrive in source-timestamp order; the operation-complete handshake completes through write();
a PLC power cycle is seen as disconnected → connected plus a READ of what changed meanwhile; a
flow totalizer that stands still is refreshed about once a second, stamped by the server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback

from edge_agent.config import Config
from edge_agent.errors import SignalError
from edge_agent.sources import Origin, Quality, SignalEvent, SourceStatus
from edge_agent.sources.opcua import (
    SIGNAL_ORDER,
    OpcUaSource,
    backoff_delay,
    convert,
    in_source_order,
    quality_of,
    status_name,
)
from simulators.opcua_plc import LinePlc, Tally, main
from tests.support.broker import free_port
from tests.support.plc import EXAMPLE, Item, Recorder, line_config, running

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


# Starting an asyncua server costs 1.5-2 s (it builds the standard address space), so the tests
# that leave the PLC running share one (module scope: they run in the module's event loop and
# each uses its own order ids); those that stop it or need another configuration get their own.
SHARED = pytest.mark.asyncio(loop_scope="module")


def port_of(config: Config) -> int:
    return int(config.sources[0].endpoint.split(":")[2].split("/")[0])


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return line_config(free_port(), tmp_path_factory.mktemp("line"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc(config: Config) -> AsyncIterator[LinePlc]:
    async with LinePlc(config, port=port_of(config)) as line:
        yield line


@pytest.fixture
def own_config(tmp_path: Path) -> Config:
    return line_config(free_port(), tmp_path)


@pytest_asyncio.fixture
async def own_plc(own_config: Config) -> AsyncIterator[LinePlc]:
    async with LinePlc(own_config, port=port_of(own_config)) as line:
        yield line


def source(config: Config, work_centre: str) -> OpcUaSource:
    (cfg,) = [s for s in config.sources if s.work_centre == work_centre]
    return OpcUaSource(cfg)


def changes(recorder: Recorder, after: int) -> list[tuple[str, object]]:
    return [(e.signal, e.value) for e in recorder.events(origin=Origin.CHANGE, after=after)]


def stamp(event: SignalEvent) -> datetime:
    assert event.source_time is not None
    return event.source_time


async def subscribed(recorder: Recorder, src: OpcUaSource) -> None:
    """Until every monitored item's initial notification (after the READ) has arrived."""

    def initial_done(_: Item) -> bool:
        seen = {e.signal for e in recorder.events(origin=Origin.CHANGE) if e.source == src.name}
        return seen == set(src.signals)

    await recorder.wait_for(initial_done)


class RefreshReads:
    """A source's flow refresh reads as the server sees them (a Read of the flow node alone,
    asking for both timestamps): counted, and refused with ``refuse`` (a status name) while it
    is set."""

    def __init__(self, plc: LinePlc, src: OpcUaSource) -> None:
        self.count = 0
        self.refuse: str | None = None
        self._server = plc.server
        self._flow = ua.NodeId.from_string(src.signals["flow"])

    def __call__(self, event: ServerItemCallback, _: object) -> None:
        # not async: asyncua awaits the listener only if it is a coroutine function
        params = event.request_params
        if (
            isinstance(params, ua.ReadParameters)
            and params.TimestampsToReturn == ua.TimestampsToReturn.Both
            and [r.NodeId for r in params.NodesToRead] == [self._flow]
        ):
            self.count += 1
            if self.refuse is not None:
                raise getattr(ua.uaerrors, self.refuse)()

    def __enter__(self) -> RefreshReads:
        assert self._server is not None
        self._server.subscribe_server_callback(CallbackType.PreRead, self)
        return self

    def __exit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.unsubscribe_server_callback(CallbackType.PreRead, self)

    async def wait(self, more: int) -> None:
        """Until ``more`` more refresh reads reached the server."""
        target = self.count + more
        async with asyncio.timeout(10):
            while self.count < target:
                await asyncio.sleep(0.01)


async def refreshes(recorder: Recorder, count: int, after: int = 0) -> list[SignalEvent]:
    """The first ``count`` REFRESH events from position ``after`` on, once they are there."""
    await recorder.wait_for(
        lambda _: len(recorder.events(origin=Origin.REFRESH, after=after)) >= count, after=after
    )
    return recorder.events(origin=Origin.REFRESH, after=after)[:count]


# ------------------------------------------------------------------------ connect and read


@SHARED
async def test_read_after_connect_carries_every_signal_typed_with_quality_and_timestamps(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-7")
    await plc.produce(MIX, good=5, scrap=2)
    await plc.flow(MIX, 1234)
    await plc.weigh(MIX, Decimal("12.345"), Decimal("0.5"))
    await plc.set_order(FILL, "WO-7")
    mix, fill = source(config, MIX), source(config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await rec.wait_for(lambda i: len(rec.events(origin=Origin.READ)) == 13)
        for src, names in ((mix, MIX_SIGNALS), (fill, FILL_SIGNALS)):
            items = [i for i in rec.items if i.source == src.name]
            # connected first, then the READ of every node in the documented order
            assert isinstance(items[0], SourceStatus)
            assert items[0].connected is True
            reads = [i for i in items if isinstance(i, SignalEvent) and i.origin is Origin.READ]
            assert [e.signal for e in reads] == names
            assert items[1 : 1 + len(names)] == reads
            assert [e.signal for e in reads] == [n for n in SIGNAL_ORDER if n in names]
            for event in reads:
                assert event.quality is Quality.GOOD
                assert event.status == "Good"
                assert event.address == src.signals[event.signal]
                assert event.work_centre == src.config.work_centre
                assert event.source_time is not None
                assert event.source_time.utcoffset() == timedelta(0)
                assert event.received_at.utcoffset() == timedelta(0)
                assert event.source_time <= event.received_at
        read = {e.signal: e for e in rec.events(origin=Origin.READ) if e.source == mix.name}
        assert read["order"].value == "WO-7"
        assert read["feed_lot"].value == ""  # no lot in the tank yet
        assert read["good"].value == 5
        assert read["scrap"].value == 2
        assert read["flow"].value == 1234
        assert read["scale.weight"].value == Decimal("12.345")  # not 12.3449999…
        assert read["scale.tare"].value == Decimal("0.5")
        assert read["scale.stable"].value is True
        assert type(read["good"].value) is int
        # the order was written before the counters it zeroed: strictly earlier timestamps
        assert stamp(read["order"]) < stamp(read["good"])
        fill_read = {e.signal: e for e in rec.events(origin=Origin.READ) if e.source == fill.name}
        assert fill_read["complete_request"].value is False
        assert type(fill_read["complete_good"].value) is int

        # and then changes, as they happen
        mark = rec.mark()
        await plc.produce(MIX, good=1)
        event = await rec.wait_value("good", 6, after=mark)
        assert event.origin is Origin.CHANGE
        assert event.quality is Quality.GOOD
        assert event.source_time is not None
        assert stamp(event) > stamp(read["scale.stable"])


@SHARED
async def test_one_publish_is_emitted_in_source_timestamp_order(
    plc: LinePlc, config: Config
) -> None:
    """asyncua's server groups a publish response by monitored item (all of ``good``'s queued
    values, then ``order``'s, ...); the source restores the order in which the PLC wrote."""
    await plc.set_order(MIX, "WO-1")
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await rec.wait_value("flow", 0, origin=Origin.READ)
        await plc.produce(MIX, good=5, scrap=1)
        await rec.wait_value("scrap", 1)
        mark = rec.mark()
        # no await in between yields to the server's publish loop: one publish response
        await plc.produce(MIX, good=2)
        await plc.set_order(MIX, "WO-2")
        await plc.flow(MIX, 40)
        await rec.wait_value("flow", 40, after=mark)
        assert changes(rec, mark) == [
            ("good", 7),
            ("order", "WO-2"),  # before the counters its change zeroed
            ("good", 0),
            ("scrap", 0),
            ("flow", 40),
        ]
        times = [stamp(e) for e in rec.events(after=mark)]
        assert times == sorted(times)


# ------------------------------------------------------------------------------- quality


@SHARED
async def test_bad_and_uncertain_status_arrive_with_their_names(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-9")
    await plc.produce(MIX, good=3)
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await rec.wait_value("good", 3, origin=Origin.READ)
        mark = rec.mark()
        await plc.set_quality(MIX, "good", "BadSensorFailure")
        bad = await rec.wait_for(
            lambda i: isinstance(i, SignalEvent) and i.quality is Quality.BAD, after=mark
        )
        assert isinstance(bad, SignalEvent)
        assert (bad.signal, bad.status, bad.value) == ("good", "BadSensorFailure", None)
        assert bad.source_time is not None

        mark = rec.mark()
        await plc.set_quality(MIX, "good", "UncertainLastUsableValue")
        uncertain = await rec.wait_for(
            lambda i: isinstance(i, SignalEvent) and i.quality is Quality.UNCERTAIN, after=mark
        )
        assert isinstance(uncertain, SignalEvent)
        assert (uncertain.status, uncertain.value) == ("UncertainLastUsableValue", 3)

        mark = rec.mark()
        await plc.set_quality(MIX, "good", "Good")
        good = await rec.wait_value("good", 3, after=mark)
        assert (good.quality, good.status) == (Quality.GOOD, "Good")
        assert stamp(good) > stamp(uncertain)


# ------------------------------------------------------------------------------ handshake


@SHARED
async def test_handshake_completes_when_the_source_writes_the_acknowledge(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(FILL, "WO-3")
    fill = source(config, FILL)

    async def engine(item: Item) -> None:
        # acknowledge what the PLC requests, and drop the acknowledge when it drops the request
        if (
            isinstance(item, SignalEvent)
            and item.signal == "complete_request"
            and item.quality is Quality.GOOD
            and isinstance(item.value, bool)
        ):
            await fill.write("complete_ack", item.value)

    rec = Recorder(engine)
    async with running(fill, rec):
        await subscribed(rec, fill)
        mark = rec.mark()
        await plc.complete(FILL, good=5, scrap=1, timeout=10)
        await plc.complete(FILL, good=7, scrap=0, timeout=10)
        await rec.wait_for(
            lambda _: (
                [e.value for e in rec.events("complete_ack", Origin.CHANGE, after=mark)]
                == [True, False, True, False]
            )
        )
        assert plc.totals[("WO-3", FILL)] == Tally(
            confirmed_good=12, confirmed_scrap=1, handshakes=2
        )
        first = changes(rec, mark)[:5]
        assert first == [
            ("complete_good", 5),
            ("complete_scrap", 1),
            ("complete_request", True),  # last: the quantities are in place before it
            ("complete_ack", True),
            ("complete_request", False),
        ]
        acks = rec.events("complete_ack", Origin.CHANGE, after=mark)
        assert all(a.source_time is not None for a in acks)  # the PLC stamps the agent's write

        # a production run confirms a batch per handshake
        await plc.run_production(FILL, 4, rate_per_s=200, scrap_every=2, batch=2, ack_timeout=10)
        assert plc.totals[("WO-3", FILL)] == Tally(
            confirmed_good=14, confirmed_scrap=3, handshakes=4
        )


@SHARED
async def test_handshake_times_out_without_an_acknowledge_and_counts_nothing(
    plc: LinePlc,
) -> None:
    await plc.set_order(FILL, "WO-4")
    with pytest.raises(TimeoutError, match=r"complete_ack did not become True.*withdrawn"):
        await plc.complete(FILL, good=3, timeout=0.2)
    assert plc.value(FILL, "complete_request") is False  # withdrawn
    assert plc.totals.get(("WO-4", FILL), Tally()).handshakes == 0


@SHARED
async def test_write_is_refused_with_a_signal_error_naming_signal_and_node(
    plc: LinePlc, config: Config
) -> None:
    mix, fill = source(config, MIX), source(config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await rec.wait_for(lambda i: len(rec.statuses()) == 2)
        # good is read-only for clients: the server refuses
        with pytest.raises(SignalError, match=r"good \(ns=2;s=MIX-1\.Good\).*BadUserAccessDenied"):
            await mix.write("good", 1)
        with pytest.raises(SignalError, match="the node is Boolean"):
            await fill.write("complete_ack", 1)
        with pytest.raises(SignalError, match="no signal 'complete_ack'"):
            await mix.write("complete_ack", True)
        await fill.write("complete_ack", True)
        assert plc.value(FILL, "complete_ack") is True
        await fill.write("complete_ack", False)  # as the next test expects the PLC


# --------------------------------------------------------------------------- flow refresh


@SHARED
async def test_a_flow_standing_still_is_refreshed_about_every_second_at_the_servers_time(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-12")
    await plc.flow(MIX, 5)
    before = plc.value(MIX, "flow")
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        read = await rec.wait_value("flow", before, origin=Origin.READ)
        first, second = await refreshes(rec, 2)  # nothing changes meanwhile
        for event in (first, second):
            assert (event.signal, event.value, event.quality, event.status) == (
                "flow",
                before,
                Quality.GOOD,
                "Good",
            )
            assert (event.address, event.work_centre) == (mix.signals["flow"], MIX)
            assert event.device_time  # the server's clock, as the PLC's values are stamped
            assert stamp(event).utcoffset() == timedelta(0)
            assert stamp(event) <= event.received_at  # the server and the test share a clock
        # never the SourceTimestamp (when the value last changed): later and later moments
        assert stamp(read) < stamp(first) < stamp(second)

        # a change is still a CHANGE, with the PLC's timestamp; the refreshes go on from it
        mark = rec.mark()
        await plc.flow(MIX, 3)
        change = await rec.wait_value("flow", before + 3, after=mark)
        assert change.origin is Origin.CHANGE
        (after,) = await refreshes(rec, 1, after=rec.items.index(change))
        assert after.value == before + 3
        assert stamp(after) > stamp(change)
        flows = rec.events("flow")
        assert [stamp(e) for e in flows] == sorted(stamp(e) for e in flows)
        assert all(stamp(e) < stamp(change) for e in flows if e.value == before)
        assert {e.signal for e in rec.events(origin=Origin.REFRESH)} == {"flow"}


@SHARED
async def test_a_source_without_flow_refreshes_nothing(plc: LinePlc, config: Config) -> None:
    mix, fill = source(config, MIX), source(config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await refreshes(rec, 2)  # the flow's: time enough for the other's, had it any
        assert {e.source for e in rec.events(origin=Origin.REFRESH)} == {mix.name}
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        assert f"opcua[{mix.name}].refresh" in tasks
        assert f"opcua[{fill.name}].refresh" not in tasks


@SHARED
async def test_a_bad_flow_is_not_refreshed(plc: LinePlc, config: Config) -> None:
    await plc.set_order(MIX, "WO-13")
    mix = source(config, MIX)
    rec = Recorder()
    try:
        with RefreshReads(plc, mix) as reads:
            async with running(mix, rec):
                await subscribed(rec, mix)
                await plc.set_quality(MIX, "flow", "BadSensorFailure")
                bad = await rec.wait_for(
                    lambda i: isinstance(i, SignalEvent) and i.quality is Quality.BAD
                )
                mark = rec.mark()
                await reads.wait(3)  # three reads since: the first two's answers are in
                assert rec.events(origin=Origin.REFRESH, after=mark) == []
                assert mix.connected

                await plc.set_quality(MIX, "flow", "Good")
                good = await rec.wait_for(
                    lambda i: isinstance(i, SignalEvent) and i.quality is Quality.GOOD, after=mark
                )
                assert isinstance(good, SignalEvent)
                assert (good.signal, good.origin) == ("flow", Origin.CHANGE)
                (again,) = await refreshes(rec, 1, after=rec.items.index(good))
                assert again.value == good.value
                assert stamp(again) > stamp(good) > stamp(bad)
    finally:
        await plc.set_quality(MIX, "flow", "Good")


@SHARED
async def test_a_refused_refresh_read_is_skipped_and_the_connection_stays(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-14")
    mix = source(config, MIX)
    rec = Recorder()
    with structlog.testing.capture_logs() as logs, RefreshReads(plc, mix) as reads:
        reads.refuse = "BadTooManyOperations"
        async with running(mix, rec):
            await subscribed(rec, mix)
            mark = rec.mark()
            await reads.wait(3)  # three refused: the first two's answers are in
            assert rec.events(origin=Origin.REFRESH) == []
            failed = [e for e in logs if e["event"] == "opcua_refresh_failed"]
            assert len(failed) == 1  # said once, not once a second
            assert "BadTooManyOperations" in failed[0]["error"]
            assert mix.connected
            assert len(rec.statuses()) == 1  # no reconnect (and no READ of everything again)

            reads.refuse = None
            await refreshes(rec, 1, after=mark)
            assert "opcua_refresh_recovered" in [e["event"] for e in logs]
    assert len(rec.events(origin=Origin.READ)) == len(mix.signals)


# ------------------------------------------------------------------------------ reconnect


@pytest.mark.asyncio
async def test_plc_restart_disconnects_then_reconnects_and_reads_what_changed(
    own_plc: LinePlc, own_config: Config
) -> None:
    await own_plc.set_order(MIX, "WO-5")
    await own_plc.produce(MIX, good=10)
    mix, fill = source(own_config, MIX), source(own_config, FILL)
    rec = Recorder()
    async with running(mix, rec), running(fill, rec):
        await rec.wait_status(True, mix.name)
        await rec.wait_status(True, fill.name)
        mark_down = rec.mark()

        await own_plc.stop()
        await rec.wait_status(False, mix.name, after=mark_down)
        await rec.wait_status(False, fill.name, after=mark_down)
        assert not fill.connected
        with pytest.raises(SignalError, match=r"complete_ack \(ns=2;s=FILL-1\.Complete\.Ack\)"):
            await fill.write("complete_ack", True)

        await own_plc.set_counter(MIX, "good", 77)  # what the agent did not see while it was down
        await own_plc.start()
        back = await rec.wait_status(True, mix.name, after=mark_down)
        after_back = rec.items.index(back)
        read = await rec.wait_value("good", 77, after=after_back, origin=Origin.READ)
        assert read.quality is Quality.GOOD
        # the complete READ again, in order, right after the connected status
        reads = [
            e for e in rec.events(origin=Origin.READ, after=after_back) if e.source == mix.name
        ]
        assert [e.signal for e in reads] == MIX_SIGNALS
        assert [i for i in rec.items[after_back:] if i.source == mix.name][1:9] == reads

        # the new connection delivers changes, and writes work again
        await subscribed(rec, mix)
        mark = rec.mark()
        await own_plc.produce(MIX, good=1)
        await rec.wait_value("good", 78, after=mark)
        await rec.wait_status(True, fill.name, after=mark_down)
        await fill.write("complete_ack", False)


@pytest.mark.asyncio
async def test_source_started_before_the_plc_connects_when_it_comes(own_config: Config) -> None:
    mix = source(own_config, MIX)
    rec = Recorder()
    port = port_of(own_config)
    async with running(mix, rec):
        down = await rec.wait_status(False)
        assert "cannot connect" in down.detail
        async with LinePlc(own_config, port=port) as line:
            await line.set_order(MIX, "WO-6")
            await rec.wait_value("order", "WO-6")
            assert len(rec.statuses()) == 2  # one disconnected (not one per attempt), one connected


@SHARED
async def test_a_cut_connection_is_seen_at_once_and_everything_is_read_again(
    plc: LinePlc, config: Config
) -> None:
    await plc.set_order(MIX, "WO-10")
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await subscribed(rec, mix)
        mark = rec.mark()
        assert plc.drop_connections() == 1
        await plc.produce(MIX, good=4)  # before the source can have reconnected
        lost = await rec.wait_status(False, after=mark)
        assert "connection lost" in lost.detail
        back = await rec.wait_status(True, after=mark)
        read = await rec.wait_value("good", 4, after=rec.items.index(back), origin=Origin.READ)
        assert read.quality is Quality.GOOD


@SHARED
async def test_a_hung_connection_is_found_by_the_watchdog(plc: LinePlc, config: Config) -> None:
    await plc.set_order(MIX, "WO-11")
    (cfg,) = [s for s in config.sources if s.work_centre == MIX]
    mix = OpcUaSource(cfg, watchdog_interval_s=0.3, request_timeout_s=1.0)
    rec = Recorder()
    try:
        async with running(mix, rec):
            await subscribed(rec, mix)
            mark = rec.mark()
            assert plc.hang_connections() == 1  # the socket stays open: nothing says it died
            await plc.produce(MIX, good=2)
            await rec.wait_status(False, after=mark)
            back = await rec.wait_status(True, after=mark)
            await rec.wait_value("good", 2, after=rec.items.index(back), origin=Origin.READ)
    finally:
        plc.drop_connections()  # the hung one, which nobody reads any more


@SHARED
async def test_cancelling_run_disconnects_and_leaves_nothing_behind(
    plc: LinePlc, config: Config
) -> None:
    before = asyncio.all_tasks()
    server = plc.server
    assert server is not None
    sessions = server.iserver._external_sessions  # asyncua has no public session count
    count = len(sessions)  # a cut connection's session waits for its timeout
    mix = source(config, MIX)
    rec = Recorder()
    async with running(mix, rec):
        await subscribed(rec, mix)
        await refreshes(rec, 1)  # the flow refresh task too
        assert mix.connected
        assert len(sessions) == count + 1
    assert not mix.connected
    assert len(sessions) == count  # closed, not left to time out
    # the server's side of the connection ends on a later loop iteration; the client's is gone
    async with asyncio.timeout(5):
        while asyncio.all_tasks() - before:
            await asyncio.sleep(0.01)


# -------------------------------------------------------------------------------- deadband


@pytest.mark.asyncio
async def test_deadband_filters_the_scale_weight_only(tmp_path: Path) -> None:
    port = free_port()
    config = line_config(port, tmp_path, subscription={"deadband": "1.0", "queue_size": 50})
    async with LinePlc(config, port=port) as line:
        mix = source(config, MIX)
        rec = Recorder()
        async with running(mix, rec):
            await subscribed(rec, mix)
            mark = rec.mark()
            for gross in ("10.0", "10.5", "12.25"):  # 10.5 is within the deadband of 10.0
                m = rec.mark()
                await line.weigh(MIX, Decimal(gross))
                await rec.wait_value("scale.stable", True, after=m)
            await line.produce(MIX, good=1)  # counters: every step, whatever the deadband
            await line.produce(MIX, good=1)
            await rec.wait_value("good", 2, after=mark)
            weights = [e.value for e in rec.events("scale.weight", Origin.CHANGE, after=mark)]
            assert weights == [Decimal("10.0"), Decimal("12.25")]
            assert [e.value for e in rec.events("good", Origin.CHANGE, after=mark)] == [1, 2]
            stables = [e.value for e in rec.events("scale.stable", Origin.CHANGE, after=mark)]
            assert stables == [True, False, True, False, True]


# ------------------------------------------------------------------------------- simulator


@pytest.mark.asyncio
async def test_simulator_counters_wrap_at_their_width_and_totals_count_production(
    tmp_path: Path,
) -> None:
    config = line_config(free_port(), tmp_path)
    line = LinePlc(config)  # not started: values and totals are kept all the same
    await line.set_order(MIX, "WO-8")
    await line.set_counter(MIX, "scrap", 65534)  # scrap is 16 bits wide in the example
    await line.produce(MIX, good=3, scrap=3)
    assert line.value(MIX, "scrap") == 1
    assert line.value(MIX, "good") == 3
    await line.set_counter(MIX, "good", 2**32 - 1)
    await line.produce(MIX, good=1)
    assert line.value(MIX, "good") == 0
    await line.flow(MIX, 250)
    await line.weigh(MIX, Decimal("1.5"), Decimal("0.25"))
    await line.run_production(MIX, 5, rate_per_s=500, scrap_every=5, flow_per_unit=10)
    assert line.totals == {
        ("WO-8", MIX): Tally(
            good=8, scrap=4, flow=300, weighings=[(Decimal("1.5"), Decimal("0.25"))]
        )
    }
    assert line.value(MIX, "good") == 4  # wrapped to 0, then 4 more
    with pytest.raises(ValueError, match="16 bits wide"):
        await line.set_counter(MIX, "scrap", 65536)
    with pytest.raises(ValueError, match="no 'good' signal"):
        await line.produce(FILL, good=1)
    with pytest.raises(ValueError, match="unknown OPC UA status code"):
        await line.set_quality(MIX, "good", "NotAStatus")


def test_simulator_command_line_refuses_bad_arguments_and_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(EXAMPLE), "--rate", "0"])
    assert exc.value.code == 2
    assert "must be greater than 0" in capsys.readouterr().err
    broken = tmp_path / "line.toml"
    broken.write_text(EXAMPLE.read_text().replace('work_centre = "FILL-1"', 'work_centre = "X"'))
    assert main(["--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "sources[1].work_centre" in err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


# ------------------------------------------------------------------------ pure translation


def test_values_map_to_signal_types_never_floats() -> None:
    assert convert(ua.Variant(True, ua.VariantType.Boolean)) == (True, True)
    assert convert(ua.Variant(65535, ua.VariantType.UInt16)) == (65535, True)
    assert convert(ua.Variant(0.1, ua.VariantType.Double)) == (Decimal("0.1"), True)
    # a 32-bit float: the shortest decimal that is that float, not its double's digits
    assert convert(ua.Variant(0.1, ua.VariantType.Float)) == (Decimal("0.1"), True)
    assert convert(ua.Variant("WO-1", ua.VariantType.String)) == ("WO-1", True)
    assert convert(ua.Variant(None, ua.VariantType.Null)) == (None, True)
    assert convert(None) == (None, True)
    assert convert(ua.Variant([1, 2], ua.VariantType.UInt32)) == (None, False)
    assert convert(ua.Variant(datetime.now(UTC), ua.VariantType.DateTime)) == (None, False)


def test_status_codes_map_to_quality_and_names() -> None:
    assert quality_of(None) is Quality.GOOD
    assert quality_of(ua.StatusCode(ua.StatusCodes.BadSensorFailure)) is Quality.BAD
    assert quality_of(ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)) is Quality.UNCERTAIN
    # the info bits (here: the monitored item's queue overflowed) do not change the name
    overflowed = ua.StatusCode(ua.UInt32(ua.StatusCodes.Good | 0x480))
    assert (quality_of(overflowed), status_name(overflowed)) == (Quality.GOOD, "Good")


def test_reconnect_backoff_doubles_to_the_maximum_with_jitter() -> None:
    rng = random.Random(7)
    for attempt, (low, high) in enumerate([(500, 750), (1000, 1500), (2000, 3000), (4000, 6000)]):
        delays = {backoff_delay(attempt, 500, 30_000, rng) for _ in range(50)}
        assert all(low / 1000 <= d <= high / 1000 for d in delays)
        assert len(delays) > 1  # jittered
    at_max = [backoff_delay(12, 500, 30_000, rng) for _ in range(50)]
    assert all(22.5 <= d <= 30 for d in at_max)
    assert all(0.05 <= backoff_delay(a, 50, 50, rng) <= 0.05 for a in range(5))


def test_ties_in_source_time_put_the_order_first_and_the_request_last() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def event(signal: str, source_time: datetime | None) -> SignalEvent:
        return SignalEvent(
            "plc", FILL, signal, "ns=2;s=X", 1, Quality.GOOD, "Good", source_time, at
        )

    later = at + timedelta(milliseconds=1)
    arrived = [
        event("complete_request", at),
        event("good", later),
        event("complete_good", at),
        event("order", at),
        event("flow", None),
    ]
    assert [e.signal for e in in_source_order(arrived)] == [
        "flow",  # no timestamp: first
        "order",
        "complete_good",
        "complete_request",
        "good",
    ]
