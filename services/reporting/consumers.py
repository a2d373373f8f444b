"""What the reporting service consumes, declared for its AsyncAPI document (`make asyncapi`).

The feed (feed.py) reads these topics with its own batched consumer, positions kept with the read
models; this FastStream app only describes the channels and their payloads. It publishes nothing.
"""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from contracts import topics
from contracts.invoice import InvoiceSnapshotV1
from contracts.payment import PaymentEventV1
from contracts.subscription import SubscriptionSnapshotV1

CONSUMED: tuple[tuple[str, type[BaseModel], str], ...] = (
    (topics.INVOICE, InvoiceSnapshotV1, "invoice.* snapshots (newest version kept): invoiced, outstanding, aging"),
    (topics.PAYMENT, PaymentEventV1, "payment.succeeded/.recorded/.refunded: the ledger (cash, methods, aging)"),
    (topics.SUBSCRIPTION, SubscriptionSnapshotV1, "subscription.* snapshots: MRR and its movements"),
)


def asyncapi_app() -> FastStream:
    """`faststream docs gen services.reporting.consumers:asyncapi_app --factory`"""
    broker = KafkaBroker("127.0.0.1:9092")
    for topic, schema, description in CONSUMED:

        async def handler(body: BaseModel) -> None:  # documentation only: the feed consumes
            return None

        handler.__annotations__ = {"body": schema, "return": None}  # the topic's payload model
        handler.__name__ = f"reporting_{topic.replace('.', '_')}"
        broker.subscriber(topic, group_id="reporting", title=f"reporting:{topic}", description=description)(handler)
    return FastStream(broker, specification=AsyncAPI(title="Reporting service", version="1.0.0"))
