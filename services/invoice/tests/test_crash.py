"""A replica killed between the DB commit and the Kafka publish loses no event: the next one relays it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from deploy.services import InfraEndpoints, make_service_process, service_by_name
from services.invoice.tests.conftest import EventLog

INVOICE = service_by_name("invoice")


async def test_event_committed_before_a_crash_is_published_after_restart(
    infra_endpoints: InfraEndpoints, infra_dir: Path, invoice_events: EventLog
) -> None:
    headers = {"X-Actor-Role": "admin", "X-Internal-Token": infra_endpoints.internal_token}
    # A replica whose relay never runs: every change it commits stays in the outbox...
    stalled = make_service_process(INVOICE, infra_endpoints, infra_dir / "logs", name="invoice-stalled",
                                   extra_env={"INVOICE_RELAY_ENABLED": "false"})
    stalled.start()
    try:
        async with httpx.AsyncClient(base_url=stalled.url, headers=headers, timeout=10) as http:
            client = (await http.post("/api/clients", json={"name": "Crash Co", "email": "c@crash.example.com"}))
            assert client.status_code == 201, client.text
            created = await http.post("/api/invoices", json={
                "clientId": client.json()["id"],
                "items": [{"description": "Work", "quantity": "1", "unitPrice": 1234}],
            })
            assert created.status_code == 201, created.text
            invoice: dict[str, Any] = created.json()
    finally:
        stalled.kill()  # ...and then it dies (SIGKILL: no shutdown hooks, nothing flushed)
    assert invoice_events.matching(invoice["id"]) == []

    restarted = make_service_process(INVOICE, infra_endpoints, infra_dir / "logs", name="invoice-restarted")
    restarted.start()
    try:
        [event] = await invoice_events.wait_for(invoice["id"], "invoice.created", timeout=30)
        assert event.data["total"] == 1234
    finally:
        restarted.stop()
