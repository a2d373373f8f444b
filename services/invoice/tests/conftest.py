"""Invoice service fixtures: the real app (in process) on a real PostgreSQL and a real Kafka."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from deploy.testing import KafkaEventLog as EventLog
from deploy.testing import publish_event as publish  # noqa: F401  (re-exported for the tests)
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


@pytest.fixture(scope="session")
async def invoice_events(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, "billing.invoice")
    await log.start()
    yield log
    await log.stop()


