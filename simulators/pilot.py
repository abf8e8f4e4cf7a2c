"""A short pilot on the example line, end to end, and the report it leads to.

``python -m simulators.pilot [--orders N] [--seed S] [--out DIR] [--broker HOST:PORT]``
(``make pilot``) runs the real pieces, as :mod:`simulators.shift` does: the OPC UA line PLC
(in this process), an MQTT broker (the embedded one in a subprocess, or the one given), the MES
simulator and the agent as a daemon process (``python -m edge_agent run``), on the example line
(config/line.toml, FG-100 rev C of config/masterdata.json). The agent's configuration has a
``[pilot]`` section shadowing two materials, RM-PERFUME (mixing, operation 10) and PK-TUBE
(filling, operation 20): their backflush is published as ``material-consumed-shadow``, the other
materials are backflushed into their staged lots as usual.

The MES releases N orders of varied sizes; the PLC counts each one, back to back, at both work
centres (mixing on its good and scrap counters, filling through the operation-complete
handshake); meanwhile the MES sends the actual issues of the shadowed materials as a scanner
would (``actual-issue``): a setup issue tagged ``setup``, running issues tagged ``running``, in
some orders a return, each with its lot. The line's **truth** is known: per order and shadowed
material, ``actual = true rate × (good + scrap) + true setup + noise``, where the true scrap %
and setup differ from the BOM's standard. Then the MES closes the orders, the agent is stopped
and ``edge-agent pilot report`` reads its store: the comparison per order and the proposal.
At the end the truth is printed beside what the fit proposed.

Everything random (order sizes, product scrap, noise, how the issues are split) comes from
``random.Random(seed)``; the quantities on the wire are decimal strings rounded to the
material's issue increment. Exit 0 when the report has a comparison for every order and
shadowed material that agrees with what the MES received and sent; 1 otherwise, saying which.
Whether each proposal's intervals contain the truth is printed: a 95 % interval misses it about
one time in twenty, which is reported and is not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import itertools
import json
import logging
import random
import signal
import sqlite3
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import tomli_w
from rich.console import Console
from rich.table import Table

from edge_agent.config import Config, parse_config, parse_host_port
from edge_agent.documents import load_master
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import MasterData, PostingMethod
from edge_agent.domain.quantities import Rounding, fmt, round_to_increment, to_decimal
from edge_agent.logs import configure_logging
from edge_agent.messages import wire_time
from simulators.broker import EmbeddedBroker, free_port
from simulators.mes import MesSimulator
from simulators.opcua_plc import LinePlc
from simulators.shift import CONFIG_DIR, FILL, MIX, AgentProcess, units_bar

PRODUCT, REVISION = "FG-100", "C"
#: the revision the proposal is written as (``--proposal FILE --revision NAME``)
PROPOSED_REVISION = "D"
#: order sizes (units of FG-100): from the smallest to the largest, spread evenly over the pilot
SIZES = (100, 1500)


@dataclass(frozen=True)
class Truth:
    """How the pilot line really consumes a shadowed material (unknown to the agent).

    Per order: ``actual = BOM quantity × (1 + scrap_pct / 100) × (good + scrap) + setup +
    noise``, the noise normal with a standard deviation of ``noise`` issue increments.
    ``lots`` are the material's lots the scanner issues from, one after the other over the
    pilot."""

    material: str
    operation: str
    scrap_pct: Decimal
    setup: Decimal
    noise: int
    lots: tuple[str, ...]


#: the shadowed materials and their truth: perfume is dosed with a purge the BOM does not know
#: (standard 0 % and no setup), tubes are lost at the filler more often than the 2 % it allows
TRUTHS: tuple[Truth, ...] = (
    Truth("RM-PERFUME", "10", Decimal(3), Decimal("0.050"), 4, ("PERF-0042", "PERF-0051")),
    Truth("PK-TUBE", "20", Decimal(6), Decimal(20), 3, ("TUBE-7781", "TUBE-7802", "TUBE-7815")),
)


@dataclass(frozen=True)
class Standard:
    """What the BOM says of a shadowed material (issue unit), and how it is issued."""

    material: str
    operation: str
    uom: str
    bom_quantity: Fraction  # per unit of product, without scrap
    scrap_pct: Decimal
    setup: Decimal
    increment: Decimal


@dataclass(frozen=True)
class Chunk:
    """One step of an order: mixing counts, then filling confirms what it filled."""

    mix_good: int
    mix_scrap: int
    fill_good: int
    fill_scrap: int


Phase = Literal["setup", "running"]


@dataclass(frozen=True)
class Issue:
    """An actual issue the scanner records, before chunk ``before`` (``len(chunks)``: after
    the last one); a negative quantity is a return."""

    material: str
    operation: str
    quantity: Decimal
    uom: str
    phase: Phase
    lot: str
    before: int


@dataclass(frozen=True)
class PlannedOrder:
    order: str
    quantity: int  # released, and counted at mixing (good + scrap)
    chunks: tuple[Chunk, ...]
    issues: tuple[Issue, ...]

    def counted(self, operation: str) -> int:
        """Good + scrap at ``operation`` ("10" mixing, "20" filling)."""
        if operation == "10":
            return sum(c.mix_good + c.mix_scrap for c in self.chunks)
        return sum(c.fill_good + c.fill_scrap for c in self.chunks)

    def confirmed(self, operation: str) -> tuple[int, int]:
        """(good, scrap) at ``operation``."""
        if operation == "10":
            return sum(c.mix_good for c in self.chunks), sum(c.mix_scrap for c in self.chunks)
        return sum(c.fill_good for c in self.chunks), sum(c.fill_scrap for c in self.chunks)

    def actual(self, material: str) -> Decimal:
        """What the scanner issued of ``material``, net of returns."""
        return sum((i.quantity for i in self.issues if i.material == material), Decimal(0))


@dataclass(frozen=True)
class PilotPlan:
    seed: int
    orders: tuple[PlannedOrder, ...]
    truths: tuple[Truth, ...]
    standards: dict[str, Standard]

    @property
    def units(self) -> int:
        return sum(o.quantity for o in self.orders)

    @property
    def materials(self) -> tuple[str, ...]:
        return tuple(t.material for t in self.truths)


def standards(master: MasterData, truths: Sequence[Truth], as_of: datetime) -> dict[str, Standard]:
    """The standard of each shadowed material in FG-100 rev C: a direct, backflushed line."""
    bom = master.bom(PRODUCT, REVISION, as_of)
    exploded = explode(master, bom, as_of)
    out = {}
    for t in truths:
        lines = [x for x in bom.lines if x.material == t.material and x.operation == t.operation]
        component = exploded.component(t.operation, t.material, PostingMethod.BACKFLUSH)
        if len(lines) != 1 or component is None:
            raise ValueError(
                f"{bom.ref} has no one backflushed line of {t.material} at {t.operation}"
            )
        scrap = lines[0].scrap_pct
        material = master.materials[t.material]
        out[t.material] = Standard(
            t.material,
            t.operation,
            material.uom,
            component.rate / (1 + Fraction(scrap) / 100),
            scrap,
            to_decimal(component.setup),
            material.increment,
        )
    return out


def make_plan(
    orders: int, seed: int, master: MasterData, truths: Sequence[Truth] = TRUTHS
) -> PilotPlan:
    """The pilot's orders, counts and actual issues, all drawn from ``random.Random(seed)``."""
    if orders < 3:
        raise ValueError(
            f"a pilot needs at least 3 orders to fit a line with a spread (got {orders})"
        )
    rng = random.Random(seed)
    std = standards(master, truths, datetime.now(UTC))
    low, high = SIZES
    # one size from each of n equal bands, shuffled: small and large orders in every pilot
    sizes = [
        rng.randint(low + (high - low) * i // orders, low + (high - low) * (i + 1) // orders)
        for i in range(orders)
    ]
    rng.shuffle(sizes)
    planned = []
    for i, size in enumerate(sizes):
        chunks = _chunks(rng, size)
        order = PlannedOrder(f"WO-{201 + i}", size, chunks, ())
        issues: list[Issue] = []
        for t in truths:
            lot = t.lots[i * len(t.lots) // orders]
            issues += _issues(rng, t, std[t.material], order, lot)
        planned.append(PlannedOrder(order.order, size, chunks, tuple(issues)))
    return PilotPlan(seed, tuple(planned), tuple(truths), std)


def _chunks(rng: random.Random, units: int) -> tuple[Chunk, ...]:
    """``units`` mixed in 3 to 5 steps, a little scrap at each work centre."""
    n = min(5, 3 + units // 600)
    bounds = [units * k // n for k in range(n + 1)]
    out = []
    for a, b in itertools.pairwise(bounds):
        made = b - a
        mix_scrap = rng.randint(0, made // 50)
        mixed = made - mix_scrap
        fill_scrap = rng.randint(0, mixed // 60)
        out.append(Chunk(mixed, mix_scrap, mixed - fill_scrap, fill_scrap))
    return tuple(out)


def _issues(
    rng: random.Random, t: Truth, std: Standard, order: PlannedOrder, lot: str
) -> list[Issue]:
    """The scanner's issues of one material to one order: what the truth says the order used,
    as a setup issue before the first step, a running issue before each step and, in about
    half of the orders, a return of what was left over after the last."""
    inc = std.increment

    def steps(value: Decimal | Fraction) -> Decimal:
        return round_to_increment(value, inc, Rounding.HALF_UP)

    x = order.counted(t.operation)
    rate = std.bom_quantity * (1 + Fraction(t.scrap_pct) / 100)
    noise = round(rng.gauss(0.0, t.noise)) * inc
    total = steps(rate * x + Fraction(t.setup)) + noise
    setup = max(inc, steps(t.setup) + round(rng.gauss(0.0, t.noise / 2)) * inc)
    running = total - setup
    chunks = len(order.chunks)
    issues = [Issue(t.material, t.operation, setup, std.uom, "setup", lot, 0)]
    left_over = rng.randint(1, 20) * inc if rng.random() < 0.5 else Decimal(0)
    issued = Decimal(0)
    for k in range(chunks):
        if k < chunks - 1:
            share = Fraction(sum(_made(c, t.operation) for c in order.chunks[: k + 1]), x)
            quantity = steps(Fraction(running) * share) - issued
        else:
            quantity = running - issued + left_over
        issued += quantity
        if quantity:
            issues.append(Issue(t.material, t.operation, quantity, std.uom, "running", lot, k))
    if left_over:
        issues.append(Issue(t.material, t.operation, -left_over, std.uom, "running", lot, chunks))
    return issues


def _made(chunk: Chunk, operation: str) -> int:
    if operation == "10":
        return chunk.mix_good + chunk.mix_scrap
    return chunk.fill_good + chunk.fill_scrap


# ---------------------------------------------------------------------------------- the run

#: the water meter's time slice in the pilot's configuration (config/line.toml has 10 s)
SLICE_S = 2
#: a weighing bucket's tare (kg)
TARE = Decimal("0.5")
#: the water tank's lot (config/line.toml meters RM-WATER from it)
TANK_LOT = "TANK-2-2611"
#: generous lots of every material the pilot does not shadow, staged before it starts
LOTS: tuple[tuple[str, str, str], ...] = (
    ("BASE-2611-01", "RM-BASE", "10000.000"),
    ("API-0077", "RM-ACTIVE", "100.000"),
    (TANK_LOT, "RM-WATER", "100000.0"),
    ("CAP-5512", "PK-CAP", "100000"),
    ("FOIL-0091", "PK-FOIL", "10000.00"),
    ("GLUE-1203", "ADH-GLUE", "100.000"),
    ("LBL-3302", "PK-LABEL", "100000"),
)

#: (units made so far, what is happening, whether it is a milestone worth keeping on screen)
ProgressFn = Callable[[int, str, bool], None]


@dataclass
class PilotRun:
    """What the run left behind, for the report and the checks."""

    config: Config
    config_path: Path
    #: (order, material, uom) → what the MES ledger received, as material-consumed-shadow
    shadow: dict[tuple[str, str, str], Decimal]
    #: (order, material, uom) → what it received as material-consumed (stock movements)
    consumed: dict[tuple[str, str, str], Decimal]
    #: (order, operation) → (good, scrap) confirmed
    confirmations: dict[tuple[str, str], tuple[Decimal, Decimal]]
    #: actual-issue commands the agent rejected ("order material quantity: reason")
    rejected_issues: list[str] = field(default_factory=list)
    #: MES commands of other kinds that were not accepted
    refused: list[str] = field(default_factory=list)
    #: the orders closed (variance and genealogy received)
    closed: list[str] = field(default_factory=list)


def pilot_config(
    workdir: Path, plc_port: int, broker: tuple[str, int], protocol: str, shadow: Sequence[str]
) -> tuple[Config, Path]:
    """The example line's configuration with ``[pilot] shadow_materials``, pointed at this
    run's PLC, broker and files; the orders come from the MES, the lots from ``lots.json``."""
    data: dict[str, Any] = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["store"]["path"] = str(workdir / "agent.db")
    data["mqtt"].update(
        host=broker[0],
        port=broker[1],
        protocol=protocol,
        delivery="mes-ack",
        mes_ack_timeout_s=2.0,
        reconnect_min_ms=200,
        reconnect_max_ms=1000,
    )
    now = datetime.now(UTC)
    lots = [
        {"lot": lot, "material": material, "quantity": quantity, "staged_at": wire_time(now)}
        for lot, material, quantity in LOTS
    ]
    (workdir / "lots.json").write_text(json.dumps({"lots": lots}, indent=2) + "\n")
    data["masterdata"] = {
        "path": str(CONFIG_DIR / "masterdata.json"),
        "lots": str(workdir / "lots.json"),
    }
    data["pilot"] = {"shadow_materials": list(shadow)}
    for source in data["sources"]:
        source["endpoint"] = f"opc.tcp://127.0.0.1:{plc_port}/edge-agent/sim/"
        source.update(reconnect_min_ms=200, reconnect_max_ms=1000)
        flow = source["signals"].get("flow")
        if flow is not None:
            flow["slice_s"] = SLICE_S  # the last order's water is posted a moment after it
    path = workdir / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return parse_config(data), path


async def run_pilot(
    workdir: Path,
    plan: PilotPlan,
    broker: tuple[str, int] | None = None,
    progress: ProgressFn = lambda units, what, milestone: None,
    protocol: str | None = None,
    settle_timeout: float = 60.0,
) -> PilotRun:
    """Run the pilot on the real pieces; the agent is stopped (cleanly) at the end, so its
    store can be read by the report. ``broker`` None: the embedded broker (MQTT 3.1.1)."""
    workdir.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedBroker | None = None
    if broker is None:
        embedded = EmbeddedBroker(host="127.0.0.1", port=free_port(), workdir=workdir / "broker")
        embedded.start()
        broker, protocol = (embedded.host, embedded.port), "3.1.1"
    plc_port = free_port()
    config, config_path = pilot_config(workdir, plc_port, broker, protocol or "5", plan.materials)
    agent = AgentProcess(config_path, workdir / "agent.log")
    mes = MesSimulator.for_agent(config, workdir / "mes-ledger.db", client_id="mes-sim")
    try:
        async with LinePlc(config, port=plc_port) as plc:
            await plc.change_lot(MIX, TANK_LOT)
            tank_at = time.monotonic()
            await asyncio.to_thread(mes.start, 20.0)
            agent.start()
            progress(0, "agent started", True)
            await agent.wait_connected(len(config.sources))
            progress(0, f"the MES releases {len(plan.orders)} orders of {PRODUCT}", True)
            await _commands(
                mes, [functools.partial(_release, mes, o) for o in plan.orders], "release"
            )
            # the water in the piping before the tank's lot reached the meter has no lot
            await asyncio.sleep(max(0.0, float(_lag_s(config)) - (time.monotonic() - tank_at)))
            issues = await _produce(plc, mes, agent, plan, progress)
            progress(plan.units, "waiting for the MES to have every posting", True)
            await _settle(mes, plan, agent, Path(config.store.path), settle_timeout)
            rejected = await _issue_replies(mes, issues)
            progress(plan.units, "the MES closes the orders", True)
            closed, refused = await _close(mes, plan)
            progress(plan.units, "stopping the agent", False)
            code = await asyncio.to_thread(agent.stop)
            if code != 0:
                raise RuntimeError(f"the agent exited with code {code}; see {agent.log_path}")
        return PilotRun(
            config,
            config_path,
            mes.shadow_consumption(),
            mes.consumption(),
            mes.confirmations(),
            rejected,
            refused,
            closed,
        )
    finally:
        agent.stop(signal.SIGKILL)
        mes.close()
        if embedded is not None:
            embedded.stop()


def _release(mes: MesSimulator, order: PlannedOrder) -> str:
    return mes.release_order(order.order, PRODUCT, order.quantity, revision=REVISION)


async def _commands(
    mes: MesSimulator, senders: Sequence[Callable[[], str]], what: str
) -> list[str]:
    """Send commands, then wait for every reply; RuntimeError naming those not accepted."""
    ids = [await asyncio.to_thread(send) for send in senders]
    refused = []
    for command_id in ids:
        reply = await asyncio.to_thread(mes.wait_reply, command_id, 20.0)
        if reply.result != "accepted":
            refused.append(f"{command_id}: {reply.reason}")
    if refused:
        raise RuntimeError(f"the agent refused {what}: {'; '.join(refused)}")
    return ids


async def _produce(
    plc: LinePlc, mes: MesSimulator, agent: AgentProcess, plan: PilotPlan, progress: ProgressFn
) -> list[tuple[str, Issue, str]]:
    """The orders back to back: the order set at both work centres, the active ingredient
    weighed, then each step mixed (counters, water) and filled (handshake), the scanner's
    issues in between. The issues sent: (order, issue, command id)."""
    made = 0
    sent: list[tuple[str, Issue, str]] = []

    async def scan(order: PlannedOrder, before: int) -> None:
        for issue in order.issues:
            if issue.before == before:
                command_id = await asyncio.to_thread(_send_issue, mes, order.order, issue)
                sent.append((order.order, issue, command_id))

    for n, order in enumerate(plan.orders, start=1):
        await plc.set_order(MIX, order.order)
        await plc.set_order(FILL, order.order)
        # RM-ACTIVE: 0.5 kg per 100 tubes of the order, in a bucket (the agent checks the
        # tolerance against the planned quantity)
        await plc.weigh(MIX, order.quantity * Decimal("0.005") + TARE, TARE)
        progress(
            made, f"order {order.order} ({n}/{len(plan.orders)}): {order.quantity} units", True
        )
        for k, chunk in enumerate(order.chunks):
            agent.check()
            await scan(order, k)
            await plc.produce(MIX, good=chunk.mix_good, scrap=chunk.mix_scrap)
            await plc.flow(MIX, 3 * (chunk.mix_good + chunk.mix_scrap))  # 3 L per 100 units
            await plc.complete(FILL, chunk.fill_good, chunk.fill_scrap, timeout=60.0)
            made += chunk.mix_good + chunk.mix_scrap
            progress(made, f"order {order.order} ({n}/{len(plan.orders)})", False)
        await scan(order, len(order.chunks))
    return sent


def _send_issue(mes: MesSimulator, order: str, issue: Issue) -> str:
    return mes.actual_issue(
        order,
        issue.material,
        issue.quantity,
        issue.uom,
        operation=issue.operation,
        lot=issue.lot,
        phase=issue.phase,
    )


async def _issue_replies(mes: MesSimulator, sent: Sequence[tuple[str, Issue, str]]) -> list[str]:
    rejected = []
    for order, issue, command_id in sent:
        reply = await asyncio.to_thread(mes.wait_reply, command_id, 20.0)
        if reply.result != "accepted":
            rejected.append(f"{order} {issue.material} {fmt(issue.quantity)}: {reply.reason}")
    return rejected


def _lag_s(config: Config) -> Decimal:
    flow = next(s.signals.flow for s in config.sources if s.signals.flow is not None)
    return flow.lag_s


async def _settle(
    mes: MesSimulator, plan: PilotPlan, agent: AgentProcess, store: Path, timeout: float
) -> None:
    """Until the MES has every order's confirmations and water as the PLC counted them, a
    shadow posting of each shadowed material, and the agent's outbox is empty."""
    water = {
        o.order: round_to_increment(
            Fraction(3 * o.counted("10"), 100), Decimal("0.1"), Rounding.HALF_UP
        )
        for o in plan.orders
    }

    def done() -> bool:
        confirmations = mes.confirmations()
        consumed = mes.consumption()
        shadow = {(o, m) for o, m, _ in mes.shadow_consumption()}
        for o in plan.orders:
            for op in ("10", "20"):
                good, scrap = o.confirmed(op)
                if confirmations.get((o.order, op)) != (Decimal(good), Decimal(scrap)):
                    return False
            if consumed.get((o.order, "RM-WATER", "L"), Decimal(0)) != water[o.order]:
                return False
            if any((o.order, m) not in shadow for m in plan.materials):
                return False
        return _outbox_depth(store) == 0

    try:
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(done):
                agent.check()
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise RuntimeError(
            f"the MES did not receive every confirmation and posting within {timeout:.0f} s; "
            f"see {agent.log_path}"
        ) from None


def _outbox_depth(path: Path) -> int:
    """The agent's outbox depth, read beside the running agent (WAL: readers do not block)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


async def _close(mes: MesSimulator, plan: PilotPlan) -> tuple[list[str], list[str]]:
    """The MES closes every order; the orders closed (variance received) and those refused."""
    closed, refused = [], []
    ids = [(o.order, await asyncio.to_thread(mes.close_order, o.order)) for o in plan.orders]
    for order, command_id in ids:
        reply = await asyncio.to_thread(mes.wait_reply, command_id, 20.0)
        if reply.result != "accepted":
            refused.append(f"close {order}: {reply.reason}")
            continue

        def received(m: MesSimulator, o: str = order) -> bool:
            return bool(m.ledger.variances(o) and m.ledger.genealogy(o))

        await asyncio.to_thread(mes.wait_for, received, 20.0)
        closed.append(order)
    return closed, refused


# ---------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ReportFiles:
    """Where ``edge-agent pilot report`` writes (``charts`` None: not asked for)."""

    json: Path
    csv: Path  # a directory: comparison.csv and proposal.csv
    proposal: Path
    charts: Path | None

    @classmethod
    def under(cls, directory: Path, charts: bool) -> ReportFiles:
        return cls(
            directory / "pilot-report.json",
            directory / "pilot-csv",
            directory / f"masterdata-{PRODUCT}-rev-{PROPOSED_REVISION}.json",
            directory / "charts" if charts else None,
        )

    def argv(self, config: Path) -> list[str]:
        argv = ["pilot", "report", str(config), "--json", str(self.json), "--csv", str(self.csv)]
        argv += ["--proposal", str(self.proposal), "--revision", PROPOSED_REVISION]
        if self.charts is not None:
            argv += ["--charts", str(self.charts)]
        return argv


def run_report(config: Path, files: ReportFiles) -> int:
    """``edge-agent pilot report`` on the stopped agent's store: it prints its tables and
    writes the files; its exit code."""
    from edge_agent import cli  # noqa: PLC0415  # the report is the last step: imported when used

    try:
        return cli.main(files.argv(config))
    except SystemExit as exc:  # argparse's refusal of the arguments
        return exc.code if isinstance(exc.code, int) else 2


@dataclass(frozen=True)
class Recovered:
    """A figure of a shadowed material: the BOM's standard, the truth, what the fit
    proposed and its interval (None: none given), and whether the interval holds the truth."""

    material: str
    operation: str
    figure: str  # "scrap %" or "setup"
    uom: str
    standard: Decimal
    truth: Decimal
    proposed: Decimal | None
    low: Decimal | None
    high: Decimal | None

    @property
    def contains(self) -> bool:
        return (
            self.low is not None and self.high is not None and self.low <= self.truth <= self.high
        )


@dataclass
class Verdict:
    recovered: list[Recovered]
    #: what is wrong: the run fails (a comparison missing or not what the MES saw, a refusal)
    problems: list[str]
    #: notes that do not fail the run (a thin proposal and its reasons)
    notes: list[str]
    #: an interval that misses the truth: a 95 % interval does so about one time in twenty,
    #: so it is reported, and does not fail the run
    misses: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(plan: PilotPlan, run: PilotRun, report: dict[str, Any]) -> Verdict:
    """The report against what happened: a comparison per order and shadowed material whose
    backflushed is what the MES received in shadow and whose actual is what it sent; and per
    material, whether the proposal's intervals hold the truth."""
    problems = [f"actual issue rejected: {r}" for r in run.rejected_issues]
    problems += run.refused
    notes: list[str] = []
    lines = {(c["order"], c["operation"], c["material"]): c for c in report_comparisons(report)}
    for o in plan.orders:
        for t in plan.truths:
            uom = plan.standards[t.material].uom
            line = lines.get((o.order, t.operation, t.material))
            if line is None:
                problems.append(f"no comparison for order {o.order}, {t.material}")
                continue
            received = run.shadow.get((o.order, t.material, uom), Decimal(0))
            sent = o.actual(t.material)
            for name, expected in (("backflushed", received), ("actual", sent)):
                if Decimal(line[name]) != expected:
                    problems.append(
                        f"order {o.order}, {t.material}: the report's {name} is {line[name]}, "
                        f"the MES {'received' if name == 'backflushed' else 'sent'} "
                        f"{fmt(expected)} {uom}"
                    )
    proposals = {(p["operation"], p["material"]): p for p in report_proposals(report)}
    recovered = []
    misses: list[str] = []
    for t in plan.truths:
        std = plan.standards[t.material]
        p = proposals.get((t.operation, t.material))
        if p is None:
            problems.append(f"no proposal for {t.material} at operation {t.operation}")
            continue
        if p.get("thin"):
            notes.append(
                f"{t.material}: the evidence is thin: " + "; ".join(p.get("reasons") or ())
            )
        for figure, truth, standard, proposed, interval in (
            ("scrap %", t.scrap_pct, std.scrap_pct, "proposed_scrap_pct", "scrap_pct_interval"),
            ("setup", t.setup, std.setup, "proposed_setup", "setup_interval"),
        ):
            bounds = p.get(interval)
            r = Recovered(
                t.material,
                t.operation,
                figure,
                "%" if figure == "scrap %" else std.uom,
                standard,
                truth,
                _dec(p.get(proposed)),
                _dec(bounds["low"]) if bounds else None,
                _dec(bounds["high"]) if bounds else None,
            )
            recovered.append(r)
            if r.low is None:
                problems.append(f"{t.material}: no {figure} interval")
            elif not r.contains:
                misses.append(
                    f"{t.material}: the {figure} interval {_short(r.low)} … "
                    f"{_short(r.high or r.low)} does not contain the truth, {fmt(truth)}"
                )
    return Verdict(recovered, problems, notes, misses)


def report_comparisons(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's comparison lines, one per order, operation and material."""
    return list(report["comparisons"])


def report_proposals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's proposals, one per operation and material."""
    return list(report["proposals"])


def _dec(value: object) -> Decimal | None:
    return None if value is None else Decimal(str(value))


# ---------------------------------------------------------------------------------- the command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.pilot",
        description=(
            "Run a short pilot on the example line (PLC simulator, broker, MES simulator, the "
            "agent as a daemon) with RM-PERFUME and PK-TUBE in shadow, the MES sending the "
            "actual issues of a line whose true scrap %% and setup differ from the BOM; then "
            "run `edge-agent pilot report` and show the truth beside what the fit proposed. "
            "Exit 0 when the report has every order as the MES saw it (an interval that misses "
            "the truth is reported, not a failure: a 95 %% interval does so one time in "
            "twenty), 1 if not."
        ),
    )
    parser.add_argument(
        "--orders", type=int, default=10, help="orders in the pilot, 3 to 40 (default 10)"
    )
    parser.add_argument("--seed", type=int, default=1, help="the random seed (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        help="keep the run's files here (the agent's store and log, the MES ledger, the "
        "report's JSON, CSV, proposed revision and charts); default: a new temporary directory",
    )
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        type=_host_port,
        help="use this MQTT 5 broker (e.g. a mosquitto) instead of the embedded one",
    )
    args = parser.parse_args(argv)
    if not 3 <= args.orders <= 40:
        parser.error(f"--orders must be 3 to 40 (got {args.orders})")
    out = Console(highlight=False, soft_wrap=True)
    workdir = _workdir(parser, args.out)
    return run_demo(out, workdir, args.orders, args.seed, args.broker)


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workdir(parser: argparse.ArgumentParser, given: Path | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="edge-agent-pilot-"))
    if given.exists() and any(given.iterdir()):
        parser.error(f"--out {given}: not empty (a pilot starts with a new agent store)")
    given.mkdir(parents=True, exist_ok=True)
    return given


def run_demo(
    out: Console, workdir: Path, orders: int, seed: int, broker: tuple[str, int] | None
) -> int:
    master = load_master(CONFIG_DIR / "masterdata.json")
    plan = make_plan(orders, seed, master)
    _intro(out, plan, broker)
    started = time.monotonic()
    configure_logging("error", "console", sys.stderr)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    with units_bar(out, plan.units, started) as report:
        try:
            run = asyncio.run(run_pilot(workdir / "run", plan, broker, report))
        except RuntimeError as exc:
            out.print(f"[bold red]The pilot did not run through: {exc}[/bold red]")
            return 1
    pilot_s = time.monotonic() - started
    files = ReportFiles.under(workdir, charts=_have_matplotlib())
    out.print(f"\n[bold]$ edge-agent {' '.join(files.argv(run.config_path))}[/bold]\n")
    code = run_report(run.config_path, files)
    if code != 0 or not files.json.exists():
        out.print(f"[bold red]edge-agent pilot report exited with {code}[/bold red]")
        return 1
    verdict = check(plan, run, json.loads(files.json.read_text()))
    _ending(out, plan, run, verdict, files, workdir, pilot_s, time.monotonic() - started)
    return 0 if verdict.ok else 1


def _have_matplotlib() -> bool:
    import importlib.util  # noqa: PLC0415  # only to ask whether the charts can be drawn

    return importlib.util.find_spec("matplotlib") is not None


def _intro(out: Console, plan: PilotPlan, broker: tuple[str, int] | None) -> None:
    where = f"the broker at {broker[0]}:{broker[1]}" if broker else "an embedded MQTT broker"
    sizes = [o.quantity for o in plan.orders]
    out.print(
        f"[bold]pilot demo[/bold] — {len(plan.orders)} orders of {PRODUCT} rev {REVISION} "
        f"({min(sizes)} to {max(sizes)} units, {plan.units} in all), seed {plan.seed}, with "
        f"{' and '.join(plan.materials)} in shadow (\\[pilot] shadow_materials).\n"
        f"  OPC UA PLC simulator → edge-agent (daemon process) → {where} → MES simulator; the "
        "MES sends the actual issues as a scanner would.\n"
        "  The line's truth, which the agent does not know:"
    )
    for t in plan.truths:
        std = plan.standards[t.material]
        out.print(
            f"    {t.material} (operation {t.operation}): scrap {fmt(t.scrap_pct)} % "
            f"(BOM {fmt(std.scrap_pct)} %), setup {fmt(t.setup)} {std.uom} "
            f"(BOM {fmt(std.setup)} {std.uom}), noise ± {fmt(t.noise * std.increment)} "
            f"{std.uom} (one standard deviation)"
        )
    out.print()


def _ending(
    out: Console,
    plan: PilotPlan,
    run: PilotRun,
    verdict: Verdict,
    files: ReportFiles,
    workdir: Path,
    pilot_s: float,
    total_s: float,
) -> None:
    table = Table(
        title="The line's truth beside what the pilot proposed (95 % intervals)",
        title_justify="left",
    )
    for col in ("material", "op", "figure", "BOM", "truth", "proposed", "interval", ""):
        table.add_column(
            col, justify="left" if col in ("material", "figure", "") else "right", no_wrap=True
        )
    for r in verdict.recovered:
        interval = "—" if r.low is None or r.high is None else f"{_short(r.low)} … {_short(r.high)}"
        table.add_row(
            r.material,
            r.operation,
            f"{r.figure} {r.uom}" if r.figure == "setup" else r.figure,
            fmt(r.standard),
            fmt(r.truth),
            "—" if r.proposed is None else fmt(r.proposed),
            interval,
            "[green]✓[/green]" if r.contains else "[red]✗[/red]",
        )
    # a table is read whole: in a file or a pipe it is not squeezed to 80 columns
    (out if out.is_terminal else Console(file=out.file, width=max(out.width, 100))).print(table)
    others = sorted({m for _, m, _ in run.consumed})
    out.print(
        f"  {len(plan.orders)} orders × {len(plan.materials)} shadowed materials compared with "
        f"the actual issues; {', '.join(others)} posted into their lots as usual.\n"
        f"  The pilot took {pilot_s:.0f} s, with the report {total_s:.0f} s. Files: {files.json}, "
        f"{files.csv}/, {files.proposal}"
        + (f", {files.charts}/" if files.charts else "")
        + f"; the agent's store and log and the MES ledger: {workdir / 'run'}"
    )
    for note in verdict.notes:
        out.print(f"  [yellow]{note}[/yellow]")
    for miss in verdict.misses:
        out.print(f"  [yellow]{miss}[/yellow]")
    if verdict.misses:
        out.print(
            "  [yellow]A 95 % interval misses the truth in about one pilot in twenty, per "
            "figure: that is what 95 % means (try another --seed, or more --orders).[/yellow]"
        )
    if not verdict.ok:
        for problem in verdict.problems:
            out.print(f"  [red]{problem}[/red]")
        out.print("[bold red]The report does not match what the line and the MES did.[/bold red]")
        return
    held = "and every interval holds the truth" if not verdict.misses else "(see the misses)"
    if verdict.notes:
        out.print(
            f"[bold green]Every order compared {held}[/bold green][bold yellow], but the "
            "evidence is too thin to change the standard: the report applies nothing (run more "
            "orders).[/bold yellow]"
        )
        return
    out.print(
        f"[bold green]Every order compared {held}: the pilot's proposal is the line's scrap % "
        "and setup within its intervals.[/bold green]"
        if not verdict.misses
        else f"[bold green]Every order compared {held}.[/bold green]"
    )


def _short(value: Decimal) -> str:
    """An interval bound to 4 significant decimals, for the table."""
    return (
        fmt(round_to_increment(value, Decimal("0.0001"), Rounding.HALF_UP)).rstrip("0").rstrip(".")
    )


if __name__ == "__main__":
    sys.exit(main())
