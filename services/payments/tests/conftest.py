"""Payments service fixtures: the real app (in process) on a real PostgreSQL, a real Kafka and the real
Stripe stand-in in front of stripe-mock (session fixtures of deploy/testing.py), plus helpers to sign
Stripe webhooks. The app also listens on a real port (`payments_url`) so the stand-in delivers its
webhooks to it exactly as Stripe would (`standin` points the stand-in there)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1
from deploy.infra import StripeStandin, free_port
from deploy.testing import STANDIN_WEBHOOK_SECRET
from deploy.testing import KafkaEventLog as EventLog
from services.payments.app import create_app
from services.payments.config import PaymentsSettings
from services.payments.models import Payment, StripeEvent
from services.payments.stripe import testing as stripe_events

ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1"}
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # stripe-python's HTTPXClient passes the form body as `data=`; httpx warns about it on every call.
    mark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(mark)
WEBHOOK_SECRET = STANDIN_WEBHOOK_SECRET  # the stand-in signs its deliveries with it


def client_headers(client_id: str) -> dict[str, str]:
    return {"X-Actor-Role": "client", "X-Actor-Client-Id": client_id, "X-Actor-User-Id": f"user-{client_id}"}


class FakeInvoiceReader:
    """Stands in for the invoice service's HTTP API: serves the snapshots a test put here."""

    def __init__(self) -> None:
        self.invoices: dict[str, InvoiceSnapshotV1] = {}
        self.calls: list[str] = []

        self.ledgers: dict[str, list[tuple[str, str]]] = {}
        # Called during each request to the "invoice service" (a test looks at the database meanwhile).
        self.probe: Callable[[str], Awaitable[None]] | None = None

    async def fetch(self, invoice_id: str) -> InvoiceSnapshotV1 | None:
        self.calls.append(invoice_id)
        if self.probe is not None:
            await self.probe(invoice_id)
        return self.invoices.get(invoice_id)

    async def applied(self, invoice_id: str) -> list[tuple[str, str]]:
        if self.probe is not None:
            await self.probe(invoice_id)
        return self.ledgers.get(invoice_id, [])


@pytest.fixture(scope="session")
def invoice_reader() -> FakeInvoiceReader:
    return FakeInvoiceReader()


@pytest.fixture(scope="session")
def payments_settings(
    kafka: Any, database_url_factory: Callable[[str], str], stripe_standin: StripeStandin
) -> PaymentsSettings:
    return PaymentsSettings(
        database_url=database_url_factory("payments"),
        kafka_bootstrap=kafka.bootstrap,
        outbox_poll_interval=0.3,
        stripe_api_base=stripe_standin.url,
        stripe_secret_key="sk_test_local",
        stripe_webhook_secret=WEBHOOK_SECRET,
        webhook_worker_poll_interval=0.2,
        public_url="http://gateway.test",
        consumer_group="payments-in-process-tests",  # never share partitions with a payments subprocess
        portal_url="http://gateway.test/portal",
    )


@pytest.fixture(scope="session")
async def api(
    payments_settings: PaymentsSettings, invoice_reader: FakeInvoiceReader
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(payments_settings, invoice_reader=invoice_reader)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://payments", headers=ADMIN) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


class _TestServer(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # Ctrl-C stays pytest's
        return contextlib.nullcontext()


@pytest.fixture(scope="session")
async def payments_url(api: httpx.AsyncClient) -> AsyncIterator[str]:
    """The same in-process app on a real port (its lifespan runs in `api`): where Stripe's deliveries go."""
    port = free_port()
    server = _TestServer(uvicorn.Config(api.app, host="127.0.0.1", port=port,  # type: ignore[attr-defined]
                                        lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def standin(stripe_standin: StripeStandin, payments_url: str) -> AsyncIterator[StripeStandin]:
    """The Stripe stand-in delivering to this app only, in order and once (knobs reset around the test).
    Its knobs are blocking HTTP calls: call them in a thread (`await asyncio.to_thread(standin.flush)`),
    as the app that must answer the deliveries runs on this event loop."""
    await asyncio.to_thread(stripe_standin.configure, webhook_urls=[f"{payments_url}/webhooks/stripe"],
                            duplicate_deliveries=False, shuffle=False)
    yield stripe_standin
    await asyncio.to_thread(stripe_standin.flush, 20)
    await asyncio.to_thread(stripe_standin.configure, duplicate_deliveries=False, shuffle=False)


@pytest.fixture(scope="session")
def db(api: httpx.AsyncClient) -> Any:
    return api.app.state.payments.db  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
async def payment_events(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, topics.PAYMENT)
    await log.start()
    yield log
    await log.stop()


@pytest.fixture(scope="session")
async def stripe_topic(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, topics.STRIPE)
    await log.start()
    yield log
    await log.stop()



def snapshot(
    *,
    invoice_id: str | None = None,
    client_id: str | None = None,
    status: str = "SENT",
    total: int = 12_000,
    amount_paid: int = 0,
    currency: str = "EUR",
    version: int = 2,
    cause_id: str | None = None,
    number: str | None = "2026-0001",
    stripe_invoice_id: str | None = None,
) -> InvoiceSnapshotV1:
    return InvoiceSnapshotV1(
        id=invoice_id or str(uuid.uuid4()),
        invoice_number=number if status != "DRAFT" else None,
        status=status,
        currency=currency,
        client_id=client_id or str(uuid.uuid4()),
        client_name="Acme GmbH",
        client_email="billing@acme.test",
        subtotal=total,
        discount_amount=0,
        tax_amount=0,
        total=total,
        amount_paid=amount_paid,
        amount_due=total - amount_paid,
        issue_date=date.today(),
        due_date=date.today() + timedelta(days=30),
        version=version,
        cause_id=cause_id,
        stripe_invoice_id=stripe_invoice_id,
    )


async def publish_invoice(
    producer: AIOKafkaProducer, snap: InvoiceSnapshotV1, event_type: str = InvoiceEventType.SENT
) -> CloudEvent:
    event = CloudEvent.create(source="invoice", type=event_type, subject=snap.id, data=snap)
    await producer.send_and_wait(topics.INVOICE, json.dumps(event.model_dump(mode="json")).encode(),
                                 key=snap.id.encode())
    return event


async def wait_for_copy(db: Any, invoice_id: str, version: int, timeout: float = 20) -> None:
    """Wait until the payments service's copy of the invoice reaches `version` (through Kafka)."""
    from services.payments.models import InvoiceCopy

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with db.sessionmaker() as s:
            row = await s.get(InvoiceCopy, invoice_id)
            if row is not None and row.version >= version:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"invoice {invoice_id} v{version} never reached the payments copy")


@pytest.fixture
async def sent_invoice(producer: AIOKafkaProducer, db: Any) -> InvoiceSnapshotV1:
    """A SENT invoice of 120.00 EUR, known to the payments service through a real invoice.sent event."""
    snap = snapshot()
    await publish_invoice(producer, snap)
    await wait_for_copy(db, snap.id, snap.version)
    return snap


async def post_webhook(
    api: httpx.AsyncClient, event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> httpx.Response:
    body, headers = stripe_events.signed_request(event, secret, timestamp=timestamp)
    return await api.post("/webhooks/stripe", content=body, headers=headers)


async def wait_processed(db: Any, event_ids: list[str], timeout: float = 20) -> list[StripeEvent]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with db.sessionmaker() as s:
            rows = (await s.scalars(select(StripeEvent).where(StripeEvent.id.in_(event_ids)))).all()
        if len(rows) == len(set(event_ids)) and all(r.status != "pending" for r in rows):
            return list(rows)
        await asyncio.sleep(0.05)
    raise AssertionError(f"events {event_ids} not processed in time")


async def payments_of(db: Any, invoice_id: str) -> list[Payment]:
    async with db.sessionmaker() as s:
        return list((await s.scalars(select(Payment).where(Payment.invoice_id == invoice_id))).all())


def completed_event(
    snap: InvoiceSnapshotV1,
    *,
    amount: int | None = None,
    currency: str | None = None,
    session_id: str | None = None,
    payment_intent: str | None = None,
    payment_status: str = "paid",
    event_type: str = "checkout.session.completed",
    created: int | None = None,
) -> dict[str, Any]:
    session = stripe_events.checkout_session(
        invoice_id=snap.id,
        client_id=snap.client_id,
        amount_total=snap.amount_due if amount is None else amount,
        currency=currency or snap.currency,
        session_id=session_id,
        payment_intent=payment_intent,
        payment_status=payment_status,
    )
    return stripe_events.build_event(event_type, session, created=created)
