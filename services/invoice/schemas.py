"""Request and response bodies of the invoice API (camelCase JSON, amounts in minor units)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kit.web import CalendarDate, one_line
from services.invoice.money import MAX_AMOUNT, known_currencies
from services.invoice.pdf import BankDetails, NormalizedLogo, TemplateSettings


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


def _no_nul(value: object) -> object:
    # PostgreSQL text and JSONB cannot hold U+0000: refuse it here rather than fail on insert.
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    return value


class InputModel(ApiModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    _text = field_validator("*")(_no_nul)


# A line description may be long (a pasted statement of work); the PDF wraps and splits it across pages.
MAX_DESCRIPTION = 10_000

Money = Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)]
Percent = Annotated[Decimal, Field(ge=0, le=100, max_digits=7, decimal_places=4)]
Quantity = Annotated[Decimal, Field(gt=0, le=Decimal(10**9), max_digits=18, decimal_places=4)]
CurrencyCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True)]
ShortText = Annotated[str, StringConstraints(max_length=200)]


def _check_currency(value: str | None) -> str | None:
    if value is not None and value not in known_currencies():
        raise ValueError(f"{value} is not an ISO 4217 currency code")
    return value


class ClientCreate(InputModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    email: EmailStr
    address: Annotated[str, StringConstraints(max_length=2000)] | None = None
    currency: CurrencyCode = "USD"
    tax_id: Annotated[str, StringConstraints(max_length=64)] | None = None

    _currency = field_validator("currency")(_check_currency)
    _name = field_validator("name")(one_line)


class ClientOut(ApiModel):
    id: uuid.UUID
    name: str
    email: str
    address: str | None
    currency: str
    tax_id: str | None
    created_at: datetime


class ItemIn(InputModel):
    description: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DESCRIPTION)]
    quantity: Quantity = Decimal(1)
    unit_price: Money
    discount: Money = 0
    discount_percent: Percent | None = None
    tax_rate: Percent | None = None

    @model_validator(mode="after")
    def _one_discount_kind(self) -> ItemIn:
        if self.discount and self.discount_percent is not None:
            raise ValueError("give either discount (an amount) or discountPercent, not both")
        return self


class InvoiceFields(InputModel):
    """Fields shared by create and update."""

    project_id: ShortText | None = None
    notes: Annotated[str, StringConstraints(max_length=10000)] | None = None
    tax_rate: Percent | None = None
    discount_percent: Percent | None = None
    discount_fixed: Money | None = None
    # Bounded: the due date is computed from them (issueDate 9999-12-31 + 30 days overflowed: a 500
    # at send) and reporting and reminders work within the same range.
    issue_date: CalendarDate | None = None
    due_date: CalendarDate | None = None
    net_days: Annotated[int, Field(ge=0, le=365)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> InvoiceFields:
        if self.discount_fixed and self.discount_percent is not None:
            raise ValueError("give either discountFixed or discountPercent, not both")
        if self.issue_date and self.due_date and self.due_date < self.issue_date:
            raise ValueError("dueDate cannot be before issueDate")
        return self


class InvoiceCreate(InvoiceFields):
    client_id: uuid.UUID
    currency: CurrencyCode | None = None
    items: Annotated[list[ItemIn], Field(max_length=1000)] = []

    _currency = field_validator("currency")(_check_currency)


class InvoicePreview(InvoiceCreate):
    """`POST /api/invoices/preview`: the create body, checked as create checks it, with `clientId`
    optional. The currency is `currency`, else the client's; with neither, `currency` is required."""

    client_id: uuid.UUID | None = None  # type: ignore[assignment]
    currency: CurrencyCode | None = Field(default=None, validate_default=True)

    @field_validator("currency")
    @classmethod
    def _currency_or_client(cls, value: str | None, info: ValidationInfo) -> str | None:
        # clientId is validated before currency: absent from info.data when it was invalid (already
        # an error of its own), None when it was not given.
        if value is None and "client_id" in info.data and info.data["client_id"] is None:
            raise PydanticCustomError("missing", "Field required when no clientId is given")
        return value


class InvoiceUpdate(InvoiceFields):
    """`PUT /api/invoices/{id}` on a draft. It accepts the body that created the draft (`clientId`
    included) and every field of it is optional: a field present replaces the stored value (`null`
    clears a nullable one), a field omitted keeps the stored value, and `items`, when present,
    replaces all the lines. `clientId` may name another existing client; the currency then follows
    the new client unless `currency` is given. A body with no field at all is refused (422)."""

    client_id: uuid.UUID | None = None
    currency: CurrencyCode | None = None
    items: Annotated[list[ItemIn], Field(max_length=1000)] | None = None

    _currency = field_validator("currency")(_check_currency)

    @field_validator("client_id")
    @classmethod
    def _client_not_null(cls, value: uuid.UUID | None) -> uuid.UUID:
        # Only reached when the field is given: an invoice always has a client.
        if value is None:
            raise ValueError("clientId cannot be null; omit it to keep the client")
        return value


class SendRequest(InputModel):
    resend: bool = False


class ItemOut(ApiModel):
    id: uuid.UUID
    description: str
    quantity: Decimal
    unit_price: int
    discount: int
    discount_percent: Decimal | None
    tax_rate: Decimal | None
    amount: int


class InvoiceOut(ApiModel):
    id: uuid.UUID
    invoice_number: str | None
    status: str
    currency: str
    subtotal: int
    discount_amount: int
    discount_percent: Decimal | None
    discount_fixed: int
    tax_rate: Decimal | None
    tax_amount: int
    total: int
    amount_paid: int
    amount_due: int
    issue_date: date | None
    due_date: date | None
    paid_at: datetime | None
    client_id: uuid.UUID
    project_id: str | None
    items: list[ItemOut]
    notes: str | None
    stripe_invoice_id: str | None
    stripe_checkout_session_id: str | None
    version: int
    created_at: datetime
    updated_at: datetime


class PreviewItemOut(ApiModel):
    amount: int
    tax_amount: int


class InvoicePreviewOut(ApiModel):
    """What the draft of a preview body would hold: its currency and totals, each line's amount and
    tax (in the body's order), in minor units."""

    currency: str
    subtotal: int
    discount_amount: int
    tax_amount: int
    total: int
    items: list[PreviewItemOut]


class PaymentOut(ApiModel):
    payment_id: str
    kind: str
    amount: int
    currency: str
    method: str
    reference: str | None
    paid_at: datetime
    recorded_at: datetime


class OverdueScanRequest(InputModel):
    as_of: CalendarDate | None = Field(default=None,
                                       description="Mark what is past due as of this date (default: today, UTC).")


class OverdueScanResult(ApiModel):
    as_of: date = Field(description="The date the scan ran as of.")
    marked_overdue: int = Field(description="How many invoices this call moved to OVERDUE.")
    invoice_ids: list[uuid.UUID] = Field(description="The invoices this call moved to OVERDUE, oldest due date first.")


SortField = Literal[
    "createdAt", "-createdAt", "issueDate", "-issueDate", "dueDate", "-dueDate",
    "total", "-total", "invoiceNumber", "-invoiceNumber", "status", "-status",
]


# -- invoice template ------------------------------------------------------------------------------

_EDITABLE = frozenset(TemplateSettings.model_fields) - {"logo"}


class BankDetailsIn(BankDetails):
    model_config = ConfigDict(extra="forbid")

    _text = field_validator("*")(_no_nul)


class _TemplateInput(TemplateSettings):
    """The editable template fields, camelCase; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    bank_details: BankDetailsIn | None = None

    _text = field_validator("*")(_no_nul)

    def to_settings(self, logo: NormalizedLogo | None) -> TemplateSettings:
        return TemplateSettings.model_validate({**self.model_dump(include=set(_EDITABLE)), "logo": logo})


class TemplateUpdate(_TemplateInput):
    """`PUT /api/invoice-template`: a full replace of the editable fields. Omitted fields take their
    defaults (not the stored values); `companyName` is required. The saved logo is kept unless
    `removeLogo` is true (a logo is uploaded with `POST /api/invoice-template/logo`). `version`, when
    given, is the version the editor started from: a save over a newer version is refused with 409."""

    company_name: str = Field(min_length=1, max_length=200)
    logo: None = Field(default=None, description="Read-only here: upload with POST /api/invoice-template/logo.")
    remove_logo: bool = False
    version: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None  # an INTEGER column

    @field_validator("company_name")
    @classmethod
    def _company_named(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("companyName must not be blank")
        return value

    @field_validator("logo", mode="before")
    @classmethod
    def _no_logo(cls, value: object) -> None:
        if value is not None:
            raise ValueError("the logo is set with POST /api/invoice-template/logo (or removed with removeLogo)")
        return None


class TemplatePreview(_TemplateInput):
    """`POST /api/invoice-template/preview`: unsaved settings. `logo` omitted: the saved logo;
    `logo: null` or `removeLogo: true`: no logo; `logo` given (the validated base64 form): that one,
    checked again."""

    remove_logo: bool = False


class LogoOut(ApiModel):
    mime: str
    width: int
    height: int
    source_mime: str | None = None
    url: str


class TemplateOut(TemplateSettings):
    """The current template: version, every setting, and the logo as a link (not its bytes)."""

    version: int = Field(description="0 = the built-in defaults (nothing saved yet)")
    created_at: datetime | None = None
    created_by: str | None = None
    logo: LogoOut | None = None  # type: ignore[assignment]
