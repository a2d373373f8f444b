"""A realistic sample invoice for previewing template settings before they are saved."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from babel.numbers import get_territory_currencies

from services.invoice.pdf.models import ClientInfo, InvoiceDocument, InvoiceStatus, LineItem, TemplateSettings
from services.invoice.pdf.money import get_locale, minor_unit_digits

_SAMPLE_LINES = (
    # description, quantity, unit price in major units, discount in major units
    ("Website redesign: discovery workshop and sitemap", Decimal("1"), Decimal("1800"), Decimal("0")),
    ("UI design, 12 page templates", Decimal("12"), Decimal("240"), Decimal("180")),
    ("Front-end development (hours)", Decimal("36.5"), Decimal("95"), Decimal("0")),
    ("Hosting and maintenance, 3 months", Decimal("3"), Decimal("149"), Decimal("0")),
)
_SAMPLE_TAX_RATE = Decimal("10")


def _currency_for(locale: str) -> str:
    territory = get_locale(locale).territory
    if territory:
        try:
            found = get_territory_currencies(territory, date(2026, 1, 1))
        except Exception:
            found = []
        if found:
            return found[0]
    return "USD"


def _minor(value: Decimal, currency: str) -> int:
    scaled = value.scaleb(minor_unit_digits(currency))
    return int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def sample_document(template: TemplateSettings, today: date | None = None) -> InvoiceDocument:
    """A sent, partly filled invoice in the template's locale currency, using its defaults."""
    issue = today or date.today()
    currency = _currency_for(template.locale)
    items: list[LineItem] = []
    for description, qty, unit, discount in _SAMPLE_LINES:
        unit_minor = _minor(unit, currency)
        discount_minor = _minor(discount, currency)
        amount = int((qty * unit_minor).quantize(Decimal(1), rounding=ROUND_HALF_UP)) - discount_minor
        items.append(
            LineItem(
                description=description, quantity=qty, unit_price=unit_minor, discount=discount_minor, amount=amount
            )
        )
    subtotal = sum(it.amount for it in items)
    discount_amount = 0
    tax_amount = int((Decimal(subtotal) * _SAMPLE_TAX_RATE / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    total = subtotal - discount_amount + tax_amount
    return InvoiceDocument(
        id="00000000-0000-4000-8000-000000000000",
        invoice_number=f"{issue.year}-0042",
        status=InvoiceStatus.SENT,
        currency=currency,
        issue_date=issue,
        due_date=issue + timedelta(days=template.default_net_days),
        client=ClientInfo(
            name="Northwind Traders Ltd.",
            email="accounts@northwind.example",
            address="12 Harbour Street\nSuite 400\nSpringfield",
            tax_id="GB123456789",
        ),
        project_reference="Website relaunch 2026",
        items=items,
        subtotal=subtotal,
        discount_amount=discount_amount,
        tax_rate=_SAMPLE_TAX_RATE,
        tax_amount=tax_amount,
        total=total,
        amount_paid=0,
        amount_due=total,
        notes=template.default_notes or "Thank you for your business!",
        terms=template.default_terms or None,
        pay_url="https://billing.example.com/pay/sample",
    )
