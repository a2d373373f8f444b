"""The mirror's pure rules (services/subscriptions/lifecycle.py) and the settings' key rules."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from contracts.subscription import SubscriptionEventType, SubscriptionStatus
from services.subscriptions import lifecycle
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.lifecycle import Freshness, MirrorState, Tariff

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_events_order_by_stripe_second_and_a_tie_is_a_tie() -> None:
    assert lifecycle.freshness(None, at(0)) is Freshness.APPLY
    assert lifecycle.freshness(at(10), at(11)) is Freshness.APPLY
    assert lifecycle.freshness(at(10), at(9)) is Freshness.SKIP
    assert lifecycle.freshness(at(10), at(10)) is Freshness.TIE
    # periods only move forward: a state of an earlier period is older whatever its second
    assert lifecycle.freshness(at(10), at(50), held_period_start=at(30), incoming_period_start=at(0)) is Freshness.SKIP
    assert lifecycle.freshness(at(10), at(50), held_period_start=at(30), incoming_period_start=at(30)) \
        is Freshness.APPLY


def test_access_follows_status() -> None:
    start, end, trial = at(0), at(30 * 86_400), at(14 * 86_400)
    common = dict(current_period_start=start, current_period_end=end, ended_at=None, canceled_at=None)
    assert lifecycle.access_until(SubscriptionStatus.TRIALING, trial_end=trial, paid_through=None, **common) == trial
    assert lifecycle.access_until(SubscriptionStatus.ACTIVE, trial_end=None, paid_through=None, **common) == end
    # a failed renewal gives no more than what was paid (the previous period)
    assert lifecycle.access_until(SubscriptionStatus.PAST_DUE, trial_end=None, paid_through=None, **common) == start
    assert lifecycle.access_until(SubscriptionStatus.PAST_DUE, trial_end=None, paid_through=at(5), **common) == at(5)
    assert lifecycle.access_until(SubscriptionStatus.INCOMPLETE, trial_end=None, paid_through=None, **common) is None
    ended = dict(common, ended_at=at(100), canceled_at=at(50))
    assert lifecycle.access_until(SubscriptionStatus.CANCELED, trial_end=None, paid_through=end, **ended) == at(100)


def test_mrr_is_monthly_and_zero_unless_billed() -> None:
    kw = dict(unit_amount=12_000, quantity=2, interval="year", interval_count=1)
    assert lifecycle.mrr(SubscriptionStatus.ACTIVE, **kw) == 2_000  # type: ignore[arg-type]
    assert lifecycle.mrr(SubscriptionStatus.PAST_DUE, **kw) == 2_000  # type: ignore[arg-type]
    for status in (SubscriptionStatus.TRIALING, SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE,
                   SubscriptionStatus.PAUSED):
        assert lifecycle.mrr(status, **kw) == 0  # type: ignore[arg-type]


def test_pending_intent_lasts_until_the_renewal() -> None:
    price = uuid.uuid4()
    meta = {lifecycle.META_PENDING_PRICE: str(price), lifecycle.META_PENDING_QUANTITY: "3",
            lifecycle.META_PENDING_AT: str(int(at(1000).timestamp()))}
    pending = lifecycle.pending_intent(meta, status=SubscriptionStatus.ACTIVE, current_period_start=at(0))
    assert pending is not None and pending.price_id == price and pending.quantity == 3
    assert pending.effective_at == at(1000)
    assert lifecycle.pending_intent(meta, status=SubscriptionStatus.ACTIVE, current_period_start=at(1000)) is None
    assert lifecycle.pending_intent(meta, status=SubscriptionStatus.CANCELED, current_period_start=at(0)) is None
    assert lifecycle.pending_intent({}, status=SubscriptionStatus.ACTIVE, current_period_start=at(0)) is None


def state(**changes: object) -> MirrorState:
    base = MirrorState(
        client_id=uuid.UUID(int=1), status=SubscriptionStatus.ACTIVE, plan_id=None, price_id=None, quantity=1,
        currency="EUR", unit_amount=1_000, interval="month", interval_count=1, collection_method=None,
        days_until_due=None, current_period_start=at(0), current_period_end=at(100), trial_start=None,
        trial_end=None, cancel_at_period_end=False, cancel_at=None, canceled_at=None, ended_at=None,
        paid_through=None, access_until=at(100), mrr=1_000, pending_price_id=None, pending_quantity=None,
        pending_effective_at=None, stripe_customer_id="cus_1", stripe_item_id="si_1", stripe_price_id="price_1",
        latest_stripe_invoice_id=None)
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("old", "new", "expected"), [
    (None, {}, SubscriptionEventType.CREATED),
    ({}, {}, None),
    ({"status": SubscriptionStatus.TRIALING}, {}, SubscriptionEventType.ACTIVATED),
    ({"status": SubscriptionStatus.INCOMPLETE}, {"status": SubscriptionStatus.TRIALING},
     SubscriptionEventType.ACTIVATED),
    ({"status": SubscriptionStatus.PAST_DUE}, {}, SubscriptionEventType.ACTIVATED),
    ({}, {"status": SubscriptionStatus.PAST_DUE}, SubscriptionEventType.PAST_DUE),
    ({}, {"status": SubscriptionStatus.CANCELED}, SubscriptionEventType.CANCELED),
    ({}, {"cancel_at_period_end": True}, SubscriptionEventType.CHANGED),
    ({}, {"quantity": 2}, SubscriptionEventType.CHANGED),
])
def test_one_event_per_change(old: dict | None, new: dict, expected: SubscriptionEventType | None) -> None:
    assert lifecycle.event_for(None if old is None else state(**old), state(**new)) == expected


def test_change_kinds_and_policies() -> None:
    month_10, month_30, year_100 = Tariff(1_000, "month", 1), Tariff(3_000, "month", 1), Tariff(10_000, "year", 1)
    assert lifecycle.change_kind(month_10, 1, month_30, 1) == "upgrade"
    assert lifecycle.change_kind(month_30, 1, month_10, 1) == "downgrade"
    assert lifecycle.change_kind(month_30, 1, month_10, 3) == "upgrade"  # equal amount: takes effect now
    assert lifecycle.change_kind(month_10, 1, year_100, 1) == "interval"
    policy = dict(upgrade_behavior="always_invoice", downgrade_behavior="at_period_end")
    up = lifecycle.plan_change("upgrade", trialing=False, **policy)
    assert (up.proration_behavior, up.at_period_end) == ("always_invoice", False)
    down = lifecycle.plan_change("downgrade", trialing=False, **policy)
    assert (down.proration_behavior, down.at_period_end) == ("none", True)
    credit = lifecycle.plan_change("downgrade", trialing=False, upgrade_behavior="always_invoice",
                                   downgrade_behavior="create_prorations")
    assert (credit.proration_behavior, credit.at_period_end) == ("create_prorations", False)
    restart = lifecycle.plan_change("interval", trialing=False, **policy)
    assert (restart.proration_behavior, restart.restart_cycle) == ("always_invoice", True)
    assert lifecycle.plan_change("upgrade", trialing=True, **policy).proration_behavior == "none"


def test_add_interval_clamps_month_ends() -> None:
    assert lifecycle.add_interval(datetime(2026, 1, 31, tzinfo=UTC), "month", 1) == datetime(2026, 2, 28, tzinfo=UTC)
    assert lifecycle.add_interval(datetime(2028, 1, 31, tzinfo=UTC), "month", 1) == datetime(2028, 2, 29, tzinfo=UTC)
    assert lifecycle.add_interval(datetime(2026, 3, 15, tzinfo=UTC), "year", 1) == datetime(2027, 3, 15, tzinfo=UTC)


def test_settings_refuse_live_and_non_stripe_keys() -> None:
    with pytest.raises(ValidationError, match="live-mode"):
        SubscriptionsSettings(stripe_secret_key="sk_live_abc")
    with pytest.raises(ValidationError, match="test-mode"):
        SubscriptionsSettings(stripe_secret_key="pk_test_abc")
    settings = SubscriptionsSettings(stripe_secret_key="sk_test_local", public_url="http://gw.test")
    assert settings.test_mode and settings.uses_test_clock
    assert settings.portal_url == "http://gw.test/portal"
