"""Stripe's proration rule (services/subscriptions/proration.py), with property tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from services.subscriptions.proration import (
    fraction_remaining,
    monthly_amount,
    prorate,
    restart_cycle,
    round_half_up,
    seconds,
)

START = datetime(2026, 4, 1, tzinfo=UTC)
amounts = st.integers(min_value=0, max_value=99_999_999)
quantities = st.integers(min_value=1, max_value=1_000)
lengths = st.integers(min_value=0, max_value=3 * 366 * 86_400)


def test_the_issue_example_10_to_30_dollars_on_day_15_of_30() -> None:
    end = START + timedelta(days=30)
    result = prorate(old_unit=1_000, old_quantity=1, new_unit=3_000, new_quantity=1,
                     period_start=START, period_end=end, proration_date=START + timedelta(days=15))
    assert result.fraction == Fraction(1, 2)
    assert [line.amount for line in result.lines] == [-500, 1_500]
    assert result.total == 1_000


def test_zero_decimal_currency_amounts_are_whole_yen() -> None:
    # JPY has no minor unit: ¥1,000 → ¥3,000 halfway nets ¥1,000, not ¥100,000 or ¥10.
    end = START + timedelta(days=30)
    result = prorate(old_unit=1_000, old_quantity=1, new_unit=3_000, new_quantity=1,
                     period_start=START, period_end=end, proration_date=START + timedelta(days=15))
    assert result.total == 1_000
    # a third of a period of ¥1,001: 333.67 → 334, credit −334
    third = prorate(old_unit=1_001, old_quantity=1, new_unit=1_001, new_quantity=2, period_start=START,
                    period_end=START + timedelta(seconds=3), proration_date=START + timedelta(seconds=2))
    assert [line.amount for line in third.lines] == [-334, 667]


def test_leap_year_february_counts_its_29th_day() -> None:
    feb = datetime(2028, 2, 1, tzinfo=UTC)
    march = datetime(2028, 3, 1, tzinfo=UTC)
    r = fraction_remaining(feb, march, datetime(2028, 2, 29, tzinfo=UTC))
    assert r == Fraction(1, 29)
    result = prorate(old_unit=2_900, old_quantity=1, new_unit=5_800, new_quantity=1,
                     period_start=feb, period_end=march, proration_date=datetime(2028, 2, 29, tzinfo=UTC))
    assert [line.amount for line in result.lines] == [-100, 200]


def test_zero_length_period_prorates_nothing() -> None:
    result = prorate(old_unit=1_000, old_quantity=3, new_unit=9_000, new_quantity=3,
                     period_start=START, period_end=START, proration_date=START)
    assert result.fraction == 0
    assert [line.amount for line in result.lines] == [0, 0]


def test_rounding_is_half_up_on_the_magnitude() -> None:
    assert round_half_up(Fraction(5, 2)) == 3
    assert round_half_up(Fraction(-5, 2)) == -3
    assert round_half_up(Fraction(249, 100)) == 2
    assert round_half_up(Fraction(-251, 100)) == -3


def test_interval_change_credits_the_rest_and_bills_a_whole_new_period() -> None:
    end = START + timedelta(days=30)
    at = START + timedelta(days=15)
    result = restart_cycle(old_unit=1_000, old_quantity=1, new_unit=10_000, new_quantity=1, period_start=START,
                           period_end=end, proration_date=at, new_period_end=at + timedelta(days=365))
    assert [line.amount for line in result.lines] == [-500, 10_000]
    assert result.proration_total == -500
    assert result.total == 9_500


def test_monthly_amount_normalises_intervals() -> None:
    assert monthly_amount(12_000, 1, "year", 1) == 1_000
    assert monthly_amount(3_000, 2, "month", 3) == 2_000
    assert monthly_amount(1_000, 1, "month", 1) == 1_000
    assert monthly_amount(1_000, 1, "year", 1) == 83  # 83.33


@given(old=amounts, new=amounts, old_q=quantities, new_q=quantities, length=lengths,
       offset=st.integers(min_value=-86_400, max_value=4 * 366 * 86_400))
def test_credit_plus_debit_is_the_sum_of_the_rounded_parts(old: int, new: int, old_q: int, new_q: int, length: int,
                                                          offset: int) -> None:
    end = START + timedelta(seconds=length)
    at = START + timedelta(seconds=offset)
    result = prorate(old_unit=old, old_quantity=old_q, new_unit=new, new_quantity=new_q,
                     period_start=START, period_end=end, proration_date=at)
    r = result.fraction
    credit, debit = (line.amount for line in result.lines)
    assert 0 <= r <= 1
    assert credit == -round_half_up(Fraction(old * old_q) * r)
    assert debit == round_half_up(Fraction(new * new_q) * r)
    assert result.total == credit + debit
    # each line is off the exact value by at most half a minor unit
    assert abs(credit + Fraction(old * old_q) * r) <= Fraction(1, 2)
    assert abs(debit - Fraction(new * new_q) * r) <= Fraction(1, 2)
    assert -old * old_q <= credit <= 0 <= debit <= new * new_q


@given(unit=amounts, q=quantities, length=lengths, offset=st.integers(min_value=0, max_value=3 * 366 * 86_400))
def test_changing_to_the_same_price_nets_exactly_zero(unit: int, q: int, length: int, offset: int) -> None:
    result = prorate(old_unit=unit, old_quantity=q, new_unit=unit, new_quantity=q, period_start=START,
                     period_end=START + timedelta(seconds=length), proration_date=START + timedelta(seconds=offset))
    assert result.total == 0


@given(length=st.integers(min_value=1, max_value=3 * 366 * 86_400), offset=st.integers(min_value=-10**7,
                                                                                        max_value=10**8))
def test_fraction_is_per_second_and_clamped(length: int, offset: int) -> None:
    end = START + timedelta(seconds=length)
    at = START + timedelta(seconds=offset)
    r = fraction_remaining(START, end, at)
    assert 0 <= r <= 1
    if 0 <= offset <= length:
        assert r == Fraction(seconds(end) - seconds(at), length)
    elif offset < 0:
        assert r == 1
    else:
        assert r == 0


@given(year=st.integers(min_value=2000, max_value=2100), unit=amounts)
def test_february_of_any_year_has_as_many_seconds_as_its_days(year: int, unit: int) -> None:
    start = datetime(year, 2, 1, tzinfo=UTC)
    end = datetime(year, 3, 1, tzinfo=UTC)
    days = (end - start).days
    assert days == (29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28)
    last_day = end - timedelta(days=1)
    result = prorate(old_unit=unit, old_quantity=1, new_unit=unit, new_quantity=2, period_start=start,
                     period_end=end, proration_date=last_day)
    assert result.fraction == Fraction(1, days)
