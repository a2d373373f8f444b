"""For tests against the Stripe stand-in without the payments service: its verified webhooks, as the
receiver fixture records them, republished on billing.stripe the way payments republishes them.

Subscriptions are read with the service's own adapter model (so the stand-in's real shapes test it);
invoices with a small parser of the current API shape (payments' normalize.py does the same work).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import SCHEMA_INVOICE_V1, SCHEMA_SUBSCRIPTION_V1, StripeInvoiceV1, StripeSubscriptionV1
from deploy.stripe_standin.testing import WebhookReceiver
from deploy.testing import publish_event
from kit.clock import from_unix
from kit.stripe import Ref, Ts
from services.subscriptions.stripe_client import (
    Currency,
    InvoiceLine,
    Metadata,
    StripeList,
    StripeSubscriptionObject,
)

SUBSCRIPTION_TYPES = {"customer.subscription.created", "customer.subscription.updated",
                      "customer.subscription.deleted", "customer.subscription.trial_will_end"}
INVOICE_TYPES = {"invoice.paid", "invoice.payment_failed"}


class _SubscriptionDetails(BaseModel):
    model_config = ConfigDict(extra="ignore")
    subscription: Ref = None
    metadata: Metadata = {}


class _Parent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    subscription_details: _SubscriptionDetails | None = None


class _Invoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    customer: Ref = None
    status: str | None = None
    currency: Currency = None
    total: int | None = None
    subtotal: int | None = None
    amount_due: int = 0
    amount_paid: int = 0
    amount_remaining: int | None = None
    billing_reason: str | None = None
    attempt_count: int | None = None
    period_start: Ts = None
    period_end: Ts = None
    hosted_invoice_url: str | None = None
    parent: _Parent | None = None
    lines: StripeList[InvoiceLine] = StripeList[InvoiceLine]()
    metadata: Metadata = {}


def normalize(event: dict[str, Any]) -> StripeSubscriptionV1 | StripeInvoiceV1 | None:
    created = from_unix(int(event["created"]))
    assert created is not None
    meta = {"stripe_event_id": event["id"], "stripe_event_type": event["type"], "stripe_event_created": created}
    obj = event["data"]["object"]
    if event["type"] in SUBSCRIPTION_TYPES:
        sub = StripeSubscriptionObject.model_validate(obj).to_contract(as_of=created)
        return sub.model_copy(update=meta)
    if event["type"] in INVOICE_TYPES:
        inv = _Invoice.model_validate(obj)
        details = inv.parent.subscription_details if inv.parent else None
        currency = inv.currency or "XXX"
        return StripeInvoiceV1(
            **meta, invoice_id=inv.id, subscription_id=details.subscription if details else None,
            customer_id=inv.customer, client_id=(details.metadata.get("client_id") if details else None),
            status=inv.status, currency=currency, subtotal=inv.subtotal, total=inv.total,
            amount_due=inv.amount_due, amount_paid=inv.amount_paid, amount_remaining=inv.amount_remaining,
            billing_reason=inv.billing_reason, attempt_count=inv.attempt_count, period_start=inv.period_start,
            period_end=inv.period_end, hosted_invoice_url=inv.hosted_invoice_url,
            lines=[line.to_contract(currency) for line in inv.lines.data], metadata=inv.metadata)
    return None


class StandinBridge:
    """Polls the receiver and publishes each new verified event it recorded, in arrival order."""

    def __init__(self, receiver: WebhookReceiver, producer: AIOKafkaProducer) -> None:
        self.receiver = receiver
        self.producer = producer
        self.published: list[CloudEvent] = []
        self._seen = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            events = self.receiver.events()
            for event in events[self._seen:]:
                data = normalize(event)
                if data is not None and data.subscription_id:
                    schema = SCHEMA_SUBSCRIPTION_V1 if isinstance(data, StripeSubscriptionV1) else SCHEMA_INVOICE_V1
                    cloud = CloudEvent.create(source="payments", type=f"stripe.{event['type']}",
                                              subject=data.subscription_id, data=data, dataschema=schema)
                    cloud.id = event["id"]
                    await publish_event(self.producer, topics.STRIPE, cloud, data.subscription_id)
                    self.published.append(cloud)
            self._seen = len(events)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
