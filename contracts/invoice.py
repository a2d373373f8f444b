"""invoice.* events (topic billing.invoice, key = invoice id). Every event carries a full snapshot."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:invoice:v1"


class InvoiceStatus(StrEnum):
    """The invoice's status, as the invoice service's state machine sets it and every copy shows it."""

    DRAFT = "DRAFT"
    SENT = "SENT"
    VIEWED = "VIEWED"
    PARTIAL = "PARTIAL"
    PAID = "PAID"
    OVERDUE = "OVERDUE"
    CANCELLED = "CANCELLED"


# States in which money is still expected.
OPEN_STATUSES = frozenset({InvoiceStatus.SENT, InvoiceStatus.VIEWED, InvoiceStatus.PARTIAL, InvoiceStatus.OVERDUE})


class InvoiceEventType(StrEnum):
    CREATED = "invoice.created"
    UPDATED = "invoice.updated"
    SENT = "invoice.sent"
    VIEWED = "invoice.viewed"
    PARTIALLY_PAID = "invoice.partially_paid"
    PAID = "invoice.paid"
    OVERDUE = "invoice.overdue"
    CANCELLED = "invoice.cancelled"


class InvoiceLineV1(ContractModel):
    id: str
    description: str
    quantity: Decimal
    unit_price: int
    discount: int
    tax_rate: Decimal | None = None
    amount: int


class InvoiceSnapshotV1(ContractModel):
    """State of the invoice right after the change the event reports. Amounts in minor units."""

    id: str
    invoice_number: str | None = None
    status: InvoiceStatus
    currency: str
    client_id: str
    client_name: str | None = None
    client_email: str | None = None
    project_id: str | None = None
    subtotal: int
    discount_amount: int
    tax_amount: int
    total: int
    amount_paid: int
    amount_due: int
    issue_date: date | None = None
    due_date: date | None = None
    paid_at: datetime | None = None
    version: int
    items: list[InvoiceLineV1] = []
    # What caused this event, e.g. the payment id that moved it to PAID.
    cause_id: str | None = None
    reason: str | None = None
    # The Stripe invoice (of a subscription) this invoice is our copy of; None for our own invoices.
    stripe_invoice_id: str | None = None
