"""Issue 13: CPU time per invoice create and per send in the invoice service, measured in process.

    python -m bench.invoice_cpu [--n 300] [--rounds 3] [--against DIR] [--save FILE] [--baseline FILE]

The invoice app (services.invoice.app.create_app) runs in a worker process on a real PostgreSQL
(its own server with fsync off, or --database-url's server), called through httpx.ASGITransport, one
request at a time. Kafka is off (no relay, no consumers): the figures are the request path's own
CPU, which is what the create and send code decides; the outbox rows are still written in each
transaction. The service logs as in production (JSON, INFO), into /dev/null.

Each round: N creates (the invoice bench's two-line body), then a send of each of them, timed with
time.process_time (CPU of the worker process, every thread): the machine is shared, so wall time
would measure the neighbours. The client side (httpx building the request and parsing the answer)
is in the figure too; it is the same before and after a change, so ratios understate the gain.

`--against DIR`: DIR is another checkout of the repository (the code before a change, e.g.
`git archive <commit> | tar -x -C DIR`); a worker of each tree runs on the same PostgreSQL server
and they take turns every `--batch` requests, so both see the same load from the rest of the
machine (on a busy 2-core machine CPU time per request moves by +-10% from one minute to the next;
measured one after the other, a change of that size cannot be told from noise). Printed: CPU ms per
create and per send of this tree (and DIR's, and this/DIR), best round and median; in brackets the
median's system time (mostly the kernel's side of the round trips to PostgreSQL). `--save` writes
the figures as JSON; `--baseline FILE` prints the ratios to such a file of an earlier run. Checks:
every create 201 with the total computed by hand, every send 200, invoice numbers 1..n per tree
without gap or repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
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
FIGURES = ("create_ms", "send_ms", "create_sys_ms", "send_sys_ms")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def _cpu() -> tuple[float, float]:
    """(CPU seconds, of which system) of this process."""
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime


class Worker:
    """The invoice app in this process; creates and sends on command, timing its own CPU."""

    def __init__(self, http: httpx.AsyncClient, client_id: str, idempotency: bool) -> None:
        self.http = http
        self.client_id = client_id
        self.idempotency = idempotency
        self.unsent: list[str] = []

    def _headers(self) -> dict[str, str] | None:
        return {"Idempotency-Key": uuid.uuid4().hex} if self.idempotency else None

    async def create(self, k: int) -> tuple[float, float]:
        start, start_sys = _cpu()
        for _ in range(k):
            created = await self.http.post("/api/invoices", json={"clientId": self.client_id, "items": ITEMS},
                                           headers=self._headers())
            if created.status_code != 201:
                raise SystemExit(f"create answered {created.status_code}: {created.text}")
            body = created.json()
            if body["total"] != EXPECTED_TOTAL:
                raise SystemExit(f"create total {body['total']}, expected {EXPECTED_TOTAL}")
            self.unsent.append(body["id"])
        end, end_sys = _cpu()
        return end - start, end_sys - start_sys

    async def send(self, k: int) -> tuple[float, float]:
        batch, self.unsent = self.unsent[:k], self.unsent[k:]
        start, start_sys = _cpu()
        for invoice_id in batch:
            sent = await self.http.post(f"/api/invoices/{invoice_id}/send", headers=self._headers())
            if sent.status_code != 200 or sent.json()["status"] != "SENT":
                raise SystemExit(f"send answered {sent.status_code}: {sent.text}")
        end, end_sys = _cpu()
        return end - start, end_sys - start_sys


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


async def serve_worker(database_url: str, warmup: int, idempotency: bool) -> None:
    """`--worker`: answer commands on stdin ("create K", "send K", "quit") with JSON lines on stdout."""
    from services.invoice.app import create_app
    from services.invoice.config import InvoiceSettings

    settings = InvoiceSettings(database_url=database_url, kafka_enabled=False, log_json=True,
                               overdue_scan_interval=3600)
    loop = asyncio.get_running_loop()
    with quiet_stderr():
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://invoice", headers=ADMIN) as http:
                made = await http.post("/api/clients", json={"name": "Bench client", "email": "bench@example.com",
                                                             "currency": "EUR"})
                made.raise_for_status()
                worker = Worker(http, made.json()["id"], idempotency)
                await worker.create(warmup)
                await worker.send(warmup)
                print(json.dumps({"ready": True}), flush=True)
                while True:
                    command = (await loop.run_in_executor(None, sys.stdin.readline)).split()
                    if not command or command[0] == "quit":
                        break
                    cpu, system = await (worker.create if command[0] == "create" else worker.send)(int(command[1]))
                    print(json.dumps({"cpu": cpu, "sys": system}), flush=True)
    numbered, gapless = await _numbers_gapless(database_url)
    print(json.dumps({"numbered": numbered, "gapless": gapless}), flush=True)


class WorkerProcess:
    def __init__(self, tree: Path, database_url: str, args: argparse.Namespace) -> None:
        # This file runs the worker in either tree (the tree before a change may not have it); the
        # tree's own code comes first on the path (-c: the working directory, then PYTHONPATH).
        options = ["--worker", "--database-url", database_url, "--warmup", str(args.warmup),
                   *(["--idempotency"] if args.idempotency else [])]
        run = (f"import runpy, sys; sys.argv = {[__file__, *options]!r}; "
               f"runpy.run_path({__file__!r}, run_name='__main__')")
        argv = [sys.executable, "-c", run]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.tree = tree
        self.proc = subprocess.Popen(argv, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker of {self.tree} ended (exit {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> dict[str, Any]:
        checks = self.ask("quit")
        self.proc.wait(timeout=60)
        return checks


def measure(workers: list[WorkerProcess], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rounds of N creates then N sends per worker, the workers taking turns every `batch` requests."""
    for worker in workers:
        worker.ask("")  # ready
    rounds: list[list[tuple[float, ...]]] = [[] for _ in workers]
    for _ in range(args.rounds):
        totals = [[0.0] * 4 for _ in workers]
        for phase, offset in (("create", 0), ("send", 1)):
            done = 0
            while done < args.n:
                k = min(args.batch, args.n - done)
                order = list(range(len(workers)))
                random.shuffle(order)
                for index in order:
                    answer = workers[index].ask(f"{phase} {k}")
                    totals[index][offset] += answer["cpu"]
                    totals[index][offset + 2] += answer["sys"]
                done += k
        for index, total in enumerate(totals):
            rounds[index].append(tuple(seconds * 1000 / args.n for seconds in total))
    results = []
    for worker, per_round in zip(workers, rounds, strict=True):
        checks = worker.close()
        result: dict[str, Any] = {"tree": str(worker.tree), "n": args.n, "rounds": args.rounds,
                                  "idempotency_key": args.idempotency, "checks": checks}
        for index, name in enumerate(FIGURES):
            values = [r[index] for r in per_round]
            result[name] = {"best": min(values), "median": statistics.median(values), "all": values}
        results.append(result)
    return results


def _line(name: str, fig: dict[str, Any], system: dict[str, Any]) -> str:
    return f"{name:7s} best {fig['best']:6.2f} ms  median {fig['median']:6.2f} ms  (system {system['median']:5.2f})"


def report(result: dict[str, Any], other: dict[str, Any] | None, baseline: dict[str, Any] | None) -> None:
    print(f"\n== invoice service CPU per request (n={result['n']} x {result['rounds']} rounds, "
          f"Idempotency-Key: {'yes' if result['idempotency_key'] else 'no'})")
    for phase in ("create", "send"):
        name, system = f"{phase}_ms", f"{phase}_sys_ms"
        print(_line(phase, result[name], result[system]) + "   this tree")
        for label, before in (("--against", other), ("--baseline", baseline)):
            if before is None:
                continue
            print(_line(phase, before[name], before[system]) + f"   {label}: {before.get('tree', '')}")
            ratios = [a / b for a, b in zip(result[name]["all"], before[name]["all"], strict=False)]
            print(f"{'':7s} this / {label.removeprefix('--')}: best {result[name]['best'] / before[name]['best']:6.1%}"
                  f"  median {result[name]['median'] / before[name]['median']:6.1%}"
                  + (f"  per round {', '.join(f'{r:.0%}' for r in ratios)}" if label == "--against" else ""))
    for res in (result, other):
        if res is not None:
            checks = res["checks"]
            print(f"checks ({res['tree']}): {checks['numbered']} invoices numbered, gapless: {checks['gapless']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invoice_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="creates (and sends) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20, help="requests a worker makes before the other's turn")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--idempotency", action="store_true", help="send an Idempotency-Key on every POST")
    parser.add_argument("--against", type=Path, help="another checkout of the repository to measure beside this one")
    parser.add_argument("--database-url", help="a PostgreSQL server's asyncpg URL (databases are created on it)")
    parser.add_argument("--save", type=Path, help="write this tree's figures as JSON here")
    parser.add_argument("--baseline", type=Path, help="a --save file of an earlier run: print the ratios")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(serve_worker(args.database_url, args.warmup, args.idempotency))
        return 0
    saved = json.loads(args.baseline.read_text()) if args.baseline else None
    baseline = saved["this"] if saved else None

    from deploy.infra import REPO_ROOT, RUN_DIR, PostgresServer, free_port, make_traversable

    workdir = RUN_DIR / f"bench-invoice-cpu-{os.getpid()}"
    pg: PostgresServer | None = None
    names = [f"invoice_cpu_{os.getpid()}_{i}" for i in range(2 if args.against else 1)]
    workers: list[WorkerProcess] = []
    try:
        if args.database_url:
            import asyncpg
            from sqlalchemy.engine import make_url

            server = make_url(args.database_url)

            async def create() -> None:
                conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False))
                try:
                    for name in names:
                        await conn.execute(f'CREATE DATABASE "{name}"')
                finally:
                    await conn.close()

            asyncio.run(create())
            urls = [server.set(database=name).render_as_string(hide_password=False) for name in names]
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            make_traversable(workdir)
            pg = PostgresServer(workdir / "pg", free_port(), fast=True)
            pg.ensure_installed()
            pg.start()
            urls = [pg.create_database(name) for name in names]
        trees = [REPO_ROOT, *([args.against.resolve()] if args.against else [])]
        workers = [WorkerProcess(tree, url, args) for tree, url in zip(trees, urls, strict=True)]
        results = measure(workers, args)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result, other = results[0], (results[1] if args.against else None)
    report(result, other, baseline)
    if args.save:
        args.save.write_text(json.dumps({"this": result, "against": other}, indent=2))
    return 0 if all(r["checks"]["gapless"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
