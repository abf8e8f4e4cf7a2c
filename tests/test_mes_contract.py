"""The MES contract both ways, over a real broker: the agent (in-process, its real store, uplink
and engine) and the MES simulator (its persistent session, its ledger, its commands).

The PLC is played by events handed to the engine's queue, where a source would put them: what is
under test here is the conversation with the MES, not the PLC protocols (tests/test_end_to_end.py
runs those).
"""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent
from edge_agent.config import Config, parse_config
from edge_agent.messages import ExceptionMessage, MaterialConsumed, parse_message
from edge_agent.sources import Quality, SignalEvent
from edge_agent.uplink.mqtt import close_sockets
from simulators.mes import MesSimulator
from tests.support.broker import Broker, require_protocol

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

pytestmark = pytest.mark.asyncio


def example_line(tmp_path: Path, unstaged: str) -> dict[str, Any]:
    """The example line's configuration with its store in ``tmp_path`` and no lot of
    ``unstaged`` (its requirements are held until a test stages one)."""
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    lots = json.loads((CONFIG_DIR / "lots.json").read_text())
    lots["lots"] = [x for x in lots["lots"] if x["material"] != unstaged]
    (tmp_path / "lots.json").write_text(json.dumps(lots))
    data["masterdata"] = {
        "path": str(CONFIG_DIR / "masterdata.json"),
        "orders": str(CONFIG_DIR / "orders.json"),
        "lots": str(tmp_path / "lots.json"),
    }
    data["store"]["path"] = str(tmp_path / "agent.db")
    return data


def make_config(broker: Broker, tmp_path: Path, protocol: str = "5") -> Config:
    data = example_line(tmp_path, "RM-PERFUME")  # to be staged
    data["mqtt"].update(
        {
            "host": broker.host,
            "port": broker.port,
            "protocol": protocol,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
            "status_interval_s": 0.5,
        }
    )
    return parse_config(data)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Agent]:
    """The agent without PLC connections (events are handed to its engine), until the block
    ends; it is online (subscribed to its commands) when the block starts."""
    agent = Agent(config, make_sources=lambda c: [])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(15):
            while agent.uplink is None or not agent.uplink.connected:
                assert not task.done(), task
                await asyncio.sleep(0.02)
        yield agent
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


class Plc:
    """Counts as the mix PLC's source would emit them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def emit(self, signal: str, value: Any, at: datetime | None = None) -> None:
        now = datetime.now(UTC)
        assert self.agent.engine is not None
        await self.agent.engine.submit(
            SignalEvent(
                "mix-plc",
                "MIX-1",
                signal,
                f"ns=2;s=MIX-1.{signal}",
                value,
                Quality.GOOD,
                "Good",
                at or now,
                now,
            )
        )


async def wait(mes: MesSimulator, predicate: Any, timeout: float = 20.0) -> None:
    await asyncio.to_thread(mes.wait_for, predicate, timeout)


async def reply(mes: MesSimulator, command_id: str) -> Any:
    return await asyncio.to_thread(mes.wait_reply, command_id, 20.0)


def consumed(mes: MesSimulator, material: str) -> list[MaterialConsumed]:
    return [m for m in received(mes, MaterialConsumed) if m.material == material]


def exceptions(mes: MesSimulator, code: str) -> list[ExceptionMessage]:
    return [m for m in received(mes, ExceptionMessage) if m.code == code]


T = TypeVar("T")


def received(mes: MesSimulator, kind: type[T]) -> list[T]:
    """The messages of one kind in the MES ledger, in arrival order."""
    out = []
    for _, payload in _payloads(mes):
        m = parse_message(payload)
        if isinstance(m, kind):
            out.append(m)
    return out


def _payloads(mes: MesSimulator) -> list[tuple[str, bytes]]:
    with sqlite3.connect(mes.ledger.path) as db:
        rows = db.execute("SELECT kind, payload FROM messages ORDER BY rowid").fetchall()
    return [(k, bytes(p)) for k, p in rows]


def status_where(broker: Broker, topic: str, predicate: Any) -> dict[str, Any]:
    """The first status (the retained one, then each update) that satisfies ``predicate``."""
    got: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for status in list(got):
                if predicate(status):
                    return status
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
        close_sockets(client)
    raise AssertionError(f"no status on {topic} satisfied the test: {got[-1:]}")


async def test_the_mes_contract_both_ways(broker: Broker, tmp_path: Path) -> None:
    require_protocol(broker, "5")
    config = make_config(broker, tmp_path)
    mes = MesSimulator.for_agent(config, tmp_path / "mes.db", client_id="mes-contract")
    mes.start()
    try:
        # -- the agent's first start creates its persistent session, then it goes away
        async with running(config):
            pass

        # -- commands published while the agent is not running are applied when it is back
        release = mes.release_order(
            "WO-9", "FG-100", 40, finished_lot="FG-2611-09", work_centre="MIX-1"
        )
        mes.send_raw("work-order", b"{this is not json")
        async with running(config) as agent:
            plc = Plc(agent)
            assert (await reply(mes, release)).result == "accepted"
            await wait(mes, lambda m: any(r.command_id is None for r in m.replies()))
            (rejected,) = [r for r in mes.replies() if r.command_id is None]
            assert rejected.result == "rejected"
            assert rejected.reason is not None
            assert "malformed JSON" in rejected.reason

            # -- a requirement with no lot staged is held, and posts once a lot is staged
            await plc.emit("order", "WO-9")
            await plc.emit("good", 10)
            await wait(mes, lambda m: bool(exceptions(m, "lot_held")))
            (held,) = exceptions(mes, "lot_held")
            (perfume,) = consumed(mes, "RM-PERFUME")
            assert perfume.held is not None
            assert perfume.held.quantity == Decimal("0.010")
            assert perfume.finished_lot == "FG-2611-09"
            status = await asyncio.to_thread(
                status_where,
                broker,
                f"{config.topic_base}/status",
                lambda x: held.message_id in {e["message_id"] for e in x["open_exceptions"]},
            )
            assert status["state"] == "online"
            assert status["clock_trusted"] is True
            assert status["held_for_clock"] == 0
            assert status["outbox_depth"] >= 0
            assert set(status["sources"]) == {"mix-plc", "fill-plc"}
            # the chain's end, for the MES to keep: an entry the store really holds
            head = status["audit_head"]
            with sqlite3.connect(config.store.path) as db:
                (digest,) = db.execute(
                    "SELECT hash FROM audit WHERE seq = ?", (head["seq"],)
                ).fetchone()
            assert head["seq"] > 0
            assert digest == head["hash"]
            staged = mes.stage_lot("PERF-9001", "RM-PERFUME", "1.000")
            assert (await reply(mes, staged)).result == "accepted"
            await wait(mes, lambda m: len(consumed(m, "RM-PERFUME")) == 2)
            flushed = consumed(mes, "RM-PERFUME")[-1]
            assert flushed.held_released == Decimal("0.010")
            assert [(x.lot, x.quantity) for x in flushed.lots] == [("PERF-9001", Decimal("0.010"))]
            await wait(
                mes, lambda m: held.message_id not in {e.message_id for e in m.open_exceptions()}
            )

            # -- a reversal: a compensating message that the ledger nets to zero
            (base,) = consumed(mes, "RM-BASE")
            reversal = mes.reverse(base.message_id, "WRONG_COUNT", "jdoe")
            answer = await reply(mes, reversal)
            assert answer.result == "accepted", answer.reason
            await wait(mes, lambda m: bool(m.ledger.reversals()))
            quantity, by_lot = mes.net_of(base.message_id)
            assert quantity == 0
            assert set(by_lot.values()) == {Decimal(0)}
            assert mes.ledger.reversals() == {base.message_id: list(answer.produced)}
            again = await reply(mes, mes.reverse(base.message_id, "WRONG_COUNT", "jdoe"))
            assert again.result == "rejected"

            # -- a command id seen twice is applied once
            ret = mes.return_lot("PERF-9001", "0.5", command_id="ret-1")
            mes.return_lot("PERF-9001", "0.5", command_id="ret-1")
            replies = await asyncio.to_thread(mes.wait_replies, ret, 2, 20.0)
            assert [(r.result, r.duplicate) for r in replies] == [
                ("accepted", False),
                ("accepted", True),
            ]
            assert agent.engine is not None
            assert {x.lot: x.quantity for x in agent.engine.lots}["PERF-9001"] == Decimal("0.490")

            # -- no time sync, no posting: held under skew, posted once time is trusted
            mes.heartbeat(datetime.now(UTC) - timedelta(minutes=3))
            await wait(mes, lambda m: bool(exceptions(m, "clock_unsynchronized")))
            before = len(consumed(mes, "RM-BASE"))
            await plc.emit("good", 20)
            await asyncio.sleep(1.0)  # the agent has counted (and held) by now
            assert len(consumed(mes, "RM-BASE")) == before
            mes.heartbeat()
            await wait(mes, lambda m: len(consumed(m, "RM-BASE")) == before + 1)
            late = consumed(mes, "RM-BASE")[-1]
            assert late.clock is not None
            assert late.clock.offset_s > 170
            assert late.created_at < late.clock.agent_time

            # -- hold, start, close: counts kept while held; variance and genealogy at close
            assert (await reply(mes, mes.hold_order("WO-9"))).result == "accepted"
            await plc.emit("good", 25)
            await wait(mes, lambda m: bool(exceptions(m, "order_held")))
            assert (await reply(mes, mes.start_order("WO-9"))).result == "accepted"
            await wait(mes, lambda m: m.confirmations().get(("WO-9", "10"), (0, 0))[0] == 25)
            close = mes.close_order("WO-9", {"PERF-9001": "0.480"})
            closed = await reply(mes, close)
            assert closed.result == "accepted", closed.reason
            await wait(
                mes, lambda m: bool(m.ledger.variances("WO-9") and m.ledger.genealogy("WO-9"))
            )
            (variance,) = mes.ledger.variances("WO-9")
            perfume_line = next(x for x in variance.lines if x.material == "RM-PERFUME")
            # 1.000 staged, 0.5 returned, 0.025 posted: 0.475 left, 0.480 counted
            (remnant,) = variance.remnants
            assert (remnant.balance, remnant.quantity) == (Decimal("0.475"), Decimal("0.480"))
            assert perfume_line.residual == Decimal("-0.005")
            assert perfume_line.actual == Decimal("0.020")
            (genealogy,) = mes.ledger.genealogy("WO-9")
            assert genealogy.finished_lot == "FG-2611-09"
            assert ("RM-PERFUME", "PERF-9001") in {
                (g.material, g.lot) for g in genealogy.components
            }
        counts = mes.counts()
        assert counts.conflicts == 0
        assert counts.rejected == 0  # every message the agent sent is valid
    finally:
        mes.close()
