"""Command line: ``edge-agent calc`` and ``edge-agent demo``.

Exit codes: 0 success, 2 bad arguments, configuration or master data (with a message naming the
field and the value), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from edge_agent import __version__
from edge_agent.calc import CalcResult, parse_confirmation, run_calc
from edge_agent.domain.explosion import ExplodedBom, explode
from edge_agent.domain.lots import load_lots
from edge_agent.domain.masterdata import MasterData, load_master_data, parse_timestamp
from edge_agent.domain.quantities import fmt
from edge_agent.errors import EdgeAgentError, InputError, LotDataError, MasterDataError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"edge-agent: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    calc = sub.add_parser(
        "calc",
        help="compute the postings a sequence of confirmations would produce",
        description=(
            "Compute the component postings for confirmations at one operation, with phantoms "
            "exploded, component scrap and setup applied and rounding carried across the "
            "sequence. Prints JSON Lines (one object per component per confirmation) or, with "
            "--table, a readable table with totals. A negative correction is written "
            "--confirm=-2:0."
        ),
    )
    calc.add_argument("masterdata", type=Path, metavar="MASTERDATA.json")
    calc.add_argument("--product", required=True)
    calc.add_argument("--revision", help="BOM revision (default: the one in effect --as-of)")
    calc.add_argument("--operation", required=True)
    calc.add_argument(
        "--confirm",
        action="append",
        required=True,
        metavar="GOOD[:SCRAP]",
        help="a confirmation delta in the BOM's unit; repeat for a sequence",
    )
    calc.add_argument("--lots", type=Path, metavar="LOTS.json", help="staged lots to draw from")
    calc.add_argument(
        "--as-of",
        metavar="ISO-8601",
        help="moment for revision effectivity and lot expiry (default: now, UTC)",
    )
    calc.add_argument("--table", action="store_true", help="print a readable table")

    sub.add_parser(
        "demo",
        help="run the example line (today: the backflush calculation on config/)",
        description="Run the example line's master data and lots through the backflush rules.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "calc":
            return _calc(args, out)
        if args.command == "demo":
            return _demo(out)
    except MasterDataError as exc:
        for problem in exc.problems:
            err.print(f"edge-agent: master data: {problem}", markup=False)
        return EXIT_USAGE
    except LotDataError as exc:
        for problem in exc.problems:
            err.print(f"edge-agent: lots: {problem}", markup=False)
        return EXIT_USAGE
    except InputError as exc:
        err.print(f"edge-agent: error: {exc}", markup=False)
        return EXIT_USAGE
    except EdgeAgentError as exc:
        err.print(f"edge-agent: {exc}", markup=False)
        return EXIT_FAILURE
    raise AssertionError(f"unhandled command {args.command!r}")


def _read_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {what} file {str(path)!r}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{what} file {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from None


def _load_master(path: Path) -> MasterData:
    data = _read_json(path, "master data")
    if not isinstance(data, dict):
        raise MasterDataError([f"{path}: expected a JSON object with 'materials' and 'boms'"])
    try:
        return load_master_data(data)
    except MasterDataError as exc:
        raise MasterDataError([f"{path}: {p}" for p in exc.problems]) from None


def _calc(args: argparse.Namespace, out: Console) -> int:
    now = datetime.now(UTC)
    if args.as_of is not None:
        try:
            now = parse_timestamp(args.as_of)
        except ValueError as exc:
            raise InputError(f"--as-of: {exc}") from None
    confirmations = [parse_confirmation(text) for text in args.confirm]
    master = _load_master(args.masterdata)
    bom = explode(master, master.bom(args.product, args.revision, now), now)
    lots = None
    if args.lots is not None:
        data = _read_json(args.lots, "lots")
        if not isinstance(data, dict):
            raise LotDataError([f"{args.lots}: expected a JSON object with 'lots'"])
        try:
            lots = load_lots(data, master)
        except LotDataError as exc:
            raise LotDataError([f"{args.lots}: {p}" for p in exc.problems]) from None
    result = run_calc(master, bom, args.operation, confirmations, now, lots)
    if args.table:
        print_table(out, bom, args.operation, result, lots is not None)
    else:
        for record in result.records:
            out.print(json.dumps(record.to_json(bom)), markup=False)
    return EXIT_OK


def print_table(
    out: Console, bom: ExplodedBom, operation: str, result: CalcResult, with_lots: bool
) -> None:
    """The postings of a calc run as a table, then the totals per material."""
    table = Table(
        title=f"Backflush — BOM {bom.ref}, operation {operation}",
        title_justify="left",
        show_lines=False,
    )
    for name, justify in (
        ("#", "right"),
        ("good", "right"),
        ("scrap", "right"),
        ("material", "left"),
        ("posted", "right"),
        ("uom", "left"),
        ("theoretical Σ", "right"),
        ("issued Σ", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if with_lots:
        table.add_column("lots")
        table.add_column("held")
    previous = 0
    for r in result.records:
        p = r.posting
        first = r.confirmation != previous
        previous = r.confirmation
        row = [
            str(r.confirmation) if first else "",
            fmt(r.good) if first else "",
            fmt(r.scrap) if first else "",
            p.material + (" (+setup)" if p.setup_included else ""),
            fmt(p.quantity),
            p.uom,
            fmt(p.theoretical),
            fmt(p.issued),
        ]
        if with_lots and r.binding is not None:
            b = r.binding
            row.append(
                ", ".join(
                    f"{d.lot} {fmt(d.quantity)}"
                    + (f" ({d.material}, substitute)" if d.substitution else "")
                    for d in b.draws
                )
                or "—"
            )
            held = [f"{fmt(b.held.quantity)} {b.held.reason.value}"] if b.held else []
            if b.held_cancelled:
                held.append(f"-{fmt(b.held_cancelled)} cancelled")
            row.append(", ".join(held) or "—")
        table.add_row(*row, end_section=False)
    out.print(table)

    totals = Table(title="Totals per material", title_justify="left")
    for name in ("material", "posted Σ", "uom", "theoretical (unrounded)", "rounding"):
        totals.add_column(name, justify="left" if name in ("material", "uom") else "right")
    last: dict[str, tuple[Decimal, str, str]] = {}
    sums: dict[str, Decimal] = {}
    for r in result.records:
        p = r.posting
        sums[p.material] = sums.get(p.material, Decimal(0)) + p.quantity
        last[p.material] = (p.issued, p.uom, fmt(p.theoretical))
    for material, total in sums.items():
        issued, uom, theo = last[material]
        assert total == issued, "postings add up to the rounded cumulative quantity"
        totals.add_row(material, fmt(total), uom, theo, fmt(issued - Decimal(theo)))
    out.print(totals)


def _demo(out: Console) -> int:
    """Until the runtime lands, the demo runs the example line through ``calc``."""
    masterdata = CONFIG_DIR / "masterdata.json"
    lots_file = CONFIG_DIR / "lots.json"
    out.print(
        "[bold]edge-agent demo[/bold] — the example line's master data through the backflush "
        f"rules\n  master data: {masterdata}\n  staged lots: {lots_file}\n"
        "  The OPC UA/MQTT runtime demo is not built yet (issue 3); this runs the same rules "
        "the runtime will apply.\n"
    )
    master = _load_master(masterdata)
    as_of = parse_timestamp("2026-11-22T08:00:00Z")
    data = _read_json(lots_file, "lots")
    assert isinstance(data, dict)
    lots = load_lots(data, master)
    bom = explode(master, master.bom("FG-100", None, as_of), as_of)
    for operation, confirmations in (
        ("10", ["100", "150:5"]),
        ("20", ["120:3", "1", "1", "80:2", "-5:0"]),
    ):
        out.print(
            f"[bold]Operation {operation}[/bold]: confirmations {', '.join(confirmations)} "
            f"(as of {as_of:%Y-%m-%d %H:%M} UTC)"
        )
        result = run_calc(
            master, bom, operation, [parse_confirmation(c) for c in confirmations], as_of, lots
        )
        if result.lots is not None:
            lots = result.lots
        print_table(out, bom, operation, result, with_lots=True)
        out.print()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
