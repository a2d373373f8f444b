"""Notifications fixtures: real PostgreSQL, the real SMTP mail sink, real Kafka where a test needs it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceSnapshotV1, InvoiceStatus
from deploy.infra import MailSink, PostgresServer, free_port
from deploy.testing import KafkaEventLog as TopicReader
from deploy.testing import publish_event as publish  # noqa: F401  (re-exported for the tests)
from kit.db import Database
from kit.errors import ServiceUnavailable
from kit.migrations import upgrade_to_head_async
from services.notifications import repository as repo
from services.notifications.app import MIGRATIONS
from services.notifications.config import NotificationsSettings
from services.notifications.models import InboxEvent, InvoiceCopy, OutboxMessage

ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1"}
FAKE_PDF = b"%PDF-1.4\n% fake invoice pdf for tests\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


# ------------------------------------------------------------------------------------------------
# events


def snapshot(
    *,
    invoice_id: str | None = None,
    status: str = "SENT",
    due: date | None = None,
    issue: date | None = None,
    total: int = 120_00,
    paid: int = 0,
    version: int = 2,
    email_: str = "client@acme.example.com",
    name: str = "Acme Ltd",
    number: str | None = None,
    currency: str = "EUR",
) -> dict[str, Any]:
    invoice_id = invoice_id or str(uuid.uuid4())
    due = due or date(2026, 3, 31)
    return {
        "id": invoice_id,
        "invoiceNumber": number or f"2026-{uuid.uuid4().int % 10000:04d}",
        "status": status,
        "currency": currency,
        "clientId": str(uuid.uuid5(uuid.NAMESPACE_DNS, email_)),
        "clientName": name,
        "clientEmail": email_,
        "projectId": None,
        "subtotal": total,
        "discountAmount": 0,
        "taxAmount": 0,
        "total": total,
        "amountPaid": paid,
        "amountDue": total - paid,
        "issueDate": (issue or due - timedelta(days=30)).isoformat(),
        "dueDate": due.isoformat(),
        "paidAt": None,
        "version": version,
        "items": [],
    }


def invoice_event(event_type: str, snap: dict[str, Any]) -> CloudEvent:
    return CloudEvent(source="invoice", type=event_type, subject=snap["id"], data=snap)


def payment_event(event_type: str, invoice_id: str, amount: int, **extra: Any) -> CloudEvent:
    data = {
        "paymentId": extra.pop("payment_id", str(uuid.uuid4())),
        "invoiceId": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "method": "card",
        "status": "failed" if event_type == "payment.failed" else "succeeded",
        "paidAt": "2026-03-20T10:00:00+00:00",
        **extra,
    }
    return CloudEvent(source="payments", type=event_type, subject=invoice_id, data=data)


# ------------------------------------------------------------------------------------------------
# settings and database


@pytest.fixture
def make_settings(
    database_url_factory: Callable[[str], str], mail_sink: MailSink
) -> Callable[..., NotificationsSettings]:
    """Settings for an in-process service: a fresh database, the session's mail sink, fast retries."""

    def factory(**overrides: Any) -> NotificationsSettings:
        values: dict[str, Any] = {
            "database_url": database_url_factory("notifications"),
            "kafka_enabled": False,
            "smtp_host": mail_sink.host,
            "smtp_port": mail_sink.port,
            "mail_from": "Billing <billing@agency.example.com>",
            "invoice_url": "http://127.0.0.1:9",  # nothing there: PDF unavailable unless overridden
            "scan_interval": 0,
            "delivery_poll_interval": 0.2,
            "retry_base_delay": 0.2,
            "retry_max_delay": 1.0,
            "pdf_retry_base_delay": 0.1,
            "pdf_max_attempts": 2,
            "recipient_wait_attempts": 2,
            "smtp_timeout": 5.0,
            "public_url": "http://billing.example.com",
            "portal_url": "http://billing.example.com/portal",
        }
        values.update(overrides)
        return NotificationsSettings(**values)

    return factory


@pytest.fixture
def own_postgres(infra_dir: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, to stop and restart (the session's one is shared).
    Durable (fsync and synchronous commit on): a fast-mode server loses its last commits in a crash."""
    server = PostgresServer(infra_dir / f"pg-own-{uuid.uuid4().hex[:8]}", free_port())
    server.ensure_installed()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def stop_immediately(server: PostgresServer) -> None:
    """`pg_ctl stop -m immediate`: a crash (every backend killed, recovery on the next start)."""
    server._as_postgres("pg_ctl", "stop", "-D", str(server.data_dir), "-m", "immediate", "-w", "-t", "60")


async def migrated_db(settings: NotificationsSettings, pool_size: int = 5) -> Database:
    await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    return Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=pool_size)


# ------------------------------------------------------------------------------------------------
# the invoice service's word on OVERDUE, in process


class OverdueMarker:
    """`POST /api/invoices/mark-overdue` in process, for tests whose invoice copies are stored directly:
    those copies stand for the invoice service's invoices.

    A call marks the open invoices past due as of its day that it has not marked yet and answers their
    ids; their invoice.overdue snapshots (version + 1) reach the copies at the next call, as Kafka would
    have delivered them in between. `down = True`: the invoice service is unreachable.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.down = False
        self.calls: list[date] = []
        self.marked: set[str] = set()
        self._in_flight: list[dict[str, Any]] = []

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        self.calls.append(as_of)
        if self.down:
            raise ServiceUnavailable("The invoice service cannot be reached (test).")
        now_marked: set[str] = set()
        async with self.db.transaction() as uow:
            for snap in self._in_flight:
                await repo.upsert_invoice(uow.session, InvoiceSnapshotV1.model_validate(snap), snap)
            self._in_flight = []
            copies = (await uow.session.scalars(select(InvoiceCopy).where(
                InvoiceCopy.status.in_((InvoiceStatus.SENT, InvoiceStatus.VIEWED, InvoiceStatus.PARTIAL)),
                InvoiceCopy.due_date < as_of,
            ))).all()
            for copy in copies:
                if copy.id in self.marked:
                    continue
                self.marked.add(copy.id)
                now_marked.add(copy.id)
                self._in_flight.append(
                    {**copy.snapshot, "status": InvoiceStatus.OVERDUE.value, "version": copy.version + 1}
                )
        return frozenset(now_marked)


# ------------------------------------------------------------------------------------------------
# mail


def read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


class Mailbox:
    """The mail sink's messages, filtered to one test's (by a header the service sets)."""

    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    def all(self) -> list[EmailMessage]:
        out = []
        for path in self.sink.paths():
            try:
                out.append(read_eml(path))
            except FileNotFoundError:  # cleared meanwhile
                continue
        return out

    def for_invoice(self, invoice_id: str) -> list[EmailMessage]:
        return [m for m in self.all() if m.get("X-Billing-Invoice-Id") == invoice_id]

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.all() if address in [a.addr_spec for a in m["To"].addresses]]

    async def wait(self, predicate: Callable[[list[EmailMessage]], bool], what: str, timeout: float = 20) -> list[
        EmailMessage
    ]:
        deadline = time.monotonic() + timeout
        while True:
            messages = self.all()
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; sink has {len(messages)} message(s)")
            await asyncio.sleep(0.1)


@pytest.fixture
def mailbox(mail_sink: MailSink) -> Mailbox:
    mail_sink.recover()
    return Mailbox(mail_sink)


# ------------------------------------------------------------------------------------------------
# a stand-in invoice service that serves PDFs


class FakeInvoiceService:
    """GET /api/invoices/{id}/pdf -> a PDF, unless the id is in `missing` (404) or `broken` (503).

    POST /api/invoices/mark-overdue -> marks (once each) the ids in `past_due` and answers them;
    `mark_overdue_status` other than 200 answers that status instead.

    GET /api/clients/{id} -> the client in `clients` (id -> {name, email}), else 404.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.missing: set[str] = set()
        self.broken: set[str] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.past_due: set[str] = set()
        self.mark_overdue_status = 200
        self.mark_overdue_calls: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.clients: dict[str, dict[str, str]] = {}
        self.client_requests: list[str] = []

        async def mark_overdue_route(request: Request) -> Response:
            self.mark_overdue_calls.append((await request.json(), dict(request.headers)))
            if self.mark_overdue_status != 200:
                return Response(status_code=self.mark_overdue_status)
            asked = await request.json()
            marked, self.past_due = sorted(self.past_due), set()
            body = {"asOf": asked["asOf"], "markedOverdue": len(marked), "invoiceIds": marked}
            return Response(json.dumps(body), media_type="application/json")

        async def pdf_route(request: Request) -> Response:
            invoice_id = request.path_params["invoice_id"]
            self.requests.append((invoice_id, dict(request.headers)))
            if invoice_id in self.missing:
                return Response(status_code=404)
            if invoice_id in self.broken:
                return Response(status_code=503)
            return Response(content=FAKE_PDF, media_type="application/pdf")

        async def client_route(request: Request) -> Response:
            client_id = request.path_params["client_id"]
            self.client_requests.append(client_id)
            if client_id not in self.clients:
                return Response(status_code=404)
            return Response(json.dumps({"id": client_id, **self.clients[client_id]}), media_type="application/json")

        app = Starlette(routes=[
            Route("/api/invoices/mark-overdue", mark_overdue_route, methods=["POST"]),
            Route("/api/invoices/{invoice_id}/pdf", pdf_route),
            Route("/api/clients/{client_id}", client_route),
        ])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("fake invoice service did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)


@pytest.fixture(scope="session")
def fake_invoice_service() -> Iterator[FakeInvoiceService]:
    server = FakeInvoiceService()
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------
# Kafka


@pytest.fixture(scope="session")
async def notification_events(kafka: Any) -> AsyncIterator[TopicReader]:
    reader = TopicReader(kafka.bootstrap, "billing.notification")
    await reader.start()
    yield reader
    await reader.stop()


