"""Invoice service fixtures: the real app (in process) on a real PostgreSQL and a real Kafka."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts.envelope import CloudEvent
from services.invoice.app import create_app
from services.invoice.config import InvoiceSettings

ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1"}


def client_headers(client_id: str) -> dict[str, str]:
    return {"X-Actor-Role": "client", "X-Actor-Client-Id": client_id, "X-Actor-User-Id": f"user-{client_id}"}


@pytest.fixture(scope="session")
def invoice_settings(kafka: Any, database_url_factory: Callable[[str], str]) -> InvoiceSettings:
    return InvoiceSettings(
        database_url=database_url_factory("invoice"),
        kafka_bootstrap=kafka.bootstrap,
        outbox_poll_interval=0.5,
        overdue_scan_interval=3600,
        # Its own group: the end-to-end tests run another invoice service on the same Kafka.
        consumer_group=f"invoice-inproc-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
async def api(invoice_settings: InvoiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(invoice_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://invoice", headers=ADMIN) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def customer(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.post(
        "/api/clients",
        json={"name": f"Acme {uuid.uuid4().hex[:6]}", "email": "billing@acme.example.com", "currency": "EUR"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def line(description: str = "Design work", quantity: str = "2", unit_price: int = 10_000, **extra: Any) -> dict:
    return {"description": description, "quantity": quantity, "unitPrice": unit_price, **extra}


class EventLog:
    """Reads a topic from the beginning in the background; tests wait for the events they expect."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, enable_auto_commit=False
        )
        self.events: list[tuple[CloudEvent, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for record in self._consumer:
            meta = {"key": record.key.decode() if record.key else None, "partition": record.partition,
                    "timestamp": record.timestamp, "headers": dict(record.headers)}
            self.events.append((CloudEvent.model_validate_json(record.value), meta))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()

    def matching(self, subject: str, event_type: str | None = None) -> list[CloudEvent]:
        return [e for e, _ in self.events if e.subject == subject and (event_type is None or e.type == event_type)]

    async def wait_for(self, subject: str, event_type: str, count: int = 1, timeout: float = 20) -> list[CloudEvent]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = self.matching(subject, event_type)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        seen = [(e.type, e.subject) for e, _ in self.events if e.subject == subject]
        raise AssertionError(f"timed out waiting for {count}× {event_type} of {subject}; saw {seen}")


@pytest.fixture(scope="session")
async def invoice_events(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, "billing.invoice")
    await log.start()
    yield log
    await log.stop()


@pytest.fixture(scope="session")
async def producer(kafka: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True)
    await p.start()
    yield p
    await p.stop()


async def publish(producer: AIOKafkaProducer, topic: str, event: CloudEvent, key: str) -> None:
    await producer.send_and_wait(topic, json.dumps(event.model_dump(mode="json")).encode(), key=key.encode())
