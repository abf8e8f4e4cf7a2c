"""BOM explosion: a BOM revision flattened into the components each operation consumes.

Phantom lines are exploded through their sub-BOM at any depth, multiplying quantities; every line
is converted to its material's issue unit and folded with its component scrap into one exact rate
per unit of product. Components of a phantom are consumed at the phantom line's operation (the
sub-BOM's own operations apply only when that assembly is built on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from edge_agent.domain.masterdata import (
    Alternate,
    Bom,
    BomLine,
    MasterData,
    PostingMethod,
)
from edge_agent.domain.quantities import conversion_factor

#: (operation, material, posting method): what rounding is carried per, on one order
ComponentKey = tuple[str, str, PostingMethod]


@dataclass(frozen=True, slots=True)
class Component:
    """What one operation consumes of one material, per unit of the product.

    ``rate`` is in the material's issue unit per unit of the BOM's unit and includes component
    scrap; ``setup`` is in the issue unit, once per order and operation.
    """

    operation: str
    material: str
    uom: str
    method: PostingMethod
    rate: Fraction
    setup: Fraction
    alternates: tuple[Alternate, ...] = ()
    tolerance_pct: Decimal | None = None
    #: the BOM lines it came from, e.g. ``("FG-100 rev C line 3", "PH-1 rev A line 1")``
    origin: tuple[tuple[str, ...], ...] = ()

    @property
    def key(self) -> ComponentKey:
        return (self.operation, self.material, self.method)


@dataclass(frozen=True, slots=True)
class ExplodedBom:
    product: str
    revision: str
    uom: str
    components: tuple[Component, ...]

    @property
    def ref(self) -> str:
        return f"{self.product} rev {self.revision}"

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.operation for c in self.components))

    def for_operation(self, operation: str) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.operation == operation)

    def component(
        self, operation: str, material: str, method: PostingMethod | None = None
    ) -> Component | None:
        for c in self.components:
            if (
                c.operation == operation
                and c.material == material
                and (method is None or c.method is method)
            ):
                return c
        return None


def explode(master: MasterData, bom: Bom, as_of: datetime | None = None) -> ExplodedBom:
    """Flatten ``bom``; phantom sub-BOMs are the revisions in effect at ``as_of``.

    Components with the same operation, material and posting method are merged (their rates and
    setups add), because rounding is carried per order, operation and material.
    """
    leaves = _flatten(master, bom, Fraction(1), Fraction(0), None, (), as_of)
    merged: dict[ComponentKey, Component] = {}
    for leaf in leaves:
        prior = merged.get(leaf.key)
        if prior is None:
            merged[leaf.key] = leaf
            continue
        alternates = prior.alternates + tuple(
            a for a in leaf.alternates if a.material not in {p.material for p in prior.alternates}
        )
        tolerances = [t for t in (prior.tolerance_pct, leaf.tolerance_pct) if t is not None]
        merged[leaf.key] = replace(
            prior,
            rate=prior.rate + leaf.rate,
            setup=prior.setup + leaf.setup,
            alternates=alternates,
            tolerance_pct=min(tolerances) if tolerances else None,
            origin=prior.origin + leaf.origin,
        )
    return ExplodedBom(bom.product, bom.revision, bom.uom, tuple(merged.values()))


def _flatten(
    master: MasterData,
    bom: Bom,
    multiplier: Fraction,
    setup_multiplier: Fraction,
    operation: str | None,
    path: tuple[str, ...],
    as_of: datetime | None,
) -> list[Component]:
    """Leaves of ``bom``, with every quantity scaled by ``multiplier`` units of ``bom.uom``.

    ``setup_multiplier`` is the fixed (setup) quantity of this assembly that the parents require
    once per order and operation; it scales the running rates of this BOM's lines.
    """
    out: list[Component] = []
    for line in bom.lines:
        here = (*path, f"{bom.ref} line {line.position}")
        per_unit = _line_rate(line, bom)
        op = operation if operation is not None else line.operation
        if line.phantom:
            sub = master.bom(line.material, as_of=as_of)
            density = (
                master.materials[line.material].density
                if line.material in master.materials
                else None
            )
            into_sub = conversion_factor(line.uom, sub.uom, density)
            out += _flatten(
                master,
                sub,
                multiplier * per_unit * into_sub,
                (setup_multiplier * per_unit + Fraction(line.setup_quantity)) * into_sub,
                op,
                here,
                as_of,
            )
            continue
        material = master.materials[line.material]
        to_issue = conversion_factor(line.uom, material.uom, material.density)
        out.append(
            Component(
                operation=op,
                material=line.material,
                uom=material.uom,
                method=line.method,
                rate=multiplier * per_unit * to_issue,
                setup=(setup_multiplier * per_unit + Fraction(line.setup_quantity)) * to_issue,
                alternates=line.alternates,
                tolerance_pct=line.tolerance_pct,
                origin=(here,),
            )
        )
    return out


def _line_rate(line: BomLine, bom: Bom) -> Fraction:
    """Line quantity per one unit of the BOM's unit, with component scrap."""
    return (
        Fraction(line.quantity) / Fraction(bom.base_quantity) * (1 + Fraction(line.scrap_pct) / 100)
    )
