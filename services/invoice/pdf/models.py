"""Inputs of the renderer: template settings (what the admin edits) and the invoice document."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from services.invoice.pdf.money import is_known_locale
from services.invoice.status import InvoiceStatus

_HEX_RE = re.compile(r"^#[0-9A-Fa-f]{6}$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        ser_json_bytes="base64",
        val_json_bytes="base64",
        validate_assignment=True,
    )


LogoMime = Literal["image/png", "image/svg+xml"]


class NormalizedLogo(_Model):
    """A logo that passed `validate_logo`: PNG (raster sources) or sanitized SVG (kept vector).

    width/height are pixels for PNG and user units (points) for SVG; only the ratio matters.
    """

    data: bytes
    mime: LogoMime
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    source_mime: str = ""


class BankDetails(_Model):
    account_name: str = Field(default="", max_length=200)
    bank_name: str = Field(default="", max_length=200)
    iban: str = Field(default="", max_length=64)
    bic: str = Field(default="", max_length=32, description="BIC / SWIFT")
    account_number: str = Field(default="", max_length=64)
    routing_number: str = Field(default="", max_length=64, description="routing / sort code")

    def is_empty(self) -> bool:
        return not any(
            (self.account_name, self.bank_name, self.iban, self.bic, self.account_number, self.routing_number)
        )


def _hex_color(value: str) -> str:
    value = (value or "").strip()
    if not _HEX_RE.match(value):
        raise ValueError(f"colour must be a hex value like #1F3A5F, got {value!r}")
    return value.upper()


class TemplateSettings(_Model):
    """Branding and defaults of the invoice template. `TemplateSettings()` is a valid template."""

    company_name: str = Field(default="Your Company", max_length=200)
    company_address: str = Field(default="", max_length=1000)
    company_email: str = Field(default="", max_length=254)
    company_phone: str = Field(default="", max_length=64)
    company_website: str = Field(default="", max_length=254)
    tax_id: str = Field(default="", max_length=64)
    brand_color: str = "#1F3A5F"
    accent_color: str = "#2A9D8F"
    logo: NormalizedLogo | None = None
    footer_text: str = Field(default="", max_length=1000)
    payment_instructions: str = Field(default="", max_length=4000)
    bank_details: BankDetails | None = None
    number_prefix_display: str = Field(default="", max_length=20)
    default_notes: str = Field(default="", max_length=4000)
    default_terms: str = Field(default="", max_length=4000)
    default_net_days: int = Field(default=30, ge=0, le=365)
    locale: str = "en_US"
    page_size: Literal["auto", "A4", "LETTER"] = "auto"

    @field_validator("brand_color", "accent_color")
    @classmethod
    def _check_color(cls, value: str) -> str:
        return _hex_color(value)

    @field_validator("locale")
    @classmethod
    def _check_locale(cls, value: str) -> str:
        value = (value or "").strip().replace("-", "_")
        if not value or not is_known_locale(value):
            raise ValueError(f"unknown locale {value!r}; use a CLDR locale such as en_US or de_DE")
        return value


class ClientInfo(_Model):
    name: str = ""
    email: str | None = None
    address: str | None = None
    tax_id: str | None = None


class LineItem(_Model):
    description: str = ""
    quantity: Decimal = Decimal(1)
    unit_price: int = 0
    discount: int = 0
    tax_rate: Decimal | None = None
    amount: int = 0


class InvoiceDocument(_Model):
    """Everything printed on one invoice. Amounts are integers in minor units of `currency`."""

    id: str | None = None
    invoice_number: str | None = None
    status: InvoiceStatus = InvoiceStatus.DRAFT
    currency: Annotated[str, Field(min_length=3, max_length=3)] = "USD"
    issue_date: date | None = None
    due_date: date | None = None
    paid_at: datetime | date | None = None
    client: ClientInfo = Field(default_factory=ClientInfo)
    project_reference: str | None = None
    items: list[LineItem] = Field(default_factory=list)
    subtotal: int = 0
    discount_amount: int = 0
    tax_rate: Decimal | None = None
    tax_amount: int = 0
    total: int = 0
    amount_paid: int = 0
    amount_due: int = 0
    notes: str | None = None
    terms: str | None = None
    pay_url: str | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _status_upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("currency", mode="before")
    @classmethod
    def _currency_upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value
