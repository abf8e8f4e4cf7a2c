"""A scripted shift on the example line: PLC simulator → agent → broker → MES simulator.

Runs the real pieces: the OPC UA line PLC (in this process), the MES simulator (a paho client
with its SQLite ledger), an MQTT broker (the embedded one in a subprocess, or one given) and the
agent itself as a subprocess (``python -m edge_agent run``), so a restart of the agent is a real
process restart. In the middle of the shift the broker goes down for a while, and later the agent
is stopped while the PLC keeps counting and raises an operation-complete request no one answers.

At the end, the **expected** consumption is computed from what the PLC counted (its own tallies,
through the pure backflush rules, with no knowledge of the agent) and compared with what the MES
ledger **received** (deduplicated by message id): per order and material, exactly.

A plan with ``feed_lots`` also switches the water tank's lot during the shift; the reconciliation
then shows, per lot, the flow metered while the lot was at the meter (the PLC's own meter history
and lot changes, through :func:`simulators.feeds.expected_by_lot`) next to what the MES got drawn
from it, as data: rounding to the issue increment makes the two differ a little, and it is not
part of ``ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import tomli_w
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from edge_agent.config import Config, parse_config
from edge_agent.documents import load_master, load_orders_file
from edge_agent.domain.backflush import ConsumptionState, ScaleReading, confirm, meter, weigh
from edge_agent.domain.counters import quantity
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import MasterData, PostingMethod
from edge_agent.domain.orders import WorkOrder
from edge_agent.domain.quantities import round_to_increment
from edge_agent.messages import Genealogy, OrderVariance
from edge_agent.store import Store
from simulators.broker import EmbeddedBroker, free_port
from simulators.feeds import changes_at, expected_by_lot
from simulators.mes import MesSimulator
from simulators.modbus_plc import ModbusPlc
from simulators.opcua_plc import LinePlc, Tally

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
MIX, FILL = "MIX-1", "FILL-1"
#: the water meter's time slice in a shift's configuration (config/line.toml has 10 s)
SHIFT_SLICE_S = 2
#: the water tank's lots in config/lots.json, for a shift that switches tanks
DEMO_FEED_LOTS: tuple[str, ...] = ("TANK-2-2611", "TANK-2-2612", "TANK-2-2613")


@dataclass(frozen=True)
class ShiftPlan:
    """What the line makes: ``orders`` (id, units) in turn, ``batch`` units per step."""

    orders: tuple[tuple[str, int], ...] = (("WO-7", 250), ("WO-8", 150))
    batch: int = 10
    scrap_every: int = 7  # every n-th batch has one scrap unit at each work centre
    flow_per_unit: int = 3  # totalizer counts (0.01 L) per unit mixed: the BOM's 3 L per 100
    outage_at: float = 0.3  # fraction of the shift when the broker goes down
    outage_batches: int = 5  # batches made while it is down
    restart_at: float = 0.65  # fraction of the shift when the agent is stopped
    restart_batches: int = 3  # mixing batches counted while the agent is down
    pace_s: float = 0.02  # pause between batches
    #: lots the water tank is switched to (MIX-1's feed_lot): the first at the start, then one
    #: after each equal share of the units; none: the tank's lot never changes
    feed_lots: tuple[str, ...] = ()
    #: at the end the MES closes every order (work-order close over MQTT): variance, genealogy
    close_orders: bool = True

    @property
    def units(self) -> int:
        return sum(n for _, n in self.orders)


@dataclass
class Line:
    """Expected vs received for one (order, material)."""

    order: str
    material: str
    uom: str
    expected: Decimal
    received: Decimal

    @property
    def difference(self) -> Decimal:
        return self.received - self.expected


class FeedLot(NamedTuple):
    """One lot of a feed: the flow metered while it was at the meter (exact, in the flow's
    unit) and what the MES ledger has drawn from it."""

    expected: Fraction
    posted: Decimal


@dataclass
class Reconciliation:
    lines: list[Line]
    messages: int
    duplicate_deliveries: int
    rejected: int
    exceptions: dict[str, int]
    outbox_left: int | None
    audit_ok: bool | None
    #: a shift that switched feed lots: lot → expected and posted (None: the flow metered with no
    #: lot known, and what the MES got of the material drawn from no lot); not part of ``ok``
    feed_lots: dict[str | None, FeedLot] = field(default_factory=dict)
    #: the orders the MES closed: their variance and genealogy as the MES received them
    variances: list[OrderVariance] = field(default_factory=list)
    genealogy: list[Genealogy] = field(default_factory=list)
    #: command replies the MES got that were not "accepted"
    refused_commands: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(1 for x in self.lines if x.difference < 0)

    @property
    def doubled(self) -> int:
        return sum(1 for x in self.lines if x.difference > 0)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.rejected == 0 and bool(self.lines)


#: (units made so far, what is happening, whether it is a milestone worth keeping on screen)
Progress = Callable[[int, str, bool], None]


@contextlib.contextmanager
def units_bar(out: Console, total: int, started: float) -> Iterator[Progress]:
    """A progress bar of the units made, for a person watching a demo: the :data:`Progress`
    callback to hand the run; a milestone stays on screen with its time since ``started``."""
    with RichProgress(
        TextColumn("[bold]{task.fields[phase]:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units"),
        TimeElapsedColumn(),
        console=out,
    ) as bar:
        task = bar.add_task("run", total=total, phase="starting")

        def report(units: int, what: str, milestone: bool) -> None:
            if milestone:
                bar.console.print(
                    f"  {time.monotonic() - started:5.1f} s  {units:>5} units  {what}",
                    markup=False,
                )
            bar.update(task, completed=units, phase=what)

        yield report
        bar.update(task, phase="done")


class BrokerControl(Protocol):
    """A broker the shift may stop and start (the embedded one, or a test's mosquitto)."""

    host: str
    port: int

    def start(self, timeout: float = 10.0) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...


SourceKind = Literal["opcua", "modbus"]
EXAMPLES: dict[str, str] = {"opcua": "line.toml", "modbus": "line-modbus.toml"}


def agent_config(
    workdir: Path,
    plc_port: int,
    broker: tuple[str, int],
    protocol: str,
    delivery: str,
    kind: SourceKind = "opcua",
) -> tuple[Config, Path]:
    """The example line's configuration (OPC UA or Modbus), pointed at this shift's PLC,
    broker and files."""
    example = (CONFIG_DIR / EXAMPLES[kind]).read_text()
    data: dict[str, Any] = copy.deepcopy(tomllib.loads(example))
    data["store"]["path"] = str(workdir / "agent.db")
    data["mqtt"].update(
        host=broker[0],
        port=broker[1],
        protocol=protocol,
        delivery=delivery,
        mes_ack_timeout_s=2.0,
        reconnect_min_ms=200,
        reconnect_max_ms=1000,
    )
    data["masterdata"] = {
        "path": str(CONFIG_DIR / "masterdata.json"),
        "orders": str(CONFIG_DIR / "orders.json"),
        "lots": str(CONFIG_DIR / "lots.json"),
    }
    for source in data["sources"]:
        flow = source["signals"].get("flow")
        if flow is not None:
            # a short shift: its last water slice closes a moment after the line stops
            flow["slice_s"] = SHIFT_SLICE_S
        if kind == "opcua":
            source["endpoint"] = f"opc.tcp://127.0.0.1:{plc_port}/edge-agent/sim/"
        else:
            source.update(host="127.0.0.1", port=plc_port)
        source.update(reconnect_min_ms=200, reconnect_max_ms=1000)
    path = workdir / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return parse_config(data), path


class AgentProcess:
    """``python -m edge_agent run CONFIG`` as a child process, its logs in a file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        #: added to this process's environment for the next start
        self.env: dict[str, str] = {}
        self.starts = 0
        self._mark = 0  # where this start's log begins

    def start(self) -> None:
        assert self.process is None
        self._mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edge_agent", "run", str(self.config_path)),
                *("--log-format", "json"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        self.starts += 1

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop it (SIGTERM: the clean shutdown) and return its exit code."""
        if self.process is None:
            return 0
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_connected(self, sources: int, timeout: float = 30.0) -> None:
        """Until this start of the agent has connected every source (read from its JSON log):
        a weighing made before the agent first reads the scale is not one it can take."""
        async with asyncio.timeout(timeout):
            while True:
                self.check()
                log = self.last_log()
                seen = log.count(b'"event": "opcua_connected"') + log.count(
                    b'"event": "modbus_connected"'
                )
                if seen >= sources:
                    return
                await asyncio.sleep(0.05)

    def last_log(self) -> bytes:
        """What this start of the agent has logged so far."""
        with self.log_path.open("rb") as f:
            f.seek(self._mark)
            return f.read()

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"the agent exited with code {self.process.returncode}; see {self.log_path}"
            )


async def run_shift(
    workdir: Path,
    plan: ShiftPlan = ShiftPlan(),
    broker: BrokerControl | tuple[str, int] | None = None,
    progress: Progress = lambda units, what, milestone: None,
    settle_timeout: float = 60.0,
    protocol: str | None = None,
    delivery: str = "mes-ack",
    kind: SourceKind = "opcua",
) -> Reconciliation:
    """Run the shift; returns the reconciliation (``ok`` when nothing was lost or doubled).

    ``broker``: None starts the embedded broker (MQTT 3.1.1); a ``BrokerControl`` is used and
    stopped for the outage; a (host, port) is used as it is, with no outage. ``delivery`` is the
    agent's ``mqtt.delivery``: "mes-ack" (the MES acknowledges ids) or "broker".
    """
    workdir.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedBroker | None = None
    control: BrokerControl | None = None
    if broker is None:
        embedded = EmbeddedBroker(host="127.0.0.1", port=free_port(), workdir=workdir / "broker")
        embedded.start()
        control, address = embedded, (embedded.host, embedded.port)
        protocol = "3.1.1"  # the embedded broker speaks only 3.1.1
    elif isinstance(broker, tuple):
        address = broker
    else:
        control, address = broker, (broker.host, broker.port)
    plc_port = free_port()
    config, config_path = agent_config(workdir, plc_port, address, protocol or "5", delivery, kind)
    agent = AgentProcess(config_path, workdir / "agent.log")
    mes = MesSimulator.for_agent(
        config, workdir / "mes-ledger.db", client_id="mes-sim", mes_ack=True
    )
    try:
        plc_class = LinePlc if kind == "opcua" else ModbusPlc
        async with plc_class(config, port=plc_port) as plc:
            await asyncio.to_thread(mes.start, 20.0)
            agent.start()
            progress(0, "agent started", True)
            await agent.wait_connected(len(config.sources))
            await _produce(plc, agent, control, plan, _planned(config), progress)
            progress(plan.units, "shift done: waiting for the MES to have everything", True)
            expected = expected_consumption(plc.totals, config)
            await _settle(mes, expected, agent.check, Path(config.store.path), settle_timeout)
            refused = []
            if plan.close_orders:
                refused = await _mes_closes(mes, plan, progress)
                await _settle(mes, expected, agent.check, Path(config.store.path), settle_timeout)
            progress(plan.units, "stopping the agent", False)
            code = agent.stop()
            if code != 0:
                raise RuntimeError(f"the agent exited with code {code}; see {agent.log_path}")
            feed = expected_feed_lots(plc, config) if plc.lot_changes else {}
        outbox_left, audit_ok = await _store_check(Path(config.store.path))
        reconciliation = _reconcile(expected, mes, outbox_left, audit_ok)
        reconciliation.feed_lots = _feed_lots(feed, config, mes)
        reconciliation.variances = mes.ledger.variances()
        reconciliation.genealogy = mes.ledger.genealogy()
        reconciliation.refused_commands = refused
        return reconciliation
    finally:
        agent.stop(signal.SIGKILL)
        mes.close()
        if embedded is not None:
            embedded.stop()


def _planned(config: Config) -> dict[str, Decimal]:
    assert config.masterdata is not None
    assert config.masterdata.orders is not None
    master = load_master(config.masterdata.path)
    orders = load_orders_file(config.masterdata.orders, master)
    return {o: wo.quantity for o, wo in orders.items()}


async def _produce(
    plc: LinePlc | ModbusPlc,
    agent: AgentProcess,
    broker: BrokerControl | None,
    plan: ShiftPlan,
    planned: dict[str, Decimal],
    progress: Progress,
) -> None:
    made = 0
    outage_at, restart_at = plan.units * plan.outage_at, plan.units * plan.restart_at
    outage_left: int | None = None
    restarted = False
    lots = list(plan.feed_lots)
    if lots:
        await _change_lot(plc, lots.pop(0), made, progress)
        # the piping still holds what was there before: the first lot reaches the meter only
        # after the lag, and the flow starts then, all of it from the lots of the plan
        await asyncio.sleep(float(_lag_s(plc.config)))
    for order, units in plan.orders:
        await plc.set_order(MIX, order)
        await plc.set_order(FILL, order)
        progress(made, f"order {order}: order set, active ingredient weighed", True)
        await _weigh(plc, planned[order])
        batches = [
            (plan.batch if n + plan.batch <= units else units - n)
            for n in range(0, units, plan.batch)
        ]
        for i, batch in enumerate(batches):
            agent.check()
            # lot k of n (k ≥ 1) goes into the tank once k / n of the units are made
            if lots and made * len(plan.feed_lots) >= plan.units * (
                len(plan.feed_lots) - len(lots)
            ):
                await _change_lot(plc, lots.pop(0), made, progress)
            scrap = 1 if plan.scrap_every and (i + 1) % plan.scrap_every == 0 else 0
            if broker is not None and outage_left is None and made >= outage_at:
                progress(made, "broker down: postings wait in the outbox", True)
                await asyncio.to_thread(broker.stop)
                outage_left = plan.outage_batches
            if not restarted and made >= restart_at:
                restarted = True
                await _agent_restart(plc, agent, plan, order, made, progress)
            await plc.produce(MIX, good=batch - scrap, scrap=scrap)
            await plc.flow(MIX, plan.flow_per_unit * batch)
            await plc.complete(FILL, batch - scrap, scrap, timeout=60.0)
            made += batch
            progress(made, f"order {order}", False)
            if outage_left is not None and broker is not None and not broker.running:
                outage_left -= 1
                if outage_left <= 0:
                    progress(made, "broker back: the outbox drains", True)
                    await asyncio.to_thread(broker.start)
            await asyncio.sleep(plan.pace_s)


async def _change_lot(plc: LinePlc | ModbusPlc, lot: str, made: int, progress: Progress) -> None:
    await plc.change_lot(MIX, lot)
    progress(made, f"water tank switched to lot {lot}", True)


def _lag_s(config: Config) -> Decimal:
    """The hold-up between MIX-1's tank and its flow meter, in seconds."""
    flow = next(s.signals.flow for s in config.sources if s.work_centre == MIX)
    assert flow is not None
    return flow.lag_s


async def _weigh(plc: LinePlc | ModbusPlc, planned: Decimal) -> None:
    """Weigh what the order's planned quantity needs (the agent checks the tolerance)."""
    # 0.5 kg per 100 tubes (config/masterdata.json, RM-ACTIVE) in a 0.5 kg tare bucket
    net = planned * Decimal("0.005")
    await plc.weigh(MIX, net + Decimal("0.5"), Decimal("0.5"))


async def _agent_restart(
    plc: LinePlc | ModbusPlc,
    agent: AgentProcess,
    plan: ShiftPlan,
    order: str,
    made: int,
    progress: Progress,
) -> None:
    """Stop the agent; the PLC keeps counting and raises a request no one acknowledges."""
    progress(made, "agent stopped: the PLC keeps counting", True)
    code = await asyncio.to_thread(agent.stop)
    if code != 0:
        raise RuntimeError(f"the agent exited with code {code} on SIGTERM; see {agent.log_path}")
    pending = asyncio.create_task(plc.complete(FILL, plan.batch, 0, timeout=60.0))
    for _ in range(plan.restart_batches):
        await plc.produce(MIX, good=plan.batch)
        await plc.flow(MIX, plan.flow_per_unit * plan.batch)
        await asyncio.sleep(plan.pace_s)
    progress(made, "agent restarted: reads counters, open request", True)
    agent.start()
    await agent.wait_connected(len(plc.config.sources))
    await pending


async def _settle(
    mes: MesSimulator,
    expected: dict[tuple[str, str, str], Decimal],
    check: Callable[[], None],
    store: Path,
    timeout: float,
) -> bool:
    """Wait until the ledger holds what is expected and the agent's outbox is empty (its
    confirmations and exceptions delivered too); False if not within ``timeout`` (the
    reconciliation then shows the difference). ``check`` raises when waiting is pointless
    (the agent died)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                check()
                received = await asyncio.to_thread(mes.consumption)
                arrived = all(received.get(k, Decimal(0)) == v for k, v in expected.items())
                if arrived and await asyncio.to_thread(_outbox_depth, store) == 0:
                    return True
                await asyncio.sleep(0.2)
    return False


async def _mes_closes(mes: MesSimulator, plan: ShiftPlan, progress: Progress) -> list[str]:
    """The end of the shift on the MES side: lots staged for what is held, then every order
    closed; the closes refused."""
    progress(plan.units, "the MES stages lots for what is held", True)
    staged = await _stage_for_held(mes)
    if staged:
        progress(plan.units, f"held requirements bound to {', '.join(staged)}", True)
    progress(plan.units, "the MES closes the orders: variance and genealogy", True)
    refused = await _close_orders(mes, [order for order, _ in plan.orders])
    approved = await _approve_variances(mes)
    if approved:
        progress(plan.units, f"flagged variances approved by qa-lead: {', '.join(approved)}", True)
    return refused


async def _approve_variances(mes: MesSimulator) -> list[str]:
    """A quality lead answers for each flagged order-close variance (a usage_variance still
    open), as a signature: who and why. The orders approved."""
    approved = []
    for exception in mes.open_exceptions():
        if exception.code != "usage_variance" or exception.order is None:
            continue
        command = mes.resolve_exception(
            exception.message_id,
            "approve",
            "SHIFT_REVIEW",
            "qa-lead",
            comment="reviewed at the end of the shift",
        )
        reply = await asyncio.to_thread(mes.wait_reply, command, 20.0)
        if reply.result == "accepted":
            approved.append(exception.order)
    return approved


async def _stage_for_held(mes: MesSimulator) -> list[str]:
    """The MES stages a lot of every material held for want of one (a lot_held exception still
    open): the agent binds what is held to it (in the same step as the command, so the postings
    reach the MES before the reply) and resolves the exception. The lots staged."""
    staged = []
    for exception in mes.open_exceptions():
        material = exception.material
        if exception.code != "lot_held" or material is None:
            continue
        lot = f"{material}-MES"
        if lot in staged:
            continue
        reply = await asyncio.to_thread(mes.wait_reply, mes.stage_lot(lot, material, "10000"), 20.0)
        if reply.result == "accepted":
            staged.append(lot)
    return staged


async def _close_orders(mes: MesSimulator, orders: list[str]) -> list[str]:
    """The MES closes ``orders`` over MQTT and waits for each reply and the variance and
    genealogy it produces; what was not accepted, as "order: reason"."""
    refused = []
    for order in orders:
        reply = await asyncio.to_thread(mes.wait_reply, mes.close_order(order), 20.0)
        if reply.result != "accepted":
            refused.append(f"{order}: {reply.reason}")
            continue

        def closed(m: MesSimulator, o: str = order) -> bool:
            return bool(m.ledger.variances(o) and m.ledger.genealogy(o))

        await asyncio.to_thread(mes.wait_for, closed, 20.0)
    return refused


def _outbox_depth(path: Path) -> int:
    """The agent's outbox depth, read beside the running agent (WAL: readers do not block)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def expected_consumption(
    totals: dict[tuple[str, str], Tally], config: Config
) -> dict[tuple[str, str, str], Decimal]:
    """What the PLC's counts mean, by the pure rules alone: (order, material, uom) → quantity."""
    assert config.masterdata is not None
    assert config.masterdata.orders is not None
    master = load_master(config.masterdata.path)
    orders = load_orders_file(config.masterdata.orders, master)
    sources = {s.work_centre: s for s in config.sources}
    out: dict[tuple[str, str, str], Decimal] = {}
    for order in sorted({o for o, _ in totals}):
        if order not in orders:
            continue
        for (material, uom), q in _order_consumption(
            master, orders[order], totals, order, sources
        ).items():
            out[(order, material, uom)] = q
    return out


def _order_consumption(
    master: MasterData,
    wo: WorkOrder,
    totals: dict[tuple[str, str], Tally],
    order: str,
    sources: dict[str, Any],
) -> dict[tuple[str, str], Decimal]:
    now = datetime.now(UTC)
    bom = explode(master, master.bom(wo.product, wo.revision, now), now)
    state = ConsumptionState()
    out: dict[tuple[str, str], Decimal] = {}

    def add(material: str, uom: str, quantity: Decimal) -> None:
        out[(material, uom)] = out.get((material, uom), Decimal(0)) + quantity

    for wc, source in sources.items():
        tally = totals.get((order, wc))
        if tally is None:
            continue
        good = Decimal(tally.good + tally.confirmed_good)
        scrap = Decimal(tally.scrap + tally.confirmed_scrap)
        if good or scrap or tally.handshakes:
            result = confirm(master, bom, state, source.operation, good, scrap)
            state = result.state
            for p in result.postings:
                add(p.material, p.uom, p.quantity)
        flow = source.signals.flow
        if flow is not None and tally.flow:
            component = bom.component(source.operation, flow.material, PostingMethod.METER)
            assert component is not None
            metered = quantity(flow.counter_spec(), tally.flow)  # counts → units, as the engine
            state, p = meter(master, state, component, metered, flow.uom)
            add(p.material, p.uom, p.quantity)
        scale = source.signals.scale
        if scale is not None:
            component = bom.component(source.operation, scale.material, PostingMethod.WEIGH)
            assert component is not None
            material = master.materials[component.material]
            for gross, tare in tally.weighings:
                measured = state.component(component.key).measured
                remaining = component.rate * Fraction(wo.quantity) + component.setup - measured
                target = round_to_increment(
                    max(remaining, Fraction(0)), material.increment, material.rounding
                )
                reading = ScaleReading(gross, tare, scale.uom, True)
                outcome = weigh(master, state, component, reading, target)
                if outcome.posting is not None:
                    state = outcome.state
                    add(outcome.posting.material, outcome.posting.uom, outcome.posting.quantity)
    return {k: v for k, v in out.items() if v}


def expected_feed_lots(
    plc: LinePlc | ModbusPlc, config: Config
) -> dict[tuple[str, str | None], Fraction]:
    """Per (material, lot), the flow metered while the lot was at the meter, by the PLC's own
    meter history and lot changes (:func:`simulators.feeds.expected_by_lot`), in the flow's unit;
    lot None: metered before any lot reached the meter."""
    out: dict[tuple[str, str | None], Fraction] = {}
    for source in config.sources:
        flow = source.signals.flow
        if flow is None:
            continue
        wc = source.work_centre
        by_lot = expected_by_lot(
            plc.meter_history(wc),
            changes_at(plc.lot_changes, wc),
            flow.lag_s,
            flow.counter_spec().scale,
        )
        for lot, q in by_lot.items():
            out[(flow.material, lot)] = out.get((flow.material, lot), Fraction(0)) + q
    return out


def _feed_lots(
    expected: dict[tuple[str, str | None], Fraction], config: Config, mes: MesSimulator
) -> dict[str | None, FeedLot]:
    """Expected next to posted per lot of the fed materials: posted is what the ledger's lot
    movements drew from the lot; for None, what the MES got of the material beyond every lot's
    draws (posted with no lot, or held)."""
    if not expected:
        return {}
    materials = {s.signals.flow.material for s in config.sources if s.signals.flow is not None}
    posted: dict[tuple[str, str | None], Decimal] = {}
    for (_order, drawn_from, material), q in mes.lot_movements().items():
        if material in materials:
            posted[(material, drawn_from)] = posted.get((material, drawn_from), Decimal(0)) + q
    received = mes.consumption()
    for material in materials:
        total = sum((q for (_o, m, _u), q in received.items() if m == material), Decimal(0))
        from_lots = sum((q for (m, _l), q in posted.items() if m == material), Decimal(0))
        if total != from_lots or (material, None) in expected:
            posted[(material, None)] = total - from_lots
    out: dict[str | None, FeedLot] = {}
    for key in sorted(set(expected) | set(posted), key=lambda k: (k[0], k[1] or "")):
        lot = key[1]
        before = out.get(lot, FeedLot(Fraction(0), Decimal(0)))
        out[lot] = FeedLot(
            before.expected + expected.get(key, Fraction(0)),
            before.posted + posted.get(key, Decimal(0)),
        )
    return out


async def _store_check(path: Path) -> tuple[int, bool]:
    async with Store.open(path) as store:
        return await store.outbox_depth(), (await store.verify_audit()).ok


def _reconcile(
    expected: dict[tuple[str, str, str], Decimal],
    mes: MesSimulator,
    outbox_left: int | None,
    audit_ok: bool | None,
) -> Reconciliation:
    received = mes.consumption()
    keys = sorted(set(expected) | set(received))
    lines = [
        Line(o, m, u, expected.get((o, m, u), Decimal(0)), received.get((o, m, u), Decimal(0)))
        for o, m, u in keys
    ]
    counts = mes.counts()
    return Reconciliation(
        lines,
        counts.received,
        counts.duplicates,
        counts.rejected,
        mes.exceptions(),
        outbox_left,
        audit_ok,
    )


__all__ = [
    "DEMO_FEED_LOTS",
    "AgentProcess",
    "FeedLot",
    "Reconciliation",
    "ShiftPlan",
    "agent_config",
    "expected_consumption",
    "expected_feed_lots",
    "run_shift",
]
