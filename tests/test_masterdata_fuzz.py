"""Fuzzing the master-data, work-order and lot documents, from files and over the MES.

The example documents (config/masterdata.json, orders.json, lots.json) are mutated a few fields
at a time: a key dropped, a value replaced by one of any JSON type, a duplicate, a phantom made
to contain its own parent. Loading must either succeed or raise the document's own error
(:class:`MasterDataError`, :class:`OrderDataError`, :class:`LotDataError`) naming where the
problem is; never another exception (KeyError, TypeError, decimal.InvalidOperation,
RecursionError, ...). What loads must explode without a crash. The same master-data documents
sent as the MES's ``master-data`` command are accepted or rejected with a reason, and a rejected
one changes nothing.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_agent.documents import load_lots_file, load_master, load_orders_file
from edge_agent.domain.explosion import explode
from edge_agent.domain.lots import load_lots
from edge_agent.domain.masterdata import load_master_data
from edge_agent.domain.orders import OrderDataError, load_orders
from edge_agent.engine import CommandEvent, Engine
from edge_agent.errors import InputError, LotDataError, MasterDataError
from edge_agent.messages import CommandReply
from tests.test_command_fuzz import CONFIG, snapshot
from tests.test_engine import LOTS, MASTER, ORDERS, Clock
from tests.test_engine_commands import MASTER_DOC

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DOCS = {
    name: json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for name in ("masterdata", "orders", "lots")
}
T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)

Key = str | int

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(
        [
            "",
            "NaN",
            "Infinity",
            "-1",
            "0",
            "1e999999999",
            "1E+1000000",
            "0.0000000000000000000001",
            "1,5",
            "kg",
            "L",
            "pc",
            "FG-100",
            "PH-CLOSURE",
            "RM-BASE",
            "backflush",
            "weigh",
            "2026-13-45",
            "2026-11-23T06:00:00Z",
        ]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def walk(value: Any, path: tuple[Key, ...] = ()) -> list[tuple[Key, ...]]:
    out = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += walk(item, (*path, i))
    return out


def at(data: Any, path: tuple[Key, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def phantom_cycle(doc: dict[str, Any]) -> None:
    """The phantom's own BOM made to contain the product that uses it: a cycle."""
    boms = doc["boms"]
    user = next(b for b in boms if any(ln.get("phantom") for ln in b["lines"]))
    phantom = next(ln["material"] for ln in user["lines"] if ln.get("phantom"))
    sub = next(b for b in boms if b["product"] == phantom)
    sub["lines"].append(
        {
            "material": user["product"],
            "quantity": "1",
            "uom": user["uom"],
            "operation": "20",
            "phantom": True,
        }
    )
    doc["materials"].append({"id": user["product"], "uom": user["uom"], "increment": "1"})


@st.composite
def mutated(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], list[str]]:
    doc = copy.deepcopy(DOCS[name])
    hows = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "replace", "add", "duplicate", "cycle"]))
        paths = walk(doc)
        if how == "cycle" and name == "masterdata":
            try:
                phantom_cycle(doc)
            except (StopIteration, KeyError, TypeError, AttributeError):
                continue  # an earlier mutation broke what a cycle is made from
        elif how == "duplicate" and paths:
            path = draw(st.sampled_from(paths))
            parent = at(doc, path[:-1])
            if isinstance(parent, list):
                parent.append(copy.deepcopy(parent[path[-1]]))
        elif not paths or how == "add":
            containers = [p for p in [(), *paths] if isinstance(at(doc, p), dict)]
            target = at(doc, draw(st.sampled_from(containers)))
            target[
                draw(st.sampled_from(["id", "uom", "lines", "phantom", "extra", "quantity"]))
            ] = draw(json_values)
        else:
            path = draw(st.sampled_from(paths))
            parent = at(doc, path[:-1])
            if how == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(json_values)
        hows.append(how)
    for how in hows:
        event(how)
    return doc, hows


def assert_named(exc: InputError) -> None:
    problems = getattr(exc, "problems", (str(exc),))
    assert problems
    for problem in problems:
        where, sep, message = problem.partition(": ")
        assert sep, problem
        assert where, problem
        assert message, problem


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated("masterdata"))
def test_mutated_master_data_loads_or_is_refused_naming_the_field(
    sample: tuple[dict[str, Any], list[str]],
) -> None:
    doc, hows = sample
    try:
        master = load_master_data(doc)
    except MasterDataError as exc:
        event("refused")
        assert_named(exc)
        return
    event("loaded")
    assert "cycle" not in hows or not _cycle_kept(doc), "a phantom cycle was accepted"
    for bom in master.boms.values():
        try:
            explode(master, bom, T0)
        except InputError as exc:
            assert_named(exc)


def _cycle_kept(doc: dict[str, Any]) -> bool:
    """Whether the document still holds the cycle :func:`phantom_cycle` made (later mutations
    may have broken it again)."""
    try:
        boms = {b["product"]: b for b in doc["boms"]}
        return any(
            ln.get("phantom") is True
            and ln.get("material") in boms
            and any(
                sub.get("phantom") is True and sub.get("material") == b["product"]
                for sub in boms[ln["material"]]["lines"]
            )
            for b in doc["boms"]
            for ln in b["lines"]
        )
    except (KeyError, TypeError, AttributeError):
        return False


def test_a_phantom_cycle_is_refused_naming_the_boms() -> None:
    doc = copy.deepcopy(DOCS["masterdata"])
    phantom_cycle(doc)
    with pytest.raises(MasterDataError) as exc:
        load_master_data(doc)
    assert any("cycle" in p for p in exc.value.problems), exc.value.problems


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated("orders"))
def test_mutated_work_orders_load_or_are_refused_naming_the_field(
    sample: tuple[dict[str, Any], list[str]],
) -> None:
    doc, _ = sample
    try:
        load_orders(doc, MASTER)
    except OrderDataError as exc:
        event("refused")
        assert_named(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated("lots"))
def test_mutated_lots_load_or_are_refused_naming_the_field(
    sample: tuple[dict[str, Any], list[str]],
) -> None:
    doc, _ = sample
    try:
        load_lots(doc, MASTER)
    except LotDataError as exc:
        event("refused")
        assert_named(exc)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
        b'{"materials": [], "boms": [',  # cut off
        b"[]",
        b'"materials"',
        b"null",
    ],
)
def test_a_broken_document_file_is_refused_with_its_name(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(content)
    for load in (
        load_master,
        lambda p: load_orders_file(p, MASTER),
        lambda p: load_lots_file(p, MASTER),
    ):
        with pytest.raises(InputError) as exc:
            load(path)
        assert str(path) in str(exc.value)


# ----------------------------------------------------------------------- over the MES


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated("masterdata"))
def test_mutated_master_data_from_the_mes_is_accepted_or_rejected_changing_nothing(
    sample: tuple[dict[str, Any], list[str]],
) -> None:
    doc, _ = sample
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, Clock(), MASTER_DOC)
    before = snapshot(engine)
    body = {"schema": "edge-agent/master-data", "version": 1, "command_id": "md-1"}
    payload = json.dumps({**body, "master_data": doc}, allow_nan=True).encode()
    engine.apply(CommandEvent("master-data", payload, T0))
    (reply,) = [o.message for o in engine._outgoing if isinstance(o.message, CommandReply)]
    event(reply.result)
    if reply.result == "rejected":
        assert reply.reason
        assert reply.reason.startswith("master_data"), reply.reason
        assert snapshot(engine) == before
    else:
        for bom in engine.master.boms.values():
            explode(engine.master, bom, T0)


@pytest.mark.parametrize(
    "update",
    [
        {"materials": 5},
        {"boms": "FG-100"},
        {"materials": [{"id": ["RM-BASE"], "uom": "kg", "increment": "1"}]},
        {"boms": [{"product": {"a": 1}, "revision": ["C"], "uom": "pc", "lines": []}]},
        {"materials": None, "boms": None},
    ],
)
def test_master_data_of_the_wrong_shape_is_rejected_naming_the_field(
    update: dict[str, Any],
) -> None:
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, Clock(), MASTER_DOC)
    before = snapshot(engine)
    body = {"schema": "edge-agent/master-data", "version": 1, "command_id": "md-2"}
    engine.apply(
        CommandEvent("master-data", json.dumps({**body, "master_data": update}).encode(), T0)
    )
    (reply,) = [o.message for o in engine._outgoing if isinstance(o.message, CommandReply)]
    assert reply.result == "rejected"
    assert reply.reason
    assert reply.reason.startswith("master_data"), reply.reason
    assert snapshot(engine) == before
