"""Read models of the reporting service, all in the `reporting` schema (a rebuild fills a copy of the
schema and swaps it in; see rebuild.py).

Built only from events: a copy of each invoice (the newest snapshot version), a ledger of payments
and refunds with their dates, daily aggregates kept up to date with every change (so the dashboard
reads a few hundred rows, not every payment), the feed's Kafka positions and its inbox of event ids.
Amounts are integers in minor units, always next to their currency; nothing adds two currencies.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "reporting"
MIGRATIONS = Path(__file__).parent / "migrations"
# The SQL of an invoice that still expects money (contracts.invoice.OPEN_STATUSES).
OPEN_SQL = "status IN ('SENT', 'VIEWED', 'PARTIAL', 'OVERDUE')"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class Meta(Base):
    """Facts about this copy of the read models, e.g. the time zone its days were counted in."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Position(Base):
    """Next Kafka offset to apply per partition, committed with the effects of the events before it."""

    __tablename__ = "positions"

    topic: Mapped[str] = mapped_column(String(200), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    next_offset: Mapped[int] = mapped_column(BigInteger)


class InboxEvent(Base):
    """Ids of the events applied: the same event published twice (at two offsets) counts once."""

    __tablename__ = "inbox"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(100))


class RejectedEvent(Base):
    """Events that could not be read (malformed, or a payload its contract refuses): kept, skipped."""

    __tablename__ = "rejected_events"

    topic: Mapped[str] = mapped_column(String(200), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str | None] = mapped_column(String(200))
    event_type: Mapped[str | None] = mapped_column(String(100))
    error: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Invoice(Base):
    """The newest snapshot of each invoice (kit.replica's rule: a strictly newer version wins)."""

    __tablename__ = "invoices"
    __table_args__ = (
        Index("ix_invoices_open_due", "due_date", "id", postgresql_where=text(OPEN_SQL)),
        Index("ix_invoices_cancelled", "cancelled_at", postgresql_where=text("status = 'CANCELLED'")),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    number: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(12))
    currency: Mapped[str] = mapped_column(String(3))
    client_id: Mapped[str] = mapped_column(String(64))
    client_name: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int] = mapped_column(BigInteger)
    amount_paid: Mapped[int] = mapped_column(BigInteger)
    amount_due: Mapped[int] = mapped_column(BigInteger)
    issue_date: Mapped[date | None] = mapped_column(Date)
    due_date: Mapped[date | None] = mapped_column(Date)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Time of the event that cancelled it: an invoice cancelled after a date was receivable on it.
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Time of the event that carried this version.
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LedgerEntry(Base):
    """Money in and out: one row per payment (positive) and per refund (negative), keyed by its id."""

    __tablename__ = "ledger"
    __table_args__ = (
        Index("ix_ledger_invoice", "invoice_id"),
        Index("ix_ledger_occurred", "occurred_at"),
    )

    entry_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(10))  # payment | refund
    method: Mapped[str] = mapped_column(String(20))  # card, bank_transfer, cash, cheque, other
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event_id: Mapped[str] = mapped_column(String(200))


class LedgerTotal(Base):
    """Σ of the ledger per invoice and currency, for the reconciliation against the invoice's amountPaid."""

    __tablename__ = "ledger_totals"

    invoice_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(Integer)


class CashDay(Base):
    """Money received and refunded per day (in the read models' time zone), currency and method."""

    __tablename__ = "cash_daily"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    method: Mapped[str] = mapped_column(String(20), primary_key=True)
    payments: Mapped[int] = mapped_column(Integer)
    paid: Mapped[int] = mapped_column(BigInteger)
    refunds: Mapped[int] = mapped_column(Integer)
    refunded: Mapped[int] = mapped_column(BigInteger)


class InvoicedDay(Base):
    """Invoices issued per issue date and currency that stand (not drafts, not cancelled)."""

    __tablename__ = "invoiced_daily"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    invoices: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)


class OpenByDue(Base):
    """What open invoices still owe, per due date and currency (the dashboard's outstanding/overdue)."""

    __tablename__ = "open_by_due"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    # An open invoice without a due date (none in practice: sending sets one) is kept under date.max.
    due_date: Mapped[date] = mapped_column(Date, primary_key=True)
    invoices: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)


class Subscription(Base):
    """The newest state of each subscription and what it adds to MRR (normalised to a month)."""

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    client_id: Mapped[str] = mapped_column(String(64))
    currency: Mapped[str | None] = mapped_column(String(3))  # none before a price is chosen
    status: Mapped[str] = mapped_column(String(30))
    # Minor units per month, exact (an annual price of 1000 is 83.3333 a month).
    mrr: Mapped[Decimal] = mapped_column(Numeric(24, 6))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SubscriptionChange(Base):
    """Every version of every subscription's MRR, with when it took effect: the movements of any month
    are computed from this history, so the order in which events arrived never matters."""

    __tablename__ = "subscription_changes"
    __table_args__ = (Index("ix_subscription_changes_client", "client_id", "currency", "effective_at"),)

    subscription_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    client_id: Mapped[str] = mapped_column(String(64))
    currency: Mapped[str | None] = mapped_column(String(3))  # none before a price is chosen
    status: Mapped[str] = mapped_column(String(30))
    mrr: Mapped[Decimal] = mapped_column(Numeric(24, 6))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Rebuild(Base):
    """One line per finished rebuild (outside the swapped schema, so it survives the swap)."""

    __tablename__ = "rebuilds"
    __table_args__ = {"schema": "public"}

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    events: Mapped[int] = mapped_column(BigInteger)
    timezone: Mapped[str] = mapped_column(String(60))


READ_MODEL_TABLES = [table for table in Base.metadata.sorted_tables if table.schema == SCHEMA]
