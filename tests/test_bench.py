"""The benchmark's command line on a tiny scale: structure and sanity, never speed.

The machine is shared and noisy, so nothing here compares a figure with a time: the run must
finish, count every message it sent, and report every figure of the catalogue (measured or
"not measured yet") in the table and in the JSON, and ``--compare`` must print the changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import QUICK, main
from bench.figures import Spec, Target, catalogue, changes, rows
from simulators.mosquitto import has_mosquitto

TINY = "0.002"  # 10 commits, 40 rows, 40 publishes, a backlog of 200


@pytest.mark.skipif(not has_mosquitto(), reason="the paho and backlog stages need mosquitto")
def test_a_tiny_run_reports_every_figure_and_compare_prints_the_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first.json"
    assert main(["--only", "sqlite,paho,backlog", "--scale", TINY, "--json", str(first)]) == 0
    out = capsys.readouterr().out
    report = json.loads(first.read_text())

    backlog = report["sizes"]["backlogs"][0]
    keys = [f["key"] for f in report["figures"]]
    assert keys == [s.key for s in catalogue(tuple(report["sizes"]["backlogs"]))]
    for f in report["figures"]:
        assert f["label"] in out  # every figure has its row in the table
    figures = {f["key"]: f for f in report["figures"]}
    measured = {k for k, f in figures.items() if f["value"] is not None}
    assert measured == {
        "raw.paho_qos1",
        "raw.sqlite3_commit",
        "raw.sqlite3_grouped",
        "store.commit",
        "store.grouped",
        *(
            f"backlog.{backlog}.{x}"
            for x in ("fill", "drain", "rss_fill", "rss_drain", "cpu_drain")
        ),
    }
    assert all(figures[k]["value"] > 0 for k in measured)
    for key in ("store.commit", "store.grouped", f"backlog.{backlog}.drain"):
        assert figures[key]["ratio"] > 0
        assert figures[key]["status"] != "not measured yet"
    assert figures["raw.asyncua"]["status"] == "not measured yet"  # not asked for
    assert figures["e2e.latency.500.p99"]["status"] == "not measured yet"
    assert figures[f"backlog.{backlog}.rss_drain"]["status"] in ("pass", "FAIL")
    details = report["details"]
    assert details["paho"]["arrived"] >= details["paho"]["sent"] > 0
    assert details[f"backlog.{backlog}"]["arrived"] >= backlog
    assert details[f"backlog.{backlog}"]["depth_after"] == 0  # drained: nothing left behind
    series = details[f"backlog.{backlog}"]["series"]  # (s, phase, MB, depth) for the plots
    assert {"fill", "drain"} <= {phase for _t, phase, _mb, _depth in series}
    assert max(depth for *_, depth in series) == backlog
    assert series[-1][3] == 0
    assert all(mb > 0 for _t, _phase, mb, _depth in series)
    assert [t for t, *_ in series] == sorted(t for t, *_ in series)
    assert report["payload_bytes"] > 500  # a real material-consumed message, not a stub
    assert report["machine"]["cpus"] >= 1

    second = tmp_path / "second.json"
    args = ["--only", "sqlite", "--scale", TINY, "--json", str(second), "--compare", str(first)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "change since" in out
    assert "Store: 1 unit (1 message)/commit" in out.split("change since")[1]
    assert "%" in out.split("change since")[1]


def test_statuses_and_ratios() -> None:
    specs = [
        Spec("raw", "raw", "/s"),
        Spec("ours", "ours", "/s", "raw", Target("ratio", 0.75, "≥ 75 %")),
        Spec("rss", "rss", "MB", None, Target("value", 100.0, "≤ 100 MB")),
        Spec("later", "later", "/s", "raw", note="item 2"),
    ]
    table = {r.spec.key: r for r in rows(specs, {"raw": 1000.0, "ours": 700.0, "rss": 60.0}, {})}
    assert table["raw"].status == "—"
    assert table["ours"].ratio == pytest.approx(0.7)
    assert table["ours"].status == "FAIL"
    assert table["rss"].status == "pass"
    assert (table["later"].status, table["later"].note) == ("not measured yet", "item 2")


def test_changes_in_percent() -> None:
    old = {"figures": [{"key": "a", "label": "A", "value": 100.0, "ratio": 0.5}]}
    new = {"figures": [{"key": "a", "label": "A", "value": 150.0, "ratio": 0.25}]}
    assert changes(old, new) == [
        ("a", "A", 100.0, 150.0, pytest.approx(50.0)),
        ("a (ratio)", "A (ratio)", 0.5, 0.25, pytest.approx(-50.0)),
    ]


def test_the_quick_profile_keeps_the_issue_s_sizes() -> None:
    assert QUICK.backlogs == (100_000,)
    assert QUICK.scaled(0.002).backlogs == (200,)
