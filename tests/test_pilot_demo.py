"""The pilot demo (simulators/pilot.py) through the real pieces, and the report it leads to.

A reduced pilot: six orders on the example line with RM-PERFUME and PK-TUBE in shadow, the
PLC simulator counting, the agent as a daemon process, a real broker, the MES simulator sending
the actual issues. Then ``edge-agent pilot report`` on the agent's store. The report's JSON must
have one comparison per order and shadowed material, whose backflushed is what the MES ledger
received as material-consumed-shadow and whose actual is what the MES sent; the other materials
must have been posted into their lots as usual, as the pure rules say.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from edge_agent.documents import load_master
from edge_agent.domain.backflush import ConsumptionState, confirm
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import PostingMethod
from simulators.mes import Ledger
from simulators.pilot import (
    PRODUCT,
    REVISION,
    TRUTHS,
    PilotPlan,
    ReportFiles,
    check,
    make_plan,
    run_pilot,
    run_report,
)
from simulators.shift import CONFIG_DIR
from tests.support.broker import Broker, EmbeddedBroker

MASTER = load_master(CONFIG_DIR / "masterdata.json")
SHADOWED = {t.material for t in TRUTHS}


def test_the_plan_is_the_seed_s_and_its_issues_are_whole_increments() -> None:
    """The same seed, the same pilot; every issue a nonzero multiple of the material's
    increment, setup issues first, returns never more than was issued; order sizes spread."""
    plan = make_plan(8, 11, MASTER)
    assert plan == make_plan(8, 11, MASTER)
    assert plan != make_plan(8, 12, MASTER)
    sizes = sorted(o.quantity for o in plan.orders)
    # small and large orders: the fit needs both to tell the setup from the rate
    assert sizes[0] < 300
    assert sizes[-1] > 1300
    for order in plan.orders:
        assert order.counted("10") == order.quantity
        assert order.counted("20") <= order.counted("10")
        for t in plan.truths:
            increment = plan.standards[t.material].increment
            issues = [i for i in order.issues if i.material == t.material]
            assert issues[0].phase == "setup"
            assert all(i.phase == "running" for i in issues[1:])
            issued = Decimal(0)
            for i in issues:
                assert i.quantity != 0
                assert i.quantity % increment == 0
                assert i.uom == plan.standards[t.material].uom
                issued += i.quantity
                assert issued > 0
            assert issued == order.actual(t.material)


def test_a_short_pilot_reports_what_the_mes_received_and_sent(
    broker: Broker | EmbeddedBroker, tmp_path: Path
) -> None:
    plan = make_plan(6, 5, MASTER)
    protocol = "5" if "5" in broker.protocols else "3.1.1"
    run = asyncio.run(
        run_pilot(tmp_path / "run", plan, (broker.host, broker.port), protocol=protocol)
    )
    assert run.rejected_issues == []
    assert run.refused == []
    assert sorted(run.closed) == sorted(o.order for o in plan.orders)

    files = ReportFiles.under(tmp_path, charts=False)
    assert run_report(run.config_path, files) == 0
    report = json.loads(files.json.read_text())

    # one comparison per order and shadowed material, agreeing with the MES both ways
    lines = {(c["order"], c["material"]): c for c in report["comparisons"]}
    assert set(lines) == {(o.order, m) for o in plan.orders for m in SHADOWED}
    for order in plan.orders:
        for t in plan.truths:
            uom = plan.standards[t.material].uom
            line = lines[(order.order, t.material)]
            assert line["operation"] == t.operation
            assert Decimal(line["backflushed"]) == run.shadow[(order.order, t.material, uom)]
            assert Decimal(line["actual"]) == order.actual(t.material)
    assert {(p["operation"], p["material"]) for p in report["proposals"]} == {
        (t.operation, t.material) for t in plan.truths
    }
    # the demo's own check reads the report the same way (whether an interval holds the truth
    # is chance, 95 %: a miss is reported apart and is not a problem)
    verdict = check(plan, run, report)
    assert verdict.problems == []
    assert len(verdict.recovered) == 2 * len(plan.truths)

    # the shadowed materials never moved stock; every other one was posted as usual
    assert {m for _, m, _ in run.shadow} == SHADOWED
    assert not SHADOWED & {m for _, m, _ in run.consumed}
    ledger = Ledger.existing(tmp_path / "run" / "mes-ledger.db")
    try:
        assert not SHADOWED & {m for _, _, m in ledger.lot_movements()}
    finally:
        ledger.close()
    assert _backflushed(run.consumed) == _expected_backflush(plan, run.confirmations)
    for order in plan.orders:  # the scale and the water meter posted too
        assert (order.order, "RM-ACTIVE", "kg") in run.consumed
        assert (order.order, "RM-WATER", "L") in run.consumed


def _backflushed(
    consumed: dict[tuple[str, str, str], Decimal],
) -> dict[tuple[str, str, str], Decimal]:
    return {k: v for k, v in consumed.items() if k[1] not in ("RM-ACTIVE", "RM-WATER")}


def _expected_backflush(
    plan: PilotPlan, confirmations: dict[tuple[str, str], tuple[Decimal, Decimal]]
) -> dict[tuple[str, str, str], Decimal]:
    """What the pure rules backflush of the materials not in shadow, from the confirmations
    the PLC's counts became (each checked against the plan)."""
    now = datetime.now(UTC)
    bom = explode(MASTER, MASTER.bom(PRODUCT, REVISION, now), now)
    out: dict[tuple[str, str, str], Decimal] = {}
    for order in plan.orders:
        state = ConsumptionState()
        for operation in ("10", "20"):
            good, scrap = confirmations[(order.order, operation)]
            assert (good, scrap) == tuple(Decimal(n) for n in order.confirmed(operation))
            result = confirm(MASTER, bom, state, operation, good, scrap)
            state = result.state
            for p in result.postings:
                if p.component.method is PostingMethod.BACKFLUSH and p.material not in SHADOWED:
                    key = (order.order, p.material, p.uom)
                    out[key] = out.get(key, Decimal(0)) + p.quantity
    return {k: v for k, v in out.items() if v}
