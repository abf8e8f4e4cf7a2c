"""A store that cannot commit (a full disk): nothing lost, nothing doubled, nothing run ahead.

Issue 6. The engine applies a batch to its in-memory state, then commits it; when the commit
fails the state must go back to what is committed, no PLC acknowledge may be written for the
batch, no new work may be taken, and once the store commits again the held work is committed
exactly once, with a ``store_full`` exception raised and resolved. docs/durability.md.

The unit-level test fakes the one thing that cannot be had on demand, the failing commit, at the
store boundary (the rest of the store is real). The end-to-end test fills a real tmpfs under a
real agent process reading a real OPC UA PLC simulator.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import tomllib
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import tomli_w

from edge_agent.config import parse_config
from edge_agent.domain.counters import HandshakePhase
from edge_agent.errors import StoreError, StoreFullError
from edge_agent.messages import parse_message
from edge_agent.sources import SourceStatus
from edge_agent.store import Store, UnitOfWork
from simulators.opcua_plc import LinePlc
from simulators.shift import AgentProcess, agent_config, expected_consumption
from tests.support.broker import Broker, EmbeddedBroker, free_port
from tests.support.tmpfs import small_fs
from tests.test_engine import (
    Clock,
    Line,
    Writer,
    consumed,
    expected,
    load,
    make_config,
    outbox,
)


class FailingStore:
    """The real store, except that its commits fail, as on a full disk, while ``failing``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.failing = False
        self.failures = 0
        self.failed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit_units(self, units: Sequence[UnitOfWork]) -> None:
        if self.failing:
            self.failures += 1
            self.failed.set()
            raise StoreFullError(
                "the disk holding store 'agent.db' is full: database or disk is full"
            )
        await self._store.commit_units(units)


def add(*totals: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
    summed: Counter[tuple[str, str]] = Counter()
    for t in totals:
        summed.update(t)
    return dict(summed)


@pytest.mark.asyncio
async def test_a_failed_commit_rolls_back_holds_the_batch_and_commits_it_once(
    tmp_path: Path,
) -> None:
    clock = Clock()
    line = Line(clock)
    async with Store.open(tmp_path / "agent.db") as real:
        store = FailingStore(real)
        engine = await load(make_config(tmp_path), real, clock)
        writer = Writer()
        committed = asyncio.Event()
        alarms: list[dict[str, Any]] = []
        alarmed = asyncio.Event()

        def on_alarm() -> None:
            # runs in the engine task, right after the rollback (or the recovery): what the
            # engine holds in memory at that instant
            wc = engine.work_centres.get("FILL-1")
            alarms.append(
                {
                    "fault": engine.store_fault,
                    "status": engine.status_figures()["store_fault"],
                    "sequence": engine.sequence,
                    "mix_good": engine.work_centres["MIX-1"].counters["good"].raw,
                    "fill_phase": wc.handshake if wc else None,
                    "pending": engine.pending_messages,
                    "writes": list(writer.writes),
                }
            )
            alarmed.set()

        for source in ("mix-plc", "fill-plc"):
            await engine.submit(SourceStatus(source, True, "connected", clock.now))
        await engine.submit(line.event("MIX-1", "order", "WO-7"))
        await engine.submit(line.event("MIX-1", "good", 10))
        task = asyncio.create_task(
            engine.run(store, writer, committed.set, retry_interval=0.01, on_alarm=on_alarm)  # type: ignore[arg-type]
        )
        async with asyncio.timeout(10):
            await committed.wait()
            committed_sequence = (await real.get_state("engine") or {})["sequence"]
            before = [m.message_id for m in await outbox(real)]

            # the disk fills: a counter rise and an operation complete cannot be committed
            store.failing = True
            await engine.submit(line.event("MIX-1", "good", 30))
            await engine.submit(line.event("FILL-1", "order", "WO-7"))
            await engine.submit(line.event("FILL-1", "complete_good", 20))
            await engine.submit(line.event("FILL-1", "complete_scrap", 1))
            await engine.submit(line.event("FILL-1", "complete_request", True))
            await alarmed.wait()
            alarmed.clear()
            held = alarms[0]
            assert held["fault"] is not None
            assert held["fault"]["code"] == "store_full"
            assert "full" in held["fault"]["text"]
            assert held["status"] == held["fault"]  # the retained status carries the alarm
            # rolled back: nothing in memory is ahead of the store
            assert held["sequence"] == committed_sequence
            assert held["mix_good"] == 10
            assert held["fill_phase"] in (None, HandshakePhase.IDLE)
            assert held["pending"] == 0
            assert held["writes"] == []  # no acknowledge for work not committed

            # more counting while the store is down: not taken (it stays queued)
            await engine.submit(line.event("MIX-1", "good", 45))
            while store.failures < 4:  # a few retries, each failing
                store.failed.clear()
                await store.failed.wait()
            assert engine._queue.qsize() >= 1
            assert writer.writes == []
            assert [m.message_id for m in await outbox(real)] == before

            store.failing = False  # space again
            await alarmed.wait()
        assert alarms[1]["fault"] is None
        assert alarms[1]["status"] is None
        engine.stop()
        async with asyncio.timeout(10):
            await task

        messages = await outbox(real)
        assert consumed(messages) == add(
            expected("WO-7", "10", 45, 0), expected("WO-7", "20", 20, 1)
        )
        ids = [m.message_id for m in messages]
        assert len(ids) == len(set(ids))
        assert writer.writes == [("fill-plc", "complete_ack", True)]  # once, after the commit
        faults = [m for m in messages if getattr(m, "code", None) == "store_full"]
        assert [(f.severity.value, f.resolves) for f in faults] == [
            ("error", None),
            ("info", faults[0].message_id),
        ]
        assert faults[0].details["since"]
        assert engine.work_centres["FILL-1"].handshake is HandshakePhase.ACKNOWLEDGED
        assert (await real.get_state("engine") or {})["sequence"] == engine.sequence
        assert (await real.verify_audit()).ok


@pytest.mark.asyncio
async def test_stopping_while_the_store_cannot_commit_ends_the_engine(tmp_path: Path) -> None:
    """A SIGTERM during a full disk must not hang the shutdown: what is held was never
    acknowledged to the PLC or the broker, so the next start reads it again."""
    clock = Clock()
    line = Line(clock)
    async with Store.open(tmp_path / "agent.db") as real:
        store = FailingStore(real)
        engine = await load(make_config(tmp_path), real, clock)
        store.failing = True
        writer = Writer()
        await engine.submit(line.event("MIX-1", "order", "WO-7"))
        await engine.submit(line.event("MIX-1", "good", 10))
        task = asyncio.create_task(engine.run(store, writer, retry_interval=0.01))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await store.failed.wait()
            engine.stop()
            await task
        assert await real.outbox_depth() == 0
        assert writer.writes == []


# ------------------------------------------------------------------------- a real full disk


@pytest.mark.asyncio
async def test_a_full_disk_is_reported_as_full_and_leaves_the_store_intact(tmp_path: Path) -> None:
    """SQLite rolls the transaction back itself on SQLITE_FULL: the store must say "full" (not
    "cannot rollback"), keep nothing of the failed commit, and commit again once there is space."""
    with small_fs(tmp_path / "fs", 512) as fs:
        path = fs.root / "agent.db"
        async with Store.open(path) as store:
            first = UnitOfWork()
            first.enqueue("m-0", "t", b"x" * 100, "2026-11-22T08:00:00.000Z")
            await store.commit_units([first])
            fs.fill()
            big = UnitOfWork()
            for i in range(1, 200):
                big.put_state(f"k/{i}", {"v": "y" * 500})
                big.enqueue(f"m-{i}", "t", b"x" * 500, "2026-11-22T08:00:00.000Z")
            with pytest.raises(StoreFullError, match="is full") as caught:
                await store.commit_units([big])
            assert str(path) in str(caught.value)
            assert isinstance(caught.value, StoreError)
            assert await store.outbox_depth() == 1
            assert await store.all_state() == {}
            fs.free()
            await store.commit_units([big])
            assert await store.outbox_depth() == 200
            assert (await store.verify_audit()).ok
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# ------------------------------------------------------- end to end: the agent on a full disk


def _outbox_messages(path: Path) -> list[Any]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
    return [parse_message(bytes(r[0])) for r in rows]


def _consumed(messages: list[Any]) -> dict[tuple[str, str, str], Decimal]:
    totals: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for m in messages:
        if m.schema_name == "edge-agent/material-consumed":
            totals[(m.order, m.material, m.uom)] += m.quantity
    return {k: v for k, v in totals.items() if v}


def _logged(agent: AgentProcess, event: str) -> int:
    return agent.log_path.read_bytes().count(f'"event": "{event}"'.encode())


async def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class StatusWatcher:
    """Keeps every retained status the agent publishes (a real MQTT subscriber)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-watcher")
        self.client.on_message = lambda c, u, m: self.statuses.append(json.loads(m.payload))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.asyncio
async def test_the_agent_on_a_full_disk_stops_alarms_and_catches_up_exactly(
    tmp_path: Path, broker: Broker | EmbeddedBroker
) -> None:
    """A real agent process, a real OPC UA PLC, the store on a real 2 MB tmpfs that is filled
    while the line counts and runs an operation-complete handshake, then freed. Delivery is
    ``mes-ack`` with no MES acknowledging, so the outbox keeps every message: what it holds at
    the end must be exactly what the PLC counted, through the BOM."""
    with small_fs(tmp_path / "fs", 2048) as fs:
        plc_port = free_port()
        protocol = broker.protocols[0]
        _, config_path = agent_config(
            tmp_path, plc_port, (broker.host, broker.port), protocol, "mes-ack"
        )
        data = tomllib.loads(config_path.read_text())
        data["store"]["path"] = str(fs.root / "agent.db")
        config_path.write_text(tomli_w.dumps(data))
        config = parse_config(data)
        agent = AgentProcess(config_path, tmp_path / "agent.log")
        watcher = StatusWatcher(broker.host, broker.port, f"{config.topic_base}/status")
        try:
            async with LinePlc(config, port=plc_port) as plc:
                for wc in ("MIX-1", "FILL-1"):
                    await plc.set_order(wc, "WO-7")
                agent.start()
                await agent.wait_connected(len(config.sources))
                await plc.produce("MIX-1", good=12, scrap=1)
                await plc.complete("FILL-1", 10, 0)
                store = Path(config.store.path)
                await _until(lambda: _consumed(_outbox_messages(store)), "the first postings")

                fs.fill()
                # the line goes on; the operation complete cannot be acknowledged meanwhile
                handshake = asyncio.create_task(plc.complete("FILL-1", 7, 1, timeout=None))
                await _until(lambda: _logged(agent, "store_commit_failed") >= 1, "the alarm")
                for _ in range(5):
                    await plc.produce("MIX-1", good=9, scrap=1)
                await _until(
                    lambda: any(s.get("store_fault") for s in watcher.statuses),
                    "the alarm in the retained status",
                )
                fault = next(s["store_fault"] for s in watcher.statuses if s.get("store_fault"))
                assert fault["code"] == "store_full"
                assert str(store) in fault["text"]
                assert not handshake.done()
                assert plc.value("FILL-1", "complete_ack") is False
                assert agent.running

                fs.free()
                async with asyncio.timeout(60):
                    await handshake
                await plc.produce("MIX-1", good=5)
                expected = {k: v for k, v in expected_consumption(plc.totals, config).items() if v}
                await _until(
                    lambda: _consumed(_outbox_messages(store)) == expected,
                    "the outbox to catch up with the PLC",
                    timeout=60,
                )
                await _until(
                    lambda: any(s.get("store_fault") is None for s in watcher.statuses[-1:]),
                    "the alarm to clear in the status",
                )
                assert agent.stop() == 0
        finally:
            agent.stop(signal.SIGKILL)
            watcher.close()

        messages = _outbox_messages(store)
        assert _consumed(messages) == expected  # exactly: nothing lost, nothing doubled
        ids = [m.message_id for m in messages]
        assert len(ids) == len(set(ids))
        faults = [m for m in messages if getattr(m, "code", None) == "store_full"]
        assert len(faults) == 2
        assert faults[1].resolves == faults[0].message_id
        assert _logged(agent, "store_committing_again") == 1
        with closing(sqlite3.connect(store)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        async with Store.open(store) as s:
            assert (await s.verify_audit()).ok
