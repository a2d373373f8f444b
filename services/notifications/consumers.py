"""Kafka consumers of the notifications service: invoice.*, payment.*, subscription.* and a
subscription's Stripe invoice events (billing.stripe: a failed renewal charge, then paid) become emails.

One consumer group ("notifications") across replicas: each partition is read by one replica. Each
event is applied once (kit inbox) in the transaction that queues its email, a poll's events in one
transaction (the handlers only write the database: the emails go out from the delivery worker); the
delivery worker is woken after the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.notification import NotificationEventV1, NotificationOpenedV1
from kit.consumer import EventConsumer
from kit.db import Database
from services.notifications.config import NotificationsSettings
from services.notifications.invoices import InvoiceServiceClient
from services.notifications.service import CONSUMER_NAME, NotificationService

GROUP_ID = "notifications"


class NotificationConsumer(EventConsumer):
    """The kit consumer, plus a callback once an event's effect is committed."""

    def __init__(self, *args: object, after_commit: Callable[[], None] = lambda: None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._after_commit = after_commit

    async def apply(self, event: CloudEvent) -> bool:
        applied = await super().apply(event)
        if applied:
            self._after_commit()
        return applied

    async def apply_batch(self, events: Sequence[CloudEvent]) -> list[CloudEvent]:
        applied = await super().apply_batch(events)
        if applied:
            self._after_commit()
        return applied


def register_consumers(
    broker: KafkaBroker,
    db: Database,
    service: NotificationService,
    after_commit: Callable[[], None] = lambda: None,
) -> NotificationConsumer:
    consumer = NotificationConsumer(db, CONSUMER_NAME, service.handlers(), after_commit=after_commit)
    group_id = service.settings.consumer_group or GROUP_ID
    # Batches: one consumer for the four topics (a start is one rebalance, not twelve consumers'),
    # a commit per poll.
    consumer.subscribe(broker, topics.INVOICE, topics.PAYMENT, topics.SUBSCRIPTION, topics.STRIPE,
                       group_id=group_id, batch=100)
    # Declared for the AsyncAPI document: what this service publishes (through its outbox).
    broker.publisher(
        topics.NOTIFICATION, title="notification.sent and notification.failed", schema=NotificationEventV1,
        description="notification.sent and notification.failed as CloudEvents; key = invoice id",
    )
    broker.publisher(
        topics.NOTIFICATION, title="notification.opened", schema=NotificationOpenedV1,
        description="first open of a message (pixel or tracked link); key = invoice id",
    )
    return consumer


def asyncapi_app() -> FastStream:
    """`faststream docs gen services.notifications.consumers:asyncapi_app --factory`"""
    broker = KafkaBroker("127.0.0.1:9092")
    settings = NotificationsSettings(database_url="postgresql+asyncpg://unused/unused")
    service = NotificationService(settings, invoices=InvoiceServiceClient(settings.invoice_url, None))
    register_consumers(broker, Database(settings.database_url), service)
    return FastStream(broker, specification=AsyncAPI(title="Notifications service", version="1.0.0"))
