"""Fuzzing the configuration: every invalid configuration is refused with the path of its field.

The two example configurations (OPC UA and Modbus) are mutated one field at a time: a key
dropped, a value of the wrong type, a number out of range, a bad decimal string, an unknown key,
a name or node id made a duplicate of another. :func:`parse_config` must either accept the
result or raise :class:`ConfigError` naming the mutated field (or a section that holds it),
never any other exception.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_agent.cli import main
from edge_agent.config import parse_config
from edge_agent.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
EXAMPLES = {
    name: tomllib.loads((CONFIG_DIR / name).read_text(encoding="utf-8"))
    for name in ("line.toml", "line-modbus.toml")
}

Key = str | int
Path_ = tuple[Key, ...]


def dotted(path: Path_) -> str:
    """A path as the configuration's errors write it: ``sources[1].signals.good.node``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def walk(value: Any, path: Path_ = ()) -> list[tuple[Path_, Any]]:
    """Every (path, value) below ``value``, containers and leaves, depth first."""
    out: list[tuple[Path_, Any]] = [(path, value)] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += walk(item, (*path, i))
    return out


def parent_of(data: Any, path: Path_) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


wrong_values = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, -502, 65536, 17, 8, 128, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "abc",
            "NaN",
            "-Infinity",
            "1e999999",
            "1,5",
            "-0.001",
            "0",
            "1.5.2",
            " 2",
            "0x10",
            "ns=2;s=MIX-1.Good",
            "opc.tcp://",
            "MIX-1",
            "FILL-1",
            "kg",
            "float32",
            "uint16",
            "holding",
        ]
    ),
    st.lists(st.integers(0, 3), max_size=2),
    st.fixed_dictionaries({"node": st.just("ns=2;s=X")}),
    st.just({}),
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, dict[str, Any], str, str]:
    """(example, mutated config, how, dotted path of the mutated field)."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    data = copy.deepcopy(EXAMPLES[name])
    nodes = walk(data)
    path, value = draw(st.sampled_from(nodes))
    parent = parent_of(data, path)
    how = draw(st.sampled_from(["drop", "replace", "unknown_key", "duplicate"]))
    if how == "drop":
        del parent[path[-1]]
    elif how == "replace":
        parent[path[-1]] = draw(wrong_values)
    elif how == "unknown_key":
        while path and not isinstance(value, dict):
            path = path[:-1]
            value = parent_of(data, (*path, "")) if path else data
        if not path:  # the top level: a section nobody knows
            path = ("scrap",)
            data["scrap"] = {"node": "ns=2;s=X"}
        else:
            key = draw(st.sampled_from(["scarp", "nodes", "Width", "max_rates", "extra"]))
            value[key] = 1
            path = (*path, key)
    else:
        # the value of another field of the same name elsewhere (a node id, a work centre, a
        # source name, an address), or another leaf's value at random
        same = [
            v
            for p, v in nodes
            if p != path and p[-1] == path[-1] and not isinstance(v, dict | list)
        ]
        leaves = [v for _, v in nodes if not isinstance(v, dict | list)]
        parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(same or leaves)))
    event(how)
    return name, data, how, dotted(path)


def _ancestors(path: str) -> set[str]:
    """``sources[1].signals.good`` → itself, ``sources[1].signals``, ``sources[1]``, ``sources``."""
    out = {path}
    while True:
        path = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
        if not path or path in out:
            return out
        out.add(path)


def _depth(path: str) -> int:
    return len(re.findall(r"[^.\[\]]+", path))


def _parent(path: str) -> str:
    return re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)


def names_the_field(problem: str, mutated: str) -> bool:
    """A problem names the mutated field when its path is the field, a field within it, a
    section that holds it, or a field beside it (a dropped ``table`` makes the default's
    ``type`` wrong); or when its text names the field (a cross-reference)."""
    named, _, text = problem.partition(": ")
    # a section that holds the field, but not a whole top-level section or source
    close = {a for a in _ancestors(mutated) if _depth(a) >= min(_depth(mutated), 3)}
    return (
        named in close
        or named.startswith((f"{mutated}.", f"{mutated}["))
        or (_parent(named) == _parent(mutated) != "")
        # an element of a list refused for the list's sake (a duplicate): named by the list
        or (mutated.endswith("]") and named == mutated.rsplit("[", 1)[0])
        or re.search(rf"\b{re.escape(mutated)}\b", text) is not None
        or any(f"{a}:" in text for a in _ancestors(mutated) if _depth(a) >= 2)
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_a_mutated_config_is_accepted_or_refused_naming_its_field(
    sample: tuple[str, dict[str, Any], str, str],
) -> None:
    _, data, _, mutated = sample
    problems = refusal(data)
    event("refused" if problems else "accepted")
    if problems:
        assert any(names_the_field(p, mutated) for p in problems), (mutated, problems)
        for problem in problems:
            assert re.match(r"^[A-Za-z_]+(\[\d+\]|\.[A-Za-z_]\w*)*: \S", problem), problem


def refusal(data: dict[str, Any]) -> tuple[str, ...]:
    """The problems :func:`parse_config` names (none: accepted); any other exception fails."""
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.problems  # noqa: PT017 - the refusal itself is what is checked
        return exc.problems
    return ()


@pytest.mark.parametrize(
    ("mutated", "value", "expected"),
    [
        ("mqtt.port", -1, "mqtt.port:"),
        ("mqtt.port", 1.5, "mqtt.port:"),
        ("mqtt.keepalive_s", math.nan, "mqtt.keepalive_s:"),
        ("sources[0].signals.good.width", 24, "sources[0].signals.good.width:"),
        ("sources[0].signals.good.scale", "0", "sources[0].signals.good.scale:"),
        ("sources[0].signals.good.max_rate", "-1", "sources[0].signals.good.max_rate:"),
        ("sources[0].signals.flow.lag_s", "NaN", "sources[0].signals.flow.lag_s:"),
        ("sources[0].signals.flow.slice_s", 0, "sources[0].signals.flow.slice_s:"),
        ("sources[0].subscription.publishing_interval_ms", 0, "publishing_interval_ms:"),
        ("sources[0].signals.scale.resolution", "1e999999", "scale.resolution:"),
        ("clock.max_skew_s", "-Infinity", "clock.max_skew_s:"),
        ("sources[1].signals.complete_good.node", "ns=2;s=FILL-1.Complete.Request", "sources[1]"),
        ("place.work_centres", ["MIX-1", "MIX-1"], "place.work_centres:"),
    ],
)
def test_examples_of_invalid_opcua_fields(mutated: str, value: Any, expected: str) -> None:
    data = copy.deepcopy(EXAMPLES["line.toml"])
    set_path(data, mutated, value)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert any(expected in p for p in exc.value.problems), exc.value.problems


@pytest.mark.parametrize(
    ("mutated", "value", "expected"),
    [
        ("sources[0].port", 0, "sources[0].port:"),
        ("sources[0].poll_interval_ms", -200, "sources[0].poll_interval_ms:"),
        ("sources[0].signals.good.type", "int32", "sources[0].signals.good.type:"),
        ("sources[0].signals.good.address", 70000, "sources[0].signals.good.address:"),
        ("sources[0].signals.scrap.address", 10, "sources[0].signals"),  # overlaps good
        ("sources[0].signals.flow.rollover", "abc", "sources[0].signals.flow.rollover:"),
        ("sources[0].signals.flow.resolution", "NaN", "sources[0].signals.flow.resolution:"),
        ("sources[0].signals.scale.stable.bit", 16, "sources[0].signals.scale.stable.bit:"),
        ("sources[1].signals.complete_ack.table", "discrete", "complete_ack.table:"),
        ("sources[1].work_centre", "PACK-9", "sources[1].work_centre:"),
        ("sources[1].name", "mix-plc", "sources[1].name:"),
    ],
)
def test_examples_of_invalid_modbus_fields(mutated: str, value: Any, expected: str) -> None:
    data = copy.deepcopy(EXAMPLES["line-modbus.toml"])
    set_path(data, mutated, value)
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert any(expected in p for p in exc.value.problems), exc.value.problems


def set_path(data: Any, dotted_path: str, value: Any) -> None:
    keys: list[Key] = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", dotted_path)]
    parent = parent_of(data, tuple(keys))
    parent[keys[-1]] = value


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_EDITS = [
    ('good = { node = "ns=2;s=MIX-1.Good", width = 32 }', "good = { width = 32 }", "good.node"),
    ("port = 1883", 'port = "mqtt"', "mqtt.port"),
    ('scrap = { node = "ns=2;s=MIX-1.Scrap", width = 16 }', "scrap = { node = 7 }", "scrap.node"),
    ('resolution = "0.001"', 'resolution = "0,001"', "scale.resolution"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("old", "new", "field"), BAD_EDITS)
def test_validate_and_run_exit_2_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    old: str,
    new: str,
    field: str,
) -> None:
    text = (CONFIG_DIR / "line.toml").read_text(encoding="utf-8")
    assert old in text
    bad = write_toml(tmp_path / "line.toml", text.replace(old, new))
    assert main([command, str(bad)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_file_that_is_not_utf8_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = (CONFIG_DIR / "line.toml").read_text(encoding="utf-8")
    bad = tmp_path / "line.toml"
    bad.write_bytes(text.encode("utf-8").replace(b'"hamburg"', b'"hamb\xfcrg"'))  # Latin-1
    assert main([command, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err, err
