"""Consumers on real Kafka and PostgreSQL: /readyz says 503 "stuck" while a handler hangs on an event
(lag and no progress for longer than the runtime's limit) and 200 once it goes on, "dead" when the
subscriber's consume task has ended; /metrics shows the lag, the handling time by outcome and the
runtime's gauges (outbox backlog, DB pool) meanwhile."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import DeclarativeBase

from contracts.envelope import CloudEvent
from kit.consumer import EventConsumer
from kit.db import Database, InboxMixin, OutboxMixin, UnitOfWork
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.settings import ServiceSettings


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


class InboxEvent(InboxMixin, _Base):
    pass


@dataclass
class Stack:
    http: httpx.AsyncClient
    runtime: ServiceRuntime
    topic: str
    group: str
    entered: asyncio.Event
    release: asyncio.Event
    applied: list[str]

    @property
    def watch_name(self) -> str:
        return f"consumer:{self.group}:{self.topic}"

    async def ready_until(self, status: int, timeout: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            response = await self.http.get("/readyz")
            if response.status_code == status:
                return response.json()  # type: ignore[no-any-return]
            assert asyncio.get_running_loop().time() < deadline, f"/readyz {response.status_code}: {response.text}"
            await asyncio.sleep(0.1)

    async def metric(self, name: str, **labels: str) -> float | None:
        text = (await self.http.get("/metrics")).text
        for line in text.splitlines():
            match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
            if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
                return float(match.group(2))
        return None

    async def metric_until(self, predicate: Callable[[float | None], bool], name: str, timeout: float = 30.0,
                           **labels: str) -> float | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.metric(name, **labels)
            if predicate(value):
                return value
            assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} is {value}"
            await asyncio.sleep(0.2)


@pytest.fixture
async def stack(kafka: Any, database_url_factory: Callable[[str], str]) -> AsyncIterator[Stack]:
    url = database_url_factory("consumer_readiness")
    settings = ServiceSettings(service_name="consumer-readiness", database_url=url, kafka_bootstrap=kafka.bootstrap,
                               relay_enabled=False, migrate_on_start=False)
    db = Database(url, outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=2)
    async with db.engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    topic = f"test.readiness.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    kafka.create_topics([topic], partitions=1)
    entered, release, applied = asyncio.Event(), asyncio.Event(), []

    async def blocking(_: UnitOfWork, event: CloudEvent) -> None:
        entered.set()
        await release.wait()  # a handler that hangs (a lock, a call without a timeout)
        applied.append(event.id)

    broker = make_broker(settings)
    EventConsumer(db, "readiness-consumer", {"test.block": blocking}).subscribe(broker, topic, group_id=group,
                                                                                workers=1)
    runtime = ServiceRuntime(settings=settings, db=db, broker=broker, consumer_stuck_after=2.0,
                             consumer_lag_ttl=0.3)
    app = create_service_app(runtime, title="consumer readiness test")
    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield Stack(http, runtime, topic, group, entered, release, applied)
    finally:
        release.set()
        await runtime.stop()


async def test_a_hanging_handler_makes_the_consumer_stuck_then_ready_again(stack: Stack) -> None:
    body = await stack.ready_until(200)
    assert body["workers"][stack.watch_name]["status"] == "ok"
    assert await stack.metric("billing_outbox_backlog", service="consumer-readiness") == 0
    assert await stack.metric("billing_db_pool_size", service="consumer-readiness") == 2

    event = CloudEvent(source="test", type="test.block", subject="agg-1", data={"n": 1})
    await stack.runtime.broker.publish(event.to_bytes(), topic=stack.topic, key=b"agg-1")
    await asyncio.wait_for(stack.entered.wait(), 30)
    await stack.metric_until(lambda v: v == 1, "billing_consumer_lag", group=stack.group, topic=stack.topic,
                             partition="0")

    body = await stack.ready_until(503)  # 1 behind, no progress for more than 2 s
    watch = body["workers"][stack.watch_name]
    assert watch["status"] == "stuck", body
    assert f"{stack.topic}[0] is 1 behind with no progress" in watch["problem"]
    assert body["checks"] == {"database": "ok", "kafka": "ok"}

    stack.release.set()
    body = await stack.ready_until(200)
    assert stack.applied == [event.id] and body["workers"][stack.watch_name]["problem"] is None
    await stack.metric_until(lambda v: v == 0, "billing_consumer_lag", group=stack.group, topic=stack.topic,
                             partition="0")
    handled = await stack.metric("billing_consumer_handling_seconds_count", consumer="readiness-consumer",
                                 topic=stack.topic, group=stack.group, outcome="applied")
    assert handled == 1
    sum_seconds = await stack.metric("billing_consumer_handling_seconds_sum", consumer="readiness-consumer",
                                     topic=stack.topic, group=stack.group, outcome="applied")
    assert sum_seconds is not None and sum_seconds >= 2.0  # it hung for longer than the stuck limit

    # FastStream's broker middleware counts the same message
    received = await stack.metric("billing_faststream_received_messages_total", app_name="consumer-readiness",
                                  handler=stack.topic)
    assert received is not None and received >= 1


async def test_a_consumer_whose_task_ended_is_dead(stack: Stack) -> None:
    await stack.ready_until(200)
    subscriber = next(s for s in stack.runtime.broker.subscribers
                      if stack.topic in getattr(s, "topic_names_for_subscribe", ()))
    for task in list(subscriber.tasks):  # type: ignore[attr-defined]
        task.cancel()  # cancelled: FastStream's supervisor does not restart it
    body = await stack.ready_until(503)
    watch = body["workers"][stack.watch_name]
    assert watch["status"] == "dead" and watch["running"] is False
    assert watch["problem"] == "dead: 1 of 1 consume tasks have ended"
