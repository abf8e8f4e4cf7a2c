"""Order-close variance: planned, theoretical, issued and actual per component.

- planned: order quantity × BOM (with component scrap and setup);
- theoretical: what the confirmed good + scrap imply;
- issued: what the agent posted to lots (primary material), plus what alternates covered;
- actual: issued less the remnants returned at close, when the returns are known.

Variance is actual (or issued) − theoretical; a component is flagged when its variance % exceeds
the threshold in either direction. Substitutions are reported separately as mix variance.
``manual`` components are left out: their issues are made in the MES, not by the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from edge_agent.domain.backflush import ConsumptionState, theoretical
from edge_agent.domain.explosion import ComponentKey, ExplodedBom
from edge_agent.domain.lots import BindingState
from edge_agent.domain.masterdata import MasterData, PostingMethod

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Substitution:
    """An alternate drawn in place of the primary: ``covers`` is in the primary's unit."""

    material: str
    covers: Decimal
    quantity: Decimal
    uom: str


@dataclass(frozen=True, slots=True)
class ComponentVariance:
    operation: str
    material: str
    uom: str
    method: PostingMethod
    planned: Fraction
    theoretical: Fraction
    issued: Decimal  # primary material drawn from lots (or posted, without lot binding)
    substituted: Decimal  # primary-unit quantity covered by alternates
    held: Decimal  # posted requirement still waiting for a lot
    returned: Decimal | None
    actual: Decimal | None
    variance: Fraction
    variance_pct: Fraction | None
    flagged: bool
    substitutions: tuple[Substitution, ...] = ()


def close_variance(
    master: MasterData,
    bom: ExplodedBom,
    consumption: ConsumptionState,
    order_quantity: Decimal,
    threshold_pct: Decimal,
    bindings: Mapping[ComponentKey, BindingState] | None = None,
    returned: Mapping[str, Decimal] | None = None,
    residual: Mapping[str, Decimal] | None = None,
    actual_issues: Mapping[ComponentKey, Decimal] | None = None,
) -> tuple[ComponentVariance, ...]:
    """Variance of every auto-posted component of an order at close.

    ``returned``: remnants returned of what was issued (actual = issued − returned);
    ``residual``: material gone from lots without a posting, per material (the agent's lot
    balance less the remnant counted at close: actual = issued + residual);
    ``actual_issues``: for a component backflushed in shadow (a pilot), what was really issued
    (scanned or weighed): its stock movement, in place of the shadow postings.
    """
    out = []
    for component in bom.components:
        if component.method is PostingMethod.MANUAL:
            continue
        progress = consumption.operation(component.operation)
        setup = component.setup if order_quantity > 0 else Fraction(0)
        planned = Fraction(order_quantity) * component.rate + setup
        theo = theoretical(component, progress)
        posted = consumption.component(component.key).issued
        binding = (bindings or {}).get(component.key)
        substitutions: list[Substitution] = []
        shadowed = (actual_issues or {}).get(component.key)
        if shadowed is not None:
            issued, substituted, held = shadowed, ZERO, ZERO
        elif binding is None:
            issued, substituted, held = posted, ZERO, ZERO
        else:
            issued = sum(
                (f.covers for f in binding.fills if f.material == component.material), ZERO
            )
            held = binding.held
            for alt, covers in binding.substituted.items():
                if covers:
                    alt_material = master.materials[alt]
                    substitutions.append(
                        Substitution(alt, covers, binding.alternate_issued[alt], alt_material.uom)
                    )
            substituted = sum((s.covers for s in substitutions), ZERO)
        back = (returned or {}).get(component.material)
        gone = (residual or {}).get(component.material)
        if gone is not None:
            back = -gone if back is None else back - gone
        actual = issued + substituted - back if back is not None else None
        used = actual if actual is not None else issued + substituted
        variance = Fraction(used) - theo
        pct = variance / theo * 100 if theo else None
        flagged = (abs(pct) > Fraction(threshold_pct)) if pct is not None else variance != 0
        out.append(
            ComponentVariance(
                component.operation,
                component.material,
                component.uom,
                component.method,
                planned,
                theo,
                issued,
                substituted,
                held,
                back,
                actual,
                variance,
                pct,
                flagged,
                tuple(substitutions),
            )
        )
    return tuple(out)
