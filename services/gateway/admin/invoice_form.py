"""The invoice form: what a person typed -> the invoice API's body, field errors in plain words, totals.

Here only the typing is judged (numbers, dates, amounts in major units by the currency's exponent).
The money rules (line amounts, discounts, tax, what may exceed what) are the invoice service's: the
totals shown while typing are its answer to `POST /api/invoices/preview` for the body the form would
save, and its refusals are shown next to their fields. So the figures on the form are the figures the
saved draft will have; neither the gateway nor the browser adds anything up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

from starlette.datastructures import FormData

from services.gateway.admin import formatting
from services.gateway.admin.api import Api, ApiError
from services.gateway.admin.formatting import MoneyInputError, parse_decimal_input, parse_major
from services.gateway.admin.models import Invoice, InvoiceTotals

LINE_FIELDS = ("description", "quantity", "unit_price", "discount", "tax_rate")
MAX_LINES = 200
HUNDRED = Decimal(100)
PREVIEW_PATH = "/api/invoices/preview"


@dataclass
class LineForm:
    description: str = ""
    quantity: str = "1"
    unit_price: str = ""
    discount: str = ""
    tax_rate: str = ""

    def blank(self) -> bool:
        return not (self.description.strip() or self.unit_price.strip() or self.discount.strip()
                    or self.tax_rate.strip()) and self.quantity.strip() in ("", "1")


@dataclass
class InvoiceForm:
    client_id: str = ""
    lines: list[LineForm] = field(default_factory=lambda: [LineForm()])
    discount_kind: str = "amount"  # or "percent"
    discount: str = ""
    tax_rate: str = ""
    due_date: str = ""
    project_id: str = ""
    notes: str = ""

    @classmethod
    def from_form(cls, form: FormData) -> InvoiceForm:
        def text(name: str) -> str:
            value = form.get(name)
            return value if isinstance(value, str) else ""

        columns = {name: [v if isinstance(v, str) else "" for v in form.getlist(f"line_{name}")]
                   for name in LINE_FIELDS}
        count = min(max((len(v) for v in columns.values()), default=0), MAX_LINES)
        lines = [
            LineForm(**{name: (columns[name][i] if i < len(columns[name]) else "") for name in LINE_FIELDS})
            for i in range(count)
        ]
        kind = text("discount_kind")
        return cls(
            client_id=text("client_id").strip(),
            lines=lines or [LineForm()],
            discount_kind=kind if kind in ("amount", "percent") else "amount",
            discount=text("discount"),
            tax_rate=text("tax_rate"),
            due_date=text("due_date").strip(),
            project_id=text("project_id"),
            notes=text("notes"),
        )

    @classmethod
    def from_invoice(cls, invoice: Invoice, locale: str) -> InvoiceForm:
        cur = invoice.currency
        lines = [
            LineForm(
                description=item.description,
                quantity=formatting.plain_decimal(item.quantity),
                unit_price=formatting.major_input(item.unit_price, cur, locale),
                discount=formatting.major_input(item.discount, cur, locale) if item.discount else "",
                tax_rate=formatting.plain_decimal(item.tax_rate),
            )
            for item in invoice.items
        ]
        percent = invoice.discount_percent is not None
        return cls(
            client_id=invoice.client_id,
            lines=lines or [LineForm()],
            discount_kind="percent" if percent else "amount",
            discount=formatting.plain_decimal(invoice.discount_percent) if percent
            else (formatting.major_input(invoice.discount_fixed, cur, locale) if invoice.discount_fixed else ""),
            tax_rate=formatting.plain_decimal(invoice.tax_rate),
            due_date=invoice.due_date.isoformat() if invoice.due_date else "",
            project_id=invoice.project_id or "",
            notes=invoice.notes or "",
        )

    def with_line_added(self) -> InvoiceForm:
        if len(self.lines) < MAX_LINES:
            self.lines.append(LineForm())
        return self

    def with_line_removed(self, index: int) -> InvoiceForm:
        if 0 <= index < len(self.lines):
            del self.lines[index]
        if not self.lines:
            self.lines.append(LineForm())
        return self


@dataclass
class Checked:
    """The form judged: the API body when it is valid, the errors per field id, and (after
    `add_totals`) the invoice service's totals when it could give them."""

    body: dict[str, Any] | None
    errors: dict[str, str]
    draft: dict[str, Any]  # the body without the fields in error, for the preview
    api_lines: list[int]  # API item index -> form line index
    totals: InvoiceTotals | None = None
    line_amounts: dict[int, int] = field(default_factory=dict)  # form line index -> its amount
    totals_failure: str | None = None  # why the service gave no totals (down, or a refusal of no field)


def line_key(index: int, name: str) -> str:
    return f"line-{index}-{name}"


def _percent(text: str, locale: str, key: str, errors: dict[str, str]) -> Decimal | None:
    if not text.strip():
        return None
    value = parse_decimal_input(text, locale)
    if value is None:
        errors[key] = f"“{text.strip()}” is not a percentage."
    elif not Decimal(0) <= value <= HUNDRED:
        errors[key] = "A rate is between 0 and 100 %."
    elif value != value.quantize(Decimal("0.0001")):
        errors[key] = "Use at most 4 decimals."
    else:
        return value
    return None


def check(form: InvoiceForm, currency: str | None, locale: str, *, require_client: bool = True) -> Checked:
    errors: dict[str, str] = {}
    if require_client and not form.client_id:
        errors["client_id"] = "Choose a client."
    items: list[dict[str, Any]] = []
    api_lines: list[int] = []
    for i, line in enumerate(form.lines):
        if line.blank():
            continue
        bad = False
        description = line.description.strip()
        if not description:
            errors[line_key(i, "description")] = "Describe this line."
            bad = True
        elif len(description) > 10_000:
            errors[line_key(i, "description")] = "Keep the description under 10,000 characters."
            bad = True
        quantity = parse_decimal_input(line.quantity or "1", locale)
        if quantity is None:
            errors[line_key(i, "quantity")] = f"“{line.quantity.strip()}” is not a quantity."
            bad = True
        elif quantity <= 0:
            errors[line_key(i, "quantity")] = "The quantity must be above zero."
            bad = True
        elif quantity != quantity.quantize(Decimal("0.0001")):
            errors[line_key(i, "quantity")] = "Use at most 4 decimals for a quantity."
            bad = True
        unit_price = discount = 0
        if currency is None:
            bad = True
        else:
            try:
                unit_price = parse_major(line.unit_price, currency, locale)
            except MoneyInputError as exc:
                errors[line_key(i, "unit_price")] = "Enter a unit price." if not line.unit_price.strip() else str(exc)
                bad = True
            if line.discount.strip():
                try:
                    discount = parse_major(line.discount, currency, locale)
                except MoneyInputError as exc:
                    errors[line_key(i, "discount")] = str(exc)
                    bad = True
        rate = _percent(line.tax_rate, locale, line_key(i, "tax_rate"), errors)
        if line.tax_rate.strip() and rate is None:
            bad = True
        if bad:
            continue
        assert quantity is not None
        item: dict[str, Any] = {"description": description, "quantity": str(quantity), "unitPrice": unit_price}
        if discount:
            item["discount"] = discount
        if rate is not None:
            item["taxRate"] = str(rate)
        items.append(item)
        api_lines.append(i)

    body: dict[str, Any] = {"items": items}
    if form.client_id:
        body["clientId"] = form.client_id
    invoice_rate = _percent(form.tax_rate, locale, "tax_rate", errors)
    body["taxRate"] = str(invoice_rate) if invoice_rate is not None else None
    discount_fixed, discount_percent = 0, None
    if form.discount.strip():
        if form.discount_kind == "percent":
            discount_percent = _percent(form.discount, locale, "discount", errors)
        elif currency is not None:
            try:
                discount_fixed = parse_major(form.discount, currency, locale)
            except MoneyInputError as exc:
                errors["discount"] = str(exc)
    body["discountPercent"] = str(discount_percent) if discount_percent is not None else None
    body["discountFixed"] = discount_fixed if discount_percent is None else None
    if form.due_date:
        try:
            body["dueDate"] = date.fromisoformat(form.due_date).isoformat()
        except ValueError:
            errors["due_date"] = "Enter a date (YYYY-MM-DD)."
    else:
        body["dueDate"] = None
    project = form.project_id.strip()
    if len(project) > 200:
        errors["project_id"] = "Keep the project under 200 characters."
    body["projectId"] = project or None
    if len(form.notes) > 10_000:
        errors["notes"] = "Keep the notes under 10,000 characters."
    body["notes"] = form.notes.strip() or None
    if not items and not any(k.startswith("line-") for k in errors):
        errors["lines"] = "Add at least one line with a description and a unit price."

    # A field in error is left out of the preview (its value is not known), the others are sent as
    # they would be saved: the totals still show while, say, the due date is being corrected.
    draft = {k: v for k, v in body.items()
             if v is not None and (k not in _API_FIELDS or _API_FIELDS[k] not in errors)}
    return Checked(body=None if errors else body, errors=errors, draft=draft, api_lines=api_lines)


async def add_totals(api: Api, checked: Checked, currency: str | None) -> Checked:
    """The invoice service's totals for the form as typed (`POST /api/invoices/preview` with the body
    the form would save), each line's amount with them. Nothing is asked while the currency is not
    known or a line is in error (its amount would be a guess). The service's refusals join the
    errors next to their field (a message the form already shows for a field stays)."""
    if currency is None or any(k.startswith("line-") for k in checked.errors):
        return checked
    try:
        totals = await api.post(InvoiceTotals, PREVIEW_PATH, checked.draft)
    except ApiError as exc:
        placed = api_errors(exc.field_errors(), checked.api_lines) if exc.status == 422 else {}
        for key, message in placed.items():
            checked.errors.setdefault(key, message)
        if not placed:
            checked.totals_failure = ("The invoice service is not available right now." if exc.unavailable
                                      else exc.message or "The totals cannot be computed.")
        return checked
    checked.totals = totals
    checked.line_amounts = {checked.api_lines[n]: item.amount
                            for n, item in enumerate(totals.items) if n < len(checked.api_lines)}
    return checked


# The invoice service's field paths (its 422 details) -> our field ids.
_API_FIELDS = {
    "clientId": "client_id", "dueDate": "due_date", "issueDate": "due_date", "projectId": "project_id",
    "notes": "notes", "taxRate": "tax_rate", "discountPercent": "discount", "discountFixed": "discount",
}
_ITEM_FIELDS = {"description": "description", "quantity": "quantity", "unitPrice": "unit_price",
                "discount": "discount", "taxRate": "tax_rate"}


def api_errors(details: dict[str, str], api_lines: list[int]) -> dict[str, str]:
    """The service's own refusals, placed next to the field they are about."""
    out: dict[str, str] = {}
    for path, message in details.items():
        parts = path.split(".")
        if parts[0] == "items" and len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) < len(api_lines):
            out[line_key(api_lines[int(parts[1])], _ITEM_FIELDS.get(parts[2], "description"))] = _plain(message)
        elif parts[0] in _API_FIELDS:
            out[_API_FIELDS[parts[0]]] = _plain(message)
        else:
            out.setdefault("form", _plain(message))
    return out


def _plain(message: str) -> str:
    text = message.removeprefix("Value error, ").strip()
    return text[:1].upper() + text[1:] if text else "This value is not accepted."
