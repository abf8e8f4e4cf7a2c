"""Lot binding: a component posting drawn from the lots staged for the order, or held.

Lots are drawn FEFO (first expiry first; lots without expiry last), then FIFO by staging time,
splitting across lots when one runs out. Expired, quarantined and blocked lots are never drawn and
no lot goes below zero. What no eligible lot covers is **held** with a reason, never dropped; the
caller raises an exception and retries it (:func:`retry_held`) when a lot is staged.

When the primary material has no eligible stock left, the first alternate whose eligible stock
covers the rest is drawn, converted by its factor and marked as a substitution (the order close
reports it as mix variance). Rounding of the alternate to its own increment is carried like any
other rounding. A negative posting (a correction) first cancels held quantity, then returns
material to the lots it was drawn from, last drawn first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.domain.masterdata import (
    Alternate,
    DecimalStr,
    MasterData,
    Timestamp,
    parse_decimal,
    parse_document,
    parse_timestamp,
)
from edge_agent.domain.quantities import conversion_factor, round_to_increment
from edge_agent.errors import ConsumptionError, LotDataError

ZERO = Decimal(0)


class LotStatus(StrEnum):
    RELEASED = "released"
    QUARANTINED = "quarantined"
    BLOCKED = "blocked"


class HoldReason(StrEnum):
    NO_STAGE = "no_stage"
    EXPIRED = "expired"
    QUARANTINED = "quarantined"
    BLOCKED = "blocked"
    INSUFFICIENT = "insufficient"
    SINGLE_LOT_DEVIATION = "single_lot_deviation"


@dataclass(frozen=True, slots=True)
class Lot:
    """A material lot staged for the order/line; ``quantity`` is what remains, in the
    material's issue unit. A lot is expired from its ``expiry`` moment on."""

    lot: str
    material: str
    quantity: Decimal
    staged_at: datetime
    expiry: datetime | None = None
    status: LotStatus = LotStatus.RELEASED
    #: staged for one order / one work centre only (None: any)
    order: str | None = None
    work_centre: str | None = None

    def serves(self, order: str | None, work_centre: str | None) -> bool:
        """Whether the lot is staged where ``order`` runs on ``work_centre``."""
        return (self.order is None or self.order == order) and (
            self.work_centre is None or self.work_centre == work_centre
        )

    def is_expired(self, now: datetime) -> bool:
        return self.expiry is not None and now >= self.expiry

    def is_eligible(self, now: datetime) -> bool:
        return self.status is LotStatus.RELEASED and not self.is_expired(now) and self.quantity > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (decimal strings, ISO-8601 times) for the caller to persist."""
        return {
            "lot": self.lot,
            "material": self.material,
            "quantity": str(self.quantity),
            "staged_at": self.staged_at.isoformat(),
            "expiry": self.expiry.isoformat() if self.expiry else None,
            "status": self.status.value,
            "order": self.order,
            "work_centre": self.work_centre,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lot:
        return cls(
            data["lot"],
            data["material"],
            parse_decimal(data["quantity"]),
            parse_timestamp(data["staged_at"]),
            parse_timestamp(data["expiry"]) if data.get("expiry") else None,
            LotStatus(data["status"]),
            data.get("order"),
            data.get("work_centre"),
        )


def fefo_order(lots: Iterable[Lot]) -> list[Lot]:
    """First expiry first (no expiry last), then first staged first, then by lot id."""
    return sorted(
        lots,
        key=lambda lot: (lot.expiry is None, lot.expiry or lot.staged_at, lot.staged_at, lot.lot),
    )


@dataclass(frozen=True, slots=True)
class LotDraw:
    """A movement against one lot: positive draws, negative returns."""

    lot: str
    material: str
    quantity: Decimal
    substitution: bool = False


@dataclass(frozen=True, slots=True)
class Fill:
    """One allocation's share of the requirement: ``covers`` is in the primary's issue unit,
    ``draws`` in ``material``'s; what is still outstanding (net of returns)."""

    material: str
    covers: Decimal
    draws: tuple[LotDraw, ...]
    #: exact primary → ``material`` factor of a substitution (1 for the primary itself)
    factor: Fraction = Fraction(1)


@dataclass(frozen=True, slots=True)
class BindingState:
    """Lot binding of one component (order, operation, primary material), carried by the
    caller: what each allocation drew, what is held, and the substitution rounding carry."""

    fills: tuple[Fill, ...] = ()
    held: Decimal = ZERO
    substituted: Mapping[str, Decimal] = field(default_factory=lambda: MappingProxyType({}))
    alternate_issued: Mapping[str, Decimal] = field(default_factory=lambda: MappingProxyType({}))
    #: the part of ``held`` that may only come from one lot (a continuous feed's material
    #: that passed the meter from that lot while it was not eligible)
    held_lots: Mapping[str, Decimal] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def held_any_lot(self) -> Decimal:
        """Held quantity that any eligible lot may cover (FEFO)."""
        return self.held - sum(self.held_lots.values(), ZERO)

    @property
    def drawn(self) -> Decimal:
        """Primary-unit quantity currently bound to lots (primary and substitutes)."""
        return sum((f.covers for f in self.fills), ZERO)

    def given_by_lot(self) -> dict[tuple[str, str, bool], Decimal]:
        """What each lot gave, net of returns and reversals, by (material, lot, substitution);
        only lots that still give something (the order's genealogy)."""
        given: dict[tuple[str, str, bool], Decimal] = {}
        for fill in self.fills:
            for d in fill.draws:
                key = (d.material, d.lot, d.substitution)
                given[key] = given.get(key, ZERO) + d.quantity
        return {key: quantity for key, quantity in given.items() if quantity > 0}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (decimal strings, exact fractions as "p/q") to persist."""
        return {
            "fills": [
                {
                    "material": f.material,
                    "covers": str(f.covers),
                    "factor": str(f.factor),
                    "draws": [
                        [d.lot, d.material, str(d.quantity), d.substitution] for d in f.draws
                    ],
                }
                for f in self.fills
            ],
            "held": str(self.held),
            "substituted": {k: str(v) for k, v in self.substituted.items()},
            "alternate_issued": {k: str(v) for k, v in self.alternate_issued.items()},
            "held_lots": {k: str(v) for k, v in self.held_lots.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BindingState:
        fills: list[Fill] = []
        for f in data.get("fills", []):  # a store written before fills were merged: merge now
            _add_fill(
                fills,
                Fill(
                    f["material"],
                    parse_decimal(f["covers"]),
                    tuple(
                        LotDraw(lot, material, parse_decimal(q), bool(sub))
                        for lot, material, q, sub in f["draws"]
                    ),
                    Fraction(f["factor"]),
                ),
            )
        return cls(
            tuple(fills),
            parse_decimal(data.get("held", "0")),
            MappingProxyType({k: parse_decimal(v) for k, v in data.get("substituted", {}).items()}),
            MappingProxyType(
                {k: parse_decimal(v) for k, v in data.get("alternate_issued", {}).items()}
            ),
            MappingProxyType({k: parse_decimal(v) for k, v in data.get("held_lots", {}).items()}),
        )


@dataclass(frozen=True, slots=True)
class Held:
    quantity: Decimal
    reason: HoldReason
    detail: str


@dataclass(frozen=True, slots=True)
class Binding:
    """The result of binding a posting: new state and lot balances, the movements, and what
    was newly held (``held``) or cancelled from held (``held_cancelled``)."""

    state: BindingState
    lots: tuple[Lot, ...]
    draws: tuple[LotDraw, ...]
    held: Held | None = None
    held_cancelled: Decimal = ZERO

    @property
    def substitution(self) -> bool:
        return any(d.substitution for d in self.draws)


def bind(
    master: MasterData,
    lots: Sequence[Lot],
    state: BindingState,
    material: str,
    quantity: Decimal,
    now: datetime,
    alternates: Sequence[Alternate] = (),
) -> Binding:
    """Bind a posting of ``quantity`` (primary issue unit) of ``material`` to staged lots."""
    if quantity > 0:
        return _allocate(master, lots, state, material, quantity, now, alternates)
    if quantity < 0:
        return _reverse(master, lots, state, material, -quantity)
    return Binding(state, tuple(lots), ())


def retry_held(
    master: MasterData,
    lots: Sequence[Lot],
    state: BindingState,
    material: str,
    now: datetime,
    alternates: Sequence[Alternate] = (),
) -> Binding:
    """Try again to bind what is held, e.g. after a lot was staged or released.

    What is held for one lot (``held_lots``) is drawn from that lot only, once it is eligible;
    the rest first-expiry-first like any posting. ``held_cancelled`` of the result is unused;
    what was bound is ``state.held - result.state.held``.
    """
    if state.held <= 0:
        return Binding(state, tuple(lots), ())
    by_id = {lot.lot: lot for lot in lots}
    fills = list(state.fills)
    movements: list[LotDraw] = []
    held_lots = dict(state.held_lots)
    for lot_id, quantity in list(held_lots.items()):
        lot = by_id.get(lot_id)
        if lot is None or not lot.is_eligible(now):
            continue
        draws = _draw(by_id, [lot], min(quantity, lot.quantity), False)
        taken = sum((d.quantity for d in draws), ZERO)
        _add_fill(fills, Fill(lot.material, taken, tuple(draws)))
        movements += draws
        if quantity - taken > 0:
            held_lots[lot_id] = quantity - taken
        else:
            del held_lots[lot_id]
    lot_bound = sum(held_lots.values(), ZERO)
    any_lot = state.held_any_lot
    interim = replace(
        state, fills=tuple(fills), held=lot_bound, held_lots=MappingProxyType(held_lots)
    )
    if any_lot <= 0:
        return Binding(interim, tuple(by_id.values()), tuple(movements))
    rest = _allocate(master, tuple(by_id.values()), interim, material, any_lot, now, alternates)
    return replace(rest, draws=(*movements, *rest.draws), held=None)


def _alternate_factor(master: MasterData, primary: str, alternate: Alternate) -> Fraction:
    alt = master.materials[alternate.material]
    return Fraction(alternate.factor) * conversion_factor(
        master.materials[primary].uom, alt.uom, alt.density
    )


def _draw(lots: dict[str, Lot], chosen: Sequence[Lot], amount: Decimal, sub: bool) -> list[LotDraw]:
    draws = []
    for lot in chosen:
        if amount <= 0:
            break
        take = min(lot.quantity, amount)
        lots[lot.lot] = replace(lot, quantity=lot.quantity - take)
        draws.append(LotDraw(lot.lot, lot.material, take, sub))
        amount -= take
    assert amount <= 0, "caller checked the lots cover the amount"
    return draws


def _allocate(
    master: MasterData,
    lots_in: Sequence[Lot],
    state: BindingState,
    material: str,
    quantity: Decimal,
    now: datetime,
    alternates: Sequence[Alternate],
) -> Binding:
    lots = {lot.lot: lot for lot in lots_in}
    fills = list(state.fills)
    movements: list[LotDraw] = []
    remaining = quantity
    primary = master.materials[material]
    eligible = fefo_order(
        lot for lot in lots.values() if lot.material == material and lot.is_eligible(now)
    )
    deviation = False
    if primary.single_lot_per_operation and eligible:
        used = {d.lot for f in fills if f.material == material for d in f.draws if d.quantity > 0}
        # once a lot is in use it is the only one; when it is gone a new lot is a second lot
        candidates = [lot for lot in eligible if lot.lot in used][:1] if used else eligible[:1]
        if candidates and candidates[0].quantity >= remaining:
            draws = _draw(lots, candidates[:1], remaining, False)
            _add_fill(fills, Fill(material, remaining, tuple(draws)))
            movements += draws
            remaining = ZERO
        else:
            deviation = True
    elif eligible:
        take = min(remaining, sum((lot.quantity for lot in eligible), ZERO))
        draws = _draw(lots, eligible, take, False)
        _add_fill(fills, Fill(material, take, tuple(draws)))
        movements += draws
        remaining -= take

    substituted = dict(state.substituted)
    alt_issued = dict(state.alternate_issued)
    if remaining > 0 and not deviation:
        for alternate in alternates:
            alt = master.materials[alternate.material]
            k = _alternate_factor(master, material, alternate)
            covered = substituted.get(alt.id, ZERO) + remaining
            target = round_to_increment(Fraction(covered) * k, alt.increment, alt.rounding)
            need = target - alt_issued.get(alt.id, ZERO)
            alt_lots = fefo_order(
                lot for lot in lots.values() if lot.material == alt.id and lot.is_eligible(now)
            )
            if alt.single_lot_per_operation:
                alt_lots = alt_lots[:1]
            if sum((lot.quantity for lot in alt_lots), ZERO) < need:
                continue
            draws = _draw(lots, alt_lots, need, True)
            _add_fill(fills, Fill(alt.id, remaining, tuple(draws), k))
            movements += draws
            substituted[alt.id] = covered
            alt_issued[alt.id] = target
            remaining = ZERO
            break

    held = None
    if remaining > 0:
        reason, detail = _hold_reason(master, lots.values(), material, alternates, now, deviation)
        held = Held(remaining, reason, detail)
    new_state = replace(
        state,
        fills=tuple(fills),
        held=state.held + remaining,
        substituted=MappingProxyType(substituted),
        alternate_issued=MappingProxyType(alt_issued),
    )
    return Binding(new_state, tuple(lots.values()), tuple(movements), held)


def _add_fill(fills: list[Fill], fill: Fill) -> None:
    """Append ``fill``, merged into the last one when both are of one material and factor.

    Without this the binding grew by one fill per posting, and the order's state (written at
    every commit) with it: the cost of a count grew with the order's length. Merging is exact:
    every use of the fills (returns last drawn first, a reversal by posting, ``drawn``, the lots
    in use, genealogy) reads the draws of one material in order and the sum of ``covers``,
    which a merge keeps; adjacent draws of one lot become one draw of their sum.
    """
    if fills and fills[-1].material == fill.material and fills[-1].factor == fill.factor:
        last = fills[-1]
        draws = list(last.draws)
        for d in fill.draws:
            prior = draws[-1] if draws else None
            if prior is not None and (prior.lot, prior.material, prior.substitution) == (
                d.lot,
                d.material,
                d.substitution,
            ):
                draws[-1] = replace(prior, quantity=prior.quantity + d.quantity)
            else:
                draws.append(d)
        fills[-1] = Fill(last.material, last.covers + fill.covers, tuple(draws), last.factor)
    else:
        fills.append(fill)


def _hold_reason(
    master: MasterData,
    lots: Iterable[Lot],
    material: str,
    alternates: Sequence[Alternate],
    now: datetime,
    deviation: bool,
) -> tuple[HoldReason, str]:
    staged = [lot for lot in lots if lot.material == material]
    if deviation:
        return HoldReason.SINGLE_LOT_DEVIATION, (
            f"{material} is single-lot per operation and the lot in use cannot cover the "
            "requirement: a second lot needs a deviation"
        )
    alt_note = (
        f"; no alternate ({', '.join(a.material for a in alternates)}) covers the rest"
        if alternates
        else ""
    )
    if not staged:
        return HoldReason.NO_STAGE, f"no lot of {material} is staged{alt_note}"
    with_stock = [lot for lot in staged if lot.quantity > 0]
    blocked = [lot for lot in with_stock if not lot.is_eligible(now)]
    if not with_stock or len(blocked) < len(with_stock):
        return HoldReason.INSUFFICIENT, f"staged lots of {material} are used up{alt_note}"

    def cause(lot: Lot) -> str:
        return "expired" if lot.is_expired(now) else lot.status.value

    listed = ", ".join(f"{lot.lot} {cause(lot)}" for lot in blocked)
    # the reason is the most actionable cause: an expired lot first, then a quarantined one
    for reason in (HoldReason.EXPIRED, HoldReason.QUARANTINED, HoldReason.BLOCKED):
        if any(cause(lot) == reason.value for lot in blocked):
            return reason, f"the lots of {material} with stock are not usable: {listed}{alt_note}"
    raise AssertionError("a lot with stock that is not eligible is expired or not released")


def _reverse(
    master: MasterData,
    lots_in: Sequence[Lot],
    state: BindingState,
    material: str,
    amount: Decimal,
) -> Binding:
    lots = {lot.lot: lot for lot in lots_in}
    cancelled = min(amount, state.held)
    amount -= cancelled
    if amount > state.drawn:
        raise ConsumptionError(
            f"a return of {amount} {master.materials[material].uom} of {material} exceeds what "
            f"is bound to lots ({state.drawn})"
        )
    fills = [replace(f, draws=tuple(f.draws)) for f in state.fills]
    substituted = dict(state.substituted)
    alt_issued = dict(state.alternate_issued)
    movements: list[LotDraw] = []
    i = len(fills) - 1
    while amount > 0:
        fill = fills[i]
        take = min(amount, fill.covers)
        fills[i] = replace(fill, covers=fill.covers - take)
        amount -= take
        if fill.material == material:
            give_back = take
        else:
            alt = master.materials[fill.material]
            substituted[alt.id] = substituted[alt.id] - take
            target = round_to_increment(
                Fraction(substituted[alt.id]) * fill.factor, alt.increment, alt.rounding
            )
            give_back = alt_issued[alt.id] - target
            alt_issued[alt.id] = target
        movements += _return(lots, fills, i, fill.material, give_back)
        i -= 1
    kept = tuple(f for f in fills if f.covers > 0 or any(d.quantity > 0 for d in f.draws))
    new_state = replace(
        _cancel_held(state, cancelled),
        fills=kept,
        substituted=MappingProxyType(substituted),
        alternate_issued=MappingProxyType(alt_issued),
    )
    return Binding(new_state, tuple(lots.values()), _merged(movements), held_cancelled=cancelled)


def _cancel_held(state: BindingState, amount: Decimal) -> BindingState:
    """``state`` with ``amount`` less held: from what any lot may cover first, then from the
    most recently held lot-bound quantities."""
    held_lots = dict(state.held_lots)
    rest = amount - min(amount, state.held_any_lot)
    for lot_id in reversed(list(held_lots)):
        if rest <= 0:
            break
        take = min(rest, held_lots[lot_id])
        held_lots[lot_id] -= take
        rest -= take
        if held_lots[lot_id] <= 0:
            del held_lots[lot_id]
    return replace(state, held=state.held - amount, held_lots=MappingProxyType(held_lots))


def reverse_posting(
    lots_in: Sequence[Lot], state: BindingState, draws: Sequence[LotDraw], held: Decimal
) -> Binding:
    """Undo one earlier posting exactly: its ``draws`` go back to the lots they came from and
    its ``held`` quantity is no longer held (a reversal by the MES; the rounding carry and the
    alternates' records are not touched, so a posting that drew an alternate is refused).
    """
    if any(d.substitution for d in draws):
        raise ConsumptionError(
            "the posting drew an alternate material: reverse it in the MES by hand (the agent "
            "reverses postings of the primary material only)"
        )
    if held > state.held:
        raise ConsumptionError(
            f"the posting held {held}, more than is still held ({state.held}): it was bound "
            "to a lot since; reverse that binding first"
        )
    lots = {lot.lot: lot for lot in lots_in}
    fills = list(state.fills)
    for d in draws:
        rest = d.quantity
        for i in range(len(fills) - 1, -1, -1):
            if rest <= 0:
                break
            fill = fills[i]
            new_draws = list(fill.draws)
            taken = ZERO
            for n in range(len(new_draws) - 1, -1, -1):
                x = new_draws[n]
                if rest <= 0 or x.lot != d.lot or x.quantity <= 0:
                    continue
                back = min(rest, x.quantity)
                new_draws[n] = replace(x, quantity=x.quantity - back)
                rest -= back
                taken += back
            if taken:
                fills[i] = replace(fill, covers=fill.covers - taken, draws=tuple(new_draws))
        if rest > 0:
            raise ConsumptionError(
                f"lot {d.lot} holds only {d.quantity - rest} of the {d.quantity} this posting "
                "drew (part was returned since): nothing reversed"
            )
        if d.lot in lots:
            lots[d.lot] = replace(lots[d.lot], quantity=lots[d.lot].quantity + d.quantity)
    kept = tuple(f for f in fills if f.covers > 0 or any(x.quantity > 0 for x in f.draws))
    new_state = replace(_cancel_held(state, held), fills=kept)
    returns = tuple(replace(d, quantity=-d.quantity) for d in draws)
    return Binding(new_state, tuple(lots.values()), returns, held_cancelled=held)


def _merged(movements: Sequence[LotDraw]) -> tuple[LotDraw, ...]:
    """One movement per lot, in the order the lots were first touched."""
    merged: dict[tuple[str, bool], LotDraw] = {}
    for d in movements:
        key = (d.lot, d.substitution)
        prior = merged.get(key)
        merged[key] = d if prior is None else replace(prior, quantity=prior.quantity + d.quantity)
    return tuple(merged.values())


def _return(
    lots: dict[str, Lot], fills: list[Fill], start: int, material: str, amount: Decimal
) -> list[LotDraw]:
    """Give ``amount`` of ``material`` back to the lots it was drawn from, last drawn first."""
    movements = []
    for j in range(start, -1, -1):
        if amount <= 0:
            break
        fill = fills[j]
        if fill.material != material:
            continue
        draws = list(fill.draws)
        for n in range(len(draws) - 1, -1, -1):
            if amount <= 0:
                break
            back = min(amount, draws[n].quantity)
            if back <= 0:
                continue
            d = draws[n]
            draws[n] = replace(d, quantity=d.quantity - back)
            if d.lot in lots:
                lots[d.lot] = replace(lots[d.lot], quantity=lots[d.lot].quantity + back)
            movements.append(LotDraw(d.lot, d.material, -back, d.substitution))
            amount -= back
        fills[j] = replace(fill, draws=tuple(draws))
    assert amount <= 0, "returns never exceed what was drawn"
    return movements


# --------------------------------------------------------------------------- staged-lots document


class LotDoc(BaseModel):
    """A staged lot on the wire; ``uom``, when given, must be the material's issue unit."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    lot: str = Field(min_length=1)
    material: str = Field(min_length=1)
    quantity: DecimalStr = Field(ge=0)
    uom: str | None = None
    expiry: Timestamp | None = None
    status: LotStatus = LotStatus.RELEASED
    staged_at: Timestamp


class LotsDoc(BaseModel):
    """The staged-lots document: ``{"lots": [...]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lots: tuple[LotDoc, ...] = ()


def load_lots(data: Mapping[str, Any] | str | bytes, master: MasterData) -> tuple[Lot, ...]:
    """Parse and validate a staged-lots document against the master data."""
    doc = parse_document(LotsDoc, data, LotDataError)
    problems: list[str] = []
    seen: set[str] = set()
    lots = []
    for i, d in enumerate(doc.lots):
        at = f"lots[{i}] ({d.lot})"
        material = master.materials.get(d.material)
        if d.lot in seen:
            problems.append(f"{at} › lot: duplicate lot {d.lot!r}")
        seen.add(d.lot)
        if material is None:
            problems.append(f"{at} › material: unknown material {d.material!r}")
            continue
        if d.uom is not None and d.uom != material.uom:
            problems.append(
                f"{at} › uom: lot quantities are in the material's issue unit "
                f"{material.uom!r} (got {d.uom!r})"
            )
        lots.append(Lot(d.lot, d.material, d.quantity, d.staged_at, d.expiry, d.status))
    if problems:
        raise LotDataError(problems)
    return tuple(lots)
