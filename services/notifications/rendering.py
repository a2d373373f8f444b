"""Email content: Jinja2 templates (HTML and plain text, plus a one-line subject) per kind."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from babel import Locale
from babel.dates import format_date
from babel.numbers import format_currency, get_currency_precision
from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
LOCALE = Locale.parse("en_US")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def money(minor: int | None, currency: str | None) -> str:
    """Minor units to a display string: 123456 EUR -> '€1,234.56'; 1500 JPY -> '¥1,500'."""
    if minor is None or not currency:
        return ""
    digits = get_currency_precision(currency.upper())
    return format_currency(Decimal(int(minor)).scaleb(-digits), currency.upper(), locale=LOCALE)


def long_date(value: date | datetime | str | None) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value) if "T" in value else date.fromisoformat(value)
    if isinstance(value, datetime):
        value = value.date()
    return format_date(value, format="long", locale=LOCALE)


class InvoiceView(dict[str, Any]):
    """The invoice as templates see it. Display strings (money, dates) are formatted on first use
    only: a subject line needs two fields, not all of them (the reminder scan renders thousands)."""

    _LAZY = {
        "total": lambda s: money(s.get("total"), s.get("currency")),
        "amount_paid": lambda s: money(s.get("amountPaid"), s.get("currency")),
        "amount_due": lambda s: money(s.get("amountDue"), s.get("currency")),
        "due_date": lambda s: long_date(s.get("dueDate")),
        "issue_date": lambda s: long_date(s.get("issueDate")),
    }

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__(
            id=snapshot.get("id"),
            number=snapshot.get("invoiceNumber"),
            status=snapshot.get("status"),
            currency=snapshot.get("currency"),
            amount_paid_minor=int(snapshot.get("amountPaid") or 0),
            amount_due_minor=int(snapshot.get("amountDue") or 0),
        )
        self._snapshot = snapshot

    def __missing__(self, key: str) -> Any:
        formatter = self._LAZY.get(key)
        if formatter is None:
            raise KeyError(key)
        value = self[key] = formatter(self._snapshot)
        return value


def invoice_view(snapshot: dict[str, Any] | None) -> InvoiceView | None:
    """The invoice as templates see it, from a camelCase snapshot (InvoiceSnapshotV1 on the wire)."""
    return InvoiceView(snapshot) if snapshot else None


_SUBJECT_SPACES = re.compile(r"\s+")


class Renderer:
    def __init__(self, templates_dir: Path = TEMPLATES_DIR) -> None:
        loader = FileSystemLoader(str(templates_dir))
        self._html = Environment(loader=loader, autoescape=select_autoescape(["html"], default=True))
        self._text = Environment(loader=loader, autoescape=False, keep_trailing_newline=True)  # noqa: S701

    def has_kind(self, kind: str) -> bool:
        try:
            self._text.get_template(f"{kind}.subject.txt")
        except Exception:
            return False
        return True

    def subject(self, kind: str, context: dict[str, Any]) -> str:
        raw = self._text.get_template(f"{kind}.subject.txt").render(context)
        # One line, no header injection, a sane length.
        return _SUBJECT_SPACES.sub(" ", raw).strip()[:250]

    def render(self, kind: str, context: dict[str, Any]) -> RenderedEmail:
        subject = self.subject(kind, context)
        full = {**context, "subject": subject}
        text = self._text.get_template(f"{kind}.txt").render(full)
        text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
        html = self._html.get_template(f"{kind}.html").render(full)
        return RenderedEmail(subject=subject, text=text, html=html)
