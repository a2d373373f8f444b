"""Invoice arithmetic in integer minor units. Pure functions; no I/O.

line gross    = round_half_up(quantity × unit_price)
line discount = fixed amount, or round_half_up(gross × percent / 100)
line amount   = gross − line discount
subtotal      = Σ line amounts
discount      = invoice-level fixed amount, or round_half_up(subtotal × percent / 100)
tax           = Σ round_half_up((line amount − line's share of the invoice discount) × rate / 100),
                rate = line rate, else invoice rate
total         = subtotal − discount + tax;   amount due = total − amount paid
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cache

from babel.numbers import get_currency_precision, list_currencies

HUNDRED = Decimal(100)
MAX_AMOUNT = 10**15  # one quadrillion minor units: far above any real invoice, far below bigint


class AmountError(ValueError):
    """The numbers cannot make a valid invoice (e.g. a discount larger than the line). `field`: the
    body field at fault, as the API names it (`items.0.discount`), when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@cache
def known_currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def currency_exponent(currency: str) -> int:
    return get_currency_precision(currency)


@dataclass(frozen=True)
class LineInput:
    quantity: Decimal
    unit_price: int
    discount: int = 0
    discount_percent: Decimal | None = None
    tax_rate: Decimal | None = None


@dataclass(frozen=True)
class LineResult:
    gross: int
    discount: int
    amount: int
    tax: int


@dataclass(frozen=True)
class Totals:
    lines: tuple[LineResult, ...]
    subtotal: int
    discount_amount: int
    tax_amount: int
    total: int


def _line_gross_and_discount(index: int, line: LineInput) -> tuple[int, int]:
    gross = round_half_up(line.quantity * line.unit_price)
    if line.discount_percent is not None:
        discount = round_half_up(gross * line.discount_percent / HUNDRED)
    else:
        discount = line.discount
    field = f"items.{index}.{'discountPercent' if line.discount_percent is not None else 'discount'}"
    if discount < 0:
        raise AmountError("A line discount cannot be negative.", field=field)
    if discount > gross:
        raise AmountError("A line discount cannot exceed the line amount.", field=field)
    return gross, discount


def allocate(amount: int, weights: list[int]) -> list[int]:
    """Split `amount` across `weights` proportionally; shares sum exactly to `amount`
    (largest remainder method, ties to the earlier line)."""
    total_weight = sum(weights)
    if amount == 0 or total_weight == 0:
        return [0] * len(weights)
    shares = [amount * w // total_weight for w in weights]
    remainders = [(amount * w % total_weight, -i) for i, w in enumerate(weights)]
    left = amount - sum(shares)
    for _, neg_index in sorted(remainders, reverse=True)[:left]:
        shares[-neg_index] += 1
    return shares


def compute_totals(
    lines: list[LineInput],
    *,
    discount_fixed: int = 0,
    discount_percent: Decimal | None = None,
    tax_rate: Decimal | None = None,
) -> Totals:
    grosses_discounts = [_line_gross_and_discount(index, line) for index, line in enumerate(lines)]
    amounts = [gross - discount for gross, discount in grosses_discounts]
    subtotal = sum(amounts)
    if discount_percent is not None:
        discount_amount = round_half_up(subtotal * discount_percent / HUNDRED)
    else:
        discount_amount = discount_fixed
    field = "discountPercent" if discount_percent is not None else "discountFixed"
    if discount_amount < 0:
        raise AmountError("The invoice discount cannot be negative.", field=field)
    if discount_amount > subtotal:
        raise AmountError("The invoice discount cannot exceed the subtotal.", field=field)
    shares = allocate(discount_amount, amounts)
    results = []
    for line, (gross, discount), amount, share in zip(lines, grosses_discounts, amounts, shares, strict=True):
        rate = line.tax_rate if line.tax_rate is not None else tax_rate
        tax = round_half_up((amount - share) * rate / HUNDRED) if rate else 0
        results.append(LineResult(gross=gross, discount=discount, amount=amount, tax=tax))
    tax_amount = sum(r.tax for r in results)
    total = subtotal - discount_amount + tax_amount
    if total > MAX_AMOUNT:
        raise AmountError("The invoice total is beyond the supported range.")
    return Totals(
        lines=tuple(results),
        subtotal=subtotal,
        discount_amount=discount_amount,
        tax_amount=tax_amount,
        total=total,
    )


# -- invoices mirrored from Stripe ----------------------------------------------------------------
# Stripe computes a subscription invoice (periods, prorations, discounts, tax) and we copy it: its
# amounts are taken as they are, never recomputed by the rules above. A proration credit is a line
# with a negative amount, which only a Stripe-sourced invoice may have (our own lines stay >= 0).


def stripe_line_price(amount: int, quantity: int | None) -> tuple[Decimal, int]:
    """(quantity, unit price) printed for a Stripe line of `amount`: Stripe's quantity when the amount
    divides by it exactly, else 1 × the amount (a proration's unit price can have a fraction of a
    cent), so quantity × unit price is always the line's amount to the cent."""
    if quantity and quantity > 0 and amount % quantity == 0:
        return Decimal(quantity), amount // quantity
    return Decimal(1), amount


def stripe_totals(amounts: list[int], *, tax: int, total: int) -> Totals:
    """Totals of a Stripe invoice from its line amounts (signed), its tax and its total. Whatever
    Stripe took off the lines (coupons, discounts) is the discount: subtotal − discount + tax = total
    holds exactly, as for our own invoices. AmountError when no such discount exists (Stripe's total
    above lines + tax: an invoice we cannot represent)."""
    subtotal = sum(amounts)
    discount_amount = subtotal + tax - total
    if discount_amount < 0:
        raise AmountError(f"Stripe's total {total} is more than its lines ({subtotal}) plus tax ({tax}).")
    if abs(total) > MAX_AMOUNT or abs(subtotal) > MAX_AMOUNT:
        raise AmountError("The invoice total is beyond the supported range.")
    return Totals(
        lines=tuple(LineResult(gross=amount, discount=0, amount=amount, tax=0) for amount in amounts),
        subtotal=subtotal,
        discount_amount=discount_amount,
        tax_amount=tax,
        total=total,
    )
