"""Reporting fixtures: the real app (in process) on a real PostgreSQL, fed from a real Kafka.

Each test gets its own database and its own three topics (the settings point the feed at them), so
the figures a test expects are exactly those of the events it publishes, whatever else runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastapi import FastAPI
from sqlalchemy import text

from deploy.testing import publish_event
from kit.db import Database
from kit.service import ensure_topics
from services.reporting.app import create_app
from services.reporting.config import ReportingSettings
from services.reporting.feed import topic_partitions
from services.reporting.tests.scenario import Published

ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1"}
CLIENT = {"X-Actor-Role": "client", "X-Actor-Client-Id": "client-1", "X-Actor-User-Id": "user-1"}


def make_settings(kafka: Any, database_url: str, **overrides: Any) -> ReportingSettings:
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "database_url": database_url, "kafka_bootstrap": kafka.bootstrap,
        "invoice_topic": f"test.invoice.{suffix}", "payment_topic": f"test.payment.{suffix}",
        "subscription_topic": f"test.subscription.{suffix}", "consumer_group": f"reporting-{suffix}",
        "db_pool_size": 4,
    }
    values.update(overrides)
    return ReportingSettings(**values)


@dataclass
class Reporting:
    settings: ReportingSettings
    app: FastAPI
    http: httpx.AsyncClient
    producer: AIOKafkaProducer

    def topic(self, name: str) -> str:
        return {"invoice": self.settings.invoice_topic, "payment": self.settings.payment_topic,
                "subscription": self.settings.subscription_topic}[name]

    async def publish(self, items: Iterable[Published]) -> None:
        for item in items:
            await publish_event(self.producer, self.topic(item.topic), item.event, item.key)

    async def caught_up(self, timeout: float = 30.0) -> None:
        await caught_up(self.settings, timeout)

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(f"/api/reports{path}", params=params)
        assert response.status_code == 200, response.text
        return response.json()


async def caught_up(settings: ReportingSettings, timeout: float = 30.0) -> None:
    """Until the read models' stored positions reach the end of every partition of the topics."""
    tps = await topic_partitions(settings.kafka_bootstrap, settings.topics)
    assert tps, "the topics have no partitions"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await consumer.start()
    db = Database(settings.database_url, pool_size=1)
    try:
        end = await consumer.end_offsets(tps)
        deadline = asyncio.get_running_loop().time() + timeout
        behind: dict[TopicPartition, tuple[int, int]] = {}
        while asyncio.get_running_loop().time() < deadline:
            async with db.transaction() as uow:
                try:
                    rows = (await uow.session.execute(
                        text("SELECT topic, partition, next_offset FROM reporting.positions"))).all()
                except Exception:
                    rows = []  # between a rebuild's drop and rename
            stored = {TopicPartition(r.topic, r.partition): r.next_offset for r in rows}
            behind = {tp: (stored.get(tp, 0), offset) for tp, offset in end.items() if stored.get(tp, 0) < offset}
            if not behind:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"read models still behind after {timeout}s: {behind}")
    finally:
        await consumer.stop()
        await db.dispose()


@asynccontextmanager
async def running(settings: ReportingSettings, producer: AIOKafkaProducer) -> AsyncIterator[Reporting]:
    await ensure_topics(settings.kafka_bootstrap, settings.topics)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://reporting", headers=ADMIN,
                                     timeout=60) as http:
            yield Reporting(settings, app, http, producer)


@pytest.fixture
def settings_factory(kafka: Any, database_url_factory: Callable[[str], str]) -> Callable[..., ReportingSettings]:
    def make(**overrides: Any) -> ReportingSettings:
        return make_settings(kafka, database_url_factory("reporting"), **overrides)

    return make


@pytest.fixture
async def reporting(settings_factory: Callable[..., ReportingSettings],
                    producer: AIOKafkaProducer) -> AsyncIterator[Reporting]:
    async with running(settings_factory(), producer) as service:
        yield service
