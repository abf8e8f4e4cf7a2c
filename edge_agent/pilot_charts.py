"""PNG charts of a pilot (``edge-agent pilot report --charts DIR``): one per material and
operation, for a person who would rather look than read.

Left: each order's backflushed and actual quantity side by side. Right: the actual quantity of
each order against what it made (good + scrap), with the standard (what the BOM says: rate and
setup) and the fitted line (the proposal) drawn through them: a fitted line steeper than the
standard is scrap the standard misses; one that starts higher is setup.

matplotlib is imported only here, and only when charts are asked for (``pip install
'edge-agent[charts]'``); each chart is a Figure of its own saved as PNG (the Agg renderer, no
pyplot, no display). The figures become floats only here, to be drawn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

from edge_agent.domain.pilot import Comparison, OrderEvidence, Proposal
from edge_agent.errors import InputError

try:
    from matplotlib.figure import Figure
except ImportError as exc:  # an optional extra: the report says how to get it
    raise InputError(
        "--charts needs matplotlib: pip install 'edge-agent[charts]' (or leave out --charts)"
    ) from exc


def write_charts(
    directory: Path,
    comparisons: Sequence[Comparison],
    evidence: Sequence[OrderEvidence],
    proposals: Mapping[tuple[str, str], Sequence[Proposal]],
) -> list[Path]:
    """One PNG per (operation, material) of the comparisons; the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    fitted = {(p.operation, p.material): p for group in proposals.values() for p in group}
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.operation, c.material), []).append(c)
    written = []
    for (operation, material), group in sorted(groups.items()):
        points = [e for e in evidence if (e.operation, e.material) == (operation, material)]
        path = directory / f"{_safe(material)}-op{_safe(operation)}.png"
        _chart(path, group, points, fitted.get((operation, material)))
        written.append(path)
    return written


def _chart(
    path: Path,
    group: Sequence[Comparison],
    points: Sequence[OrderEvidence],
    proposal: Proposal | None,
) -> None:
    first = group[0]
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    bars, scatter = figure.subplots(1, 2)
    xs = range(len(group))
    bars.bar([x - 0.2 for x in xs], [float(c.backflushed) for c in group], 0.4, label="backflushed")
    bars.bar([x + 0.2 for x in xs], [float(c.actual) for c in group], 0.4, label="actual")
    bars.set_xticks(list(xs), [c.order for c in group], rotation=45, ha="right")
    bars.set_ylabel(first.uom)
    bars.set_title("per order")
    bars.legend()
    if points:
        counted = [float(e.counted) for e in points]
        scatter.scatter(counted, [float(e.actual) for e in points], label="actual", zorder=3)
        top = max(counted) * 1.05
        e = points[0]
        rate = e.bom_quantity * (1 + Fraction(e.scrap_pct) / 100)
        scatter.plot(
            [0, top],
            [float(e.setup), float(Fraction(e.setup) + rate * Fraction(top))],
            linestyle="--",
            label=f"standard: {float(e.scrap_pct):g} % scrap, setup {float(e.setup):g}",
        )
        if proposal is not None and proposal.fitted_rate is not None:
            assert proposal.fitted_setup is not None
            scatter.plot(
                [0, top],
                [
                    float(proposal.fitted_setup),
                    float(proposal.fitted_setup + proposal.fitted_rate * Fraction(top)),
                ],
                label=(
                    f"fitted ({proposal.orders} orders): "
                    f"{_shown(proposal.proposed_scrap_pct)} % scrap, setup "
                    f"{_shown(proposal.proposed_setup)}" + (" — thin" if proposal.thin else "")
                ),
            )
        scatter.set_xlabel("good + scrap")
        scatter.set_ylabel(first.uom)
        scatter.set_xlim(left=0)
        scatter.set_ylim(bottom=0)
        scatter.legend()
    scatter.set_title("actual against what was made")
    figure.suptitle(f"{first.material} at operation {first.operation}: backflushed and actual")
    figure.savefig(path, dpi=100)


def _shown(value: object) -> str:
    return "—" if value is None else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
