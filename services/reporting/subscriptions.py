"""subscription.* events: what each subscription adds to MRR, as Stripe Billing counts it.

MRR of a subscription = unit amount × quantity, normalised to one month (a yearly price ÷ 12, every
`intervalCount` months ÷ intervalCount), before tax, and only while it is `active` or `past_due`:
a trial, an incomplete, paused, unpaid or canceled subscription adds nothing. One-off invoices are
not subscriptions and never count. Kept exact (six decimals) so ARR = 12 × MRR does not drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from contracts.subscription import BillingInterval, SubscriptionSnapshotV1, SubscriptionStatus

# Paying subscriptions: Stripe keeps past_due in MRR until it gives up (canceled or unpaid).
PAYING_STATUSES = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE})
_MONTHS_PER_INTERVAL = {BillingInterval.MONTH: Decimal(1), BillingInterval.YEAR: Decimal(12)}
_SIX_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class SubscriptionState:
    """One version of one subscription, as the MRR history keeps it."""

    subscription_id: str
    version: int
    client_id: str
    currency: str | None
    status: str
    mrr: Decimal  # minor units per month
    effective_at: datetime


def monthly_amount(snapshot: SubscriptionSnapshotV1) -> Decimal:
    """The subscription's MRR in minor units (exact to six decimals)."""
    if snapshot.status not in PAYING_STATUSES:
        return Decimal(0)
    if snapshot.unit_amount is None or snapshot.interval is None:
        # No price details on the event: the subscriptions service's own figure.
        return Decimal(snapshot.mrr)
    months = _MONTHS_PER_INTERVAL[snapshot.interval] * max(1, snapshot.interval_count or 1)
    return (Decimal(snapshot.unit_amount) * snapshot.quantity / months).quantize(_SIX_PLACES)


def state_of(snapshot: SubscriptionSnapshotV1) -> SubscriptionState:
    return SubscriptionState(
        subscription_id=snapshot.id, version=snapshot.version, client_id=snapshot.client_id,
        currency=snapshot.currency.upper() if snapshot.currency else None, status=str(snapshot.status),
        mrr=monthly_amount(snapshot), effective_at=snapshot.occurred_at,
    )
