"""A poison event (its handler keeps failing) is parked on billing.deadletter after a few
redeliveries, and the events behind it on the same partition are applied: nothing stalls, nothing
is lost. Real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from faststream.kafka import KafkaBroker
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase

from contracts import topics
from contracts.envelope import CloudEvent
from kit.consumer import EventConsumer
from kit.db import Database, InboxMixin, OutboxMixin, UnitOfWork


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


class InboxEvent(InboxMixin, _Base):
    pass


async def test_poison_event_is_parked_and_the_partition_moves_on(
    kafka: Any, database_url_factory: Callable[[str], str]
) -> None:
    url = database_url_factory("deadletter")
    db = Database(url, outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=2)
    async with db.engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    topic = f"test.poison.{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=1)  # one partition: the good event waits behind the bad one
    applied: list[str] = []

    async def poison(_: UnitOfWork, event: CloudEvent) -> None:
        raise RuntimeError("handler bug")

    async def ok(_: UnitOfWork, event: CloudEvent) -> None:
        applied.append(event.id)

    consumer = EventConsumer(db, "test-consumer", {"test.poison": poison, "test.ok": ok},
                             retry_delays=(0.01,), max_redeliveries=2)
    broker = KafkaBroker(kafka.bootstrap)
    consumer.subscribe(broker, topic, group_id=f"g-{uuid.uuid4().hex[:6]}", workers=1)
    bad = CloudEvent(source="test", type="test.poison", subject="agg-1", data={"n": 1})
    good = CloudEvent(source="test", type="test.ok", subject="agg-1", data={"n": 2})
    await broker.start()
    try:
        for event in (bad, good):
            await broker.publish(event.to_bytes(), topic=topic, key=b"agg-1")
        for _ in range(300):
            if applied:
                break
            await asyncio.sleep(0.05)
        assert applied == [good.id], "the event behind the poison one was never applied"
        async with db.unit_of_work() as uow:
            payloads = (await uow.session.scalars(
                select(OutboxMessage.payload).where(OutboxMessage.topic == topics.DEADLETTER))).all()
        assert len(payloads) == 1
        parked = CloudEvent.model_validate_json(payloads[0])
        assert parked.type == "deadletter.parked" and parked.subject == "agg-1"
        assert parked.data["eventId"] == bad.id and parked.data["attempts"] == 2
        assert "handler bug" in parked.data["error"] and parked.data["event"]["id"] == bad.id
    finally:
        await broker.stop()
        await db.dispose()
