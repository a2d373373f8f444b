"""Tables of the payments database (this service's own; no other service reads them)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from contracts.invoice import InvoiceStatus
from kit.db import Database, InboxMixin, OutboxMixin
from kit.deadletter import EventFailureMixin
from kit.idempotency import IdempotencyMixin


class Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, Base):
    pass


class InboxEvent(InboxMixin, Base):
    pass


class EventFailure(EventFailureMixin, Base):  # durable redelivery counts (kit.deadletter)
    pass


class IdempotencyKey(IdempotencyMixin, Base):
    """Idempotency-Keys of POSTs (mark-paid, checkout), recorded in the same transaction as their effect."""


class InvoiceCopy(Base):
    """What this service needs of an invoice, from invoice.* snapshots (highest version wins)."""

    __tablename__ = "invoices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), index=True)
    invoice_number: Mapped[str | None] = mapped_column(String(20))
    # Read back as the enum (stored as VARCHAR(12), its names: the migration's column, unchanged).
    status: Mapped[InvoiceStatus] = mapped_column(Enum(InvoiceStatus, native_enum=False, length=12))
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[int] = mapped_column(BigInteger)
    amount_paid: Mapped[int] = mapped_column(BigInteger)
    amount_due: Mapped[int] = mapped_column(BigInteger)
    due_date: Mapped[date | None] = mapped_column(Date)
    client_name: Mapped[str | None] = mapped_column(String(300))
    client_email: Mapped[str | None] = mapped_column(String(320))
    version: Mapped[int] = mapped_column(Integer)
    # The Stripe invoice this invoice is our copy of (a subscription's invoice); None for our own invoices.
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), index=True)
    # "event" (from Kafka) or "http" (read from the invoice service before any event arrived).
    source: Mapped[str] = mapped_column(String(10), default="event")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Payment(Base):
    """One payment for one invoice: a Stripe payment (one per PaymentIntent, else per Checkout
    Session, or per Stripe invoice for a subscription's invoice) or a manual one. `applied_at` is set
    when an invoice snapshot names it as its cause."""

    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint("amount >= 0", name="ck_payment_amount_non_negative"),
        CheckConstraint("amount_refunded >= 0", name="ck_payment_refunded_non_negative"),
        Index("ix_payments_invoice_created", "invoice_id", "created_at"),
        Index("ix_payments_client_created", "client_id", "created_at"),
        Index("ix_payments_created", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    invoice_id: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    method: Mapped[str] = mapped_column(String(30))  # card, sepa_debit..., bank_transfer, cash, cheque, other
    source: Mapped[str] = mapped_column(String(10))  # stripe | manual
    status: Mapped[str] = mapped_column(String(20))  # pending, succeeded, failed, refunded, partially_refunded
    amount_refunded: Mapped[int] = mapped_column(BigInteger, default=0)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reference: Mapped[str | None] = mapped_column(String(200))
    failure_code: Mapped[str | None] = mapped_column(String(100))
    failure_message: Mapped[str | None] = mapped_column(Text)
    # Why a human may want to look at it: underpayment, overpayment, currency_mismatch, ...
    flags: Mapped[list[str]] = mapped_column(JSONB, default=list)
    # Held payments (currency mismatch) are recorded but not sent to the invoice service.
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    stripe_checkout_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # The Stripe invoice (of a subscription) this payment collected: at most one payment per Stripe invoice.
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_charge_id: Mapped[str | None] = mapped_column(String(255))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    last_stripe_event_id: Mapped[str | None] = mapped_column(String(255))
    last_stripe_event_created: Mapped[int | None] = mapped_column(BigInteger)
    recorded_by: Mapped[str | None] = mapped_column(String(100))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Refund(Base):
    """Money given back for a payment; one row per increase of the charge's amount_refunded."""

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("payment_id", "cumulative_refunded", name="uq_refund_step"),
        CheckConstraint("amount > 0", name="ck_refund_amount_positive"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id"), index=True)
    invoice_id: Mapped[str] = mapped_column(String(64), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    cumulative_refunded: Mapped[int] = mapped_column(BigInteger)
    stripe_charge_id: Mapped[str | None] = mapped_column(String(255))
    stripe_refund_id: Mapped[str | None] = mapped_column(String(255))
    stripe_event_id: Mapped[str | None] = mapped_column(String(255))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CheckoutSession(Base):
    """A Stripe Checkout Session created for an invoice (Pay Now)."""

    __tablename__ = "checkout_sessions"
    __table_args__ = (Index("ix_checkout_sessions_invoice", "invoice_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # Stripe's cs_...
    invoice_id: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(20), default="open")  # open | complete | expired
    payment_status: Mapped[str] = mapped_column(String(30), default="unpaid")
    url: Mapped[str] = mapped_column(Text)
    success_url: Mapped[str] = mapped_column(Text)
    cancel_url: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(String(255))
    invoice_version: Mapped[int] = mapped_column(Integer)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_event_created: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class StripeInvoiceCharge(Base):
    """What Stripe last reported about collecting one of its subscription invoices (invoice.paid or
    invoice.payment_failed), kept until our invoice of it exists (the invoice service makes it from the
    normalized stripe.invoice.* events): then it becomes, once, a payment of ours against that invoice.
    Whichever arrives second, the charge or our copy, records the payment."""

    __tablename__ = "stripe_invoice_charges"

    stripe_invoice_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    client_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))  # succeeded (final) | failed
    amount: Mapped[int] = mapped_column(BigInteger)  # paid: amount_paid; failed: what the attempt asked for
    currency: Mapped[str] = mapped_column(String(3))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failure_code: Mapped[str | None] = mapped_column(String(100))
    failure_message: Mapped[str | None] = mapped_column(Text)
    stripe_event_id: Mapped[str] = mapped_column(String(255))
    stripe_event_created: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class StripeCustomer(Base):
    """The Stripe customer of one of our clients (metadata.client_id on the Stripe side)."""

    __tablename__ = "stripe_customers"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StripeEvent(Base):
    """A verified webhook delivery, stored before the 200 and processed by the worker.

    The primary key is Stripe's event id: a redelivery hits the conflict and is not stored twice.
    `payload` is the raw body exactly as received.
    """

    __tablename__ = "stripe_events"
    __table_args__ = (
        Index("ix_stripe_events_pending", "next_attempt_at", "received_at",
              postgresql_where=text("status = 'pending'")),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    created: Mapped[int] = mapped_column(BigInteger)  # Stripe's event timestamp (unix seconds)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    object_id: Mapped[str | None] = mapped_column(String(255), index=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending|processed|ignored|failed
    outcome: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # W3C trace context of the delivery (kit.tracing), continued by the worker; NULL while tracing is off.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONB)


class StripeObjectState(Base):
    """Newest Stripe event applied per Stripe object: older deliveries for it are stale."""

    __tablename__ = "stripe_object_states"

    object_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    object_type: Mapped[str] = mapped_column(String(50))
    last_event_created: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[str] = mapped_column(String(255))
    state: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


def payments_database(url: str, pool_size: int) -> Database:
    """The payments database with its outbox, inbox and idempotency tables (the service's, and its
    webhook worker's in a child process)."""
    return Database(url, outbox_model=OutboxMessage, inbox_model=InboxEvent, idempotency_model=IdempotencyKey,
                    pool_size=pool_size)
