"""The fault suite: nothing lost, nothing doubled, with faults injected while the line runs.

Each fault kind runs on its own rig, made of the real pieces: the OPC UA (or Modbus) line PLC
simulator in this process, mosquitto (one line broker, or a line broker bridged to a plant
broker), the MES simulator (a persistent session, its deduplicating SQLite ledger) and the agent
itself as a child process (``python -m edge_agent run``), so a kill is a real kill. The PLC
produces at a steady rate through work orders of a multi-component BOM (a phantom, a weighed and
a metered component, a handshake work centre); while it runs the fault is injected again and
again, at moments drawn from a seeded random generator (the seed is printed: the same seed draws
the same moments). Then the faults stop, the rig heals, and the campaign waits until the MES has
everything.

What is checked, per fault kind (``FaultRow``):

- **consumption**: the MES ledger, deduplicated by message id, equals the theoretical
  consumption of what the PLC counted (its own tallies through the pure backflush rules), per
  order and material, exactly;
- **lost**: message ids the agent committed (its audit chain) that never reached the MES;
- **duplicated**: message ids the MES received with two different contents;
- **order**: per order, the sequence numbers of the messages in the order the MES first
  received them never go down.

``python -m simulators.faults`` (``make faults``, ``make faults-full``) prints the table;
tests/faults/ runs a reduced form in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sqlite3
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import tomli_w
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_agent.config import Config, parse_config
from edge_agent.crashpoints import ENV as CRASH_ENV
from edge_agent.crashpoints import POINTS as CRASH_POINTS
from edge_agent.logs import configure_logging
from simulators.broker import free_port
from simulators.mes import MesSimulator
from simulators.modbus_plc import ModbusPlc
from simulators.mosquitto import Bridge, Broker, has_mosquitto
from simulators.opcua_plc import LinePlc
from simulators.shift import (
    CONFIG_DIR,
    FILL,
    MIX,
    AgentProcess,
    SourceKind,
    _lag_s,
    _settle,
    agent_config,
)
from simulators.shift import expected_consumption as theoretical_consumption

Plc = LinePlc | ModbusPlc
Rig = Literal["standard", "rollover-16", "rollover-32"]

#: units of each generated work order, and units per production step
ORDER_UNITS = 60
BATCH = 6
#: seconds the water meter stands still before and after an order change on the rollover rigs
STILL_AT_CHANGE_S = 2.5
#: the lot in the mixer's water tank (config/lots.json)
FEED_LOT = "TANK-2-2611"
#: work orders in the orders document: more than any run gets through
ORDERS = 200
#: the agent's MQTT keep-alive on the rigs: a "long" broker outage outlasts it
KEEPALIVE_S = 5


# ---------------------------------------------------------------------------------- the rig


@dataclass
class Line:
    """One running rig: what a fault acts on."""

    config: Config
    plc: Plc
    agent: AgentProcess
    mes: MesSimulator
    broker: Broker
    plant: Broker | None
    rng: random.Random
    crash_env: str = ""
    #: crash points that fired, by name
    crashes: Counter[str] = field(default_factory=Counter)
    #: faults injected, by kind
    injected: Counter[str] = field(default_factory=Counter)
    armed: bool = True
    #: a power cycle production is asked to make between two steps: (memory lost, seconds off)
    power_cycle: tuple[bool, float] | None = None
    power_cycled: asyncio.Event = field(default_factory=asyncio.Event)
    #: held while the agent is being (re)started, by a fault or by the supervisor
    restarting: asyncio.Lock = field(default_factory=asyncio.Lock)
    _crashed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return sum(self.injected.values()) + sum(self.crashes.values())

    async def restart_agent(self) -> None:
        """Start the agent again (armed with the rig's crash points unless disarmed) and wait
        until it has connected its sources; again if a crash point ends it before that."""
        while True:
            self.agent.env = {CRASH_ENV: self.crash_env} if self.armed and self.crash_env else {}
            self.agent.start()
            try:
                await self.agent.wait_connected(len(self.config.sources), timeout=60)
                return
            except RuntimeError:
                if not self._reap():
                    raise

    def _reap(self) -> bool:
        """The agent died at a crash point: count it (True). False: it is running; any other
        death raises."""
        process = self.agent.process
        if process is None or process.poll() is None:
            return False
        code = process.returncode
        self.agent.process = None
        point = _fired(self.agent.last_log())
        if code != -signal.SIGKILL or point is None:
            raise RuntimeError(f"the agent exited with code {code}; see {self.agent.log_path}")
        self.crashes[f"crash:{point}"] += 1
        self._crashed.set()
        return True

    async def supervise(self) -> None:
        """Restart the agent whenever it dies by itself (an armed crash point, counted; any
        other death is an error)."""
        while True:
            process = self.agent.process
            if process is not None and process.poll() is not None:
                async with self.restarting:
                    if self.agent.process is process and self._reap():
                        await self.restart_agent()
            await asyncio.sleep(0.02)

    async def next_crash(self) -> None:
        self._crashed.clear()
        async with asyncio.timeout(120):
            await self._crashed.wait()


def _fired(log: bytes) -> str | None:
    """The crash point that ended this start of the agent, from its log."""
    marker = b'{"event": "crash_point", "point": "'
    at = log.rfind(marker)
    if at < 0:
        return None
    return log[at + len(marker) :].split(b'"', 1)[0].decode()


Inject = Callable[[Line], Awaitable[int]]


@dataclass(frozen=True)
class FaultKind:
    """A kind of fault: how one is injected (``inject`` returns how many faults it made) and on
    what rig. ``gap`` is the production time between two injections, in seconds."""

    name: str
    what: str
    inject: Inject
    gap: tuple[float, float] = (0.3, 1.5)
    source: SourceKind = "opcua"
    delivery: Literal["broker", "mes-ack"] = "mes-ack"
    bridge: bool = False
    rig: Rig = "standard"
    #: the crash point the agent runs armed with ("*": all of them, at a low rate)
    crash_point: str | None = None


async def _broker_outage(line: Line, seconds: tuple[float, float]) -> int:
    await asyncio.to_thread(line.broker.stop)
    await asyncio.sleep(line.rng.uniform(*seconds))
    await asyncio.to_thread(line.broker.start)
    return 1


async def broker_short(line: Line) -> int:
    return await _broker_outage(line, (0.05, 1.5))


async def broker_long(line: Line) -> int:
    return await _broker_outage(line, (KEEPALIVE_S * 1.5, KEEPALIVE_S * 2.5))


async def bridge_cut(line: Line) -> int:
    """The plant broker (and with it the bridge link and the MES's connection) goes away; the
    line broker keeps accepting the agent's publishes and queues them for the bridge."""
    assert line.plant is not None
    await asyncio.to_thread(line.plant.stop)
    await asyncio.sleep(line.rng.uniform(0.2, 3.0))
    await asyncio.to_thread(line.plant.start)
    return 1


async def agent_kill(line: Line) -> int:
    """kill -9 at a random moment, then start it again."""
    await asyncio.sleep(line.rng.uniform(0.0, 0.5))
    async with line.restarting:
        if not line.agent.running:
            return 0  # it died at a crash point: the supervisor restarts it
        line.agent.stop(signal.SIGKILL)
        await line.restart_agent()
    return 1


async def crash_point(line: Line) -> int:
    """Wait until an armed crash point kills the agent (the supervisor restarts it)."""
    await line.next_crash()
    return 0  # counted by the supervisor, under the point's name


async def _power_cycle(line: Line, reset: bool) -> int:
    """A PLC power cycle, made by production between two steps: a PLC that is off makes
    nothing, and the line does not change orders meanwhile (counts made and reset while the
    agent cannot see them are lost to any reader of the counters: docs/faults.md)."""
    line.power_cycled.clear()
    line.power_cycle = (reset, line.rng.uniform(0.1, 2.0))
    async with asyncio.timeout(240):
        await line.power_cycled.wait()
    return 1


async def plc_restart(line: Line) -> int:
    """A PLC power cycle that keeps its counters (retentive memory)."""
    return await _power_cycle(line, reset=False)


async def plc_reset_new_order(line: Line) -> int:
    """A PLC power cycle that loses its memory (counters zero, no order), then the next order."""
    return await _power_cycle(line, reset=True)


async def plc_drop(line: Line) -> int:
    """The network to the PLC is cut (every connection closed); the agent reconnects, reads every
    node again (duplicated notifications of everything) and subscribes again."""
    line.plc.drop_connections()
    return 1


async def late_notifications(line: Line) -> int:
    """A re-ordered (older) and a duplicated notification of each counter of the mixer."""
    assert isinstance(line.plc, LinePlc)
    n = 0
    for signal_name in ("good", "scrap", "flow"):
        n += await line.plc.replay_late(MIX, signal_name)
    return min(n, 1)


async def mes_offline(line: Line) -> int:
    """The MES (its ack subscriber) goes away for a while; its persistent session queues."""
    await asyncio.to_thread(line.mes.stop)
    await asyncio.sleep(line.rng.uniform(0.5, 4.0))
    await asyncio.to_thread(line.mes.start, 20.0)
    return 1


async def no_fault(line: Line) -> int:
    """Production only: the wrap of the rollover rigs' counters is what is under test."""
    return 0


async def mixed(line: Line) -> int:
    """One fault of a kind drawn at random (crash points are armed too, at a low rate)."""
    name, inject = line.rng.choices(MIXED, weights=[w for _, _, w in MIXED_WEIGHTS])[0]
    n = await inject(line)
    line.injected[name] += n
    return 0  # counted under its own kind


FAULTS: dict[str, FaultKind] = {
    f.name: f
    for f in (
        FaultKind("broker-short", "line broker stopped 0.05-1.5 s", broker_short),
        FaultKind(
            "broker-long",
            f"line broker stopped {KEEPALIVE_S * 1.5:g}-{KEEPALIVE_S * 2.5:g} s "
            f"(keep-alive {KEEPALIVE_S} s)",
            broker_long,
            gap=(0.5, 1.5),
        ),
        FaultKind(
            "broker-short-puback",
            "line broker stopped 0.05-1.5 s, delivery on the broker's PUBACK",
            broker_short,
            delivery="broker",
        ),
        FaultKind("bridge-cut", "line→plant bridge cut 0.2-3 s (mes-ack)", bridge_cut, bridge=True),
        FaultKind("agent-kill", "agent SIGKILL at a random moment", agent_kill, gap=(0.2, 1.5)),
        *(
            FaultKind(
                f"crash:{point}",
                f"agent SIGKILL at {point}",
                crash_point,
                gap=(0.0, 0.0),
                crash_point=point,
            )
            for point in CRASH_POINTS
        ),
        FaultKind("plc-restart", "OPC UA server power cycle, counters kept", plc_restart),
        FaultKind(
            "plc-reset-new-order",
            "OPC UA server power cycle, memory lost, then a new order",
            plc_reset_new_order,
        ),
        FaultKind("plc-drop", "OPC UA connections cut", plc_drop, gap=(0.2, 1.0)),
        FaultKind(
            "late-notification",
            "re-ordered and duplicated counter notifications",
            late_notifications,
            gap=(0.05, 0.4),
        ),
        FaultKind(
            "modbus-restart",
            "Modbus device power cycle, registers kept",
            plc_restart,
            source="modbus",
        ),
        FaultKind("mes-offline", "MES ack subscriber away 0.5-4 s (mes-ack)", mes_offline),
        FaultKind(
            "mixed",
            "all of the above at random, on the bridged rig, crash points armed",
            mixed,
            gap=(0.1, 1.0),
            bridge=True,
            crash_point="*",
        ),
        FaultKind(
            "rollover-16",
            "16-bit counters wrap (production only)",
            no_fault,
            rig="rollover-16",
            gap=(0.0, 0.0),
        ),
        FaultKind(
            "rollover-32",
            "32-bit counters wrap (production only)",
            no_fault,
            rig="rollover-32",
            gap=(0.0, 0.0),
        ),
    )
}

#: what the mixed run draws from, and how often
MIXED_WEIGHTS: tuple[tuple[str, Inject, int], ...] = (
    ("broker-short", broker_short, 4),
    ("broker-long", broker_long, 1),
    ("bridge-cut", bridge_cut, 3),
    ("agent-kill", agent_kill, 3),
    ("plc-restart", plc_restart, 2),
    ("plc-reset-new-order", plc_reset_new_order, 1),
    ("plc-drop", plc_drop, 2),
    ("late-notification", late_notifications, 4),
    ("mes-offline", mes_offline, 2),
)
MIXED: list[tuple[str, Inject]] = [(name, inject) for name, inject, _ in MIXED_WEIGHTS]

#: crash points fire with this chance each time they are passed
CRASH_PROBABILITY = {
    "store.before_commit": 0.08,
    "engine.after_commit": 0.08,
    "engine.before_plc_ack": 0.3,
    "engine.after_plc_ack": 0.3,
    "uplink.after_publish": 0.02,
    "uplink.before_outbox_delete": 0.1,
}


# ---------------------------------------------------------------------------------- results


@dataclass
class FaultRow:
    """The outcome of one fault kind's run."""

    fault: str
    what: str
    iterations: int
    expected: int  # message ids the agent committed
    received: int  # unique message ids at the MES
    redelivered: int  # repeat deliveries the MES deduplicated
    lost: int  # committed ids the MES never received
    duplicated: int  # ids received with two different contents
    lines: int  # (order, material) consumption lines
    lines_off: int  # lines where the ledger differs from the theoretical consumption
    out_of_order: int
    seconds: float
    error: str | None = None
    off: list[str] = field(default_factory=list)
    #: faults by kind (the mixed run's draw, crash points that fired)
    kinds: dict[str, int] = field(default_factory=dict)
    #: through a line broker bridged to a plant broker: MQTT keeps order per topic on one
    #: connection only, and a cut bridge link may deliver a message after a later one of
    #: another topic; the MES orders by ``sequence`` (docs/faults.md). Counted, not failed.
    bridged: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.lost == 0
            and self.duplicated == 0
            and self.lines_off == 0
            and (self.out_of_order == 0 or self.bridged)
            and self.lines > 0
        )


def report_table(rows: Sequence[FaultRow], title: str) -> Table:
    table = Table(title=title)
    table.add_column("fault", no_wrap=True)
    for name in (
        "iterations",
        "messages expected",
        "received",
        "re-sent, deduplicated",
        "lost",
        "duplicated",
        "consumption lines exact",
        "out of order",
        "s",
    ):
        table.add_column(name, justify="right")
    table.add_column("", no_wrap=True)
    for r in rows:
        table.add_row(
            r.fault,
            str(r.iterations),
            str(r.expected),
            str(r.received),
            str(r.redelivered),
            str(r.lost),
            str(r.duplicated),
            f"{r.lines - r.lines_off}/{r.lines}",
            f"{r.out_of_order} (bridged)" if r.out_of_order and r.bridged else str(r.out_of_order),
            f"{r.seconds:.0f}",
            "ok" if r.ok else f"FAIL {r.error or ''}".strip(),
        )
    if rows:
        table.add_section()
        table.add_row(
            "all",
            str(sum(r.iterations for r in rows)),
            str(sum(r.expected for r in rows)),
            str(sum(r.received for r in rows)),
            str(sum(r.redelivered for r in rows)),
            str(sum(r.lost for r in rows)),
            str(sum(r.duplicated for r in rows)),
            f"{sum(r.lines - r.lines_off for r in rows)}/{sum(r.lines for r in rows)}",
            str(sum(r.out_of_order for r in rows)),
            f"{sum(r.seconds for r in rows):.0f}",
            "ok" if all(r.ok for r in rows) else "FAIL",
        )
    return table


# ---------------------------------------------------------------------------------- running


def _documents(workdir: Path, orders: int, rig: Rig) -> tuple[Path, Path]:
    """Work orders FA-001 … of FG-100, and the example's eligible lots with ample quantities
    (what is under test is delivery, not lot shortage: nothing is held)."""
    scale = 10_000 if rig == "standard" else 10_000_000
    units = ORDER_UNITS if rig == "standard" else ORDER_UNITS * 1000
    orders_doc = {
        "orders": [
            {"order": f"FA-{i:03d}", "product": "FG-100", "quantity": str(units)}
            for i in range(1, orders + 1)
        ]
    }
    lots = json.loads((CONFIG_DIR / "lots.json").read_text())
    eligible = []
    for lot in lots["lots"]:
        if lot.get("status", "released") != "released":
            continue
        quantity = Decimal(lot["quantity"]) * scale
        far = {"expiry": "2099-12-31"} if "expiry" in lot else {}
        eligible.append({**lot, "quantity": str(quantity), **far})
    lots["lots"] = eligible
    orders_path, lots_path = workdir / "orders.json", workdir / "lots.json"
    orders_path.write_text(json.dumps(orders_doc))
    lots_path.write_text(json.dumps(lots))
    return orders_path, lots_path


def _configure(
    workdir: Path, kind: FaultKind, plc_port: int, broker: Broker, orders: int
) -> tuple[Config, Path]:
    _, path = agent_config(
        workdir, plc_port, (broker.host, broker.port), "5", kind.delivery, kind.source
    )
    data: dict[str, Any] = tomllib.loads(path.read_text())
    orders_path, lots_path = _documents(workdir, orders, kind.rig)
    data["masterdata"].update(orders=str(orders_path), lots=str(lots_path))
    data["mqtt"].update(keepalive_s=KEEPALIVE_S, mes_ack_timeout_s=2.0)
    if kind.rig != "standard":
        # the PLC keeps counting across orders: the wrap is what is under test
        width = 16 if kind.rig == "rollover-16" else 32
        for source in data["sources"]:
            source["counters_reset_on_order_change"] = False
            for name in ("good", "scrap", "flow"):
                signal_config = source["signals"].get(name)
                if signal_config is not None:
                    signal_config["width"] = width
                    signal_config.pop("max_rate", None)
    path.write_text(tomli_w.dumps(data))
    return parse_config(data), path


async def _produce(line: Line, stop: asyncio.Event, rig: Rig, orders: int = ORDERS) -> int:
    """Steady production through the orders until ``stop``; returns the units made."""
    made = 0
    batch = BATCH if rig == "standard" else 3000
    units = ORDER_UNITS if rig == "standard" else batch * 20
    for i in range(1, orders + 1):
        order = f"FA-{i:03d}"
        reset = rig == "standard"
        if reset or i > 1:  # a rollover rig's first order was set before the agent started
            if not reset:
                await asyncio.sleep(STILL_AT_CHANGE_S)  # still before the change too
            await line.plc.set_order(MIX, order, reset_counters=reset)
            await line.plc.set_order(FILL, order, reset_counters=reset)
            if not reset:
                # counters go on across orders: the water meter stands still over the change
                # until the agent has read it there (the sources re-read a still totalizer
                # about once a second), else the flow around the change is split between the
                # orders by interpolation (docs/feeds.md), not by what the PLC counted
                await asyncio.sleep(STILL_AT_CHANGE_S)
        if rig == "standard":
            # what the order needs of the weighed component, in a 0.5 kg bucket
            net = Decimal(units) * Decimal("0.005")
            await line.plc.weigh(MIX, net + Decimal("0.5"), Decimal("0.5"))
        for step in range(units // batch):
            scrap = 1 if step % 4 == 3 else 0
            await line.plc.produce(MIX, good=batch - scrap, scrap=scrap)
            await line.plc.flow(MIX, 3 * batch)
            await line.plc.complete(FILL, batch - scrap, scrap, timeout=180.0)
            made += batch
            await asyncio.sleep(0.05)
            if stop.is_set():
                return made
            if line.power_cycle is not None:
                reset = await _cycle_plc(line, *line.power_cycle)
                if reset:
                    break  # on to the next order
    return made


async def _cycle_plc(line: Line, reset: bool, off_s: float) -> bool:
    """Power-cycle the PLC (its memory lost if ``reset``: then the water tank's lot is shown
    again and given the meter's hold-up time before the line runs on, so no water is metered
    with no lot in the feed)."""
    connected = _connections(line)
    await line.plc.stop()
    await asyncio.sleep(off_s)
    await line.plc.start(reset=reset)
    # the line runs on once the agent has read the PLC again: an order change (its counters
    # reset) or a Modbus weighing before that is what no reader can know (docs/faults.md)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while _connections(line) < connected + len(line.config.sources):
                await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    if reset:
        await line.plc.change_lot(MIX, FEED_LOT)
        await asyncio.sleep(float(_lag_s(line.config)) + 0.5)
    line.power_cycle = None
    line.power_cycled.set()
    return reset


def _connections(line: Line) -> int:
    """How many PLC connections the agent has made, by its log (every start of it)."""
    log = line.agent.log_path.read_bytes() if line.agent.log_path.exists() else b""
    return log.count(b'"event": "opcua_connected"') + log.count(b'"event": "modbus_connected"')


async def _preset_near_wrap(plc: Plc, width: int) -> None:
    """Before the agent's first read: counters just below the wrap (the agent takes its first
    reading as the baseline), so the first steps of production wrap each of them, and with 16
    bits again every few steps."""
    for name, below in (("good", 5000), ("scrap", 1), ("flow", 5000)):
        await plc.set_counter(MIX, name, (1 << width) - below)


async def run_fault(
    kind: FaultKind,
    iterations: int,
    workdir: Path,
    seed: int,
    on_fault: Callable[[int], None] = lambda n: None,
    settle_timeout: float = 120.0,
) -> FaultRow:
    """Run the line with ``iterations`` faults of ``kind`` injected; reconcile."""
    began = time.monotonic()
    row = FaultRow(kind.name, kind.what, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, bridged=kind.bridge)
    try:
        async with _rig(kind, workdir, seed) as line:
            supervisor = asyncio.create_task(line.supervise(), name="faults.supervisor")
            try:
                await _drive(line, kind, iterations, on_fault, supervisor)
                row.iterations = line.total
                row.kinds = dict(line.injected + line.crashes)
                await _heal(line)
                expected = theoretical_consumption(line.plc.totals, line.config)
                await _settle(
                    line.mes,
                    expected,
                    lambda: _raise_if_done(supervisor),
                    Path(line.config.store.path),
                    settle_timeout,
                )
            finally:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
            code = await asyncio.to_thread(line.agent.stop)
            if code != 0:
                raise RuntimeError(f"the agent exited with code {code}; see {line.agent.log_path}")
        _reconcile(row, expected, line.mes, Path(line.config.store.path))
    except Exception as exc:  # the row says what broke; the campaign goes on
        row.error = f"{type(exc).__name__}: {exc}"
    row.seconds = time.monotonic() - began
    return row


@contextlib.asynccontextmanager
async def _rig(kind: FaultKind, workdir: Path, seed: int) -> AsyncIterator[Line]:
    """Brokers, PLC, MES and agent of one fault kind, running; all stopped at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    plant: Broker | None = None
    broker = Broker(workdir / "line-broker")
    plc_port = free_port()
    config, config_path = _configure(workdir, kind, plc_port, broker, ORDERS)
    agent = AgentProcess(config_path, workdir / "agent.log")
    mes: MesSimulator | None = None
    try:
        if kind.bridge:
            plant = Broker(workdir / "plant-broker")
            await asyncio.to_thread(plant.start)
            base = config.topic_base
            broker.bridge = Bridge(
                plant.host,
                plant.port,
                out=(f"{base}/out/#", f"{base}/status"),
                into=(f"{base}/in/#",),
            )
        await asyncio.to_thread(broker.start)
        mes_broker = plant or broker
        mes = MesSimulator.for_agent(
            config,
            workdir / "mes-ledger.db",
            host=mes_broker.host,
            port=mes_broker.port,
            client_id="mes-sim",
            mes_ack=True,
            reconnect_max_s=1,
        )
        plc: Plc = (LinePlc if kind.source == "opcua" else ModbusPlc)(config, port=plc_port)
        async with plc:
            # the water tank's lot is in the feed before the agent first reads it
            await plc.change_lot(MIX, FEED_LOT)
            if kind.rig != "standard":
                # the order is running before the agent first reads the line: with counters
                # that go on across orders, only what is counted from then on is the agent's
                for wc in (MIX, FILL):
                    await plc.set_order(wc, "FA-001", reset_counters=False)
                await _preset_near_wrap(plc, 16 if kind.rig == "rollover-16" else 32)
            await asyncio.to_thread(mes.start, 20.0)
            line = Line(config, plc, agent, mes, broker, plant, random.Random(seed), _armed(kind))
            await line.restart_agent()
            yield line
    finally:
        agent.stop(signal.SIGKILL)
        if mes is not None:
            mes.close()
        broker.stop()
        if plant is not None:
            plant.stop()


def _armed(kind: FaultKind) -> str:
    """The crash points a kind arms (``EDGE_AGENT_CRASH_POINTS``)."""
    if kind.crash_point == "*":
        return ",".join(f"{p}:{c / 8:g}" for p, c in CRASH_PROBABILITY.items())
    if kind.crash_point is not None:
        return f"{kind.crash_point}:{CRASH_PROBABILITY[kind.crash_point]}"
    return ""


async def _drive(
    line: Line,
    kind: FaultKind,
    iterations: int,
    on_fault: Callable[[int], None],
    supervisor: asyncio.Task[None],
) -> None:
    """Produce, and inject faults until ``iterations`` were made; then stop producing."""
    stop = asyncio.Event()
    production = asyncio.create_task(_produce(line, stop, kind.rig), name="faults.production")
    counted = 0
    wraps = _Wraps(line) if kind.rig != "standard" else None
    try:
        while counted < iterations:
            for task in (production, supervisor):
                if task.done():
                    await task  # raises what stopped it
                    raise RuntimeError(f"{task.get_name()} ended before the faults did")
            if wraps is not None:
                line.injected[kind.name] += wraps.count()
                await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(line.rng.uniform(*kind.gap))
                line.injected[kind.name] += await kind.inject(line)
            on_fault(line.total - counted)
            counted = line.total
        # disarm: the agent's last life must be allowed to finish its work
        line.armed = False
        if line.crash_env:
            async with line.restarting:
                if line.agent.running:
                    line.agent.stop(signal.SIGKILL)
                    await line.restart_agent()
    finally:
        stop.set()
        await _finish(production)


class _Wraps:
    """Counts the wraps of the mixer's counters (good, scrap, the totalizer) as the PLC's own
    values show them."""

    def __init__(self, line: Line) -> None:
        self.line = line
        self.previous = {name: self._value(name) for name in ("good", "scrap", "flow")}

    def _value(self, name: str) -> int:
        return int(str(self.line.plc.value(MIX, name)))

    def count(self) -> int:
        n = 0
        for name, before in self.previous.items():
            now = self._value(name)
            n += now < before
            self.previous[name] = now
        return n


async def _finish(production: asyncio.Task[int]) -> None:
    try:
        async with asyncio.timeout(240):
            await production
    except TimeoutError:
        production.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await production
        raise RuntimeError(
            "production did not finish: a handshake was never acknowledged"
        ) from None


async def _heal(line: Line) -> None:
    """Everything back up: broker(s), PLC, MES, the agent (unarmed)."""
    if not line.broker.running:
        await asyncio.to_thread(line.broker.start)
    if line.plant is not None and not line.plant.running:
        await asyncio.to_thread(line.plant.start)
    if not line.plc.running:
        await line.plc.start()
    if not line.mes.connected:
        with contextlib.suppress(RuntimeError):
            await asyncio.to_thread(line.mes.start, 20.0)
    async with line.restarting:
        if not line.agent.running:
            line.agent.process = None
            await line.restart_agent()


def _raise_if_done(task: asyncio.Task[None]) -> None:
    """What ended a task that should run until cancelled, raised."""
    if task.done():
        task.result()
        raise RuntimeError(f"{task.get_name()} ended")


def _reconcile(
    row: FaultRow,
    expected: dict[tuple[str, str, str], Decimal],
    mes: MesSimulator,
    store: Path,
) -> None:
    received = mes.consumption()
    keys = sorted(set(expected) | set(received))
    row.lines = len(keys)
    for key in keys:
        want, got = expected.get(key, Decimal(0)), received.get(key, Decimal(0))
        if want != got:
            row.lines_off += 1
            row.off.append(f"{'/'.join(key)}: expected {want}, received {got}")
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        committed = {r[0] for r in db.execute("SELECT ref FROM audit WHERE kind = 'outbox'")}
    ledger_path = mes.ledger.path
    with contextlib.closing(sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)) as db:
        arrivals = db.execute("SELECT message_id, payload FROM messages ORDER BY rowid").fetchall()
        conflicts = db.execute("SELECT count(*) FROM duplicates WHERE identical = 0").fetchone()
        repeats = db.execute("SELECT count(*) FROM duplicates").fetchone()
    ids = {message_id for message_id, _ in arrivals}
    row.expected = len(committed)
    row.received = len(ids)
    row.lost = len(committed - ids)
    row.duplicated = int(conflicts[0])
    row.redelivered = int(repeats[0])
    last: dict[str, int] = {}
    for _, payload in arrivals:
        message = json.loads(payload)
        order, sequence = message.get("order") or "", int(message["sequence"])
        if sequence < last.get(order, -1):
            row.out_of_order += 1
        last[order] = max(sequence, last.get(order, -1))


# ---------------------------------------------------------------------------------- campaign

#: iterations per fault kind: the quick run (CI-sized) and the full run (≥ 1,000 faults)
QUICK: dict[str, int] = dict.fromkeys(FAULTS, 2) | {"mixed": 8, "rollover-32": 3}
FULL: dict[str, int] = {
    "broker-short": 120,
    "broker-long": 12,
    "broker-short-puback": 60,
    "bridge-cut": 80,
    "agent-kill": 80,
    "crash:store.before_commit": 30,
    "crash:engine.after_commit": 30,
    "crash:engine.before_plc_ack": 30,
    "crash:engine.after_plc_ack": 30,
    "crash:uplink.after_publish": 30,
    "crash:uplink.before_outbox_delete": 30,
    "plc-restart": 60,
    "plc-reset-new-order": 30,
    "plc-drop": 100,
    "late-notification": 250,
    "modbus-restart": 50,
    "mes-offline": 50,
    "mixed": 100,
    "rollover-16": 12,
    "rollover-32": 3,
}


async def run_campaign(
    plan: dict[str, int],
    workdir: Path,
    seed: int,
    console: Console | None = None,
) -> list[FaultRow]:
    """Every fault kind of ``plan`` in turn, each on a fresh rig; the rows in plan order."""
    rows: list[FaultRow] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} faults"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        overall = progress.add_task("all faults", total=sum(plan.values()))
        for i, (name, iterations) in enumerate(plan.items()):
            kind = FAULTS[name]
            task = progress.add_task(f"{name:<34}", total=iterations)

            def advance(n: int, task: Any = task) -> None:
                progress.advance(task, n)
                progress.advance(overall, n)

            row = await run_fault(
                kind, iterations, workdir / name.replace(":", "-"), seed + i, on_fault=advance
            )
            rows.append(row)
            status = "ok" if row.ok else f"FAIL {row.error or ''} {'; '.join(row.off[:3])}"
            progress.update(task, description=f"{name:<34} {status}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.faults",
        description="Inject faults while the line runs; check nothing is lost or doubled.",
    )
    parser.add_argument("--full", action="store_true", help="the full run (over 1,000 faults)")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (printed)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="FAULT", help="run only these fault kinds"
    )
    parser.add_argument("--iterations", type=int, default=None, help="per fault kind")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the rigs' files here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in FAULTS]
    if unknown:
        parser.error(f"unknown fault {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be at least 1 (got {args.iterations})")
    if not has_mosquitto():
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    plan = dict(FULL if args.full else QUICK)
    if args.only:
        plan = {name: plan[name] for name in args.only}
    if args.iterations is not None:
        plan = dict.fromkeys(plan, args.iterations)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    configure_logging("error", "console", sys.stderr)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(f"fault suite: {sum(plan.values())} faults, seed {seed} (--seed {seed})")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = asyncio.run(run_campaign(plan, workdir, seed, console))
    title = f"fault suite ({'full' if args.full else 'quick'} run, seed {seed})"
    console.print(report_table(rows, title))
    for row in rows:
        for line in row.off:
            console.print(f"  {row.fault}: {line}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "seed": seed,
                    "rows": [dict(vars(r)) | {"ok": r.ok} for r in rows],
                },
                indent=2,
            )
        )
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
