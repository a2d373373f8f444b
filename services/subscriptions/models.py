"""Tables of the subscriptions service: plans and their (immutable) prices, Stripe customers per
client, the mirror of each Stripe subscription with its append-only history, platform Stripe objects."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from kit.db import InboxMixin, OutboxMixin
from kit.deadletter import EventFailureMixin
from kit.idempotency import IdempotencyMixin


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    __mapper_args__ = {"eager_defaults": True}


class OutboxMessage(OutboxMixin, Base):
    pass


class InboxEvent(InboxMixin, Base):
    pass


class EventFailure(EventFailureMixin, Base):  # durable redelivery counts (kit.deadletter)
    pass


class IdempotencyKey(IdempotencyMixin, Base):
    pass


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    features: Mapped[list[str]] = mapped_column(JSONB, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    stripe_product_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=_now)

    prices: Mapped[list[Price]] = relationship(
        back_populates="plan", lazy="selectin", order_by="Price.created_at", cascade="all"
    )


class Price(Base):
    """Immutable like Stripe's: a new amount or interval is a new price; the old one is archived."""

    __tablename__ = "prices"
    __table_args__ = (
        CheckConstraint("amount >= 0", name="ck_prices_amount"),
        CheckConstraint("interval IN ('month', 'year')", name="ck_prices_interval"),
        CheckConstraint("interval_count >= 1", name="ck_prices_interval_count"),
        CheckConstraint("trial_days >= 0", name="ck_prices_trial_days"),
        # One active price per lookup key (Stripe's rule too); archived ones keep theirs.
        Index("uq_prices_active_lookup_key", "lookup_key", unique=True, postgresql_where=text("active")),
        Index("ix_prices_stripe_price_id", "stripe_price_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)
    interval: Mapped[str] = mapped_column(String(5))
    interval_count: Mapped[int] = mapped_column(Integer, default=1)
    trial_days: Mapped[int] = mapped_column(Integer, default=0)
    lookup_key: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Not unique: stripe-mock answers every create with a fixture id; our id travels in metadata.
    stripe_price_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    plan: Mapped[Plan] = relationship(back_populates="prices", lazy="raise")


class Customer(Base):
    """The Stripe customer of a client (one per client)."""

    __tablename__ = "customers"

    client_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    # Set when the customer was created on the platform's test clock: its "now" is the clock's.
    test_clock_id: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(300))
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Subscription(Base):
    """The mirror of one Stripe subscription (Stripe owns the lifecycle)."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("quantity >= 0", name="ck_subscriptions_quantity"),
        CheckConstraint("version >= 1", name="ck_subscriptions_version"),
        Index("ix_subscriptions_client", "client_id", "created_at"),
        Index("ix_subscriptions_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID] = mapped_column()
    plan_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plans.id"))
    price_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("prices.id"))
    status: Mapped[str] = mapped_column(String(20))
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    currency: Mapped[str | None] = mapped_column(String(3))
    unit_amount: Mapped[int | None] = mapped_column(BigInteger)
    interval: Mapped[str | None] = mapped_column(String(5))
    interval_count: Mapped[int | None] = mapped_column(Integer)
    collection_method: Mapped[str | None] = mapped_column(String(30))
    days_until_due: Mapped[int | None] = mapped_column(Integer)
    current_period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    current_period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trial_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trial_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # End of the last period a paid Stripe invoice covered (monotonic).
    paid_through: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mrr: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_price_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("prices.id"))
    pending_quantity: Mapped[int | None] = mapped_column(Integer)
    pending_effective_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stripe_subscription_id: Mapped[str] = mapped_column(String(255), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    stripe_item_id: Mapped[str | None] = mapped_column(String(255))
    # Stripe's current item price (differs from price_id's while a change is pending).
    stripe_price_id: Mapped[str | None] = mapped_column(String(255))
    latest_stripe_invoice_id: Mapped[str | None] = mapped_column(String(255))
    # `created` of the newest Stripe event applied (whole seconds, Stripe's clock), and where the
    # state shown came from: "event" or "fetch" (our own read of the object, which leaves the mark).
    stripe_state_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stripe_state_source: Mapped[str] = mapped_column(String(10), default="event")
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=_now)


class SubscriptionHistory(Base):
    """Append-only: one row per version of a subscription (and per notice, e.g. trial_will_end,
    which carries the version it was sent with)."""

    __tablename__ = "subscription_history"
    __table_args__ = (Index("ix_subscription_history_sub", "subscription_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    subscription_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subscriptions.id"))
    version: Mapped[int] = mapped_column(Integer)
    event_type: Mapped[str] = mapped_column(String(60))
    status: Mapped[str] = mapped_column(String(20))
    cause_id: Mapped[str | None] = mapped_column(String(255))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSONB)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PlatformObject(Base):
    """Stripe objects of the platform itself: the test clock, the billing-portal configuration."""

    __tablename__ = "platform_objects"

    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    stripe_id: Mapped[str] = mapped_column(String(255))
    frozen_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str | None] = mapped_column(String(30))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=_now)
