"""Pilot mode (issue 9): comparison, the least-squares proposal, its intervals and thin evidence."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import load_master_data
from edge_agent.domain.pilot import (
    OrderEvidence,
    Proposal,
    compare,
    fit,
    fit_all,
    proposed_revision,
    revision_notes,
    t_quantile,
    total,
)
from edge_agent.domain.quantities import Rounding, round_to_increment

D = Decimal
MASTER = Path(__file__).resolve().parents[2] / "config" / "masterdata.json"


def evidence(
    order: str,
    counted: int | str,
    actual: str | Decimal,
    *,
    scrap: int | str = 0,
    operation: str = "10",
    material: str = "RESIN",
    uom: str = "kg",
    bom_quantity: Fraction = Fraction(1, 5),
    scrap_pct: str = "0",
    setup: str = "1",
    increment: str = "0.001",
    actual_setup: str | None = None,
) -> OrderEvidence:
    """One order's evidence; ``counted`` is good + scrap, backflushed as the agent would."""
    good, scrap_d = D(counted) - D(scrap), D(scrap)
    rate = bom_quantity * (1 + Fraction(D(scrap_pct)) / 100)
    theoretical = Fraction(good + scrap_d) * rate + Fraction(D(setup))
    return OrderEvidence(
        order=order,
        operation=operation,
        material=material,
        uom=uom,
        good=good,
        scrap=scrap_d,
        bom_quantity=bom_quantity,
        scrap_pct=D(scrap_pct),
        setup=D(setup),
        backflushed=round_to_increment(theoretical, D(increment), Rounding.HALF_UP),
        actual=D(actual),
        actual_setup=None if actual_setup is None else D(actual_setup),
    )


# --------------------------------------------------------------------------- comparison


def test_comparison_of_one_order_worked_by_hand() -> None:
    # 1 kg of resin per 3 units, issued in steps of 0.1 kg rounded up, 0.5 kg setup.
    # 10 units: theoretical = 10 × 1/3 + 0.5 = 3.8333… kg; the agent posted 3.9 kg (rounded up);
    # the scanner saw 4.2 kg, 0.6 kg of it tagged as setup.
    e = OrderEvidence(
        order="4711",
        operation="10",
        material="RESIN",
        uom="kg",
        good=D(9),
        scrap=D(1),
        bom_quantity=Fraction(1, 3),
        scrap_pct=D(0),
        setup=D("0.5"),
        backflushed=D("3.9"),
        actual=D("4.2"),
        actual_setup=D("0.6"),
    )
    c = compare(e)
    assert c.theoretical == D("3.833333333333")  # shown to 12 places …
    assert c.theoretical_exact == Fraction(23, 6)  # … kept exactly for sums
    assert (c.theoretical_setup, c.theoretical_running) == (D("0.5"), D("3.333333333333"))
    assert c.delta == D("0.3")  # 4.2 − 3.9
    assert c.delta_pct == D("7.692307692308")  # 0.3 / 3.9 × 100
    assert c.rounding == D("0.066666666667")  # 3.9 − 3.8333…: the agent's rounding up
    assert c.process == D("0.366666666667")  # 4.2 − 3.8333…: what the line used beyond it
    assert c.process - c.rounding == c.delta
    assert (c.actual_setup, c.actual_running) == (D("0.6"), D("3.6"))
    assert (c.process_setup, c.process_running) == (D("0.1"), D("0.266666666667"))


def test_comparison_with_component_scrap_and_untagged_actual() -> None:
    # 0.2 kg a unit + 5 % = 0.21 kg; 95 good + 5 scrap = 100 units: 21 kg + 1 kg setup = 22 kg
    c = compare(evidence("1", 100, "23.5", scrap=5, scrap_pct="5"))
    assert (c.theoretical, c.backflushed, c.rounding, c.process, c.delta) == (
        D(22),
        D(22),
        D(0),
        D("1.5"),
        D("1.5"),
    )
    assert c.actual_setup is c.actual_running is c.process_setup is c.process_running is None


def test_delta_pct_is_none_when_nothing_was_backflushed() -> None:
    e = evidence("1", 0, "2", setup="0")
    assert e.backflushed == 0
    c = compare(e)
    assert c.delta == 2
    assert c.delta_pct is None


def test_total_adds_the_exact_values_and_rounds_once() -> None:
    # three orders of 1 unit at 1/3 kg: each theoretical 0.333333333333 shown, together exactly 1
    rows = [
        compare(evidence(str(i), 1, "0.4", bom_quantity=Fraction(1, 3), setup="0"))
        for i in range(3)
    ]
    t = total(rows)
    assert t.theoretical == 1
    assert sum(r.theoretical for r in rows) == D("0.999999999999")
    assert (t.backflushed, t.actual, t.delta) == (D("0.999"), D("1.2"), D("0.201"))
    assert t.process - t.rounding == t.delta
    assert t.actual_setup is None
    with pytest.raises(ValueError, match="different operations or materials"):
        total([rows[0], compare(evidence("9", 1, "1", material="OTHER"))])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("good", 1.5, "good must be a finite Decimal"),
        ("actual", D("NaN"), "actual must be a finite Decimal"),
        ("scrap", D(-1), "scrap must not be negative"),
        ("bom_quantity", Fraction(0), "bom_quantity must be a Fraction greater than zero"),
        ("bom_quantity", D("0.2"), "bom_quantity must be a Fraction"),
    ],
)
def test_evidence_is_checked(field: str, value: object, message: str) -> None:
    fields: dict[str, Any] = {
        "order": "77",
        "operation": "10",
        "material": "RESIN",
        "uom": "kg",
        "good": D(1),
        "scrap": D(0),
        "bom_quantity": Fraction(1),
        "scrap_pct": D(0),
        "setup": D(0),
        "backflushed": D(1),
        "actual": D(1),
    }
    fields[field] = value
    with pytest.raises(ValueError, match=f"order 77.*{message}"):
        OrderEvidence(**fields)


# --------------------------------------------------------------------------- fit: worked example

# Five orders of 0.2 kg resin a unit, standard scrap 0 %, setup 1 kg. The line really uses
# 0.21 kg a unit (5 % scrap) and 2 kg at setup; the actuals carry residuals 0, +0.1, −0.2,
# +0.1, 0 kg, which add up to 0 and to 0 when weighted by x, so the fit recovers the line exactly:
#
#   x = good + scrap   100    200    300    400    500      x̄ = 300, Sxx = Σ(x − x̄)² = 100 000
#   actual y           23.0   44.1   64.8   86.1   107.0    ȳ = 65
#   Sxy = Σ(x − x̄)(y − ȳ) = 200·42 + 100·20.9 + 0 + 100·21.1 + 200·42 = 21 000
#   rate = Sxy / Sxx = 0.21 kg a unit;  setup = ȳ − rate·x̄ = 65 − 63 = 2 kg
#   scrap % = (0.21 / 0.2 − 1) × 100 = 5
#   residuals² = 0.01 + 0.04 + 0.01 = 0.06, n − 2 = 3 degrees of freedom, s = √0.02 = 0.141421…
#   se(rate) = s / √Sxx = 0.000447214;  t(95 %, 3) = 3.182446
#   scrap %: 5 ± 3.182446 × 0.000447214 / 0.2 × 100 = 5 ± 0.711617 points
#   se(setup) = s × √(1/5 + 300²/100 000) = 0.141421 × 1.048809 = 0.148324
#   setup: 2 ± 3.182446 × 0.148324 = 2 ± 0.472033 kg
#   R² = 1 − 0.06 / Σ(y − ȳ)² = 1 − 0.06 / 4410.06 = 0.999986395
WORKED = [
    evidence("A", 100, "23.0"),
    evidence("B", 200, "44.1"),
    evidence("C", 300, "64.8"),
    evidence("D", 400, "86.1"),
    evidence("E", 500, "107.0"),
]


def test_fit_worked_by_hand() -> None:
    p = fit(WORKED, increment=D("0.001"))
    assert (p.operation, p.material, p.uom, p.orders) == ("10", "RESIN", "kg", 5)
    assert p.order_ids == ("A", "B", "C", "D", "E")
    assert (p.fitted_rate, p.fitted_setup, p.fitted_scrap_pct) == (
        Fraction(21, 100),
        Fraction(2),
        Fraction(5),
    )
    assert (p.proposed_scrap_pct, p.proposed_setup) == (D("5.00"), D("2.000"))
    assert p.degrees_of_freedom == 3
    assert p.spread is not None
    assert p.spread.quantize(D("0.000001")) == D("0.141421")
    assert p.t is not None
    assert p.t.quantize(D("0.000001")) == D("3.182446")
    assert p.scrap_pct_interval is not None
    assert p.setup_interval is not None
    assert p.scrap_pct_interval.half_width.quantize(D("0.000001")) == D("0.711617")
    assert p.setup_interval.half_width.quantize(D("0.000001")) == D("0.472033")
    assert p.scrap_pct_interval.low < D("4.2884") < D("5.7116") < p.scrap_pct_interval.high
    assert p.r_squared is not None
    assert p.r_squared.quantize(D("0.000000001")) == D("0.999986395")
    # both standards (0 % and 1 kg) lie outside their intervals: changed, on enough evidence
    assert (p.scrap_changed, p.setup_changed, p.changed) == (True, True, True)
    assert (p.thin, p.reasons) == (False, ())


def test_proposal_rounds_for_a_bom() -> None:
    # rate 0.20123 / 0.2 → 0.615 % scrap, rounded half up to 0.62; setup 1.2345 → 1.23 at 0.01
    rows = [evidence(str(x), x, str(D("0.20123") * x + D("1.2345"))) for x in (10, 20, 30)]
    p = fit(rows, increment=D("0.01"))
    assert p.fitted_scrap_pct == Fraction("0.615")
    assert (p.proposed_scrap_pct, p.proposed_setup) == (D("0.62"), D("1.23"))
    unrounded = fit(rows)
    assert unrounded.proposed_setup == D("1.2345")


def test_standard_inside_the_interval_is_not_changed() -> None:
    near = [
        evidence(e.order, int(e.counted), str(e.actual), scrap_pct="5.5", setup="2.2")
        for e in WORKED
    ]
    p = fit(near)
    assert not p.thin
    assert (p.scrap_changed, p.setup_changed, p.changed) == (False, False, False)


# --------------------------------------------------------------------------- fit: thin evidence


def test_three_orders_are_thin() -> None:
    p = fit(WORKED[:3])
    assert p.thin
    # still fitted and shown, but with one degree of freedom t is 12.7 and the interval wide
    assert p.reasons == (
        "only 3 orders: at least 5 are needed to change the standard",
        "the scrap % is known only to ±7.34 points at 95 % confidence (more than ±2)",
    )
    assert p.scrap_pct_interval is not None
    assert fit(WORKED[:3], max_scrap_halfwidth_pct=D(10)).reasons == p.reasons[:1]


def test_orders_all_the_same_size_are_thin() -> None:
    rows = [evidence(str(i), 1000, str(D(205) + i)) for i in range(6)]
    p = fit(rows)
    assert p.thin
    assert p.reasons == (
        "every order counted the same quantity (1000 in all 6 orders): the setup and the rate "
        "cannot be told apart",
    )
    assert (p.fitted_rate, p.fitted_setup, p.proposed_scrap_pct, p.scrap_pct_interval) == (
        None,
    ) * 4
    assert not p.changed


def test_one_and_two_orders() -> None:
    one = fit(WORKED[:1], min_orders=1)
    assert one.thin
    assert one.reasons == ("one order cannot tell the setup from the rate",)
    two = fit(WORKED[:2], min_orders=2)
    assert two.thin
    assert two.fitted_rate == Fraction("0.211")  # a line through two points, exactly
    assert two.reasons == (
        "two orders leave no degree of freedom to measure the spread: no interval",
    )
    assert two.scrap_pct_interval is None
    assert not two.changed


def test_very_noisy_data_are_thin() -> None:
    rows = generated_pilot(random.Random(7), 12, sigma=200)
    p = fit(rows)
    assert p.thin
    assert p.scrap_pct_interval is not None
    (reason,) = p.reasons
    assert reason.startswith("the scrap % is known only to ±")
    assert reason.endswith("points at 95 % confidence (more than ±2)")
    assert p.scrap_pct_interval.half_width > 2


def test_negative_scrap_and_setup_are_said() -> None:
    # 0.19 kg a unit against a BOM quantity of 0.2: below the BOM quantity itself
    rows = [evidence(str(x), x, str(D("0.19") * x - D("0.5"))) for x in (100, 200, 300, 400, 500)]
    p = fit(rows)
    assert not p.thin  # the evidence is exact; what it says is that the standard is wrong
    assert p.proposed_scrap_pct == D("-5.00")
    assert p.reasons == (
        "the proposed scrap % is negative (-5.00 %): the actual is below the BOM quantity "
        "itself, so the BOM quantity, not the scrap factor, may be wrong",
        "the proposed setup is negative (-0.5 kg): the actuals do not support a setup; the "
        "running rate, or the actuals of the small orders, may be wrong",
    )


def test_orders_must_share_the_bom_quantity_and_the_standard() -> None:
    rows = [*WORKED[:3], evidence("X", 100, "30", bom_quantity=Fraction(1, 4))]
    with pytest.raises(ValueError, match=r"BOM quantity \(0.2 in orders A, B, C; 0.25 in order X"):
        fit(rows)
    with pytest.raises(ValueError, match="standard scrap %"):
        fit([*WORKED[:3], evidence("X", 100, "30", scrap_pct="1")])
    with pytest.raises(ValueError, match="fit one operation and material at a time"):
        fit([*WORKED[:3], evidence("X", 100, "30", material="OTHER")])
    with pytest.raises(ValueError, match="no evidence"):
        fit([])
    with pytest.raises(ValueError, match="confidence must be between 0 and 1"):
        fit(WORKED, confidence=D(95))


def test_fit_all_groups_by_operation_and_material() -> None:
    other = [evidence(e.order, int(e.counted), str(e.actual), material="AAA") for e in WORKED]
    proposals = fit_all([*WORKED, *other], increments={"RESIN": D("0.1")})
    assert [(p.operation, p.material) for p in proposals] == [("10", "AAA"), ("10", "RESIN")]
    assert [p.proposed_setup for p in proposals] == [D(2), D("2.0")]


# --------------------------------------------------------------------------- generated pilots

Q = Fraction(1, 4)  # 0.25 kg a unit in the BOM
TRUE_SCRAP = D("3.5")  # what the line really loses, in %
TRUE_SETUP = D("2.4")  # and uses at setup, in kg
TRUE_RATE = Q * (1 + Fraction(TRUE_SCRAP) / 100)


def generated_pilot(
    rng: random.Random, orders: int, sigma: float, *, increment: str = "0.001"
) -> list[OrderEvidence]:
    """Orders of 500..5000 good and 1..5 % scrap, backflushed at the standard (2 %, 1 kg);
    actual = true rate × (good + scrap) + true setup + Gaussian noise of ``sigma`` kg, weighed
    to the gram."""
    rows = []
    for i in range(orders):
        good = rng.randint(500, 5000)
        scrap = round(good * rng.uniform(0.01, 0.05))
        true = TRUE_RATE * (good + scrap) + Fraction(TRUE_SETUP)
        noise = Fraction(D(f"{rng.gauss(0, sigma):.6f}"))
        actual = round_to_increment(true + noise, D(increment), Rounding.HALF_UP)
        rows.append(
            evidence(
                f"P{i:03}",
                good + scrap,
                actual,
                scrap=scrap,
                bom_quantity=Q,
                scrap_pct="2",
                setup="1",
                increment=increment,
            )
        )
    return rows


def test_without_noise_the_fit_is_exact() -> None:
    # weighed to 0.00001 kg, so the noise-free actual is exact (0.25875 × whole units + 2.4)
    rows = generated_pilot(random.Random(1), 8, sigma=0, increment="0.00001")
    p = fit(rows, increment=D("0.001"))
    assert p.fitted_rate == TRUE_RATE
    assert p.fitted_setup == TRUE_SETUP
    assert p.fitted_scrap_pct == TRUE_SCRAP
    assert (p.proposed_scrap_pct, p.proposed_setup) == (D("3.50"), D("2.400"))
    assert p.spread == 0
    assert p.r_squared == 1
    assert p.scrap_pct_interval is not None
    assert p.setup_interval is not None
    assert (p.scrap_pct_interval.low, p.scrap_pct_interval.high) == (TRUE_SCRAP, TRUE_SCRAP)
    assert (p.setup_interval.low, p.setup_interval.high) == (TRUE_SETUP, TRUE_SETUP)
    assert not p.thin
    assert p.changed


@pytest.mark.parametrize(
    ("confidence", "pilots", "low", "high"),
    [
        # Over `pilots` simulated pilots of 8 to 15 orders, the number of intervals that hold
        # the true value is Binomial(pilots, confidence) when the interval is right. The bounds
        # are ±3.6 and ±3.3 standard deviations of that count (95 % of 1000: sd = √(1000 × 0.95
        # × 0.05) = 6.9, so 925..975; 90 % of 400: sd = 6, so 340..380): a correct interval
        # falls outside them with a probability below 0.1 % for any seed, and the fixed seed
        # makes the run repeatable. This seed gives 938 (scrap %) and 941 (setup) of 1000 at 95 %,
        # 353 and 356 of 400 at 90 %. A normal (z) interval, too narrow for so few orders,
        # covers about 91 % at "95 %" (899 and 911 of 1000 with this seed) and fails here.
        (D("0.95"), 1000, 0.925, 0.975),
        (D("0.90"), 400, 0.85, 0.95),
    ],
)
def test_the_interval_holds_the_true_values_as_often_as_it_says(
    confidence: Decimal, pilots: int, low: float, high: float
) -> None:
    rng = random.Random(20260909)
    scrap_hits = setup_hits = 0
    for _ in range(pilots):
        p = fit(generated_pilot(rng, rng.randint(8, 15), sigma=1.5), confidence=confidence)
        assert p.scrap_pct_interval is not None
        assert p.setup_interval is not None
        scrap_hits += TRUE_SCRAP in p.scrap_pct_interval
        setup_hits += TRUE_SETUP in p.setup_interval
    assert low <= scrap_hits / pilots <= high, scrap_hits
    assert low <= setup_hits / pilots <= high, setup_hits


def test_a_modest_pilot_finds_the_true_scrap_and_proposes_it() -> None:
    p = fit(generated_pilot(random.Random(3), 10, sigma=1.5), increment=D("0.001"))
    assert not p.thin
    assert p.scrap_pct_interval is not None
    assert p.setup_interval is not None
    assert TRUE_SCRAP in p.scrap_pct_interval
    assert TRUE_SETUP in p.setup_interval
    assert p.scrap_changed  # 2 % is far outside
    assert p.proposed_scrap_pct is not None
    assert abs(p.proposed_scrap_pct - TRUE_SCRAP) < p.scrap_pct_interval.half_width


# --------------------------------------------------------------------------- the t quantile

# Two-sided critical values t with P(|T| ≤ t) = 90, 95 and 99 %: the upper critical values for
# α = 0.05, 0.025 and 0.005 of NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2
# "Critical Values of the Student's t Distribution"
# (https://www.itl.nist.gov/div898/handbook/eda/section3/eda3672.htm), three decimals.
NIST_T = {
    1: ("6.314", "12.706", "63.657"),
    2: ("2.920", "4.303", "9.925"),
    3: ("2.353", "3.182", "5.841"),
    4: ("2.132", "2.776", "4.604"),
    5: ("2.015", "2.571", "4.032"),
    6: ("1.943", "2.447", "3.707"),
    7: ("1.895", "2.365", "3.499"),
    8: ("1.860", "2.306", "3.355"),
    9: ("1.833", "2.262", "3.250"),
    10: ("1.812", "2.228", "3.169"),
    11: ("1.796", "2.201", "3.106"),
    12: ("1.782", "2.179", "3.055"),
    13: ("1.771", "2.160", "3.012"),
    14: ("1.761", "2.145", "2.977"),
    15: ("1.753", "2.131", "2.947"),
    16: ("1.746", "2.120", "2.921"),
    17: ("1.740", "2.110", "2.898"),
    18: ("1.734", "2.101", "2.878"),
    19: ("1.729", "2.093", "2.861"),
    20: ("1.725", "2.086", "2.845"),
    21: ("1.721", "2.080", "2.831"),
    22: ("1.717", "2.074", "2.819"),
    23: ("1.714", "2.069", "2.807"),
    24: ("1.711", "2.064", "2.797"),
    25: ("1.708", "2.060", "2.787"),
    26: ("1.706", "2.056", "2.779"),
    27: ("1.703", "2.052", "2.771"),
    28: ("1.701", "2.048", "2.763"),
    29: ("1.699", "2.045", "2.756"),
    30: ("1.697", "2.042", "2.750"),
    40: ("1.684", "2.021", "2.704"),
    60: ("1.671", "2.000", "2.660"),
    100: ("1.660", "1.984", "2.626"),
}


@pytest.mark.parametrize("df", sorted(NIST_T))
def test_t_quantile_matches_the_nist_table(df: int) -> None:
    got = tuple(str(t_quantile(D(c), df).quantize(D("0.001"))) for c in ("0.90", "0.95", "0.99"))
    assert got == NIST_T[df]


def test_t_quantile_to_many_digits() -> None:
    # df 1 is the Cauchy distribution: t = tan(π/2 × 0.95) = 12.7062047361747…
    assert t_quantile(D("0.95"), 1).quantize(D("1e-13")) == D("12.7062047361747")
    # df 2: P(|T| ≤ t) = t / √(2 + t²), so t = c·√2 / √(1 − c²)
    c = D("0.95")
    exact = c * D(2).sqrt() / (1 - c * c).sqrt()
    assert abs(t_quantile(c, 2) - exact) < D("1e-20")
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(c, 0)


# --------------------------------------------------------------------------- properties

quantities = st.decimals(min_value=0, max_value=100_000, places=3)
counts = st.integers(min_value=0, max_value=10_000)


@st.composite
def pilots(draw: st.DrawFn) -> list[OrderEvidence]:
    q = draw(st.fractions(min_value=Fraction(1, 1000), max_value=10, max_denominator=1000))
    n = draw(st.integers(min_value=1, max_value=8))
    return [
        evidence(
            f"O{i}",
            draw(counts),
            draw(quantities),
            bom_quantity=q,
            scrap_pct="1.5",
            setup="0.25",
        )
        for i in range(n)
    ]


@given(pilots(), st.randoms(use_true_random=False))
def test_the_fit_does_not_depend_on_the_order_of_the_orders(
    rows: list[OrderEvidence], rnd: random.Random
) -> None:
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    assert fit(shuffled, min_orders=2) == fit(rows, min_orders=2)


@given(
    pilots(),
    st.decimals(min_value=D("0.01"), max_value=100, places=2).filter(lambda c: c > 0),
)
def test_scaling_the_actuals_scales_rate_and_setup(
    rows: list[OrderEvidence], factor: Decimal
) -> None:
    scaled = [
        replace(e, actual=e.actual * factor)  # exact: 5 decimal places at most
        for e in rows
    ]
    p, s = fit(rows), fit(scaled)
    if p.fitted_rate is None:
        assert s.fitted_rate is None
        return
    assert s.fitted_rate == p.fitted_rate * Fraction(factor)
    assert p.fitted_setup is not None
    assert s.fitted_setup == p.fitted_setup * Fraction(factor)
    if p.spread is not None and s.spread is not None:
        # the spread is a square root shown to 12 places, rounded up: equal to within that
        assert abs(s.spread - p.spread * factor) <= D("1e-11") * max(D(1), factor)


@given(
    counts,
    st.integers(min_value=0, max_value=500),
    st.fractions(min_value=Fraction(1, 1000), max_value=10, max_denominator=1000),
    st.decimals(min_value=0, max_value=50, places=2),
    quantities,
    quantities,
    quantities,
    st.one_of(st.none(), quantities),
)
def test_delta_is_process_less_rounding_and_the_splits_add_up(
    good: int,
    scrap: int,
    q: Fraction,
    scrap_pct: Decimal,
    setup: Decimal,
    backflushed: Decimal,
    actual: Decimal,
    actual_setup: Decimal | None,
) -> None:
    e = OrderEvidence(
        "1", "10", "M", "kg", D(good), D(scrap), q, scrap_pct, setup, backflushed, actual,
        actual_setup,
    )  # fmt: skip
    c = compare(e)
    assert c.delta == actual - backflushed
    assert c.process - c.rounding == c.delta
    assert c.theoretical_setup + c.theoretical_running == c.theoretical
    assert c.theoretical_exact == (good + scrap) * q * (1 + Fraction(scrap_pct) / 100) + Fraction(
        setup
    )
    assert abs(Fraction(c.theoretical) - c.theoretical_exact) <= Fraction(1, 2 * 10**12)
    if actual_setup is None:
        assert c.actual_running is None
    else:
        assert c.actual_setup is not None
        assert c.actual_running is not None
        assert c.process_setup is not None
        assert c.process_running is not None
        assert c.actual_setup + c.actual_running == c.actual
        assert c.process_setup + c.process_running == c.process
    many = total([c, c])
    assert many.delta == 2 * c.delta
    assert many.theoretical_exact == 2 * c.theoretical_exact


# --------------------------------------------------------------------------- the BOM revision


def master_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(MASTER.read_text())
    return doc


def rev_c(doc: dict[str, Any]) -> dict[str, Any]:
    bom: dict[str, Any]
    (bom,) = [b for b in doc["boms"] if (b["product"], b["revision"]) == ("FG-100", "C")]
    return bom


def exact_pilot(
    material: str,
    operation: str,
    q: Fraction,
    uom: str,
    true_scrap: str,
    true_setup: str,
    *,
    scrap_pct: str = "0",
    setup: str = "0",
    orders: int = 6,
) -> list[OrderEvidence]:
    rate = q * (1 + Fraction(D(true_scrap)) / 100)
    rows = []
    for i in range(orders):
        counted = 1000 + 500 * i
        actual = rate * counted + Fraction(D(true_setup))
        rows.append(
            evidence(
                f"{material}-{i}",
                counted,
                D(actual.numerator) / D(actual.denominator),
                operation=operation,
                material=material,
                uom=uom,
                bom_quantity=q,
                scrap_pct=scrap_pct,
                setup=setup,
            )
        )
    return rows


def test_proposed_revision_applies_what_may_be_applied_and_loads() -> None:
    doc = master_doc()
    md = load_master_data(doc)
    # FG-100 rev C: RM-BASE 25 L per 100 tubes at 0.92 kg/L = 0.23 kg a tube, 1.5 L = 1.38 kg
    # setup; PK-TUBE 1 a tube at 2 % scrap; PK-CAP comes from phantom PH-CLOSURE.
    base = fit(
        exact_pilot("RM-BASE", "10", Fraction("0.23"), "kg", "4", "1.84", setup="1.38"),
        increment=D("0.001"),
    )
    tube = fit(exact_pilot("PK-TUBE", "20", Fraction(1), "pc", "3.5", "0", scrap_pct="2"))
    cap = fit(exact_pilot("PK-CAP", "20", Fraction(1), "pc", "1", "0"))
    perfume = fit(exact_pilot("RM-PERFUME", "10", Fraction("0.001"), "kg", "9", "0", orders=3))
    proposals = [base, tube, cap, perfume]
    assert (base.proposed_scrap_pct, base.proposed_setup) == (D("4.00"), D("1.840"))
    assert tube.scrap_changed
    assert not tube.setup_changed  # 0 fitted, 0 standard
    assert perfume.thin

    new = proposed_revision(rev_c(doc), proposals, "D", "2027-01-01", pilot="P-7", master=md)
    by_material = {ln["material"]: ln for ln in new["lines"]}
    assert by_material["RM-BASE"]["scrap_pct"] == "4.00"
    assert by_material["RM-BASE"]["setup_quantity"] == "2"  # 1.84 kg at 0.92 kg/L
    assert by_material["PK-TUBE"]["scrap_pct"] == "3.50"
    assert "setup_quantity" not in by_material["PK-TUBE"]
    assert "scrap_pct" not in by_material["RM-PERFUME"]  # thin: never applied
    assert by_material["PK-TUBE"]["alternates"] == [{"material": "PK-TUBE-B", "factor": "1"}]
    assert (new["revision"], new["effective_from"]) == ("D", "2027-01-01")
    assert new["description"] == (
        "FG-100 rev D: rev C with scrap % and setup tuned from pilot P-7: "
        "RM-BASE at operation 10: scrap 0 → 4.00 %, setup 1.38 → 1.840 kg; "
        "PK-TUBE at operation 20: scrap 2 → 3.50 %"
    )
    assert rev_c(doc)["revision"] == "C"  # the original is not touched
    assert "scrap_pct" not in rev_c(doc)["lines"][0]

    notes = revision_notes(rev_c(doc), proposals, master=md)
    assert notes == (
        "applied: RM-BASE at operation 10: scrap 0 → 4.00 %, setup 1.38 → 1.840 kg",
        "not applied: RM-PERFUME at operation 10: the evidence is thin (only 3 orders: at "
        "least 5 are needed to change the standard)",
        "not applied: PK-CAP at operation 20: no line of BOM FG-100 rev C issues it directly; "
        "it may come from phantom PH-CLOSURE: tune that BOM instead",
        "applied: PK-TUBE at operation 20: scrap 2 → 3.50 %",
    )

    doc["boms"].append(new)
    loaded = load_master_data(doc)
    exploded = explode(loaded, loaded.bom("FG-100", "D"))
    rm_base = exploded.component("10", "RM-BASE")
    assert rm_base is not None
    assert (rm_base.rate, rm_base.setup) == (Fraction("0.23") * Fraction("1.04"), Fraction("1.84"))
    tube_c = exploded.component("20", "PK-TUBE")
    assert tube_c is not None
    assert tube_c.rate == Fraction("1.035")
    assert loaded.bom("FG-100").revision == "D"  # in effect from 2027


def test_revision_needs_a_density_and_the_same_bom_quantity() -> None:
    doc = master_doc()
    base = fit(exact_pilot("RM-BASE", "10", Fraction("0.23"), "kg", "4", "1.84", setup="1.38"))
    (note,) = revision_notes(rev_c(doc), [base])
    assert note.startswith("not applied: RM-BASE at operation 10: converting L to kg needs a")
    other = fit(exact_pilot("RM-PERFUME", "10", Fraction("0.002"), "kg", "9", "0"))
    (note,) = revision_notes(rev_c(doc), [other])
    assert note == (
        "not applied: RM-PERFUME at operation 10: its lines in BOM FG-100 rev C add up to 0.001 "
        "kg per unit, the pilot's orders to 0.002: the pilot ran on another BOM quantity, or a "
        "phantom adds to it"
    )
    unchanged = proposed_revision(rev_c(doc), [other], "D")
    assert "effective_from" not in unchanged
    assert unchanged["description"] == (
        "FG-100 rev D: rev C with scrap % and setup tuned from a pilot "
        "(no proposal applied: a copy)"
    )
    assert unchanged["lines"] == rev_c(doc)["lines"]


def test_setup_of_a_material_on_two_lines_goes_on_the_first() -> None:
    bom: dict[str, Any] = {
        "product": "P",
        "revision": "A",
        "uom": "pc",
        "base_quantity": "10",
        "lines": [
            {"material": "RESIN", "quantity": "1", "uom": "kg", "operation": "10"},
            {"material": "RESIN", "quantity": "1000", "uom": "g", "operation": "10",
             "setup_quantity": "500"},
        ],
    }  # fmt: skip
    # two lines of 0.1 kg a unit: 0.2 kg; setup 0.5 kg; the pilot finds 5 % and 0.8 kg
    p = fit(
        exact_pilot("RESIN", "10", Fraction(1, 5), "kg", "5", "0.8", setup="0.5"),
        increment=D("0.001"),
    )
    new = proposed_revision(bom, [p], "B", pilot="P-1")
    assert [(ln["scrap_pct"], ln["setup_quantity"]) for ln in new["lines"]] == [
        ("5.00", "0.8"),
        ("5.00", "0"),
    ]
    md = load_master_data(
        {"materials": [{"id": "RESIN", "uom": "kg", "increment": "0.001"}], "boms": [new]}
    )
    (resin,) = explode(md, md.bom("P")).components
    assert (resin.rate, resin.setup) == (Fraction(21, 100), Fraction(4, 5))


def test_negative_proposals_are_not_applied() -> None:
    bom: dict[str, Any] = {
        "product": "P",
        "revision": "A",
        "uom": "pc",
        "lines": [{"material": "RESIN", "quantity": "0.2", "uom": "kg", "operation": "10",
                   "scrap_pct": "3", "setup_quantity": "1"}],
    }  # fmt: skip
    p = fit(
        exact_pilot("RESIN", "10", Fraction(1, 5), "kg", "-2", "-0.5", scrap_pct="3", setup="1")
    )
    assert isinstance(p, Proposal)
    assert p.changed
    assert not p.thin
    (note,) = revision_notes(bom, [p])
    assert note == (
        "not applied: RESIN at operation 10: a scrap % of -2.00 is outside 0 to 1000 (check the "
        "BOM quantity); a negative setup (-0.5 kg)"
    )
    assert proposed_revision(bom, [p], "B")["lines"] == bom["lines"]
