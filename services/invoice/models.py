from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from contracts.invoice import InvoiceStatus
from kit.clock import utcnow
from kit.db import InboxMixin, OutboxMixin
from kit.deadletter import EventFailureMixin
from kit.idempotency import IdempotencyMixin


class Base(DeclarativeBase):
    # Fetch server defaults (created_at) with RETURNING on insert: no lazy reload in async code.
    __mapper_args__ = {"eager_defaults": True}


class OutboxMessage(OutboxMixin, Base):
    pass


class InboxEvent(InboxMixin, Base):
    pass


class EventFailure(EventFailureMixin, Base):  # durable redelivery counts (kit.deadletter)
    pass


class IdempotencyKey(IdempotencyMixin, Base):
    """Idempotency-Keys of POSTs, recorded in the same transaction as their effect."""


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(300))
    email: Mapped[str] = mapped_column(String(320))
    address: Mapped[str | None] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3))
    tax_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # onupdate in Python (not by the DB): the new value is known without re-reading the row.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=utcnow)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("number_year", "number_seq", name="uq_invoice_number"),
        # One invoice of ours per Stripe invoice, however often and in whatever order its events come.
        UniqueConstraint("stripe_invoice_id", name="uq_invoices_stripe_invoice_id"),
        CheckConstraint("amount_paid >= 0", name="ck_amount_paid_non_negative"),
        Index("ix_invoices_client_created", "client_id", "created_at"),
        Index("ix_invoices_status_due", "status", "due_date"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    invoice_number: Mapped[str | None] = mapped_column(String(20), unique=True)
    number_year: Mapped[int | None] = mapped_column(Integer)
    number_seq: Mapped[int | None] = mapped_column(Integer)
    # Stored as VARCHAR(12) holding the value ("SENT"), read back as the enum.
    status: Mapped[InvoiceStatus] = mapped_column(
        Enum(InvoiceStatus, native_enum=False, length=12, validate_strings=True,
             values_callable=lambda statuses: [s.value for s in statuses]),
        default=InvoiceStatus.DRAFT,
    )
    currency: Mapped[str] = mapped_column(String(3))
    client_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clients.id"))
    project_id: Mapped[str | None] = mapped_column(String(100))
    notes: Mapped[str | None] = mapped_column(Text)
    tax_rate: Mapped[Decimal | None] = mapped_column(Numeric(7, 4))
    discount_percent: Mapped[Decimal | None] = mapped_column(Numeric(7, 4))
    discount_fixed: Mapped[int] = mapped_column(BigInteger, default=0)
    subtotal: Mapped[int] = mapped_column(BigInteger, default=0)
    discount_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    tax_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    amount_paid: Mapped[int] = mapped_column(BigInteger, default=0)
    issue_date: Mapped[date | None] = mapped_column(Date)
    due_date: Mapped[date | None] = mapped_column(Date)
    net_days: Mapped[int | None] = mapped_column(Integer)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    viewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(100))
    stripe_checkout_session_id: Mapped[str | None] = mapped_column(String(200))
    template_version: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # onupdate in Python (not by the DB): the new value is known without re-reading the row.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=utcnow)

    client: Mapped[Client] = relationship(lazy="joined")
    items: Mapped[list[InvoiceItem]] = relationship(
        order_by="InvoiceItem.position", cascade="all, delete-orphan", lazy="selectin"
    )

    @property
    def amount_due(self) -> int:
        return max(self.total - self.amount_paid, 0)


class InvoiceItem(Base):
    __tablename__ = "invoice_items"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    quantity: Mapped[Decimal] = mapped_column(Numeric(18, 4))
    unit_price: Mapped[int] = mapped_column(BigInteger)
    discount: Mapped[int] = mapped_column(BigInteger, default=0)
    discount_percent: Mapped[Decimal | None] = mapped_column(Numeric(7, 4))
    tax_rate: Mapped[Decimal | None] = mapped_column(Numeric(7, 4))
    amount: Mapped[int] = mapped_column(BigInteger)
    tax_amount: Mapped[int] = mapped_column(BigInteger, default=0)


class InvoicePayment(Base):
    """The invoice's own ledger of payments applied to it, one row per payment id: this is what
    makes a repeated or replayed payment event count once."""

    __tablename__ = "invoice_payments"
    __table_args__ = (UniqueConstraint("payment_id", "kind", name="uq_invoice_payment"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"), index=True)
    payment_id: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))  # payment | refund
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    method: Mapped[str] = mapped_column(String(30))
    reference: Mapped[str | None] = mapped_column(String(200))
    paid_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class NumberCounter(Base):
    """Last invoice number handed out per calendar year. Incremented in the sending transaction
    under a row lock, so numbers are gapless and unique across replicas."""

    __tablename__ = "invoice_number_counters"

    year: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_value: Mapped[int] = mapped_column(Integer, default=0)


class InvoiceTemplate(Base):
    """One saved version of the invoice template (branding and defaults). Append-only: every save
    inserts a new version and rows are never updated, so an invoice pinned to a version keeps its
    look. The current template is the highest version; no row at all means the built-in defaults."""

    __tablename__ = "invoice_templates"
    __table_args__ = (
        CheckConstraint("version > 0", name="ck_invoice_templates_version_positive"),
        CheckConstraint("(logo_data IS NULL) = (logo_mime IS NULL)", name="ck_invoice_templates_logo_complete"),
    )

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # TemplateSettings.model_dump(mode="json", by_alias=True) without the logo
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # the validated, normalized logo (PNG, or sanitized SVG) and its metadata
    logo_data: Mapped[bytes | None] = mapped_column(LargeBinary)
    logo_mime: Mapped[str | None] = mapped_column(String(40))
    logo_width: Mapped[int | None] = mapped_column(Integer)
    logo_height: Mapped[int | None] = mapped_column(Integer)
    logo_source_mime: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_by: Mapped[str | None] = mapped_column(String(200))


class InvoicePdf(Base):
    """The last rendered PDF of each invoice, keyed by the content fingerprint it was rendered from.
    One row per invoice (upserted), so the cache never grows beyond the number of invoices."""

    __tablename__ = "invoice_pdfs"

    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    pdf: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
