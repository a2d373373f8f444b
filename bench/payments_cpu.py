"""Issue 13: CPU time per Stripe webhook event in the payments service, measured in process.

    python -m bench.payments_cpu [--n 300] [--rounds 3] [--no-sessions] [--save FILE] [--baseline FILE]

The payments app (services.payments.app.create_app) runs in this process on a real PostgreSQL (its own
server with fsync off, or --database-url's server). Kafka is off (no relay, no consumers) and the
webhook worker's loop is off: the bench calls its steps itself, one after the other, so each figure is
the CPU of one path of payments' own code; the outbox rows are still written in each transaction.

Each round, for N invoices (SENT, 120.00 EUR, stored as copies and, unless --no-sessions, with the open
Checkout Session Pay Now made for each; not timed):
  intake    N signed `checkout.session.completed` deliveries, POST /webhooks/stripe through
            httpx.ASGITransport (signature check, one INSERT each);
  worker    WebhookWorker.run_once until nothing is pending: each event parsed, its payment recorded
            and its payment.succeeded staged in the outbox (batches of the worker's size);
  snapshot  the invoice service's answer, the PAID snapshot naming the payment as its cause, applied as
            the invoice.* consumer does (apply_invoice_snapshot in one transaction per event).
All timed with time.process_time (CPU of this process, every thread): the machine is shared, so wall
time would measure the neighbours. Printed: CPU ms per event of each path and of the three together
(best round and median), and with --baseline the ratios to a run saved with --save.

Checks (the bench fails when one does not hold): one payment per invoice, succeeded, unflagged, not
held, applied after the snapshot; one payment.succeeded outbox row per invoice, keyed by it; every
event processed; a redelivery of stored events is a duplicate, and a new event of an already paid
session changes nothing (no second payment, no second outbox row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.invoice_cpu import quiet_stderr

AMOUNT = 12_000
SECRET = "whsec_bench_payments_cpu"
PATHS = ("intake", "worker", "snapshot")


class NoInvoiceService:
    """Every invoice is known from its copy; asking the invoice service would be a bug of the bench."""

    async def fetch(self, invoice_id: str) -> Any:
        raise AssertionError(f"invoice {invoice_id} was asked over HTTP")

    async def applied(self, invoice_id: str) -> list[tuple[str, str]]:
        raise AssertionError(f"ledger of {invoice_id} was asked over HTTP")


def _snapshot(invoice_id: str, client_id: str, *, paid: bool, cause_id: str | None = None) -> Any:
    from contracts.invoice import InvoiceSnapshotV1, InvoiceStatus

    return InvoiceSnapshotV1(
        id=invoice_id, invoice_number=None, status=InvoiceStatus.PAID if paid else InvoiceStatus.SENT, currency="EUR",
        client_id=client_id, client_name="Bench client", client_email="bench@example.com",
        subtotal=AMOUNT, discount_amount=0, tax_amount=0, total=AMOUNT,
        amount_paid=AMOUNT if paid else 0, amount_due=0 if paid else AMOUNT,
        issue_date=date.today(), due_date=date.today() + timedelta(days=30),
        version=3 if paid else 2, cause_id=cause_id,
    )


async def _prepare(db: Any, n: int, sessions: bool) -> list[dict[str, Any]]:
    """N invoice copies (and their open sessions); the Stripe events that pay them."""
    from sqlalchemy import insert

    from services.payments.models import CheckoutSession
    from services.payments.repository import Repository
    from services.payments.stripe import testing as stripe_events

    events: list[dict[str, Any]] = []
    async with db.transaction() as uow:
        repo = Repository(uow.session)
        rows = []
        for _ in range(n):
            invoice_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
            await repo.upsert_invoice(_snapshot(invoice_id, client_id, paid=False))
            session = stripe_events.checkout_session(invoice_id=invoice_id, client_id=client_id,
                                                     amount_total=AMOUNT, currency="eur")
            if sessions:
                rows.append({
                    "id": session["id"], "invoice_id": invoice_id, "client_id": client_id, "amount": AMOUNT,
                    "currency": "EUR", "status": "open", "payment_status": "unpaid", "url": "http://stripe.test",
                    "success_url": "http://portal.test/ok", "cancel_url": "http://portal.test/no",
                    "idempotency_key": f"checkout:{invoice_id}", "invoice_version": 2,
                    "expires_at": _in_a_day(), "last_event_created": 0,
                })
            events.append(stripe_events.build_event("checkout.session.completed", session))
        if rows:
            await uow.session.execute(insert(CheckoutSession), rows)
    return events


def _in_a_day() -> Any:
    from kit.clock import utcnow

    return utcnow() + timedelta(days=1)


async def _post(http: httpx.AsyncClient, event: dict[str, Any]) -> dict[str, Any]:
    from services.payments.stripe import testing as stripe_events

    body, headers = stripe_events.signed_request(event, SECRET)
    response = await http.post("/webhooks/stripe", content=body, headers=headers)
    if response.status_code != 200:
        raise SystemExit(f"webhook answered {response.status_code}: {response.text}")
    return response.json()  # type: ignore[no-any-return]


async def _round(http: httpx.AsyncClient, ctx: Any, n: int, sessions: bool) -> dict[str, float]:
    from sqlalchemy import select

    from services.payments.models import Payment
    from services.payments.service import apply_invoice_snapshot

    events = await _prepare(ctx.db, n, sessions)
    cpu: dict[str, float] = {}

    start = time.process_time()
    for event in events:
        ack = await _post(http, event)
        if ack["duplicate"] or ack["ignored"]:
            raise SystemExit(f"first delivery answered {ack}")
    cpu["intake"] = time.process_time() - start

    start = time.process_time()
    while await ctx.worker.run_once():
        pass
    cpu["worker"] = time.process_time() - start

    invoice_ids = [e["data"]["object"]["metadata"]["invoice_id"] for e in events]
    async with ctx.db.sessionmaker() as s:
        payments = {p.invoice_id: p for p in (await s.scalars(
            select(Payment).where(Payment.invoice_id.in_(invoice_ids)))).all()}
    if len(payments) != n:
        raise SystemExit(f"{len(payments)} payments for {n} invoices")
    start = time.process_time()
    for event in events:
        meta = event["data"]["object"]["metadata"]
        snap = _snapshot(meta["invoice_id"], meta["client_id"], paid=True,
                         cause_id=str(payments[meta["invoice_id"]].id))
        async with ctx.db.transaction() as uow:
            await apply_invoice_snapshot(uow, "invoice.paid", snap)
    cpu["snapshot"] = time.process_time() - start
    return {path: cpu[path] * 1000 / n for path in PATHS}


async def _checks(http: httpx.AsyncClient, ctx: Any, total: int, sessions: bool) -> dict[str, Any]:
    """Over every round's invoices: the guarantees, then a redelivery and a late second event."""
    from sqlalchemy import func, select

    from services.payments.models import CheckoutSession, OutboxMessage, Payment, StripeEvent
    from services.payments.stripe import testing as stripe_events

    async def counts() -> tuple[int, int]:
        async with ctx.db.sessionmaker() as s:
            n_payments = await s.scalar(select(func.count()).select_from(Payment))
            n_outbox = await s.scalar(select(func.count()).select_from(OutboxMessage)
                                      .where(OutboxMessage.event_type == "payment.succeeded"))
        return int(n_payments or 0), int(n_outbox or 0)

    async with ctx.db.sessionmaker() as s:
        payments = list((await s.scalars(select(Payment))).all())
        outbox_keys = list((await s.scalars(select(OutboxMessage.key)
                                            .where(OutboxMessage.event_type == "payment.succeeded"))).all())
        events = list((await s.scalars(select(StripeEvent))).all())
        complete = await s.scalar(select(func.count()).select_from(CheckoutSession)
                                  .where(CheckoutSession.status == "complete",
                                         CheckoutSession.stripe_payment_intent_id.is_not(None)))
    by_invoice = {p.invoice_id for p in payments}
    result: dict[str, Any] = {
        "payments": len(payments),
        "one_per_invoice": len(by_invoice) == len(payments) == total,
        "all_succeeded_unflagged_applied": all(
            p.status == "succeeded" and p.flags == [] and not p.held and p.amount == AMOUNT
            and p.applied_at is not None for p in payments),
        "outbox_one_per_invoice": sorted(outbox_keys) == sorted(by_invoice),
        "events_processed": all(e.status == "processed" for e in events) and len(events) == total,
        "sessions_complete": (complete == total) if sessions else True,
    }
    # Stripe redelivers (same event id) and sends a second event for the same session (new id).
    sample = [json.loads(e.payload) for e in events[:10]]
    before = await counts()
    with quiet_stderr():
        redelivered = [await _post(http, event) for event in sample]
        again = [stripe_events.build_event("checkout.session.completed", event["data"]["object"])
                 for event in sample]
        for event in again:
            await _post(http, event)
        while await ctx.worker.run_once():
            pass
    async with ctx.db.sessionmaker() as s:
        outcomes = list((await s.scalars(select(StripeEvent.outcome)
                                          .where(StripeEvent.id.in_([e["id"] for e in again])))).all())
    result["redelivery_duplicate"] = all(ack["duplicate"] for ack in redelivered)
    result["second_event_changes_nothing"] = (await counts() == before and len(outcomes) == len(again)
                                              and all((o or "").startswith("duplicate") for o in outcomes))
    result["ok"] = all(v for k, v in result.items() if k != "payments")
    return result


async def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    from services.payments.app import create_app
    from services.payments.config import PaymentsSettings

    settings = PaymentsSettings(database_url=database_url, kafka_enabled=False, log_json=True,
                                webhook_worker_enabled=False, stripe_webhook_secret=SECRET,
                                stripe_api_base="http://127.0.0.1:9", stripe_secret_key="sk_test_bench")
    with quiet_stderr():
        app = create_app(settings, invoice_reader=NoInvoiceService())
        async with app.router.lifespan_context(app):
            ctx = app.state.payments
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://payments") as http:
                await _round(http, ctx, args.warmup, args.sessions)
                rounds = [await _round(http, ctx, args.n, args.sessions) for _ in range(args.rounds)]
                checks = await _checks(http, ctx, args.warmup + args.n * args.rounds, args.sessions)
    figures: dict[str, Any] = {"n": args.n, "rounds": args.rounds, "sessions": args.sessions, "checks": checks}
    for path in (*PATHS, "total"):
        values = [sum(r.values()) if path == "total" else r[path] for r in rounds]
        figures[f"{path}_ms"] = {"best": min(values), "median": statistics.median(values), "all": values}
    return figures


def report(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    print(f"\n== payments CPU per checkout.session.completed event (n={result['n']} x {result['rounds']} rounds, "
          f"with sessions: {'yes' if result['sessions'] else 'no'})")
    for path in (*PATHS, "total"):
        fig = result[f"{path}_ms"]
        line = f"{path:8s} best {fig['best']:6.2f} ms  median {fig['median']:6.2f} ms"
        if baseline is not None:
            before = baseline[f"{path}_ms"]
            line += (f"   before: best {before['best']:6.2f} median {before['median']:6.2f}"
                     f"   after/before: best {fig['best'] / before['best']:5.1%}"
                     f" median {fig['median'] / before['median']:5.1%}")
        print(line)
    checks = result["checks"]
    print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.payments_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="events (one per invoice) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--no-sessions", dest="sessions", action="store_false",
                        help="no checkout_sessions rows (as python -m bench webhooks: events of sessions never "
                             "made here)")
    parser.add_argument("--database-url", help="a PostgreSQL server's asyncpg URL (a database is created on it)")
    parser.add_argument("--save", type=Path, help="write the figures as JSON here")
    parser.add_argument("--baseline", type=Path, help="a --save file of an earlier run: print the ratios")
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None

    from deploy.infra import RUN_DIR, PostgresServer, free_port, make_traversable

    workdir = RUN_DIR / f"bench-payments-cpu-{os.getpid()}"
    pg: PostgresServer | None = None
    db_name = f"payments_cpu_{os.getpid()}"
    try:
        if args.database_url:
            import asyncpg
            from sqlalchemy.engine import make_url

            server = make_url(args.database_url)

            async def create() -> None:
                conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False))
                try:
                    await conn.execute(f'CREATE DATABASE "{db_name}"')
                finally:
                    await conn.close()

            asyncio.run(create())
            database_url = server.set(database=db_name).render_as_string(hide_password=False)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            make_traversable(workdir)
            pg = PostgresServer(workdir / "pg", free_port(), fast=True)
            pg.ensure_installed()
            pg.start()
            database_url = pg.create_database(db_name)
        result = asyncio.run(run(args, database_url))
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(result, baseline)
    if args.save:
        args.save.write_text(json.dumps(result, indent=2))
    return 0 if result["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
