"""Issue 14 'done when' for metrics and logs, on the real stack: after a few requests and the events
they cause, every service's /metrics shows its series with sane values (requests counted by route
template, outbox backlog back to 0, lag back to 0, consumers' handling by outcome, pool, workers,
the service's own gauges), and a correlation id sent to the gateway is in the invoice service's
access line for the call the gateway forwarded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum over the series of `name` whose labels include `labels` (None: no such series)."""
    found = [v for series_labels, v in samples.get(name, []) if labels.items() <= series_labels.items()]
    return sum(found) if found else None


async def scrape_until(url: str, predicate: Callable[[Samples], bool], timeout: float = 30) -> Samples:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(url)
        if predicate(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, f"{url}/metrics: condition not met in {timeout}s"
        await asyncio.sleep(0.5)


async def test_every_service_serves_its_series(admin: httpx.AsyncClient, stack: dict[str, ServiceProcess]) -> None:
    gateway = stack[GATEWAY].url
    before = await scrape(gateway)
    invoices_before = value(before, "billing_http_requests_total", service="gateway", route="/api/invoices*") or 0
    # The stack is the session's: other tests' requests are counted too, so compare with a scrape before.
    invoice_before = await scrape(stack["invoice"].url)

    def invoice_requests(samples: Samples, route: str, status: str) -> float:
        return value(samples, "billing_http_requests_total", service="invoice", route=route, status=status) or 0

    client = (await admin.post("/api/clients", json={"name": "Metrics AG", "email": "m@metrics.example.com"})).json()
    created = await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Audit", "quantity": "1", "unitPrice": 12_000}]})
    assert created.status_code == 201, created.text
    invoice_id = created.json()["id"]
    assert (await admin.post(f"/api/invoices/{invoice_id}/send")).status_code == 200
    paid = await admin.post(f"/api/invoices/{invoice_id}/mark-paid", json={"amount": 12_000, "method": "cash"})
    assert paid.status_code == 201, paid.text
    assert (await admin.get(f"/api/invoices/{uuid.uuid4()}")).status_code == 404

    # gateway: its requests by route (its own, and the proxied ones by the route's prefix)
    after = await scrape(gateway)
    invoices_after = value(after, "billing_http_requests_total", service="gateway", route="/api/invoices*")
    assert invoices_after is not None and invoices_after >= invoices_before + 3  # create, send, the 404
    assert value(after, "billing_http_requests_total", service="gateway", route="/api/invoices/{id}/mark-paid*",
                 status="201")
    assert value(after, "billing_http_requests_total", service="gateway", route="/api/invoices*", status="404")
    assert value(after, "billing_http_requests_total", service="gateway", route="/api/auth/login", status="200")
    assert value(after, "billing_http_request_duration_seconds_count", service="gateway", route="/api/invoices*")
    assert value(after, "billing_db_pool_size", service="gateway")
    raw_paths = [labels for labels, _ in after["billing_http_requests_total"] if invoice_id in labels["route"]]
    assert raw_paths == []  # never the raw path

    # invoice: route templates, its outbox drained, its consumers handled the payment
    invoice = await scrape_until(stack["invoice"].url, lambda s: (
        value(s, "billing_outbox_backlog", service="invoice") == 0
        and (value(s, "billing_consumer_handling_seconds_count", consumer="invoice", outcome="applied") or 0) >= 1
        and value(s, "billing_consumer_lag", group="invoice") == 0
        # The relay's child reports its count a moment after it publishes: wait for it too.
        and (value(s, "billing_outbox_relayed_events_total", service="invoice") or 0) >= 3))
    for route, status in (("/api/invoices/{invoice_id}/send", "200"), ("/api/invoices/{invoice_id}", "404")):
        assert invoice_requests(invoice, route, status) - invoice_requests(invoice_before, route, status) == 1
    assert value(invoice, "billing_outbox_oldest_age_seconds", service="invoice") == 0
    assert (value(invoice, "billing_outbox_relayed_events_total", service="invoice") or 0) >= 3
    assert value(invoice, "billing_worker_up", service="invoice", worker="outbox-relay") == 1
    assert (value(invoice, "billing_worker_runs_total", service="invoice", worker="outbox-relay") or 0) >= 1
    assert value(invoice, "billing_worker_last_success_age_seconds", service="invoice",
                 worker="outbox-relay") is not None
    assert value(invoice, "billing_db_pool_in_use", service="invoice") is not None
    assert (value(invoice, "billing_faststream_received_messages_total", app_name="invoice") or 0) >= 1
    assert value(invoice, "billing_metrics_source_up", source="outbox") == 1
    assert value(invoice, "billing_metrics_source_up", source="consumer-lag") == 1

    # payments: the manual payment published, the invoice events consumed, the webhook backlog empty
    payments = await scrape_until(stack["payments"].url, lambda s: (
        value(s, "billing_outbox_backlog", service="payments") == 0
        and (value(s, "billing_consumer_handling_seconds_count", outcome="applied") or 0) >= 1))
    assert value(payments, "billing_payments_webhook_events", status="pending") == 0
    assert value(payments, "billing_payments_webhook_events", status="failed") == 0
    assert value(payments, "billing_payments_webhook_oldest_pending_age_seconds") == 0
    assert value(payments, "billing_payments_webhook_retrying") == 0
    assert value(payments, "billing_worker_up", service="payments") is not None

    # notifications: the invoice email queued and sent, the queue by status (the stack is the session's:
    # other tests' emails may still wait for a retry, so the gauges are read, not required to be 0)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        log = (await admin.get("/api/notifications", params={"invoiceId": invoice_id})).json()["items"]
        if any(m["kind"] == "invoice_sent" and m["status"] == "sent" for m in log):
            break
        assert asyncio.get_running_loop().time() < deadline, log
        await asyncio.sleep(0.5)
    notifications = await scrape_until(stack["notifications"].url, lambda s: (
        (value(s, "billing_consumer_handling_seconds_count", outcome="applied") or 0) >= 1))
    for status in ("pending", "sending", "failed"):
        assert value(notifications, "billing_notifications_emails", status=status) is not None, status
    assert value(notifications, "billing_metrics_source_up", source="billing_notifications_emails") == 1

    # reporting: its feed's lag, from the positions it keeps with its read models
    reporting = await scrape_until(stack["reporting"].url, lambda s: (
        value(s, "billing_consumer_lag", group="reporting", topic="billing.invoice") == 0))
    assert value(reporting, "billing_db_pool_size", service="reporting")

    # subscriptions: its consumer group's lag on billing.stripe, its pool
    subscriptions = await scrape(stack["subscriptions"].url)
    assert value(subscriptions, "billing_consumer_lag", group="subscriptions") is not None
    assert value(subscriptions, "billing_db_pool_size", service="subscriptions")
    assert value(subscriptions, "billing_outbox_backlog", service="subscriptions") is not None


async def test_the_correlation_id_reaches_the_service_and_its_access_line(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess]
) -> None:
    correlation_id = f"metrics-{uuid.uuid4()}"
    response = await admin.get(f"/api/invoices/{uuid.uuid4()}", headers={"X-Correlation-Id": correlation_id})
    assert response.status_code == 404 and response.headers["X-Correlation-Id"] == correlation_id
    log_path = stack["invoice"].log_path
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if correlation_id in line]
        if lines:
            break
        assert asyncio.get_running_loop().time() < deadline, f"{correlation_id} not in {log_path}"
        await asyncio.sleep(0.1)
    assert len(lines) == 1, lines  # one access line for the one request
    line = lines[0]
    assert "http_request" in line and "route=/api/invoices/{invoice_id}" in line and "status=404" in line
    assert "method=GET" in line and "duration_ms=" in line and "service=invoice" in line
    assert "\x1b[" not in log_path.read_text(errors="replace")  # no ANSI colours in a log file
