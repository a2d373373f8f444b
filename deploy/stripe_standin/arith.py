"""Money and calendar arithmetic, the way Stripe does it (pure functions, unit tested).

* amounts are integers in the currency's minor unit (cents; yen for zero-decimal currencies);
* proration is per second: ``r = (period_end - proration_date) / (period_end - period_start)``,
  each proration line ``round_half_up(unit_amount * quantity * r)``;
* month arithmetic keeps the billing anchor's day, clamped to the month's length (31 Jan + 1 month
  = 28 Feb, or 29 Feb in a leap year; the next period after that ends on 31 Mar again).
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

ZERO_DECIMAL = frozenset({
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
})
CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "CA$", "aud": "A$", "chf": "CHF "}
INTERVALS = ("day", "week", "month", "year")
DAY = 86_400


def round_half_up(value: Fraction | Decimal | int) -> int:
    """Round to the nearest integer, halves away from zero (-0.5 -> -1, 0.5 -> 1)."""
    if isinstance(value, int):
        return value
    if isinstance(value, Fraction):
        magnitude = abs(value)
        whole, rest = divmod(magnitude.numerator, magnitude.denominator)
        rounded = whole + (1 if 2 * rest >= magnitude.denominator else 0)
        return rounded if value >= 0 else -rounded
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def proration_ratio(period_start: int, period_end: int, proration_date: int) -> Fraction:
    """The share of the period that is left at ``proration_date`` (exact fraction, per second)."""
    if period_end <= period_start:
        raise ValueError("the period must have a positive length")
    if not period_start <= proration_date <= period_end:
        raise ValueError("proration_date must lie within the period")
    return Fraction(period_end - proration_date, period_end - period_start)


def proration_amount(unit_amount: int, quantity: int, period_start: int, period_end: int, proration_date: int) -> int:
    """Unsigned amount for the remaining time of ``quantity`` × ``unit_amount``, rounded half up."""
    return round_half_up(unit_amount * quantity * proration_ratio(period_start, period_end, proration_date))


def proration_pair(
    old_unit: int, old_quantity: int, new_unit: int, new_quantity: int,
    period_start: int, period_end: int, proration_date: int,
) -> tuple[int, int]:
    """(credit, debit) lines of a mid-period change: credit <= 0 for the unused old time, debit >= 0."""
    credit = -proration_amount(old_unit, old_quantity, period_start, period_end, proration_date)
    debit = proration_amount(new_unit, new_quantity, period_start, period_end, proration_date)
    return credit, debit


def _dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def add_months(ts: int, months: int) -> int:
    """``ts`` plus ``months`` calendar months (UTC), the day clamped to the target month's length."""
    moment = _dt(ts)
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def add_interval(ts: int, interval: str, count: int = 1) -> int:
    """``ts`` plus ``count`` × ``interval`` (day, week, month or year)."""
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + count * 7 * DAY
    if interval == "month":
        return add_months(ts, count)
    if interval == "year":
        return add_months(ts, 12 * count)
    raise ValueError(f"unknown interval {interval!r}")


def next_period_end(anchor: int, interval: str, count: int, after: int) -> int:
    """The first period boundary ``anchor + k × (count × interval)`` (k >= 1) strictly after ``after``.

    Computed from the anchor each time, so 31 Jan -> 28 Feb -> 31 Mar (not 28 Mar).
    """
    k = 1
    if interval in ("day", "week"):
        step = (DAY if interval == "day" else 7 * DAY) * count
        k = max(1, (after - anchor) // step + 1)
        while anchor + k * step <= after:
            k += 1
        return anchor + k * step
    if interval == "year":
        interval, count = "month", 12 * count
    months = (_dt(after).year - _dt(anchor).year) * 12 + _dt(after).month - _dt(anchor).month
    k = max(1, months // count - 1)
    while add_interval(anchor, interval, k * count) <= after:
        k += 1
    while k > 1 and add_interval(anchor, interval, (k - 1) * count) > after:
        k -= 1
    return add_interval(anchor, interval, k * count)


def format_money(amount: int, currency: str) -> str:
    """``1000, "usd"`` -> ``$10.00``; ``1000, "jpy"`` -> ``¥1,000``; negative amounts get a minus."""
    code = currency.lower()
    sign = "-" if amount < 0 else ""
    symbol = CURRENCY_SYMBOLS.get(code)
    number = f"{abs(amount):,}" if code in ZERO_DECIMAL else f"{Decimal(abs(amount)) / 100:,.2f}"
    if symbol is None:
        return f"{sign}{number} {code.upper()}"
    return f"{sign}{symbol}{number}"


def format_date(ts: int) -> str:
    """``15 Jan 2026`` (UTC), as on Stripe's proration line descriptions."""
    moment = _dt(ts)
    return f"{moment.day} {moment.strftime('%b %Y')}"


def describe_interval(interval: str, count: int) -> str:
    return interval if count == 1 else f"every {count} {interval}s"
