"""Kafka consumers of the invoice service: payments and email opens move invoices along; a
subscription's Stripe invoices (billing.stripe, normalized by payments) become invoices of ours."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceSnapshotV1
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.stripe import StripeEventType, StripeInvoiceV1
from kit.consumer import EventConsumer
from kit.db import Database, UnitOfWork
from services.invoice.service import InvoiceService

NOTIFICATION_OPENED = "notification.opened"


async def on_payment_settled(uow: UnitOfWork, event: CloudEvent) -> None:
    await InvoiceService(uow).apply_payment(event.data_as(PaymentEventV1), event_time=event.time)


async def on_payment_failed(uow: UnitOfWork, event: CloudEvent) -> None:
    await InvoiceService(uow).payment_failed(event.data_as(PaymentEventV1))


async def on_payment_refunded(uow: UnitOfWork, event: CloudEvent) -> None:
    await InvoiceService(uow).apply_refund(event.data_as(PaymentEventV1))


async def on_notification_opened(uow: UnitOfWork, event: CloudEvent) -> None:
    import uuid

    invoice_id = event.data.get("invoiceId") or event.subject
    if invoice_id:
        await InvoiceService(uow).mark_viewed(uuid.UUID(str(invoice_id)), cause_id=event.data.get("messageId"))


async def on_stripe_invoice(uow: UnitOfWork, event: CloudEvent) -> None:
    await InvoiceService(uow).mirror_stripe_invoice(event.data_as(StripeInvoiceV1))


async def on_stripe_payment_failed(uow: UnitOfWork, event: CloudEvent) -> None:
    await InvoiceService(uow).stripe_payment_failed(event.data_as(StripeInvoiceV1))


HANDLERS = {
    PaymentEventType.SUCCEEDED: on_payment_settled,
    PaymentEventType.RECORDED: on_payment_settled,
    PaymentEventType.FAILED: on_payment_failed,
    PaymentEventType.REFUNDED: on_payment_refunded,
    NOTIFICATION_OPENED: on_notification_opened,
    # A Stripe draft (stripe.invoice.created) may still change: only a finalized one is billed, by
    # whichever of its events arrives first.
    StripeEventType.INVOICE_FINALIZED: on_stripe_invoice,
    StripeEventType.INVOICE_PAID: on_stripe_invoice,
    StripeEventType.INVOICE_PAYMENT_FAILED: on_stripe_payment_failed,
}


def register_consumers(broker: KafkaBroker, db: Database, group_id: str = "invoice") -> EventConsumer:
    consumer = EventConsumer(db, "invoice", HANDLERS)
    # Batches: every handler here only writes the invoice database (a commit per poll, not per event).
    consumer.subscribe(broker, topics.PAYMENT, topics.NOTIFICATION, topics.STRIPE, group_id=group_id, batch=100)
    # Declared for the AsyncAPI document: what this service publishes (through its outbox).
    broker.publisher(topics.INVOICE, title="invoice events", schema=InvoiceSnapshotV1,
                     description="invoice.created/.updated/.sent/.viewed/.partially_paid/.paid/.overdue/.cancelled "
                                 "as CloudEvents; key = invoice id")
    return consumer


def asyncapi_app() -> FastStream:
    """`faststream docs gen services.invoice.consumers:asyncapi_app --factory`"""
    broker = KafkaBroker("127.0.0.1:9092")
    register_consumers(broker, Database("postgresql+asyncpg://unused/unused"))
    return FastStream(broker, specification=AsyncAPI(title="Invoice service", version="1.0.0"))
