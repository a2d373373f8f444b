"""Plan changes, cancellation, signup, billing portal and test clock through the API. Requests go
to stripe-mock (which checks them against Stripe's spec); subscriptions are scripted (conftest)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from contracts.stripe import StripeSubscriptionV1
from contracts.subscription import SubscriptionEventType
from services.subscriptions.models import Customer

from .conftest import (
    Catalog,
    ScriptedStripe,
    client_headers,
    event_of,
    now_s,
    publish_stripe,
    stripe_sub,
    wait_for_mirror,
)


@dataclass
class Live:
    id: str
    client_id: uuid.UUID
    stripe: StripeSubscriptionV1


async def mirrored(api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, scripted: ScriptedStripe,
                   price: dict[str, Any], *, status: str = "active", quantity: int = 1) -> Live:
    client_id = uuid.uuid4()
    sub = stripe_sub(client_id=client_id, price=price, status=status, quantity=quantity,
                     event_type="customer.subscription.created")
    scripted.script(sub)
    await publish_stripe(producer, sub, "customer.subscription.created")
    row = await wait_for_mirror(db, sub.subscription_id, lambda r: r.status == status)
    return Live(str(row.id), client_id, sub)


@pytest.fixture
async def live(api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, scripted: ScriptedStripe,
               catalog: Catalog) -> AsyncIterator[Live]:
    yield await mirrored(api, db, producer, scripted, catalog.basic)


@contextmanager
def downgrades(api: httpx.AsyncClient, behavior: str) -> Iterator[None]:
    settings = api.app.state.deps.settings  # type: ignore[attr-defined]
    before = settings.downgrade_behavior
    settings.downgrade_behavior = behavior
    try:
        yield
    finally:
        settings.downgrade_behavior = before


def last_update(scripted: ScriptedStripe, sub_id: str) -> dict[str, Any]:
    params = [p for name, (sid, p) in ((n, a) for n, a in scripted.calls if n == "update_subscription")
              if sid == sub_id]
    assert params, f"no update of {sub_id} reached Stripe"
    return params[-1]  # type: ignore[no-any-return]


async def preview(api: httpx.AsyncClient, sub_id: str, headers: dict[str, str] | None = None,
                  **params: Any) -> httpx.Response:
    return await api.get(f"/api/subscriptions/{sub_id}/change-preview", params=params, headers=headers)


# -- change-preview: the 4xx ---------------------------------------------------------------------
async def test_change_preview_refuses_what_cannot_change(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, scripted: ScriptedStripe, catalog: Catalog,
    live: Live,
) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"priceId": catalog.basic["id"]}, 422, "no_change"),
        ({"priceId": catalog.basic["id"], "quantity": 1}, 422, "no_change"),
        ({"priceId": catalog.usd["id"]}, 422, "currency_mismatch"),
        ({"priceId": catalog.archived["id"]}, 409, "price_archived"),
        ({"priceId": catalog.pro["id"], "quantity": 0}, 422, "validation_error"),
        ({"priceId": catalog.pro["id"], "quantity": -3}, 422, "validation_error"),
        ({"priceId": str(uuid.uuid4())}, 422, "unknown_price"),
        ({"priceId": "not-a-uuid"}, 422, "validation_error"),
        ({}, 422, "validation_error"),
        ({"priceId": catalog.pro["id"], "prorationDate": "2026-01-01"}, 400, "unknown_query_parameter"),
    ]
    for params, status, code in cases:
        response = await preview(api, live.id, **params)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (params, response.text)
    # a client sees its own subscription only
    other = await preview(api, live.id, headers=client_headers(uuid.uuid4()), priceId=catalog.pro["id"])
    assert other.status_code == 404
    assert (await preview(api, str(uuid.uuid4()), priceId=catalog.pro["id"])).status_code == 404
    # same price, another quantity is a change
    assert (await preview(api, live.id, priceId=catalog.basic["id"], quantity=2)).status_code == 200

    for status in ("canceled", "incomplete", "incomplete_expired"):
        ended = await mirrored(api, db, producer, scripted, catalog.basic, status=status)
        response = await preview(api, ended.id, priceId=catalog.pro["id"])
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "subscription_not_changeable"


async def test_upgrade_preview_pins_a_date_and_the_change_uses_it(
    api: httpx.AsyncClient, scripted: ScriptedStripe, catalog: Catalog, live: Live, subscription_events: Any
) -> None:
    own = client_headers(live.client_id)
    response = await preview(api, live.id, headers=own, priceId=catalog.pro["id"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["kind"], body["prorationBehavior"], body["effective"]) == ("upgrade", "always_invoice", "now")
    assert body["nextInvoiceTotal"] == 3_000 and body["currency"] in ("EUR", "USD")  # stripe-mock answers usd
    assert isinstance(body["lines"], list) and isinstance(body["amountDueNow"], int)
    proration_date = datetime.fromisoformat(body["prorationDate"])
    assert live.stripe.current_period_start is not None and live.stripe.current_period_end is not None
    assert live.stripe.current_period_start <= proration_date <= live.stripe.current_period_end

    outside = live.stripe.current_period_end + timedelta(days=1)
    refused = await api.post(f"/api/subscriptions/{live.id}/change", headers=own,
                             json={"priceId": catalog.pro["id"], "prorationDate": outside.isoformat()})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "proration_date_out_of_period"
    missing = await api.post(f"/api/subscriptions/{live.id}/change", headers=own, json={"priceId": catalog.pro["id"]})
    assert missing.status_code == 422

    changed = await api.post(f"/api/subscriptions/{live.id}/change", headers=own,
                             json={"priceId": catalog.pro["id"], "prorationDate": body["prorationDate"]})
    assert changed.status_code == 200, changed.text
    result = changed.json()
    assert (result["priceId"], result["mrr"], result["pendingChange"]) == (catalog.pro["id"], 3_000, None)
    params = last_update(scripted, live.stripe.subscription_id)
    assert params["proration_behavior"] == "always_invoice"
    assert params["proration_date"] == int(proration_date.timestamp())
    assert params["items"] == [{"id": live.stripe.items[0].id, "price": catalog.pro["stripePriceId"], "quantity": 1}]
    assert params["metadata"]["price_id"] == catalog.pro["id"]
    await subscription_events.wait_for(live.id, SubscriptionEventType.CHANGED, planId=catalog.pro["planId"])


async def test_downgrade_at_period_end_is_pending_until_the_renewal(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, scripted: ScriptedStripe, catalog: Catalog,
) -> None:
    live = await mirrored(api, db, producer, scripted, catalog.pro)
    with downgrades(api, "at_period_end"):
        body = (await preview(api, live.id, priceId=catalog.basic["id"])).json()
        assert (body["kind"], body["prorationBehavior"], body["effective"]) == ("downgrade", "none", "period_end")
        assert body["amountDueNow"] == 0
        response = await api.post(f"/api/subscriptions/{live.id}/change",
                                  json={"priceId": catalog.basic["id"], "prorationDate": body["prorationDate"]})
    assert response.status_code == 200, response.text
    shown = response.json()
    assert shown["priceId"] == catalog.pro["id"] and shown["mrr"] == 3_000  # still the old plan
    assert shown["pendingChange"]["priceId"] == catalog.basic["id"]
    assert live.stripe.current_period_end is not None
    assert datetime.fromisoformat(shown["pendingChange"]["effectiveAt"]) == live.stripe.current_period_end
    params = last_update(scripted, live.stripe.subscription_id)
    assert params["proration_behavior"] == "none" and "proration_date" not in params
    assert params["items"][0]["price"] == catalog.basic["stripePriceId"]  # Stripe bills it at the renewal

    second = await preview(api, live.id, priceId=catalog.yearly["id"])
    assert second.status_code == 409 and second.json()["error"]["code"] == "change_already_pending"

    # Stripe renews into the next period with the new price: now the mirror shows it
    current = scripted.subscriptions[live.stripe.subscription_id]
    start = live.stripe.current_period_end
    renewed = event_of(current, current_period_start=start, current_period_end=start + timedelta(days=30),
                       items=[current.items[0].model_copy(update={"current_period_start": start,
                                                                  "current_period_end": start + timedelta(days=30)})],
                       stripe_event_created=now_s() + timedelta(seconds=5))
    await publish_stripe(producer, renewed, "customer.subscription.updated")
    row = await wait_for_mirror(db, live.stripe.subscription_id, lambda r: r.pending_price_id is None)
    assert str(row.price_id) == catalog.basic["id"] and row.mrr == 1_000


async def test_downgrade_with_credit_and_interval_change(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, scripted: ScriptedStripe, catalog: Catalog,
) -> None:
    live = await mirrored(api, db, producer, scripted, catalog.pro)
    with downgrades(api, "create_prorations"):
        body = (await preview(api, live.id, priceId=catalog.basic["id"])).json()
        assert (body["kind"], body["prorationBehavior"], body["amountDueNow"]) == ("downgrade", "create_prorations", 0)
        response = await api.post(f"/api/subscriptions/{live.id}/change",
                                  json={"priceId": catalog.basic["id"], "prorationDate": body["prorationDate"]})
    assert response.status_code == 200 and response.json()["priceId"] == catalog.basic["id"]
    assert last_update(scripted, live.stripe.subscription_id)["proration_behavior"] == "create_prorations"

    yearly = (await preview(api, live.id, priceId=catalog.yearly["id"])).json()
    assert (yearly["kind"], yearly["prorationBehavior"]) == ("interval", "always_invoice")
    response = await api.post(f"/api/subscriptions/{live.id}/change",
                              json={"priceId": catalog.yearly["id"], "prorationDate": yearly["prorationDate"]})
    assert response.status_code == 200, response.text
    params = last_update(scripted, live.stripe.subscription_id)
    assert params["billing_cycle_anchor"] == "now" and params["proration_behavior"] == "always_invoice"


# -- cancel and resume ---------------------------------------------------------------------------
async def test_cancel_at_period_end_resume_and_cancel_now(
    api: httpx.AsyncClient, scripted: ScriptedStripe, live: Live, subscription_events: Any
) -> None:
    own = client_headers(live.client_id)
    response = await api.post(f"/api/subscriptions/{live.id}/cancel", headers=own, json={"atPeriodEnd": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cancelAtPeriodEnd"] is True and body["status"] == "active"
    assert live.stripe.current_period_end is not None
    assert datetime.fromisoformat(body["accessUntil"]) == live.stripe.current_period_end
    assert (await api.post(f"/api/subscriptions/{live.id}/cancel", headers=own)).json()["cancelAtPeriodEnd"]

    resumed = await api.post(f"/api/subscriptions/{live.id}/resume", headers=own)
    assert resumed.status_code == 200 and resumed.json()["cancelAtPeriodEnd"] is False
    nothing = await api.post(f"/api/subscriptions/{live.id}/resume", headers=own)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_resume"

    now_refused = await api.post(f"/api/subscriptions/{live.id}/cancel", headers=own, json={"atPeriodEnd": False})
    assert now_refused.status_code == 403
    ended = await api.post(f"/api/subscriptions/{live.id}/cancel", json={"atPeriodEnd": False})
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "canceled" and ended.json()["mrr"] == 0
    assert datetime.fromisoformat(ended.json()["accessUntil"]) <= now_s() + timedelta(seconds=5)
    again = await api.post(f"/api/subscriptions/{live.id}/cancel", json={"atPeriodEnd": False})
    assert again.status_code == 409 and again.json()["error"]["code"] == "subscription_ended"
    assert (await api.post(f"/api/subscriptions/{live.id}/resume")).status_code == 409
    await subscription_events.wait_for(live.id, SubscriptionEventType.CANCELED)
    unknown_field = await api.post(f"/api/subscriptions/{live.id}/cancel", json={"atEnd": True})
    assert unknown_field.status_code == 422


# -- signup, portal, clock -------------------------------------------------------------------------
async def test_checkout_portal_and_scoping(api: httpx.AsyncClient, db: Any, catalog: Catalog) -> None:
    client_id = uuid.uuid4()
    own = client_headers(client_id)
    no_account = await api.post("/api/billing-portal", headers=own, json={})
    assert no_account.status_code == 404 and no_account.json()["error"]["code"] == "no_billing_account"

    response = await api.post("/api/subscriptions/checkout", headers=own,
                              json={"priceId": catalog.basic["id"], "quantity": 2, "trialDays": 14})
    assert response.status_code == 201, response.text
    assert response.json()["url"].startswith("http") and response.json()["sessionId"].startswith("cs_")
    async with db.sessionmaker() as s:
        customer = await s.get(Customer, client_id)
    assert customer is not None and customer.stripe_customer_id.startswith("cus_")
    assert customer.test_clock_id is not None  # test mode: customers live on the platform's clock

    for body, headers, status, code in [
        ({"priceId": catalog.basic["id"], "clientId": str(uuid.uuid4())}, own, 404, "not_found"),
        ({"priceId": catalog.basic["id"]}, None, 422, "client_required"),
        ({"priceId": catalog.archived["id"], "clientId": str(client_id)}, None, 409, "price_archived"),
        ({"priceId": catalog.basic["id"], "quantity": 0}, own, 422, "validation_error"),
        ({"priceId": catalog.basic["id"], "coupon": "FREE"}, own, 422, "validation_error"),
    ]:
        refused = await api.post("/api/subscriptions/checkout", headers=headers, json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), refused.text

    portal = await api.post("/api/billing-portal", headers=own, json={"returnUrl": "http://gateway.test/portal/x"})
    assert portal.status_code == 200 and portal.json()["url"].startswith("http")
    elsewhere = await api.post("/api/billing-portal", headers=own, json={"returnUrl": "https://evil.test/"})
    assert elsewhere.status_code == 422 and elsewhere.json()["error"]["code"] == "return_url_not_allowed"
    as_admin = await api.post("/api/billing-portal", json={"clientId": str(client_id)})
    assert as_admin.status_code == 200
    assert (await api.post("/api/billing-portal", json={})).status_code == 422


async def test_admin_creates_an_invoiced_retainer(api: httpx.AsyncClient, catalog: Catalog) -> None:
    client_id = str(uuid.uuid4())
    body = {"clientId": client_id, "priceId": catalog.pro["id"], "quantity": 2,
            "collectionMethod": "send_invoice", "daysUntilDue": 14}
    assert (await api.post("/api/subscriptions", json=body, headers=client_headers(client_id))).status_code == 403
    bad = await api.post("/api/subscriptions", json={**body, "collectionMethod": "charge_automatically"})
    assert bad.status_code == 422
    response = await api.post("/api/subscriptions", json=body, headers={"Idempotency-Key": f"k-{client_id}"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["clientId"] == client_id and created["priceId"] == catalog.pro["id"]
    assert created["stripeSubscriptionId"].startswith("sub_") and created["version"] == 1
    replay = await api.post("/api/subscriptions", json=body, headers={"Idempotency-Key": f"k-{client_id}"})
    assert replay.status_code == 201 and replay.json()["id"] == created["id"]

    mine = await api.get("/api/subscriptions", headers=client_headers(client_id))
    assert [s["id"] for s in mine.json()["items"]] == [created["id"]]
    theirs = await api.get("/api/subscriptions", params={"clientId": client_id},
                           headers=client_headers(uuid.uuid4()))
    assert theirs.json()["items"] == []
    assert (await api.get(f"/api/subscriptions/{created['id']}", headers=client_headers(uuid.uuid4()))
            ).status_code == 404
    filtered = await api.get("/api/subscriptions", params={"clientId": client_id, "status": "trialing"})
    assert filtered.status_code == 200
    assert (await api.get("/api/subscriptions", params={"status": "sleeping"})).status_code == 422


async def test_test_clock_moves_forward_only(api: httpx.AsyncClient, db: Any) -> None:
    current = (await api.get("/api/test-clock")).json()
    start = datetime.fromisoformat(current["frozenTime"]) if current["frozenTime"] else now_s()
    target = start + timedelta(days=31)
    response = await api.post("/api/test-clock/advance", json={"to": target.isoformat()})
    assert response.status_code == 200, response.text
    assert datetime.fromisoformat(response.json()["frozenTime"]) == target
    back = await api.post("/api/test-clock/advance", json={"to": (target - timedelta(days=1)).isoformat()})
    assert back.status_code == 409 and back.json()["error"]["code"] == "clock_backwards"
    naive = await api.post("/api/test-clock/advance", json={"to": "2031-01-01T00:00:00"})
    assert naive.status_code == 422
    as_client = await api.post("/api/test-clock/advance", json={"to": target.isoformat()},
                               headers=client_headers(uuid.uuid4()))
    assert as_client.status_code == 403
    async with db.sessionmaker() as s:
        clocks = {c.test_clock_id for c in (await s.scalars(select(Customer))).all()}
    assert clocks <= {response.json()["id"], None}
