"""Configuration: the example validates; an error in any section is named by its path."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import load_config, parse_config
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
    (_set("place.work_centres", ["A", "A"]), "place: work centre listed twice: A"),
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
