"""Consumption: confirmations, meter readings and weighings → exact component postings.

Rounding to a material's issue increment is applied to the **cumulative** theoretical quantity
per order, operation and material; each posting is the difference from what was already issued.
So rounding never creates or loses material: over an order, the postings add up to the rounded
cumulative theoretical quantity, whatever the sequence of confirmations (corrections included).

The carried state is an immutable value: the caller persists it and passes it back in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Any, TypeVar

from edge_agent.domain.explosion import Component, ComponentKey, ExplodedBom
from edge_agent.domain.masterdata import MasterData, PostingMethod, parse_decimal
from edge_agent.domain.quantities import Exact, convert, fmt, round_to_increment
from edge_agent.errors import ConsumptionError

ZERO = Decimal(0)

#: Version of the consumption rules, named in every posting so a posting can be re-derived.
RULE_VERSION = "backflush-1"


@dataclass(frozen=True, slots=True)
class OperationProgress:
    """Cumulative confirmed quantities of one operation on one order."""

    good: Decimal = ZERO
    scrap: Decimal = ZERO
    confirmations: int = 0

    @property
    def counted(self) -> Decimal:
        return self.good + self.scrap


@dataclass(frozen=True, slots=True)
class ComponentProgress:
    """What has been issued of one component; ``measured`` is the cumulative actual quantity
    (issue unit, exact) of a ``meter`` or ``weigh`` component."""

    issued: Decimal = ZERO
    measured: Fraction = Fraction(0)


K = TypeVar("K")
V = TypeVar("V")


def _frozen(d: Mapping[K, V]) -> Mapping[K, V]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class ConsumptionState:
    """The rounding carry and progress of one order: small, immutable, persisted by the caller."""

    operations: Mapping[str, OperationProgress] = field(default_factory=lambda: _frozen({}))
    components: Mapping[ComponentKey, ComponentProgress] = field(
        default_factory=lambda: _frozen({})
    )

    def operation(self, operation: str) -> OperationProgress:
        return self.operations.get(operation, OperationProgress())

    def component(self, key: ComponentKey) -> ComponentProgress:
        return self.components.get(key, ComponentProgress())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form with decimal strings, for the caller to persist."""
        return {
            "operations": {
                op: {"good": str(p.good), "scrap": str(p.scrap), "confirmations": p.confirmations}
                for op, p in self.operations.items()
            },
            "components": [
                {
                    "operation": op,
                    "material": material,
                    "method": method.value,
                    "issued": str(p.issued),
                    "measured": str(p.measured),
                }
                for (op, material, method), p in self.components.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConsumptionState:
        ops = {
            op: OperationProgress(
                parse_decimal(p["good"]), parse_decimal(p["scrap"]), int(p["confirmations"])
            )
            for op, p in data.get("operations", {}).items()
        }
        comps = {
            (c["operation"], c["material"], PostingMethod(c["method"])): ComponentProgress(
                parse_decimal(c["issued"]), Fraction(c["measured"])
            )
            for c in data.get("components", [])
        }
        return cls(_frozen(ops), _frozen(comps))


@dataclass(frozen=True, slots=True)
class ComponentPosting:
    """One component's posting: ``quantity`` may be zero (carried rounding) or negative
    (a confirmation corrected downward); ``theoretical`` is cumulative and unrounded."""

    component: Component
    quantity: Decimal
    theoretical: Fraction
    issued: Decimal  # cumulative, after this posting
    setup_included: bool = False

    @property
    def material(self) -> str:
        return self.component.material

    @property
    def uom(self) -> str:
        return self.component.uom


@dataclass(frozen=True, slots=True)
class Confirmation:
    """The effect of one confirmation: new state and one posting per backflush component."""

    state: ConsumptionState
    operation: str
    progress: OperationProgress
    postings: tuple[ComponentPosting, ...]


def theoretical(component: Component, progress: OperationProgress) -> Fraction:
    """Cumulative theoretical consumption: (good + scrap) × rate, plus setup once confirmed."""
    setup = component.setup if progress.confirmations > 0 else Fraction(0)
    return Fraction(progress.counted) * component.rate + setup


def _issue(
    master: MasterData, component: Component, target: Fraction, before: ComponentProgress
) -> tuple[Decimal, Decimal]:
    material = master.materials[component.material]
    issued = round_to_increment(target, material.increment, material.rounding)
    return issued, issued - before.issued


def confirm(
    master: MasterData,
    bom: ExplodedBom,
    state: ConsumptionState,
    operation: str,
    good: Decimal,
    scrap: Decimal = ZERO,
) -> Confirmation:
    """Apply a confirmation delta (good Δ, scrap Δ) at ``operation``.

    Every ``backflush`` line of the operation consumes for good + scrap (scrap consumed material
    too), with its component scrap, plus its setup quantity at the operation's first confirmation.
    A negative delta (a correction) gives compensating negative postings; it may not take the
    cumulative good or scrap below zero. ``weigh``, ``meter`` and ``manual`` lines are not posted
    from a count.
    """
    for name, value in (("good", good), ("scrap", scrap)):
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ConsumptionError(f"{name} must be a finite Decimal (got {value!r})")
    before = state.operation(operation)
    after = OperationProgress(before.good + good, before.scrap + scrap, before.confirmations + 1)
    for name, total, delta in (("good", after.good, good), ("scrap", after.scrap, scrap)):
        if total < 0:
            raise ConsumptionError(
                f"operation {operation}: a {name} correction of {delta} would take the confirmed "
                f"{name} quantity below zero (confirmed so far: {total - delta})"
            )
    postings = []
    components = dict(state.components)
    for component in bom.for_operation(operation):
        if component.method is not PostingMethod.BACKFLUSH:
            continue
        prior = state.component(component.key)
        target = theoretical(component, after)
        issued, quantity = _issue(master, component, target, prior)
        components[component.key] = replace(prior, issued=issued)
        postings.append(
            ComponentPosting(
                component,
                quantity,
                target,
                issued,
                setup_included=before.confirmations == 0 and component.setup != 0,
            )
        )
    operations = dict(state.operations)
    operations[operation] = after
    new_state = ConsumptionState(_frozen(operations), _frozen(components))
    return Confirmation(new_state, operation, after, tuple(postings))


def meter(
    master: MasterData,
    state: ConsumptionState,
    component: Component,
    delta: Exact,
    uom: str,
) -> tuple[ConsumptionState, ComponentPosting]:
    """Post a flow-meter totalizer delta (in ``uom``; exact, e.g. a time slice's interpolated
    quantity) for a ``meter`` component.

    The delta is converted exactly to the issue unit and accumulated; rounding is carried on the
    cumulative metered quantity, so the postings add up to the rounded metered total.
    """
    if component.method is not PostingMethod.METER:
        raise ConsumptionError(
            f"material {component.material} at operation {component.operation} is posted by "
            f"{component.method.value!r}, not by meter"
        )
    return _measured(master, state, component, delta, uom)


def _measured(
    master: MasterData,
    state: ConsumptionState,
    component: Component,
    amount: Exact,
    uom: str,
) -> tuple[ConsumptionState, ComponentPosting]:
    material = master.materials[component.material]
    prior = state.component(component.key)
    measured = prior.measured + convert(amount, uom, material.uom, material.density)
    if measured < 0:
        raise ConsumptionError(
            f"material {component.material}: a correction of {fmt(amount)} {uom} would take the "
            f"measured quantity below zero"
        )
    issued, quantity = _issue(master, component, measured, prior)
    components = dict(state.components)
    components[component.key] = ComponentProgress(issued, measured)
    new_state = ConsumptionState(state.operations, _frozen(components))
    return new_state, ComponentPosting(component, quantity, measured, issued)


class WeighingRejection(StrEnum):
    UNSTABLE = "unstable"
    NOT_POSITIVE = "not_positive"
    OUT_OF_TOLERANCE = "out_of_tolerance"


@dataclass(frozen=True, slots=True)
class ScaleReading:
    """A scale indicator reading: gross and tare in ``uom``; net is gross − tare."""

    gross: Decimal
    tare: Decimal
    uom: str
    stable: bool

    @property
    def net(self) -> Decimal:
        return self.gross - self.tare


@dataclass(frozen=True, slots=True)
class WeighingOutcome:
    """A weighing: accepted with a posting, or rejected with the reason and the figures."""

    state: ConsumptionState
    reading: ScaleReading
    target: Decimal
    net: Fraction  # in the material's issue unit
    deviation_pct: Fraction | None
    posting: ComponentPosting | None
    rejection: WeighingRejection | None = None

    @property
    def accepted(self) -> bool:
        return self.posting is not None


def weigh(
    master: MasterData,
    state: ConsumptionState,
    component: Component,
    reading: ScaleReading,
    target: Decimal,
) -> WeighingOutcome:
    """Accept a scale reading for a ``weigh`` component and post its actual net quantity.

    Accepted only when stable, positive net of tare, and within the line's tolerance of
    ``target`` (issue unit). A rejected reading posts nothing and leaves the state unchanged.
    """
    if component.method is not PostingMethod.WEIGH:
        raise ConsumptionError(
            f"material {component.material} at operation {component.operation} is posted by "
            f"{component.method.value!r}, not by weighing"
        )
    material = master.materials[component.material]
    net = convert(reading.net, reading.uom, material.uom, material.density)
    deviation = (net - Fraction(target)) / Fraction(target) * 100 if target else None
    tolerance = Fraction(component.tolerance_pct or 0)

    def reject(why: WeighingRejection) -> WeighingOutcome:
        return WeighingOutcome(state, reading, target, net, deviation, None, why)

    if not reading.stable:
        return reject(WeighingRejection.UNSTABLE)
    if net <= 0:
        return reject(WeighingRejection.NOT_POSITIVE)
    if deviation is None or abs(deviation) > tolerance:
        return reject(WeighingRejection.OUT_OF_TOLERANCE)
    new_state, posting = _measured(master, state, component, reading.net, reading.uom)
    return WeighingOutcome(new_state, reading, target, net, deviation, posting)


def weighing_target(component: Component, quantity: Decimal, with_setup: bool) -> Fraction:
    """The theoretical weight for producing ``quantity`` of the product (issue unit)."""
    return Fraction(quantity) * component.rate + (component.setup if with_setup else 0)
