"""The published JSON Schemas (docs/schemas/): generated from the models the agent writes with,
kept in the repository, and accepting the messages the engine really produces.

An independent validator (jsonschema) checks them: a schema only pydantic agrees with would not
help an MES team that validates with its own tools.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from edge_agent.cli import main
from edge_agent.commands import COMMAND_MODELS, CommandRejected, parse_command
from edge_agent.config import PilotSection
from edge_agent.engine import CommandEvent
from edge_agent.messages import Kind
from edge_agent.schemas import schema_files
from edge_agent.store import Store
from tests.test_engine_feeds import (
    commit,
    event,
    load,
    make_config,
    outbox,
    the_example,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def test_the_schema_files_in_the_repository_are_the_models_schemas() -> None:
    expected = schema_files()
    present = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.json")}
    assert set(present) == set(expected), "run: edge-agent schemas docs/schemas"
    for name, text in expected.items():
        assert present[name] == text, (
            f"{name} drifted from the models: edge-agent schemas docs/schemas"
        )
    assert {json.loads(t)["$id"] for t in expected.values()} == {
        f"edge-agent/{kind.value}/v1" for kind in Kind
    } | {"edge-agent/status/v1", "edge-agent/command.mes-ack/v1"} | {
        f"edge-agent/command.{kind}/v1" for kind in COMMAND_MODELS
    }


def test_the_cli_writes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", str(tmp_path / "out")]) == 0
    written = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir()}
    assert written == schema_files()
    assert "material-consumed.v1.schema.json" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_real_messages_are_valid_and_broken_ones_are_not(tmp_path: Path) -> None:
    """The worked feed example (a split meter posting with lot windows), a lot held and a
    signal_invalid exception: every message the engine wrote validates against its kind's schema;
    a quantity as a JSON number, or a field the contract does not have, does not."""
    validators = {
        kind.value: Draft202012Validator(
            json.loads((SCHEMA_DIR / f"{kind.value}.v1.schema.json").read_text())
        )
        for kind in Kind
    }
    for validator in validators.values():
        Draft202012Validator.check_schema(validator.schema)
    # a pilot shadows the base: its backflush is a material-consumed-shadow
    pilot = PilotSection(shadow_materials=("RM-BASE",))
    config = make_config(tmp_path).model_copy(update={"pilot": pilot})
    async with Store.open(tmp_path / "agent.db") as store:
        engine = await load(config, store)
        for e in the_example(engine):
            engine.apply(e)
        engine.apply(event("feed_lot", "NOT-STAGED", datetime(2026, 11, 22, 8, 3, tzinfo=UTC)))
        engine.apply(event("good", "not a number", datetime(2026, 11, 22, 8, 4, tzinfo=UTC)))
        at = datetime(2026, 11, 22, 8, 5, tzinfo=UTC)
        close = {"action": "close", "order": "WO-7", "command_id": "close-1"}
        engine.apply(CommandEvent("work-order", command("work-order", **close), at))
        engine.apply(CommandEvent("work-order", b"{}", at))  # rejected
        await commit(engine, store)
        rows = await store.outbox_batch(1000)
        kinds = {r.topic.rsplit("/", 1)[1] for r in rows}
        assert kinds == {k.value for k in Kind}
        for row in rows:
            payload = json.loads(row.payload)
            errors = list(validators[row.topic.rsplit("/", 1)[1]].iter_errors(payload))
            assert errors == [], (payload, errors)
        assert await outbox(store)  # and the models parse them too
    consumed = next(json.loads(r.payload) for r in rows if r.topic.endswith("material-consumed"))
    validator = validators["material-consumed"]
    assert not validator.is_valid({**consumed, "quantity": 2.6})
    assert not validator.is_valid({**consumed, "unexpected": "field"})
    assert not validator.is_valid({k: v for k, v in consumed.items() if k != "message_id"})


def command(kind: str, **fields: object) -> bytes:
    return json.dumps({"schema": f"edge-agent/{kind}", "version": 1, **fields}).encode()


EXAMPLES = {
    "master-data": {"command_id": "m1", "master_data": {"materials": [], "boms": []}},
    "work-order": {
        "command_id": "w1",
        "action": "release",
        "order": "WO-9",
        "product": "FG-100",
        "quantity": "40",
        "finished_lot": "FG-1",
        "issued_at": "2026-11-23T07:00:00.000Z",
    },
    "lot-staging": {
        "command_id": "l1",
        "action": "staged",
        "lot": "L-1",
        "material": "RM-BASE",
        "quantity": "12.5",
        "expiry": "2027-01-31T00:00:00.000Z",
    },
    "reversal": {"command_id": "r1", "message_id": "x", "reason_code": "R", "requested_by": "u"},
    "heartbeat": {"mes_time": "2026-11-23T07:00:00.000Z"},
    "actual-issue": {
        "command_id": "a1",
        "order": "WO-9",
        "material": "RM-PERFUME",
        "lot": "PERF-0042",
        "quantity": "0.150",
        "uom": "kg",
        "at": "2026-11-23T07:00:00.000Z",
        "phase": "running",
    },
    "exception-resolution": {
        "command_id": "e1",
        "exception_id": "x",
        "action": "discard",
        "reason_code": "GLITCH",
        "requested_by": "u",
    },
}


@pytest.mark.parametrize("kind", sorted(COMMAND_MODELS))
def test_command_schemas_accept_what_the_agent_accepts(kind: str) -> None:
    validator = Draft202012Validator(
        json.loads((SCHEMA_DIR / f"command.{kind}.v1.schema.json").read_text())
    )
    Draft202012Validator.check_schema(validator.schema)
    good = json.loads(command(kind, **EXAMPLES[kind]))
    assert list(validator.iter_errors(good)) == []
    assert not validator.is_valid({**good, "version": "one"})
    assert not validator.is_valid({**good, "unexpected": "field"})
    for required in ("schema", "version"):  # the agent refuses a command without them
        assert not validator.is_valid({k: v for k, v in good.items() if k != required})
        refused = parse_command(kind, json.dumps({**good, required: None}).encode())
        assert isinstance(refused, CommandRejected)
    if "quantity" in good:
        assert not validator.is_valid({**good, "quantity": 12.5})  # a number, not a string
