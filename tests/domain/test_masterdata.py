"""Master-data loading: every rejection names the document, the line and the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from edge_agent.domain.masterdata import PostingMethod, load_master_data, merge_master_doc
from edge_agent.domain.quantities import Rounding
from edge_agent.errors import MasterDataError

from .builders import bom, line, master, material

CONFIG = Path(__file__).resolve().parents[2] / "config" / "masterdata.json"


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(MasterDataError) as exc:
        load_master_data(doc)
    return list(exc.value.problems)


def one_problem(doc: dict[str, Any]) -> str:
    found = problems(doc)
    assert len(found) == 1, found
    return found[0]


def test_the_example_master_data_loads() -> None:
    md = load_master_data(CONFIG.read_text())
    c = md.bom("FG-100", "C")
    assert c.base_quantity == Decimal(100)
    assert md.materials["RM-BASE"].density == Decimal("0.92")
    assert md.materials["PK-LABEL"].rounding is Rounding.UP
    assert {ln.method for ln in c.lines} == set(PostingMethod)


def test_domain_values_are_immutable() -> None:
    md = master([material("A")], [bom("P", [line("A", "1")])])
    with pytest.raises(AttributeError):
        md.materials["A"].increment = Decimal("0.1")  # type: ignore[misc]
    with pytest.raises(TypeError):
        md.materials["B"] = md.materials["A"]  # type: ignore[index]


def test_json_number_with_a_fraction_is_refused_naming_the_field() -> None:
    msg = one_problem({"materials": [material("A", increment=0.1)]})  # type: ignore[arg-type]
    assert msg.startswith("materials[0] (A) › increment:")
    assert "decimal string" in msg


def test_json_integer_is_accepted_as_exact() -> None:
    md = master([material("A", increment=1)], [bom("P", [line("A", 2)])])  # type: ignore[arg-type]
    assert md.bom("P").lines[0].quantity == Decimal(2)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "1.0000000000001", "1e16", "abc", ""])
def test_non_finite_or_out_of_range_decimals_are_refused(bad: str) -> None:
    msg = one_problem({"materials": [material("A")], "boms": [bom("P", [line("A", bad)])]})
    assert "boms[0] (BOM P rev A) › lines[0] (A) › quantity" in msg


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_zero_or_negative_line_quantity_is_refused(bad: str) -> None:
    msg = one_problem({"materials": [material("A")], "boms": [bom("P", [line("A", bad)])]})
    assert msg.startswith("boms[0] (BOM P rev A) › lines[0] (A) › quantity:")
    assert "greater than 0" in msg
    assert repr(bad) in msg


def test_negative_setup_and_scrap_are_refused() -> None:
    found = problems(
        {
            "materials": [material("A")],
            "boms": [bom("P", [line("A", "1", setup_quantity="-1", scrap_pct="-5")])],
        }
    )
    assert any("setup_quantity" in p for p in found)
    assert any("scrap_pct" in p for p in found)


def test_unknown_material_names_bom_line_and_material() -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [bom("FG-100", [line("A", "1"), line("RM-7", "2")], revision="C")],
        }
    )
    assert msg == "boms[0] (BOM FG-100 rev C) › lines[1] (RM-7) › material: unknown material 'RM-7'"


def test_unknown_unit_is_refused() -> None:
    msg = one_problem({"materials": [material("A", uom="kilo")]})
    assert msg.startswith("materials[0] (A) › uom: unknown unit 'kilo'")


def test_misspelt_field_is_refused_not_ignored() -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [bom("P", [line("A", "1", scrap_percent="10")])],
        }
    )
    assert msg == "boms[0] (BOM P rev A) › lines[0] (A) › scrap_percent: unknown field (misspelt?)"


def test_conversion_needing_a_missing_density_is_refused() -> None:
    msg = one_problem(
        {
            "materials": [material("OIL", uom="kg", increment="0.001")],
            "boms": [bom("P", [line("OIL", "0.5", uom="L")])],
        }
    )
    assert "lines[0] (OIL) › uom" in msg
    assert "needs a density" in msg
    assert "material 'OIL'" in msg


def test_cross_family_line_unit_is_refused() -> None:
    msg = one_problem(
        {
            "materials": [material("A", uom="kg", increment="0.001")],
            "boms": [bom("P", [line("A", "1", uom="m")])],
        }
    )
    assert "cannot convert m (length) to kg (mass)" in msg


def test_duplicate_revision_is_refused() -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [
                bom("P", [line("A", "1")], revision="C", effective_from="2026-01-01"),
                bom("P", [line("A", "2")], revision="C", effective_from="2026-02-01"),
            ],
        }
    )
    assert msg.startswith("boms[1] (BOM P rev C) › revision: duplicate revision 'C' of 'P'")


def test_duplicate_material_is_refused() -> None:
    msg = one_problem({"materials": [material("A"), material("A")]})
    assert msg == "materials[1] (A) › id: duplicate material 'A'"


def test_two_revisions_in_effect_from_the_same_moment_are_refused() -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [
                bom("P", [line("A", "1")], revision="B"),
                bom("P", [line("A", "1")], revision="C"),
            ],
        }
    )
    assert "revisions 'B' and 'C' of 'P' are both in effect with no effective_from" in msg


@pytest.mark.parametrize("flag", ["potency_managed", "serialized"])
def test_backflush_of_a_potency_managed_or_serialized_material_is_refused(flag: str) -> None:
    msg = one_problem(
        {
            "materials": [material("API", uom="kg", increment="0.001", **{flag: True})],
            "boms": [bom("P", [line("API", "1", uom="kg")])],
        }
    )
    assert f"'backflush' is not allowed for {flag} material 'API'" in msg
    assert "lines[0] (API) › method" in msg


def test_weighing_a_potency_managed_material_is_allowed() -> None:
    md = master(
        [material("API", uom="kg", increment="0.001", potency_managed=True)],
        [bom("P", [line("API", "1", uom="kg", method="weigh", tolerance_pct="2")])],
    )
    assert md.bom("P").lines[0].method is PostingMethod.WEIGH


def test_weigh_line_needs_a_tolerance() -> None:
    msg = one_problem(
        {
            "materials": [material("A", uom="kg", increment="0.001")],
            "boms": [bom("P", [line("A", "1", uom="kg", method="weigh")])],
        }
    )
    assert "tolerance_pct: a 'weigh' line needs a tolerance_pct" in msg


def test_phantom_cycle_is_named() -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [
                bom("P", [line("Q", "1", phantom=True)]),
                bom("Q", [line("R", "1", phantom=True), line("A", "1")]),
                bom("R", [line("Q", "2", phantom=True)]),
            ],
        }
    )
    assert msg == "BOM Q › phantom cycle: Q → R → Q"


def test_phantom_self_reference_is_a_cycle() -> None:
    msg = one_problem({"boms": [bom("P", [line("P", "1", phantom=True)])]})
    assert msg == "BOM P › phantom cycle: P → P"


def test_phantom_without_a_bom_is_refused() -> None:
    msg = one_problem(
        {"materials": [material("A")], "boms": [bom("P", [line("PH", "1", phantom=True)])]}
    )
    assert "lines[0] (PH) › phantom: no BOM for phantom assembly 'PH'" in msg


def test_unknown_alternate_and_self_alternate_are_refused() -> None:
    found = problems(
        {
            "materials": [material("A")],
            "boms": [
                bom("P", [line("A", "1", alternates=["A", {"material": "Z", "factor": "2"}])])
            ],
        }
    )
    assert any("alternates[0] (A): a material cannot be its own alternate" in p for p in found)
    assert any("alternates[1] (Z): unknown material 'Z'" in p for p in found)


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        {
            "materials": [material("A"), material("B", uom="kg", increment="0.001")],
            "boms": [
                bom("P", [line("X", "1"), line("B", "1", uom="L")]),
                bom("Q", [line("Y", "1")]),
            ],
        }
    )
    assert len(found) == 3


def test_revision_in_effect_is_chosen_by_date() -> None:
    md = master(
        [material("A")],
        [
            bom("P", [line("A", "1")], revision="B", effective_from="2026-01-01"),
            bom("P", [line("A", "2")], revision="C", effective_from="2026-09-01T06:00:00+02:00"),
        ],
    )
    assert md.bom("P", as_of=datetime(2026, 9, 1, 3, 59, tzinfo=UTC)).revision == "B"
    assert md.bom("P", as_of=datetime(2026, 9, 1, 4, 0, tzinfo=UTC)).revision == "C"
    assert md.bom("P").revision == "C"
    assert md.bom("P", "B").revision == "B"
    with pytest.raises(MasterDataError, match=r"no revision 'X' of BOM 'P' \(revisions: B, C\)"):
        md.bom("P", "X")
    with pytest.raises(MasterDataError, match="no revision of BOM 'P' is in effect at 2025"):
        md.bom("P", as_of=datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(MasterDataError, match=r"no BOM for product 'Z' \(products: P\)"):
        md.bom("Z")


def test_loading_from_json_text_names_paths_too() -> None:
    text = json.dumps({"materials": [{"id": "A", "uom": "pc", "increment": "x"}]})
    with pytest.raises(MasterDataError) as exc:
        load_master_data(text)
    assert exc.value.problems[0].startswith("materials[0] (A) › increment:")


@pytest.mark.parametrize("bad", ["1_000", " 1", "١٢", "+", ".", "1.2.3", "0x10"])
def test_decimal_strings_are_plain_ascii_decimals(bad: str) -> None:
    msg = one_problem({"materials": [material("A", increment=bad)]})
    assert "must be a decimal string" in msg


@pytest.mark.parametrize("good", ["1", "+2", "0.5", ".5", "5.", "1e-3", "2E+1"])
def test_plain_decimal_forms_are_accepted(good: str) -> None:
    md = master([material("A", increment=good)], [])
    assert md.materials["A"].increment == Decimal(good)


def test_flags_are_json_booleans_not_words() -> None:
    msg = one_problem({"materials": [material("A", potency_managed="yes")]})
    assert msg.startswith("materials[0] (A) › potency_managed: Input should be a valid boolean")


def test_a_potency_managed_alternate_cannot_substitute_on_a_backflush_line() -> None:
    msg = one_problem(
        {
            "materials": [material("A"), material("API", potency_managed=True)],
            "boms": [bom("P", [line("A", "1", alternates=["API"])])],
        }
    )
    assert "alternates[0] (API): potency_managed material 'API' cannot substitute" in msg


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"method": "weigh"}, "method"),
        ({"alternates": ["A"]}, "alternates"),
        ({"tolerance_pct": "1"}, "tolerance_pct"),
    ],
)
def test_a_phantom_line_carries_no_posting_fields(extra: dict[str, Any], named: str) -> None:
    msg = one_problem(
        {
            "materials": [material("A")],
            "boms": [
                bom("P", [line("PH", "1", phantom=True, **extra)]),
                bom("PH", [line("A", "1")]),
            ],
        }
    )
    assert msg.startswith("boms[0] (BOM P rev A) › lines[0] (PH): a phantom line is exploded")
    assert named in msg


def test_merging_master_data_adds_and_never_changes_a_revision() -> None:
    bom_b = {"product": "FG", "revision": "B", "uom": "pc", "lines": [{"material": "M"}]}
    current = {"materials": [{"id": "M", "uom": "kg"}], "boms": [bom_b]}
    bom_c = {**bom_b, "revision": "C"}
    merged = merge_master_doc(
        current, {"boms": [bom_c, bom_b], "materials": [{"id": "N", "uom": "pc"}]}
    )
    assert [b["revision"] for b in merged["boms"]] == ["B", "C"]
    assert [m["id"] for m in merged["materials"]] == ["M", "N"]
    assert current["boms"] == [bom_b]  # the input is not changed
    for update, names in (
        ({"boms": [{**bom_b, "uom": "kg"}]}, "revision B of FG is already known"),
        ({"materials": [{"id": "M", "uom": "g"}]}, "issue unit never changes"),
        ({"recipes": []}, "master_data.recipes: unknown field"),
    ):
        with pytest.raises(MasterDataError, match=names):
            merge_master_doc(current, update)
