"""Signed MES commands ([commands] signing_key) and the kinds an agent accepts ([commands] accept).

Each protection has a test that fails without it: an unsigned, mis-signed, altered, stale or
user-less command is rejected and changes nothing; a replayed one is answered as the duplicate it
is and changes nothing; a forged MES acknowledgement deletes nothing from the outbox; a kind the
agent does not accept is refused. The pure rules are proven with hypothesis properties, then the
engine with a real store, then the daemon over a real broker.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edge_agent.commands import Signing, canonical_form, parse_command, sign, signature_problem
from edge_agent.config import CommandsSection, parse_config
from edge_agent.engine import CommandEvent, Engine
from edge_agent.errors import ConfigError, InputError
from edge_agent.store import Store
from edge_agent.uplink.mqtt import parse_mes_ack
from simulators.mes import MesSimulator
from tests.support.broker import Broker, require_protocol
from tests.test_engine import LOTS, MASTER, ORDERS, Clock, commit, make_config, outbox
from tests.test_engine_commands import MASTER_DOC, Mes, snapshot
from tests.test_mes_contract import make_config as contract_config
from tests.test_mes_contract import running

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SIGNING = Signing(KEY, max_age_s=600)


def _time(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def release(**extra: Any) -> dict[str, Any]:
    return {
        "schema": "edge-agent/work-order",
        "version": 1,
        "command_id": "c-1",
        "action": "release",
        "order": "WO-77",
        "product": "FG-100",
        "quantity": "10",
        "issued_at": _time(NOW),
        "issued_by": "jdoe",
        **extra,
    }


# ------------------------------------------------------------------------------ the pure rules

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
commands = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=6).map(
    lambda extra: {**extra, **release()}
)


@given(commands)
def test_a_signed_command_verifies_whatever_the_order_of_its_keys(data: dict[str, Any]) -> None:
    signed = sign(data, KEY)
    shuffled = dict(reversed(list(signed.items())))
    assert signature_problem(signed, SIGNING, NOW) is None
    assert signature_problem(shuffled, SIGNING, NOW) is None
    assert canonical_form(signed) == canonical_form(shuffled)


@given(commands, st.data())
def test_any_change_to_a_signed_command_breaks_its_signature(
    data: dict[str, Any], draw: st.DataObject
) -> None:
    signed = sign(data, KEY)
    key = draw.draw(st.sampled_from(sorted(k for k in signed if k != "signature")))
    changed = draw.draw(json_values.filter(lambda v: v != signed[key]))
    altered = {**signed, key: changed}
    problem = signature_problem(altered, SIGNING, NOW)
    assert problem is not None
    assert problem.startswith("signature: does not match")


@given(commands)
def test_a_command_signed_with_another_key_is_refused(data: dict[str, Any]) -> None:
    problem = signature_problem(sign(data, OTHER_KEY), SIGNING, NOW)
    assert problem is not None
    assert problem.startswith("signature: does not match")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (release(), "signature: required"),
        ({**release(), "signature": "abc"}, "signature: must be"),
        (sign(release(issued_by=None), KEY), "issued_by: required"),
        (sign(release(issued_at=None), KEY), "issued_at: required"),
        (sign(release(issued_at="yesterday"), KEY), "issued_at: required"),
        (sign(release(issued_at=_time(NOW - timedelta(seconds=601))), KEY), "issued_at:"),
        (sign(release(issued_at=_time(NOW + timedelta(seconds=601))), KEY), "issued_at:"),
    ],
    ids=["unsigned", "malformed", "no user", "no time", "bad time", "stale", "from the future"],
)
def test_what_a_signed_command_must_carry(command: dict[str, Any], expected: str) -> None:
    problem = signature_problem(command, SIGNING, NOW)
    assert problem is not None
    assert problem.startswith(expected), problem


def test_a_command_within_its_age_is_accepted_either_way() -> None:
    for skew in (-600, 0, 600):
        command = sign(release(issued_at=_time(NOW + timedelta(seconds=skew))), KEY)
        assert signature_problem(command, SIGNING, NOW) is None


def test_the_stale_message_says_how_old() -> None:
    stale = sign(release(issued_at=_time(NOW - timedelta(hours=2))), KEY)
    assert signature_problem(stale, SIGNING, NOW) == (
        f"issued_at: {_time(NOW - timedelta(hours=2))} is 7200 s before the agent's clock "
        "(more than max_age_s = 600): a stale or replayed command"
    )


def test_parse_command_checks_the_signature_before_the_content() -> None:
    bad = json.dumps({**release(quantity="-1")}).encode()
    rejected = parse_command("work-order", bad, signing=SIGNING, now=NOW)
    assert getattr(rejected, "reason", "").startswith("signature: required")
    good = json.dumps(sign(release(), KEY)).encode()
    command = parse_command("work-order", good, signing=SIGNING, now=NOW)
    assert getattr(command, "issued_by", None) == "jdoe"
    # without signing the same signed command is still a command (the signature is ignored)
    assert getattr(parse_command("work-order", good), "command_id", None) == "c-1"


def test_a_heartbeat_needs_a_signature_but_no_user() -> None:
    beat = {"schema": "edge-agent/heartbeat", "version": 1, "mes_time": _time(NOW)}
    unsigned = parse_command("heartbeat", json.dumps(beat).encode(), signing=SIGNING, now=NOW)
    assert getattr(unsigned, "reason", "").startswith("signature: required")
    signed = json.dumps(sign(beat, KEY)).encode()
    assert getattr(parse_command("heartbeat", signed, signing=SIGNING, now=NOW), "mes_time", None)


def test_an_mes_acknowledgement_must_be_signed_when_commands_are() -> None:
    ack = {"message_ids": ["m-1", "m-2"]}
    with pytest.raises(InputError, match="mes-ack: signature: required"):
        parse_mes_ack(json.dumps(ack).encode(), SIGNING)
    with pytest.raises(InputError, match="mes-ack: signature: does not match"):
        parse_mes_ack(json.dumps(sign(ack, OTHER_KEY)).encode(), SIGNING)
    assert parse_mes_ack(json.dumps(sign(ack, KEY)).encode(), SIGNING) == ["m-1", "m-2"]
    assert parse_mes_ack(json.dumps(ack).encode()) == ["m-1", "m-2"]


# ------------------------------------------------------------------------------ configuration


def key_file(tmp_path: Path, key: bytes = KEY) -> Path:
    path = tmp_path / "mes.key"
    path.write_bytes(key + b"\n")
    path.chmod(0o600)
    return path


def test_the_key_is_read_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = CommandsSection.model_validate({"signing_key": {"file": str(key_file(tmp_path))}})
    assert from_file.signing() == Signing(KEY, 600)
    monkeypatch.setenv("EDGE_TEST_KEY", KEY.decode())
    from_env = CommandsSection.model_validate({"signing_key": {"env": "EDGE_TEST_KEY"}})
    assert from_env.signing() == Signing(KEY, 600)
    assert "k" * 32 not in repr(from_env.signing())
    assert CommandsSection().signing() is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"signing_key": "k" * 32}, "commands.signing_key: a secret is never written"),
        ({"signing_key": {"file": "/nonexistent/key"}}, "cannot read file '/nonexistent/key'"),
        ({"signing_key": {"env": "EDGE_TEST_UNSET_KEY"}}, "EDGE_TEST_UNSET_KEY is not set"),
        ({"signing_key": {"env": "A", "file": "b"}}, "give exactly one of file or env"),
        ({"accept": ["work-order", "shutdown"]}, "unknown command kind 'shutdown'"),
        ({"max_age_s": 0}, "commands.max_age_s"),
    ],
)
def test_a_bad_commands_section_is_named_and_the_secret_is_never_echoed(
    tmp_path: Path, section: dict[str, Any], expected: str
) -> None:
    data = _config_data(tmp_path)
    data["commands"] = section
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    text = "\n".join(exc.value.problems)
    assert expected in text, text
    assert "k" * 32 not in text


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    data = _config_data(tmp_path)
    data["commands"] = {"signing_key": {"file": str(key_file(tmp_path, b"short"))}}
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        parse_config(data)


def _config_data(tmp_path: Path) -> dict[str, Any]:
    return make_config(tmp_path).model_dump(mode="json", exclude_none=True)


# ------------------------------------------------------------------------------ the engine


async def signed_engine(tmp_path: Path, store: Store, **commands: Any) -> tuple[Engine, Mes, Clock]:
    config = make_config(tmp_path)
    section = CommandsSection.model_validate(
        {"signing_key": {"file": str(key_file(tmp_path))}, **commands}
    )
    config = config.model_copy(update={"commands": section})
    clock = Clock()
    engine = await Engine.load(config, store, MASTER, ORDERS, LOTS, clock, master_doc=MASTER_DOC)
    await commit(engine, store)
    return engine, Mes(engine, store, clock), clock


def signed_payload(mes: Mes, clock: Clock, key: bytes = KEY, **fields: Any) -> bytes:
    body = json.loads(mes.payload("work-order", **fields))
    body.setdefault("issued_at", _time(clock.now))
    body.setdefault("issued_by", "jdoe")
    return json.dumps(sign(body, key)).encode()


RELEASE = {"action": "release", "order": "WO-77", "product": "FG-100", "quantity": "10"}


@pytest.mark.asyncio
async def test_only_a_well_signed_command_changes_anything(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "agent.db") as store:
        engine, mes, clock = await signed_engine(tmp_path, store)
        before = await snapshot(store)
        old = _time(clock.now - timedelta(seconds=601))
        bad = {
            "unsigned": mes.payload("work-order", **RELEASE),
            "other key": signed_payload(mes, clock, OTHER_KEY, **RELEASE),
            "stale": signed_payload(mes, clock, issued_at=old, **RELEASE),
        }
        for name, payload in bad.items():
            reply = await mes.raw("work-order", payload)
            assert reply.result == "rejected", name
            assert reply.reason is not None
            assert reply.reason.split(":")[0] in (
                "signature",
                "issued_at",
            )
        assert await snapshot(store) == before
        assert "WO-77" not in engine.orders

        reply = await mes.raw("work-order", signed_payload(mes, clock, **RELEASE))
        assert reply.result == "accepted"
        assert "WO-77" in engine.orders


@pytest.mark.asyncio
async def test_a_replayed_signed_command_is_answered_as_a_duplicate_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async with Store.open(tmp_path / "agent.db") as store:
        _engine, mes, clock = await signed_engine(tmp_path, store)
        start = {"action": "release", "order": "WO-78", "product": "FG-100", "quantity": "5"}
        payload = signed_payload(mes, clock, command_id="rel-78", **start)
        assert (await mes.raw("work-order", payload)).result == "accepted"
        after_first = await snapshot(store), await store.all_state()
        replay = await mes.raw("work-order", payload)  # the same bytes, captured and sent again
        assert replay.duplicate
        assert replay.command_id == "rel-78"
        assert await snapshot(store) == after_first[0]
        assert (await store.all_state())["command/rel-78"] == after_first[1]["command/rel-78"]
        # re-signed with a new time but the same id: a command id names one command
        again = signed_payload(
            mes, clock, command_id="rel-78", issued_at=_time(clock.tick()), **start
        )
        assert (await mes.raw("work-order", again)).result == "rejected"


@pytest.mark.asyncio
async def test_a_kind_the_agent_does_not_accept_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async with Store.open(tmp_path / "agent.db") as store:
        engine, mes, clock = await signed_engine(tmp_path, store, accept=["work-order"])
        before = await snapshot(store)
        body = json.loads(mes.payload("master-data", master_data=MASTER_DOC))
        body.update(issued_at=_time(clock.now), issued_by="jdoe")
        reply = await mes.raw("master-data", json.dumps(sign(body, KEY)).encode())
        assert reply.result == "rejected"
        assert reply.reason == (
            "topic: this agent does not accept 'master-data' (accepted: work-order)"
        )
        assert await snapshot(store) == before
        assert (await mes.raw("work-order", signed_payload(mes, clock, **RELEASE))).result == (
            "accepted"
        )
        # a heartbeat left out is ignored: it is never answered, and it sets no clock
        replies = len(await outbox(store))
        beat = sign({"schema": "edge-agent/heartbeat", "version": 1, "mes_time": "x"}, KEY)
        engine.apply(CommandEvent("heartbeat", json.dumps(beat).encode(), clock.tick()))
        await commit(engine, store)
        assert len(await outbox(store)) == replies
        assert engine.clock_state.mes_offset_s is None


# ------------------------------------------------------------------------------ over a broker


@pytest.mark.asyncio
async def test_signed_commands_and_acknowledgements_over_a_real_broker(
    broker: Broker, tmp_path: Path
) -> None:
    """The MES simulator signs with the agent's key: its commands apply and its acknowledgements
    empty the outbox. A rogue client (another key, or none) changes nothing: its command is
    rejected, its acknowledgement deletes nothing."""
    require_protocol(broker, "5")
    config = contract_config(broker, tmp_path)
    data = config.model_dump(mode="json", exclude_none=True)
    data["mqtt"].update(delivery="mes-ack", mes_ack_timeout_s=1)
    data["commands"] = {"signing_key": {"file": str(key_file(tmp_path))}}
    config = parse_config(data)
    mes = MesSimulator.for_agent(config, tmp_path / "mes.db", client_id="mes")
    rogue = MesSimulator.for_agent(
        config, tmp_path / "rogue.db", client_id="rogue", signing_key=OTHER_KEY, mes_ack=False
    )
    assert mes.signing_key == KEY
    with capture_logs() as logs:
        async with running(config) as agent:
            assert agent.store is not None
            rogue.start()
            try:
                forged = rogue.release_order("WO-66", "FG-100", 5)
                answer = await asyncio.to_thread(rogue.wait_reply, forged, 20.0)
                assert answer.result == "rejected"
                assert answer.reason is not None
                assert answer.reason.startswith("signature: does not match")
                # the replies wait in the outbox for the MES's acknowledgement: a forged one
                # (unsigned) names them, and deletes nothing
                depth = await agent.store.outbox_depth()
                assert depth > 0
                rows = await agent.store.outbox_batch(100)
                ack = json.dumps({"message_ids": [r.message_id for r in rows]}).encode()
                rogue.send_raw("mes-ack", ack)
                await _logged(logs, "mes_ack_invalid")
                assert await agent.store.outbox_depth() >= depth
            finally:
                rogue.close()
            mes.start()
            try:
                release = mes.release_order("WO-66", "FG-100", 5)
                reply = await asyncio.to_thread(mes.wait_reply, release, 20.0)
                assert reply.result == "accepted", reply.reason
                assert agent.engine is not None
                assert "WO-66" in agent.engine.orders
                async with asyncio.timeout(20):  # the MES's signed acks empty the outbox
                    while await agent.store.outbox_depth():
                        await asyncio.sleep(0.05)
            finally:
                mes.close()
    (invalid,) = [e for e in logs if e["event"] == "mes_ack_invalid"]
    assert "signature: required" in invalid["error"]


async def _logged(logs: list[dict[str, Any]], event: str) -> None:
    async with asyncio.timeout(10):
        while not any(e["event"] == event for e in logs):
            await asyncio.sleep(0.02)
