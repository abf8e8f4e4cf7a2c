"""BOM explosion: phantoms at any depth multiply out to the flattened product of quantities."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import load_master_data

from .builders import NOW, bom, line, master, material

D = Decimal


@st.composite
def phantom_trees(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Fraction]]:
    """A random tree of phantom assemblies over leaf materials, and each leaf's expected rate
    (the product of quantity / base quantity × (1 + scrap %) along every path, summed)."""
    leaves = [f"L{i}" for i in range(draw(st.integers(1, 4)))]
    boms: list[dict[str, Any]] = []
    expected: dict[str, Fraction] = {}
    counter = iter(range(1000))

    def build(depth: int, multiplier: Fraction) -> str:
        name = f"PH{next(counter)}"
        base = draw(st.sampled_from(["1", "2", "3", "10", "0.5"]))
        lines = []
        for _ in range(draw(st.integers(1, 3))):
            qty = draw(st.sampled_from(["1", "2", "0.5", "0.125", "3", "7.5"]))
            scrap = draw(st.sampled_from(["0", "0", "5", "12.5"]))
            rate = multiplier * Fraction(qty) / Fraction(base) * (1 + Fraction(scrap) / 100)
            if depth < 3 and draw(st.booleans()):
                child = build(depth + 1, rate)
                lines.append(line(child, qty, phantom=True, scrap_pct=scrap))
            else:
                leaf = draw(st.sampled_from(leaves))
                expected[leaf] = expected.get(leaf, Fraction(0)) + rate
                lines.append(line(leaf, qty, scrap_pct=scrap))
        boms.append(bom(name, lines, base_quantity=base))
        return name

    top = build(0, Fraction(1))
    return {"top": top, "materials": [material(m) for m in leaves], "boms": boms}, expected


@given(phantom_trees())
def test_explode_equals_the_flattened_product_of_quantities(
    case: tuple[dict[str, Any], dict[str, Fraction]],
) -> None:
    doc, expected = case
    md = load_master_data({"materials": doc["materials"], "boms": doc["boms"]})
    exploded = explode(md, md.bom(doc["top"]))
    assert {c.material: c.rate for c in exploded.components} == expected
    # a phantom's components are consumed at the top line's operation
    assert {c.operation for c in exploded.components} == {"10"}


def test_phantom_setup_explodes_into_its_components_and_adds_their_own() -> None:
    md = master(
        [material("CAP"), material("GLUE", uom="kg", increment="0.001")],
        [
            bom("FG", [line("CL", "1", phantom=True, setup_quantity="10")]),
            bom(
                "CL",
                [
                    line("CAP", "1"),
                    line("GLUE", "2", uom="g", setup_quantity="0.1", scrap_pct="50"),
                ],
            ),
        ],
    )
    (cap, glue) = explode(md, md.bom("FG")).components
    assert (cap.rate, cap.setup) == (1, 10)  # 10 closures of setup → 10 caps
    # 2 g × 1.5 per closure; setup: 10 closures × 3 g + its own 0.1 g (the line's unit)
    assert (glue.rate, glue.setup) == (Fraction("0.003"), Fraction("0.03") + Fraction("0.0001"))


def test_same_material_at_the_same_operation_is_merged_for_one_rounding_carry() -> None:
    md = master(
        [material("SCREW", rounding="up")],
        [
            bom("FG", [line("SCREW", "0.5"), line("SUB", "1", phantom=True)]),
            bom("SUB", [line("SCREW", "0.5")]),
        ],
    )
    (screw,) = explode(md, md.bom("FG")).components
    assert screw.rate == 1
    assert len(screw.origin) == 2


def test_phantom_sub_bom_revision_follows_effectivity() -> None:
    md = master(
        [material("A"), material("B")],
        [
            bom("FG", [line("PH", "1", phantom=True)]),
            bom("PH", [line("A", "1")], revision="1", effective_from="2026-01-01"),
            bom("PH", [line("B", "1")], revision="2", effective_from="2027-01-01"),
        ],
    )
    assert [c.material for c in explode(md, md.bom("FG"), NOW).components] == ["A"]
    assert [c.material for c in explode(md, md.bom("FG")).components] == ["B"]


def test_phantom_line_in_another_unit_converts_into_the_sub_bom() -> None:
    md = master(
        [
            material("PREMIX", uom="kg", increment="0.001", density="1.25"),
            material("SUGAR", uom="kg", increment="0.001"),
        ],
        [
            bom("FG", [line("PREMIX", "2", uom="L", phantom=True)]),
            bom("PREMIX", [line("SUGAR", "400", uom="g")], uom="kg"),
        ],
    )
    (sugar,) = explode(md, md.bom("FG")).components
    assert sugar.rate == Fraction("2.5") * Fraction("0.4")  # 2 L = 2.5 kg premix
