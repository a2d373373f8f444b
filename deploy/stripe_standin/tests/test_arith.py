"""Pure arithmetic: proration per second, half-up rounding, month arithmetic, zero-decimal money."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest

from deploy.stripe_standin.arith import (
    DAY,
    add_interval,
    add_months,
    format_money,
    next_period_end,
    proration_amount,
    proration_pair,
    proration_ratio,
    round_half_up,
)


def ts(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp())


def day_of(stamp: int) -> tuple[int, int, int]:
    moment = datetime.fromtimestamp(stamp, tz=UTC)
    return moment.year, moment.month, moment.day


def test_ten_to_thirty_dollars_at_the_middle_of_a_thirty_day_period_nets_ten_dollars() -> None:
    start = ts(2026, 1, 1)
    end = start + 30 * DAY
    credit, debit = proration_pair(1000, 1, 3000, 1, start, end, start + 15 * DAY)
    assert (credit, debit) == (-500, 1500)
    assert credit + debit == 1000


def test_ratio_is_exact_per_second() -> None:
    assert proration_ratio(0, 100, 25) == Fraction(3, 4)
    assert proration_ratio(0, 3, 1) == Fraction(2, 3)  # no float drift
    assert proration_amount(1000, 1, 0, 3, 1) == 667  # 666.67 -> 667
    with pytest.raises(ValueError):
        proration_ratio(10, 20, 21)
    with pytest.raises(ValueError):
        proration_ratio(10, 10, 10)


def test_each_line_rounds_half_up_separately() -> None:
    # 1001 × 1/2 = 500.5 -> 501 (credit -501), 3001 × 1/2 = 1500.5 -> 1501
    assert proration_pair(1001, 1, 3001, 1, 0, 2 * DAY, DAY) == (-501, 1501)
    assert round_half_up(Fraction(-1, 2)) == -1
    assert round_half_up(Fraction(1, 2)) == 1
    assert round_half_up(Fraction(49, 100)) == 0
    assert round_half_up(Fraction(-149, 100)) == -1


def test_quantity_multiplies_before_rounding() -> None:
    # 3 × 333 × 1/2 = 499.5 -> 500 (not 3 × round(166.5))
    assert proration_amount(333, 3, 0, 2, 1) == 500


def test_zero_decimal_currency_prorates_in_whole_yen() -> None:
    start = ts(2026, 4, 1)
    end = start + 30 * DAY
    assert proration_pair(1000, 1, 3000, 1, start, end, start + 15 * DAY) == (-500, 1500)
    assert proration_pair(999, 1, 1999, 1, start, end, start + 15 * DAY) == (-500, 1000)  # 499.5 and 999.5 round up
    assert format_money(1000, "jpy") == "¥1,000"
    assert format_money(1000, "usd") == "$10.00"
    assert format_money(-500, "eur") == "-€5.00"
    assert format_money(123456, "sek") == "1,234.56 SEK"


def test_month_end_is_clamped_to_the_month_length() -> None:
    assert day_of(add_months(ts(2026, 1, 31), 1)) == (2026, 2, 28)
    assert day_of(add_months(ts(2024, 1, 31), 1)) == (2024, 2, 29)  # leap year
    assert day_of(add_months(ts(2026, 3, 31), 1)) == (2026, 4, 30)
    assert day_of(add_months(ts(2026, 12, 15), 1)) == (2027, 1, 15)
    assert day_of(add_months(ts(2026, 1, 15), -1)) == (2025, 12, 15)


def test_leap_day_anniversaries() -> None:
    leap = ts(2024, 2, 29)
    assert day_of(add_interval(leap, "year")) == (2025, 2, 28)
    assert day_of(add_interval(leap, "year", 4)) == (2028, 2, 29)


def test_time_of_day_is_kept() -> None:
    start = ts(2026, 1, 31, 13)
    assert add_months(start, 1) == ts(2026, 2, 28, 13)


def test_periods_follow_the_anchor_day_not_the_previous_end() -> None:
    anchor = ts(2026, 1, 31)
    first = next_period_end(anchor, "month", 1, anchor)
    second = next_period_end(anchor, "month", 1, first)
    third = next_period_end(anchor, "month", 1, second)
    assert [day_of(x) for x in (first, second, third)] == [(2026, 2, 28), (2026, 3, 31), (2026, 4, 30)]
    assert day_of(next_period_end(anchor, "month", 3, anchor)) == (2026, 4, 30)
    assert day_of(next_period_end(anchor, "year", 1, anchor)) == (2027, 1, 31)
    assert next_period_end(anchor, "week", 1, anchor) == anchor + 7 * DAY
    assert next_period_end(anchor, "day", 2, anchor + 5 * DAY) == anchor + 6 * DAY


def test_next_period_end_from_far_later_skips_whole_periods() -> None:
    anchor = ts(2026, 1, 31)
    assert day_of(next_period_end(anchor, "month", 1, ts(2030, 6, 15))) == (2030, 6, 30)
    assert day_of(next_period_end(anchor, "month", 1, ts(2030, 6, 30))) == (2030, 7, 31)
