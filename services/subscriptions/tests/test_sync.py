"""The mirror, fed the way production feeds it: normalized Stripe events on billing.stripe (real Kafka)."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from contracts.subscription import SubscriptionEventType
from services.subscriptions.stripe_client import StripeCustomer

from .conftest import (
    Catalog,
    ScriptedStripe,
    event_of,
    mirror_of,
    now_s,
    publish_stripe,
    stripe_invoice,
    stripe_sub,
    wait_consumed,
    wait_for_mirror,
)

CREATED = "customer.subscription.created"
UPDATED = "customer.subscription.updated"
DELETED = "customer.subscription.deleted"


async def test_a_stripe_subscription_is_mirrored_and_announced(
    api: Any, db: Any, producer: AIOKafkaProducer, catalog: Catalog, subscription_events: Any
) -> None:
    client_id = uuid.uuid4()
    t0 = now_s()
    sub = stripe_sub(client_id=client_id, price=catalog.basic, status="incomplete", created=t0,
                     event_type=CREATED)
    await publish_stripe(producer, sub, CREATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "incomplete")
    assert row.version == 1 and row.mrr == 0 and row.access_until is None
    await publish_stripe(producer, event_of(sub, status="active", stripe_event_created=t0 + timedelta(seconds=1)),
                         UPDATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "active")
    assert row.version == 2
    assert (row.client_id, str(row.price_id), str(row.plan_id)) == (client_id, catalog.basic["id"],
                                                                    catalog.basic["planId"])
    assert row.mrr == 1_000 and row.access_until == sub.current_period_end

    events = await subscription_events.wait_for(str(row.id), count=2)
    assert [(e.type, e.data["version"]) for e in events] == [
        (SubscriptionEventType.CREATED, 1), (SubscriptionEventType.ACTIVATED, 2)]
    snap = events[-1].data
    assert snap["clientId"] == str(client_id) and snap["planName"] == catalog.plan["name"]
    assert snap["status"] == "active" and snap["mrr"] == 1_000 and snap["unitAmount"] == 1_000
    assert snap["interval"] == "month" and snap["stripeSubscriptionId"] == sub.subscription_id
    assert subscription_events.keys(str(row.id)) == [str(row.id)] * 2

    response = await api.get(f"/api/subscriptions/{row.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "active" and body["mrr"] == 1_000 and body["planName"] == catalog.plan["name"]
    history = (await api.get(f"/api/subscriptions/{row.id}/history")).json()["items"]
    assert [(h["version"], h["eventType"]) for h in history] == [(1, "subscription.created"),
                                                                 (2, "subscription.activated")]


async def test_delivered_twice_and_shuffled_gives_the_same_final_state(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, scripted: ScriptedStripe, subscription_events: Any
) -> None:
    client_id = uuid.uuid4()
    t0 = now_s()
    first = stripe_sub(client_id=client_id, price=catalog.basic, status="incomplete", created=t0,
                       event_type=CREATED)
    history = [
        (CREATED, first),
        (UPDATED, event_of(first, status="active", stripe_event_created=t0 + timedelta(seconds=1))),
        (UPDATED, event_of(first, status="active", quantity=3,
                           items=[first.items[0].model_copy(update={"quantity": 3})],
                           stripe_event_created=t0 + timedelta(seconds=2))),
        (UPDATED, event_of(first, status="active", quantity=3, cancel_at_period_end=True,
                           items=[first.items[0].model_copy(update={"quantity": 3})],
                           stripe_event_created=t0 + timedelta(seconds=3))),
        (DELETED, event_of(first, status="canceled", quantity=3, cancel_at_period_end=True,
                           items=[first.items[0].model_copy(update={"quantity": 3})],
                           canceled_at=t0 + timedelta(seconds=4), ended_at=t0 + timedelta(seconds=4),
                           stripe_event_created=t0 + timedelta(seconds=4))),
    ]
    scripted.script(history[-1][1])  # Stripe's object today, should the mirror ask
    deliveries = history * 2
    random.Random(9).shuffle(deliveries)
    for event_type, data in deliveries:
        await publish_stripe(producer, data, event_type)
    await wait_consumed(db, [data.stripe_event_id for _, data in history])
    row = await mirror_of(db, first.subscription_id)
    assert row is not None
    assert (row.status, row.quantity, row.cancel_at_period_end) == ("canceled", 3, True)
    assert row.ended_at == t0 + timedelta(seconds=4) and row.access_until == row.ended_at
    assert row.mrr == 0

    # the same history in order, for another subscription: the same final state
    ordered_id = f"sub_{uuid.uuid4().hex[:20]}"
    for event_type, data in history:
        await publish_stripe(producer, event_of(data, subscription_id=ordered_id), event_type)
    ordered = await wait_for_mirror(db, ordered_id, lambda r: r.status == "canceled")
    fields = ("status", "quantity", "cancel_at_period_end", "canceled_at", "ended_at", "access_until", "mrr",
              "price_id", "plan_id", "current_period_start", "current_period_end", "client_id")
    assert {f: getattr(row, f) for f in fields} == {f: getattr(ordered, f) for f in fields}
    # versions announced for the shuffled one only go up, one per change
    announced = [e.data["version"] for e in subscription_events.matching(str(row.id))]
    assert announced == sorted(set(announced)) and announced[-1] == row.version


async def test_an_older_state_never_overwrites_and_the_end_is_final(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, subscription_events: Any
) -> None:
    t0 = now_s()
    sub = stripe_sub(client_id=uuid.uuid4(), price=catalog.basic, status="active", created=t0 + timedelta(seconds=10))
    await publish_stripe(producer, sub, UPDATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "active")
    stale = event_of(sub, status="past_due", stripe_event_created=t0 + timedelta(seconds=5))
    await publish_stripe(producer, stale, UPDATED)
    await wait_consumed(db, [stale.stripe_event_id])
    again = await mirror_of(db, sub.subscription_id)
    assert again is not None and (again.status, again.version) == ("active", row.version)

    ended = event_of(sub, status="canceled", canceled_at=t0 + timedelta(seconds=20),
                     ended_at=t0 + timedelta(seconds=20), stripe_event_created=t0 + timedelta(seconds=20))
    await publish_stripe(producer, ended, DELETED)
    await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "canceled")
    revived = event_of(sub, status="active", stripe_event_created=t0 + timedelta(seconds=30))
    await publish_stripe(producer, revived, UPDATED)
    await wait_consumed(db, [revived.stripe_event_id])
    final = await mirror_of(db, sub.subscription_id)
    assert final is not None and final.status == "canceled"
    types = [e.type for e in subscription_events.matching(str(row.id))]
    assert types.count(SubscriptionEventType.CANCELED) == 1 and SubscriptionEventType.PAST_DUE not in types


async def test_two_events_in_the_same_second_are_settled_by_stripe(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, scripted: ScriptedStripe
) -> None:
    t0 = now_s()
    sub = stripe_sub(client_id=uuid.uuid4(), price=catalog.basic, status="active", created=t0)
    await publish_stripe(producer, sub, UPDATED)
    await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "active")
    truth = event_of(sub, quantity=5, items=[sub.items[0].model_copy(update={"quantity": 5})])
    scripted.script(truth)
    same_second = event_of(sub, quantity=2, items=[sub.items[0].model_copy(update={"quantity": 2})],
                           stripe_event_created=t0)
    await publish_stripe(producer, same_second, UPDATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.quantity == 5)
    assert row.stripe_state_source == "fetch" and row.stripe_state_at == t0  # the mark stays Stripe's
    assert ("retrieve_subscription", sub.subscription_id) in scripted.calls

    # a same-second event that says what the mirror shows settles nothing: no call to Stripe
    calls = len(scripted.calls)
    agreeing = event_of(truth, stripe_event_created=t0)
    await publish_stripe(producer, agreeing, UPDATED)
    await wait_consumed(db, [agreeing.stripe_event_id])
    assert len(scripted.calls) == calls
    # and an event after the fetch applies as usual
    later = event_of(truth, cancel_at_period_end=True, stripe_event_created=t0 + timedelta(seconds=1))
    await publish_stripe(producer, later, UPDATED)
    await wait_for_mirror(db, sub.subscription_id, lambda r: r.cancel_at_period_end and r.quantity == 5)


async def test_a_subscription_made_in_stripe_is_mirrored_when_its_customer_is_a_client(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, scripted: ScriptedStripe
) -> None:
    client_id = uuid.uuid4()
    customer_id = f"cus_{uuid.uuid4().hex[:14]}"
    scripted.customers[customer_id] = StripeCustomer(id=customer_id, email="ops@acme.test", name="Acme",
                                                     metadata={"client_id": str(client_id)})
    outside = stripe_sub(client_id=None, price=catalog.pro, customer_id=customer_id, event_type=CREATED)
    assert outside.metadata == {} and outside.client_id is None
    await publish_stripe(producer, outside, CREATED)
    row = await wait_for_mirror(db, outside.subscription_id, lambda r: True)
    assert row.client_id == client_id and str(row.price_id) == catalog.pro["id"] and row.mrr == 3_000

    # metadata naming a plan and price this service does not have (another environment, say)
    foreign_price = {**catalog.pro, "id": str(uuid.uuid4()), "planId": str(uuid.uuid4()),
                     "stripePriceId": f"price_{uuid.uuid4().hex[:12]}", "lookupKey": "elsewhere"}
    foreign = stripe_sub(client_id=uuid.uuid4(), price=foreign_price, event_type=CREATED)
    await publish_stripe(producer, foreign, CREATED)
    mirrored = await wait_for_mirror(db, foreign.subscription_id, lambda r: True)
    assert (mirrored.plan_id, mirrored.price_id, mirrored.unit_amount) == (None, None, 3_000)

    stranger = stripe_sub(client_id=None, price=catalog.pro, event_type=CREATED)  # a customer we do not know
    await publish_stripe(producer, stranger, CREATED)
    await wait_consumed(db, [stranger.stripe_event_id])
    assert await mirror_of(db, stranger.subscription_id) is None


async def test_a_paid_renewal_extends_access_once(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, subscription_events: Any
) -> None:
    sub = stripe_sub(client_id=uuid.uuid4(), price=catalog.basic, status="active")
    await publish_stripe(producer, sub, UPDATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "active")
    assert sub.current_period_end is not None and sub.current_period_start is not None
    next_end = sub.current_period_end + timedelta(days=30)
    renewal = stripe_invoice(sub, billing_reason="subscription_cycle", period_start=sub.current_period_end,
                             period_end=next_end, amount=1_000)
    await publish_stripe(producer, renewal, "invoice.paid")
    await publish_stripe(producer, renewal, "invoice.paid")  # redelivered
    late = stripe_invoice(sub, billing_reason="subscription_cycle", period_start=sub.current_period_start,
                          period_end=sub.current_period_end, amount=1_000)
    await publish_stripe(producer, late, "invoice.paid")  # the previous period's, arriving late
    await wait_consumed(db, [renewal.stripe_event_id, late.stripe_event_id])
    renewed = await mirror_of(db, sub.subscription_id)
    assert renewed is not None
    assert renewed.paid_through == next_end and renewed.access_until == next_end
    await subscription_events.settle(1.0)
    types = [e.type for e in subscription_events.matching(str(row.id))]
    assert types.count(SubscriptionEventType.RENEWED) == 1


async def test_a_failed_payment_shows_past_due_as_stripe_has_it(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, scripted: ScriptedStripe, subscription_events: Any
) -> None:
    sub = stripe_sub(client_id=uuid.uuid4(), price=catalog.basic, status="active")
    await publish_stripe(producer, sub, UPDATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "active")
    scripted.script(event_of(sub, status="past_due"))
    failed = stripe_invoice(sub, billing_reason="subscription_cycle", period_start=sub.current_period_start,
                            period_end=sub.current_period_end, amount=1_000)
    failed = failed.model_copy(update={"stripe_event_type": "invoice.payment_failed", "status": "open",
                                       "amount_paid": 0})
    await publish_stripe(producer, failed, "invoice.payment_failed")
    past_due = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "past_due")
    assert past_due.access_until == sub.current_period_start  # nothing paid beyond what was
    assert past_due.mrr == 1_000  # Stripe keeps counting it until it gives up
    await subscription_events.wait_for(str(row.id), SubscriptionEventType.PAST_DUE)


async def test_trial_will_end_is_announced_with_the_snapshot(
    db: Any, producer: AIOKafkaProducer, catalog: Catalog, subscription_events: Any
) -> None:
    trial_end = now_s() + timedelta(days=3)
    sub = stripe_sub(client_id=uuid.uuid4(), price=catalog.basic, status="trialing", trial_end=trial_end,
                     event_type=CREATED)
    await publish_stripe(producer, sub, CREATED)
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == "trialing")
    assert row.mrr == 0 and row.access_until == trial_end
    notice = event_of(sub, stripe_event_type="customer.subscription.trial_will_end",
                      stripe_event_created=sub.stripe_event_created + timedelta(seconds=1))
    await publish_stripe(producer, notice, "customer.subscription.trial_will_end")
    [event] = await subscription_events.wait_for(str(row.id), SubscriptionEventType.TRIAL_WILL_END)
    assert event.data["version"] == row.version and event.data["trialEnd"] is not None
    assert event.data["status"] == "trialing"
