"""Issue 13: CPU time per invoice create and per send in the invoice service, measured in process.

    python -m bench.invoice_cpu [--n 300] [--rounds 3] [--save FILE] [--baseline FILE]

The invoice app (services.invoice.app.create_app) runs in this process on a real PostgreSQL (its own
server with fsync off, or --database-url's server), called through httpx.ASGITransport, one request
at a time. Kafka is off (no relay, no consumers): the figures are the request path's own CPU, which
is what the create and send code decides; the outbox rows are still written in each transaction.

Each round: N creates (the bench's two-line body), then a send of each of them, timed with
time.process_time (CPU of this process, every thread): the machine is shared, so wall time would
measure the neighbours. The client side (httpx building the request and parsing the answer) is in
the figure too; it is the same before and after a change, so ratios understate the service's gain.
Printed: CPU ms per create and per send (the best round and the median), and with --baseline the
ratios to a run saved with --save. Checks: every create 201, every send 200, totals as computed by
hand, the invoice numbers 1..n without gap or repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ITEMS = [
    {"description": "Design sprint", "quantity": "3", "unitPrice": 45_000, "taxRate": "20"},
    {"description": "Hosting (monthly)", "quantity": "1", "unitPrice": 2_900},
]
EXPECTED_TOTAL = 3 * 45_000 + 2_900 + 27_000  # 20% tax on the first line only
ADMIN = {"X-Actor-Role": "admin", "X-Actor-User-Id": "bench"}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The service logs as it would in production (JSON, INFO: one access line per request), into
    /dev/null: the rendering cost stays in the figure, the terminal stays readable."""
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


async def _round(http: httpx.AsyncClient, client_id: str, n: int, idempotency: bool) -> tuple[float, float]:
    ids: list[str] = []
    start = time.process_time()
    for _ in range(n):
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotency else None
        created = await http.post("/api/invoices", json={"clientId": client_id, "items": ITEMS}, headers=headers)
        if created.status_code != 201:
            raise SystemExit(f"create answered {created.status_code}: {created.text}")
        body = created.json()
        if body["total"] != EXPECTED_TOTAL:
            raise SystemExit(f"create total {body['total']}, expected {EXPECTED_TOTAL}")
        ids.append(body["id"])
    created_cpu = time.process_time() - start
    start = time.process_time()
    for invoice_id in ids:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotency else None
        sent = await http.post(f"/api/invoices/{invoice_id}/send", headers=headers)
        if sent.status_code != 200 or sent.json()["status"] != "SENT":
            raise SystemExit(f"send answered {sent.status_code}: {sent.text}")
    sent_cpu = time.process_time() - start
    return created_cpu * 1000 / n, sent_cpu * 1000 / n


async def _numbers_gapless(database_url: str) -> tuple[int, bool]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT number_year, number_seq FROM invoices WHERE number_seq IS NOT NULL "
                "ORDER BY number_year, number_seq"))).all()
    finally:
        await engine.dispose()
    by_year: dict[int, list[int]] = {}
    for year, seq in rows:
        by_year.setdefault(year, []).append(seq)
    return len(rows), all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_year.values())


async def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    from services.invoice.app import create_app
    from services.invoice.config import InvoiceSettings

    settings = InvoiceSettings(database_url=database_url, kafka_enabled=False, log_json=True,
                               overdue_scan_interval=3600)
    with quiet_stderr():
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://invoice", headers=ADMIN) as http:
                made = await http.post("/api/clients", json={"name": "Bench client", "email": "bench@example.com",
                                                             "currency": "EUR"})
                made.raise_for_status()
                client_id = made.json()["id"]
                await _round(http, client_id, args.warmup, args.idempotency)
                rounds = [await _round(http, client_id, args.n, args.idempotency) for _ in range(args.rounds)]
    sent, gapless = await _numbers_gapless(database_url)
    creates, sends = [r[0] for r in rounds], [r[1] for r in rounds]
    return {
        "n": args.n, "rounds": args.rounds, "idempotency_key": args.idempotency,
        "create_ms": {"best": min(creates), "median": statistics.median(creates), "all": creates},
        "send_ms": {"best": min(sends), "median": statistics.median(sends), "all": sends},
        "checks": {"numbers": sent, "gapless": gapless},
    }


def report(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    print(f"\n== invoice service CPU per request (n={result['n']} x {result['rounds']} rounds, "
          f"Idempotency-Key: {'yes' if result['idempotency_key'] else 'no'})")
    for name in ("create_ms", "send_ms"):
        fig = result[name]
        line = f"{name.removesuffix('_ms'):7s} best {fig['best']:6.2f} ms  median {fig['median']:6.2f} ms"
        if baseline is not None:
            before = baseline[name]
            line += (f"   before: best {before['best']:6.2f} median {before['median']:6.2f}"
                     f"   after/before: best {fig['best'] / before['best']:5.1%}"
                     f" median {fig['median'] / before['median']:5.1%}")
        print(line)
    checks = result["checks"]
    print(f"checks: {checks['numbers']} invoices numbered, gapless: {checks['gapless']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invoice_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="creates (and sends) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--idempotency", action="store_true", help="send an Idempotency-Key on every POST")
    parser.add_argument("--database-url", help="a PostgreSQL server's asyncpg URL (a database is created on it)")
    parser.add_argument("--save", type=Path, help="write the figures as JSON here")
    parser.add_argument("--baseline", type=Path, help="a --save file of an earlier run: print the ratios")
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None

    from deploy.infra import RUN_DIR, PostgresServer, free_port, make_traversable

    workdir = RUN_DIR / f"bench-invoice-cpu-{os.getpid()}"
    pg: PostgresServer | None = None
    db_name = f"invoice_cpu_{os.getpid()}"
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
    return 0 if result["checks"]["gapless"] else 1


if __name__ == "__main__":
    sys.exit(main())
