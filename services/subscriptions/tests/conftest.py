"""Subscriptions service fixtures: the real app (in process) on a real PostgreSQL, a real Kafka and a
real stripe-mock (session fixtures of deploy/testing.py).

stripe-mock validates every request against Stripe's OpenAPI spec but answers with fixtures, so
`ScriptedStripe` sends each call to it (through the real SDK adapter) and, for the few answers whose
content matters to the mirror (a subscription, a customer), returns what the test scripted instead.
Stripe's events reach the service the way they do in production: as normalized `stripe.*` events
on billing.stripe, published here straight onto Kafka.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import (
    SCHEMA_INVOICE_V1,
    SCHEMA_SUBSCRIPTION_V1,
    StripeInvoiceLineV1,
    StripeInvoiceV1,
    StripeSubscriptionItemV1,
    StripeSubscriptionV1,
)
from deploy.testing import KafkaEventLog as EventLog
from deploy.testing import publish_event
from services.subscriptions.app import create_app
from services.subscriptions.clients import StaticClientDirectory
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.models import Subscription
from services.subscriptions.stripe_client import SdkStripeBilling, StripeCustomer, fetch_time

ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1"}
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # stripe-python's HTTPXClient passes the form body as `data=`; httpx warns about it on every call.
    mark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(mark)


def client_headers(client_id: str | uuid.UUID) -> dict[str, str]:
    return {"X-Actor-Role": "client", "X-Actor-Client-Id": str(client_id), "X-Actor-User-Id": f"user-{client_id}"}


@dataclass
class ScriptedStripe:
    """The SDK adapter on stripe-mock, with scripted subscriptions and customers (see module doc)."""

    real: SdkStripeBilling
    subscriptions: dict[str, StripeSubscriptionV1] = field(default_factory=dict)
    customers: dict[str, StripeCustomer] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def script(self, sub: StripeSubscriptionV1) -> None:
        self.subscriptions[sub.subscription_id] = sub

    def _current(self, sub_id: str) -> StripeSubscriptionV1 | None:
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            return None
        now = fetch_time()
        return sub.model_copy(update={"stripe_event_created": now, "stripe_event_id": f"fetch:{sub_id}"})

    async def retrieve_subscription(self, sub_id: str) -> StripeSubscriptionV1 | None:
        self.calls.append(("retrieve_subscription", sub_id))
        mock = await self.real.retrieve_subscription(sub_id)
        return self._current(sub_id) if sub_id in self.subscriptions else mock

    async def retrieve_customer(self, customer_id: str) -> StripeCustomer | None:
        self.calls.append(("retrieve_customer", customer_id))
        await self.real.retrieve_customer(customer_id)
        return self.customers.get(customer_id)

    async def update_subscription(self, sub_id: str, params: dict[str, Any], *,
                                  idempotency_key: str) -> StripeSubscriptionV1:
        """Checked by stripe-mock; a scripted subscription then changes the way Stripe changes it
        (price, quantity, cancel flag, metadata; periods only where the cycle restarts)."""
        self.calls.append(("update_subscription", (sub_id, params)))
        mock = await self.real.update_subscription(sub_id, params, idempotency_key=idempotency_key)
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            return mock
        update: dict[str, Any] = {}
        if "items" in params:
            item = params["items"][0]
            old = sub.items[0]
            new_item = old.model_copy(update={"price_id": item["price"], "quantity": item["quantity"]})
            update.update(items=[new_item], price_id=item["price"], quantity=item["quantity"])
        if "cancel_at_period_end" in params:
            update["cancel_at_period_end"] = params["cancel_at_period_end"]
        if "metadata" in params:
            metadata = {**sub.metadata, **params["metadata"]}
            update["metadata"] = {k: v for k, v in metadata.items() if v != ""}
        self.subscriptions[sub_id] = sub.model_copy(update=update)
        current = self._current(sub_id)
        assert current is not None
        return current

    async def cancel_subscription(self, sub_id: str, *, idempotency_key: str) -> StripeSubscriptionV1:
        self.calls.append(("cancel_subscription", sub_id))
        mock = await self.real.cancel_subscription(sub_id, idempotency_key=idempotency_key)
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            return mock
        now = fetch_time()
        self.subscriptions[sub_id] = sub.model_copy(update={"status": "canceled", "canceled_at": now,
                                                            "ended_at": now})
        current = self._current(sub_id)
        assert current is not None
        return current


@pytest.fixture(scope="session")
def subscriptions_settings(kafka: Any, database_url_factory: Callable[[str], str],
                           stripe_mock: Any) -> SubscriptionsSettings:
    return SubscriptionsSettings(
        database_url=database_url_factory("subscriptions"),
        kafka_bootstrap=kafka.bootstrap,
        outbox_poll_interval=0.3,
        stripe_api_base=stripe_mock.url,
        stripe_secret_key="sk_test_local",
        public_url="http://gateway.test",
        # Its own group: other tests of the session may run a subscriptions service on this Kafka.
        consumer_group=f"subscriptions-inproc-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def directory() -> StaticClientDirectory:
    return StaticClientDirectory(accept_any=True)


@pytest.fixture(scope="session")
def scripted(subscriptions_settings: SubscriptionsSettings) -> ScriptedStripe:
    return ScriptedStripe(SdkStripeBilling.from_settings(subscriptions_settings))


@pytest.fixture(scope="session")
async def api(subscriptions_settings: SubscriptionsSettings, scripted: ScriptedStripe,
              directory: StaticClientDirectory) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(subscriptions_settings, stripe=scripted, clients=directory)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://subscriptions", headers=ADMIN) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture(scope="session")
def db(api: httpx.AsyncClient) -> Any:
    return api.app.state.runtime.db  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
async def subscription_events(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, topics.SUBSCRIPTION)
    await log.start()
    yield log
    await log.stop()


# -- plans -------------------------------------------------------------------------------------
def price_body(amount: int, interval: str = "month", currency: str = "EUR", **extra: Any) -> dict[str, Any]:
    return {"currency": currency, "amount": amount, "interval": interval, **extra}


@dataclass
class Catalog:
    plan: dict[str, Any]
    basic: dict[str, Any]  # EUR 10.00 a month
    pro: dict[str, Any]  # EUR 30.00 a month
    yearly: dict[str, Any]  # EUR 100.00 a year
    usd: dict[str, Any]  # USD 10.00 a month (another plan)
    archived: dict[str, Any]  # an archived EUR price


async def create_plan(api: httpx.AsyncClient, name: str, prices: list[dict[str, Any]]) -> dict[str, Any]:
    response = await api.post("/api/plans", json={"name": name, "features": ["Updates"], "prices": prices})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
async def catalog(api: httpx.AsyncClient) -> Catalog:
    tag = uuid.uuid4().hex[:6]
    basic = await create_plan(api, f"Basic {tag}", [price_body(1_000), price_body(10_000, "year")])
    pro = await create_plan(api, f"Pro {tag}", [price_body(3_000)])
    usd = await create_plan(api, f"US {tag}", [price_body(1_000, currency="USD")])
    old = await create_plan(api, f"Old {tag}", [price_body(500)])
    archived = await api.post(f"/api/plans/{old['id']}/archive")
    assert archived.status_code == 200, archived.text
    return Catalog(plan=basic, basic=basic["prices"][0], pro=pro["prices"][0], yearly=basic["prices"][1],
                   usd=usd["prices"][0], archived=archived.json()["prices"][0])


# -- Stripe's side, as payments republishes it ---------------------------------------------------
def now_s() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def stripe_sub(
    *,
    sub_id: str | None = None,
    client_id: str | uuid.UUID | None,
    price: dict[str, Any],
    status: str = "active",
    quantity: int = 1,
    period_start: datetime | None = None,
    period_days: int = 30,
    created: datetime | None = None,
    customer_id: str | None = None,
    trial_end: datetime | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: datetime | None = None,
    ended_at: datetime | None = None,
    metadata: dict[str, str] | None = None,
    event_type: str = "customer.subscription.updated",
    event_id: str | None = None,
) -> StripeSubscriptionV1:
    start = period_start or now_s() - timedelta(days=10)
    end = start + timedelta(days=period_days)
    meta = dict(metadata or {})
    if client_id is not None:
        meta.setdefault("client_id", str(client_id))
        meta.setdefault("price_id", price["id"])
        meta.setdefault("plan_id", price["planId"])
    item = StripeSubscriptionItemV1(
        id=f"si_{(sub_id or 'x')[-12:]}", price_id=price["stripePriceId"], price_lookup_key=price["lookupKey"],
        quantity=quantity, unit_amount=price["amount"], currency=price["currency"], interval=price["interval"],
        interval_count=price["intervalCount"], current_period_start=start, current_period_end=end)
    return StripeSubscriptionV1(
        stripe_event_id=event_id or f"evt_{uuid.uuid4().hex[:20]}",
        stripe_event_type=event_type,
        stripe_event_created=created or now_s(),
        subscription_id=sub_id or f"sub_{uuid.uuid4().hex[:20]}",
        customer_id=customer_id or f"cus_{uuid.uuid4().hex[:14]}",
        client_id=meta.get("client_id"),
        plan_id=meta.get("plan_id"),
        status=status,
        currency=price["currency"],
        items=[item],
        price_id=item.price_id,
        price_lookup_key=item.price_lookup_key,
        quantity=quantity,
        current_period_start=start,
        current_period_end=end,
        cancel_at_period_end=cancel_at_period_end,
        canceled_at=canceled_at,
        ended_at=ended_at,
        trial_start=start if trial_end else None,
        trial_end=trial_end,
        metadata=meta,
        collection_method="charge_automatically",
    )


def event_of(sub: StripeSubscriptionV1, **changes: Any) -> StripeSubscriptionV1:
    """Another Stripe event of the same subscription (a new event id unless given)."""
    changes.setdefault("stripe_event_id", f"evt_{uuid.uuid4().hex[:20]}")
    return sub.model_copy(update=changes)


def stripe_invoice(sub: StripeSubscriptionV1, *, billing_reason: str, period_start: datetime, period_end: datetime,
                   amount: int, created: datetime | None = None) -> StripeInvoiceV1:
    line = StripeInvoiceLineV1(id=f"il_{uuid.uuid4().hex[:12]}", amount=amount, currency=sub.currency or "EUR",
                               quantity=sub.quantity, price_id=sub.price_id, period_start=period_start,
                               period_end=period_end)
    return StripeInvoiceV1(
        stripe_event_id=f"evt_{uuid.uuid4().hex[:20]}", stripe_event_type="invoice.paid",
        stripe_event_created=created or now_s(), invoice_id=f"in_{uuid.uuid4().hex[:16]}",
        subscription_id=sub.subscription_id, customer_id=sub.customer_id, client_id=sub.client_id,
        status="paid", currency=sub.currency or "EUR", total=amount, amount_due=amount, amount_paid=amount,
        billing_reason=billing_reason, lines=[line])


async def publish_stripe(producer: AIOKafkaProducer, data: StripeSubscriptionV1 | StripeInvoiceV1,
                         event_type: str, *, event_id: str | None = None) -> CloudEvent:
    """Publish like payments does: type `stripe.<Stripe type>`, key = the subscription id. The
    CloudEvent id is the Stripe event id, so a redelivery is the same event."""
    key = data.subscription_id or ""
    schema = SCHEMA_SUBSCRIPTION_V1 if isinstance(data, StripeSubscriptionV1) else SCHEMA_INVOICE_V1
    event = CloudEvent.create(source="payments", type=f"stripe.{event_type}", subject=key, data=data,
                              dataschema=schema)
    event.id = event_id or data.stripe_event_id
    await publish_event(producer, topics.STRIPE, event, key)
    return event


async def wait_for_mirror(db: Any, stripe_sub_id: str, predicate: Callable[[Subscription], bool],
                          timeout: float = 20) -> Subscription:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    row: Subscription | None = None
    while loop.time() < deadline:
        async with db.sessionmaker() as s:
            row = await s.scalar(select(Subscription).where(Subscription.stripe_subscription_id == stripe_sub_id))
        if row is not None and predicate(row):
            return row
        await asyncio.sleep(0.05)
    state = None if row is None else (row.status, row.version, row.price_id, row.quantity)
    raise AssertionError(f"mirror of {stripe_sub_id} never matched; last seen {state}")


async def mirror_of(db: Any, stripe_sub_id: str) -> Subscription | None:
    async with db.sessionmaker() as s:
        return await s.scalar(select(Subscription).where(Subscription.stripe_subscription_id == stripe_sub_id))


async def wait_consumed(db: Any, event_ids: list[str], timeout: float = 30) -> None:
    """Wait until the consumer has handled (applied or skipped) every one of `event_ids`."""
    from services.subscriptions.models import InboxEvent

    wanted = set(event_ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: set[str] = set()
    while loop.time() < deadline:
        async with db.sessionmaker() as s:
            seen = set((await s.scalars(select(InboxEvent.event_id).where(InboxEvent.event_id.in_(wanted)))).all())
        if seen == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(wanted - seen)} of {len(wanted)} events not consumed in time")
