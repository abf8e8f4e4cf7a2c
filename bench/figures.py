"""Every figure the benchmark reports: what it is, its raw-stack reference and its target.

The catalogue lists the figures of the whole of issue 7, measured or not, so the table always
shows what is still missing ("not measured yet") instead of leaving it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["pass", "FAIL", "—", "not measured yet"]


@dataclass(frozen=True, slots=True)
class Target:
    """``ratio >= threshold`` (against the reference) or ``value <= threshold``."""

    on: Literal["ratio", "value"]
    threshold: float
    text: str

    def met(self, value: float, ratio: float | None) -> bool | None:
        if self.on == "ratio":
            return None if ratio is None else ratio >= self.threshold
        return value <= self.threshold


@dataclass(frozen=True, slots=True)
class Spec:
    key: str
    label: str
    unit: str
    reference: str | None = None  # the key of the raw-stack figure it is compared with
    target: Target | None = None
    note: str = ""  # why it is not measured, when it is not


DRAIN = Target("ratio", 0.75, "≥ 75 % of raw paho")
RSS = Target("value", 100.0, "≤ 100 MB")
E2E = Target("ratio", 0.80, "≥ 80 % of slowest raw")
P99 = Target("value", 50.0, "≤ 50 ms")
ITEM2 = "issue 7 item 2"
ITEM4 = "issue 7 item 4"
FULL_ONLY = "full run only"


def backlog_specs(n: int) -> list[Spec]:
    tag = f"{n:,}"
    b = f"backlog.{n}"
    return [
        Spec(f"{b}.fill", f"backlog {tag}: fill, Store 500/commit", "rows/s", "store.grouped"),
        Spec(f"{b}.drain", f"backlog {tag}: drain, MqttUplink", "msg/s", "raw.paho_qos1", DRAIN),
        Spec(f"{b}.rss_fill", f"backlog {tag}: peak RSS during fill", "MB", None, RSS),
        Spec(f"{b}.rss_drain", f"backlog {tag}: peak RSS during drain", "MB", None, RSS),
        Spec(f"{b}.cpu_drain", f"backlog {tag}: CPU per 1,000 drained", "s", None),
    ]


def catalogue(backlogs: tuple[int, ...]) -> list[Spec]:
    specs = [
        Spec("raw.asyncua", "raw asyncua server→client notifications", "notif/s"),
        Spec("raw.paho_qos1", "raw paho QoS 1 publishes (MQTT 5)", "msg/s"),
        Spec("raw.sqlite3_commit", "raw sqlite3 WAL FULL, 1 row/commit", "commit/s"),
        Spec("raw.sqlite3_grouped", "raw sqlite3 WAL FULL, 500 rows/commit", "rows/s"),
        Spec("raw.slowest", "slowest raw stage (asyncua, paho, sqlite3 grouped)", "/s"),
        Spec("store.commit", "Store: 1 unit (1 message)/commit", "commit/s", "raw.sqlite3_commit"),
        Spec("store.grouped", "Store: 500 units/commit", "rows/s", "raw.sqlite3_grouped"),
    ]
    for wc in (1, 4, 16):
        specs.append(
            Spec(f"e2e.throughput.wc{wc}", f"end to end, {wc} WC, BOM 10", "msg/s", "raw.slowest",
                 E2E, ITEM2)
        )  # fmt: skip
    for rate in (100, 500):
        for q in ("p50", "p99", "max"):
            target = P99 if (rate, q) == (500, "p99") else None
            specs.append(
                Spec(f"e2e.latency.{rate}.{q}", f"latency at {rate} events/s, {q}", "ms", None,
                     target, ITEM2)
            )  # fmt: skip
    for n in (100_000, 1_000_000, *backlogs):
        if not any(s.key == f"backlog.{n}.drain" for s in specs):
            specs += backlog_specs(n)
    specs.append(
        Spec("backlog.rss_growth", "RSS drain 1,000,000 / 100,000", "×", None,
             Target("value", 1.10, "flat (≤ 1.10)"), FULL_ONLY)
    )  # fmt: skip
    for what in ("wc1", "wc4", "wc16", "bom100"):
        specs.append(Spec(f"cost.cpu.{what}", f"CPU per 1,000 events, {what}", "s", note=ITEM4))
        specs.append(Spec(f"cost.rss.{what}", f"peak RSS, {what}", "MB", None, RSS, ITEM4))
    return specs


@dataclass(frozen=True, slots=True)
class Row:
    spec: Spec
    value: float | None
    reference: float | None
    ratio: float | None
    status: Status
    note: str

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "key": s.key,
            "label": s.label,
            "unit": s.unit,
            "value": self.value,
            "reference_key": s.reference,
            "reference": self.reference,
            "ratio": self.ratio,
            "target": s.target.text if s.target else None,
            "status": self.status,
            "note": self.note,
        }


def rows(specs: list[Spec], values: dict[str, float], notes: dict[str, str]) -> list[Row]:
    out = []
    for spec in specs:
        value = values.get(spec.key)
        reference = values.get(spec.reference) if spec.reference else None
        ratio = value / reference if value is not None and reference else None
        status: Status
        if value is None:
            status = "not measured yet"
        elif spec.target is None:
            status = "—"
        else:
            met = spec.target.met(value, ratio)
            status = "—" if met is None else ("pass" if met else "FAIL")
        note = notes.get(spec.key, spec.note if value is None else "")
        out.append(Row(spec, value, reference, ratio, status, note))
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, float, float, float]]:
    """(key, label, old value, new value, change in %) of every figure measured in both runs;
    the ratio too (key ``….ratio``), which is what to compare across machines and days."""
    before = {f["key"]: f for f in old["figures"]}
    out = []
    for f in new["figures"]:
        o = before.get(f["key"])
        if o is None:
            continue
        for field, suffix in (("value", ""), ("ratio", " (ratio)")):
            a, b = o.get(field), f.get(field)
            if a is not None and b is not None and a != 0:
                out.append((f["key"] + suffix, f["label"] + suffix, a, b, 100.0 * (b - a) / a))
    return out
