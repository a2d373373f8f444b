"""Currencies: which codes exist, and how many decimals their minor unit has (CLDR, through Babel, as
the invoice service counts them: JPY 0, EUR 2, BHD 3)."""

from __future__ import annotations

from decimal import Decimal
from functools import cache

from babel.numbers import get_currency_precision, list_currencies

from kit.errors import InvalidInput


@cache
def known_currencies() -> frozenset[str]:
    return frozenset(list_currencies())


@cache
def exponent(currency: str) -> int:
    return int(get_currency_precision(currency))


def major_units(amount: int, currency: str) -> Decimal:
    """Minor units as an exact decimal amount of the currency (1234 EUR cents -> 12.34)."""
    return Decimal(amount).scaleb(-exponent(currency))


def check_currency(value: str | None) -> str | None:
    """A `currency` filter: an ISO 4217 code (any case), or a 4xx naming it."""
    if value is None:
        return None
    code = value.upper()
    if code not in known_currencies():
        raise InvalidInput(f"Unknown currency {value!r}: expected an ISO 4217 code such as EUR.",
                           details=[{"field": "currency", "message": "unknown currency"}])
    return code
