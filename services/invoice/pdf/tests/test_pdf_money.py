"""Money, quantity and date formatting per currency and locale."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.invoice.pdf import format_money
from services.invoice.pdf.money import _babel_format_money, format_quantity, format_rate, minor_unit_digits


def nbsp(text: str) -> str:
    """Babel keeps the locale's no-break spaces; compare them as plain spaces."""
    return text.replace("\xa0", " ").replace("\u202f", " ")


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "expected"),
    [
        (123456, "USD", "en_US", "$1,234.56"),
        (123456, "EUR", "de_DE", "1.234,56 €"),
        (1235, "JPY", "en_US", "¥1,235"),
        (1235, "JPY", "ja_JP", "￥1,235"),
        (1234, "KRW", "ko_KR", "₩1,234"),
        (1234567, "KRW", "en_US", "₩1,234,567"),
        (-123456, "USD", "en_US", "-$1,234.56"),
        (-1235, "JPY", "en_US", "-¥1,235"),
        (-123456, "EUR", "de_DE", "-1.234,56 €"),
        (0, "USD", "en_US", "$0.00"),
        (1, "USD", "en_US", "$0.01"),
        (5, "EUR", "fr_FR", "0,05 €"),
        (123456789, "EUR", "fr_FR", "1 234 567,89 €"),
        (123456, "GBP", "en_GB", "£1,234.56"),
        (123456, "CHF", "de_CH", "CHF 1’234.56"),
        (12345678, "INR", "en_IN", "₹1,23,456.78"),
        (1234567, "BHD", "en_US", "BHD 1,234.567"),  # three-decimal currency
        (500, "ISK", "is_IS", "5 kr."),  # Stripe sends ISK with two (always zero) decimals
        (123456, "usd", "en_US", "$1,234.56"),  # lower-case code
        (123456, "USD", "not_a_locale", "$1,234.56"),  # unknown locale falls back to en_US
        (123456, "XYZ", "en_US", "XYZ 1,234.56"),  # unknown code: printed as the code
        (10**20, "USD", "en_US", "$1,000,000,000,000,000,000.00"),
    ],
)
def test_format_money(amount: int, currency: str, locale: str, expected: str) -> None:
    assert nbsp(format_money(amount, currency, locale)) == expected


def test_zero_decimal_currencies_have_no_minor_unit() -> None:
    for code in ("JPY", "KRW", "VND", "CLP", "UGX", "XAF", "XOF", "PYG"):
        assert minor_unit_digits(code) == 0
    assert minor_unit_digits("USD") == 2 and minor_unit_digits("KWD") == 3 and minor_unit_digits("ISK") == 2


_LOCALES = ["en_US", "de_DE", "fr_FR", "ja_JP", "en_IN", "de_CH", "ar_EG", "he_IL", "pt_BR", "nl_NL", "sv_SE", "zh_CN"]
_CURRENCIES = ["USD", "EUR", "JPY", "KRW", "GBP", "INR", "BHD", "ISK", "CLP", "SEK", "ILS", "XYZ"]


@settings(max_examples=300, deadline=None)
@given(
    amount=st.integers(min_value=-(10**16), max_value=10**16),
    currency=st.sampled_from(_CURRENCIES),
    locale=st.sampled_from(_LOCALES),
)
def test_fast_path_matches_babel(amount: int, currency: str, locale: str) -> None:
    assert format_money(amount, currency, locale) == _babel_format_money(amount, currency, locale)


def test_quantities_and_rates() -> None:
    assert format_quantity(Decimal("2.500"), "en_US") == "2.5"
    assert format_quantity(Decimal("1000"), "en_US") == "1,000"
    assert format_quantity(Decimal("36.5"), "de_DE") == "36,5"
    assert format_quantity(Decimal("1E+2"), "en_US") == "100"
    assert format_rate(Decimal("8.25"), "en_US") == "8.25%"
    assert format_rate(Decimal("19"), "de_DE") == "19%"
    assert format_rate(None, "en_US") == ""
