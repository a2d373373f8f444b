"""Issue 12, defect 1, end to end on real processes: a mark-paid that outlives the gateway's upstream
timeout gets a 504 while payments still commits it; the retry with the same Idempotency-Key must
not record a second payment. A second gateway with a 1 s upstream timeout shares the stack; the
test holds payments' lock on the invoice copy so the first try is slow, exactly as under load."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from deploy.infra import ServiceProcess, free_port
from deploy.services import GATEWAY, InfraEndpoints, make_service_process, service_by_name
from kit.worker import asyncpg_dsn
from tests.conftest import login


@pytest.fixture(scope="module")
def impatient_gateway(stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints,
                      infra_dir: Path) -> Iterator[ServiceProcess]:
    """A second gateway replica (same database, same JWT secret) that gives up on upstreams after 1 s."""
    process = make_service_process(service_by_name(GATEWAY), infra_endpoints, infra_dir / "logs",
                                   extra_env={"GATEWAY_UPSTREAM_TIMEOUT": "1"}, name="gateway-1s", port=free_port())
    process.start()
    yield process
    process.stop()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def _count_payments(conn: asyncpg.Connection, invoice_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM payments WHERE invoice_id = $1", invoice_id))


async def test_a_retry_after_a_gateway_timeout_does_not_double_the_payment(
    admin: httpx.AsyncClient, impatient_gateway: ServiceProcess, infra_endpoints: InfraEndpoints,
) -> None:
    client = (await admin.post("/api/clients", json={"name": f"Idem {uuid.uuid4().hex[:6]}",
                                                     "email": "idem@idem.example.com", "currency": "EUR"})).json()
    invoice = (await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Work", "quantity": "1", "unitPrice": 30_000}]})).json()
    assert (await admin.post(f"/api/invoices/{invoice['id']}/send")).status_code == 200

    payments_db = await asyncpg.connect(asyncpg_dsn(infra_endpoints.database_urls["payments"]))
    lock = await asyncpg.connect(asyncpg_dsn(infra_endpoints.database_urls["payments"]))
    slow = await login(impatient_gateway.url, "admin@example.com", infra_endpoints.admin_password)
    try:
        async def copy_is_open() -> bool:  # payments' own copy of the invoice, from invoice.sent
            status = await payments_db.fetchval("SELECT status FROM invoices WHERE id = $1", invoice["id"])
            return status == "SENT"

        await wait_until(copy_is_open, timeout=30)
        # Hold the copy's row lock: mark-paid waits for it, past the gateway's 1 s timeout.
        tx = lock.transaction()
        await tx.start()
        await lock.execute("SELECT 1 FROM invoices WHERE id = $1 FOR UPDATE", invoice["id"])

        key = {"Idempotency-Key": f"pay-{uuid.uuid4()}"}
        body = {"amount": 10_000, "method": "bank_transfer", "reference": "wire 42"}
        first = await slow.post(f"/api/invoices/{invoice['id']}/mark-paid", json=body, headers=key)
        assert first.status_code == 504, first.text  # the caller does not know whether it happened
        await tx.rollback()  # payments goes on and commits the payment

        async def recorded() -> bool:
            return await _count_payments(payments_db, invoice["id"]) == 1

        await wait_until(recorded, timeout=30)
        retried = await slow.post(f"/api/invoices/{invoice['id']}/mark-paid", json=body, headers=key)
        assert retried.status_code == 201, retried.text
        stored_id = await payments_db.fetchval("SELECT id::text FROM payments WHERE invoice_id = $1", invoice["id"])
        assert retried.json()["id"] == stored_id  # the first try's payment, replayed
        # and through the other replica too: one payment, whatever the path
        again = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid", json=body, headers=key)
        assert again.status_code == 201 and again.json()["id"] == stored_id

        async def applied_once() -> bool:
            current = (await admin.get(f"/api/invoices/{invoice['id']}")).json()
            return bool(current["amountPaid"] == 10_000 and current["status"] == "PARTIAL")

        await wait_until(applied_once, timeout=30)
        assert await _count_payments(payments_db, invoice["id"]) == 1
    finally:
        await slow.aclose()
        await lock.close()
        await payments_db.close()
