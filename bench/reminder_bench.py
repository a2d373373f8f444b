"""Reminder scan benchmark: 100,000 open invoices, the indexed scan against a naive full-table scan.

    python -m bench.reminder_bench                       # starts its own PostgreSQL and mail sink
    python -m bench.reminder_bench --invoices 20000 --send 1000
    python -m bench.reminder_bench --database-url postgresql+asyncpg://postgres@127.0.0.1:55432/postgres \
        --smtp-port 1025                                  # against `make run`'s servers

Measures, in one run and on the same data:
  1. finding the reminders due as of a day: the service's query (partial index on the due date of
     open invoices) against (a) the same SQL with index scans disabled and (b) the naive way, every
     invoice row loaded and checked in Python (schedule.reminder_due); the three results must agree;
  2. the whole scan (find + claim + queue), first day (catch-up) and next day (incremental);
  3. delivery: emails per second from the queue to the local SMTP sink (real SMTP, .eml files).
Target: the indexed find stays under 1 s at 100,000 open invoices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.report import current
from deploy.infra import RUN_DIR, MailSink, PostgresServer, free_port
from kit.db import Database
from kit.logging import configure_logging
from kit.migrations import upgrade_to_head
from services.notifications import repository as repo
from services.notifications.app import MIGRATIONS
from services.notifications.config import NotificationsSettings
from services.notifications.delivery import DeliveryWorker
from services.notifications.mailer import SmtpMailer
from services.notifications.models import InboxEvent, OutboxMessage
from services.notifications.schedule import reminder_due
from services.notifications.service import NotificationService

AS_OF = date(2026, 6, 15)
OPEN = ("SENT", "VIEWED", "PARTIAL", "OVERDUE")
CLOSED = ("PAID", "CANCELLED", "DRAFT")


class SeededStatuses:
    """The invoice service's word on OVERDUE for the bench: the seeded copies' statuses (it marks nothing)."""

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        return frozenset()


def say(message: str) -> None:
    print(message, flush=True)


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int = 1) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - started)
    return times, result


def count_eml(directory: Path | None) -> int:
    return len(list(directory.glob("*.eml"))) if directory else 0


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


# ------------------------------------------------------------------------------------------------
# data


def invoice_rows(n_open: int, n_closed: int, spread: int, rng: random.Random) -> list[tuple[Any, ...]]:
    rows = []
    for i in range(n_open + n_closed):
        status = rng.choice(OPEN) if i < n_open else rng.choice(CLOSED)
        due = AS_OF + timedelta(days=rng.randint(-spread, spread))
        issue = due - timedelta(days=rng.choice((14, 30, 30, 30, 45, 60)))
        total = rng.randint(10_00, 5_000_00)
        paid = total if status == "PAID" else (total // 2 if status == "PARTIAL" else 0)
        invoice_id = str(uuid.UUID(int=rng.getrandbits(128)))
        number = f"{due.year}-{i + 1:04d}"
        email = f"client{i % 5000}@clients.example.com"
        snapshot = {
            "id": invoice_id, "invoiceNumber": number, "status": status, "currency": "EUR",
            "clientId": f"client-{i % 5000}", "clientName": f"Client {i % 5000}", "clientEmail": email,
            "subtotal": total, "discountAmount": 0, "taxAmount": 0, "total": total, "amountPaid": paid,
            "amountDue": total - paid, "issueDate": issue.isoformat(), "dueDate": due.isoformat(), "version": 3,
        }
        rows.append((
            invoice_id, 3, status, number, "EUR", f"client-{i % 5000}", f"Client {i % 5000}", email,
            total, paid, total - paid, issue, due, None, json.dumps(snapshot),
        ))
    return rows


async def seed(dsn: str, rows: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "invoices",
            records=rows,
            columns=["id", "version", "status", "invoice_number", "currency", "client_id", "client_name",
                     "client_email", "total", "amount_paid", "amount_due", "issue_date", "due_date", "paid_at",
                     "snapshot"],
        )
        await conn.execute("ANALYZE invoices")
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------
# the three ways to find due reminders


async def find_indexed(db: Database, window: repo.ReminderWindow) -> set[tuple[str, str, int]]:
    async with db.unit_of_work() as uow:
        rows = await repo.find_due_reminders(uow.session, window, limit=10_000_000)
    return {(r.invoice_id, r.kind, r.sequence) for r in rows}


async def find_sql_without_index(db: Database, window: repo.ReminderWindow) -> set[tuple[str, str, int]]:
    async with db.unit_of_work() as uow:
        await uow.session.execute(text("SET LOCAL enable_indexscan = off"))
        await uow.session.execute(text("SET LOCAL enable_bitmapscan = off"))
        rows = await repo.find_due_reminders(uow.session, window, limit=10_000_000)
    return {(r.invoice_id, r.kind, r.sequence) for r in rows}


async def find_naive(db: Database, window: repo.ReminderWindow) -> set[tuple[str, str, int]]:
    """Every invoice row into Python, every reminder already sent into a set, then check each."""
    async with db.unit_of_work() as uow:
        invoices = (await uow.session.execute(
            text("SELECT id, status, amount_due, due_date, issue_date FROM invoices")
        )).all()
        done = {tuple(r) for r in (await uow.session.execute(
            text("SELECT invoice_id, kind, sequence FROM reminders")
        )).all()}
    found = set()
    for inv in invoices:
        due = reminder_due(
            window.as_of, status=inv.status, amount_due=inv.amount_due, due_date=inv.due_date,
            issue_date=inv.issue_date, days_before=window.days_before, repeat=window.repeat,
            max_notices=window.max_notices,
        )
        if due and (inv.id, *due) not in done:
            found.add((inv.id, *due))
    return found


async def explain(db: Database, window: repo.ReminderWindow, *, index: bool) -> tuple[str, float]:
    sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + str(repo._FIND_DUE_SQL.text)  # noqa: SLF001
    async with db.unit_of_work() as uow:
        if not index:
            await uow.session.execute(text("SET LOCAL enable_indexscan = off"))
            await uow.session.execute(text("SET LOCAL enable_bitmapscan = off"))
        plan = (await uow.session.execute(text(sql), {**window.params(), "limit": 10_000_000})).scalar()
    if isinstance(plan, str):
        plan = json.loads(plan)
    top = plan[0]
    nodes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "invoices":
            nodes.append(f"{node['Node Type']}" + (f" using {node['Index Name']}" if node.get("Index Name") else ""))
        for child in node.get("Plans", []):
            walk(child)

    walk(top["Plan"])
    return ", ".join(nodes) or top["Plan"]["Node Type"], float(top["Execution Time"]) / 1000


# ------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, database_url: str, smtp_host: str, smtp_port: int, mail_dir: Path | None
              ) -> dict[str, Any]:
    settings = NotificationsSettings(
        database_url=database_url, smtp_host=smtp_host, smtp_port=smtp_port, kafka_enabled=False,
        delivery_batch_size=args.batch, delivery_concurrency=args.concurrency, mail_from="billing@agency.example",
    )
    report: dict[str, Any] = {"invoices_open": args.invoices, "invoices_closed": args.closed, "as_of": str(AS_OF)}
    say(f"migrating {make_url(database_url).database} ...")
    await asyncio.to_thread(upgrade_to_head, MIGRATIONS, database_url)
    rng = random.Random(args.seed)
    rows = invoice_rows(args.invoices, args.closed, args.spread, rng)
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    started = time.perf_counter()
    await seed(dsn, rows)
    say(f"seeded {len(rows):,} invoices ({args.invoices:,} open) in {fmt(time.perf_counter() - started)}")
    rows.clear()

    db = Database(database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=args.concurrency + 2)
    service = NotificationService(settings, invoices=SeededStatuses())
    window = service.window(AS_OF)
    try:
        # 1. finding due reminders, three ways, same data.
        await find_indexed(db, window)  # warm the cache for every contender alike
        idx_times, idx = await timed(lambda: find_indexed(db, window), args.repeat)
        seq_times, seq = await timed(lambda: find_sql_without_index(db, window), args.repeat)
        naive_times, naive = await timed(lambda: find_naive(db, window), args.repeat)
        assert idx == seq == naive, f"results differ: indexed {len(idx)}, seq {len(seq)}, naive {len(naive)}"
        idx_plan, idx_exec = await explain(db, window, index=True)
        seq_plan, seq_exec = await explain(db, window, index=False)
        report["find"] = {
            "due_reminders": len(idx),
            "indexed_s": statistics.median(idx_times), "indexed_min_s": min(idx_times),
            "indexed_plan": idx_plan, "indexed_server_s": idx_exec,
            "sql_no_index_s": statistics.median(seq_times), "sql_no_index_plan": seq_plan,
            "sql_no_index_server_s": seq_exec,
            "naive_python_s": statistics.median(naive_times),
        }

        # 2. the whole scan: find + claim + queue (subjects rendered), then the next day.
        (scan1_s,), first = await timed(lambda: service.scan_reminders(db, AS_OF))
        next_window = service.window(AS_OF + timedelta(days=1))
        (idx_next_s,), next_due = await timed(lambda: find_indexed(db, next_window))
        (naive_next_s,), naive_next = await timed(lambda: find_naive(db, next_window))
        assert next_due == naive_next
        (scan2_s,), second = await timed(lambda: service.scan_reminders(db, AS_OF + timedelta(days=1)))
        (scan3_s,), third = await timed(lambda: service.scan_reminders(db, AS_OF + timedelta(days=1)))
        report["scan"] = {
            "first_day_created": len(first.created), "first_day_s": scan1_s,
            "next_day_find_indexed_s": idx_next_s, "next_day_find_naive_s": naive_next_s,
            "next_day_created": len(second.created), "next_day_s": scan2_s,
            "repeat_created": len(third.created), "repeat_s": scan3_s,
        }

        # 3. delivery to the SMTP sink.
        before = await asyncio.to_thread(count_eml, mail_dir)
        worker = DeliveryWorker(db, service, SmtpMailer(settings), None, settings)
        sent = 0
        started = time.perf_counter()
        while sent < args.send:
            handled = await worker.run_once()
            if handled == 0:
                break
            sent += handled
        elapsed = time.perf_counter() - started
        await worker.stop()
        async with db.unit_of_work() as uow:
            counts = dict((await uow.session.execute(
                text("SELECT status, count(*) FROM notifications GROUP BY status"))).all())
        delivered = (await asyncio.to_thread(count_eml, mail_dir) - before) if mail_dir else None
        report["delivery"] = {
            "handled": sent, "seconds": elapsed, "emails_per_s": sent / elapsed if elapsed else 0.0,
            "sink_files_written": delivered, "status_counts": counts,
            "smtp_connections": args.concurrency,
        }
    finally:
        await db.dispose()
    return report


def print_report(r: dict[str, Any]) -> None:
    f, s, d = r["find"], r["scan"], r["delivery"]
    rep = current("reminders")
    rep.figure("find due, indexed query", f["indexed_s"] * 1000, "ms")
    rep.figure("find due, naive full scan", f["naive_python_s"] * 1000, "ms")
    rep.ratio("naive / indexed", f["naive_python_s"], f["indexed_s"])
    rep.figure("scan first day", s["first_day_s"] * 1000, "ms")
    rep.figure("scan next day", s["next_day_s"] * 1000, "ms")
    rep.figure("delivery emails/s", d["emails_per_s"], "emails/s")
    rep.check("same day again queues nothing", s["repeat_created"] == 0, f"{s['repeat_created']} reminders")
    if d["sink_files_written"] is not None:
        rep.check("every handled message reached the sink once", d["sink_files_written"] == d["handled"],
                  f"{d['sink_files_written']} .eml files for {d['handled']} handled")
    say("")
    say(f"Reminder scan benchmark: {r['invoices_open']:,} open + {r['invoices_closed']:,} closed invoices, "
        f"as of {r['as_of']}")
    say("-" * 100)
    say(f"find due reminders ({f['due_reminders']:,} due; median of runs, client wall time incl. fetching rows)")
    say(f"  indexed query (service)         {fmt(f['indexed_s']):>12}   server {fmt(f['indexed_server_s']):>10}"
        f"   plan: {f['indexed_plan']}")
    say(f"  same SQL, index scans disabled  {fmt(f['sql_no_index_s']):>12}   server "
        f"{fmt(f['sql_no_index_server_s']):>10}   plan: {f['sql_no_index_plan']}")
    say(f"  naive full-table scan (Python)  {fmt(f['naive_python_s']):>12}   "
        f"({f['naive_python_s'] / f['indexed_s']:.0f}x the indexed query)")
    say(f"  target: indexed < 1 s -> {'MET' if f['indexed_s'] < 1 else 'MISSED'}")
    say("whole scan (find + claim + queue messages)")
    say(f"  first day (catch-up)            {fmt(s['first_day_s']):>12}   {s['first_day_created']:,} reminders")
    say(f"  next day: find indexed          {fmt(s['next_day_find_indexed_s']):>12}   naive "
        f"{fmt(s['next_day_find_naive_s'])}")
    say(f"  next day (incremental)          {fmt(s['next_day_s']):>12}   {s['next_day_created']:,} reminders")
    say(f"  same day again (idempotent)     {fmt(s['repeat_s']):>12}   {s['repeat_created']:,} reminders")
    say("delivery to the local SMTP sink (render + MIME + SMTP + record, each message its own transactions)")
    say(f"  {d['handled']:,} messages in {fmt(d['seconds'])} = {d['emails_per_s']:,.0f} emails/s "
        f"over {d['smtp_connections']} SMTP connections; sink wrote {d['sink_files_written']} .eml files; "
        f"status {d['status_counts']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reminder_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invoices", type=int, default=100_000, help="open invoices (default 100000)")
    parser.add_argument("--closed", type=int, default=50_000, help="paid/cancelled/draft invoices besides")
    parser.add_argument("--spread", type=int, default=180, help="due dates within +- this many days of as-of")
    parser.add_argument("--send", type=int, default=5_000, help="emails to deliver for the throughput figure")
    parser.add_argument("--batch", type=int, default=200, help="delivery claim batch size")
    parser.add_argument("--concurrency", type=int, default=4, help="SMTP connections")
    parser.add_argument("--repeat", type=int, default=5, help="runs per find variant (median reported)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--database-url", help="an existing server's URL (a bench database is created on it)")
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, help="an existing SMTP server (else a mail sink is started)")
    parser.add_argument("--fast", action="store_true", help="own PostgreSQL with fsync off")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the bench directory and database")
    args = parser.parse_args(argv)
    configure_logging("reminder-bench", "WARNING")

    workdir = RUN_DIR / f"bench-reminders-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    pg: PostgresServer | None = None
    sink: MailSink | None = None
    db_name = f"reminder_bench_{os.getpid()}"
    try:
        if args.database_url:
            server_url = make_url(args.database_url)
            admin_dsn = server_url.set(drivername="postgresql").render_as_string(hide_password=False)

            async def create() -> None:
                conn = await asyncpg.connect(admin_dsn)
                try:
                    await conn.execute(f'CREATE DATABASE "{db_name}"')
                finally:
                    await conn.close()

            asyncio.run(create())
            database_url = server_url.set(database=db_name).render_as_string(hide_password=False)
        else:
            from deploy.infra import make_traversable

            make_traversable(workdir)
            pg = PostgresServer(workdir / "pg", free_port(), fast=args.fast)
            pg.ensure_installed()
            pg.start()
            database_url = pg.create_database(db_name)
        mail_dir: Path | None = None
        if args.smtp_port:
            smtp_port = args.smtp_port
        else:
            sink = MailSink(workdir / "mail", free_port(), log_path=workdir / "mailsink.log")
            sink.start()
            smtp_port, mail_dir = sink.port, sink.directory
        report = asyncio.run(run(args, database_url, args.smtp_host, smtp_port, mail_dir))
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
        return 0
    finally:
        if sink is not None:
            sink.stop()
        if pg is not None:
            pg.stop()
        if args.database_url and not args.keep:
            async def drop() -> None:
                conn = await asyncpg.connect(admin_dsn)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
                finally:
                    await conn.close()

            asyncio.run(drop())
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
