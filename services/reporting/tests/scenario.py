"""Contract events as the invoice, payments and subscriptions services publish them, scripted by hand."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal

from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceLineV1, InvoiceSnapshotV1, InvoiceStatus
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.subscription import (
    BillingInterval,
    SubscriptionEventType,
    SubscriptionSnapshotV1,
    SubscriptionStatus,
)


def at(text: str) -> datetime:
    """'2026-08-31T23:30' (UTC) as an aware datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class Published:
    topic: str  # "invoice" | "payment" | "subscription"
    key: str
    event: CloudEvent


@dataclass
class InvoiceScript:
    """One invoice's life: every call returns the events it causes, in the order they are published."""

    client_id: str
    client_name: str
    currency: str
    total: int
    issue_date: date | None
    due_date: date | None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    number: str | None = None
    version: int = 0
    status: InvoiceStatus = InvoiceStatus.DRAFT
    amount_paid: int = 0

    def _snapshot(self, event_type: InvoiceEventType, when: datetime, cause: str | None = None) -> Published:
        self.version += 1
        snapshot = InvoiceSnapshotV1(
            id=self.id, invoice_number=self.number, status=self.status, currency=self.currency,
            client_id=self.client_id, client_name=self.client_name, subtotal=self.total, discount_amount=0,
            tax_amount=0, total=self.total, amount_paid=self.amount_paid, amount_due=self.total - self.amount_paid,
            issue_date=self.issue_date if self.status != InvoiceStatus.DRAFT else None, due_date=self.due_date,
            paid_at=when if self.status == InvoiceStatus.PAID else None, version=self.version, cause_id=cause,
            items=[InvoiceLineV1(id=str(uuid.uuid4()), description="Work", quantity=Decimal(1),
                                 unit_price=self.total, discount=0, amount=self.total)],
        )
        event = CloudEvent.create(source="invoice", type=event_type, subject=self.id, data=snapshot)
        event.time = when
        return Published("invoice", self.id, event)

    def created(self, when: datetime) -> list[Published]:
        return [self._snapshot(InvoiceEventType.CREATED, when)]

    def sent(self, when: datetime, number: str) -> list[Published]:
        self.status, self.number = InvoiceStatus.SENT, number
        return [self._snapshot(InvoiceEventType.SENT, when)]

    def paid(self, amount: int, when: datetime, method: str = "bank_transfer") -> list[Published]:
        payment_id = f"pay_{uuid.uuid4().hex[:16]}"
        event_type = PaymentEventType.SUCCEEDED if method == "card" else PaymentEventType.RECORDED
        payment = self._payment(event_type, payment_id, amount, when, method, paid_at=when)
        self.amount_paid += amount
        self.status = InvoiceStatus.PAID if self.amount_paid >= self.total else InvoiceStatus.PARTIAL
        kind = InvoiceEventType.PAID if self.status == InvoiceStatus.PAID else InvoiceEventType.PARTIALLY_PAID
        return [payment, self._snapshot(kind, when, payment_id)]

    def refunded(self, amount: int, when: datetime, method: str, original_paid_at: datetime) -> list[Published]:
        refund_id = str(uuid.uuid4())
        refund = self._payment(PaymentEventType.REFUNDED, refund_id, amount, when, method, paid_at=original_paid_at)
        self.amount_paid -= amount
        self.status = InvoiceStatus.PARTIAL if self.amount_paid > 0 else InvoiceStatus.SENT
        return [refund, self._snapshot(InvoiceEventType.UPDATED, when, refund_id)]

    def cancelled(self, when: datetime) -> list[Published]:
        self.status = InvoiceStatus.CANCELLED
        return [self._snapshot(InvoiceEventType.CANCELLED, when)]

    def _payment(self, event_type: PaymentEventType, payment_id: str, amount: int, when: datetime, method: str,
                 *, paid_at: datetime) -> Published:
        data = PaymentEventV1(
            payment_id=payment_id, invoice_id=self.id, client_id=self.client_id, amount=amount,
            currency=self.currency, method=method,
            status="refunded" if event_type == PaymentEventType.REFUNDED else "succeeded", paid_at=paid_at,
        )
        event = CloudEvent.create(source="payments", type=event_type, subject=self.id, data=data)
        event.time = when
        return Published("payment", self.id, event)


def stray_payment(invoice_id: str, amount: int, currency: str, when: datetime, method: str = "other") -> Published:
    """A payment for an invoice the read models never saw (the reconciliation lists it)."""
    data = PaymentEventV1(payment_id=f"pay_{uuid.uuid4().hex[:16]}", invoice_id=invoice_id, amount=amount,
                          currency=currency, method=method, status="succeeded", paid_at=when)
    event = CloudEvent.create(source="payments", type=PaymentEventType.RECORDED, subject=invoice_id, data=data)
    event.time = when
    return Published("payment", invoice_id, event)


@dataclass
class SubscriptionScript:
    client_id: str
    currency: str
    unit_amount: int
    interval: BillingInterval = BillingInterval.MONTH
    quantity: int = 1
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    version: int = 0
    status: SubscriptionStatus = SubscriptionStatus.INCOMPLETE

    def _event(self, event_type: SubscriptionEventType, when: datetime) -> Published:
        self.version += 1
        months = 12 if self.interval == BillingInterval.YEAR else 1
        paying = self.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)
        snapshot = SubscriptionSnapshotV1(
            id=self.id, version=self.version, client_id=self.client_id, status=self.status,
            quantity=self.quantity, currency=self.currency, unit_amount=self.unit_amount, interval=self.interval,
            interval_count=1, mrr=round(self.unit_amount * self.quantity / months) if paying else 0,
            stripe_subscription_id=f"sub_{self.id[:8]}", occurred_at=when,
        )
        event = CloudEvent.create(source="subscriptions", type=event_type, subject=self.id, data=snapshot)
        event.time = when
        return Published("subscription", self.id, event)

    def started(self, when: datetime, *, trial: bool = False) -> list[Published]:
        self.status = SubscriptionStatus.TRIALING if trial else SubscriptionStatus.ACTIVE
        return [self._event(SubscriptionEventType.CREATED, when)]

    def activated(self, when: datetime) -> list[Published]:
        self.status = SubscriptionStatus.ACTIVE
        return [self._event(SubscriptionEventType.ACTIVATED, when)]

    def changed(self, when: datetime, *, unit_amount: int | None = None,
                quantity: int | None = None) -> list[Published]:
        self.unit_amount = unit_amount if unit_amount is not None else self.unit_amount
        self.quantity = quantity if quantity is not None else self.quantity
        return [self._event(SubscriptionEventType.CHANGED, when)]

    def renewed(self, when: datetime) -> list[Published]:
        return [self._event(SubscriptionEventType.RENEWED, when)]

    def canceled(self, when: datetime) -> list[Published]:
        self.status = SubscriptionStatus.CANCELED
        return [self._event(SubscriptionEventType.CANCELED, when)]
