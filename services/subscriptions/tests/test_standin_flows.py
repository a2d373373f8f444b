"""Whole flows against the stateful Stripe stand-in (deploy/stripe_standin): the service's real Stripe
calls, Stripe's real lifecycle on the platform's test clock, its webhooks back into the mirror
(republished on billing.stripe by tests/standin_bridge.py, as payments does)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from contracts.subscription import SubscriptionEventType
from deploy.stripe_standin.testing import WebhookReceiver
from services.subscriptions.app import create_app
from services.subscriptions.clients import StaticClientDirectory
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.models import Subscription
from services.subscriptions.proration import prorate

from .conftest import ADMIN, client_headers, price_body
from .standin_bridge import StandinBridge


@pytest.fixture(scope="module")
async def standin_api(stripe_standin: Any, kafka: Any, database_url_factory: Callable[[str], str],
                      directory: StaticClientDirectory) -> AsyncIterator[httpx.AsyncClient]:
    settings = SubscriptionsSettings(
        database_url=database_url_factory("subscriptions_standin"),
        kafka_bootstrap=kafka.bootstrap,
        outbox_poll_interval=0.3,
        stripe_api_base=stripe_standin.url,
        stripe_secret_key="sk_test_local",
        public_url="http://gateway.test",
        consumer_group=f"subscriptions-standin-{uuid.uuid4().hex[:8]}",
    )
    app = create_app(settings, clients=directory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://subscriptions", headers=ADMIN) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def bridge(standin_webhooks: WebhookReceiver, producer: AIOKafkaProducer) -> AsyncIterator[StandinBridge]:
    running = StandinBridge(standin_webhooks, producer)
    running.start()
    yield running
    await running.stop()


async def mirror_for(api: httpx.AsyncClient, client_id: uuid.UUID, predicate: Callable[[Subscription], bool],
                     timeout: float = 30) -> Subscription:
    db = api.app.state.runtime.db  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    row: Subscription | None = None
    while loop.time() < deadline:
        async with db.sessionmaker() as s:
            row = await s.scalar(select(Subscription).where(Subscription.client_id == client_id))
        if row is not None and predicate(row):
            return row
        await asyncio.sleep(0.1)
    seen = None if row is None else (row.status, row.price_id, row.cancel_at_period_end, row.version)
    raise AssertionError(f"the mirror of {client_id}'s subscription never matched; last seen {seen}")


async def advance(api: httpx.AsyncClient, standin: Any, to: datetime) -> None:
    response = await api.post("/api/test-clock/advance", json={"to": to.isoformat()})
    assert response.status_code == 200, response.text
    await asyncio.to_thread(standin.flush, 20.0)


async def test_signup_trial_renewal_upgrade_and_cancel_at_period_end(
    standin_api: httpx.AsyncClient, stripe_standin: Any, bridge: StandinBridge, subscription_events: Any,
    standin_webhooks: WebhookReceiver,
) -> None:
    api = standin_api
    tag = uuid.uuid4().hex[:6]
    basic = (await api.post("/api/plans", json={"name": f"Basic {tag}",
                                                "prices": [price_body(1_000, trialDays=14)]})).json()
    pro = (await api.post("/api/plans", json={"name": f"Pro {tag}", "prices": [price_body(3_000)]})).json()
    basic_price, pro_price = basic["prices"][0], pro["prices"][0]

    # signup through Checkout: nothing is granted on the redirect, the webhook makes it trialing
    client_id = uuid.uuid4()
    own = client_headers(client_id)
    checkout = await api.post("/api/subscriptions/checkout", headers=own, json={"priceId": basic_price["id"]})
    assert checkout.status_code == 201, checkout.text
    async with httpx.AsyncClient() as browser:
        paid = await browser.post(f"{checkout.json()['url']}/pay")
    assert paid.status_code == 303 and "checkout=success" in paid.headers["location"]
    row = await mirror_for(api, client_id, lambda r: r.status == "trialing")
    assert row.trial_end is not None and row.mrr == 0 and row.access_until == row.trial_end
    assert str(row.price_id) == basic_price["id"]
    sub_id = str(row.id)
    clock = (await api.get("/api/test-clock")).json()
    assert row.trial_end == datetime.fromisoformat(clock["frozenTime"]) + timedelta(days=14)

    # past the trial: trial_will_end first, then the first invoice, paid, and the subscription active
    await advance(api, stripe_standin, row.trial_end + timedelta(hours=1))
    active = await mirror_for(api, client_id, lambda r: r.status == "active" and r.paid_through is not None)
    assert active.current_period_start == row.trial_end and active.mrr == 1_000
    assert active.access_until == active.current_period_end == active.paid_through
    await subscription_events.wait_for(sub_id, SubscriptionEventType.RENEWED)
    types = [e.type for e in subscription_events.matching(sub_id)]
    assert types.index(SubscriptionEventType.TRIAL_WILL_END) < types.index(SubscriptionEventType.ACTIVATED)

    # upgrade mid-period: the preview is what Stripe then charges, to the cent
    preview = await api.get(f"/api/subscriptions/{sub_id}/change-preview", headers=own,
                            params={"priceId": pro_price["id"]})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert (body["kind"], body["prorationBehavior"]) == ("upgrade", "always_invoice")
    assert active.current_period_start is not None and active.current_period_end is not None
    ours = prorate(old_unit=1_000, old_quantity=1, new_unit=3_000, new_quantity=1,
                   period_start=active.current_period_start, period_end=active.current_period_end,
                   proration_date=datetime.fromisoformat(body["prorationDate"]))
    assert sorted(line["amount"] for line in body["lines"]) == sorted(line.amount for line in ours.lines)
    assert body["amountDueNow"] == ours.total and body["nextInvoiceTotal"] == 3_000
    changed = await api.post(f"/api/subscriptions/{sub_id}/change", headers=own,
                             json={"priceId": pro_price["id"], "prorationDate": body["prorationDate"]})
    assert changed.status_code == 200, changed.text
    assert changed.json()["priceId"] == pro_price["id"] and changed.json()["mrr"] == 3_000
    [invoice] = await asyncio.to_thread(
        standin_webhooks.wait_for, "invoice.paid", 1, 20.0, billing_reason="subscription_update",
        customer=active.stripe_customer_id)
    assert invoice["data"]["object"]["amount_paid"] == body["amountDueNow"]
    assert sorted(line["amount"] for line in invoice["data"]["object"]["lines"]["data"]) == sorted(
        line["amount"] for line in body["lines"])

    # cancel at period end: access until then, then canceled, and no further invoice
    cancel = await api.post(f"/api/subscriptions/{sub_id}/cancel", headers=own, json={"atPeriodEnd": True})
    assert cancel.status_code == 200 and cancel.json()["cancelAtPeriodEnd"] is True
    assert datetime.fromisoformat(cancel.json()["accessUntil"]) == active.current_period_end
    invoices_before = len(standin_webhooks.events("invoice.created", customer=active.stripe_customer_id))
    await advance(api, stripe_standin, active.current_period_end + timedelta(hours=1))
    ended = await mirror_for(api, client_id, lambda r: r.status == "canceled")
    assert ended.ended_at == active.current_period_end and ended.access_until == active.current_period_end
    assert ended.mrr == 0
    assert len(standin_webhooks.events("invoice.created", customer=active.stripe_customer_id)) == invoices_before
    await subscription_events.wait_for(sub_id, SubscriptionEventType.CANCELED)


async def test_downgrade_at_period_end_failed_renewal_and_recovery_with_shuffled_duplicate_deliveries(
    standin_api: httpx.AsyncClient, stripe_standin: Any, bridge: StandinBridge, subscription_events: Any,
    standin_webhooks: WebhookReceiver,
) -> None:
    api = standin_api
    stripe_standin.configure(duplicate_deliveries=True, shuffle=True)
    tag = uuid.uuid4().hex[:6]
    pro = (await api.post("/api/plans", json={"name": f"Pro {tag}", "prices": [price_body(3_000)]})).json()
    basic = (await api.post("/api/plans", json={"name": f"Basic {tag}", "prices": [price_body(1_000)]})).json()
    pro_price, basic_price = pro["prices"][0], basic["prices"][0]
    client_id = uuid.uuid4()
    created = await api.post("/api/subscriptions", json={"clientId": str(client_id), "priceId": pro_price["id"],
                                                         "quantity": 1})
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    active = await mirror_for(api, client_id, lambda r: r.status == "active" and r.paid_through is not None)
    assert active.current_period_end is not None and active.mrr == 3_000
    period_end = active.current_period_end

    settings = api.app.state.deps.settings  # type: ignore[attr-defined]
    settings.downgrade_behavior = "at_period_end"
    try:
        body = (await api.get(f"/api/subscriptions/{sub_id}/change-preview",
                              params={"priceId": basic_price["id"]})).json()
        assert (body["effective"], body["amountDueNow"], body["nextInvoiceTotal"]) == ("period_end", 0, 1_000)
        changed = await api.post(f"/api/subscriptions/{sub_id}/change",
                                 json={"priceId": basic_price["id"], "prorationDate": body["prorationDate"]})
    finally:
        settings.downgrade_behavior = "create_prorations"
    assert changed.status_code == 200, changed.text
    assert changed.json()["priceId"] == pro_price["id"]
    assert changed.json()["pendingChange"]["priceId"] == basic_price["id"]
    await asyncio.to_thread(stripe_standin.flush, 20.0)
    pending = await mirror_for(api, client_id, lambda r: r.pending_price_id is not None)
    assert str(pending.price_id) == pro_price["id"] and pending.mrr == 3_000  # still pro until the renewal

    # the renewal bills the new price, and the card is declined: past_due, access as paid
    assert active.stripe_customer_id is not None
    await asyncio.to_thread(stripe_standin.set_card, active.stripe_customer_id, "decline")
    await advance(api, stripe_standin, period_end + timedelta(hours=1))
    past_due = await mirror_for(api, client_id, lambda r: r.status == "past_due")
    failed = standin_webhooks.events("invoice.payment_failed", customer=active.stripe_customer_id)
    assert failed and failed[0]["data"]["object"]["amount_due"] == 1_000
    assert str(past_due.price_id) == basic_price["id"] and past_due.pending_price_id is None
    assert past_due.access_until == period_end and past_due.mrr == 1_000

    # a later payment recovers it
    await asyncio.to_thread(stripe_standin.set_card, active.stripe_customer_id, "succeed")
    await advance(api, stripe_standin, period_end + timedelta(days=2))
    recovered = await mirror_for(api, client_id, lambda r: r.status == "active" and r.paid_through is not None
                                 and r.paid_through > period_end)
    assert recovered.access_until == recovered.current_period_end
    assert recovered.current_period_start == period_end
    await subscription_events.wait_for(sub_id, SubscriptionEventType.ACTIVATED)
    await subscription_events.wait_for(sub_id, SubscriptionEventType.RENEWED)  # in either order (shuffled)
    await subscription_events.settle(1.0)
    types = [e.type for e in subscription_events.matching(sub_id)]
    # The first invoice (subscription_create) only records what was paid; the renewal paid late is
    # `renewed`, once. Shuffled deliveries may show a state for a moment (the final one is exact).
    assert types.count(SubscriptionEventType.RENEWED) == 1 and SubscriptionEventType.PAST_DUE in types
    assert types.index(SubscriptionEventType.PAST_DUE) < types.index(SubscriptionEventType.RENEWED)
    final = await mirror_for(api, client_id, lambda r: True)
    assert (final.status, str(final.price_id), final.paid_through) == ("active", basic_price["id"],
                                                                       recovered.paid_through)
    assert standin_webhooks.events("invoice.paid", customer=active.stripe_customer_id)  # delivered (twice each)


async def test_an_invoiced_retainer_waits_for_its_invoice(
    standin_api: httpx.AsyncClient, stripe_standin: Any, bridge: StandinBridge, standin_webhooks: WebhookReceiver,
) -> None:
    api = standin_api
    plan = (await api.post("/api/plans", json={"name": f"Retainer {uuid.uuid4().hex[:6]}",
                                               "prices": [price_body(50_000)]})).json()
    client_id = uuid.uuid4()
    created = await api.post("/api/subscriptions", json={
        "clientId": str(client_id), "priceId": plan["prices"][0]["id"], "quantity": 2,
        "collectionMethod": "send_invoice", "daysUntilDue": 14})
    assert created.status_code == 201, created.text
    assert created.json()["collectionMethod"] == "send_invoice" and created.json()["quantity"] == 2
    row = await mirror_for(api, client_id, lambda r: r.status == "active")
    assert row.mrr == 100_000 and row.paid_through is None
    [invoice] = await asyncio.to_thread(standin_webhooks.wait_for, "invoice.finalized", 1, 20.0,
                                        customer=row.stripe_customer_id)
    assert invoice["data"]["object"]["amount_due"] == 100_000 and invoice["data"]["object"]["due_date"]


async def test_credited_downgrade_and_interval_change_cost_what_the_preview_said(
    standin_api: httpx.AsyncClient, stripe_standin: Any, bridge: StandinBridge, standin_webhooks: WebhookReceiver,
) -> None:
    api = standin_api
    tag = uuid.uuid4().hex[:6]
    plan = (await api.post("/api/plans", json={"name": f"Care {tag}", "prices": [
        price_body(3_000), price_body(30_000, "year")]})).json()
    small = (await api.post("/api/plans", json={"name": f"Lite {tag}", "prices": [price_body(1_000)]})).json()
    monthly, yearly, lite = plan["prices"][0], plan["prices"][1], small["prices"][0]
    client_id = uuid.uuid4()
    created = await api.post("/api/subscriptions", json={"clientId": str(client_id), "priceId": monthly["id"],
                                                         "quantity": 2})
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    active = await mirror_for(api, client_id, lambda r: r.status == "active" and r.paid_through is not None)
    assert active.current_period_end is not None and active.stripe_customer_id is not None
    clock = datetime.fromisoformat((await api.get("/api/test-clock")).json()["frozenTime"])
    await advance(api, stripe_standin, clock + timedelta(days=10))

    # a downgrade credited to the next invoice: nothing due now; the renewal is what the preview said
    body = (await api.get(f"/api/subscriptions/{sub_id}/change-preview",
                          params={"priceId": lite["id"], "quantity": 1})).json()
    assert (body["kind"], body["prorationBehavior"], body["amountDueNow"]) == ("downgrade", "create_prorations", 0)
    changed = await api.post(f"/api/subscriptions/{sub_id}/change",
                             json={"priceId": lite["id"], "quantity": 1, "prorationDate": body["prorationDate"]})
    assert changed.status_code == 200, changed.text
    await advance(api, stripe_standin, active.current_period_end + timedelta(hours=1))
    renewal = [e["data"]["object"] for e in standin_webhooks.events("invoice.paid", customer=active.stripe_customer_id)
               if e["data"]["object"]["billing_reason"] == "subscription_cycle"]
    assert renewal and renewal[-1]["total"] == body["nextInvoiceTotal"]
    renewed = await mirror_for(api, client_id, lambda r: r.current_period_start == active.current_period_end
                               and r.paid_through is not None and r.paid_through > active.current_period_end)
    assert renewed.mrr == 1_000 and renewed.quantity == 1

    # month -> year restarts the cycle now: the unused month is credited, the year charged, all at once
    body = (await api.get(f"/api/subscriptions/{sub_id}/change-preview", params={"priceId": yearly["id"]})).json()
    assert (body["kind"], body["effective"]) == ("interval", "now")
    changed = await api.post(f"/api/subscriptions/{sub_id}/change",
                             json={"priceId": yearly["id"], "prorationDate": body["prorationDate"]})
    assert changed.status_code == 200, changed.text
    [invoice] = await asyncio.to_thread(standin_webhooks.wait_for, "invoice.paid", 1, 20.0,
                                        billing_reason="subscription_update", customer=active.stripe_customer_id)
    assert invoice["data"]["object"]["amount_paid"] == body["amountDueNow"]
    assert any(line["amount"] == 30_000 for line in body["lines"])
    yearly_row = await mirror_for(api, client_id, lambda r: r.interval == "year")
    assert yearly_row.current_period_start == datetime.fromisoformat(body["prorationDate"])
    assert yearly_row.mrr == 2_500
