"""Command line: ``edge-agent run``, ``demo``, ``validate``, ``status``, ``calc``, ``certs``, ...

Exit codes: 0 success, 2 bad arguments, configuration or master data (with a message naming the
field and the value), 3 a store the agent cannot trust (damaged, newer schema), 4 a stop that did
not finish within 20 s of SIGTERM, 1 anything else that stops the agent.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from edge_agent import __version__, certs
from edge_agent.agent import serve
from edge_agent.calc import parse_confirmation, run_calc
from edge_agent.config import load_config, parse_host_port
from edge_agent.demo import run_rules_demo
from edge_agent.documents import load_lots_file, load_master
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import parse_timestamp
from edge_agent.errors import (
    EdgeAgentError,
    InputError,
    InvalidDocumentError,
    LotDataError,
    MasterDataError,
    StoreError,
    StoreFullError,
)
from edge_agent.genealogy import show_genealogy
from edge_agent.logs import configure_logging
from edge_agent.pilot import pilot_report
from edge_agent.reports import print_table
from edge_agent.schemas import write_schemas
from edge_agent.shiftdemo import run_shift_demo
from edge_agent.status import show_status, verify_audit

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STORE = 3

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

    validate = sub.add_parser(
        "validate",
        help="check a configuration file and report every error with its path",
        description=(
            "Check an agent configuration (TOML). Every problem is printed on its own line "
            "with its path in the file, e.g. sources[1].signals.good.node; exit code 2 when "
            "there is any."
        ),
    )
    validate.add_argument("config", type=Path, metavar="CONFIG.toml")

    run = sub.add_parser(
        "run",
        help="run the agent: PLC signals to backflush postings for the MES",
        description=(
            "Run the agent as a daemon with the given configuration. Refuses to start on an "
            "invalid configuration (exit 2, every error with its path) or a store it cannot "
            "trust (exit 3). Stops cleanly on SIGTERM or SIGINT: sources first, then the "
            "engine commits what is queued, then the offline status is published."
        ),
    )
    run.add_argument("config", type=Path, metavar="CONFIG.toml")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: JSON lines unless standard error is a terminal",
    )

    status = sub.add_parser(
        "status",
        help="show what the agent's store holds: outbox, work centres, orders, audit chain",
    )
    status.add_argument("config", type=Path, metavar="CONFIG.toml")

    audit = sub.add_parser(
        "audit",
        help="check the store's hash-chained audit log",
        description=(
            "verify: recompute the hash chain of the store's audit log (every message the agent "
            "queued and every command it applied), check that it ends where the last commit "
            "recorded, and that every message still waiting is what its entry recorded. Names "
            "the first entry that does not fit; exit 0 intact, 1 broken."
        ),
    )
    audit.add_argument("action", choices=["verify"])
    audit.add_argument("config", type=Path, metavar="CONFIG.toml")
    audit.add_argument(
        "--head",
        metavar="SEQ:HASH",
        help="a chain end kept outside the store (the audit_head of a status the MES kept): "
        "the chain must still hold that entry, which shows a chain rewritten whole",
    )

    genealogy = sub.add_parser(
        "genealogy",
        help="the component lots that went into an order or a finished lot, from the store",
    )
    genealogy.add_argument("config", type=Path, metavar="CONFIG.toml")
    which = genealogy.add_mutually_exclusive_group(required=True)
    which.add_argument("--order", metavar="ID", help="the work order")
    which.add_argument("--finished-lot", metavar="LOT", help="the lot the order makes")

    _add_pilot(sub)

    schemas = sub.add_parser(
        "schemas",
        help="write the JSON Schema of every message kind the agent publishes",
        description=(
            "Write one JSON Schema file per message kind (material-consumed, "
            "production-confirmation, exception), generated from the typed models the agent "
            "uses, into DIR (the repository keeps them in docs/schemas)."
        ),
    )
    schemas.add_argument("directory", type=Path, metavar="DIR")

    certificates = sub.add_parser(
        "certs",
        help="create the agent's OPC UA application certificate and private key",
        description=(
            "Create the agent's OPC UA application instance certificate (self-signed, RSA, "
            "SHA-256, ApplicationUri urn:HOSTNAME:edge-agent:AGENT-ID) and its private key in "
            f"DIR: {certs.CERTIFICATE_FILE} (DER, for the PLC to trust) and {certs.KEY_FILE} "
            "(mode 0600). Prints their thumbprints and the next steps (docs/security.md). "
            "Refuses to replace existing files without --force; exit 2 on bad arguments."
        ),
    )
    certificates.add_argument("--out", type=Path, required=True, metavar="DIR")
    certificates.add_argument(
        "--agent-id", required=True, metavar="ID", help="the [agent] id of the configuration"
    )
    certificates.add_argument(
        "--hostname",
        default=socket.gethostname(),
        help="this machine's host name, as the PLC reaches it (default: %(default)s)",
    )
    certificates.add_argument(
        "--ip",
        type=_ip_address,
        action="append",
        default=[],
        help="an IP address of this machine to name in the certificate; repeatable",
    )
    certificates.add_argument(
        "--days",
        type=int,
        default=certs.DEFAULT_DAYS,
        help=f"validity in days, 1 to {certs.MAX_DAYS} (default %(default)s)",
    )
    certificates.add_argument(
        "--key-size", type=int, choices=certs.KEY_SIZES, default=2048, help="RSA key bits"
    )
    certificates.add_argument(
        "--force",
        action="store_true",
        help="replace an existing certificate and key (the PLC must then trust the new one)",
    )

    demo = sub.add_parser(
        "demo",
        help="run a scripted shift on the example line, end to end, and reconcile it",
        description=(
            "Start the OPC UA line PLC simulator, an MQTT broker (embedded unless --broker is "
            "given), the MES simulator and the agent itself, run two orders with a broker "
            "outage and an agent restart, and compare what the MES received with what the PLC "
            "counted. Exit 0 when they are equal, 1 when anything was lost or doubled."
        ),
    )
    demo.add_argument(
        "--broker",
        metavar="HOST:PORT",
        type=_host_port,
        help="use this MQTT 5 broker (e.g. a mosquitto) instead of the embedded one; it is not "
        "stopped, so the demo has no broker outage then",
    )
    demo.add_argument(
        "--source",
        choices=["opcua", "modbus"],
        default="opcua",
        help="how the PLC, scale and flow meter are read (config/line.toml or "
        "config/line-modbus.toml)",
    )
    demo.add_argument(
        "--rules",
        action="store_true",
        help="instead, walk one order through the pure backflush rules step by step",
    )
    return parser


def _add_pilot(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``edge-agent pilot report``."""
    pilot = sub.add_parser(
        "pilot",
        help="a pilot line: backflush beside actual issues, and a scrap %% and setup proposal",
    )
    pilot_sub = pilot.add_subparsers(dest="pilot_command", required=True, parser_class=_Parser)
    report = pilot_sub.add_parser(
        "report",
        help="compare the shadow backflush with the actual issues and propose scrap %% and setup",
        description=(
            "Read the agent's store: for each closed order that backflushed materials in shadow "
            "([pilot]), compare theoretical, backflushed and actual per operation and material, "
            "and fit actual = rate × (good + scrap) + setup over the orders to propose a "
            "component scrap %% and setup with confidence intervals (docs/pilot.md). Nothing is "
            "applied: --proposal writes a new BOM revision for change control."
        ),
    )
    report.add_argument("config", type=Path, metavar="CONFIG.toml")
    report.add_argument("--include-open", action="store_true", help="take open orders too")
    report.add_argument(
        "--confidence",
        type=_confidence,
        default=Decimal("0.95"),
        help="of the intervals, between 0.5 and 0.999 (default 0.95)",
    )
    report.add_argument(
        "--min-orders",
        type=_min_orders,
        default=5,
        help="fewer orders than this are too thin to change a standard (default 5)",
    )
    report.add_argument("--json", type=Path, metavar="FILE", help="write everything as JSON")
    report.add_argument(
        "--csv", type=Path, metavar="DIR", help="write comparison.csv and proposal.csv"
    )
    report.add_argument(
        "--proposal",
        type=Path,
        metavar="FILE",
        help="write the applicable proposals as a new BOM revision (a master-data document)",
    )
    report.add_argument("--revision", metavar="NAME", help="the new revision's name")
    report.add_argument(
        "--charts", type=Path, metavar="DIR", help="one PNG per material (needs matplotlib)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    commands = {
        "calc": _calc,
        "validate": _validate,
        "demo": _demo,
        "run": _run,
        "status": _status,
        "audit": _audit,
        "genealogy": _genealogy,
        "pilot": _pilot,
        "schemas": _schemas,
        "certs": _certs,
    }
    try:
        return commands[args.command](args, out)
    except StoreFullError as exc:  # not a store to distrust: a restart later can succeed
        err.print(f"edge-agent: {exc}", markup=False)
        return EXIT_FAILURE
    except StoreError as exc:
        err.print(f"edge-agent: {exc}", markup=False)
        return EXIT_STORE
    except InvalidDocumentError as exc:
        what = {MasterDataError: "master data", LotDataError: "lots"}.get(
            type(exc), str(getattr(args, "config", "input"))
        )
        for problem in exc.problems:
            err.print(f"edge-agent: {what}: {problem}", markup=False)
        return EXIT_USAGE
    except InputError as exc:
        err.print(f"edge-agent: error: {exc}", markup=False)
        return EXIT_USAGE
    except EdgeAgentError as exc:
        err.print(f"edge-agent: {exc}", markup=False)
        return EXIT_FAILURE


def _demo(args: argparse.Namespace, out: Console) -> int:
    if args.rules:
        run_rules_demo(out, CONFIG_DIR)
        return EXIT_OK
    return run_shift_demo(out, args.broker, kind=args.source)


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _certs(args: argparse.Namespace, out: Console) -> int:
    try:
        certs.run_certs(
            out,
            args.out,
            args.agent_id,
            args.hostname,
            tuple(args.ip),
            args.days,
            args.key_size,
            args.force,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot write into {str(args.out)!r}: {exc.strerror}") from None
    return EXIT_OK


def _run(args: argparse.Namespace, out: Console) -> int:
    config = load_config(args.config)
    configure_logging(args.log_level, args.log_format)
    return serve(config)


def _schemas(args: argparse.Namespace, out: Console) -> int:
    for path in write_schemas(args.directory):
        out.print(str(path), markup=False)
    return EXIT_OK


def _status(args: argparse.Namespace, out: Console) -> int:
    return show_status(load_config(args.config), out)


def _audit(args: argparse.Namespace, out: Console) -> int:
    head = None
    if args.head is not None:
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or int(seq) < 1 or len(digest) != 64:
            raise InputError(
                f"--head: expected SEQ:HASH (an entry number and its 64-hex-digit hash), "
                f"got {args.head!r}"
            )
        head = (int(seq), digest.lower())
    return verify_audit(load_config(args.config), out, head)


def _genealogy(args: argparse.Namespace, out: Console) -> int:
    return show_genealogy(load_config(args.config), out, args.order, args.finished_lot)


def _pilot(args: argparse.Namespace, out: Console) -> int:
    return pilot_report(
        load_config(args.config),
        out,
        include_open=args.include_open,
        confidence=args.confidence,
        min_orders=args.min_orders,
        json_path=args.json,
        csv_dir=args.csv,
        proposal_path=args.proposal,
        revision=args.revision,
        charts_dir=args.charts,
    )


def _confidence(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.95 (got {text!r})") from None
    if not Decimal("0.5") <= value <= Decimal("0.999"):
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 0.999 (got {text})")
    return value


def _min_orders(text: str) -> int:
    if not text.isdigit() or int(text) < 3:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 3 (got {text!r})")
    return int(text)


def _validate(args: argparse.Namespace, out: Console) -> int:
    config = load_config(args.config)
    out.print(
        f"{args.config}: ok — agent {config.agent.id} on line {config.place.line} "
        f"({config.place.site}/{config.place.area}), {len(config.sources)} source(s), "
        f"topics under {config.topic_base}/",
        markup=False,
    )
    return EXIT_OK


def _calc(args: argparse.Namespace, out: Console) -> int:
    now = datetime.now(UTC)
    if args.as_of is not None:
        try:
            now = parse_timestamp(args.as_of)
        except ValueError as exc:
            raise InputError(f"--as-of: {exc}") from None
    confirmations = [parse_confirmation(text) for text in args.confirm]
    master = load_master(args.masterdata)
    bom = explode(master, master.bom(args.product, args.revision, now), now)
    lots = load_lots_file(args.lots, master) if args.lots is not None else None
    result = run_calc(master, bom, args.operation, confirmations, now, lots)
    if args.table:
        print_table(out, bom, args.operation, result, lots is not None)
    else:
        for record in result.records:
            out.print(json.dumps(record.to_json(bom)), markup=False)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
