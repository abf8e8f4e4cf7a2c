"""Configuration: the example validates; an error in any section is named by its path."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import ModbusCounter, load_config, parse_config
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.domain.counters import CounterSpec
from edge_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "line.toml"


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def problems_after(change: Callable[[dict[str, Any]], None]) -> list[str]:
    data = copy.deepcopy(example())
    change(data)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return list(exc.value.problems)


def test_the_example_configuration_validates() -> None:
    config = load_config(EXAMPLE)
    assert config.agent.id == "line1-edge"
    assert config.topic_base == "acme/hamburg/creams/line-1/line1-edge"
    assert config.client_id == "line1-edge"
    assert [s.work_centre for s in config.sources] == ["MIX-1", "FILL-1"]
    assert config.sources[0].signals.good is not None
    assert config.sources[0].signals.good.width == 32
    assert config.sources[0].signals.scrap is not None
    assert config.sources[0].signals.scrap.width == 16
    # relative paths are relative to the configuration file
    assert config.store.path == EXAMPLE.parent / "../var/line1-edge.db"
    assert config.masterdata is not None
    assert config.masterdata.path.is_file()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change setting a dotted path such as ``sources.1.signals.good.node``."""

    def change(data: dict[str, Any]) -> None:
        node: Any = data
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return change


#: one error in each section and most rules; reused by the `run` tests (tests/test_daemon.py)
SECTION_ERRORS = [
    (_set("agent.id", "line/1"), "agent.id: must be letters, digits"),
    (_delete("agent"), "agent: required"),
    (_set("place.work_centres", []), "place.work_centres: Tuple should have at least 1"),
    (_set("place.work_centres", ["A", "A"]), "place.work_centres: work centre listed twice: A"),
    (_set("place.site", "plant #1"), "place.site: must be letters"),
    (_delete("store.path"), "store.path: required"),
    (_set("store.synchronous", "OFF"), "store.synchronous: Input should be 'FULL' or 'NORMAL'"),
    (_set("mqtt.port", 70000), "mqtt.port: Input should be less than or equal to 65535"),
    (_set("mqtt.protocol", "4"), "mqtt.protocol: Input should be '5' or '3.1.1'"),
    (_set("mqtt.qos", 0), "mqtt.qos: Input should be 1"),
    (_set("mqtt.topic_root", "acme//x"), "mqtt.topic_root: must be one or more topic levels"),
    (_set("mqtt.topic_root", "acme/#"), "mqtt.topic_root: must be letters"),
    (_set("mqtt.reconnect_min_ms", 99999), "mqtt: reconnect_max_ms must not be less"),
    (_set("mqtt.keepalive", 30), "mqtt.keepalive: unknown key (misspelt?)"),
    (_delete("masterdata.path"), "masterdata.path: required"),
    (_set("sources", []), "sources: Tuple should have at least 1 item"),
    (
        _set("sources.1.signals.good", {"node": "FILL-1.Good"}),
        "sources[1].signals.good.node: must be an OPC UA NodeId",
    ),
    (_set("sources.0.signals.good.width", 24), "sources[0].signals.good.width: Input should"),
    (
        _set("sources.0.signals.good.scale", 0.5),
        "sources[0].signals.good.scale: must be a decimal",
    ),
    (
        _set("sources.0.signals.scrap.node", "ns=2;s=MIX-1.Good"),
        "sources[0].signals: scrap and good read the same node",
    ),
    (
        _delete("sources.1.signals.complete_ack"),
        "sources[1].signals: complete_request and complete_ack go together",
    ),
    (_set("sources.0.signals.flow.uom", "litre"), "sources[0].signals.flow.uom: unknown unit"),
    (_set("sources.0.signals.scal", {}), "sources[0].signals.scal: unknown key (misspelt?)"),
    (
        _set("sources.0.subscription.queue_size", 1),
        "sources[0].subscription.queue_size: Input should be greater than or equal to 2",
    ),
    (_set("sources.0.endpoint", "http://plc:4840"), "sources[0].endpoint: String should match"),
    (
        _set("sources.1.work_centre", "PACK-9"),
        "sources[1].work_centre: 'PACK-9' is not a work centre of line 'line-1'",
    ),
    (_set("sources.1.name", "mix-plc"), "sources[1].name: source 'mix-plc' is defined twice"),
    (_set("sources.0.kind", "modbus"), "sources[0].kind: Input should be 'opcua'"),
    (_set("mqtt.delivery", "exactly-once"), "mqtt.delivery: Input should be 'broker'"),
    (_set("clock.max_skew_s", "-1"), "clock.max_skew_s: Input should be greater than or equal"),
    (_set("clock.max_skew_s", 0.5), "clock.max_skew_s: must be a decimal"),
    (_set("mqtt.max_command_bytes", 10), "mqtt.max_command_bytes: Input should be greater"),
    (_set("orders.variance_threshold_pct", "x"), "orders.variance_threshold_pct: must be a"),
]


@pytest.mark.parametrize(("change", "expected"), SECTION_ERRORS)
def test_an_error_in_any_section_is_named_by_its_path(
    change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    found = problems_after(change)
    assert any(p.startswith(expected) for p in found), found


def test_a_source_with_nothing_to_post_from_is_refused() -> None:
    def strip(data: dict[str, Any]) -> None:
        data["sources"][1]["signals"] = {"order": {"node": "ns=2;s=X"}}

    (problem,) = problems_after(strip)
    assert problem.startswith("sources[1].signals: nothing to post from")


def test_every_problem_is_reported_at_once() -> None:
    def break_three(data: dict[str, Any]) -> None:
        data["mqtt"]["port"] = 0
        data["sources"][0]["signals"]["good"]["node"] = "bad"
        data["agent"]["id"] = ""

    assert len(problems_after(break_three)) == 3


def test_validate_command_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out
    assert "acme/hamburg/creams/line-1/line1-edge/" in out


def test_validate_command_lists_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        EXAMPLE.read_text()
        .replace(
            'good = { node = "ns=2;s=MIX-1.Good", width = 32 }',
            'good = { node = "MIX-1.Good", width = 32 }',
        )
        .replace("port = 1883", "port = 0")
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    assert main(["validate", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert any("mqtt.port:" in line for line in lines)
    assert any("sources[0].signals.good.node:" in line for line in lines)
    assert all(line.startswith(f"edge-agent: {bad}: ") for line in lines)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("[agent\nid = 1", "not valid TOML"), (None, "cannot read")],
)
def test_unreadable_or_malformed_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    path = tmp_path / "line.toml"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Modbus

MODBUS_EXAMPLE = EXAMPLE.parent / "line-modbus.toml"


def modbus_problems_after(change: Callable[[dict[str, Any]], None]) -> list[str]:
    data = tomllib.loads(MODBUS_EXAMPLE.read_text())
    change(data)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return list(exc.value.problems)


def test_the_modbus_example_validates_with_the_same_line_and_signals() -> None:
    config = load_config(MODBUS_EXAMPLE)
    opcua = load_config(EXAMPLE)
    assert (config.agent, config.place, config.mqtt) == (opcua.agent, opcua.place, opcua.mqtt)
    assert config.masterdata is not None
    assert opcua.masterdata is not None
    assert config.masterdata.path == opcua.masterdata.path
    assert [s.kind for s in config.sources] == ["modbus", "modbus"]
    for modbus, node in zip(config.sources, opcua.sources, strict=True):
        assert isinstance(modbus, ModbusSourceConfig)
        assert (modbus.name, modbus.work_centre, modbus.operation) == (
            node.name,
            node.work_centre,
            node.operation,
        )
        names = {n for n, v in node.signals if v is not None}
        assert {n for n, v in modbus.signals if v is not None} == names
    mix = config.sources[0]
    assert isinstance(mix, ModbusSourceConfig)
    assert (mix.port, mix.device_id, mix.max_gap) == (5020, 1, 8)
    assert mix.signals.scale is not None
    assert mix.signals.scale.weight.unit == 2
    assert main(["validate", str(MODBUS_EXAMPLE)]) == 0


def test_every_counter_config_gives_the_engine_its_counter_spec() -> None:
    opcua = load_config(EXAMPLE).sources[0].signals
    assert opcua.scrap is not None
    assert opcua.flow is not None
    assert opcua.scrap.counter_spec() == CounterSpec(16, Decimal(1))
    assert opcua.flow.counter_spec() == CounterSpec(32, Decimal("0.01"))
    modbus = load_config(MODBUS_EXAMPLE).sources[0].signals
    assert modbus.good is not None
    assert modbus.flow is not None
    assert modbus.good.counter_spec() == CounterSpec(32, Decimal(1))
    # the float32 totalizer: counts of 0.01 L, showing 0 again at 100 000 L
    assert modbus.flow.counter_spec() == CounterSpec(None, Decimal("0.01"), rollover_at=10_000_000)
    wobbles = modbus.flow.model_copy(update={"jitter": Decimal("0.02")})
    assert wobbles.counter_spec().jitter == 2
    # an integer counter that wraps before its width, in engineering units
    wraps = ModbusCounter(address=0, type="uint16", scale=Decimal("0.1"), rollover=Decimal(1000))
    assert wraps.counter_spec() == CounterSpec(16, Decimal("0.1"), rollover_at=10_000)


MODBUS_ERRORS = [
    (
        _set("sources.0.signals.good", {"address": 10}),
        "sources[0].signals.good.type: required for a holding register (uint16, uint32",
    ),
    (
        _set("sources.0.signals.good.type", "int16"),
        "sources[0].signals.good.type: a counter must be uint16 or uint32 or uint64 or float32",
    ),
    (_set("sources.0.signals.good.address", 70000), "sources[0].signals.good.address: Input"),
    (
        _set("sources.0.signals.good.offset", "1"),
        "sources[0].signals.good.offset: a counter counts from 0: no offset",
    ),
    (
        _set("sources.0.signals.scrap.address", 11),
        "sources[0].signals: scrap and good overlap at holding:11 (unit 1)",
    ),
    (
        _delete("sources.0.signals.flow.resolution"),
        "sources[0].signals.flow.resolution: required for a float32 counter",
    ),
    (
        _delete("sources.0.signals.flow.rollover"),
        "sources[0].signals.flow.rollover: required for a float32 totalizer",
    ),
    (
        _set("sources.0.signals.flow.rollover", "1000000"),
        "sources[0].signals.flow.rollover: a float32 just below 1000000 moves in steps of "
        "0.0625, not finer than the resolution 0.01: counts would be lost; use a rollover of "
        "at most 131072",
    ),
    (
        _set("sources.0.signals.flow.jitter", "0.005"),
        "sources[0].signals.flow: jitter 0.005 must be a whole number of counts of 0.01",
    ),
    (
        _set("sources.0.signals.flow.lag_s", "-1"),
        "sources[0].signals.flow.lag_s: Input should be greater than or equal to 0",
    ),
    (
        _set("sources.0.signals.flow.slice_s", 0),
        "sources[0].signals.flow.slice_s: Input should be greater than or equal to 1",
    ),
    (
        _delete("sources.0.signals.flow"),
        "sources[0].signals: feed_lot is the lot feeding the flow meter: it needs a flow signal",
    ),
    (
        _set("sources.0.signals.order", {"address": 0, "type": "string"}),
        "sources[0].signals.order.length: required for a string",
    ),
    (
        _set("sources.0.signals.scale.stable", {"unit": 2, "table": "input", "address": 4}),
        "sources[0].signals.scale.stable.type: required for a input register",
    ),
    (
        _set("sources.0.signals.scale.stable.table", "discrete"),
        "sources[0].signals.scale.stable.bit: a coil or discrete input is one bit",
    ),
    (
        _set("sources.0.signals.scale.weight.type", "string"),
        "sources[0].signals.scale.weight.type: a measurement must be",
    ),
    (
        _set("sources.1.signals.complete_ack.table", "discrete"),
        "sources[1].signals.complete_ack.table: the agent writes complete_ack: a coil or a "
        "holding register, not a discrete",
    ),
    (
        _set("sources.1.signals.complete_request", {"table": "coil", "address": 1}),
        "sources[1].signals: complete_ack and complete_request overlap at coil:1 (unit 3)",
    ),
    (
        _delete("sources.1.signals.complete_ack"),
        "sources[1].signals: complete_request and complete_ack go together",
    ),
    (
        _set("sources.1.signals.complete_good.type", "float32"),
        "sources[1].signals.complete_good.type: a quantity must be uint16 or int16",
    ),
    (_set("sources.1.signals.complete_good.scale", "2"), "sources[1].signals.complete_good.scale"),
    (_set("sources.1.port", 0), "sources[1].port: Input should be greater than or equal to 1"),
    (_set("sources.1.device_id", 256), "sources[1].device_id: Input should be less than"),
    (_set("sources.1.max_gap", 125), "sources[1].max_gap: Input should be less than or equal"),
    (_set("sources.1.nodes", {}), "sources[1].nodes: unknown key (misspelt?)"),
    (_delete("sources.1.kind"), "sources[1].kind: required"),
    (_set("sources.1.kind", "opcua"), "sources[1].kind: Input should be 'modbus'"),
    (
        _set("sources.1.reconnect_min_ms", 99999),
        "sources[1]: reconnect_max_ms must not be less than reconnect_min_ms",
    ),
]


@pytest.mark.parametrize(("change", "expected"), MODBUS_ERRORS)
def test_a_modbus_error_is_named_by_its_path(
    change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    found = modbus_problems_after(change)
    assert any(p.startswith(expected) for p in found), found


def test_bits_of_one_status_word_may_be_two_signals() -> None:
    data = tomllib.loads(MODBUS_EXAMPLE.read_text())
    data["sources"][1]["signals"]["complete_request"] = {"address": 20, "bit": 0}
    data["sources"][1]["signals"]["complete_ack"] = {"address": 20, "bit": 1}
    parse_config(data)  # valid
    data["sources"][1]["signals"]["complete_ack"] = {"address": 20, "bit": 0}
    with pytest.raises(ConfigError, match="complete_ack and complete_request overlap"):
        parse_config(data)


def test_a_source_s_kind_is_checked_against_its_shape() -> None:
    # an OPC UA source said to be Modbus (the endpoint says what it is), and an unknown kind
    assert problems_after(_set("sources.0.kind", "modbus")) == [
        "sources[0].kind: Input should be 'opcua' (got 'modbus')"
    ]

    def unknown(data: dict[str, Any]) -> None:
        del data["sources"][0]["endpoint"]
        data["sources"][0]["kind"] = "profinet"

    assert "sources[0].kind: must be 'opcua' or 'modbus' (got 'profinet')" in problems_after(
        unknown
    )
