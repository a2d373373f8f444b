"""EventConsumer.subscribe(batch=N): records are applied a poll at a time in one transaction, still
exactly once and in order per partition; a batch that fails is redone event by event (a transient
failure is retried, a poison event parked) and nothing behind a failed record on its partition runs
before it. Real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from faststream.kafka import KafkaBroker
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from contracts import topics
from contracts.envelope import CloudEvent
from kit.consumer import EventConsumer
from kit.db import Database, InboxMixin, OutboxMixin, UnitOfWork
from kit.deadletter import EventFailureMixin
from kit.metrics import EVENTS_HANDLED


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


class InboxEvent(InboxMixin, _Base):
    pass


class EventFailure(EventFailureMixin, _Base):
    pass


class Effect(_Base):
    """What the handler writes: one row per applied event, in the order applied."""

    __tablename__ = "effects"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(50))
    n: Mapped[int] = mapped_column(Integer)
    event_id: Mapped[str] = mapped_column(String(200))


async def _effects(db: Database) -> list[Any]:
    async with db.unit_of_work() as uow:
        return list((await uow.session.execute(
            select(Effect.subject, Effect.n, Effect.event_id).order_by(Effect.seq))).all())


async def _until(condition: Callable[[], Any], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def _setup(database_url_factory: Callable[[str], str], name: str) -> Database:
    db = Database(database_url_factory(name), outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=4)
    async with db.engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    return db


class CountingConsumer(EventConsumer):
    """Records how many events each batch transaction applied."""

    applied_per_batch: list[int]

    async def apply_batch(self, events: Sequence[CloudEvent]) -> list[CloudEvent]:
        applied = await super().apply_batch(events)
        self.applied_per_batch = [*getattr(self, "applied_per_batch", []), len(applied)]
        return applied


def _event(subject: str, n: int, kind: str = "test.effect") -> CloudEvent:
    return CloudEvent(source="test", type=kind, subject=subject, data={"n": n})


async def test_batches_apply_each_event_once_in_order_with_a_transient_failure(
    kafka: Any, database_url_factory: Callable[[str], str]
) -> None:
    db = await _setup(database_url_factory, "batch_order")
    topic = f"test.batch.{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=3)
    failures_left = {"flaky": 2}  # this event's handler fails twice, then works

    async def effect(uow: UnitOfWork, event: CloudEvent) -> None:
        if event.data.get("flaky") and failures_left["flaky"] > 0:
            failures_left["flaky"] -= 1
            raise RuntimeError("database hiccup")
        uow.session.add(Effect(subject=event.subject, n=event.data["n"], event_id=event.id))

    consumer = CountingConsumer(db, "batch-test", {"test.effect": effect}, retry_delays=(0.01, 0.01, 0.01))
    broker = KafkaBroker(kafka.bootstrap)
    consumer.subscribe(broker, topic, group_id=f"g-{uuid.uuid4().hex[:6]}", batch=50)
    events = [_event(f"agg-{i % 7}", i) for i in range(400)]
    flaky = CloudEvent(source="test", type="test.effect", subject="agg-3", data={"n": 400, "flaky": True})
    events.append(flaky)
    events += [_event("agg-3", 401), _event("agg-3", 402)]
    await broker.start()
    try:
        for event in events:
            await broker.publish(event.to_bytes(), topic=topic, key=event.subject.encode())
        for event in events[:50]:  # Kafka delivers at least once: the repeats are skipped
            await broker.publish(event.to_bytes(), topic=topic, key=event.subject.encode())

        async def all_applied() -> bool:
            return len(await _effects(db)) >= len(events)

        await _until(all_applied)
        await asyncio.sleep(1.0)  # a doubled effect would land right behind
        effects = await _effects(db)
        assert sorted(e.event_id for e in effects) == sorted(e.id for e in events), "lost or doubled"
        for subject in {e.subject for e in events}:  # one aggregate's events in the order published
            mine = [e.n for e in effects if e.subject == subject]
            assert mine == sorted(mine), (subject, mine)
        assert failures_left["flaky"] == 0
        assert max(consumer.applied_per_batch) > 10, "the events were not applied in batches"
    finally:
        await broker.stop()
        await db.dispose()


async def test_a_poison_event_in_a_batch_is_parked_and_the_partition_moves_on(
    kafka: Any, database_url_factory: Callable[[str], str]
) -> None:
    db = await _setup(database_url_factory, "batch_poison")
    topic = f"test.batchpoison.{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=1)

    async def effect(uow: UnitOfWork, event: CloudEvent) -> None:
        uow.session.add(Effect(subject=event.subject, n=event.data["n"], event_id=event.id))

    async def poison(_: UnitOfWork, event: CloudEvent) -> None:
        raise RuntimeError("handler bug")

    consumer = EventConsumer(db, "batch-poison", {"test.effect": effect, "test.poison": poison},
                             retry_delays=(0.01,), max_redeliveries=2)
    broker = KafkaBroker(kafka.bootstrap)
    consumer.subscribe(broker, topic, group_id=f"g-{uuid.uuid4().hex[:6]}", batch=20)
    before = [_event("agg", n) for n in range(5)]
    bad = _event("agg", 5, kind="test.poison")
    behind = [_event("agg", n) for n in range(6, 12)]
    await broker.start()
    try:
        for event in [*before, bad, *behind]:
            await broker.publish(event.to_bytes(), topic=topic, key=b"agg")

        async def behind_applied() -> bool:
            return len(await _effects(db)) >= len(before) + len(behind)

        await _until(behind_applied)
        effects = await _effects(db)
        assert [e.n for e in effects] == [*range(5), *range(6, 12)], "lost, doubled or out of order"
        async with db.unit_of_work() as uow:
            parked = (await uow.session.scalars(
                select(OutboxMessage.payload).where(OutboxMessage.topic == topics.DEADLETTER))).all()
            failures = await uow.session.scalar(select(func.count()).select_from(EventFailure))
        assert len(parked) == 1 and CloudEvent.model_validate_json(parked[0]).data["eventId"] == bad.id
        assert failures == 0, "the parked event's failure count is gone with the parking"
    finally:
        await broker.stop()
        await db.dispose()


async def test_a_batch_consumer_of_several_topics_is_one_member_and_counts_each_topic(
    kafka: Any, database_url_factory: Callable[[str], str]
) -> None:
    """One consumer for all its topics (one member of the group, one rebalance at a start), each
    record's outcome counted under its own topic, each partition of each topic still in order."""
    db = await _setup(database_url_factory, "batch_topics")
    first, second = (f"test.batch.{uuid.uuid4().hex[:8]}" for _ in range(2))
    kafka.create_topics([first, second], partitions=2)

    async def effect(uow: UnitOfWork, event: CloudEvent) -> None:
        uow.session.add(Effect(subject=event.subject, n=event.data["n"], event_id=event.id))

    consumer = EventConsumer(db, f"batch-topics-{uuid.uuid4().hex[:6]}", {"test.effect": effect})
    broker = KafkaBroker(kafka.bootstrap)
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer.subscribe(broker, first, second, group_id=group, batch=50)
    assert len(broker.subscribers) == 1
    events = {first: [_event(f"a-{i % 3}", i) for i in range(60)],
              second: [_event(f"b-{i % 3}", i) for i in range(40)]}
    await broker.start()
    try:
        for topic, published in events.items():
            for event in published:
                await broker.publish(event.to_bytes(), topic=topic, key=event.subject.encode())

        async def all_applied() -> bool:
            return len(await _effects(db)) >= 100

        await _until(all_applied)
        effects = await _effects(db)
        assert sorted(e.event_id for e in effects) == sorted(e.id for p in events.values() for e in p)
        for subject in {e.subject for e in effects}:
            mine = [e.n for e in effects if e.subject == subject]
            assert mine == sorted(mine), (subject, mine)
        for topic, published in events.items():
            samples = [s for m in EVENTS_HANDLED.collect() for s in m.samples
                       if s.name.endswith("_count") and s.labels.get("topic") == topic
                       and s.labels.get("consumer") == consumer.name and s.labels.get("outcome") == "applied"]
            assert [s.value for s in samples] == [len(published)], (topic, samples)
    finally:
        await broker.stop()
        await db.dispose()
