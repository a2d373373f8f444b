"""What the admin pages read from the services, parsed at the edge (camelCase JSON, minor units).

Only the fields the pages show; anything else the services add is ignored, so a service may grow
its answers without breaking these pages.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from contracts.invoice import OPEN_STATUSES, InvoiceStatus

T = TypeVar("T")


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Page(Wire, Generic[T]):
    items: list[T]
    next_cursor: str | None = None
    has_more: bool = False
    total: int | None = None


class Client(Wire):
    id: str
    name: str
    email: str
    address: str | None = None
    currency: str
    tax_id: str | None = None
    created_at: datetime | None = None


class Item(Wire):
    id: str | None = None
    description: str
    quantity: Decimal
    unit_price: int
    discount: int = 0
    discount_percent: Decimal | None = None
    tax_rate: Decimal | None = None
    amount: int


class Invoice(Wire):
    id: str
    invoice_number: str | None = None
    status: InvoiceStatus
    currency: str
    subtotal: int
    discount_amount: int
    discount_percent: Decimal | None = None
    discount_fixed: int = 0
    tax_rate: Decimal | None = None
    tax_amount: int
    total: int
    amount_paid: int
    amount_due: int
    issue_date: date | None = None
    due_date: date | None = None
    paid_at: datetime | None = None
    client_id: str
    project_id: str | None = None
    items: list[Item] = []
    notes: str | None = None
    stripe_invoice_id: str | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def editable(self) -> bool:
        return self.status == InvoiceStatus.DRAFT

    @property
    def payable(self) -> bool:
        return self.status in OPEN_STATUSES and self.amount_due > 0

    @property
    def cancellable(self) -> bool:
        return self.status in (InvoiceStatus.DRAFT, InvoiceStatus.SENT, InvoiceStatus.VIEWED, InvoiceStatus.OVERDUE)


class InvoiceTotalsLine(Wire):
    amount: int
    tax_amount: int = 0


class InvoiceTotals(Wire):
    """`POST /api/invoices/preview`: the totals the invoice service would store for a body."""

    currency: str
    subtotal: int
    discount_amount: int
    tax_amount: int
    total: int
    items: list[InvoiceTotalsLine] = []


class Payment(Wire):
    id: str
    invoice_id: str
    client_id: str | None = None
    amount: int
    currency: str
    method: str
    source: str
    status: str
    amount_refunded: int = 0
    paid_at: datetime | None = None
    reference: str | None = None
    applied: bool = True
    held: bool = False
    created_at: datetime


class Notification(Wire):
    id: str
    kind: str
    status: str
    invoice_id: str | None = None
    client_id: str | None = None
    recipient: str | None = None
    subject: str | None = None
    attempts: int = 0
    last_error: str | None = None
    created_at: datetime
    sent_at: datetime | None = None
    failed_at: datetime | None = None
    opened_at: datetime | None = None
    opened_via: str | None = None


class ReminderCreated(Wire):
    invoice_id: str
    kind: str
    sequence: int


class ReminderRun(Wire):
    as_of: date
    created: int
    reminders: list[ReminderCreated]


class BankDetails(Wire):
    account_name: str = ""
    bank_name: str = ""
    iban: str = ""
    bic: str = ""
    account_number: str = ""
    routing_number: str = ""


class Logo(Wire):
    mime: str
    width: int
    height: int
    url: str


class Template(Wire):
    version: int
    company_name: str = ""
    company_address: str = ""
    company_email: str = ""
    company_phone: str = ""
    company_website: str = ""
    tax_id: str = ""
    brand_color: str = "#1F3A5F"
    accent_color: str = "#2A9D8F"
    footer_text: str = ""
    payment_instructions: str = ""
    bank_details: BankDetails | None = None
    default_notes: str = ""
    default_terms: str = ""
    default_net_days: int = 30
    locale: str = "en_US"
    page_size: str = "auto"
    logo: Logo | None = None
    created_at: datetime | None = None


class User(Wire):
    id: str
    email: str
    role: str
    client_id: str | None = None


# -- subscriptions ----------------------------------------------------------------------------------


class Price(Wire):
    id: str
    plan_id: str
    currency: str
    amount: int
    interval: str
    interval_count: int = 1
    trial_days: int = 0
    active: bool = True


class Plan(Wire):
    id: str
    name: str
    description: str | None = None
    features: list[str] = []
    active: bool = True
    prices: list[Price] = []
    created_at: datetime | None = None


class Subscription(Wire):
    id: str
    client_id: str
    plan_id: str | None = None
    plan_name: str | None = None
    price_id: str | None = None
    status: str
    quantity: int = 1
    currency: str | None = None
    unit_amount: int | None = None
    interval: str | None = None
    interval_count: int | None = None
    collection_method: str | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    access_until: datetime | None = None
    mrr: int = 0
    created_at: datetime | None = None


class PreviewLine(Wire):
    description: str | None = None
    amount: int
    currency: str
    quantity: int | None = None
    proration: bool = False
    period_start: datetime | None = None
    period_end: datetime | None = None


class ChangePreview(Wire):
    proration_date: datetime
    kind: str
    effective: str
    lines: list[PreviewLine]
    amount_due_now: int
    next_invoice_total: int
    currency: str


# -- reports ----------------------------------------------------------------------------------------


class SummaryRow(Wire):
    currency: str
    collected_this_month: int
    collected_year_to_date: int = 0
    invoiced_this_month: int = 0
    outstanding: int
    open_invoices: int = 0
    overdue: int
    overdue_invoices: int = 0
    mrr: int
    arr: int = 0
    active_subscriptions: int = 0


class Summary(Wire):
    as_of: date
    currencies: list[SummaryRow]


class MonthAmount(Wire):
    currency: str
    amount: int
    count: int = 0


class RevenueMonth(Wire):
    month: str
    amounts: list[MonthAmount]


class MonthlyRevenue(Wire):
    currencies: list[str]
    months: list[RevenueMonth]
    totals: list[MonthAmount] = []


class AgingRow(Wire):
    currency: str
    client_id: str | None = None
    client_name: str | None = None
    current: int
    days_1_to_30: int = Field(alias="days1To30")
    days_31_to_60: int = Field(alias="days31To60")
    days_61_to_90: int = Field(alias="days61To90")
    over_90: int = Field(alias="over90")
    total: int
    invoices: int = 0


class Aging(Wire):
    as_of: date
    rows: list[AgingRow]
    totals: list[AgingRow] = []


class MethodRow(Wire):
    currency: str
    method: str
    count: int
    amount: int


class PaymentMethods(Wire):
    rows: list[MethodRow]


class OutstandingInvoice(Wire):
    invoice_id: str
    invoice_number: str | None = None
    client_id: str
    client_name: str | None = None
    currency: str
    status: str
    due_date: date | None = None
    amount_due: int
    days_overdue: int = 0


class MrrMonth(Wire):
    month: str
    currency: str
    mrr: int
    new: int = 0
    expansion: int = 0
    contraction: int = 0
    churn: int = 0
    net_new: int = 0


class MrrReport(Wire):
    currencies: list[str]
    months: list[MrrMonth]
