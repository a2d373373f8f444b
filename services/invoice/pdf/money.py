"""Locale-aware formatting of money, quantities, rates and dates (Babel / CLDR).

Amounts are integers in minor units. The exponent of the minor unit is CLDR's currency digits
(babel), which agrees with Stripe's zero-decimal list (JPY, KRW, VND, CLP, ...) and its three-decimal
currencies (BHD, KWD, ...). Stripe's one special case, ISK, is sent to Stripe with two decimals
although CLDR gives it none, so its minor unit here is 1/100 too.

Output keeps the locale's own spacing characters (e.g. a no-break space in ``1.234,56\u00a0€``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from functools import lru_cache

from babel import Locale, UnknownLocaleError
from babel.dates import format_date as _babel_format_date
from babel.numbers import (
    format_currency,
    format_decimal,
    get_currency_precision,
    get_currency_symbol,
    get_decimal_symbol,
    get_group_symbol,
)

DEFAULT_LOCALE = "en_US"

# Where Stripe's minor unit differs from CLDR's digits.
_STRIPE_MINOR_UNIT_OVERRIDES = {"ISK": 2}


@lru_cache(maxsize=256)
def get_locale(locale: str | None) -> Locale:
    """A babel Locale, falling back to en_US for anything unknown or malformed."""
    if locale:
        try:
            return Locale.parse(str(locale).replace("-", "_"))
        except (UnknownLocaleError, ValueError, TypeError):
            pass
    return Locale.parse(DEFAULT_LOCALE)


def is_known_locale(locale: str) -> bool:
    try:
        Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        return False
    return True


def normalize_currency(currency: str | None) -> str:
    return (currency or "").strip().upper() or "USD"


@lru_cache(maxsize=512)
def minor_unit_digits(currency: str) -> int:
    """Number of decimal digits in one unit of `currency` as held in minor units (JPY 0, USD 2)."""
    code = normalize_currency(currency)
    if code in _STRIPE_MINOR_UNIT_OVERRIDES:
        return _STRIPE_MINOR_UNIT_OVERRIDES[code]
    try:
        return int(get_currency_precision(code))
    except Exception:
        return 2


def minor_to_decimal(amount_minor: int, currency: str) -> Decimal:
    return Decimal(int(amount_minor)).scaleb(-minor_unit_digits(currency))


_LETTER_THEN_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)")
_DIGIT_THEN_LETTER = re.compile(r"(?<=\d)(?=[^\W\d_])")


def _currency_spacing(text: str) -> str:
    """CLDR currencySpacing, which babel skips: "BHD1,234.567" -> "BHD\u00a01,234.567"."""
    return _DIGIT_THEN_LETTER.sub("\u00a0", _LETTER_THEN_DIGIT.sub("\u00a0", text))


def _babel_format_money(amount_minor: int, code: str, locale: str | None) -> str:
    loc = get_locale(locale)
    value = minor_to_decimal(amount_minor, code)
    try:
        return _currency_spacing(format_currency(value, code, locale=loc, currency_digits=True))
    except Exception:  # an exotic code babel chokes on: still print something sensible
        return f"{code}\u00a0{format_decimal(value, locale=loc)}"


_QUOTED = re.compile(r"'([^']*)'")


@lru_cache(maxsize=1024)
def _fast_formatter(code: str, locale: str | None) -> Callable[[int], str] | None:
    """Integer-only equivalent of babel's currency formatting for one (currency, locale).

    babel's NumberPattern.apply costs ~50 µs a call (Decimal arithmetic); invoices format hundreds
    of amounts. This precomputes the pattern's affixes and symbols and formats with int arithmetic.
    Returns None where the pattern needs babel itself (scientific, significant digits, currency
    names, or a currency whose display digits differ from its minor unit). Tests check it
    against babel across locales and currencies.
    """
    try:
        loc = get_locale(locale)
        pattern = loc.currency_formats["standard"]
        digits = int(get_currency_precision(code))
        if (
            pattern.exp_prec
            or "@" in pattern.pattern
            or pattern.scale
            or not pattern.number_pattern
            or digits != minor_unit_digits(code)
        ):
            return None
        affixes = (*pattern.prefix, *pattern.suffix)
        if any("¤¤¤" in a for a in affixes):
            return None
        symbol = get_currency_symbol(code, loc)

        def affix(text: str) -> str:
            text = text.replace("¤¤", code).replace("¤", symbol)
            return _QUOTED.sub(lambda m: m.group(1) or "'", text)

        prefix = tuple(_currency_spacing(affix(p) + "0")[:-1] for p in pattern.prefix)
        suffix = tuple(_currency_spacing("0" + affix(s))[1:] for s in pattern.suffix)
        group = get_group_symbol(loc, numbering_system="latn")
        decimal = get_decimal_symbol(loc, numbering_system="latn")
        g1, g2 = pattern.grouping
        int_min = pattern.int_prec[0]
        scale = 10**digits
    except Exception:
        return None

    def fmt(amount: int) -> str:
        negative = amount < 0
        major, minor = divmod(-amount if negative else amount, scale)
        value = str(major)
        if len(value) < int_min:
            value = "0" * (int_min - len(value)) + value
        grouped = ""
        size = g1
        while len(value) > size:
            grouped = group + value[-size:] + grouped
            value = value[:-size]
            size = g2
        number = value + grouped
        if digits:
            number += decimal + str(minor).rjust(digits, "0")
        return prefix[negative] + number + suffix[negative]

    return fmt


def format_money(amount_minor: int, currency: str, locale: str) -> str:
    """`format_money(123456, "USD", "en_US") == "$1,234.56"`; JPY 1235 -> "¥1,235"."""
    code = normalize_currency(currency)
    fast = _fast_formatter(code, locale)
    if fast is not None:
        try:
            return fast(int(amount_minor))
        except Exception:
            pass
    return _babel_format_money(amount_minor, code, locale)


def format_quantity(quantity: Decimal | int | float | str, locale: str) -> str:
    try:
        value = Decimal(str(quantity))
    except Exception:
        return str(quantity)
    if not value.is_finite():
        return str(quantity)
    value = value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()
    return format_decimal(value, locale=get_locale(locale), decimal_quantization=False)


def format_rate(rate: Decimal | int | float | str | None, locale: str) -> str:
    """A percentage given in percent units: Decimal("8.25") -> "8.25%"."""
    if rate is None:
        return ""
    return f"{format_quantity(rate, locale)}%"


def format_date(value: date | None, locale: str) -> str:
    if value is None:
        return ""
    return _babel_format_date(value, format="medium", locale=get_locale(locale))
