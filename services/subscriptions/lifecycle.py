"""The mirror's rules, pure (no I/O): which Stripe state is newer, what a state means for access,
MRR and pending changes, which event a change of the mirror is, what kind of plan change a request is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from enum import Enum
from typing import Literal

from contracts.subscription import TERMINAL_STATUSES, SubscriptionEventType, SubscriptionStatus
from kit.clock import from_unix
from services.subscriptions.proration import monthly_amount

MRR_STATUSES = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE})
# Statuses in which a plan or quantity change is accepted.
CHANGEABLE_STATUSES = frozenset({SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE})

# Keys of the Stripe subscription's metadata. Ours travel there because stripe-mock answers every
# create with fixture ids, and a pending change lives there so Stripe's object is the whole truth.
META_CLIENT = "client_id"
META_PLAN = "plan_id"
META_PRICE = "price_id"
META_PENDING_PRICE = "pending_price_id"
META_PENDING_PLAN = "pending_plan_id"
META_PENDING_QUANTITY = "pending_quantity"
META_PENDING_AT = "pending_effective_at"


def parse_status(value: str) -> SubscriptionStatus:
    try:
        return SubscriptionStatus(value)
    except ValueError:
        # A status Stripe added after this code: treat it as not serving until someone looks.
        return SubscriptionStatus.INCOMPLETE


def parse_uuid(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# -- ordering of Stripe states -----------------------------------------------------------------
class Freshness(Enum):
    APPLY = "apply"  # strictly newer than any Stripe event the mirror applied
    SKIP = "skip"  # older: never overwrites
    TIE = "tie"  # the same second: only Stripe's current object can say which is newer


def freshness(held_at: datetime | None, incoming_at: datetime, *, held_period_start: datetime | None = None,
              incoming_period_start: datetime | None = None) -> Freshness:
    """Order a Stripe event against the newest event the mirror has applied.

    Events carry Stripe's `created` (whole seconds, Stripe's own clock, which for a customer on a
    test clock is that clock's time): strictly later applies, earlier is skipped, the same second is
    a tie. Our own clock is never compared with Stripe's: a state we fetched ourselves leaves the
    mark where the events put it, so an event that was in flight during the fetch still applies (at
    worst it shows a state for a moment that a newer event then replaces; the newest event always
    wins in the end). One thing is certain without clocks: Stripe's periods only move forward, so a
    state of an earlier period than the one held is older, whatever its `created`.
    """
    if held_period_start is not None and incoming_period_start is not None \
            and incoming_period_start < held_period_start:
        return Freshness.SKIP
    if held_at is None or incoming_at > held_at:
        return Freshness.APPLY
    if incoming_at < held_at:
        return Freshness.SKIP
    return Freshness.TIE


# -- what a state means ------------------------------------------------------------------------
def access_until(
    status: SubscriptionStatus,
    *,
    trial_end: datetime | None,
    current_period_start: datetime | None,
    current_period_end: datetime | None,
    ended_at: datetime | None,
    canceled_at: datetime | None,
    paid_through: datetime | None,
) -> datetime | None:
    """Until when the client has access (the paid-through date; the trial's end while trialing).

    Stripe keeps an automatically charged subscription `active` only while its invoices get paid (a
    failed renewal makes it past_due), so active means paid through the current period. Past due,
    unpaid, paused and incomplete give no more than what was paid; a canceled one ended when Stripe
    ended it (at the period end when canceled at period end, at once otherwise).
    """
    if status in TERMINAL_STATUSES:
        return ended_at or canceled_at
    if status == SubscriptionStatus.TRIALING:
        return _latest(trial_end, paid_through)
    if status == SubscriptionStatus.ACTIVE:
        return _latest(current_period_end, paid_through)
    if status == SubscriptionStatus.PAST_DUE:
        return paid_through or current_period_start
    return paid_through


def _latest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def mrr(status: SubscriptionStatus, *, unit_amount: int | None, quantity: int, interval: str | None,
        interval_count: int | None) -> int:
    """Monthly recurring revenue in minor units: 0 while trialing and once it stops being billed."""
    if status not in MRR_STATUSES or unit_amount is None or interval is None:
        return 0
    return monthly_amount(unit_amount, quantity, interval, interval_count or 1)


@dataclass(frozen=True)
class PendingIntent:
    price_id: uuid.UUID
    plan_id: uuid.UUID | None
    quantity: int
    effective_at: datetime


def pending_intent(metadata: dict[str, str], *, status: SubscriptionStatus,
                   current_period_start: datetime | None) -> PendingIntent | None:
    """The change scheduled for the period end, as written into the Stripe subscription's metadata.

    It is pending while the period it was scheduled in lasts; once Stripe has renewed into the new
    period (its start reaches `effective_at`) the change is simply what Stripe bills.
    """
    price_id = parse_uuid(metadata.get(META_PENDING_PRICE))
    raw_at = metadata.get(META_PENDING_AT, "")
    if price_id is None or not raw_at.isdigit() or status in TERMINAL_STATUSES:
        return None
    effective_at = from_unix(int(raw_at))
    if effective_at is None or (current_period_start is not None and current_period_start >= effective_at):
        return None
    raw_quantity = metadata.get(META_PENDING_QUANTITY, "")
    quantity = int(raw_quantity) if raw_quantity.isdigit() and int(raw_quantity) > 0 else 1
    return PendingIntent(price_id, parse_uuid(metadata.get(META_PENDING_PLAN)), quantity, effective_at)


def clear_pending_metadata() -> dict[str, str]:
    """Stripe deletes a metadata key set to the empty string."""
    return {META_PENDING_PRICE: "", META_PENDING_PLAN: "", META_PENDING_QUANTITY: "", META_PENDING_AT: ""}


# -- the mirror's state and its events ---------------------------------------------------------
@dataclass(frozen=True)
class MirrorState:
    """Everything a snapshot shows; two equal states are the same version."""

    client_id: uuid.UUID
    status: SubscriptionStatus
    plan_id: uuid.UUID | None
    price_id: uuid.UUID | None
    quantity: int
    currency: str | None
    unit_amount: int | None
    interval: str | None
    interval_count: int | None
    collection_method: str | None
    days_until_due: int | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    trial_start: datetime | None
    trial_end: datetime | None
    cancel_at_period_end: bool
    cancel_at: datetime | None
    canceled_at: datetime | None
    ended_at: datetime | None
    paid_through: datetime | None
    access_until: datetime | None
    mrr: int
    pending_price_id: uuid.UUID | None
    pending_quantity: int | None
    pending_effective_at: datetime | None
    stripe_customer_id: str | None
    stripe_item_id: str | None
    stripe_price_id: str | None
    latest_stripe_invoice_id: str | None

    def as_columns(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


STATE_FIELDS = tuple(f.name for f in fields(MirrorState))


def event_for(old: MirrorState | None, new: MirrorState) -> SubscriptionEventType | None:
    """The one event a change of the mirror publishes (None: nothing changed)."""
    if old is None:
        return SubscriptionEventType.CREATED
    if old == new:
        return None
    if new.status != old.status:
        if new.status in TERMINAL_STATUSES:
            return SubscriptionEventType.CANCELED
        if new.status in (SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID):
            return SubscriptionEventType.PAST_DUE
        if new.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING):
            return SubscriptionEventType.ACTIVATED
    return SubscriptionEventType.CHANGED


# -- plan changes ------------------------------------------------------------------------------
ChangeKind = Literal["interval", "upgrade", "downgrade"]
StripeProration = Literal["always_invoice", "create_prorations", "none"]


@dataclass(frozen=True)
class Tariff:
    amount: int
    interval: str
    interval_count: int


def change_kind(old: Tariff, old_quantity: int, new: Tariff, new_quantity: int) -> ChangeKind:
    """An interval change restarts the cycle; otherwise more per period is an upgrade (an equal
    amount too: it takes effect now and nets nothing)."""
    if (old.interval, old.interval_count) != (new.interval, new.interval_count):
        return "interval"
    return "upgrade" if new.amount * new_quantity >= old.amount * old_quantity else "downgrade"


@dataclass(frozen=True)
class ChangePlan:
    kind: ChangeKind
    proration_behavior: StripeProration
    at_period_end: bool  # a pending change, applied by Stripe at the renewal
    restart_cycle: bool


def plan_change(kind: ChangeKind, *, trialing: bool, upgrade_behavior: str, downgrade_behavior: str) -> ChangePlan:
    if kind == "interval":
        return ChangePlan(kind, "none" if trialing else "always_invoice", False, not trialing)
    if trialing:  # nothing was paid, nothing to prorate: the new price bills from the trial's end
        return ChangePlan(kind, "none", False, False)
    if kind == "upgrade":
        return ChangePlan(kind, "always_invoice" if upgrade_behavior == "always_invoice" else "create_prorations",
                          False, False)
    if downgrade_behavior == "at_period_end":
        return ChangePlan(kind, "none", True, False)
    return ChangePlan(kind, "create_prorations", False, False)


def add_interval(start: datetime, interval: str, count: int) -> datetime:
    """The end of one billing period starting at `start` (month ends clamp like Stripe's)."""
    months = count * (12 if interval == "year" else 1)
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    days_in_month = [31, 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28, 31, 30, 31, 30,
                     31, 31, 30, 31, 30, 31][month - 1]
    return start.replace(year=year, month=month, day=min(start.day, days_in_month))
