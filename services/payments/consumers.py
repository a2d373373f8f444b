"""Kafka consumers of the payments service: its copy of invoices, from invoice.* snapshots."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1
from contracts.payment import PaymentEventV1
from contracts.stripe import StripeInvoiceV1, StripeSubscriptionV1
from kit.consumer import EventConsumer
from kit.db import Database, UnitOfWork
from services.payments.service import apply_invoice_snapshot
from services.payments.stripe.events import Invoice, StripeModel, Subscription
from services.payments.stripe.handlers import HANDLERS

GROUP_ID = "payments"
CONSUMER_NAME = "payments-invoices"


async def on_invoice_event(uow: UnitOfWork, event: CloudEvent) -> None:
    await apply_invoice_snapshot(uow, event.type, event.data_as(InvoiceSnapshotV1))


INVOICE_HANDLERS = {event_type.value: on_invoice_event for event_type in InvoiceEventType}


def _republished(model: type[StripeModel]) -> str:
    """The stripe.* types published for a Stripe object, from the handler table."""
    return " / ".join(f"stripe.{event_type}" for event_type, handler in HANDLERS.items() if handler.model is model)


def register_consumers(broker: KafkaBroker, db: Database, *, group_id: str = GROUP_ID) -> EventConsumer:
    consumer = EventConsumer(db, CONSUMER_NAME, INVOICE_HANDLERS)
    consumer.subscribe(broker, topics.INVOICE, group_id=group_id, batch=100)  # DB-only handlers: batches
    # Declared for the AsyncAPI document: what this service publishes (through its outbox).
    broker.publisher(topics.PAYMENT, title="payment events", schema=PaymentEventV1,
                     description="payment.succeeded (Stripe) / .recorded (manual) / .failed / .refunded as "
                                 "CloudEvents; key = invoice id")
    broker.publisher(topics.STRIPE, title="stripe subscription events", schema=StripeSubscriptionV1,
                     description=f"{_republished(Subscription)}, normalized; key = Stripe subscription id")
    broker.publisher(topics.STRIPE, title="stripe invoice events", schema=StripeInvoiceV1,
                     description=f"{_republished(Invoice)}, normalized; "
                                 "key = Stripe subscription id (else the Stripe invoice id)")
    return consumer


def asyncapi_app() -> FastStream:
    """`faststream docs gen services.payments.consumers:asyncapi_app --factory`"""
    broker = KafkaBroker("127.0.0.1:9092")
    register_consumers(broker, Database("postgresql+asyncpg://unused/unused"))
    return FastStream(broker, specification=AsyncAPI(title="Payments service", version="1.0.0"))
