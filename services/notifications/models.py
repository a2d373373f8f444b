"""The notifications service's own tables: a copy of invoices, the message log, reminders, attempts.

Exactly-once rules live in constraints:
  * `notifications.dedupe_key` is unique: one message per (event, kind) or per reminder;
  * `reminders (invoice_id, kind, sequence)` is unique: each reminder is claimed by one scan only;
  * a message is sent only by the replica holding its lease (`status='sending'`, `next_attempt_at`
    in the future, `claim_token`); an expired lease (crash) makes it claimable again, and the resend
    reuses the stored `smtp_message_id`;
  * a send in flight is marked (`send_attempt_id`, in its own transaction just before SMTP) and its
    outcome is recorded against that mark, retried until the database answers: a message the server
    accepted is never sent again for a lost commit, and a takeover that finds the mark knows a send
    of unknown outcome came before it.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from contracts.invoice import OPEN_STATUSES, InvoiceStatus
from kit.db import InboxMixin, OutboxMixin
from kit.deadletter import EventFailureMixin

# Invoice states that still expect money (reminders go out only for these), in the order the
# migration's partial index lists them: the scan's query repeats this predicate word for word.
OPEN_ORDER = (InvoiceStatus.SENT, InvoiceStatus.VIEWED, InvoiceStatus.PARTIAL, InvoiceStatus.OVERDUE)
assert frozenset(OPEN_ORDER) == OPEN_STATUSES
OPEN_SQL_LIST = ", ".join(f"'{status.value}'" for status in OPEN_ORDER)
_OPEN_SQL = f"status IN ({OPEN_SQL_LIST}) AND amount_due > 0"


class Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, Base):
    pass


class InboxEvent(InboxMixin, Base):
    pass


class EventFailure(EventFailureMixin, Base):  # durable redelivery counts (kit.deadletter)
    pass


class InvoiceCopy(Base):
    """What this service knows about an invoice, from invoice.* snapshots (highest version wins)."""

    __tablename__ = "invoices"
    __table_args__ = (
        # The reminder scan reads a due-date range of open invoices only: a partial index keeps
        # paid/cancelled/draft invoices out of it entirely.
        Index("ix_invoices_open_due", "due_date", postgresql_where=text(_OPEN_SQL)),
        Index("ix_invoices_stripe_invoice", "stripe_invoice_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    # VARCHAR(12) holding the enum's value (no database enum type: the migration stays as it is).
    status: Mapped[InvoiceStatus] = mapped_column(
        Enum(InvoiceStatus, native_enum=False, create_constraint=False, length=12,
             values_callable=lambda enum: [member.value for member in enum])
    )
    invoice_number: Mapped[str | None] = mapped_column(String(30))
    currency: Mapped[str] = mapped_column(String(3))
    client_id: Mapped[str] = mapped_column(String(64))
    client_name: Mapped[str | None] = mapped_column(String(300))
    client_email: Mapped[str | None] = mapped_column(String(320))
    total: Mapped[int] = mapped_column(BigInteger)
    amount_paid: Mapped[int] = mapped_column(BigInteger)
    amount_due: Mapped[int] = mapped_column(BigInteger)
    issue_date: Mapped[date | None] = mapped_column(Date)
    due_date: Mapped[date | None] = mapped_column(Date)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The Stripe invoice a subscription invoice mirrors (its "update your card" email is about it).
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(100))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    @property
    def open_for_reminders(self) -> bool:
        return self.status in OPEN_STATUSES and self.amount_due > 0


class PaidStripeInvoice(Base):
    """A subscription's Stripe invoice that Stripe says is paid (stripe.invoice.paid): no "update your
    card" email about it goes out any more, whichever event asks for one later."""

    __tablename__ = "paid_stripe_invoices"

    stripe_invoice_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SettlingPayment(Base):
    """Money settled on an invoice: a payment (payment.succeeded / payment.recorded, amount > 0) or a
    refund (payment.refunded, amount < 0; its id is the refund's). Kept so a "please try again" is
    not mailed for an invoice paid before its copy says PAID (payment events can overtake it)."""

    __tablename__ = "invoice_payments"
    __table_args__ = (Index("ix_invoice_payments_invoice", "invoice_id", "recorded_at"),)

    payment_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Reminder(Base):
    """One row per (invoice, kind, sequence): the claim that makes each reminder happen once.

    kind `before_due`: sequence = days before the due date (7, 1, ...);
    kind `overdue`: sequence = notice number (1 the day after the due date, then every N days).
    """

    __tablename__ = "reminders"
    __table_args__ = (UniqueConstraint("invoice_id", "kind", "sequence", name="uq_reminder_invoice_kind_seq"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(20))
    sequence: Mapped[int] = mapped_column(Integer)
    due_date: Mapped[date] = mapped_column(Date)
    as_of: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Notification(Base):
    """One email: the log entry and the delivery queue at once."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_due", "next_attempt_at", postgresql_where=text("status IN ('pending', 'sending')")),
        Index("ix_notifications_invoice", "invoice_id", "created_at"),
        Index("ix_notifications_created", "created_at"),
        Index("ix_notifications_recipient", "recipient"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(40))
    # pending -> sending -> sent | failed; skipped when it no longer applies (reminder of a paid invoice)
    status: Mapped[str] = mapped_column(String(12), default="pending", server_default="pending")
    dedupe_key: Mapped[str] = mapped_column(String(250), unique=True)
    invoice_id: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    reminder_id: Mapped[int | None] = mapped_column(ForeignKey("reminders.id"), unique=True)
    reminder_sequence: Mapped[int | None] = mapped_column(Integer)
    recipient: Mapped[str | None] = mapped_column(String(320))
    recipient_name: Mapped[str | None] = mapped_column(String(300))
    subject: Mapped[str | None] = mapped_column(String(500))
    smtp_message_id: Mapped[str] = mapped_column(String(300))
    tracking_token: Mapped[str] = mapped_column(String(64), unique=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))
    correlation_id: Mapped[str | None] = mapped_column(String(100))

    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # SMTP attempts
    pdf_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    defer_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # waits for the invoice copy
    attachment_missing: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    claim_token: Mapped[uuid.UUID | None] = mapped_column()
    # Set just before an SMTP send, cleared when its outcome is recorded: still set on a claim means
    # the send before it ended with no outcome recorded (the replica died), so it may have gone out.
    send_attempt_id: Mapped[uuid.UUID | None] = mapped_column()
    send_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opened_via: Mapped[str | None] = mapped_column(String(10))
    clicked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeliveryAttempt(Base):
    """Each try at a message, for the log: sent, retry (SMTP error), pdf_retry, deferred, failed, skipped,
    unknown (a send whose outcome was never recorded: the replica stopped mid-send)."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    notification_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("notifications.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    smtp_code: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
