"""The benchmark's command line on a tiny scale: structure and sanity, never speed.

The machine is shared and noisy, so nothing here compares a figure with a time: the run must
finish, count every message it sent, and report every figure of the catalogue (measured or
"not measured yet") in the table and in the JSON, and ``--compare`` must print the changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import FULL, QUICK, e2e_runs, main
from bench.e2e import MatchError, Received, latency_figures, match, percentile
from bench.figures import Spec, Target, catalogue, changes, rows
from bench.worker import _log_problems
from simulators.mosquitto import has_mosquitto

TINY = "0.002"  # 10 commits, 40 rows, 40 publishes, a backlog of 200
E2E_TINY = "0.01"  # 10 changes a throughput run; 4 and 20 changes at 100 and 500 events/s


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


@pytest.mark.skipif(not has_mosquitto(), reason="the e2e stage needs mosquitto")
def test_a_tiny_end_to_end_run_counts_every_message_and_times_every_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PLC simulator → agent process → mosquitto → MES, one throughput run and the latency run
    (the others are the same code with other sizes)."""
    out_json = tmp_path / "e2e.json"
    args = ["--only", "e2e", "--e2e-runs", "wc1,latency", "--scale", E2E_TINY]
    assert main([*args, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    figures = {f["key"]: f for f in report["figures"]}
    for f in report["figures"]:
        assert f["label"] in out

    latency_keys = {f"e2e.latency.{r}.{q}" for r in (100, 500) for q in ("p50", "p99", "max")}
    measured = {k for k, f in figures.items() if f["value"] is not None}
    assert measured == {"e2e.throughput.wc1", "cost.cpu.wc1", "cost.rss.wc1", *latency_keys}
    for key in measured:
        assert isinstance(figures[key]["value"], float)
        assert figures[key]["value"] > 0
    for rate in (100, 500):
        p50, p99, top = (figures[f"e2e.latency.{rate}.{q}"]["value"] for q in ("p50", "p99", "max"))
        assert p50 <= p99 <= top
    assert figures["e2e.latency.500.p99"]["status"] in ("pass", "FAIL")
    assert figures["cost.rss.wc1"]["status"] in ("pass", "FAIL")
    assert figures["e2e.throughput.wc1"]["reference_key"] == "raw.slowest"
    for other in ("e2e.throughput.wc4", "cost.cpu.bom100", "cost.rss.wc16"):
        assert figures[other]["status"] == "not measured yet"  # not asked for

    wc1 = report["details"]["e2e.wc1"]
    assert (wc1["work_centres"], wc1["bom_lines"], wc1["messages_per_change"]) == (1, 10, 11)
    throughput = wc1["phases"]["throughput"]
    assert throughput["messages"] == throughput["changes"] * 11 > 0
    assert throughput["arrivals"][-1][1] == throughput["messages"]  # every one arrived
    assert throughput["cpu_s"] >= 0
    assert throughput["outbox_emptied_s"] >= 0  # and the outbox did empty before the stop
    assert wc1["rss_hwm"] >= wc1["rss_sampled_peak"] > 0  # the kernel's peak is the peak
    latency = report["details"]["e2e.latency"]
    assert latency["work_centres"] == 4
    for rate in (100, 500):
        phase = latency["phases"][f"latency{rate}"]
        assert phase["offered_rate"] == rate
        assert len(phase["latency_first_ms"]) == phase["changes"] > 0
        assert phase["messages"] == 11 * phase["changes"]
        lat = phase["latency"]
        assert lat["min"] <= lat["p50"] <= lat["last"]["p50"]
        assert {"to_source", "to_engine", "to_mes"} <= set(lat)


def _received(
    wc: str, value: int, at: float, kind: str = "material-consumed", n: int = 0
) -> Received:
    return Received(at, kind, f"{wc}-{value}-{kind}-{n}", wc, str(value), None, None, None)


def test_each_change_is_matched_to_its_messages() -> None:
    changes = [("WC-01", 1, 10.0), ("WC-02", 1, 10.5)]
    received = [
        _received("WC-01", 1, 10.020, "production-confirmation"),
        _received("WC-02", 1, 10.510, "production-confirmation"),
        _received("WC-01", 1, 10.030),
        _received("WC-02", 1, 10.540),
    ]
    matched = match(changes, received, 2)
    assert [(m.work_centre, m.messages) for m in matched] == [("WC-01", 2), ("WC-02", 2)]
    lat = latency_figures(matched)
    assert lat["min"] == pytest.approx(10.0)  # the first message of WC-02's change
    assert lat["max"] == pytest.approx(20.0)
    assert lat["last"]["max"] == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([_received("WC-01", 1, 10.03, "production-confirmation")], "arrived twice"),
        ([_received("WC-01", 2, 10.03, "production-confirmation")], "name no change"),
        ([_received("WC-01", 1, 10.03, "exception", 9)], "exception"),
    ],
)
def test_a_message_too_many_or_an_exception_is_an_error(
    extra: list[Received], problem: str
) -> None:
    received = [_received("WC-01", 1, 10.02, "production-confirmation"), *extra]
    with pytest.raises(MatchError, match=problem):
        match([("WC-01", 1, 10.0)], received, 1)
    with pytest.raises(MatchError, match="0 messages, not 1"):
        match([("WC-01", 1, 10.0), ("WC-01", 2, 11.0)], received[:1], 1)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([7.0], 99) == 7.0


def test_the_e2e_runs_cover_the_issue_s_sizes() -> None:
    runs = {r.name: r for r in e2e_runs(QUICK)}
    assert [(runs[f"wc{n}"].work_centres, runs[f"wc{n}"].bom_lines) for n in (1, 4, 16)] == [
        (1, 10),
        (4, 10),
        (16, 10),
    ]
    assert (runs["bom100"].work_centres, runs["bom100"].bom_lines) == (4, 100)
    assert [rate for _name, _n, rate in runs["latency"].phases] == [100.0, 500.0]
    full = {r.name: r for r in e2e_runs(FULL)}
    assert full["wc1"].phases[0][1] > runs["wc1"].phases[0][1]


def test_the_agent_log_of_a_clean_run_has_no_problems() -> None:
    def line(event: str, level: str = "info", **more: object) -> str:
        return json.dumps({"event": event, "level": level, **more})

    clean = [
        line("agent_running"),
        line("agent_stopping"),
        line("mqtt_disconnected", "warning"),
        line("agent_stopped", outbox=0),
    ]
    assert _log_problems("\n".join(clean)) == []
    raised = [line("exception_raised", "warning", code="lot_held"), *clean]
    assert len(_log_problems("\n".join(raised))) == 1
    assert _log_problems("\n".join([*clean[:-1], line("agent_stopped", outbox=3)])) == [
        "the agent stopped with 3 messages in its outbox"
    ]
    assert _log_problems("Traceback (most recent call last):\n" + "\n".join(clean))


def test_plots_are_drawn_from_a_report(tmp_path: Path) -> None:
    draw = pytest.importorskip("bench.plots").draw  # skipped where matplotlib is missing

    latency = {
        "work_centres": 4,
        "bom_lines": 10,
        "phases": {
            f"latency{rate}": {
                "offered_rate": rate,
                "changes_per_s": rate * 0.9,
                "latency": {"p50": 20.0 * k, "p99": 45.0 * k},
                "latency_first_ms": [10.0 * k, 20.0 * k, 45.0 * k],
            }
            for k, rate in enumerate((100, 500), start=1)
        },
    }
    throughput = {
        "work_centres": 1,
        "bom_lines": 10,
        "phases": {
            "throughput": {
                "changes": 10,
                "msg_per_s": 500.0,
                "arrivals": [(0.1, 0), (0.2, 110)],
                "rss": [(0.0, 80.0), (0.1, 90.0)],
            }
        },
    }
    backlog = {
        "fill": 5000.0,
        "drain": 8000.0,
        "rss_drain": 55.0,
        "series": [(0.0, "fill", 50.0, 0), (0.1, "wait", 52.0, 200), (0.2, "drain", 53.0, 0)],
    }
    report = {
        "profile": "quick",
        "started": "2026-11-29T08:00:00+00:00",
        "machine": {"cpus": 2, "cpu_model": "test"},
        "details": {"e2e.latency": latency, "e2e.wc1": throughput, "backlog.200": backlog},
    }
    written = draw(report, tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "backlog-200.png",
        "e2e-throughput.png",
        "latency.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
