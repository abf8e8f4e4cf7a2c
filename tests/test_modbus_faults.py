"""Modbus faults at the agent level: the real agent (engine, store, uplink wiring) with its real
Modbus sources against a real pymodbus server (the Modbus PLC simulator), on a free port.

The issue's "done when": *a Modbus exception response and an unreachable device each produce a
named exception and no posting; the agent keeps running and recovers when the device returns.*
And the acknowledge write path: a device that does not answer the acknowledge write gets it
written again later, never the confirmation posted twice.

What the agent publishes is read from its outbox: the uplink points at a port where no broker
listens, so every committed message stays there (committed in the same transaction as the
engine state it came from, so the outbox is exactly what the MES would receive). Totals are
checked against the PLC's own tally: confirmations directly, materials through the pure rules
(:func:`simulators.shift.expected_consumption`). The flow meter (and its feed lot) are left out
of the line: these tests are about counters and the handshake, not metering.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from edge_agent.agent import Agent, plc_sources
from edge_agent.config import Config, parse_config
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.errors import SignalError
from edge_agent.messages import (
    ExceptionCode,
    ExceptionMessage,
    MaterialConsumed,
    ProductionConfirmation,
    parse_message,
)
from edge_agent.sources import Emit, Source
from edge_agent.store import Store
from simulators.modbus_plc import ModbusPlc
from simulators.shift import expected_consumption
from tests.support.broker import free_port
from tests.support.modbus import EXAMPLE, polls

CONFIG_DIR = EXAMPLE.parent
MIX, FILL = "MIX-1", "FILL-1"
MIX_PLC, FILL_PLC = "mix-plc", "fill-plc"
ORDER = "WO-7"

Message = MaterialConsumed | ProductionConfirmation | ExceptionMessage


def line_config(
    tmp_path: Path, plc_port: int, *work_centres: str, timeout_ms: int = 1000
) -> Config:
    """The example Modbus line (``config/line-modbus.toml``) with its documents, polling and
    reconnecting fast, its store in ``tmp_path`` and its uplink pointed at a port no broker
    listens on (so the outbox keeps everything). Only ``work_centres`` (default: both)."""
    data: dict[str, Any] = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["store"]["path"] = str(tmp_path / "agent.db")
    data["masterdata"] = {
        "path": str(CONFIG_DIR / "masterdata.json"),
        "orders": str(CONFIG_DIR / "orders.json"),
        "lots": str(CONFIG_DIR / "lots.json"),
    }
    data["mqtt"].update(port=free_port(), reconnect_min_ms=1000, reconnect_max_ms=1000)
    sources = []
    for source in data["sources"]:
        if work_centres and source["work_centre"] not in work_centres:
            continue
        source.update(
            host="127.0.0.1",
            port=plc_port,
            poll_interval_ms=25,
            timeout_ms=timeout_ms,
            reconnect_min_ms=50,
            reconnect_max_ms=200,
        )
        for metering in ("flow", "feed_lot"):  # not what these tests are about
            source["signals"].pop(metering, None)
        sources.append(source)
    data["sources"] = sources
    return parse_config(data)


# ------------------------------------------------------------------------------ helpers


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Until ``condition()`` holds (polled); fails naming ``what`` after ``timeout`` s."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def outbox(store: Store) -> list[Message]:
    """Every message the agent has committed, in commit order."""
    rows = await store.outbox_batch(1_000_000)
    return [parse_message(row.payload) for row in rows]


def confirmations(messages: Sequence[Message], work_centre: str) -> list[tuple[Decimal, Decimal]]:
    return [
        (m.good, m.scrap)
        for m in messages
        if isinstance(m, ProductionConfirmation) and m.work_centre == work_centre
    ]


def postings(messages: Sequence[Message], work_centre: str) -> list[Message]:
    """The confirmations and material postings of a work centre."""
    return [
        m
        for m in messages
        if isinstance(m, ProductionConfirmation | MaterialConsumed) and m.work_centre == work_centre
    ]


def exceptions(messages: Sequence[Message], code: ExceptionCode) -> list[ExceptionMessage]:
    return [m for m in messages if isinstance(m, ExceptionMessage) and m.code is code]


def confirmed(messages: Sequence[Message], work_centre: str) -> tuple[Decimal, Decimal]:
    """Good and scrap confirmed at a work centre, in all."""
    pairs = confirmations(messages, work_centre)
    return sum((g for g, _ in pairs), Decimal(0)), sum((s for _, s in pairs), Decimal(0))


def consumed(messages: Sequence[Message]) -> dict[tuple[str, str, str], Decimal]:
    """What the material postings add up to: (order, material, uom) → quantity."""
    out: dict[tuple[str, str, str], Decimal] = {}
    for m in messages:
        if isinstance(m, MaterialConsumed):
            key = (m.order, m.material, m.uom)
            out[key] = out.get(key, Decimal(0)) + m.quantity
    return {k: v for k, v in out.items() if v}


def counted(plc: ModbusPlc, work_centre: str) -> tuple[Decimal, Decimal]:
    """Good and scrap the PLC counted at a work centre: counters and acknowledged handshakes."""
    tally = plc.totals[(ORDER, work_centre)]
    return (
        Decimal(tally.good + tally.confirmed_good),
        Decimal(tally.scrap + tally.confirmed_scrap),
    )


def caught_up(messages: Sequence[Message], plc: ModbusPlc, work_centre: str) -> bool:
    """The confirmations have reached (or passed: the exact check comes after) what the PLC
    counted at a work centre."""
    good, scrap = confirmed(messages, work_centre)
    plc_good, plc_scrap = counted(plc, work_centre)
    return good >= plc_good and scrap >= plc_scrap


def assert_totals_match(plc: ModbusPlc, config: Config, messages: Sequence[Message]) -> None:
    """Nothing lost, nothing doubled: the agent's postings add up to what the PLC counted."""
    for wc in plc.work_centres:
        if (ORDER, wc) in plc.totals:
            assert confirmed(messages, wc) == counted(plc, wc), wc
    expected = expected_consumption(plc.totals, config)
    assert expected  # the PLC did produce something to post
    assert consumed(messages) == expected
    ids = [m.message_id for m in messages]
    assert len(ids) == len(set(ids))


@asynccontextmanager
async def agent_running(
    config: Config, make_sources: Callable[[Config], Sequence[Source]] = plc_sources
) -> AsyncIterator[tuple[Agent, asyncio.Task[None]]]:
    """The agent in a task, once every source is connected and has read its PLC; stopped
    cleanly (as on SIGTERM) at the end, which must end the task without an error."""
    stop = asyncio.Event()
    agent = Agent(config, make_sources)
    task = asyncio.create_task(agent.run(stop), name="agent")

    async def ready() -> bool:
        if task.done():
            task.result()  # raises what ended it
            pytest.fail("the agent ended by itself")
        engine = agent.engine
        return (
            engine is not None
            and all(engine.connected.values())
            and all(
                (wc := engine.work_centres.get(s.work_centre)) is not None and wc.order == ORDER
                for s in config.sources
            )
        )

    try:
        await wait_until(ready, "the agent to connect and read every PLC")
        yield agent, task
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


def store_of(agent: Agent) -> Store:
    assert agent.store is not None
    return agent.store


async def plc_for(config: Config) -> ModbusPlc:
    """The PLC simulator serving ``config``'s registers, running, the order set everywhere."""
    first = config.sources[0]
    assert isinstance(first, ModbusSourceConfig)
    plc = ModbusPlc(config, port=first.port)
    await plc.start()
    for source in config.sources:
        await plc.set_order(source.work_centre, ORDER)
    return plc


# ------------------------------------------------------------------- exception response


@pytest.mark.parametrize("refusal", ["IllegalDataAddress", "DeviceBusy"])
@pytest.mark.asyncio
async def test_an_exception_response_is_a_named_exception_no_posting_and_counts_catch_up(
    tmp_path: Path, refusal: str
) -> None:
    config = line_config(tmp_path, free_port())
    plc = await plc_for(config)
    try:
        async with agent_running(config) as (agent, task):
            store = store_of(agent)
            await plc.produce(MIX, good=5, scrap=1)

            async def mix_posted() -> bool:
                return caught_up(await outbox(store), plc, MIX)

            await wait_until(mix_posted, "the first counts to be posted")
            before = len(await outbox(store))

            # the counter registers answer an exception response; the PLC keeps counting
            await plc.set_exception(MIX, "good", refusal)

            async def quality_raised() -> bool:
                messages = (await outbox(store))[before:]
                return len(exceptions(messages, ExceptionCode.SIGNAL_QUALITY)) >= 3

            await wait_until(quality_raised, "the signal_quality exceptions")
            await plc.produce(MIX, good=7, scrap=2)
            await plc.complete(FILL, good=4, scrap=1, timeout=10)  # the rest of the line posts
            await polls(plc, 40)  # many polls answered with the exception meanwhile

            during = (await outbox(store))[before:]
            assert postings(during, MIX) == []  # nothing from a refused register
            assert confirmations(during, FILL) == [(Decimal(4), Decimal(1))]
            quality = exceptions(during, ExceptionCode.SIGNAL_QUALITY)
            # one exception per signal of the refused request (once, not once per poll), each
            # naming its register and the Modbus exception
            named = sorted((e.trigger.signal, e.trigger.address) for e in quality if e.trigger)
            assert named == [
                ("good", "holding:10"),
                ("order", "holding:0"),
                ("scrap", "holding:12"),
            ]
            for e in quality:
                assert e.work_centre == MIX
                assert e.details["status"] == refusal
                assert refusal in e.text
                assert e.trigger is not None
                assert f"{e.trigger.signal} ({e.trigger.address})" in e.text
            # an exception response is an answer: the connection stays, the agent runs on
            assert exceptions(during, ExceptionCode.SOURCE_UNREACHABLE) == []
            assert agent.engine is not None
            assert agent.engine.connected[MIX_PLC]
            assert not task.done()

            plc.clear_exceptions()
            await wait_until(mix_posted, "the counts made meanwhile to be posted")
            await polls(plc, 40)  # time enough for a doubled posting to show

            messages = await outbox(store)
            after = messages[before:]
            # the cumulative counters catch up in one posting each, exactly once
            assert sorted(confirmations(after, MIX)) == [
                (Decimal(0), Decimal(2)),
                (Decimal(7), Decimal(0)),
            ]
            quality = exceptions(messages, ExceptionCode.SIGNAL_QUALITY)
            raised = [e for e in quality if e.resolves is None]
            assert len(raised) == 3  # and each resolved once the register answers again
            assert sorted(e.resolves or "" for e in quality if e.resolves) == sorted(
                e.message_id for e in raised
            )
            assert_totals_match(plc, config, messages)
            assert not task.done()
    finally:
        await plc.stop()
    async with Store.open(tmp_path / "agent.db") as store:
        assert (await store.verify_audit()).ok


# ------------------------------------------------------------------- unreachable device


@pytest.mark.asyncio
async def test_an_unreachable_device_is_one_named_exception_no_posting_and_recovers(
    tmp_path: Path,
) -> None:
    config = line_config(tmp_path, free_port())
    plc = await plc_for(config)
    try:
        with structlog.testing.capture_logs() as logs:
            async with agent_running(config) as (agent, task):
                store = store_of(agent)
                engine = agent.engine
                assert engine is not None
                await plc.produce(MIX, good=3)

                async def mix_posted() -> bool:
                    return caught_up(await outbox(store), plc, MIX)

                await wait_until(mix_posted, "the first counts to be posted")
                before = len(await outbox(store))

                await plc.stop()  # power off: the PLC keeps counting, nobody can read it
                await plc.produce(MIX, good=6, scrap=1)

                def failed_attempts(source: str) -> int:
                    return sum(
                        e["event"] == "modbus_connect_failed" and e.get("source") == source
                        for e in logs
                    )

                async def retried() -> bool:
                    return all(failed_attempts(s) >= 4 for s in (MIX_PLC, FILL_PLC))

                await wait_until(retried, "several reconnect attempts of both sources")
                down = (await outbox(store))[before:]
                unreachable = exceptions(down, ExceptionCode.SOURCE_UNREACHABLE)
                # one exception per source, however many attempts failed
                assert sorted(e.details["source"] for e in unreachable) == [FILL_PLC, MIX_PLC]
                for e in unreachable:
                    assert e.work_centre == {MIX_PLC: MIX, FILL_PLC: FILL}[e.details["source"]]
                    assert e.details["source"] in e.text
                    assert e.order == ORDER
                assert postings(down, MIX) == []
                assert postings(down, FILL) == []
                assert not any(engine.connected.values())
                assert not task.done()

                await plc.start()  # power on: what it counted meanwhile is read

                async def recovered() -> bool:
                    messages = await outbox(store)
                    back = exceptions(messages, ExceptionCode.SOURCE_RECOVERED)
                    return len(back) == 2 and caught_up(messages, plc, MIX)

                await wait_until(recovered, "both sources back and the counts caught up")
                await plc.complete(FILL, good=5, scrap=1, timeout=10)
                await plc.produce(MIX, good=2)
                await wait_until(mix_posted, "the counts after the return to be posted")
                await polls(plc, 40)  # time enough for a doubled posting to show

                messages = await outbox(store)
                after = messages[before:]
                # what was counted while down is posted once, on the read after the return
                assert sorted(confirmations(after, MIX)) == [
                    (Decimal(0), Decimal(1)),
                    (Decimal(2), Decimal(0)),
                    (Decimal(6), Decimal(0)),
                ]
                assert confirmations(after, FILL) == [(Decimal(5), Decimal(1))]
                assert len(exceptions(messages, ExceptionCode.SOURCE_UNREACHABLE)) == 2
                back = exceptions(messages, ExceptionCode.SOURCE_RECOVERED)
                assert sorted(e.details["source"] for e in back) == [FILL_PLC, MIX_PLC]
                assert all(engine.connected.values())
                assert_totals_match(plc, config, messages)
                assert not task.done()
    finally:
        await plc.stop()
    async with Store.open(tmp_path / "agent.db") as store:
        assert (await store.verify_audit()).ok


# ------------------------------------------------------------------- unanswered acknowledge


class HangOnFirstAck:
    """The real Modbus source of the filler; the device stops answering (a hung CPU, a
    half-open path: :meth:`ModbusPlc.hang_connections`) just as the agent writes its first
    acknowledge, so that write is sent and never answered. Every write is recorded."""

    def __init__(self, source: Source, plc: ModbusPlc) -> None:
        self._source = source
        self._plc = plc
        self.name = source.name
        self.writes: list[tuple[bool | int, str | None]] = []  # (value, error or None)

    async def run(self, emit: Emit) -> None:
        await self._source.run(emit)

    async def write(self, signal: str, value: bool | int) -> None:
        assert signal == "complete_ack"
        if not self.writes:
            assert self._plc.hang_connections() == 1
        try:
            await self._source.write(signal, value)
        except SignalError as exc:
            self.writes.append((value, str(exc)))
            raise
        self.writes.append((value, None))


@pytest.mark.asyncio
async def test_an_unanswered_acknowledge_is_written_again_and_never_posted_twice(
    tmp_path: Path,
) -> None:
    config = line_config(tmp_path, free_port(), FILL, timeout_ms=500)
    plc = await plc_for(config)
    hanging: list[HangOnFirstAck] = []

    def sources(c: Config) -> list[Source]:
        hanging[:] = [HangOnFirstAck(s, plc) for s in plc_sources(c)]
        return list(hanging)

    try:
        with structlog.testing.capture_logs() as logs:
            async with agent_running(config, sources) as (agent, task):
                store = store_of(agent)
                engine = agent.engine
                assert engine is not None
                (fill,) = hanging

                # the PLC waits for the acknowledge (it counts the handshake only then)
                await plc.complete(FILL, good=6, scrap=1, timeout=15)

                async def ack_dropped() -> bool:  # the PLC saw it: its answer is on the way
                    return fill.writes[-1] == (False, None)

                await wait_until(ack_dropped, "the acknowledge to be dropped")
                messages = await outbox(store)
                assert confirmations(messages, FILL) == [(Decimal(6), Decimal(1))]
                # the first acknowledge went unanswered; it was written again, then dropped
                (first_value, first_error), *later = fill.writes
                assert first_value is True
                assert first_error is not None
                assert "complete_ack (coil:1)" in first_error
                assert [error for _, error in later] == [None] * len(later)
                values = [value for value, _ in later]
                assert values[0] is True
                assert values[-1] is False
                assert engine.stats.ack_failures == 1
                failed = [e for e in logs if e["event"] == "handshake_ack_failed"]
                assert len(failed) == 1
                assert failed[0]["work_centre"] == FILL
                assert plc.value(FILL, "complete_ack") is False
                assert plc.totals[(ORDER, FILL)].handshakes == 1
                # the hung device is an unreachable one, once, and back
                codes = Counter(m.code for m in messages if isinstance(m, ExceptionMessage))
                assert codes[ExceptionCode.SOURCE_UNREACHABLE] == 1
                assert codes[ExceptionCode.SOURCE_RECOVERED] == 1
                assert not task.done()

                # the next handshake is an ordinary one, and the first is not posted again
                await plc.complete(FILL, good=3, scrap=0, timeout=10)
                await polls(plc, 40)
                messages = await outbox(store)
                assert confirmations(messages, FILL) == [
                    (Decimal(6), Decimal(1)),
                    (Decimal(3), Decimal(0)),
                ]
                assert plc.totals[(ORDER, FILL)].handshakes == 2
                assert engine.stats.ack_failures == 1
                assert_totals_match(plc, config, messages)
                assert not task.done()
    finally:
        await plc.stop()
    async with Store.open(tmp_path / "agent.db") as store:
        assert (await store.verify_audit()).ok
