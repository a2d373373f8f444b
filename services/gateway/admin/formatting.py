"""Money and dates for people: Babel formatting by the browser's locale, and money typed in major units.

Amounts travel in minor units (integers); a person types and reads major units. The conversion uses
the currency's exponent as Babel (CLDR, like Stripe) knows it: 95.00 EUR = 9500, 950 JPY = 950, and
95.001 EUR or 95.5 JPY are refused with a sentence saying why, never rounded.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import (
    NumberFormatError,
    format_currency,
    format_decimal,
    get_currency_precision,
    get_decimal_symbol,
    list_currencies,
    parse_decimal,
)
from jinja2 import Environment
from starlette.requests import Request

DEFAULT_LOCALE = "en_US"
# The locales the admin pages offer (the browser's Accept-Language picks one).
LOCALES = ("en_US", "en_GB", "en_IE", "de_DE", "de_AT", "de_CH", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_PT",
           "sv_SE", "da_DK", "pl_PL", "ja_JP")
MAX_MINOR = 10**15  # the services' ceiling for an amount


def request_locale(request: Request) -> str:
    cached = getattr(request.state, "admin_locale", None)
    if isinstance(cached, str):
        return cached
    preferred = []
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().replace("-", "_")
        if tag and tag != "*":
            preferred.append(tag)
    chosen = Locale.negotiate(preferred, LOCALES, sep="_") if preferred else None
    locale = str(chosen) if chosen else DEFAULT_LOCALE
    if locale not in LOCALES:  # negotiate may answer a bare language ("de"): use its first region
        locale = next((loc for loc in LOCALES if loc.startswith(locale.split("_")[0] + "_")), DEFAULT_LOCALE)
    request.state.admin_locale = locale
    return locale


def exponent(currency: str) -> int:
    return int(get_currency_precision(currency))


def known_currency(code: str) -> bool:
    return code in _CURRENCIES


_CURRENCIES = frozenset(list_currencies())


def to_major(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-exponent(currency))


def money(minor: int | None, currency: str | None, locale: str = DEFAULT_LOCALE) -> str:
    if minor is None or not currency:
        return "—"
    try:
        return str(format_currency(to_major(minor, currency), currency, locale=locale))
    except (UnknownLocaleError, ValueError):
        return f"{to_major(minor, currency)} {currency}"


def major_input(minor: int | None, currency: str | None, locale: str = DEFAULT_LOCALE) -> str:
    """An amount as it goes back into a form field (no currency sign, no grouping)."""
    if minor is None or not currency:
        return ""
    places = exponent(currency)
    value = to_major(minor, currency)
    text = f"{value:.{places}f}"
    return text.replace(".", get_decimal_symbol(locale)) if places else text


def number(value: Decimal | int | str | None, locale: str = DEFAULT_LOCALE) -> str:
    if value is None or value == "":
        return ""
    return str(format_decimal(Decimal(str(value)).normalize(), locale=locale))


def plain_decimal(value: Decimal | str | None) -> str:
    """A quantity or a rate for a form field: 2.0000 -> 2, 19.5000 -> 19.5."""
    if value is None or value == "":
        return ""
    normalized = Decimal(str(value)).normalize()
    return f"{normalized:f}"


def day(value: date | datetime | str | None, locale: str = DEFAULT_LOCALE) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value) if "T" in value else date.fromisoformat(value)
    if isinstance(value, datetime):
        value = value.date()
    return str(format_date(value, format="medium", locale=locale))


def moment(value: datetime | str | None, locale: str = DEFAULT_LOCALE) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return str(format_datetime(value, format="medium", locale=locale, tzinfo="UTC"))


class MoneyInputError(ValueError):
    """A typed amount that cannot be an amount of this currency; the message is for the person."""


def parse_major(text: str, currency: str, locale: str = DEFAULT_LOCALE, *, allow_zero: bool = True) -> int:
    """"95.00" (EUR) -> 9500; "1,234.5" -> 123450; refuses more decimals than the currency has."""
    cleaned = text.strip().replace("\u00a0", "").replace(" ", "")
    if not cleaned:
        raise MoneyInputError("Enter an amount.")
    value = _parse_number(cleaned, locale)
    if value is None:
        raise MoneyInputError(f"“{text.strip()}” is not an amount.")
    if value < 0:
        raise MoneyInputError("An amount cannot be negative.")
    places = exponent(currency)
    scaled = value.scaleb(places)
    if scaled != scaled.to_integral_value():
        if places == 0:
            raise MoneyInputError(f"{currency} has no decimals: enter a whole amount.")
        raise MoneyInputError(f"{currency} has {places} decimals at most: {text.strip()} has more.")
    minor = int(scaled)
    if minor > MAX_MINOR:
        raise MoneyInputError("That amount is too large.")
    if minor == 0 and not allow_zero:
        raise MoneyInputError("Enter an amount above zero.")
    return minor


def parse_decimal_input(text: str, locale: str = DEFAULT_LOCALE) -> Decimal | None:
    """A quantity or a percentage as typed; None when it is not a number."""
    cleaned = text.strip().replace("\u00a0", "").replace(" ", "").rstrip("%")
    if not cleaned:
        return None
    return _parse_number(cleaned, locale)


def _parse_number(text: str, locale: str) -> Decimal | None:
    try:
        value = parse_decimal(text, locale=locale, strict=True)
    except (NumberFormatError, InvalidOperation, UnknownLocaleError):
        # A plain "95.00" is understood whatever the locale (a German browser, a pasted figure).
        try:
            value = Decimal(text)
        except InvalidOperation:
            return None
    if not value.is_finite():
        return None
    return Decimal(value)


STATUS_LABELS = {
    "DRAFT": "Draft", "SENT": "Sent", "VIEWED": "Viewed", "PARTIAL": "Partially paid", "PAID": "Paid",
    "OVERDUE": "Overdue", "CANCELLED": "Cancelled",
}
METHOD_LABELS = {
    "card": "Card", "bank_transfer": "Bank transfer", "cash": "Cash", "cheque": "Cheque", "other": "Other",
    "sepa_debit": "SEPA debit", "us_bank_account": "US bank account",
}


def label(value: Any, table: dict[str, str]) -> str:
    text = str(value or "")
    return table.get(text, text.replace("_", " ").capitalize())


def install(env: Environment) -> None:
    env.filters["status_label"] = lambda v: label(v, STATUS_LABELS)
    env.filters["method_label"] = lambda v: label(v, METHOD_LABELS)
    env.filters["humanize"] = lambda v: label(v, {})
    env.globals.update(money=money, major_input=major_input, number=number, day=day, moment=moment,
                       plain_decimal=plain_decimal)
