"""Kafka consumers of the subscriptions service: Stripe's subscription and invoice events, as the
payments service republishes them on billing.stripe (contracts/stripe.py), keep the mirror.

Deliveries repeat (the inbox skips an event id seen before) and arrive out of order (the mirror
keeps the newest Stripe state: mirror.Mirror.sync).
"""

from __future__ import annotations

from collections.abc import Callable

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import StripeEventType, StripeInvoiceV1, StripeSubscriptionV1
from contracts.subscription import SubscriptionSnapshotV1
from kit.consumer import EventConsumer, EventHandler
from kit.db import Database, UnitOfWork
from services.subscriptions.mirror import Mirror

MirrorFactory = Callable[[UnitOfWork], Mirror]


def handlers(mirror: MirrorFactory) -> dict[str, EventHandler]:
    """The dispatch table: Stripe event type -> one short handler."""

    async def on_subscription(uow: UnitOfWork, event: CloudEvent) -> None:
        await mirror(uow).sync(event.data_as(StripeSubscriptionV1))

    async def on_trial_will_end(uow: UnitOfWork, event: CloudEvent) -> None:
        await mirror(uow).trial_will_end(event.data_as(StripeSubscriptionV1))

    async def on_invoice_paid(uow: UnitOfWork, event: CloudEvent) -> None:
        await mirror(uow).invoice_paid(event.data_as(StripeInvoiceV1))

    async def on_invoice_payment_failed(uow: UnitOfWork, event: CloudEvent) -> None:
        await mirror(uow).invoice_payment_failed(event.data_as(StripeInvoiceV1))

    return {
        StripeEventType.SUBSCRIPTION_CREATED: on_subscription,
        StripeEventType.SUBSCRIPTION_UPDATED: on_subscription,
        StripeEventType.SUBSCRIPTION_DELETED: on_subscription,
        StripeEventType.SUBSCRIPTION_PAUSED: on_subscription,
        StripeEventType.SUBSCRIPTION_RESUMED: on_subscription,
        StripeEventType.SUBSCRIPTION_TRIAL_WILL_END: on_trial_will_end,
        StripeEventType.INVOICE_PAID: on_invoice_paid,
        StripeEventType.INVOICE_PAYMENT_FAILED: on_invoice_payment_failed,
    }


def register_consumers(broker: KafkaBroker, db: Database, mirror: MirrorFactory,
                       group_id: str = "subscriptions") -> EventConsumer:
    consumer = EventConsumer(db, "subscriptions", handlers(mirror))
    consumer.subscribe(broker, topics.STRIPE, group_id=group_id)
    # Declared for the AsyncAPI document: what this service publishes (through its outbox).
    broker.publisher(topics.SUBSCRIPTION, title="subscription events", schema=SubscriptionSnapshotV1,
                     description="subscription.created/.trial_will_end/.activated/.changed/.renewed/.past_due/"
                                 ".canceled as CloudEvents, each a full snapshot with a version; "
                                 "key = subscription id")
    return consumer


def asyncapi_app() -> FastStream:
    """`faststream docs gen services.subscriptions.consumers:asyncapi_app --factory`"""
    broker = KafkaBroker("127.0.0.1:9092")

    def unused(uow: UnitOfWork) -> Mirror:
        raise RuntimeError("documentation only")

    register_consumers(broker, Database("postgresql+asyncpg://unused/unused"), unused)
    return FastStream(broker, specification=AsyncAPI(title="Subscriptions service", version="1.0.0"))
