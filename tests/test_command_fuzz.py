"""Fuzzing every inbound MES command kind: never a crash, always a reply naming the problem, and
no state change from a rejected command.

Payloads are valid commands with fields dropped, replaced by values of every JSON type, or
garbled, and arbitrary bytes. The engine's whole state (lots, orders, work centres, exceptions,
clock, master data) is compared before and after each rejected command.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_agent.commands import COMMAND_MODELS
from edge_agent.engine import CommandEvent, Engine
from edge_agent.errors import InputError
from edge_agent.messages import CommandReply, MaterialConsumed
from edge_agent.sources import Quality, SignalEvent
from edge_agent.store import Store
from edge_agent.uplink.mqtt import parse_mes_ack
from tests.test_engine import LOTS, MASTER, ORDERS, Clock, make_config
from tests.test_engine_commands import MASTER_DOC

VALID: dict[str, dict[str, Any]] = {
    "master-data": {"master_data": {"materials": [{"id": "RM-NEW", "uom": "kg"}]}},
    "work-order": {"action": "release", "order": "WO-77", "product": "FG-100", "quantity": "5"},
    "lot-staging": {"action": "staged", "lot": "L-9", "material": "RM-BASE", "quantity": "2.5"},
    "reversal": {"message_id": "m-1", "reason_code": "R", "requested_by": "u"},
    "exception-resolution": {
        "exception_id": "e-1",
        "action": "discard",
        "reason_code": "R",
        "requested_by": "u",
    },
    "actual-issue": {
        "order": "WO-7",
        "material": "RM-PERFUME",
        "lot": "PERF-0042",
        "quantity": "0.150",
        "uom": "kg",
        "at": "2026-11-23T06:00:00.000Z",
    },
    "heartbeat": {"mes_time": "2026-11-23T06:00:00.000Z"},
}
assert set(VALID) == set(COMMAND_MODELS)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = sorted(
    {
        "schema",
        "version",
        "command_id",
        "action",
        "order",
        "product",
        "quantity",
        "lot",
        "material",
        "message_id",
        "exception_id",
        "remnants",
        "expiry",
        "mes_time",
        "master_data",
        "revision",
        "work_centre",
        "status",
        "issued_at",
    }
)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from([*sorted(COMMAND_MODELS), "recipe"]))
    body: dict[str, Any] = {
        "schema": f"edge-agent/{kind}",
        "version": 1,
        "command_id": "fuzz-1",
        **VALID.get(kind, {}),
    }
    how = draw(st.sampled_from(["replace", "drop", "add", "bytes", "json"]))
    event(how)
    if how == "bytes":
        return kind, draw(st.binary(max_size=200))
    if how == "json":
        return kind, json.dumps(draw(json_values), allow_nan=True).encode()
    for _ in range(draw(st.integers(1, 3))):
        if how == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif how == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        else:
            body[draw(st.sampled_from(FIELDS))] = draw(json_values)
    return kind, json.dumps(body, allow_nan=True).encode()


def snapshot(engine: Engine) -> dict[str, Any]:
    keys = ["lots", "exceptions", "clock"] + [f"wc/{k}" for k in engine.work_centres]
    keys += [f"order/{k}" for k in engine.order_states]
    state = {k: engine._state_value(k) for k in keys}
    state["master"] = json.dumps(engine.master_doc, sort_keys=True)
    state["orders"] = sorted(engine.orders)
    return state


CONFIG = make_config(Path("/nonexistent-fuzz"))
T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
def test_a_command_never_crashes_the_engine_and_a_rejected_one_changes_nothing(
    sample: tuple[str, bytes],
) -> None:
    kind, payload = sample
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, Clock(), MASTER_DOC)
    before = snapshot(engine)
    engine.apply(CommandEvent(kind, payload, T0))
    replies = [o.message for o in engine._outgoing if isinstance(o.message, CommandReply)]
    if kind == "heartbeat" and not replies:
        return  # a valid heartbeat is a beacon, not answered; a broken one is rejected
    (reply,) = replies
    event(reply.result)
    if reply.result == "rejected":
        assert reply.reason
        assert snapshot(engine) == before


quantities = st.decimals(min_value=-5, max_value=10**6, places=3, allow_nan=False).map(str)
orders = st.sampled_from(["WO-7", "WO-8", "WO-404"])
lot_ids = st.sampled_from(["PERF-0042", "BASE-2611-01", "LBL-3301", "NEW-1", "TANK-2-2612"])
materials = st.sampled_from(["RM-PERFUME", "RM-BASE", "PK-LABEL", "NOPE"])
work_centres = st.none() | st.sampled_from(["MIX-1", "FILL-1", "PACK-9"])

commands = st.one_of(
    st.builds(
        lambda action, order, product, qty, wc, remnants: (
            "work-order",
            {
                "action": action,
                "order": order,
                **({"product": product, "quantity": qty} if action == "release" else {}),
                **({"work_centre": wc} if wc else {}),
                **({"remnants": remnants} if action == "close" else {}),
            },
        ),
        st.sampled_from(["release", "start", "hold", "close"]),
        orders,
        st.sampled_from(["FG-100", "FG-404"]),
        quantities,
        work_centres,
        st.lists(st.fixed_dictionaries({"lot": lot_ids, "quantity": quantities}), max_size=2),
    ),
    st.builds(
        lambda action, lot, material, qty, wc, order: (
            "lot-staging",
            {
                "action": action,
                "lot": lot,
                **({"material": material, "quantity": qty} if action == "staged" else {}),
                **({"quantity": qty} if action == "returned" else {}),
                **({"work_centre": wc, "order": order} if action == "rebinned" else {}),
            },
        ),
        st.sampled_from(["staged", "returned", "quarantined", "released", "rebinned"]),
        lot_ids,
        materials,
        quantities,
        work_centres,
        st.none() | orders,
    ),
    st.builds(
        lambda target: (
            "reversal",
            {"message_id": target, "reason_code": "R", "requested_by": "u"},
        ),
        st.sampled_from(["first-posting", "nope"]),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands, min_size=1, max_size=6))
def test_sequences_of_well_formed_commands_change_state_only_when_accepted(
    sequence: list[tuple[str, dict[str, Any]]],
) -> None:
    """Commands that parse but may not make sense (unknown orders and lots, returns beyond the
    balance, closes of closed orders, reversals twice), one after another among real postings."""
    clock = Clock()
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, clock, MASTER_DOC)
    for signal, value in (("order", "WO-7"), ("good", 20)):
        at = clock.tick()
        engine.apply(
            SignalEvent("mix-plc", "MIX-1", signal, "n", value, Quality.GOOD, "Good", at, at)
        )
    first = next(o.message for o in engine._outgoing if isinstance(o.message, MaterialConsumed))
    for n, (kind, drawn) in enumerate(sequence):
        fields = dict(drawn)
        if fields.get("message_id") == "first-posting":
            fields["message_id"] = first.message_id
        body = {"schema": f"edge-agent/{kind}", "version": 1, "command_id": f"c-{n}", **fields}
        before = snapshot(engine)
        engine._outgoing.clear()
        original = engine._recent.get(str(fields.get("message_id")))
        engine.apply(CommandEvent(kind, json.dumps(body).encode(), clock.tick(), original))
        (reply,) = [o.message for o in engine._outgoing if isinstance(o.message, CommandReply)]
        event(f"{kind} {fields.get('action', '')} {reply.result}")
        if reply.result == "rejected":
            assert reply.reason
            assert snapshot(engine) == before, reply.reason
        assert all(lot.quantity >= 0 for lot in engine.lots)


@pytest.mark.parametrize("kind", ["work-order", "master-data", "heartbeat", "reversal"])
def test_a_command_nested_too_deep_is_rejected_not_a_crash(kind: str) -> None:
    """Found by hand after the mes-ack case: json.loads raises RecursionError for deeply nested
    input, which the command parser did not catch: the engine task died, the broker delivered
    the command again to the restarted agent (no PUBACK was given), and it died again."""
    engine = Engine(CONFIG, MASTER, ORDERS, LOTS, Clock(), MASTER_DOC)
    before = snapshot(engine)
    command = CommandEvent(kind, b"[" * 100_000, T0)
    if kind == "reversal":  # the run loop looks up the posting a reversal names first
        command = asyncio.run(engine.prepared(cast(Store, None), command))
    engine.apply(command)
    (reply,) = [o.message for o in engine._outgoing if isinstance(o.message, CommandReply)]
    assert reply.result == "rejected"
    assert reply.reason is not None
    assert "malformed JSON" in reply.reason
    assert snapshot(engine) == before


# ---------------------------------------------------------------------- mes-ack

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@given(
    st.one_of(
        st.binary(max_size=200),
        _json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.just("message_ids"), _json_values).map(lambda v: json.dumps(v).encode()),
    )
)
def test_an_mes_ack_payload_is_ids_or_a_named_input_error(payload: bytes) -> None:
    """The MES's acknowledgements arrive on paho's thread: anything but a list of ids is an
    InputError naming the problem (logged, ignored), never another exception."""
    ids, error = _mes_ack(payload)
    if error is not None:
        assert error.startswith("mes-ack:")
    else:
        assert isinstance(ids, list)
        assert all(isinstance(i, str) for i in ids)
        assert json.loads(payload)["message_ids"] == ids


def _mes_ack(payload: bytes) -> tuple[list[str] | None, str | None]:
    try:
        return parse_mes_ack(payload), None
    except InputError as exc:
        return None, str(exc)


def test_an_mes_ack_nested_too_deep_is_refused() -> None:
    with pytest.raises(InputError, match="Invalid JSON: recursion limit"):
        parse_mes_ack(b"[" * 100_000)
    assert parse_mes_ack(b'{"message_ids": ["a", "b"]}') == ["a", "b"]
