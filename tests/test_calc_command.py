"""`edge-agent calc` and `edge-agent demo` as a user runs them, from the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main

ROOT = Path(__file__).resolve().parents[1]
MASTERDATA = ROOT / "config" / "masterdata.json"
LOTS = ROOT / "config" / "lots.json"
SCRIPT = Path(sys.executable).parent / "edge-agent"


def calc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["calc", str(MASTERDATA), "--product", "FG-100", *args])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    return code, records, captured.err


def test_installed_console_script_runs_calc() -> None:
    result = subprocess.run(
        [
            str(SCRIPT),
            "calc",
            str(MASTERDATA),
            "--product",
            "FG-100",
            "--operation",
            "10",
            "--confirm",
            "100",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["material"]: r["quantity"] for r in records} == {
        "RM-BASE": "24.380",  # 25 L / 100 pc × 0.92 kg/L × 100 + 1.5 L setup × 0.92
        "RM-PERFUME": "0.100",  # 100 g / 100 pc × 100, issued in kg
    }


def test_json_lines_carry_the_contract_fields_as_decimal_strings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, records, _ = calc(
        capsys, "--operation", "20", "--confirm", "1", "--confirm", "1", "--confirm", "1"
    )
    assert code == 0
    for r in records:
        assert isinstance(r["confirmation"], int)
        for field in ("quantity", "theoretical", "issued"):
            assert isinstance(r[field], str)
            Decimal(r[field])
        assert r["uom"]
    labels = [r for r in records if r["material"] == "PK-LABEL"]
    # 50 label sheets per 100 tubes, rounding up, carried across the sequence
    assert [(r["confirmation"], r["quantity"], r["theoretical"]) for r in labels] == [
        (1, "1", "0.5"),
        (2, "0", "1"),
        (3, "1", "1.5"),
    ]


def test_lots_drawn_and_held_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code, records, _ = calc(
        capsys,
        "--operation",
        "20",
        "--confirm",
        "140",
        "--lots",
        str(LOTS),
        "--as-of",
        "2026-11-22T08:00:00Z",
    )
    assert code == 0
    tubes = next(r for r in records if r["material"] == "PK-TUBE")
    assert tubes["quantity"] == "143"  # 140 × 1.02 = 142.8, rounded up
    assert [(d["lot"], d["quantity"], d["substitution"]) for d in tubes["lots"]] == [
        ("TUBE-7781", "143", False)
    ]
    labels = next(r for r in records if r["material"] == "PK-LABEL")
    assert labels["lots"] == [
        {"lot": "LBL-3302", "material": "PK-LABEL", "quantity": "70", "substitution": False}
    ]
    glue = next(r for r in records if r["material"] == "ADH-GLUE")
    assert glue["held"] is None


def test_table_prints_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "calc",
            str(MASTERDATA),
            "--product",
            "FG-100",
            "--operation",
            "10",
            "--confirm",
            "10:1",
            "--confirm",
            "5",
            "--table",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Totals per material" in out
    assert "RM-PERFUME" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--operation", "30", "--confirm", "1"], "operation '30' has no lines in BOM FG-100"),
        (["--operation", "10", "--confirm", "abc"], "--confirm 'abc'"),
        (
            ["--operation", "10", "--confirm", "1", "--confirm=-5"],
            "operation 10: a good correction of -5",
        ),
        (["--operation", "10", "--confirm", "1", "--revision", "Z"], "no revision 'Z'"),
        (
            ["--operation", "10", "--confirm", "1", "--as-of", "2025-01-01"],
            "no revision of BOM 'FG-100' is in effect",
        ),
        (["--operation", "10", "--confirm", "1", "--as-of", "yesterday"], "--as-of"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_no_output(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, records, err = calc(capsys, *args)
    assert code == 2
    assert records == []
    assert expected in err


def test_missing_required_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["calc", str(MASTERDATA), "--operation", "10", "--confirm", "1"])
    assert exc.value.code == 2
    assert "--product" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"materials": [{"id": "A", "uom": "kg", "increment": 0.001}], "boms": []},
            "materials[0] (A) › increment: must be a decimal string",
        ),
        (
            {
                "materials": [{"id": "A", "uom": "pc", "increment": "1"}],
                "boms": [
                    {
                        "product": "FG-100",
                        "revision": "C",
                        "uom": "pc",
                        "lines": [
                            {"material": "RM-7", "quantity": "1", "uom": "pc", "operation": "10"}
                        ],
                    }
                ],
            },
            "boms[0] (BOM FG-100 rev C) › lines[0] (RM-7) › material: unknown material 'RM-7'",
        ),
        (
            {
                "materials": [],
                "boms": [
                    {
                        "product": "FG-100",
                        "revision": "A",
                        "uom": "pc",
                        "lines": [
                            {
                                "material": "PH",
                                "quantity": "1",
                                "uom": "pc",
                                "operation": "10",
                                "phantom": True,
                            }
                        ],
                    },
                    {
                        "product": "PH",
                        "revision": "A",
                        "uom": "pc",
                        "lines": [
                            {
                                "material": "FG-100",
                                "quantity": "1",
                                "uom": "pc",
                                "operation": "10",
                                "phantom": True,
                            }
                        ],
                    },
                ],
            },
            "phantom cycle: FG-100 → PH → FG-100",
        ),
    ],
)
def test_bad_master_data_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "md.json"
    path.write_text(json.dumps(document))
    code = main(["calc", str(path), "--product", "FG-100", "--operation", "10", "--confirm", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert expected in captured.err
    assert str(path) in captured.err


def test_unreadable_or_malformed_master_data_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"materials": [')
    for path, expected in ((tmp_path / "missing.json", "cannot read"), (broken, "not valid JSON")):
        code = main(["calc", str(path), "--product", "P", "--operation", "10", "--confirm", "1"])
        assert code == 2
        assert expected in capsys.readouterr().err


def test_rules_demo_walks_the_example_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rules"]) == 0
    out = capsys.readouterr().out
    for heading in (
        "Operation 10",
        "Operation 20",
        "Weighing RM-ACTIVE",
        "Metering RM-WATER",
        "Order close WO-7",
    ):
        assert heading in out
