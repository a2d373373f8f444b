"""One trace follows a Stripe webhook from the gateway through payments (intake, then the worker), the
outbox relay's Kafka send and the invoice service's consumer (issue 14, point 2).

The gateway, payments and invoice run as real processes with tracing on through the test hook
`BILLING_TRACE_FILE` (kit.tracing: each process appends its finished spans as JSON lines to its own
file), on a private Kafka: the invoice service's consumer group is fixed, and the shared stack's
invoice service would otherwise take our payment events.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.infra import RUN_DIR, KafkaServer, ServiceProcess, ensure_kafka_jars, free_ports
from deploy.services import GATEWAY, SERVICES, InfraEndpoints, make_service_process, service_by_name
from kit.tracing import TRACE_FILE_ENV
from services.payments.stripe import testing as stripe_events

# Tracing on needs the SDK and the instrumentations (kit.tracing loads them only then).
for _module in ("opentelemetry.sdk.trace", "opentelemetry.instrumentation.fastapi",
                "opentelemetry.instrumentation.httpx", "opentelemetry.instrumentation.sqlalchemy",
                "opentelemetry.exporter.otlp.proto.http"):
    pytest.importorskip(_module, reason=f"{_module} is not installed")

TRACED = ("invoice", "payments", GATEWAY)  # start order: the gateway after the services it calls


@dataclass(frozen=True)
class Stack:
    processes: dict[str, ServiceProcess]
    infra: InfraEndpoints
    trace_files: dict[str, Path]


@pytest.fixture(scope="module")
def private_kafka(infra_dir: Path) -> Iterator[KafkaServer]:
    port, controller = free_ports(2)
    server = KafkaServer(infra_dir / f"kafka-tracing-{port}", port, controller,
                         jars_dir=ensure_kafka_jars(RUN_DIR / "kafka-jars"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced_stack(private_kafka: KafkaServer, database_url_factory: Any, infra_dir: Path) -> Iterator[Stack]:
    trace_dir = infra_dir / f"traces-{uuid.uuid4().hex[:6]}"
    trace_dir.mkdir()
    infra = InfraEndpoints(
        kafka_bootstrap=private_kafka.bootstrap,
        database_urls={name: database_url_factory(f"{name}_traced") for name in TRACED},
        stripe_api_base="http://127.0.0.1:9",  # nothing on this path calls Stripe
        smtp_host="127.0.0.1",
        smtp_port=9,
        # Every service a port of its own: the gateway is told of all of them, none may be another run's.
        ports=dict(zip([s.name for s in SERVICES], free_ports(len(SERVICES)), strict=True)),
    )
    files = {name: trace_dir / f"{name}.jsonl" for name in TRACED}
    processes: dict[str, ServiceProcess] = {}
    try:
        for name in TRACED:
            spec = service_by_name(name)
            extra = {TRACE_FILE_ENV: str(files[name]), f"{spec.env_prefix}OUTBOX_POLL_INTERVAL": "0.5"}
            if name == "invoice":
                extra["INVOICE_OVERDUE_SCAN_INTERVAL"] = "3600"
            process = make_service_process(spec, infra, infra_dir / "logs", name=f"{name}-traced", extra_env=extra)
            process.start(timeout=90)
            processes[name] = process
        yield Stack(processes, infra, files)
    finally:
        for process in reversed(list(processes.values())):
            process.stop()


def _spans(files: dict[str, Path]) -> list[dict[str, Any]]:
    spans = []
    for path in files.values():
        if path.exists():
            spans += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return spans


async def _wait_for_span(files: dict[str, Path], predicate: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = [s for s in _spans(files) if predicate(s)]
        if found:
            return found[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no span {what} within {timeout}s")


async def test_one_trace_follows_a_webhook_from_the_gateway_to_the_invoice_service(traced_stack: Stack) -> None:
    invoice_url, gateway_url = traced_stack.processes["invoice"].url, traced_stack.processes[GATEWAY].url
    token = traced_stack.infra.internal_token
    admin = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1", "X-Internal-Token": token}
    async with httpx.AsyncClient(base_url=invoice_url, headers=admin, timeout=30) as inv:
        client = await inv.post("/api/clients", json={"name": "Traced Ltd", "email": "t@traced.example.com",
                                                      "currency": "EUR"})
        assert client.status_code == 201, client.text
        created = await inv.post("/api/invoices", json={
            "clientId": client.json()["id"], "items": [{"description": "Work", "quantity": "1", "unitPrice": 12_000}]})
        assert created.status_code == 201, created.text
        invoice_id = created.json()["id"]
        assert (await inv.post(f"/api/invoices/{invoice_id}/send")).status_code == 200

        session = stripe_events.checkout_session(invoice_id=invoice_id, amount_total=12_000, currency="eur")
        event = stripe_events.build_event("checkout.session.completed", session)
        body, headers = stripe_events.signed_request(event, traced_stack.infra.stripe_webhook_secret)
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as stripe_like:
            delivered = await stripe_like.post("/webhooks/stripe", content=body, headers=headers)
        assert delivered.status_code == 200, delivered.text

        loop = asyncio.get_running_loop()
        deadline, status = loop.time() + 60, None
        while loop.time() < deadline and status != "PAID":
            status = (await inv.get(f"/api/invoices/{invoice_id}")).json()["status"]
            await asyncio.sleep(0.2)
        assert status == "PAID"

    # The invoice service's handling of the payment, found by its Kafka record (key: the invoice id).
    consumed = await _wait_for_span(
        traced_stack.trace_files,
        lambda s: s["service"] == "invoice" and s["kind"] == "CONSUMER"
        and s["attributes"].get("messaging.kafka.message.key") == invoice_id
        and s["attributes"].get("cloudevents.event_type") == "payment.succeeded",
        "of the invoice consumer applying payment.succeeded")
    trace_id = consumed["traceId"]
    spans = [s for s in _spans(traced_stack.trace_files) if s["traceId"] == trace_id]
    by_id = {s["spanId"]: s for s in spans}

    chain = [consumed]  # up the parent links to the root
    while chain[-1]["parentSpanId"] is not None:
        parent = by_id.get(chain[-1]["parentSpanId"])
        assert parent is not None, f"the parent of {chain[-1]['name']} is not in the trace"
        chain.append(parent)
    chain.reverse()
    assert [(s["service"], s["kind"]) for s in chain] == [
        ("gateway", "SERVER"),      # POST /webhooks/stripe at the edge
        ("gateway", "CLIENT"),      # the proxy's call (httpx)
        ("payments", "SERVER"),     # payments' endpoint
        ("payments", "INTERNAL"),   # the intake, which stores the event with this context
        ("payments", "CONSUMER"),   # the worker, later, continuing the stored context
        ("payments", "PRODUCER"),   # the outbox relay's send of payment.succeeded to Kafka
        ("invoice", "CONSUMER"),    # the invoice service applying it
    ], [(s["service"], s["kind"], s["name"]) for s in chain]
    gateway_server, _, _, intake, worker, send, _ = chain
    assert gateway_server["attributes"].get("http.route") or gateway_server["name"].startswith("POST")
    assert intake["name"] == "stripe.webhook.intake" and worker["name"] == "stripe.webhook.process"
    assert intake["attributes"]["stripe.event_id"] == worker["attributes"]["stripe.event_id"] == event["id"]
    assert send["name"] == "billing.payment publish"
    assert send["attributes"]["cloudevents.event_type"] == "payment.succeeded"
    assert [s["start"] for s in chain] == sorted(s["start"] for s in chain)  # each began after its parent

    # SQL inside the operations: payments' worker and the invoice consumer each ran statements in it.
    def sql_under(span: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in spans if s["parentSpanId"] == span["spanId"] and s["kind"] == "CLIENT"
                and any(k.startswith("db.") for k in s["attributes"])]

    assert sql_under(worker), "no SQL span under the webhook worker's"
    assert sql_under(consumed), "no SQL span under the invoice consumer's"
    # The invoice service's own event (invoice.paid) carries the trace on: its relay's send is in it too.
    await _wait_for_span(
        traced_stack.trace_files,
        lambda s: s["traceId"] == trace_id and s["service"] == "invoice" and s["kind"] == "PRODUCER"
        and s["attributes"].get("cloudevents.event_type") == "invoice.paid",
        "of the invoice relay sending invoice.paid in the same trace")
    # Probes are not traced, and polling SQL starts no trace of its own.
    everything = _spans(traced_stack.trace_files)
    assert not [s for s in everything if "/healthz" in s["name"] or "/readyz" in s["name"]]
    assert not [s for s in everything if s["parentSpanId"] is None and s["kind"] == "CLIENT"]
