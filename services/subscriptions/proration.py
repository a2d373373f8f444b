"""Stripe's proration rule, per second. Pure: no I/O, no clock.

    r = (period_end − proration_date) / (period_end − period_start)
    credit = −round(old_unit × old_quantity × r)     ("Unused time on <old> after <date>")
    debit  = +round(new_unit × new_quantity × r)     ("Remaining time on <new> after <date>")

each rounded half-up (on the magnitude, so a credit is exactly minus the debit it undoes) to minor
units. Amounts are already in minor units, so zero-decimal currencies (JPY) need nothing special.
$10 → $30 on day 15 of a 30-day period: r = 1/2, −500 + 1,500 = +1,000.

This module previews and cross-checks what Stripe computes; it never invents a charge. An interval
change (month → year) restarts the cycle at the proration date: the unused time is credited and the
new price is charged in full for the new period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

HALF = Fraction(1, 2)


def seconds(value: datetime | int) -> int:
    """Unix seconds (Stripe's resolution) of an aware datetime, or the int unchanged."""
    return value if isinstance(value, int) else int(value.timestamp())


def fraction_remaining(period_start: datetime | int, period_end: datetime | int, at: datetime | int) -> Fraction:
    """r in [0, 1]: the part of the period left at `at`. A zero-length period has nothing left."""
    start, end, moment = seconds(period_start), seconds(period_end), seconds(at)
    length = end - start
    if length <= 0:
        return Fraction(0)
    return Fraction(min(max(end - moment, 0), length), length)


def round_half_up(value: Fraction) -> int:
    """Nearest integer, halves away from zero (so round(−x) == −round(x))."""
    magnitude = int(abs(value) + HALF)  # int() floors a non-negative Fraction
    return -magnitude if value < 0 else magnitude


@dataclass(frozen=True)
class Line:
    description: str
    amount: int  # minor units; negative for a credit
    unit_amount: int
    quantity: int
    proration: bool
    period_start: int  # unix seconds
    period_end: int


@dataclass(frozen=True)
class ChangePreview:
    """What a change costs as of `proration_date`: its lines and their sum."""

    proration_date: int
    fraction: Fraction
    lines: tuple[Line, ...]

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines)

    @property
    def proration_total(self) -> int:
        return sum(line.amount for line in self.lines if line.proration)


def prorate(
    *,
    old_unit: int,
    old_quantity: int,
    new_unit: int,
    new_quantity: int,
    period_start: datetime | int,
    period_end: datetime | int,
    proration_date: datetime | int,
) -> ChangePreview:
    """A price or quantity change within the same billing cycle: credit and debit, each rounded."""
    r = fraction_remaining(period_start, period_end, proration_date)
    at, end = seconds(proration_date), seconds(period_end)
    credit = -round_half_up(Fraction(old_unit * old_quantity) * r)
    debit = round_half_up(Fraction(new_unit * new_quantity) * r)
    return ChangePreview(
        proration_date=at,
        fraction=r,
        lines=(
            Line("Unused time", credit, old_unit, old_quantity, True, at, end),
            Line("Remaining time", debit, new_unit, new_quantity, True, at, end),
        ),
    )


def restart_cycle(
    *,
    old_unit: int,
    old_quantity: int,
    new_unit: int,
    new_quantity: int,
    period_start: datetime | int,
    period_end: datetime | int,
    proration_date: datetime | int,
    new_period_end: datetime | int,
) -> ChangePreview:
    """An interval change: the unused time is credited, the new price is charged for a whole new
    period starting at the proration date."""
    r = fraction_remaining(period_start, period_end, proration_date)
    at, end = seconds(proration_date), seconds(period_end)
    credit = -round_half_up(Fraction(old_unit * old_quantity) * r)
    return ChangePreview(
        proration_date=at,
        fraction=r,
        lines=(
            Line("Unused time", credit, old_unit, old_quantity, True, at, end),
            Line("New period", new_unit * new_quantity, new_unit, new_quantity, False, at, seconds(new_period_end)),
        ),
    )


def monthly_amount(amount: int, quantity: int, interval: str, interval_count: int) -> int:
    """MRR of one subscription item: the recurring amount normalised per month, rounded half-up."""
    months = interval_count * (12 if interval == "year" else 1)
    if months <= 0:
        return 0
    return round_half_up(Fraction(amount * quantity, months))
