"""``edge-agent pilot report`` on a pilot run through the engine with a real store.

Ten orders of FG-100 backflush the perfume in shadow; the "scanner" issues what the line really
used: 5 % more than the BOM's 1 g a tube, and 20 g of setup the BOM does not have, with noise. The
report must show each order's comparison exactly as the store has it, propose a scrap % and setup
whose intervals hold the truth, write a proposed BOM revision that loads, and never apply it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
from decimal import ROUND_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import Config, load_config
from edge_agent.domain.masterdata import load_master_data
from edge_agent.engine import Engine
from edge_agent.messages import ShadowConsumption
from edge_agent.store import Store
from tests.test_daemon import runnable, write_config
from tests.test_engine import LOTS, MASTER, ORDERS, Clock, Line, commit, outbox
from tests.test_engine_commands import MASTER_DOC, Mes

TRUE_SCRAP = Decimal("0.05")  # 5 %: the BOM says 0
TRUE_SETUP = Decimal("0.020")  # kg: the BOM says 0
SIZES = (200, 350, 500, 650, 800, 950, 1100, 1300, 1600, 2000)


def pilot_config(tmp_path: Path) -> tuple[Path, Config]:
    data = runnable(tmp_path)
    data["pilot"] = {"shadow_materials": ["RM-PERFUME"]}
    path = write_config(tmp_path, data)
    return path, load_config(path)


async def run_pilot(config: Config, seed: int = 7) -> dict[str, Decimal]:
    """The pilot's orders through the engine; each order's actual perfume issue."""
    rng = random.Random(seed)
    actuals = {}
    async with Store.open(Path(config.store.path)) as store:
        async with store.transaction() as tx:  # as the agent caches it at start
            tx.put_masterdata("document", "masterdata", MASTER_DOC)
        clock = Clock()
        engine = await Engine.load(
            config, store, MASTER, ORDERS, LOTS, clock, master_doc=MASTER_DOC
        )
        engine.connected = dict.fromkeys(engine.connected, True)
        mes, line = Mes(engine, store, clock), Line(clock)
        for i, good in enumerate(SIZES):
            order = f"WO-P{i:02}"
            release = {"action": "release", "order": order, "product": "FG-100"}
            assert (await mes.send("work-order", quantity=str(good), **release)).result == (
                "accepted"
            )
            engine.apply(line.event("MIX-1", "order", order))
            engine.apply(line.event("MIX-1", "good", good))
            await commit(engine, store)
            noise = Decimal(str(rng.gauss(0, 0.002)))
            used = Decimal("0.001") * good * (1 + TRUE_SCRAP) + TRUE_SETUP + noise
            actual = used.quantize(Decimal("0.001"), ROUND_UP)
            setup, running = TRUE_SETUP, actual - TRUE_SETUP
            for phase, quantity in (("setup", setup), ("running", running)):
                issue = {
                    "order": order,
                    "material": "RM-PERFUME",
                    "lot": "PERF-0042",
                    "quantity": str(quantity),
                    "uom": "kg",
                    "at": "2026-11-23T06:00:00.000Z",
                    "phase": phase,
                }
                assert (await mes.send("actual-issue", **issue)).result == "accepted"
            assert (await mes.send("work-order", action="close", order=order)).result == (
                "accepted"
            )
            actuals[order] = actual
        shadow = [m for m in await outbox(store) if isinstance(m, ShadowConsumption)]
        assert len(shadow) == len(SIZES)
    return actuals


def test_the_report_compares_every_order_and_recovers_the_truth(tmp_path: Path) -> None:
    path, config = pilot_config(tmp_path)
    actuals = asyncio.run(run_pilot(config))
    out = tmp_path / "out"
    argv = ["pilot", "report", str(path), "--json", str(out / "pilot.json")]
    argv += ["--csv", str(out), "--proposal", str(out / "proposal.json"), "--revision", "D"]
    argv += ["--charts", str(out / "charts")]
    out.mkdir()
    assert main(argv) == 0

    report = json.loads((out / "pilot.json").read_text())
    rows = {r["order"]: r for r in report["comparisons"]}
    assert set(rows) == {f"WO-P{i:02}" for i in range(len(SIZES))}
    for i, good in enumerate(SIZES):
        row = rows[f"WO-P{i:02}"]
        assert Decimal(row["actual"]) == actuals[f"WO-P{i:02}"]
        assert Decimal(row["theoretical"]) == Decimal("0.001") * good  # the BOM's standard
        assert Decimal(row["backflushed"]) == Decimal("0.001") * good  # 1 g a tube: exact
        assert Decimal(row["delta"]) == Decimal(row["process"]) - Decimal(row["rounding"])
        assert Decimal(row["actual_setup"]) == TRUE_SETUP  # every issue was tagged

    (proposal,) = report["proposals"]
    assert (proposal["material"], proposal["orders"], proposal["thin"]) == ("RM-PERFUME", 10, False)
    scrap, setup = proposal["scrap_pct_interval"], proposal["setup_interval"]
    assert Decimal(scrap["low"]) <= TRUE_SCRAP * 100 <= Decimal(scrap["high"])
    assert Decimal(setup["low"]) <= TRUE_SETUP <= Decimal(setup["high"])
    assert proposal["scrap_changed"]  # the standard 0 % is far outside the interval
    assert proposal["setup_changed"]

    # the proposed revision loads as master data, and nothing was applied to the store
    document = json.loads((out / "proposal.json").read_text())
    (bom,) = document["boms"]
    assert (bom["product"], bom["revision"]) == ("FG-100", "D")
    perfume = next(line for line in bom["lines"] if line["material"] == "RM-PERFUME")
    assert Decimal(perfume["scrap_pct"]) == Decimal(proposal["proposed_scrap_pct"])
    assert Decimal(perfume["setup_quantity"]) > 0
    merged = {**MASTER_DOC, "boms": [*MASTER_DOC["boms"], bom]}
    assert load_master_data(merged).bom("FG-100", "D").revision == "D"
    cached = asyncio.run(_cached_master(config))
    assert {b["revision"] for b in cached["boms"] if b["product"] == "FG-100"} == {"B", "C"}

    with (out / "comparison.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(SIZES)
    with (out / "proposal.csv").open() as f:
        (flat,) = list(csv.DictReader(f))
    assert flat["scrap_pct_low"] == scrap["low"]
    charts = list((out / "charts").glob("*.png"))
    assert [c.name for c in charts] == ["RM-PERFUME-op10.png"]
    assert charts[0].read_bytes().startswith(b"\x89PNG")


async def _cached_master(config: Config) -> dict[str, Any]:
    async with Store.open(Path(config.store.path)) as store:
        cached = await store.get_masterdata("document", "masterdata")
    assert cached is not None
    return dict(cached)


def test_three_orders_are_shown_but_too_thin_to_change_the_standard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, config = pilot_config(tmp_path)
    global SIZES  # noqa: PLW0603 - a shorter pilot, from the same script
    sizes, SIZES = SIZES, (300, 900, 1500)
    try:
        asyncio.run(run_pilot(config))
    finally:
        SIZES = sizes
    assert main(["pilot", "report", str(path), "--json", str(tmp_path / "r.json")]) == 0
    (proposal,) = json.loads((tmp_path / "r.json").read_text())["proposals"]
    assert proposal["thin"]
    assert proposal["orders"] == 3
    assert any("3 orders" in reason for reason in proposal["reasons"]), proposal["reasons"]
    assert "too thin" in capsys.readouterr().out


def test_no_pilot_in_the_store_is_said_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = pilot_config(tmp_path)
    assert main(["pilot", "report", str(path)]) == 1
    assert "does not exist yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--confidence", "1.5"], "--confidence: must be between 0.5 and 0.999"),
        (["--confidence", "x"], "--confidence: expected a number"),
        (["--min-orders", "2"], "--min-orders: must be a whole number of at least 3"),
    ],
)
def test_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    path, _ = pilot_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["pilot", "report", str(path), *args])
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_a_proposal_needs_a_revision_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, config = pilot_config(tmp_path)
    asyncio.run(run_pilot(config))
    assert main(["pilot", "report", str(path), "--proposal", str(tmp_path / "p.json")]) == 2
    assert "--proposal needs --revision NAME" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
