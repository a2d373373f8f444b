"""The payments service as a real process (python -m services.payments), SIGKILLed while a webhook is
being handled, then restarted: the event is handled exactly once (one payment, one Kafka event)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from contracts import topics
from contracts.payment import PaymentEventType
from deploy.infra import REPO_ROOT, ServiceProcess, free_port
from services.payments.models import InvoiceCopy, OutboxMessage, Payment, StripeEvent
from services.payments.stripe import testing as stripe_events
from services.payments.tests.conftest import EventLog, completed_event, publish_invoice, snapshot

SECRET = "whsec_crash_test"


@pytest.fixture(scope="module")
async def payment_log(kafka: Any) -> AsyncIterator[EventLog]:
    log = EventLog(kafka.bootstrap, topics.PAYMENT)
    await log.start()
    yield log
    await log.stop()


class PaymentsProcess:
    def __init__(self, infra_dir: Path, kafka: Any, stripe_mock: Any, database_url: str, name: str) -> None:
        self.port = free_port()
        self.database_url = database_url
        self.base_env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "PAYMENTS_DATABASE_URL": database_url,
            "PAYMENTS_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "PAYMENTS_PORT": str(self.port),
            "PAYMENTS_HOST": "127.0.0.1",
            "PAYMENTS_INVOICE_URL": f"http://127.0.0.1:{free_port()}",  # nothing there: events only
            "PAYMENTS_OUTBOX_POLL_INTERVAL": "0.3",
            "PAYMENTS_WEBHOOK_WORKER_POLL_INTERVAL": "0.2",
            "PAYMENTS_CONSUMER_GROUP": f"payments-{name}",
            "STRIPE_API_BASE": stripe_mock.url,
            "STRIPE_SECRET_KEY": "sk_test_local",
            "STRIPE_WEBHOOK_SECRET": SECRET,
        }
        self.base_env.pop("BILLING_INTERNAL_TOKEN", None)
        self.log_path = infra_dir / "logs" / f"payments-{name}.log"
        self.proc: ServiceProcess | None = None

    def start(self, **extra: str) -> ServiceProcess:
        self.proc = ServiceProcess(
            "payments", [sys.executable, "-m", "services.payments"], {**self.base_env, **extra}, self.port,
            self.log_path, cwd=REPO_ROOT,
        )
        self.proc.start(timeout=60)
        return self.proc

    def wait_port_free(self) -> None:
        from deploy.infra import port_is_free

        deadline = time.monotonic() + 10
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def payments_process(
    infra_dir: Path, kafka: Any, stripe_mock: Any, database_url_factory: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> Iterator[PaymentsProcess]:
    proc = PaymentsProcess(infra_dir, kafka, stripe_mock, database_url_factory("payments_crash"),
                           request.node.name[-30:].strip("_[]"))
    yield proc
    if proc.proc is not None:
        proc.proc.stop()


async def _db_state(url: str, invoice_id: str, event_id: str) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            payments = (await conn.execute(
                select(func.count()).select_from(Payment).where(Payment.invoice_id == invoice_id))).scalar_one()
            outbox = (await conn.execute(
                select(func.count()).select_from(OutboxMessage).where(OutboxMessage.key == invoice_id))).scalar_one()
            event = (await conn.execute(select(StripeEvent.status).where(StripeEvent.id == event_id))).scalar()
            copy = (await conn.execute(select(InvoiceCopy.version).where(InvoiceCopy.id == invoice_id))).scalar()
        return {"payments": payments, "outbox": outbox, "event": event, "copy": copy}
    finally:
        await engine.dispose()


async def _prepare(proc: PaymentsProcess, producer: Any) -> tuple[Any, dict[str, Any]]:
    """An invoice the service knows (from a real invoice.sent event) and a signed payment for it."""
    snap = snapshot()
    await publish_invoice(producer, snap)
    for _ in range(400):
        if (await _db_state(proc.database_url, snap.id, "-"))["copy"] == snap.version:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the invoice never reached the service\n{proc.log_text()[-3000:]}")
    return snap, completed_event(snap)


async def _deliver(proc: PaymentsProcess, event: dict[str, Any]) -> httpx.Response:
    body, headers = stripe_events.signed_request(event, SECRET)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.port}", timeout=10) as client:
        return await client.post("/webhooks/stripe", content=body, headers=headers)


async def _exactly_one_payment(proc: PaymentsProcess, log: EventLog, invoice_id: str, event_id: str) -> None:
    await log.wait_for(invoice_id, PaymentEventType.SUCCEEDED, timeout=30)
    await log.settle(2.0)
    assert len(log.matching(invoice_id, PaymentEventType.SUCCEEDED)) == 1
    state = await _db_state(proc.database_url, invoice_id, event_id)
    assert state["payments"] == 1 and state["outbox"] == 1 and state["event"] == "processed", state


async def test_killed_after_the_200_before_processing(
    payments_process: PaymentsProcess, producer: Any, payment_log: EventLog
) -> None:
    proc = payments_process
    proc.start(PAYMENTS_WEBHOOK_WORKER_ENABLED="false")
    snap, event = await _prepare(proc, producer)
    response = await _deliver(proc, event)
    assert response.status_code == 200
    assert (await _db_state(proc.database_url, snap.id, event["id"]))["event"] == "pending"

    proc.proc.kill()  # type: ignore[union-attr]
    proc.wait_port_free()
    proc.start()
    # Stripe retries anyway (say our 200 got lost): still one payment
    again = await _deliver(proc, event)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    await _exactly_one_payment(proc, payment_log, snap.id, event["id"])


async def test_killed_in_the_middle_of_the_processing_transaction(
    payments_process: PaymentsProcess, producer: Any, payment_log: EventLog
) -> None:
    proc = payments_process
    proc.start(PAYMENTS_WEBHOOK_DEBUG_STALL_SECONDS="60")
    snap, event = await _prepare(proc, producer)
    assert (await _deliver(proc, event)).status_code == 200
    for _ in range(400):  # the payment and its outbox row are written, not committed
        if "webhook_debug_stall" in proc.log_text():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(proc.log_text()[-3000:])

    proc.proc.kill()  # type: ignore[union-attr]
    state = await _db_state(proc.database_url, snap.id, event["id"])
    assert state == {"payments": 0, "outbox": 0, "event": "pending", "copy": snap.version}
    proc.wait_port_free()
    proc.start()
    await _exactly_one_payment(proc, payment_log, snap.id, event["id"])


async def test_killed_after_commit_before_the_relay_published(
    payments_process: PaymentsProcess, producer: Any, payment_log: EventLog
) -> None:
    proc = payments_process
    proc.start(PAYMENTS_RELAY_ENABLED="false")
    snap, event = await _prepare(proc, producer)
    assert (await _deliver(proc, event)).status_code == 200
    for _ in range(400):
        if (await _db_state(proc.database_url, snap.id, event["id"]))["event"] == "processed":
            break
        await asyncio.sleep(0.05)
    proc.proc.kill()  # type: ignore[union-attr]
    assert payment_log.matching(snap.id) == []
    proc.wait_port_free()
    proc.start()
    await _exactly_one_payment(proc, payment_log, snap.id, event["id"])


async def test_intake_only_replica_wakes_a_worker_in_another_process(
    infra_dir: Path, kafka: Any, stripe_mock: Any, database_url_factory: Callable[[str], str],
    producer: Any, payment_log: EventLog,
) -> None:
    """Operators may run intake replicas (no worker: every CPU cycle for acks) beside worker replicas.
    The stored event wakes the worker through NOTIFY, well before its (here: 60 s) polling would."""
    database_url = database_url_factory("payments_split")
    intake = PaymentsProcess(infra_dir, kafka, stripe_mock, database_url, "split-intake")
    worker = PaymentsProcess(infra_dir, kafka, stripe_mock, database_url, "split-worker")
    intake.start(PAYMENTS_WEBHOOK_WORKER_ENABLED="false")
    try:
        worker.start(PAYMENTS_WEBHOOK_WORKER_POLL_INTERVAL="60")
        try:
            await asyncio.sleep(1.0)  # past the worker's first (startup) pass
            snap, event = await _prepare(intake, producer)
            started = time.monotonic()
            assert (await _deliver(intake, event)).status_code == 200
            await payment_log.wait_for(snap.id, PaymentEventType.SUCCEEDED, timeout=20)
            assert time.monotonic() - started < 20
            await _exactly_one_payment(intake, payment_log, snap.id, event["id"])
        finally:
            worker.proc.stop()  # type: ignore[union-attr]
    finally:
        intake.proc.stop()  # type: ignore[union-attr]
