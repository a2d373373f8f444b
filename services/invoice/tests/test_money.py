from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.invoice.money import AmountError, LineInput, allocate, compute_totals, round_half_up

rates = st.one_of(st.none(), st.decimals(min_value=0, max_value=100, places=2))
lines = st.builds(
    LineInput,
    quantity=st.decimals(min_value=Decimal("0.0001"), max_value=10_000, places=4),
    unit_price=st.integers(min_value=0, max_value=10_000_000),
    discount=st.just(0),
    discount_percent=st.one_of(st.none(), st.decimals(min_value=0, max_value=100, places=2)),
    tax_rate=rates,
)


@given(st.lists(lines, min_size=1, max_size=20), st.decimals(min_value=0, max_value=100, places=2), rates)
def test_totals_identities(items: list[LineInput], discount_percent: Decimal, tax_rate: Decimal | None) -> None:
    totals = compute_totals(items, discount_percent=discount_percent, tax_rate=tax_rate)
    assert totals.subtotal == sum(line.amount for line in totals.lines)
    assert totals.tax_amount == sum(line.tax for line in totals.lines)
    assert totals.total == totals.subtotal - totals.discount_amount + totals.tax_amount
    assert 0 <= totals.discount_amount <= totals.subtotal
    for item, line in zip(items, totals.lines, strict=True):
        assert line.gross == round_half_up(item.quantity * item.unit_price)
        assert line.amount == line.gross - line.discount >= 0
        assert isinstance(line.amount, int) and isinstance(line.tax, int)


@given(st.integers(min_value=0, max_value=10**9), st.lists(st.integers(min_value=0, max_value=10**9), min_size=1))
def test_allocation_sums_exactly(amount: int, weights: list[int]) -> None:
    shares = allocate(amount, weights)
    if sum(weights) == 0:
        assert shares == [0] * len(weights)
    else:
        assert sum(shares) == amount
        assert all(share >= 0 for share in shares)


def test_worked_example() -> None:
    # 3 × 33.33 = 99.99, 10% line discount → 10.00 off (9.999 rounds half up to 10.00 = 1000 cents)
    totals = compute_totals(
        [
            LineInput(quantity=Decimal(3), unit_price=3333, discount_percent=Decimal(10)),
            LineInput(quantity=Decimal("1.5"), unit_price=1001, tax_rate=Decimal(0)),
        ],
        discount_fixed=500,
        tax_rate=Decimal(20),
    )
    assert totals.lines[0].gross == 9999 and totals.lines[0].discount == 1000 and totals.lines[0].amount == 8999
    assert totals.lines[1].gross == 1502  # 1501.5 rounds half up
    assert totals.subtotal == 10501
    assert totals.discount_amount == 500
    # invoice discount split 8999:1502 → 428 / 72 (largest remainder); tax 20% only on line 1
    assert totals.tax_amount == round_half_up(Decimal(8999 - 428) * Decimal("0.2")) == 1714
    assert totals.total == 10501 - 500 + 1714


def test_zero_decimal_currency_is_whole_units() -> None:
    totals = compute_totals([LineInput(quantity=Decimal("2.5"), unit_price=1001)], tax_rate=Decimal(10))
    assert totals.subtotal == 2503  # 2502.5 yen rounds half up
    assert totals.tax_amount == 250


def test_discount_larger_than_line_is_refused() -> None:
    with pytest.raises(AmountError):
        compute_totals([LineInput(quantity=Decimal(1), unit_price=100, discount=101)])
    with pytest.raises(AmountError):
        compute_totals([LineInput(quantity=Decimal(1), unit_price=100)], discount_fixed=101)
