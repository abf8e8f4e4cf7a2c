"""Pilot mode: backflushed against actual issues, and a fitted proposal for scrap % and setup.

On a pilot line the agent backflushes as usual while the actual issues are scanned or weighed.
Per order, operation and material, :func:`compare` splits the difference between the two into
what the agent's rounding added and what the process consumed beyond the standard. Over the
pilot's orders, :func:`fit` fits ``actual = rate × (good + scrap) + setup`` by least squares and
proposes a component scrap % and a setup quantity, each with a confidence interval, flagging the
evidence as thin when it cannot justify changing the standard. :func:`proposed_revision` writes
the proposals that can be applied into a new revision of a master-data BOM document.

Everything here is exact (Fraction) until a square root is needed; square roots and the t
quantile are Decimal at 50 significant digits, and every figure shown is a Decimal of at most
12 decimal places. No floats (docs/pilot.md explains each figure).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_UP,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Rounded,
    localcontext,
)
from fractions import Fraction
from functools import lru_cache
from typing import Any, Final

from edge_agent.domain.masterdata import MasterData, parse_decimal
from edge_agent.domain.quantities import (
    DISPLAY_PLACES,
    Rounding,
    conversion_factor,
    fmt,
    round_to_increment,
    to_decimal,
)
from edge_agent.errors import UnitError

ZERO = Decimal(0)

#: Subtraction and addition of quantities must be exact: a context that raises rather than round.
_EXACT: Final = Context(prec=100, traps=[Inexact, Rounded, InvalidOperation])

#: Working precision (significant digits) of square roots and the t quantile.
_PREC: Final = 50

#: π to 50 decimal places (the digits are in every table of constants, e.g. OEIS A000796).
_PI: Final = Decimal("3.14159265358979323846264338327950288419716939937510")

#: Figures shown: at most 12 decimal places, like every unrounded quantity (quantities.to_decimal).
_SHOWN: Final = Decimal(1).scaleb(-DISPLAY_PLACES)

#: Limits of a BOM line's scrap_pct (docs/masterdata.md, BOM line).
_MAX_SCRAP_PCT: Final = Decimal(1000)


# --------------------------------------------------------------------------- the evidence


@dataclass(frozen=True, slots=True)
class OrderEvidence:
    """One order's figures for one (operation, material) of a pilot.

    Evidence is of an operation the order confirmed, so its standard setup was consumed (the
    agent consumes the setup at the first confirmation, whatever its quantities). Quantities are
    in the material's issue unit (``uom``); ``good`` and ``scrap`` are in the product's unit.
    """

    order: str
    operation: str
    material: str
    uom: str  # the material's issue unit
    good: Decimal  # good confirmed at the operation (product units)
    scrap: Decimal  # scrap confirmed at the operation
    #: line quantity per unit of product, WITHOUT scrap (quantity / base_quantity), issue unit
    bom_quantity: Fraction
    scrap_pct: Decimal  # the standard's component scrap %
    setup: Decimal  # the standard's setup quantity (issue unit, once per order and operation)
    backflushed: Decimal  # what the agent posted (rounded, carried), net of reversals
    actual: Decimal  # actual issues (scanned/weighed), net of returns
    actual_setup: Decimal | None = None  # the part of actual the scanner tagged as setup

    def __post_init__(self) -> None:
        where = f"order {self.order}, operation {self.operation}, material {self.material}"
        for name in ("good", "scrap", "scrap_pct", "setup", "backflushed", "actual"):
            _check_decimal(where, name, getattr(self, name))
        if self.actual_setup is not None:
            _check_decimal(where, "actual_setup", self.actual_setup)
        if not isinstance(self.bom_quantity, Fraction) or self.bom_quantity <= 0:
            raise ValueError(
                f"{where}: bom_quantity must be a Fraction greater than zero "
                f"(got {self.bom_quantity!r})"
            )
        for name in ("good", "scrap", "scrap_pct", "setup"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{where}: {name} must not be negative (got {getattr(self, name)})"
                )

    @property
    def counted(self) -> Decimal:
        """Good + scrap: every unit made consumed material."""
        return self.good + self.scrap


def _check_decimal(where: str, name: str, value: object) -> None:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError(f"{where}: {name} must be a finite Decimal (got {value!r})")


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class Comparison:
    """Theoretical, backflushed and actual of one order, operation and material.

    Every figure is a Decimal; theoretical quantities with no finite decimal form (a rate of 1/3)
    are rounded half up to 12 decimal places, and ``theoretical_exact`` and
    ``theoretical_running_exact`` keep the exact values for sums over orders (see :func:`total`).
    The shares are defined on the shown ``theoretical``, so ``delta == process − rounding`` and
    ``theoretical == theoretical_setup + theoretical_running`` hold exactly.
    """

    order: str
    operation: str
    material: str
    uom: str
    theoretical: Decimal  # (good + scrap) × bom_quantity × (1 + scrap_pct/100) + setup
    theoretical_setup: Decimal  # the standard setup
    theoretical_running: Decimal  # the part that grows with good + scrap
    backflushed: Decimal
    actual: Decimal
    delta: Decimal  # actual − backflushed
    delta_pct: Decimal | None  # delta / backflushed × 100; None when nothing was backflushed
    rounding: Decimal  # backflushed − theoretical: what rounding to the increment added
    process: Decimal  # actual − theoretical: what the process used beyond the standard
    actual_setup: Decimal | None  # as tagged by the scanner; None when not tagged
    actual_running: Decimal | None  # actual − actual_setup
    process_setup: Decimal | None  # actual_setup − theoretical_setup
    process_running: Decimal | None  # actual_running − theoretical_running
    theoretical_exact: Fraction
    theoretical_running_exact: Fraction


def compare(e: OrderEvidence) -> Comparison:
    """The comparison of one order's evidence (see :class:`Comparison`)."""
    running = Fraction(e.counted) * e.bom_quantity * (1 + Fraction(e.scrap_pct) / 100)
    return _comparison(
        e.order, e.operation, e.material, e.uom, e.setup, running, e.backflushed, e.actual,
        e.actual_setup,
    )  # fmt: skip


def total(comparisons: Sequence[Comparison], order: str = "total") -> Comparison:
    """The sum of comparisons of one operation and material over orders, from the exact values
    (so the total's theoretical is the exact sum rounded once, not a sum of rounded parts).

    The actual is split into setup and running only when every order's actual was tagged.
    """
    if not comparisons:
        raise ValueError("no comparisons to add up")
    keys = {(c.operation, c.material, c.uom) for c in comparisons}
    if len(keys) > 1:
        shown = ", ".join(f"{op}/{m} ({u})" for op, m, u in sorted(keys))
        raise ValueError(f"comparisons of different operations or materials: {shown}")
    first = comparisons[0]
    tagged = [c.actual_setup for c in comparisons]
    return _comparison(
        order,
        first.operation,
        first.material,
        first.uom,
        _sum(c.theoretical_setup for c in comparisons),
        sum((c.theoretical_running_exact for c in comparisons), Fraction(0)),
        _sum(c.backflushed for c in comparisons),
        _sum(c.actual for c in comparisons),
        None if any(t is None for t in tagged) else _sum(t for t in tagged if t is not None),
    )


def _comparison(
    order: str,
    operation: str,
    material: str,
    uom: str,
    setup: Decimal,
    running_exact: Fraction,
    backflushed: Decimal,
    actual: Decimal,
    actual_setup: Decimal | None,
) -> Comparison:
    running = to_decimal(running_exact)
    theoretical = _EXACT.add(setup, running)
    delta = _EXACT.subtract(actual, backflushed)
    actual_running = None if actual_setup is None else _EXACT.subtract(actual, actual_setup)
    return Comparison(
        order=order,
        operation=operation,
        material=material,
        uom=uom,
        theoretical=theoretical,
        theoretical_setup=setup,
        theoretical_running=running,
        backflushed=backflushed,
        actual=actual,
        delta=delta,
        delta_pct=(
            None if backflushed == 0 else to_decimal(Fraction(delta) / Fraction(backflushed) * 100)
        ),
        rounding=_EXACT.subtract(backflushed, theoretical),
        process=_EXACT.subtract(actual, theoretical),
        actual_setup=actual_setup,
        actual_running=actual_running,
        process_setup=None if actual_setup is None else _EXACT.subtract(actual_setup, setup),
        process_running=(
            None if actual_running is None else _EXACT.subtract(actual_running, running)
        ),
        theoretical_exact=Fraction(setup) + running_exact,
        theoretical_running_exact=running_exact,
    )


def _sum(values: Iterable[Decimal]) -> Decimal:
    out = ZERO
    for v in values:
        out = _EXACT.add(out, v)
    return out


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided confidence interval; the bounds are rounded outward to 12 decimal places."""

    low: Decimal
    high: Decimal
    half_width: Decimal  # t × standard error, rounded up to 12 decimal places

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, Decimal | Fraction | int):
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True, slots=True)
class Proposal:
    """The fitted scrap % and setup of one (operation, material) over a pilot's orders.

    ``fitted_*`` are the exact least-squares values (None when the orders cannot tell rate and
    setup apart); ``proposed_*`` are the same rounded for a BOM (scrap % to 2 decimal places,
    setup to the issue increment when one was given). The intervals, the spread and R² involve
    square roots and are Decimals of at most 12 decimal places.
    """

    operation: str
    material: str
    uom: str
    orders: int  # n, the number of orders fitted
    order_ids: tuple[str, ...]  # sorted
    bom_quantity: Fraction  # shared by the orders, without scrap
    standard_scrap_pct: Decimal
    standard_setup: Decimal
    confidence: Decimal
    degrees_of_freedom: int  # n − 2
    fitted_rate: Fraction | None  # slope: issue unit per unit of product, scrap included
    fitted_setup: Fraction | None  # intercept: issue unit per order
    fitted_scrap_pct: Fraction | None  # (fitted_rate / bom_quantity − 1) × 100
    proposed_scrap_pct: Decimal | None
    proposed_setup: Decimal | None
    t: Decimal | None  # the two-sided t critical value used (12 dp)
    rate_interval: Interval | None
    scrap_pct_interval: Interval | None
    setup_interval: Interval | None
    spread: Decimal | None  # residual standard deviation: √(Σ residual² / (n − 2)), issue unit
    r_squared: Decimal | None  # share of the actuals' variation the fit explains
    scrap_changed: bool  # the standard scrap % lies outside its interval (and rounds otherwise)
    setup_changed: bool  # the standard setup lies outside its interval (and rounds otherwise)
    thin: bool  # the evidence is too thin to change the standard
    reasons: tuple[str, ...]  # why it is thin, then warnings (negative proposals)

    @property
    def changed(self) -> bool:
        """The proposal differs from the standard by more than its interval."""
        return self.scrap_changed or self.setup_changed


def fit(
    evidence: Sequence[OrderEvidence],
    *,
    confidence: Decimal = Decimal("0.95"),
    min_orders: int = 5,
    max_scrap_halfwidth_pct: Decimal = Decimal(2),
    increment: Decimal | None = None,
) -> Proposal:
    """Least-squares fit of ``actual = rate × (good + scrap) + setup`` over the orders of one
    (operation, material), with two-sided ``confidence`` intervals from the t distribution with
    n − 2 degrees of freedom.

    The evidence is thin when there are fewer than ``min_orders`` orders, when every order
    counted the same quantity (rate and setup cannot be told apart), when no degree of freedom
    is left for the spread, or when the scrap % interval is wider than
    ±``max_scrap_halfwidth_pct`` points. The result does not depend on the order of the orders.
    Raises ValueError for no evidence, mixed operations or materials, or orders of one
    (operation, material) that disagree on the unit, the BOM quantity or the standard.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    if increment is not None and increment <= 0:
        raise ValueError(f"increment must be greater than zero (got {increment})")
    first = _check_group(evidence)
    n = len(evidence)
    line = _least_squares(
        [Fraction(e.counted) for e in evidence], [Fraction(e.actual) for e in evidence]
    )
    thin: list[str] = []
    if n < min_orders:
        thin.append(
            f"only {n} order{'s' if n != 1 else ''}: at least {min_orders} are needed to change "
            "the standard"
        )
    if line is None:
        thin.append(
            "one order cannot tell the setup from the rate"
            if n == 1
            else f"every order counted the same quantity ({fmt(first.counted)} in all {n} "
            "orders): the setup and the rate cannot be told apart"
        )
        return _proposal(first, evidence, confidence, None, None, None, thin, [])

    scrap = (line.rate / first.bom_quantity - 1) * 100
    proposed_scrap = round_to_increment(scrap, Decimal("0.01"), Rounding.HALF_UP)
    proposed_setup = (
        to_decimal(line.setup)
        if increment is None
        else round_to_increment(line.setup, increment, Rounding.HALF_UP)
    )
    spread = None
    if line.df < 1:
        thin.append("two orders leave no degree of freedom to measure the spread: no interval")
    else:
        spread = _spread(line, first.bom_quantity, confidence)
        if spread.scrap_pct.half_width > max_scrap_halfwidth_pct:
            thin.append(
                f"the scrap % is known only to ±{_pct(spread.scrap_pct.half_width)} points at "
                f"{fmt((confidence * 100).normalize())} % confidence (more than "
                f"±{fmt(max_scrap_halfwidth_pct)})"
            )
    warnings = []
    if proposed_scrap < 0:
        warnings.append(
            f"the proposed scrap % is negative ({fmt(proposed_scrap)} %): the actual is below "
            "the BOM quantity itself, so the BOM quantity, not the scrap factor, may be wrong"
        )
    if proposed_setup < 0:
        warnings.append(
            f"the proposed setup is negative ({fmt(proposed_setup)} {first.uom}): the actuals "
            "do not support a setup; the running rate, or the actuals of the small orders, "
            "may be wrong"
        )
    return _proposal(
        first, evidence, confidence, line, (proposed_scrap, proposed_setup), spread, thin, warnings
    )


@dataclass(frozen=True, slots=True)
class _Line:
    """An exact least-squares line and the sums its statistics need."""

    n: int
    rate: Fraction
    setup: Fraction
    mean_x: Fraction
    sxx: Fraction  # Σ (x − x̄)²
    syy: Fraction  # Σ (y − ȳ)²
    sse: Fraction  # Σ residual²

    @property
    def df(self) -> int:
        return self.n - 2


def _least_squares(xs: Sequence[Fraction], ys: Sequence[Fraction]) -> _Line | None:
    """Ordinary least squares with intercept, exactly; None when every x is the same."""
    n = len(xs)
    mean_x, mean_y = sum(xs, Fraction(0)) / n, sum(ys, Fraction(0)) / n
    sxx = sum(((x - mean_x) ** 2 for x in xs), Fraction(0))
    if sxx == 0:
        return None
    sxy = sum(((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)), Fraction(0))
    syy = sum(((y - mean_y) ** 2 for y in ys), Fraction(0))
    rate = sxy / sxx
    return _Line(n, rate, mean_y - rate * mean_x, mean_x, sxx, syy, syy - rate * sxy)


@dataclass(frozen=True, slots=True)
class _Spread:
    t: Decimal
    spread: Decimal
    rate: Interval
    scrap_pct: Interval
    setup: Interval


def _spread(line: _Line, bom_quantity: Fraction, confidence: Decimal) -> _Spread:
    """The residual standard deviation and the t intervals of rate, scrap % and setup."""
    t = t_quantile(confidence, line.df)
    scrap = (line.rate / bom_quantity - 1) * 100
    with localcontext(Context(prec=_PREC)):
        s = _sqrt(line.sse / line.df)
        se_rate = s / _sqrt(line.sxx)
        se_setup = s * _sqrt(Fraction(1, line.n) + line.mean_x**2 / line.sxx)
        return _Spread(
            t=_shown_up(t),
            spread=_shown_up(s),
            rate=_interval(line.rate, t * se_rate),
            scrap_pct=_interval(scrap, t * se_rate / _dec(bom_quantity) * 100),
            setup=_interval(line.setup, t * se_setup),
        )


def _proposal(
    first: OrderEvidence,
    evidence: Sequence[OrderEvidence],
    confidence: Decimal,
    line: _Line | None,
    proposed: tuple[Decimal, Decimal] | None,
    spread: _Spread | None,
    thin: list[str],
    warnings: list[str],
) -> Proposal:
    scrap = None if line is None else (line.rate / first.bom_quantity - 1) * 100
    proposed_scrap, proposed_setup = proposed or (None, None)
    scrap_iv = None if spread is None else spread.scrap_pct
    setup_iv = None if spread is None else spread.setup
    return Proposal(
        operation=first.operation,
        material=first.material,
        uom=first.uom,
        orders=len(evidence),
        order_ids=tuple(sorted(e.order for e in evidence)),
        bom_quantity=first.bom_quantity,
        standard_scrap_pct=first.scrap_pct,
        standard_setup=first.setup,
        confidence=confidence,
        degrees_of_freedom=len(evidence) - 2,
        fitted_rate=None if line is None else line.rate,
        fitted_setup=None if line is None else line.setup,
        fitted_scrap_pct=scrap,
        proposed_scrap_pct=proposed_scrap,
        proposed_setup=proposed_setup,
        t=None if spread is None else spread.t,
        rate_interval=None if spread is None else spread.rate,
        scrap_pct_interval=scrap_iv,
        setup_interval=setup_iv,
        spread=None if spread is None else spread.spread,
        r_squared=(None if line is None or line.syy == 0 else to_decimal(1 - line.sse / line.syy)),
        scrap_changed=_changed(first.scrap_pct, scrap_iv, proposed_scrap),
        setup_changed=_changed(first.setup, setup_iv, proposed_setup),
        thin=bool(thin),
        reasons=tuple(thin + warnings),
    )


def fit_all(
    evidence: Iterable[OrderEvidence],
    *,
    confidence: Decimal = Decimal("0.95"),
    min_orders: int = 5,
    max_scrap_halfwidth_pct: Decimal = Decimal(2),
    increments: Mapping[str, Decimal] | None = None,
) -> tuple[Proposal, ...]:
    """:func:`fit` per (operation, material), sorted by operation then material;
    ``increments`` holds each material's issue increment."""
    groups: dict[tuple[str, str], list[OrderEvidence]] = {}
    for e in evidence:
        groups.setdefault((e.operation, e.material), []).append(e)
    return tuple(
        fit(
            groups[key],
            confidence=confidence,
            min_orders=min_orders,
            max_scrap_halfwidth_pct=max_scrap_halfwidth_pct,
            increment=(increments or {}).get(key[1]),
        )
        for key in sorted(groups)
    )


def _check_group(evidence: Sequence[OrderEvidence]) -> OrderEvidence:
    if not evidence:
        raise ValueError("no evidence to fit")
    first = evidence[0]
    mixed = {(e.operation, e.material) for e in evidence}
    if len(mixed) > 1:
        shown = ", ".join(f"{op}/{m}" for op, m in sorted(mixed))
        raise ValueError(f"fit one operation and material at a time (got {shown}); see fit_all")
    for name, label in (
        ("uom", "issue unit"),
        ("bom_quantity", "BOM quantity"),
        ("scrap_pct", "standard scrap %"),
        ("setup", "standard setup"),
    ):
        values: dict[object, list[str]] = {}
        for e in evidence:
            values.setdefault(getattr(e, name), []).append(e.order)
        if len(values) > 1:
            shown = "; ".join(
                f"{_show(v)} in order{'s' if len(o) > 1 else ''} {', '.join(sorted(o))}"
                for v, o in sorted(values.items(), key=lambda kv: sorted(kv[1]))
            )
            raise ValueError(
                f"operation {first.operation}, material {first.material}: the orders disagree on "
                f"the {label} ({shown}); fit the orders of each BOM revision separately"
            )
    return first


def _show(value: object) -> str:
    if isinstance(value, Fraction):
        return fmt(value)
    return str(value)


def _changed(standard: Decimal, interval: Interval | None, proposed: Decimal | None) -> bool:
    return interval is not None and standard not in interval and proposed != standard


def _dec(value: Fraction) -> Decimal:
    """A Fraction as a Decimal in the current context (one rounding, at its precision)."""
    return Decimal(value.numerator) / Decimal(value.denominator)


def _sqrt(value: Fraction) -> Decimal:
    return _dec(value).sqrt()


def _interval(centre: Fraction, half_width: Decimal) -> Interval:
    c = _dec(centre)
    return Interval(
        low=(c - half_width).quantize(_SHOWN, ROUND_FLOOR),
        high=(c + half_width).quantize(_SHOWN, ROUND_CEILING),
        half_width=_shown_up(half_width),
    )


def _shown_up(value: Decimal) -> Decimal:
    return value.quantize(_SHOWN, ROUND_CEILING)


def _pct(value: Decimal) -> str:
    return fmt(value.quantize(Decimal("0.01"), ROUND_CEILING))


# --------------------------------------------------------------------------- Student's t


@lru_cache(maxsize=256)
def t_quantile(confidence: Decimal, df: int) -> Decimal:
    """The two-sided critical value t with P(|T| ≤ t) = ``confidence`` for Student's t with
    ``df`` degrees of freedom, to about 25 significant digits.

    Found by bisection on the exact closed form of P(|T| ≤ t) for whole degrees of freedom
    (Abramowitz & Stegun 26.7.3 and 26.7.4), in Decimal; its cost grows with ``df``, which is the
    number of orders less two here. Tested against the NIST/SEMATECH e-Handbook's table.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1 (got {df})")
    with localcontext(Context(prec=_PREC)):
        hi = Decimal(1)
        while _t_probability(hi, df) < confidence:
            hi *= 2
        lo = ZERO
        tolerance = Decimal("1e-30")
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            if _t_probability(mid, df) < confidence:
                lo = mid
            else:
                hi = mid
        return ((lo + hi) / 2).quantize(Decimal("1e-25"), ROUND_HALF_UP)


def _t_probability(t: Decimal, df: int) -> Decimal:
    """P(|T| ≤ t), T Student's t with ``df`` degrees of freedom (A&S 26.7.3–4), for t ≥ 0.

    With θ = atan(t/√df): for even df, sin θ · Σ_{k=0}^{(df−2)/2} c_k cos^{2k} θ with
    c_k = c_{k−1}·(2k−1)/(2k); for odd df, (2/π)·(θ + sin θ cos θ · Σ_{k=0}^{(df−3)/2} c_k
    cos^{2k} θ) with c_k = c_{k−1}·2k/(2k+1).
    """
    n = Decimal(df)
    cos2 = n / (n + t * t)
    sin = t / (n + t * t).sqrt()
    term = total = Decimal(1)
    if df % 2 == 0:
        for k in range(1, (df - 2) // 2 + 1):
            term = term * cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    theta = _atan(t / n.sqrt())
    if df == 1:
        return 2 * theta / _PI
    for k in range(1, (df - 3) // 2 + 1):
        term = term * cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / _PI * (theta + sin * cos2.sqrt() * total)


def _atan(x: Decimal) -> Decimal:
    """arctan(x) for x ≥ 0: halve the angle until x < 0.1, then its Taylor series."""
    halvings = 0
    while x > Decimal("0.1"):
        x = x / (1 + (1 + x * x).sqrt())
        halvings += 1
    eps = Decimal(10) ** -(_PREC + 2)
    total = power = x
    x2 = x * x
    k = 1
    while True:
        power = -power * x2
        term = power / (2 * k + 1)
        if abs(term) < eps:
            break
        total += term
        k += 1
    return total * (1 << halvings)


# --------------------------------------------------------------------------- the BOM revision


def proposed_revision(
    bom_doc: Mapping[str, Any],
    proposals: Iterable[Proposal],
    new_revision: str,
    effective_from: str | None = None,
    *,
    pilot: str | None = None,
    master: MasterData | None = None,
) -> dict[str, Any]:
    """A new revision of ``bom_doc`` (one BOM of a master-data document, in its JSON shape)
    with the applicable proposals applied; everything else is copied.

    A proposal is applied when its evidence is not thin, and only the figures that changed (the
    standard outside the interval): scrap_pct on every line of this BOM with the proposal's
    operation and material, the setup (converted to the line's unit) on the first such line and
    0 on the others. Not applied, and said so by :func:`revision_notes`: thin or unchanged
    proposals, negative figures, a material that is not a line of this BOM (it may come from a
    phantom: tune the phantom's BOM), and lines whose BOM quantity differs from the pilot's.
    ``master`` is needed only for a density, when a line's unit is a volume and the issue unit a
    mass (or the reverse). ``effective_from`` None leaves the revision without one.
    """
    edits, notes = _plan(bom_doc, proposals, master)
    doc = copy.deepcopy(dict(bom_doc))
    doc["revision"] = new_revision
    if effective_from is None:
        doc.pop("effective_from", None)
    else:
        doc["effective_from"] = effective_from
    lines = doc["lines"]
    for index, field_name, value in edits:
        lines[index][field_name] = value
    source = f"pilot {pilot}" if pilot else "a pilot"
    applied = [n for n in notes if n.startswith("applied")]
    doc["description"] = (
        f"{doc['product']} rev {new_revision}: rev {bom_doc['revision']} with scrap % and setup "
        f"tuned from {source}"
        + (": " + "; ".join(n.removeprefix("applied: ") for n in applied) if applied else "")
        + ("" if applied else " (no proposal applied: a copy)")
    )
    return doc


def revision_notes(
    bom_doc: Mapping[str, Any],
    proposals: Iterable[Proposal],
    *,
    master: MasterData | None = None,
) -> tuple[str, ...]:
    """One sentence per proposal: what :func:`proposed_revision` applies, or why not."""
    return _plan(bom_doc, proposals, master)[1]


_Edit = tuple[int, str, str]


def _plan(
    bom_doc: Mapping[str, Any], proposals: Iterable[Proposal], master: MasterData | None
) -> tuple[list[_Edit], tuple[str, ...]]:
    edits: list[_Edit] = []
    notes: list[str] = []
    for p in sorted(proposals, key=lambda p: (p.operation, p.material)):
        what = f"{p.material} at operation {p.operation}"
        if p.thin:
            notes.append(f"not applied: {what}: the evidence is thin ({'; '.join(p.reasons)})")
        elif not p.changed:
            notes.append(
                f"kept: {what}: the standard (scrap {fmt(p.standard_scrap_pct)} %, setup "
                f"{fmt(p.standard_setup)} {p.uom}) lies within the pilot's intervals"
            )
        else:
            found = _lines_of(bom_doc, p, master)
            if isinstance(found, str):
                notes.append(f"not applied: {what}: {found}")
                continue
            more, done, skipped = _apply(p, *found)
            edits += more
            if done:
                notes.append(f"applied: {what}: {', '.join(done)}")
            if skipped:
                notes.append(f"not applied: {what}: {'; '.join(skipped)}")
    return edits, tuple(notes)


def _lines_of(
    bom_doc: Mapping[str, Any], p: Proposal, master: MasterData | None
) -> tuple[list[int], list[Fraction]] | str:
    """The positions of the BOM's own lines for the proposal's operation and material, with
    their factors to the issue unit; or why the proposal cannot be applied to them."""
    ref = f"BOM {bom_doc['product']} rev {bom_doc['revision']}"
    lines: list[Mapping[str, Any]] = list(bom_doc["lines"])
    matching = [
        i
        for i, ln in enumerate(lines)
        if ln.get("operation") == p.operation
        and ln.get("material") == p.material
        and not ln.get("phantom", False)
    ]
    if not matching:
        phantoms = [
            str(ln.get("material"))
            for ln in lines
            if ln.get("operation") == p.operation and ln.get("phantom", False)
        ]
        hint = (
            f"; it may come from phantom {', '.join(phantoms)}: tune that BOM instead"
            if phantoms
            else ""
        )
        return f"no line of {ref} issues it directly{hint}"
    material = None if master is None else master.materials.get(p.material)
    density = None if material is None else material.density
    try:
        factors = [conversion_factor(lines[i]["uom"], p.uom, density) for i in matching]
    except UnitError as exc:
        return f"{exc} (pass the master data for its density)"
    base = Fraction(parse_decimal(bom_doc.get("base_quantity", "1")))
    quantity = sum(
        (
            Fraction(parse_decimal(lines[i]["quantity"])) / base * f
            for i, f in zip(matching, factors, strict=True)
        ),
        Fraction(0),
    )
    if quantity != p.bom_quantity:
        return (
            f"its lines in {ref} add up to {fmt(quantity)} {p.uom} per unit, the pilot's orders "
            f"to {fmt(p.bom_quantity)}: the pilot ran on another BOM quantity, or a phantom adds "
            "to it"
        )
    return matching, factors


def _apply(
    p: Proposal, matching: list[int], factors: list[Fraction]
) -> tuple[list[_Edit], list[str], list[str]]:
    """The edits of the changed figures that a BOM can hold, what they change, what not."""
    edits: list[_Edit] = []
    done: list[str] = []
    skipped: list[str] = []
    if p.scrap_changed and p.proposed_scrap_pct is not None:
        if 0 <= p.proposed_scrap_pct <= _MAX_SCRAP_PCT:
            edits += [(i, "scrap_pct", fmt(p.proposed_scrap_pct)) for i in matching]
            done.append(f"scrap {fmt(p.standard_scrap_pct)} → {fmt(p.proposed_scrap_pct)} %")
        else:
            skipped.append(
                f"a scrap % of {fmt(p.proposed_scrap_pct)} is outside 0 to 1000 "
                "(check the BOM quantity)"
            )
    if p.setup_changed and p.proposed_setup is not None:
        if p.proposed_setup >= 0:
            # the setup goes once on the first line: the explosion adds the lines' setups
            in_line_unit = to_decimal(Fraction(p.proposed_setup) / factors[0])
            edits.append((matching[0], "setup_quantity", fmt(in_line_unit)))
            edits += [(i, "setup_quantity", "0") for i in matching[1:]]
            done.append(f"setup {fmt(p.standard_setup)} → {fmt(p.proposed_setup)} {p.uom}")
        else:
            skipped.append(f"a negative setup ({fmt(p.proposed_setup)} {p.uom})")
    return edits, done, skipped
