"""Issue 3 / 13 benchmark: Stripe webhook ingestion by the payments service, as a burst and at a steady rate.

    python -m bench.webhook_bench [--mode both|burst|steady] [--events 2000] [--concurrency 16]
        [--rate 200] [--steady-seconds 30] [--duplicates 0.1] [--via-gateway] [--split-worker]

Starts Postgres (fsync on), Kafka, stripe-mock, the invoice and payments services and the gateway
(the same launch path as `make run`) and creates SENT invoices, each to be paid by one signed
`checkout.session.completed` (plus `--duplicates` of them delivered a second time, as Stripe does).

* burst: `--events` invoices posted from `--concurrency` workers, each sending the next as soon as it
  has its answer (closed loop); accepted/s and p50/p99 of the ack (the 200) for the webhook endpoint
  and for a bare FastAPI endpoint fed the same bodies at the same concurrency, and their ratio
  (target >= 45%); p50/p99 from posting until the invoice is PAID (target p99 < 4 s).
* steady: `--rate` deliveries a second for `--steady-seconds`, open loop: each request is fired at its
  due time by the clock whatever became of the earlier ones; the rate achieved, the sender's own
  lateness (due -> fired, so a slow load generator is visible), the ack and due -> PAID p50/p99
  (target p99 < 1 s).

PAID is when invoice.paid reaches Kafka (after the invoice service committed PAID, so a read shows
PAID no later than that; the event's own time, just before that commit, is shown too). Checks per
mode: every invoice reads PAID with amountPaid == total through the gateway, exactly one Stripe
payment each in the payments database, exactly one payment.succeeded and one invoice.paid each on
Kafka, created -> sent -> paid in that order on billing.invoice; and the invoice numbers are gapless.
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

from bench.cpu import CpuMeter
from bench.openloop import RawHttp, steady_load
from bench.report import Report, current, invoice_numbers, number_gaps, out_of_order
from bench.stack import LoadResult, Stack, running_stack
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
    """Per invoice: receive time of invoice.paid (wall clock), its own time (just before the PAID commit),
    the count of invoice.paid and payment.succeeded, and the order of the types on billing.invoice."""

    def __init__(self, bootstrap: str) -> None:
        self.ids: set[str] = set()
        self.paid_at: dict[str, float] = {}
        self.paid_time: dict[str, float] = {}
        self.paid_count: Counter[str] = Counter()
        self.succeeded: Counter[str] = Counter()
        self.succeeded_at: dict[str, float] = {}
        self.sequence: dict[str, list[str]] = {}
        self._consumer = AIOKafkaConsumer("billing.invoice", "billing.payment", bootstrap_servers=bootstrap,
                                          auto_offset_reset="latest", group_id=f"bench-{uuid.uuid4().hex[:6]}")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.seek_to_end()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for record in records:
                    event = CloudEvent.model_validate_json(record.value)
                    if event.subject is None:
                        continue
                    if record.topic == "billing.invoice":
                        # Recorded for every invoice: ours are only known once created.
                        self.sequence.setdefault(event.subject, []).append(event.type)
                    if event.type == "invoice.paid":
                        self.paid_count[event.subject] += 1
                        self.paid_at.setdefault(event.subject, now)
                        self.paid_time.setdefault(event.subject, event.time.timestamp())
                    elif event.type == "payment.succeeded":
                        self.succeeded[event.subject] += 1
                        self.succeeded_at.setdefault(event.subject, now)

    async def wait_all_paid(self, ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(i not in self.paid_at for i in ids) and time.monotonic() < deadline:  # noqa: ASYNC110 - a dict
            await asyncio.sleep(0.2)

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


def deliveries_for(ids: list[str], duplicates: float, rng: random.Random) -> list[str]:
    """Every invoice once plus `duplicates` of them a second time (as Stripe redelivers), shuffled."""
    deliveries = list(ids) + rng.sample(ids, int(len(ids) * duplicates))
    rng.shuffle(deliveries)
    return deliveries


def signed_headers(body: bytes, secret: str) -> dict[str, str]:
    return {"Stripe-Signature": stripe_events.sign_payload(body, secret), "Content-Type": "application/json"}


async def verify(rep: Report, mode: str, stack: Stack, clock: KafkaClock, ids: list[str],
                 posted_at: dict[str, float], concurrency: int) -> bool:
    """Figures post -> PAID from `posted_at` and the checks for one mode's invoices."""
    to_paid = [clock.paid_at[i] - posted_at[i] for i in ids if i in clock.paid_at]
    to_committed = [clock.paid_time[i] - posted_at[i] for i in ids if i in clock.paid_time]
    to_succeeded = [clock.succeeded_at[i] - posted_at[i] for i in ids if i in clock.succeeded_at]
    print(f"post -> invoice PAID (invoice.paid on Kafka):  {rep.spread(f'{mode} post->PAID', to_paid, 's')}"
          f"   n={len(to_paid)}/{len(ids)}")
    print(f"  post -> PAID committed (invoice.paid's time): "
          f"{rep.spread(f'{mode} post->PAID committed', to_committed, 's', with_max=False)}")
    print(f"  of which post -> payment.succeeded on Kafka (payments' share): "
          f"{rep.spread(f'{mode} post->payment.succeeded', to_succeeded, 's', with_max=False)}")
    good, bad = await check_through_gateway(stack, ids, concurrency)
    per_invoice = await payments_per_invoice(stack.endpoints.database_urls["payments"], ids)
    lost = sum(1 for i in ids if per_invoice[i] == 0)
    doubled = sum(1 for i in ids if per_invoice[i] > 1)
    kafka_lost = sum(1 for i in ids if clock.succeeded[i] == 0)
    kafka_doubled = sum(1 for i in ids if clock.succeeded[i] > 1)
    paid_doubled = sum(1 for i in ids if clock.paid_count[i] > 1)
    disorder = out_of_order({i: clock.sequence.get(i, []) for i in ids},
                            ["invoice.created", "invoice.sent", "invoice.paid"])
    checks = [
        rep.check(f"{mode}: PAID through the gateway", not bad and good == len(ids),
                  f"{good} PAID with amountPaid == total, {bad} not"),
        rep.check(f"{mode}: payments lost (payments DB)", not lost, f"{lost} of {len(ids)}"),
        rep.check(f"{mode}: payments doubled (payments DB)", not doubled, f"{doubled}"),
        rep.check(f"{mode}: payment.succeeded lost (Kafka)", not kafka_lost, f"{kafka_lost}"),
        rep.check(f"{mode}: payment.succeeded doubled (Kafka)", not kafka_doubled, f"{kafka_doubled}"),
        rep.check(f"{mode}: invoice.paid doubled (Kafka)", not paid_doubled, f"{paid_doubled}"),
        rep.check(f"{mode}: per-invoice order (created, sent, paid)", not disorder,
                  f"{disorder} invoices out of order on billing.invoice"),
    ]
    return all(checks)


def cpu_report(rep: Report, mode: str, meter: CpuMeter, payments: int) -> None:
    """Where the cores went from the first delivery until the last invoice.paid, per payment."""
    split = meter.stop()
    print(f"{mode}, first delivery -> last PAID: {split.table(payments, 'payment')}")
    split.record(rep, mode, payments, "payment")


async def run_burst(rep: Report, stack: Stack, bare_url: str, args: argparse.Namespace, clock: KafkaClock,
                    ids: list[str], bodies: dict[str, bytes]) -> tuple[dict[str, float], bool]:
    """The bare endpoint, then the webhooks, each delivery sent as soon as a worker is free."""
    secret = stack.endpoints.stripe_webhook_secret
    deliveries = deliveries_for(ids, args.duplicates, random.Random(42))
    target = stack.url("gateway") if args.via_gateway else stack.url("payments")
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async with httpx.AsyncClient(base_url=bare_url, limits=limits, timeout=30) as bare_http:
        async def bare(invoice_id: str) -> None:
            body = bodies[invoice_id]
            (await bare_http.post("/bare", content=body, headers=signed_headers(body, secret))).raise_for_status()

        await fixed_load("warm-up", deliveries[:200], bare, args.concurrency)
        bare_result = await fixed_load("bare FastAPI endpoint", deliveries, bare, args.concurrency)

    posted_at: dict[str, float] = {}
    meter = CpuMeter.of(stack)
    stack.load_begins()
    meter.start()
    async with httpx.AsyncClient(base_url=target, limits=limits, timeout=30) as http:
        async def deliver(invoice_id: str) -> None:
            body = bodies[invoice_id]
            posted_at.setdefault(invoice_id, time.time())
            response = await http.post("/webhooks/stripe", content=body, headers=signed_headers(body, secret))
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} {response.text[:200]}")

        label = "webhook via gateway" if args.via_gateway else "webhook (payments service)"
        hook_result = await fixed_load(label, deliveries, deliver, args.concurrency)
    await clock.wait_all_paid(ids, timeout=180)

    print(f"\n== webhook burst: {len(ids)} invoices, {len(deliveries)} deliveries "
          f"({len(deliveries) - len(ids)} redelivered), concurrency {args.concurrency}, "
          f"{os.cpu_count()}-core machine, fsync on ==")
    print(bare_result.line())
    print(hook_result.line())
    rep.load(f"burst bare c{args.concurrency}", bare_result)
    rep.load(f"burst webhook acks c{args.concurrency}", hook_result)
    ratio = rep.ratio("burst webhook acks / bare", hook_result.rate, bare_result.rate, target=">= 45%")
    print(f"ratio webhook acks / bare:              {ratio:6.1%}  (target >= 45%)")
    cpu_report(rep, "burst", meter, len(ids))
    rep.check("burst: every delivery answered 200", not hook_result.errors, f"{hook_result.errors} errors")
    return posted_at, not hook_result.errors


async def run_steady(rep: Report, stack: Stack, args: argparse.Namespace, clock: KafkaClock,
                     ids: list[str], bodies: dict[str, bytes]) -> tuple[dict[str, float], bool]:
    """Deliveries at a fixed rate; each invoice's figures count from its first delivery's due time."""
    secret = stack.endpoints.stripe_webhook_secret
    deliveries = deliveries_for(ids, args.duplicates, random.Random(43))
    target = stack.url("gateway") if args.via_gateway else stack.url("payments")
    due_at: dict[str, float] = {}
    # Up to the cap, a connection per request in flight: a pool of N would make this a closed loop of N.
    http = RawHttp(target, args.max_in_flight)
    meter = CpuMeter.of(stack)
    stack.load_begins()
    meter.start()

    async def deliver(invoice_id: str, due: float) -> None:
        body = bodies[invoice_id]
        due_at.setdefault(invoice_id, due)
        status, answer = await http.post("/webhooks/stripe", body, signed_headers(body, secret))
        if status != 200:
            raise RuntimeError(f"{status} {answer[:200]!r}")

    try:
        result = await steady_load("steady webhooks", deliveries, deliver, args.rate)
    finally:
        await http.aclose()
    await clock.wait_all_paid(ids, timeout=180)

    print(f"\n== webhook steady rate: {args.rate:g} events/s for {args.steady_seconds:g} s, open loop, "
          f"{len(ids)} invoices, {len(deliveries)} deliveries ({len(deliveries) - len(ids)} redelivered) ==")
    send_rate = rep.figure("steady achieved send rate", result.sent / (result.send_span + 1 / args.rate), "req/s")
    ack_rate = rep.figure("steady ack rate", len(result.acks) / result.ack_span if result.ack_span else 0.0,
                          "req/s")
    print(f"asked {args.rate:g}/s: fired {send_rate:.1f}/s, answered {ack_rate:.1f}/s, "
          f"{result.errors} errors, at most {result.max_in_flight} in flight (cap {args.max_in_flight}, "
          f"{http.opened} connections opened)")
    print(f"sender lateness (due -> fired):   {rep.spread('steady sender lateness', result.lateness)}")
    print(f"ack (due -> 200):                 {rep.spread('steady ack', result.acks)}")
    rep.figure("steady max in flight", result.max_in_flight, "count")
    rep.ratio("steady achieved / asked rate", send_rate, args.rate, target="100%")
    rep.check("steady: every delivery answered 200", not result.errors, f"{result.errors} errors")
    cpu_report(rep, "steady", meter, len(ids))
    return due_at, not result.errors


async def bench(stack: Stack, bare_url: str, args: argparse.Namespace, rep: Report) -> int:
    burst_n = args.events if args.mode in ("burst", "both") else 0
    steady_n = round(args.rate * args.steady_seconds / (1 + args.duplicates)) if args.mode in ("steady", "both") else 0
    clock = KafkaClock(stack.kafka.bootstrap)
    await clock.start()  # before the invoices exist, so per-invoice order covers created and sent too
    print(f"creating {burst_n + steady_n} SENT invoices ({burst_n} burst, {steady_n} steady)...", flush=True)
    ids = await create_invoices(stack, burst_n + steady_n, args.concurrency)
    clock.ids.update(ids)
    await wait_for_copies(stack.endpoints.database_urls["payments"], ids)
    bodies = {
        invoice_id: stripe_events.encode_event(stripe_events.build_event(
            "checkout.session.completed",
            stripe_events.checkout_session(invoice_id=invoice_id, amount_total=AMOUNT, currency="eur")))
        for invoice_id in ids
    }
    ok = True
    runs: list[tuple[str, list[str], dict[str, float]]] = []
    try:
        if burst_n:
            posted_at, answered = await run_burst(rep, stack, bare_url, args, clock, ids[:burst_n], bodies)
            runs.append(("burst", ids[:burst_n], posted_at))
            ok = ok and answered
        if steady_n:
            due_at, answered = await run_steady(rep, stack, args, clock, ids[burst_n:], bodies)
            runs.append(("steady", ids[burst_n:], due_at))
            ok = ok and answered
        stack.load_ends()  # the read-back below is not part of the profile
        await asyncio.sleep(2.0)  # a doubled event would be right behind the last one
    finally:
        await clock.stop()
    for mode, some, started_at in runs:
        print(f"\n== {mode}: until PAID, and what reached the books ({len(some)} invoices)")
        ok = await verify(rep, mode, stack, clock, some, started_at, args.concurrency) and ok
    in_use, repeats, gaps = number_gaps(await invoice_numbers(stack.endpoints.database_urls["invoice"]))
    ok = rep.check("invoice numbers gapless", not (repeats or gaps) and in_use == len(ids),
                   f"{in_use} numbers for {len(ids)} sent, {repeats} repeated, {gaps} missing") and ok
    print("RESULT:", "no lost or doubled payments" if ok else "PAYMENTS LOST OR DOUBLED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["burst", "steady", "both"], default="both")
    parser.add_argument("--events", type=int, default=2000,
                        help="burst: invoices, each paid by one checkout event")
    parser.add_argument("--rate", type=float, default=200.0, help="steady: deliveries per second")
    parser.add_argument("--steady-seconds", type=float, default=30.0, help="steady: seconds of deliveries")
    parser.add_argument("--max-in-flight", type=int, default=1000,
                        help="steady: connection cap (past it the sender waits, and shows as late)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of events delivered twice")
    parser.add_argument("--via-gateway", action="store_true", help="post the webhooks through the gateway")
    parser.add_argument("--split-worker", action="store_true",
                        help="run the payments service as an intake-only replica plus a separate worker process")
    args = parser.parse_args(argv)
    rep = current("webhooks")
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
                stack.processes[worker.name] = worker  # profiled like the others
            else:
                started.append(stack.start_service("payments", PAYMENTS_INVOICE_URL=stack.url("invoice")))
            started.append(stack.start_service("gateway"))
            bare_port = free_port()
            bare = ServiceProcess("bare", [sys.executable, "-m", "bench.bare_app", str(bare_port)],
                                  env=dict(os.environ), port=bare_port, log_path=stack.root / "logs" / "bare.log")
            bare.start()
            return asyncio.run(bench(stack, bare.url, args, rep))
        finally:
            if bare is not None:
                bare.stop()
            for process in reversed(started):
                process.stop()


if __name__ == "__main__":
    sys.exit(main())
