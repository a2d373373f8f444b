"""Issue 3 benchmark: Stripe webhook ingestion by the payments service.

    python -m bench.webhook_bench [--events 2000] [--concurrency 16] [--duplicates 0.1] [--via-gateway]

Starts Postgres (fsync on), Kafka, stripe-mock, the invoice and payments services and the gateway
(the same launch path as `make run`), creates `--events` SENT invoices, then posts one signed
`checkout.session.completed` per invoice at a fixed concurrency (plus `--duplicates` of them delivered
a second time, as Stripe does). Prints:

* accepted/s and p50/p99 of the ack (the 200) for the webhook endpoint, and for a bare FastAPI
  endpoint fed the same bodies at the same concurrency in the same run, and their ratio (target >= 40%);
* p50/p99 time from posting an event until its invoice is PAID: when invoice.paid reaches Kafka, which
  is after the invoice service committed PAID (so a read shows PAID no later than that); every
  invoice is then read back through the gateway to check it really reads PAID;
* lost / doubled payments: every invoice must have exactly one Stripe payment in the payments
  database, exactly one payment.succeeded on Kafka, and amountPaid == total through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from bench.stack import LoadResult, Stack, percentile, running_stack
from contracts.envelope import CloudEvent
from deploy.infra import ServiceProcess, free_port
from deploy.services import make_service_process, service_by_name
from kit.actor import INTERNAL_TOKEN_HEADER, ROLE_HEADER
from services.payments.models import InvoiceCopy, Payment
from services.payments.stripe import testing as stripe_events

AMOUNT = 12_345


async def fixed_load(label: str, items: Sequence[Any], send: Callable[[Any], Awaitable[None]],
                     concurrency: int) -> LoadResult:
    """Send every item once from `concurrency` workers; the rate is items / wall time."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        nonlocal errors
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            began = loop.time()
            try:
                await send(item)
            except Exception as exc:
                errors += 1
                if errors <= 3:
                    print(f"  [{label}] error: {exc!r}", file=sys.stderr)
                continue
            latencies.append(loop.time() - began)

    started = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(label, latencies, errors, loop.time() - started)


async def create_invoices(stack: Stack, count: int, concurrency: int) -> list[str]:
    """SENT invoices of AMOUNT, straight on the invoice service (as the system actor)."""
    headers = {ROLE_HEADER: "admin", INTERNAL_TOKEN_HEADER: stack.endpoints.internal_token}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=stack.url("invoice"), headers=headers, limits=limits, timeout=30) as http:
        client = await http.post("/api/clients", json={"name": "Webhook Bench Ltd", "email": "bench@example.com",
                                                       "currency": "EUR"})
        client.raise_for_status()
        client_id = client.json()["id"]
        ids: list[str] = []

        async def one(_: int) -> None:
            created = await http.post("/api/invoices", json={
                "clientId": client_id, "items": [{"description": "Bench", "quantity": "1", "unitPrice": AMOUNT}]})
            created.raise_for_status()
            invoice_id = created.json()["id"]
            (await http.post(f"/api/invoices/{invoice_id}/send")).raise_for_status()
            ids.append(invoice_id)

        result = await fixed_load("create + send invoices", list(range(count)), one, concurrency)
        print(f"  {result.line()}")
        if result.errors:
            raise RuntimeError("could not create the invoices")
    return ids


async def wait_for_copies(payments_db: str, ids: list[str], timeout: float = 120) -> None:
    engine = create_async_engine(payments_db)
    deadline = time.monotonic() + timeout
    try:
        while True:
            async with engine.connect() as conn:
                known = (await conn.execute(select(func.count()).select_from(InvoiceCopy).where(
                    InvoiceCopy.id.in_(ids), InvoiceCopy.status == "SENT"))).scalar_one()
            if known == len(ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the payments service knows {known}/{len(ids)} invoices")
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


class KafkaClock:
    """Receive time of invoice.paid per invoice and the count of payment.succeeded per invoice."""

    def __init__(self, bootstrap: str, ids: set[str]) -> None:
        self.ids = ids
        self.paid_at: dict[str, float] = {}
        self.succeeded: Counter[str] = Counter()
        self.succeeded_at: dict[str, float] = {}
        self._consumer = AIOKafkaConsumer("billing.invoice", "billing.payment", bootstrap_servers=bootstrap,
                                          auto_offset_reset="latest", group_id=f"bench-{uuid.uuid4().hex[:6]}")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.seek_to_end()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = loop.time()
            for records in batch.values():
                for record in records:
                    event = CloudEvent.model_validate_json(record.value)
                    if event.subject not in self.ids:
                        continue
                    if event.type == "invoice.paid":
                        self.paid_at.setdefault(event.subject, now)
                    elif event.type == "payment.succeeded":
                        self.succeeded[event.subject] += 1
                        self.succeeded_at.setdefault(event.subject, now)

    async def wait_all_paid(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.paid_at) < len(self.ids) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a dict
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()


async def check_through_gateway(stack: Stack, ids: list[str], concurrency: int) -> tuple[int, int]:
    """(invoices reading PAID with amountPaid == total, others) through the gateway as the admin."""
    async with httpx.AsyncClient(base_url=stack.url("gateway"), timeout=30,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        login = await http.post("/api/auth/login", json={"email": "admin@example.com",
                                                         "password": stack.endpoints.admin_password})
        login.raise_for_status()
        http.headers["Authorization"] = f"Bearer {login.json()['accessToken']}"
        good = bad = 0

        async def one(invoice_id: str) -> None:
            nonlocal good, bad
            body = (await http.get(f"/api/invoices/{invoice_id}")).json()
            if body.get("status") == "PAID" and body.get("amountPaid") == body.get("total") == AMOUNT:
                good += 1
            else:
                bad += 1

        await fixed_load("read back through the gateway", ids, one, concurrency)
    return good, bad


async def payments_per_invoice(payments_db: str, ids: list[str]) -> Counter[str]:
    engine = create_async_engine(payments_db)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(Payment.invoice_id, func.count()).where(
                Payment.invoice_id.in_(ids), Payment.source == "stripe", Payment.status == "succeeded",
            ).group_by(Payment.invoice_id))).all()
        return Counter({invoice_id: n for invoice_id, n in rows})
    finally:
        await engine.dispose()


async def bench(stack: Stack, bare_url: str, args: argparse.Namespace) -> int:
    secret = stack.endpoints.stripe_webhook_secret
    print(f"creating {args.events} SENT invoices...", flush=True)
    ids = await create_invoices(stack, args.events, args.concurrency)
    await wait_for_copies(stack.endpoints.database_urls["payments"], ids)

    bodies = {
        invoice_id: stripe_events.encode_event(stripe_events.build_event(
            "checkout.session.completed",
            stripe_events.checkout_session(invoice_id=invoice_id, amount_total=AMOUNT, currency="eur")))
        for invoice_id in ids
    }
    rng = random.Random(42)
    deliveries = list(ids) + rng.sample(ids, int(len(ids) * args.duplicates))
    rng.shuffle(deliveries)
    target = stack.url("gateway") if args.via_gateway else stack.url("payments")
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async with httpx.AsyncClient(base_url=bare_url, limits=limits, timeout=30) as bare_http:
        async def bare(invoice_id: str) -> None:
            body = bodies[invoice_id]
            (await bare_http.post("/bare", content=body, headers={
                "Stripe-Signature": stripe_events.sign_payload(body, secret),
                "Content-Type": "application/json"})).raise_for_status()

        await fixed_load("warm-up", deliveries[:200], bare, args.concurrency)
        bare_result = await fixed_load("bare FastAPI endpoint", deliveries, bare, args.concurrency)

    clock = KafkaClock(stack.kafka.bootstrap, set(ids))
    await clock.start()
    posted_at: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=target, limits=limits, timeout=30) as http:
        async def deliver(invoice_id: str) -> None:
            body = bodies[invoice_id]
            posted_at.setdefault(invoice_id, loop.time())
            response = await http.post("/webhooks/stripe", content=body, headers={
                "Stripe-Signature": stripe_events.sign_payload(body, secret),
                "Content-Type": "application/json"})
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} {response.text[:200]}")

        label = "webhook via gateway" if args.via_gateway else "webhook (payments service)"
        hook_result = await fixed_load(label, deliveries, deliver, args.concurrency)

    await clock.wait_all_paid(timeout=180)
    await asyncio.sleep(2.0)  # any doubled payment.succeeded would show up by now
    await clock.stop()
    to_paid = [clock.paid_at[i] - posted_at[i] for i in ids if i in clock.paid_at]
    to_succeeded = [clock.succeeded_at[i] - posted_at[i] for i in ids if i in clock.succeeded_at]
    good, bad = await check_through_gateway(stack, ids, args.concurrency)
    per_invoice = await payments_per_invoice(stack.endpoints.database_urls["payments"], ids)

    lost = sum(1 for i in ids if per_invoice[i] == 0)
    doubled = sum(1 for i in ids if per_invoice[i] > 1)
    kafka_lost = sum(1 for i in ids if clock.succeeded[i] == 0)
    kafka_doubled = sum(1 for i in ids if clock.succeeded[i] > 1)

    print(f"\n== webhook ingestion, {len(ids)} invoices, {len(deliveries)} deliveries "
          f"({len(deliveries) - len(ids)} redelivered), concurrency {args.concurrency}, 2-core machine, fsync on ==")
    print(bare_result.line())
    print(hook_result.line())
    ratio = hook_result.rate / bare_result.rate if bare_result.rate else 0.0
    print(f"ratio webhook acks / bare:              {ratio:6.1%}  (target >= 40%)")
    print(f"post -> invoice PAID (invoice.paid on Kafka): p50 {percentile(to_paid, 50):.2f} s   "
          f"p99 {percentile(to_paid, 99):.2f} s   max {max(to_paid, default=float('nan')):.2f} s   "
          f"n={len(to_paid)}/{len(ids)}")
    print(f"  of which post -> payment.succeeded on Kafka (payments' share): p50 {percentile(to_succeeded, 50):.2f} s"
          f"   p99 {percentile(to_succeeded, 99):.2f} s")
    print(f"read back through the gateway:          {good} PAID with amountPaid == total, {bad} not")
    print(f"payments in the payments DB:            lost {lost}, doubled {doubled}")
    print(f"payment.succeeded on Kafka:             lost {kafka_lost}, doubled {kafka_doubled}")
    ok = not (lost or doubled or kafka_lost or kafka_doubled or bad or hook_result.errors)
    print("RESULT:", "no lost or doubled payments" if ok else "PAYMENTS LOST OR DOUBLED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="invoices, each paid by one checkout event")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of events delivered twice")
    parser.add_argument("--via-gateway", action="store_true", help="post the webhooks through the gateway")
    parser.add_argument("--split-worker", action="store_true",
                        help="run the payments service as an intake-only replica plus a separate worker process")
    args = parser.parse_args(argv)
    print("starting Postgres, Kafka, stripe-mock, invoice, payments and the gateway...", flush=True)
    with running_stack(["invoice"], with_stripe=True) as stack:
        started: list[ServiceProcess] = []
        bare: ServiceProcess | None = None
        try:
            if args.split_worker:
                started.append(stack.start_service("payments", PAYMENTS_INVOICE_URL=stack.url("invoice"),
                                                   PAYMENTS_WEBHOOK_WORKER_ENABLED="false"))
                worker = make_service_process(
                    service_by_name("payments"), stack.endpoints, stack.root / "logs", name="payments-worker",
                    port=free_port(), extra_env={"PAYMENTS_INVOICE_URL": stack.url("invoice")},
                )
                worker.start()
                started.append(worker)
            else:
                started.append(stack.start_service("payments", PAYMENTS_INVOICE_URL=stack.url("invoice")))
            started.append(stack.start_service("gateway"))
            bare_port = free_port()
            bare = ServiceProcess("bare", [sys.executable, "-m", "bench.bare_app", str(bare_port)],
                                  env=dict(os.environ), port=bare_port, log_path=stack.root / "logs" / "bare.log")
            bare.start()
            return asyncio.run(bench(stack, bare.url, args))
        finally:
            if bare is not None:
                bare.stop()
            for process in reversed(started):
                process.stop()


if __name__ == "__main__":
    sys.exit(main())
