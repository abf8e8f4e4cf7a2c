"""`edge-agent calc`: run a sequence of confirmations through the backflush rules.

A user's tool to check master data before go-live: what would the agent post for "operation 20
confirmed 10 good and 1 scrap", and then "5 more", with rounding carried across the sequence and,
given the staged lots, which lots it would draw and what it would hold. No I/O here: the CLI reads
the files and prints the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from edge_agent.domain.backflush import (
    RULE_VERSION,
    ComponentPosting,
    ConsumptionState,
    confirm,
)
from edge_agent.domain.explosion import ComponentKey, ExplodedBom
from edge_agent.domain.lots import Binding, BindingState, Lot, bind
from edge_agent.domain.masterdata import MasterData, parse_decimal
from edge_agent.domain.quantities import fmt
from edge_agent.errors import InputError


@dataclass(frozen=True, slots=True)
class ConfirmationInput:
    good: Decimal
    scrap: Decimal


def parse_confirmation(text: str) -> ConfirmationInput:
    """``GOOD[:SCRAP]`` as decimal strings, e.g. ``10``, ``10:1``, ``-2:0`` (a correction)."""
    good_text, _, scrap_text = text.partition(":")
    try:
        good = parse_decimal(good_text)
        scrap = parse_decimal(scrap_text) if scrap_text else Decimal(0)
    except ValueError as exc:
        raise InputError(f"--confirm {text!r}: expected GOOD[:SCRAP], {exc}") from None
    return ConfirmationInput(good, scrap)


@dataclass(frozen=True, slots=True)
class CalcRecord:
    """One component posting of one confirmation, and its lot binding when lots were given."""

    confirmation: int  # 1-based
    good: Decimal
    scrap: Decimal
    posting: ComponentPosting
    binding: Binding | None

    def to_json(self, bom: ExplodedBom) -> dict[str, Any]:
        p = self.posting
        out: dict[str, Any] = {
            "confirmation": self.confirmation,
            "product": bom.product,
            "revision": bom.revision,
            "operation": p.component.operation,
            "good": fmt(self.good),
            "scrap": fmt(self.scrap),
            "material": p.material,
            "quantity": fmt(p.quantity),
            "uom": p.uom,
            "theoretical": fmt(p.theoretical),
            "issued": fmt(p.issued),
            "method": p.component.method.value,
            "setup_included": p.setup_included,
            "rule_version": RULE_VERSION,
            "bom_lines": [" > ".join(path) for path in p.component.origin],
        }
        if self.binding is not None:
            b = self.binding
            out["lots"] = [
                {
                    "lot": d.lot,
                    "material": d.material,
                    "quantity": fmt(d.quantity),
                    "substitution": d.substitution,
                }
                for d in b.draws
            ]
            out["substitution"] = b.substitution
            out["held"] = (
                {
                    "quantity": fmt(b.held.quantity),
                    "reason": b.held.reason.value,
                    "detail": b.held.detail,
                }
                if b.held
                else None
            )
            if b.held_cancelled:
                out["held_cancelled"] = fmt(b.held_cancelled)
        return out


@dataclass(frozen=True, slots=True)
class CalcResult:
    records: tuple[CalcRecord, ...]
    state: ConsumptionState
    lots: tuple[Lot, ...] | None
    bindings: dict[ComponentKey, BindingState]


def run_calc(
    master: MasterData,
    bom: ExplodedBom,
    operation: str,
    confirmations: Sequence[ConfirmationInput],
    now: datetime,
    lots: Sequence[Lot] | None = None,
    state: ConsumptionState | None = None,
    bindings: dict[ComponentKey, BindingState] | None = None,
) -> CalcResult:
    """Apply ``confirmations`` in order at ``operation``; bind each posting when ``lots`` given.

    ``state`` and ``bindings`` carry an order's progress from an earlier run (another operation
    of the same order); by default the order starts fresh.
    """
    if operation not in bom.operations:
        known = ", ".join(bom.operations)
        raise InputError(
            f"operation {operation!r} has no lines in BOM {bom.ref} (operations: {known})"
        )
    state = state if state is not None else ConsumptionState()
    current = tuple(lots) if lots is not None else None
    bindings = dict(bindings or {})
    records = []
    for n, c in enumerate(confirmations, start=1):
        result = confirm(master, bom, state, operation, c.good, c.scrap)
        state = result.state
        for posting in result.postings:
            binding = None
            if current is not None:
                key = posting.component.key
                binding = bind(
                    master,
                    current,
                    bindings.get(key, BindingState()),
                    posting.material,
                    posting.quantity,
                    now,
                    posting.component.alternates,
                )
                bindings[key] = binding.state
                current = binding.lots
            records.append(CalcRecord(n, c.good, c.scrap, posting, binding))
    return CalcResult(tuple(records), state, current, bindings)
