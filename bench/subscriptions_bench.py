"""Issue 9 benchmark: a month of renewals over N active subscriptions, and the plan-change preview.

    python -m bench.subscriptions_bench [--subscriptions 10000 | --small] [--concurrency 16] [--duration 10]

Starts Postgres (fsync on), Kafka, stripe-mock, the Stripe stand-in (deploy/stripe_standin, its own
process, in front of stripe-mock: the services' STRIPE_API_BASE, delivering signed webhooks to payments),
the invoice, payments and subscriptions services and the gateway (the launch path of `make run`), and a
bare FastAPI endpoint.

Setup, timed apart: two monthly EUR plans through the gateway (the subscriptions service creates their
prices in Stripe), the platform's test clock, N clients in the invoice service, and for each client a
Stripe customer on the platform's clock (metadata.client_id) with a subscription to the first plan's
price, made straight through the Stripe SDK against the stand-in (metadata as the subscriptions service
sets it). The webhook path mirrors them, and their first invoices become ours (numbered, PAID).

Then:

* change preview: GET /api/subscriptions/{id}/change-preview (an upgrade, a random subscription each
  call) through the gateway at a fixed concurrency, against a bare GET endpoint and the stand-in's own
  POST /v1/invoices/create_preview (which the preview calls) in the same run: req/s, p50/p99, ratios;
* renewals: POST /api/test-clock/advance by one month through the gateway; the time until all N renewal
  invoices are numbered (invoice.sent) and PAID (invoice.paid on Kafka, committed by the invoice service)
  and invoices/s, with the stand-in's share: the time it took to emit every event (the advance runs
  synchronously in its single process) and to deliver them (one worker per endpoint, as Stripe);
* lost / doubled (must be 0): exactly one PAID invoice of ours per Stripe renewal invoice with amountPaid
  == total, invoice numbers without gap or repeat, one card payment each in the payments database, one
  invoice.paid and one payment.succeeded each on Kafka, one subscription.renewed per subscription;
* CPU seconds of every process of the stack in each phase: what limits the throughput.

`--small` is a run with 200 subscriptions and 5 s preview phases. Prints figures; the exit code is 1 only
when an invoice was lost or doubled (or the run did not finish within --timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import stripe
from aiokafka import AIOKafkaConsumer
from fastapi import FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.report import current
from bench.stack import LoadResult, Stack, percentile, run_load, running_stack
from bench.webhook_bench import fixed_load
from deploy.infra import REPO_ROOT, ServiceProcess, StripeStandin, free_port
from deploy.stripe_standin.webhooks import SIGNATURE_HEADER, sign
from kit.actor import INTERNAL_TOKEN_HEADER, ROLE_HEADER

BASIC_AMOUNT = 30_000  # EUR 300.00 a month
PLUS_AMOUNT = 60_000
SERVICES = ("invoice", "payments", "subscriptions", "gateway")
RELAY_TARGET_ENV, RELAY_CONCURRENCY_ENV = "BENCH_RELAY_TARGET", "BENCH_RELAY_CONCURRENCY"


def say(message: str) -> None:
    print(message, flush=True)


# -- what each process of the stack spends ------------------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system) per role, read from /proc: a started process and everything in its
    session (all are spawned with a session of their own), Postgres' postmaster and its backends, and
    this process."""

    def __init__(self, sessions: dict[str, int], postmaster: int | None) -> None:
        self.sessions = {pid: role for role, pid in sessions.items()}
        self.postmaster = postmaster
        self.own = os.getpid()
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, CPU seconds so far) of every process of the stack."""
        out: dict[int, tuple[str, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = raw.rsplit(")", 1)[1].split()
            pid, ppid, session = int(entry.name), int(fields[1]), int(fields[3])
            if self.postmaster is not None and self.postmaster in (pid, ppid):
                role: str | None = "postgres"
            elif pid == self.own:
                role = "bench"
            else:
                role = self.sessions.get(session)
            if role is not None:
                out[pid] = (role, (int(fields[11]) + int(fields[12])) / self.tick)
        return out

    @staticmethod
    def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU seconds per role between two samples (a process that ended in between is not counted)."""
        out: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            out[role] = out.get(role, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
        return out


def _pid_of_cmdline(*needles: str) -> int | None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if all(n in cmdline for n in needles):
                return int(entry.name)
    return None


def cpu_table(phases: list[tuple[str, float, dict[str, float]]]) -> list[str]:
    """Per phase (label, wall seconds, CPU seconds by role): the busiest processes, as % of one core."""
    lines = []
    for label, wall, used in phases:
        busiest = sorted(used.items(), key=lambda kv: -kv[1])
        total = sum(used.values())
        parts = ", ".join(f"{role} {secs:.1f} s ({secs / wall:.0%})" for role, secs in busiest if secs >= 0.05)
        lines.append(f"  {label} ({wall:.1f} s wall, {total:.1f} CPU s = {total / wall:.2f} cores): {parts}")
    return lines


# -- the stand-in, raw (the knobs, and Stripe calls whose cost is measured, without the SDK's overhead) ------
class Standin:
    def __init__(self, url: str, key: str, relay_url: str | None) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600, connect=10), trust_env=False,
                                      headers={"Authorization": f"Bearer {key}"},
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.relay_url = relay_url

    async def pending(self) -> int:
        """Deliveries not yet answered 2xx by payments: the stand-in's queue, and the relay's (--fan-out)."""
        pending = int((await self.http.get("/_standin/deliveries/pending")).raise_for_status().json()["pending"])
        if self.relay_url:
            relayed = await self.http.get(f"{self.relay_url}/pending")
            pending += int(relayed.raise_for_status().json()["pending"])
        return pending

    async def configure(self, **knobs: Any) -> None:
        (await self.http.post("/_standin/config", json=knobs)).raise_for_status()

    async def clock(self, clock_id: str) -> dict[str, Any]:
        return dict((await self.http.get(f"/v1/test_helpers/test_clocks/{clock_id}")).raise_for_status().json())

    async def invoices(self) -> list[dict[str, Any]]:
        """Every invoice the stand-in holds (Stripe's list, 100 a page)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = (await self.http.get("/v1/invoices", params=params)).raise_for_status().json()
            out.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                return out
            params["starting_after"] = page["data"][-1]["id"]

    async def aclose(self) -> None:
        await self.http.aclose()


# -- Stripe's concurrent delivery (--fan-out) --------------------------------------------------------------------
def relay_app(target: str, secret: str, concurrency: int) -> FastAPI:
    """Takes the stand-in's deliveries (it posts one at a time, in order, waiting for each answer) and
    delivers each to `target` with up to `concurrency` in flight, signed afresh and retried until a 2xx:
    as Stripe delivers, concurrently, in no particular order, at least once."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    counts = {"in_flight": 0, "forwarded": 0, "retries": 0}

    async def worker(http: httpx.AsyncClient) -> None:
        while True:
            body = await queue.get()
            counts["in_flight"] += 1
            attempt = 0
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.post(target, content=body, headers={
                        SIGNATURE_HEADER: sign(body, secret), "Content-Type": "application/json; charset=utf-8"})
                    if response.is_success:
                        break
                attempt += 1
                counts["retries"] += 1
                await asyncio.sleep(min(0.1 * 2 ** attempt, 5.0))
            counts["in_flight"] -= 1
            counts["forwarded"] += 1

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30, trust_env=False, limits=limits) as http:
            tasks = [asyncio.create_task(worker(http)) for _ in range(concurrency)]
            yield
            for task in tasks:
                task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/relay")
    async def take(request: Request) -> dict[str, bool]:
        queue.put_nowait(await request.body())
        return {"received": True}

    @app.get("/pending")
    async def pending() -> dict[str, int]:
        return {"pending": queue.qsize() + counts["in_flight"], **counts}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_relay(port: int) -> int:
    import uvicorn

    app = relay_app(os.environ[RELAY_TARGET_ENV], os.environ["STRIPE_WEBHOOK_SECRET"],
                    int(os.environ[RELAY_CONCURRENCY_ENV]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


def start_relay(stack: Stack, concurrency: int) -> ServiceProcess:
    port = free_port()
    env = {**os.environ, RELAY_TARGET_ENV: stack.endpoints.stripe_webhook_url,
           RELAY_CONCURRENCY_ENV: str(concurrency), "STRIPE_WEBHOOK_SECRET": stack.endpoints.stripe_webhook_secret,
           "PYTHONPATH": str(REPO_ROOT)}
    relay = ServiceProcess("relay", [sys.executable, "-m", "bench.subscriptions_bench", "--serve-relay", str(port)],
                           env=env, port=port, log_path=stack.root / "logs" / "relay.log")
    relay.start()
    return relay


# -- setup ----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    plan_price_id: str  # our price ids (uuid strings)
    upgrade_price_id: str
    stripe_price_id: str
    upgrade_stripe_price_id: str
    clock_id: str
    subscriptions: list[dict[str, Any]] = field(default_factory=list)  # our mirror rows
    timings: list[tuple[str, float, int]] = field(default_factory=list)  # (what, seconds, count)


async def admin_client(stack: Stack, concurrency: int) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=stack.url("gateway"), timeout=httpx.Timeout(3600, connect=10),
                             limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
    login = await http.post("/api/auth/login", json={"email": "admin@example.com",
                                                     "password": stack.endpoints.admin_password})
    login.raise_for_status()
    http.headers["Authorization"] = f"Bearer {login.json()['accessToken']}"
    return http


async def create_plans(admin: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan everyone is on and the one the preview upgrades to, made through the gateway."""
    prices = []
    for name, amount in (("Maintenance retainer", BASIC_AMOUNT), ("Maintenance retainer plus", PLUS_AMOUNT)):
        tag = uuid.uuid4().hex[:8]
        response = await admin.post("/api/plans", headers={"Idempotency-Key": f"bench-plan-{tag}"}, json={
            "name": name, "description": "Bench plan", "features": ["Monthly updates"],
            "prices": [{"currency": "EUR", "amount": amount, "interval": "month", "lookupKey": f"bench_{tag}"}]})
        response.raise_for_status()
        [price] = response.json()["prices"]
        prices.append(price)
    return prices[0], prices[1]


async def platform_clock(admin: httpx.AsyncClient) -> dict[str, Any]:
    """The platform's test clock (created by its first advance: a few seconds forward)."""
    current = (await admin.get("/api/test-clock")).raise_for_status().json()
    if not current["id"]:
        to = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
        (await admin.post("/api/test-clock/advance", json={"to": to},
                          headers={"Idempotency-Key": f"bench-clock-{uuid.uuid4().hex}"})).raise_for_status()
        current = (await admin.get("/api/test-clock")).raise_for_status().json()
    return dict(current)


async def create_clients(stack: Stack, count: int, concurrency: int) -> list[str]:
    """Real clients of the invoice service, straight on it as the system actor."""
    headers = {ROLE_HEADER: "admin", INTERNAL_TOKEN_HEADER: stack.endpoints.internal_token}
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=stack.url("invoice"), headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(i: int) -> None:
            response = await http.post("/api/clients", json={
                "name": f"Retainer client {i:05d}", "email": f"client{i:05d}@retainer.example.com",
                "currency": "EUR"})
            response.raise_for_status()
            ids.append(response.json()["id"])

        result = await fixed_load("create clients (invoice service)", list(range(count)), one, concurrency)
    say(f"  {result.line('client')}")
    if result.errors:
        raise RuntimeError("could not create the clients")
    return ids


async def create_stripe_subscriptions(sdk: stripe.StripeClient, client_ids: list[str], setup: Setup,
                                      plan_id: str, concurrency: int) -> LoadResult:
    """Per client a customer on the platform's clock and a monthly subscription, through the SDK."""
    done = 0
    step = max(len(client_ids) // 10, 1)

    async def one(client_id: str) -> None:
        nonlocal done
        customer = await sdk.v1.customers.create_async(params={
            "name": f"Client {client_id[:8]}", "email": f"{client_id[:8]}@retainer.example.com",
            "metadata": {"client_id": client_id, "platform": "billing"}, "test_clock": setup.clock_id})
        await sdk.v1.subscriptions.create_async(params={
            "customer": customer.id, "items": [{"price": setup.stripe_price_id, "quantity": 1}],
            "collection_method": "charge_automatically",
            "metadata": {"client_id": client_id, "plan_id": plan_id, "price_id": setup.plan_price_id}})
        done += 1
        if done % step == 0:
            say(f"  ... {done}/{len(client_ids)} customers + subscriptions in the stand-in")

    return await fixed_load("customer + subscription (SDK -> stand-in)", client_ids, one, concurrency)


async def count(url: str, sql: str, **params: Any) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text(sql), params)).scalar_one())
    finally:
        await engine.dispose()


async def rows(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [dict(r._mapping) for r in (await conn.execute(text(sql), params)).all()]
    finally:
        await engine.dispose()


async def wait_settled(stack: Stack, standin: Standin, n: int, timeout: float) -> None:
    """Until the stand-in delivered everything, N subscriptions are mirrored active and N first invoices
    of ours are PAID."""
    dbs = stack.endpoints.database_urls
    deadline = time.monotonic() + timeout
    last = -1.0
    while True:
        pending = await standin.pending()
        active = await count(dbs["subscriptions"], "SELECT count(*) FROM subscriptions WHERE status = 'active'")
        paid = await count(dbs["invoice"], "SELECT count(*) FROM invoices WHERE stripe_invoice_id IS NOT NULL "
                                           "AND status = 'PAID'")
        if pending == 0 and active >= n and paid >= n:
            return
        if time.monotonic() - last >= 5:
            say(f"  ... settling: {pending} deliveries pending, {active}/{n} mirrored active, "
                f"{paid}/{n} first invoices PAID")
            last = time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"setup did not settle in {timeout:.0f} s: {pending} pending, {active}/{n} active, "
                               f"{paid}/{n} paid")
        await asyncio.sleep(1.0)


async def set_up(stack: Stack, admin: httpx.AsyncClient, sdk: stripe.StripeClient, standin: Standin,
                 args: argparse.Namespace) -> Setup:
    n = args.subscriptions
    began = time.monotonic()
    basic, plus = await create_plans(admin)
    clock = await platform_clock(admin)
    setup = Setup(plan_price_id=basic["id"], upgrade_price_id=plus["id"], stripe_price_id=basic["stripePriceId"],
                  upgrade_stripe_price_id=plus["stripePriceId"], clock_id=clock["id"])
    setup.timings.append(("2 plans (prices in Stripe) + the platform's test clock", time.monotonic() - began, 2))
    say(f"  plans made, test clock {clock['id']} at {clock['frozenTime']}")

    began = time.monotonic()
    client_ids = await create_clients(stack, n, args.concurrency)
    setup.timings.append(("clients in the invoice service", time.monotonic() - began, n))

    say(f"creating {n} customers and subscriptions in the stand-in through the SDK...")
    began = time.monotonic()
    created = await create_stripe_subscriptions(sdk, client_ids, setup, basic["planId"], args.setup_concurrency)
    setup.timings.append(("customers + subscriptions through the SDK", time.monotonic() - began, n))
    say(f"  {created.line('sub')}")
    if created.errors:
        raise RuntimeError("could not create the subscriptions")

    say("waiting for the webhooks to mirror them and their first invoices to be PAID...")
    began = time.monotonic()
    await wait_settled(stack, standin, n, timeout=args.timeout)
    setup.timings.append(("mirrored + first invoices PAID, after the last create", time.monotonic() - began, 0))
    setup.subscriptions = await rows(
        stack.endpoints.database_urls["subscriptions"],
        "SELECT id, stripe_subscription_id, stripe_customer_id, stripe_item_id, current_period_start, "
        "current_period_end FROM subscriptions WHERE status = 'active' AND price_id = CAST(:price AS uuid)",
        price=basic["id"])
    if len(setup.subscriptions) != n:
        raise RuntimeError(f"{len(setup.subscriptions)} active subscriptions mirrored, expected {n}")
    return setup


# -- change preview ---------------------------------------------------------------------------------------------
async def measure_previews(stack: Stack, admin: httpx.AsyncClient, standin: Standin, bare_url: str, setup: Setup,
                           meter: CpuMeter, concurrency: int, duration: float,
                           ) -> tuple[list[LoadResult], list[tuple[str, float, dict[str, float]]]]:
    subs = setup.subscriptions
    rng = random.Random(9)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=bare_url, limits=limits, timeout=30) as bare_http, \
            httpx.AsyncClient(base_url=stack.url("gateway"), limits=limits, timeout=30,
                              headers={"Authorization": admin.headers["Authorization"]}) as http:
        async def bare(_: int) -> None:
            (await bare_http.get("/healthz")).raise_for_status()

        async def stripe_preview(_: int) -> None:
            sub = rng.choice(subs)
            at = int(max(datetime.now(UTC), sub["current_period_start"]).timestamp())
            body = urlencode({
                "customer": sub["stripe_customer_id"], "subscription": sub["stripe_subscription_id"],
                "subscription_details[items][0][id]": sub["stripe_item_id"],
                "subscription_details[items][0][price]": setup.upgrade_stripe_price_id,
                "subscription_details[items][0][quantity]": "1",
                "subscription_details[proration_behavior]": "always_invoice",
                "subscription_details[proration_date]": str(at)})
            (await standin.http.post("/v1/invoices/create_preview", content=body, headers={
                "Content-Type": "application/x-www-form-urlencoded"})).raise_for_status()

        async def preview(_: int) -> None:
            sub = rng.choice(subs)
            response = await http.get(f"/api/subscriptions/{sub['id']}/change-preview",
                                      params={"priceId": setup.upgrade_price_id})
            response.raise_for_status()
            if response.json()["amountDueNow"] <= 0:
                raise RuntimeError(f"an upgrade previewed as {response.json()['amountDueNow']} due now")

        sample = (await http.get(f"/api/subscriptions/{subs[0]['id']}/change-preview",
                                 params={"priceId": setup.upgrade_price_id})).raise_for_status().json()
        say(f"  a preview: {sample['kind']} {sample['prorationBehavior']}, {len(sample['lines'])} lines, "
            f"due now {sample['amountDueNow']}, next invoice {sample['nextInvoiceTotal']} {sample['currency']}")
        results, cpu = [], []
        for label, operation in (("bare FastAPI endpoint (GET)", bare),
                                 ("stand-in create_preview (direct)", stripe_preview),
                                 ("change-preview (gateway)", preview)):
            say(f"  measuring {label} for {duration:.0f} s at concurrency {concurrency}...")
            before, began = meter.sample(), time.monotonic()
            results.append(await run_load(label, operation, concurrency=concurrency, duration=duration))
            cpu.append((label, time.monotonic() - began, meter.spent(before, meter.sample())))
    return results, cpu


# -- renewals ---------------------------------------------------------------------------------------------------
class Watch:
    """Receive times, from Kafka, of what the platform publishes about the renewal invoices."""

    def __init__(self, bootstrap: str, known_stripe_ids: set[str]) -> None:
        self.known = known_stripe_ids  # the first invoices (setup): not renewals
        self.numbered_at: dict[str, float] = {}
        self.paid_at: dict[str, float] = {}
        self.paid: Counter[str] = Counter()  # invoice.paid per Stripe invoice id
        self.ours: dict[str, str] = {}  # Stripe invoice id -> our invoice id
        self.succeeded: Counter[str] = Counter()  # payment.succeeded per our invoice id
        self.renewed: Counter[str] = Counter()  # subscription.renewed per our subscription id
        self.renewed_at: dict[str, float] = {}
        self._consumer = AIOKafkaConsumer("billing.invoice", "billing.payment", "billing.subscription",
                                          bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                          group_id=f"bench-{uuid.uuid4().hex[:6]}")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.seek_to_end()
        for tp in self._consumer.assignment():  # the positions resolved now, before the advance
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = loop.time()
            for records in batch.values():
                for record in records:
                    event = orjson.loads(record.value)
                    kind, data = event["type"], event.get("data") or {}
                    if kind == "subscription.renewed":
                        self.renewed[event["subject"]] += 1
                        self.renewed_at.setdefault(event["subject"], now)
                        continue
                    if kind == "payment.succeeded":
                        self.succeeded[str(data.get("invoiceId"))] += 1
                        continue
                    sid = data.get("stripeInvoiceId")
                    if not sid or sid in self.known:
                        continue
                    self.ours[sid] = event["subject"]
                    if kind == "invoice.sent" and data.get("invoiceNumber"):
                        self.numbered_at.setdefault(sid, now)
                    elif kind == "invoice.paid":
                        self.paid[sid] += 1
                        self.paid_at.setdefault(sid, now)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


@dataclass
class Renewal:
    target: datetime
    started: float = 0.0
    answered: float | None = None
    answer: str = ""
    emitted: float | None = None  # the stand-in's clock reads ready at the target
    delivered: float | None = None  # nothing left to deliver
    max_pending: int = 0
    deliveries: int = 0  # Stripe events of the advance stored by payments (each once)
    paid_all: float | None = None
    numbered_all: float | None = None
    renewed_all: float | None = None
    retries: list[str] = field(default_factory=list)
    cpu: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)


async def advance(admin: httpx.AsyncClient, renewal: Renewal, loop: asyncio.AbstractEventLoop) -> None:
    response = await admin.post("/api/test-clock/advance", json={"to": renewal.target.isoformat()},
                                headers={"Idempotency-Key": f"bench-advance-{uuid.uuid4().hex}"})
    renewal.answered = loop.time()
    renewal.answer = f"{response.status_code} {response.text[:300]}"


async def watch_standin(standin: Standin, clock_id: str, renewal: Renewal, loop: asyncio.AbstractEventLoop) -> None:
    """The stand-in runs the advance in one go under its lock (its event loop busy): the first read of its
    clock at the target is the end of the emitting; then its delivery queue drains."""
    target = int(renewal.target.timestamp())
    while renewal.emitted is None:
        clock = await standin.clock(clock_id)
        if int(clock["frozen_time"]) >= target and clock["status"] == "ready":
            renewal.emitted = loop.time()
            break
        await asyncio.sleep(0.2)
    while True:
        pending = await standin.pending()
        renewal.max_pending = max(renewal.max_pending, pending)
        if pending == 0:
            renewal.delivered = loop.time()
            return
        await asyncio.sleep(0.25)


async def run_renewals(stack: Stack, admin: httpx.AsyncClient, standin: Standin, setup: Setup, meter: CpuMeter,
                       args: argparse.Namespace) -> tuple[Renewal, Watch]:
    n = len(setup.subscriptions)
    dbs = stack.endpoints.database_urls
    known = {r["stripe_invoice_id"] for r in await rows(
        dbs["invoice"], "SELECT stripe_invoice_id FROM invoices WHERE stripe_invoice_id IS NOT NULL")}
    events_before = await count(dbs["payments"], "SELECT count(*) FROM stripe_events")
    period_end = max(s["current_period_end"] for s in setup.subscriptions)
    renewal = Renewal(target=period_end + timedelta(hours=1))
    if args.redeliver:
        await standin.configure(duplicate_deliveries=True, shuffle=True)
    watch = Watch(stack.kafka.bootstrap, known)
    await watch.start()
    loop = asyncio.get_running_loop()
    say(f"advancing the platform's clock to {renewal.target.isoformat()} (one month) through the gateway...")
    cpu_at = meter.sample()
    renewal.started = loop.time()
    request = asyncio.create_task(advance(admin, renewal, loop))
    monitor = asyncio.create_task(watch_standin(standin, setup.clock_id, renewal, loop))
    deadline = renewal.started + args.timeout
    last_report = last_progress = renewal.started
    last_count = -1
    last_mark = renewal.started
    marked: set[str] = set()

    def mark(label: str, at: float | None) -> None:
        """Close a phase at `at`: the CPU each process spent since the previous mark."""
        nonlocal cpu_at, last_mark
        if at is None or label in marked:
            return
        marked.add(label)
        now_cpu = meter.sample()
        renewal.cpu.append((label, max(at - last_mark, 1e-3), meter.spent(cpu_at, now_cpu)))
        cpu_at, last_mark = now_cpu, at

    while True:
        now = loop.time()
        mark("stand-in emitting (advance)", renewal.emitted)
        mark("stand-in delivering to payments", renewal.delivered)
        paid = sum(1 for sid in watch.paid)
        if len(watch.numbered_at) >= n and renewal.numbered_all is None:
            renewal.numbered_all = max(watch.numbered_at.values())
        if len(watch.renewed_at) >= n and renewal.renewed_all is None:
            renewal.renewed_all = max(watch.renewed_at.values())
        if paid >= n and renewal.delivered is not None:
            renewal.paid_all = max(watch.paid_at.values())
            break
        if paid != last_count:
            last_count, last_progress = paid, now
        if now - last_report >= 5:
            state = ("stand-in busy advancing" if renewal.emitted is None else
                     f"max {renewal.max_pending} deliveries queued" + (", all delivered" if renewal.delivered
                                                                        else ""))
            say(f"  ... {now - renewal.started:6.1f} s: {state}; numbered {len(watch.numbered_at)}/{n}, "
                f"PAID {paid}/{n}, renewed {len(watch.renewed_at)}/{n}")
            last_report = now
        if now > deadline or (renewal.delivered is not None and now - last_progress > 120):
            say(f"  stopped waiting: {paid}/{n} PAID after {now - renewal.started:.0f} s")
            break
        await asyncio.sleep(0.2)
    mark("platform after the last delivery", loop.time())
    await asyncio.wait_for(request, timeout=max(deadline - loop.time(), 5))
    monitor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await monitor
    # The platform's copy of the clock: a failed or timed-out advance left it behind Stripe's; the
    # same target again brings it level (Stripe has nothing left to run).
    for _ in range(3):
        clock = (await admin.get("/api/test-clock")).raise_for_status().json()
        if clock["frozenTime"] and datetime.fromisoformat(clock["frozenTime"]) >= renewal.target:
            break
        await advance(admin, Renewal(target=renewal.target), loop)
        renewal.retries.append(f"platform clock at {clock['frozenTime']}: advanced again")
    await asyncio.sleep(3.0)  # a doubled invoice.paid or payment.succeeded would have arrived by now
    await watch.stop()
    renewal.deliveries = await count(dbs["payments"], "SELECT count(*) FROM stripe_events") - events_before
    if args.redeliver:
        await standin.configure(duplicate_deliveries=False, shuffle=False)
    return renewal, watch


# -- the guarantees ---------------------------------------------------------------------------------------------
@dataclass
class Checks:
    stripe_renewals: int = 0
    subs_with_renewal: int = 0
    ours: int = 0
    lost: int = 0
    doubled: int = 0
    not_paid: int = 0
    unnumbered: int = 0
    numbers: int = 0
    gaps: int = 0
    repeats: int = 0
    payments_lost: int = 0
    payments_doubled: int = 0
    not_card: int = 0
    kafka_paid_lost: int = 0
    kafka_paid_doubled: int = 0
    kafka_payment_lost: int = 0
    kafka_payment_doubled: int = 0
    renewed_lost: int = 0
    renewed_doubled: int = 0
    mirrored_new_period: int = 0
    extra_ours: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.not_paid or self.unnumbered or self.gaps or self.repeats
                    or self.payments_lost or self.payments_doubled or self.not_card or self.kafka_paid_lost
                    or self.kafka_paid_doubled or self.kafka_payment_lost or self.kafka_payment_doubled
                    or self.renewed_lost or self.renewed_doubled or self.extra_ours
                    or self.subs_with_renewal != self.stripe_renewals)


def gaps_and_repeats(numbers: Iterable[tuple[int, int]]) -> tuple[int, int]:
    by_year: dict[int, list[int]] = {}
    for year, seq in numbers:
        by_year.setdefault(year, []).append(seq)
    gaps = repeats = 0
    for seqs in by_year.values():
        repeats += len(seqs) - len(set(seqs))
        gaps += max(seqs) - len(set(seqs))  # numbers 1..max not used
    return gaps, repeats


async def check(stack: Stack, standin: Standin, setup: Setup, watch: Watch, renewal: Renewal) -> Checks:
    dbs = stack.endpoints.database_urls
    c = Checks()
    ours_subs = {s["stripe_subscription_id"]: str(s["id"]) for s in setup.subscriptions}
    stripe_invoices = [i for i in await standin.invoices()
                       if i["billing_reason"] == "subscription_cycle"
                       and i["parent"]["subscription_details"]["subscription"] in ours_subs]
    renewals = {i["id"]: i for i in stripe_invoices}
    c.stripe_renewals = len(renewals)
    c.subs_with_renewal = len({i["parent"]["subscription_details"]["subscription"] for i in stripe_invoices})
    invoices = await rows(dbs["invoice"], "SELECT id, stripe_invoice_id, status, invoice_number, total, amount_paid "
                                          "FROM invoices WHERE stripe_invoice_id IS NOT NULL")
    per_stripe = Counter(r["stripe_invoice_id"] for r in invoices)
    mine = [r for r in invoices if r["stripe_invoice_id"] in renewals]
    c.ours = len(mine)
    c.lost = sum(1 for sid in renewals if per_stripe[sid] == 0)
    c.doubled = sum(1 for sid in renewals if per_stripe[sid] > 1)
    c.not_paid = sum(1 for r in mine if r["status"] != "PAID" or r["amount_paid"] != r["total"]
                     or r["total"] != renewals[r["stripe_invoice_id"]]["total"])
    c.unnumbered = sum(1 for r in mine if not r["invoice_number"])
    c.extra_ours = sum(1 for sid in per_stripe if sid not in renewals and sid not in watch.known)
    numbered = await rows(dbs["invoice"], "SELECT number_year, number_seq FROM invoices WHERE number_seq IS NOT NULL")
    c.numbers = len(numbered)
    c.gaps, c.repeats = gaps_and_repeats((r["number_year"], r["number_seq"]) for r in numbered)
    our_ids = [str(r["id"]) for r in mine]
    payments = await rows(dbs["payments"], "SELECT invoice_id, method, count(*) AS n FROM payments "
                                           "WHERE source = 'stripe' AND status = 'succeeded' "
                                           "GROUP BY invoice_id, method")
    per_invoice: Counter[str] = Counter()
    methods: dict[str, set[str]] = {}
    for p in payments:
        per_invoice[p["invoice_id"]] += p["n"]
        methods.setdefault(p["invoice_id"], set()).add(p["method"])
    c.payments_lost = sum(1 for i in our_ids if per_invoice[i] == 0)
    c.payments_doubled = sum(1 for i in our_ids if per_invoice[i] > 1)
    c.not_card = sum(1 for i in our_ids if methods.get(i, {"card"}) != {"card"})
    c.kafka_paid_lost = sum(1 for sid in renewals if watch.paid[sid] == 0)
    c.kafka_paid_doubled = sum(1 for sid in renewals if watch.paid[sid] > 1)
    c.kafka_payment_lost = sum(1 for i in our_ids if watch.succeeded[i] == 0)
    c.kafka_payment_doubled = sum(1 for i in our_ids if watch.succeeded[i] > 1)
    c.renewed_lost = sum(1 for sub_id in ours_subs.values() if watch.renewed[sub_id] == 0)
    c.renewed_doubled = sum(1 for sub_id in ours_subs.values() if watch.renewed[sub_id] > 1)
    old_end = {str(s["id"]): s["current_period_end"] for s in setup.subscriptions}
    mirror = await rows(dbs["subscriptions"], "SELECT id, current_period_start FROM subscriptions "
                                              "WHERE status = 'active'")
    c.mirrored_new_period = sum(1 for m in mirror if str(m["id"]) in old_end
                                and m["current_period_start"] == old_end[str(m["id"])])
    return c


# -- report -----------------------------------------------------------------------------------------------------
def report(args: argparse.Namespace, setup: Setup, previews: list[LoadResult],
           preview_cpu: list[tuple[str, float, dict[str, float]]], renewal: Renewal, watch: Watch, c: Checks,
           load_before: str) -> None:
    n = len(setup.subscriptions)
    print(f"\n== subscriptions: {n} active monthly subscriptions, {os.cpu_count()}-core machine, fsync on ==")
    print(f"load average before: {load_before}; after: {_loadavg()}")
    print("setup (not part of the figures below):")
    total = 0.0
    for what, secs, items in setup.timings:
        total += secs
        rate = f"  {items / secs:8.1f}/s" if items > 2 and secs > 0 else ""
        print(f"  {what:<58} {secs:8.1f} s{rate}")
    print(f"  {'total':<58} {total:8.1f} s")

    print(f"\nchange preview, concurrency {args.concurrency}, {args.duration:.0f} s each:")
    for result in previews:
        print(result.line(width=34))
    bare, direct, preview = previews
    if bare.latencies and preview.latencies:
        print(f"  change-preview p99 / bare p99:   {preview.pct(99) / bare.pct(99):6.1f}x   "
              f"p50 / bare p50: {preview.pct(50) / bare.pct(50):6.1f}x   rate {preview.rate / bare.rate:6.1%} of bare")
    if direct.latencies and preview.latencies:
        print(f"  of the preview's p50, the stand-in's create_preview alone: "
              f"{direct.pct(50) / preview.pct(50):6.1%} ({direct.pct(50) * 1000:.1f} of "
              f"{preview.pct(50) * 1000:.1f} ms)")
    print("  CPU by process per phase, warm-up included (% of one core):")
    for line in cpu_table(preview_cpu):
        print(line)

    t0 = renewal.started

    def since(at: float | None) -> str:
        return f"{at - t0:8.1f} s" if at is not None else "     n/a  "

    paid_times = [at - t0 for at in watch.paid_at.values()]
    delivery = (f"fanned out to payments {args.fan_out} at a time by the bench's relay, as Stripe delivers"
                if args.fan_out else "delivered by the stand-in's one worker per endpoint, in order")
    print(f"\nrenewals: the clock advanced one month over {n} subscriptions; events {delivery}"
          f"{'; every event delivered twice, shuffled' if args.redeliver else ''}")
    print(f"  advance answered (gateway):            {since(renewal.answered)}   {renewal.answer[:160]}")
    for note in renewal.retries:
        print(f"    {note}")
    print(f"  stand-in emitted every event:          {since(renewal.emitted)}   (its clock ready at the target)")
    print(f"  stand-in delivered every event:        {since(renewal.delivered)}   "
          f"(up to {renewal.max_pending} deliveries queued)")
    print(f"  all {n} renewal invoices numbered:    {since(renewal.numbered_all)}")
    print(f"  all {n} renewal invoices PAID:        {since(renewal.paid_all)}   "
          f"p50 {percentile(paid_times, 50):.1f} s  p99 {percentile(paid_times, 99):.1f} s  "
          f"n={len(paid_times)}/{n}")
    print(f"  all {n} subscriptions renewed (mirror): {since(renewal.renewed_all)}")
    if renewal.paid_all is not None:
        wall = renewal.paid_all - t0
        print(f"  throughput: {n / wall:8.1f} renewal invoices/s (advance -> all PAID, {wall:.1f} s)")
        if renewal.emitted is not None:
            emit = renewal.emitted - t0
            print(f"  stand-in's share: emitting {emit:.1f} s = {emit / wall:.0%} of the wall time"
                  + (f"; emitting + delivering {renewal.delivered - t0:.1f} s = "
                     f"{(renewal.delivered - t0) / wall:.0%}" if renewal.delivered is not None else ""))
            platform = renewal.paid_all - renewal.emitted
            print(f"  after the stand-in emitted:           {platform:.1f} s = {n / platform:.1f} invoices/s "
                  f"(delivery included: {renewal.deliveries} deliveries = "
                  f"{renewal.deliveries / platform:.0f}/s)")
    print("  CPU by process per phase (% of one core):")
    for line in cpu_table(renewal.cpu):
        print(line)

    print("\nguarantees:")
    print(f"  Stripe renewal invoices (stand-in):     {c.stripe_renewals} for {c.subs_with_renewal} subscriptions")
    print(f"  ours of them:                           {c.ours}; lost {c.lost}, doubled {c.doubled}, "
          f"not PAID in full {c.not_paid}, unnumbered {c.unnumbered}; unexpected others {c.extra_ours}")
    print(f"  invoice numbers:                        {c.numbers} in use, gaps {c.gaps}, repeats {c.repeats}")
    print(f"  card payments in payments:              lost {c.payments_lost}, doubled {c.payments_doubled}, "
          f"other method {c.not_card}")
    print(f"  invoice.paid on Kafka:                  lost {c.kafka_paid_lost}, doubled {c.kafka_paid_doubled}")
    print(f"  payment.succeeded on Kafka:             lost {c.kafka_payment_lost}, "
          f"doubled {c.kafka_payment_doubled}")
    print(f"  subscription.renewed on Kafka:          lost {c.renewed_lost}, doubled {c.renewed_doubled}; "
          f"mirror in the new period {c.mirrored_new_period}/{n}")
    print("RESULT:", "no renewal invoice lost or doubled" if c.ok and c.stripe_renewals == n
          else "RENEWAL INVOICES LOST, DOUBLED OR UNFINISHED")
    record(args, previews, renewal, watch, c, n)


def record(args: argparse.Namespace, previews: list[LoadResult], renewal: Renewal, watch: Watch, c: Checks,
           n: int) -> None:
    """The figures and guarantees printed above, for `python -m bench --json` (checks printed already)."""
    rep = current("subscriptions")
    rep.figure("subscriptions", n, "count", better="higher")
    for name, result in zip(["bare", "create_preview direct", "change-preview"], previews, strict=False):
        rep.load(f"{name} c{args.concurrency}", result)
    bare, _, preview = previews
    rep.ratio("change-preview / bare rate", preview.rate, bare.rate)
    t0 = renewal.started
    for name, at in [("emitted", renewal.emitted), ("delivered", renewal.delivered),
                     ("numbered", renewal.numbered_all), ("PAID", renewal.paid_all),
                     ("renewed", renewal.renewed_all)]:
        rep.figure(f"advance -> all {name}", at - t0 if at is not None else float("nan"), "s")
    paid_times = [at - t0 for at in watch.paid_at.values()]
    rep.figure("advance -> PAID p50", percentile(paid_times, 50), "s")
    rep.figure("advance -> PAID p99", percentile(paid_times, 99), "s")
    if renewal.paid_all is not None:
        rep.figure("renewal invoices/s", n / (renewal.paid_all - t0), "invoices/s")
    for name, bad, detail in [
        ("renewal invoices lost", c.lost, f"of {c.ours} ours"), ("renewal invoices doubled", c.doubled, ""),
        ("renewal invoices PAID in full and numbered", c.not_paid + c.unnumbered,
         f"{c.not_paid} not PAID, {c.unnumbered} unnumbered"),
        ("invoice numbers gapless", c.gaps + c.repeats, f"{c.numbers} in use, {c.gaps} gaps, {c.repeats} repeats"),
        ("card payments lost", c.payments_lost, ""), ("card payments doubled", c.payments_doubled, ""),
        ("invoice.paid lost/doubled (Kafka)", c.kafka_paid_lost + c.kafka_paid_doubled,
         f"{c.kafka_paid_lost} lost, {c.kafka_paid_doubled} doubled"),
        ("payment.succeeded lost/doubled (Kafka)", c.kafka_payment_lost + c.kafka_payment_doubled,
         f"{c.kafka_payment_lost} lost, {c.kafka_payment_doubled} doubled"),
        ("subscription.renewed lost/doubled (Kafka)", c.renewed_lost + c.renewed_doubled,
         f"{c.renewed_lost} lost, {c.renewed_doubled} doubled"),
        ("every subscription renewed once by Stripe", abs(c.stripe_renewals - n),
         f"{c.stripe_renewals} renewal invoices for {n} subscriptions"),
    ]:
        rep.check(name, not bad, detail.strip() or str(bad), show=False)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- main -------------------------------------------------------------------------------------------------------
async def bench(stack: Stack, standin_server: StripeStandin, bare_url: str, relay_url: str | None,
                meter: CpuMeter, args: argparse.Namespace) -> int:
    key = stack.endpoints.stripe_secret_key
    load_before = _loadavg()
    sdk = stripe.StripeClient(key, base_addresses={"api": standin_server.url},
                              http_client=stripe.HTTPXClient(timeout=600), max_network_retries=0)
    standin = Standin(standin_server.url, key, relay_url)
    if relay_url:
        await standin.configure(webhook_urls=[f"{relay_url}/relay"])
    admin = await admin_client(stack, args.concurrency)
    try:
        say(f"setting up {args.subscriptions} subscriptions...")
        setup = await set_up(stack, admin, sdk, standin, args)
        say("change preview vs a bare endpoint...")
        previews, preview_cpu = await measure_previews(stack, admin, standin, bare_url, setup, meter,
                                                       args.concurrency, args.duration)
        renewal, watch = await run_renewals(stack, admin, standin, setup, meter, args)
        say("checking every renewal invoice...")
        checks = await check(stack, standin, setup, watch, renewal)
    finally:
        await admin.aclose()
        await standin.aclose()
    report(args, setup, previews, preview_cpu, renewal, watch, checks, load_before)
    return 0 if checks.ok and checks.stripe_renewals == len(setup.subscriptions) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.subscriptions_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=None, help="active subscriptions (default 10,000)")
    parser.add_argument("--small", action="store_true", help="200 subscriptions, 5 s preview phases")
    parser.add_argument("--concurrency", type=int, default=16, help="of the change-preview load and client setup")
    parser.add_argument("--setup-concurrency", type=int, default=8, help="SDK calls to the stand-in at once")
    parser.add_argument("--duration", type=float, default=None, help="seconds per preview phase (default 10)")
    parser.add_argument("--redeliver", action="store_true",
                        help="the stand-in delivers every renewal event twice, in shuffled order")
    parser.add_argument("--fan-out", type=int, default=0, metavar="K",
                        help="deliver the stand-in's events to payments K at a time through a relay (Stripe "
                             "delivers concurrently; the stand-in one at a time): the platform's own throughput")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each phase to finish")
    parser.add_argument("--serve-relay", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_relay is not None:
        return serve_relay(args.serve_relay)
    args.subscriptions = args.subscriptions or (200 if args.small else 10_000)
    args.duration = args.duration or (5.0 if args.small else 10.0)
    if args.subscriptions < 1:
        parser.error("--subscriptions must be at least 1")
    say("starting Postgres, Kafka, stripe-mock, the Stripe stand-in, invoice, payments, subscriptions, gateway...")
    with running_stack([], with_stripe=True) as stack:
        if stack.endpoints.uses_real_stripe:
            say("STRIPE_SECRET_KEY is a key Stripe issued: this bench runs against the local stand-in only.")
            return 2
        mock_url = stack.endpoints.stripe_api_base
        standin = StripeStandin(free_port(), mock_url, webhook_urls=[stack.endpoints.stripe_webhook_url],
                                webhook_secret=stack.endpoints.stripe_webhook_secret,
                                log_path=stack.root / "logs" / "stripe-standin.log")
        standin.start()
        # Every service talks to the stand-in, as under `make run`.
        stack.endpoints.stripe_api_base = standin.url
        started: list[ServiceProcess] = []
        bare: ServiceProcess | None = None
        try:
            for name in SERVICES:
                started.append(stack.start_service(name))
            relay = start_relay(stack, args.fan_out) if args.fan_out else None
            if relay is not None:
                started.append(relay)
            bare_port = free_port()
            bare = ServiceProcess("bare", [sys.executable, "-m", "bench.bare_app", str(bare_port)],
                                  env=dict(os.environ), port=bare_port, log_path=stack.root / "logs" / "bare.log")
            bare.start()
            roles = {name: p.pid for name, p in stack.processes.items() if p.pid}
            roles.update({"stand-in": standin._proc.pid or 0, "kafka": stack.kafka._proc.pid or 0,
                          "bare": bare.pid or 0})
            if relay is not None:
                roles["relay"] = relay.pid or 0
            mock = _pid_of_cmdline("stripe-mock", f"127.0.0.1:{urlsplit(mock_url).port}")
            if mock:
                roles["stripe-mock"] = mock
            postmaster_file = stack.postgres.data_dir / "postmaster.pid"
            postmaster = int(postmaster_file.read_text().split()[0]) if postmaster_file.exists() else None
            meter = CpuMeter(roles, postmaster)
            return asyncio.run(bench(stack, standin, bare.url, relay.url if relay else None, meter, args))
        finally:
            if bare is not None:
                bare.stop()
            for process in reversed(started):
                process.stop()
            standin.stop()


if __name__ == "__main__":
    sys.exit(main())
