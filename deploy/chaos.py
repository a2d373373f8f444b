"""A bounded chaos run on loopback: ``make chaos`` (or ``python -m deploy.chaos``).

Starts a whole stack on free loopback ports the way the benches do (bench/stack.py: PostgreSQL with
fsync on, Kafka 4, stripe-mock, the mail sink, every service and the gateway), then for
``--duration`` seconds plays a client through the gateway:

* creates and sends invoices (admin token, an ``Idempotency-Key`` on every POST, each request retried
  with the SAME key on errors and timeouts, as a real client does);
* pays half of them by hand (``mark-paid``, some in two parts) and half by signed Stripe webhooks
  (``checkout.session.completed``, plus a ``payment_intent.succeeded`` the platform ignores, some
  deliveries twice, in shuffled order, and now and then an older ``payment_intent.payment_failed``
  for another PaymentIntent delivered after the success), signed as bench/webhook_bench.py does;
* keeps a client-side ledger of every accepted (2xx) request and of every request whose outcome it
  does not know (it gave up retrying).

Meanwhile the faults, one after the other, spread over the run and each timed: ``kill -9`` of every
service (payments, invoice, gateway, notifications, subscriptions, reporting) and its restart,
``kill -9`` of Kafka and its restart, PostgreSQL ``pg_ctl stop -m immediate`` and start.

After the load it waits (with a deadline) until the pipeline has drained (every outbox published,
every stored Stripe event and queued email handled, every consumer group's lag 0, stable twice),
resolves the unknown outcomes by asking the API again with the same key, replays a sample of the
accepted requests with their keys, and RECONCILES the ledger with the databases, the Kafka topics and
the mail sink:

* every accepted invoice exists once (its marker in ``notes``), sent ones are numbered;
* every accepted payment is recorded exactly once in payments (manual by its id, webhook ones by
  their Checkout Session), no other succeeded payment exists for the invoice, and the invoice's
  ``amountPaid`` (invoice service, and its ``invoice_payments`` rows, one per payment) equals the sum
  of its distinct payments; fully paid means PAID;
* a PAID invoice has ``invoice.paid`` exactly once on ``billing.invoice`` (distinct event ids; a
  relay may publish one event twice after a crash, consumers drop the copy by id: counted apart),
  every payment ``payment.succeeded``/``.recorded`` exactly once on ``billing.payment``;
* invoice numbers per year are 1..n: no gap, no duplicate;
* each invoice's events on Kafka are in ``version`` order (keyed by the invoice id);
* emails, as the design states them (services/notifications/README.md: each message queued exactly
  once, delivered at least once, a repeat always with the same Message-ID): per sent invoice exactly
  one ``invoice_sent`` message and one ``payment_receipt`` per payment, no ``payment_failed`` unless
  that failure reached ``billing.payment`` before the payment that settled the invoice; every
  message ``sent`` and in the sink under its Message-ID at least once; no message in the sink that
  the log does not know. Deliveries of one Message-ID more than once are reported, allowed;
* nothing parked on ``billing.deadletter``.

It prints the requests sent (attempts), accepted, refused and unknown; per fault the errors seen in
its window, the time until the component answered again and until the load's first success through
it; and ``lost / doubled / inconsistent``. Exit 1 when any of those is non-zero, a fault could not be
injected, or the pipeline did not drain. ``--json FILE`` writes the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import email.policy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import httpx

from bench.stack import Stack, running_stack
from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceStatus
from contracts.payment import PaymentEventType
from deploy.infra import RUN_DIR, InfraError
from deploy.services import GATEWAY, SERVICES
from kit.worker import asyncpg_dsn
from services.payments.stripe import testing as stripe_events

SERVICE_FAULTS = ("payments", "invoice", "gateway", "notifications", "subscriptions", "reporting")
ALL_FAULTS = (*SERVICE_FAULTS, "kafka", "postgres")
# Where a service is reached through the gateway by a GET that needs it (and its database).
PROBES = {
    "invoice": "/api/invoices?limit=1",
    "payments": "/api/payments?limit=1",
    "notifications": "/api/notifications?limit=1",
    "subscriptions": "/api/plans?limit=1",
    "reporting": "/api/reports/summary",
    "gateway": "/api/auth/me",
}
# The load steps that go through a component (the first success of one after a fault is its recovery
# as the client sees it). Kafka is on no request's path: its recovery is the first publish after it.
DEPENDENT_STEPS = {
    "invoice": ("create", "send"),
    "payments": ("pay", "webhook"),
    "gateway": ("create", "send", "pay", "webhook"),
    "postgres": ("create", "send", "pay", "webhook"),
}
# A 4xx that means "not now" rather than "no": retried with the same key.
RETRYABLE_CODES = {"idempotency_in_progress"}
OUTBOX_DATABASES = ("invoice", "payments", "subscriptions", "notifications")
CLIENTS = 4


def say(message: str) -> None:
    print(f"[chaos] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# the ledger


@dataclass
class Attempt:
    step: str
    started: float
    ended: float
    ok: bool
    status: str  # HTTP status, or the exception's name


@dataclass
class Call:
    """One logical request (all its attempts share the Idempotency-Key)."""

    flow: int
    step: str  # create | send | pay | webhook | setup | replay
    method: str
    path: str
    key: str | None
    json_body: Any = None
    event: dict[str, Any] | None = None  # a webhook's Stripe event (signed afresh on every attempt)
    outcome: str = "pending"  # accepted | refused | unknown
    status: int | None = None
    body: Any = None
    attempts: int = 0
    resolved: bool = False  # an unknown outcome settled afterwards by asking again


@dataclass
class Flow:
    n: int
    mode: str  # hand | webhook
    marker: str
    total: int = 0
    invoice_id: str | None = None
    calls: list[Call] = field(default_factory=list)
    manual_payment_ids: list[str] = field(default_factory=list)
    session_id: str | None = None
    failed_intent: str | None = None

    def accepted(self, step: str) -> list[Call]:
        return [c for c in self.calls if c.step == step and c.outcome == "accepted"]


@dataclass
class FaultRecord:
    name: str
    at: float = 0.0  # wall clock of the kill
    injected: bool = False
    restarted: bool = False
    old_pid: int | None = None
    new_pid: int | None = None
    down_s: float | None = None  # kill -> restart done (the component answers its own health check)
    recover_s: float | None = None  # kill -> first success of its probe through the gateway
    first_ok_s: float | None = None  # kill -> first accepted load request through it, started after the kill
    errors: int = 0  # failed load attempts that ended in the fault's window
    probes: dict[str, float] = field(default_factory=dict)  # probe path -> seconds from the kill to its first 200
    error: str | None = None
    _restarted_at: float = 0.0
    _recovered_at: float = 0.0


class Ledger:
    def __init__(self) -> None:
        self.flows: list[Flow] = []
        self.attempts: list[Attempt] = []
        self.setup_calls: list[Call] = []
        self._lock = threading.Lock()

    def add_flow(self, flow: Flow) -> None:
        with self._lock:
            self.flows.append(flow)

    def calls(self) -> Iterator[Call]:
        yield from self.setup_calls
        for flow in list(self.flows):
            yield from flow.calls


# --------------------------------------------------------------------------------------------------
# the client


class Client:
    """Requests through the gateway, each retried with the same key until a definite answer."""

    def __init__(self, http: httpx.AsyncClient, ledger: Ledger, *, secret: str, deadline: float) -> None:
        self.http = http
        self.ledger = ledger
        self.secret = secret
        self.deadline = deadline

    async def send(self, call: Call, *, deadline: float | None = None) -> Call:
        give_up = time.monotonic() + (self.deadline if deadline is None else deadline)
        delay = 0.2
        while True:
            call.attempts += 1
            started = time.time()
            status: int | None = None
            label = ""
            response: httpx.Response | None = None
            try:
                response = await self.http.request(call.method, call.path, **self._payload(call))
                status = response.status_code
                label = str(status)
            except httpx.HTTPError as exc:
                label = type(exc).__name__
            ok = status is not None and 200 <= status < 300
            self.ledger.attempts.append(Attempt(call.step, started, time.time(), ok, label))
            if response is not None and status is not None and (ok or _definite(status, response)):
                call.status = status
                call.outcome = "accepted" if ok else "refused"
                with contextlib.suppress(ValueError):
                    call.body = response.json()
                return call
            if time.monotonic() > give_up:
                call.outcome = "unknown"
                call.status = status
                return call
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _payload(self, call: Call) -> dict[str, Any]:
        headers = {"Idempotency-Key": call.key} if call.key else {}
        if call.event is not None:
            body = stripe_events.encode_event(call.event)
            # Stripe signs every delivery anew (the signature carries its time).
            headers[stripe_events.SIGNATURE_HEADER] = stripe_events.sign_payload(body, self.secret)
            headers["Content-Type"] = "application/json"
            return {"content": body, "headers": headers}
        if call.json_body is not None:
            return {"json": call.json_body, "headers": headers}
        return {"headers": headers}


def _definite(status: int, response: httpx.Response) -> bool:
    if status < 400 or status >= 500 or status in (408, 425, 429):
        return False
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return True
    return code not in RETRYABLE_CODES


def new_key(label: str) -> str:
    return f"chaos-{label}-{uuid.uuid4()}"


# --------------------------------------------------------------------------------------------------
# the load


class Load:
    """Closed-loop workers creating, sending and paying invoices until told to stop."""

    def __init__(self, stack: Stack, ledger: Ledger, *, token: str, client_ids: list[str], seed: int,
                 concurrency: int, max_invoices: int, request_deadline: float, run_id: str) -> None:
        self.stack = stack
        self.ledger = ledger
        self.token = token
        self.client_ids = client_ids
        self.seed = seed
        self.concurrency = concurrency
        self.max_invoices = max_invoices
        self.request_deadline = request_deadline
        self.run_id = run_id
        self.stop = threading.Event()
        self.done = threading.Event()
        self._next = 0
        self.started_at = time.time()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self.done.set()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(40.0, connect=3.0)  # above the gateway's 30 s upstream timeout
        async with httpx.AsyncClient(base_url=self.stack.url(GATEWAY), limits=limits, timeout=timeout,
                                     headers={"Authorization": f"Bearer {self.token}"}) as http:
            client = Client(http, self.ledger, secret=self.stack.endpoints.stripe_webhook_secret,
                            deadline=self.request_deadline)
            await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))

    async def _worker(self, client: Client) -> None:
        while not self.stop.is_set() and self._next < self.max_invoices:
            n = self._next
            self._next += 1
            await self._flow(client, n)

    async def _flow(self, client: Client, n: int) -> None:
        rng = random.Random(f"{self.seed}-{n}")
        flow = Flow(n=n, mode="hand" if n % 2 == 0 else "webhook", marker=f"chaos {self.run_id} #{n}")
        self.ledger.add_flow(flow)
        unit_price = rng.randrange(1_000, 250_000)
        create = Call(n, "create", "POST", "/api/invoices", new_key(f"{n}-create"), json_body={
            "clientId": rng.choice(self.client_ids), "notes": flow.marker,
            "items": [{"description": f"Chaos work #{n}", "quantity": "1", "unitPrice": unit_price}],
        })
        flow.calls.append(create)
        if (await client.send(create)).outcome != "accepted":
            return
        flow.invoice_id, flow.total = create.body["id"], create.body["total"]
        send = Call(n, "send", "POST", f"/api/invoices/{flow.invoice_id}/send", new_key(f"{n}-send"))
        flow.calls.append(send)
        if (await client.send(send)).outcome != "accepted":
            return
        if flow.mode == "hand":
            first = flow.total // 3 if rng.random() < 0.5 else flow.total
            for part, amount in enumerate([first, flow.total - first] if first < flow.total else [first]):
                pay = Call(n, "pay", "POST", f"/api/invoices/{flow.invoice_id}/mark-paid", new_key(f"{n}-pay{part}"),
                           json_body={"amount": amount, "method": "bank_transfer", "reference": f"chaos-{n}-{part}"})
                flow.calls.append(pay)
                if (await client.send(pay)).outcome != "accepted":
                    return
                flow.manual_payment_ids.append(pay.body["id"])
            return
        for call in self._webhooks(flow, rng):
            flow.calls.append(call)
            await client.send(call)

    def _webhooks(self, flow: Flow, rng: random.Random) -> list[Call]:
        """The Stripe deliveries of one Checkout payment, with duplicates and out-of-order ones."""
        assert flow.invoice_id is not None
        now = int(time.time())
        intent = stripe_events.stripe_id("pi")
        session = stripe_events.checkout_session(invoice_id=flow.invoice_id, amount_total=flow.total,
                                                 currency="eur", payment_intent=intent, created=now)
        flow.session_id = session["id"]
        completed = stripe_events.build_event("checkout.session.completed", session, created=now)
        succeeded = stripe_events.payment_intent(amount=flow.total, currency="eur", invoice_id=flow.invoice_id,
                                                 intent_id=intent, status="succeeded", failure_code=None,
                                                 failure_message=None)
        deliveries = [completed, stripe_events.build_event("payment_intent.succeeded", succeeded, created=now)]
        if rng.random() < 0.3:
            deliveries.append(completed)  # Stripe delivers at least once
        rng.shuffle(deliveries)
        if rng.random() < 0.25:
            # An older decline of another PaymentIntent of the same invoice, arriving after the success.
            flow.failed_intent = stripe_events.stripe_id("pi")
            declined = stripe_events.payment_intent(amount=flow.total, currency="eur", invoice_id=flow.invoice_id,
                                                    intent_id=flow.failed_intent)
            deliveries.append(stripe_events.build_event("payment_intent.payment_failed", declined, created=now - 60))
        return [Call(flow.n, "webhook", "POST", "/webhooks/stripe", None, event=event) for event in deliveries]


# --------------------------------------------------------------------------------------------------
# faults


class Faults:
    """Injects the faults one after the other from the main thread (children keep their death signal)."""

    def __init__(self, stack: Stack, ledger: Ledger, token: str) -> None:
        self.stack = stack
        self.ledger = ledger
        self.http = httpx.Client(base_url=stack.url(GATEWAY), timeout=5.0,
                                 headers={"Authorization": f"Bearer {token}"})
        self._published_before = 0

    def close(self) -> None:
        self.http.close()

    def inject(self, name: str) -> FaultRecord:
        record = FaultRecord(name=name)
        say(f"fault: {name} ...")
        try:
            self._crash_and_restart(name, record)
        except (InfraError, OSError, subprocess.SubprocessError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:2000]
            say(f"fault {name}: {record.error.splitlines()[0]}")
            return record
        if name == "kafka":
            first = self._first_publish()
            record.first_ok_s = round(first - record.at, 2) if first else None
        record._recovered_at = self._probe(name, record)
        if record._recovered_at:
            record.recover_s = round(record._recovered_at - record.at, 2)
        say(f"fault {name}: injected, back in {record.down_s}s, answering in {record.recover_s}s")
        return record

    def _crash_and_restart(self, name: str, record: FaultRecord) -> None:
        if name in SERVICE_FAULTS:
            process = self.stack.processes[name]
            record.old_pid = process.pid
            record.at = time.time()
            process.kill()
            record.injected = not process.running
            time.sleep(1.0)
            process.restart()
            record.new_pid = process.pid
        elif name == "kafka":
            kafka = self.stack.kafka
            self._published_before = asyncio.run(published_total(kafka.bootstrap))
            record.old_pid = kafka._proc.pid
            record.at = time.time()
            kafka.kill9()
            record.injected = not kafka.running
            time.sleep(1.0)
            kafka.start()
            record.new_pid = kafka._proc.pid
        elif name == "postgres":
            record.at = time.time()
            self.stack.postgres.crash_and_restart(down_seconds=2.0)
            record.injected = True  # pg_ctl stop -m immediate answered 0 (it raises otherwise)
        else:
            raise ValueError(f"unknown fault {name!r}")
        record._restarted_at = time.time()
        record.restarted = True
        record.down_s = round(record._restarted_at - record.at, 2)

    def _first_publish(self, timeout: float = 180.0) -> float:
        """Wall clock at which the topics first grew past what they held before Kafka was killed: the
        relays publish again (0.0 if not before the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if asyncio.run(published_total(self.stack.kafka.bootstrap)) > self._published_before:
                    return time.time()
            time.sleep(0.1)
        return 0.0

    def _probe(self, name: str, record: FaultRecord, timeout: float = 180.0) -> float:
        """Wall clock of the first success of the fault's probe (0.0 if none before the timeout)."""
        paths = list(PROBES.values()) if name == "postgres" else [PROBES[name]] if name in PROBES else []
        deadline = time.monotonic() + timeout
        pending = set(paths)
        while time.monotonic() < deadline:
            for path in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if self.http.get(path).status_code == 200:
                        pending.discard(path)
                        record.probes[path] = round(time.time() - record.at, 2)
            if not pending and (name != "kafka" or self._all_ready()):
                return time.time()
            time.sleep(0.1)
        return 0.0

    def _all_ready(self) -> bool:
        """Every service's /readyz is 200 (readiness covers Kafka, the relay and the workers)."""
        for process in self.stack.processes.values():
            try:
                if httpx.get(f"{process.url}/readyz", timeout=3.0).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True


async def published_total(bootstrap: str) -> int:
    """How many records the platform's topics hold (the sum of their end offsets)."""
    from aiokafka import AIOKafkaConsumer

    partitions = [tp for topic, tps in (await topic_partitions(bootstrap)).items()
                  if topic.startswith("billing.") for tp in tps]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=5_000)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(partitions)).values()) if partitions else 0
    finally:
        await consumer.stop()


def fault_windows(records: list[FaultRecord], ledger: Ledger) -> None:
    """Errors in each fault's window (kill until it answered again, plus 2 s) and the first load success."""
    for record in records:
        if not record.injected:
            continue
        end = (record._recovered_at or record._restarted_at or record.at) + 2.0
        record.errors = sum(1 for a in ledger.attempts if not a.ok and record.at <= a.ended <= end)
        steps = DEPENDENT_STEPS.get(record.name)
        if steps:
            firsts = [a.ended for a in ledger.attempts
                      if a.ok and a.step in steps and a.started >= record.at and a.ended >= record._restarted_at]
            if firsts:
                record.first_ok_s = round(min(firsts) - record.at, 2)


# --------------------------------------------------------------------------------------------------
# drain and reconcile


class Databases:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.conns: dict[str, asyncpg.Connection] = {}

    async def __aenter__(self) -> Databases:
        for spec in SERVICES:
            self.conns[spec.name] = await asyncpg.connect(asyncpg_dsn(self.stack.endpoints.database_urls[spec.name]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.conns.values():
            await conn.close()

    def __getitem__(self, name: str) -> asyncpg.Connection:
        return self.conns[name]


async def topic_partitions(bootstrap: str) -> dict[str, list[Any]]:
    """Every topic's partitions (TopicPartition), from the cluster's metadata."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        described = await admin.describe_topics()
    finally:
        await admin.close()
    partitions: dict[str, list[Any]] = {}
    for topic in described:
        name = topic.get("topic") or topic.get("name")
        numbers = sorted(p.get("partition", p.get("partition_index")) for p in topic["partitions"])
        partitions[name] = [TopicPartition(name, n) for n in numbers]
    return partitions


async def consumer_lag(bootstrap: str) -> int:
    """Sum over every consumer group of (end offset - committed offset) on the topics it consumes."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    partitions_of = await topic_partitions(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        lag = 0
        for group_id, _ in await admin.list_consumer_groups():
            committed = await admin.list_consumer_group_offsets(group_id)
            partitions = [tp for topic in {tp.topic for tp in committed} for tp in partitions_of.get(topic, [])]
            ends = await consumer.end_offsets(partitions) if partitions else {}
            for tp, end in ends.items():
                meta = committed.get(tp)
                lag += max(0, end - (meta.offset if meta is not None and meta.offset >= 0 else 0))
        return lag
    finally:
        await consumer.stop()
        await admin.close()


async def pending_work(dbs: Databases) -> dict[str, int]:
    """What is still in flight inside the services (all must be 0 once drained)."""
    pending: dict[str, int] = {}
    for name in OUTBOX_DATABASES:
        pending[f"{name}.outbox"] = int(await dbs[name].fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"))
    pending["payments.stripe_events"] = int(await dbs["payments"].fetchval(
        "SELECT count(*) FROM stripe_events WHERE status = 'pending'"))
    pending["notifications.queued"] = int(await dbs["notifications"].fetchval(
        "SELECT count(*) FROM notifications WHERE status IN ('pending', 'sending')"))
    return pending


async def drain(stack: Stack, ledger: Ledger, timeout: float) -> tuple[bool, float, dict[str, int]]:
    """Wait until nothing is in flight and every expected PAID invoice reads PAID, twice in a row."""
    started = time.monotonic()
    expected_paid = [f.invoice_id for f in ledger.flows if f.invoice_id and _expected_paid(f) == f.total > 0]
    stable = 0
    last: dict[str, int] = {}
    next_report = started + 10
    async with Databases(stack) as dbs:
        while True:
            try:
                last = await pending_work(dbs)
                last["kafka.lag"] = await consumer_lag(stack.kafka.bootstrap)
                last["invoices.not_paid_yet"] = int(await dbs["invoice"].fetchval(
                    "SELECT count(*) FROM invoices WHERE id = ANY($1::uuid[]) AND status <> 'PAID'", expected_paid))
            except Exception as exc:  # a reconnecting broker or database: try again
                last = {"error": 1}
                say(f"drain check failed: {exc!r}")
            stable = stable + 1 if not any(last.values()) else 0
            if stable >= 2:
                return True, time.monotonic() - started, last
            if time.monotonic() - started > timeout:
                return False, time.monotonic() - started, last
            if time.monotonic() > next_report:
                say(f"draining: {', '.join(f'{k} {v}' for k, v in last.items() if v) or 'settling'}")
                next_report += 10
            await asyncio.sleep(1.0)


def _expected_paid(flow: Flow) -> int:
    paid = sum(int(c.json_body["amount"]) for c in flow.accepted("pay"))
    if any(c.event is not None and c.event["type"] == "checkout.session.completed" for c in flow.accepted("webhook")):
        paid += flow.total
    return paid


@dataclass
class Findings:
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    info: dict[str, int] = field(default_factory=dict)


async def read_topic(bootstrap: str, topic: str) -> list[tuple[int, int, str | None, CloudEvent]]:
    """Every record of ``topic`` from the beginning to its end now: (partition, offset, key, event)."""
    from aiokafka import AIOKafkaConsumer

    partitions = (await topic_partitions(bootstrap)).get(topic, [])
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[tuple[int, int, str | None, CloudEvent]] = []
        deadline = time.monotonic() + 120
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset < ends[tp]:
                        records.append((tp.partition, m.offset, m.key.decode() if m.key else None,
                                        CloudEvent.model_validate_json(m.value)))
        return records
    finally:
        await consumer.stop()


def _message_ids_in_sink(mail_dir: Path) -> Counter[str]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    seen: Counter[str] = Counter()
    for path in mail_dir.glob("*.eml"):
        with path.open("rb") as handle:
            message_id = parser.parse(handle).get("Message-ID")
        seen[_norm_mid(str(message_id or ""))] += 1
    return seen


def _norm_mid(value: str) -> str:
    return value.strip().strip("<>").strip()


async def reconcile(stack: Stack, ledger: Ledger) -> Findings:
    found = Findings()
    flows = [f for f in ledger.flows if f.accepted("create")]
    async with Databases(stack) as dbs:
        invoices = {str(r["id"]): r for r in await dbs["invoice"].fetch(
            "SELECT id, notes, status, total, amount_paid, invoice_number, number_year, number_seq FROM invoices")}
        invoice_payments = await dbs["invoice"].fetch(
            "SELECT invoice_id, payment_id, kind, amount FROM invoice_payments")
        payments = await dbs["payments"].fetch(
            "SELECT id, invoice_id, amount, source, status, stripe_checkout_session_id, stripe_payment_intent_id "
            "FROM payments")
        notifications = await dbs["notifications"].fetch(
            "SELECT invoice_id, kind, status, smtp_message_id FROM notifications")
        outbox_dups = 0
        for name in OUTBOX_DATABASES:
            outbox_dups += int(await dbs[name].fetchval(
                "SELECT count(*) - count(DISTINCT event_id) FROM outbox"))
    invoice_events = await read_topic(stack.kafka.bootstrap, topics.INVOICE)
    payment_events = await read_topic(stack.kafka.bootstrap, topics.PAYMENT)
    deadletters = await read_topic(stack.kafka.bootstrap, topics.DEADLETTER)

    by_marker: dict[str, list[str]] = defaultdict(list)
    for invoice_id, row in invoices.items():
        by_marker[row["notes"] or ""].append(invoice_id)
    ours = {f.marker for f in ledger.flows}
    for marker in by_marker:
        if marker not in ours:
            found.inconsistent.append(f"invoice(s) {by_marker[marker]} with unknown notes {marker!r}")
    for flow in ledger.flows:
        if not flow.accepted("create") and by_marker.get(flow.marker):
            found.inconsistent.append(f"flow {flow.n}: invoice {by_marker[flow.marker]} exists, its create refused")

    payments_of: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for p in payments:
        if p["status"] == "succeeded":
            payments_of[p["invoice_id"]].append(p)
    applied_of: dict[str, Counter[str]] = defaultdict(Counter)
    applied_sum: dict[str, int] = defaultdict(int)
    for row in invoice_payments:
        if row["kind"] == "payment":
            applied_of[str(row["invoice_id"])][row["payment_id"]] += 1
            applied_sum[str(row["invoice_id"])] += row["amount"]

    # Kafka: per invoice its events in partition order; versions must never go back.
    events_of: dict[str, list[tuple[int, int, CloudEvent]]] = defaultdict(list)
    for partition, offset, key, event in invoice_events:
        if key != event.subject:
            found.inconsistent.append(f"{event.type} {event.id} keyed {key!r}, subject {event.subject}")
        events_of[event.subject or ""].append((partition, offset, event))
    copies = len(invoice_events) - len({e.id for _, _, _, e in invoice_events})
    pay_events_of: dict[str, list[tuple[int, CloudEvent]]] = defaultdict(list)
    for _, offset, _, event in payment_events:
        pay_events_of[str(event.data.get("invoiceId"))].append((offset, event))
    copies += len(payment_events) - len({e.id for _, _, _, e in payment_events})
    found.info["kafka_redelivered_copies"] = copies
    found.info["outbox_duplicate_rows"] = outbox_dups
    found.info["deadletters"] = len(deadletters)
    for _, _, _, event in deadletters:
        found.inconsistent.append(f"parked on {topics.DEADLETTER}: {event.type} {event.id} ({event.subject})")

    sink = _message_ids_in_sink(stack.endpoints.mail_dir or stack.root / "mail")
    logged = {_norm_mid(r["smtp_message_id"]) for r in notifications}
    for mid, count in sink.items():
        if mid not in logged:
            found.inconsistent.append(f"email {mid} in the sink ({count}x) but not in the notifications log")
    found.info["email_redeliveries_same_message_id"] = sum(n - 1 for n in sink.values() if n > 1)
    mails_of: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in notifications:
        mails_of[r["invoice_id"] or ""].append(r)

    for flow in flows:
        label = f"flow {flow.n} ({flow.mode}) invoice {flow.invoice_id}"
        rows = by_marker.get(flow.marker, [])
        if not rows:
            found.lost.append(f"{label}: accepted invoice missing")
            continue
        if len(rows) > 1:
            found.doubled.append(f"{label}: {len(rows)} invoices for one create: {rows}")
        if flow.invoice_id not in rows:
            found.inconsistent.append(f"{label}: the API answered id {flow.invoice_id}, stored {rows}")
            continue
        inv = invoices[flow.invoice_id]
        invoice_id = flow.invoice_id
        sent = bool(flow.accepted("send"))
        if sent and (inv["status"] == InvoiceStatus.DRAFT.value or not inv["invoice_number"]):
            found.lost.append(f"{label}: accepted send but {inv['status']} without a number")
        # payments ------------------------------------------------------------------------------
        stored = payments_of.get(invoice_id, [])
        stored_ids = {str(p["id"]) for p in stored}
        for payment_id in flow.manual_payment_ids:
            if payment_id not in stored_ids:
                found.lost.append(f"{label}: accepted manual payment {payment_id} not in payments")
        manual = [p for p in stored if p["source"] == "manual"]
        if len(manual) > len(flow.manual_payment_ids):
            found.doubled.append(f"{label}: {len(manual)} manual payments, {len(flow.manual_payment_ids)} accepted")
        webhook_paid = any(c.event is not None and c.event["type"] == "checkout.session.completed"
                           for c in flow.accepted("webhook"))
        stripe_rows = [p for p in stored if p["source"] == "stripe"]
        if webhook_paid and not any(p["stripe_checkout_session_id"] == flow.session_id for p in stripe_rows):
            found.lost.append(f"{label}: accepted checkout.session.completed, no payment for {flow.session_id}")
        if len(stripe_rows) > (1 if webhook_paid else 0):
            found.doubled.append(f"{label}: {len(stripe_rows)} Stripe payments for one Checkout")
        distinct_sum = sum(p["amount"] for p in stored)
        expected = _expected_paid(flow)
        if distinct_sum != expected and not found_for(found, label):
            found.inconsistent.append(f"{label}: payments sum {distinct_sum}, the ledger accepted {expected}")
        if inv["amount_paid"] != distinct_sum:
            found.inconsistent.append(f"{label}: amountPaid {inv['amount_paid']} != sum of payments {distinct_sum}")
        applied = applied_of.get(invoice_id, Counter())
        if any(n > 1 for n in applied.values()):
            found.doubled.append(f"{label}: a payment applied twice to the invoice: {dict(applied)}")
        if set(applied) != stored_ids or applied_sum.get(invoice_id, 0) != distinct_sum:
            found.inconsistent.append(f"{label}: invoice_payments {dict(applied)} vs payments {sorted(stored_ids)}")
        fully_paid = inv["total"] > 0 and inv["amount_paid"] == inv["total"]
        if fully_paid != (inv["status"] == InvoiceStatus.PAID.value):
            found.inconsistent.append(f"{label}: {inv['status']} with {inv['amount_paid']} of {inv['total']} paid")
        # Kafka ---------------------------------------------------------------------------------
        events = sorted(events_of.get(invoice_id, []), key=lambda t: (t[0], t[1]))
        if len({p for p, _, _ in events}) > 1:
            found.inconsistent.append(f"{label}: its events on more than one partition")
        last_version = 0
        for _, offset, event in events:
            version = int(event.data.get("version", 0))
            if version < last_version:
                found.inconsistent.append(f"{label}: {event.type} v{version} after v{last_version} (offset {offset})")
            last_version = max(last_version, version)
        paid_ids = {e.id for _, _, e in events if e.type == InvoiceEventType.PAID.value}
        if inv["status"] == InvoiceStatus.PAID.value and not paid_ids:
            found.lost.append(f"{label}: PAID but no invoice.paid on Kafka")
        if len(paid_ids) > 1:
            found.doubled.append(f"{label}: invoice.paid {len(paid_ids)} times on Kafka")
        if paid_ids and inv["status"] != InvoiceStatus.PAID.value:
            found.inconsistent.append(f"{label}: invoice.paid on Kafka, the invoice reads {inv['status']}")
        settled = {PaymentEventType.SUCCEEDED.value, PaymentEventType.RECORDED.value}
        pay_events = sorted(pay_events_of.get(invoice_id, []), key=lambda t: t[0])
        per_payment: dict[str, set[str]] = defaultdict(set)
        for _, event in pay_events:
            if event.type in settled:
                per_payment[str(event.data.get("paymentId"))].add(event.id)
        for payment_id in stored_ids:
            if not per_payment.get(payment_id):
                found.lost.append(f"{label}: payment {payment_id} never announced on {topics.PAYMENT}")
            elif len(per_payment[payment_id]) > 1:
                found.doubled.append(f"{label}: payment {payment_id} announced {len(per_payment[payment_id])} times")
        # emails --------------------------------------------------------------------------------
        mails = mails_of.get(invoice_id, [])
        kinds = Counter(r["kind"] for r in mails if r["status"] != "skipped")  # skipped: never mailed
        if sent and kinds["invoice_sent"] != 1:
            bucket = found.lost if kinds["invoice_sent"] == 0 else found.doubled
            bucket.append(f"{label}: {kinds['invoice_sent']} invoice_sent messages")
        if kinds["payment_receipt"] != len(stored):
            bucket = found.lost if kinds["payment_receipt"] < len(stored) else found.doubled
            bucket.append(f"{label}: {kinds['payment_receipt']} receipts for {len(stored)} payments")
        if kinds["payment_failed"] > _failures_before_settled(pay_events, inv["total"]):
            found.inconsistent.append(f"{label}: 'please try again' mailed for an invoice already paid")
        for r in mails:
            if r["status"] != "sent" and not (r["kind"] == "payment_failed" and r["status"] == "skipped"):
                found.lost.append(f"{label}: {r['kind']} email {r['status']}")
            elif r["status"] == "sent" and sink[_norm_mid(r["smtp_message_id"])] == 0:
                found.lost.append(f"{label}: {r['kind']} email marked sent, not in the sink")
        unexpected = set(kinds) - {"invoice_sent", "payment_receipt", "payment_failed"}
        if unexpected:
            found.inconsistent.append(f"{label}: unexpected emails {sorted(unexpected)}")

    # numbers per year: 1..n, once each
    seqs: dict[int, list[int]] = defaultdict(list)
    for row in invoices.values():
        if row["number_year"] is not None:
            seqs[row["number_year"]].append(row["number_seq"])
            if row["invoice_number"] != f"{row['number_year']}-{row['number_seq']:04d}":
                found.inconsistent.append(f"invoice {row['id']}: number {row['invoice_number']} vs its year/seq")
    for year, values in seqs.items():
        dupes = [v for v, n in Counter(values).items() if n > 1]
        if dupes:
            found.doubled.append(f"{year}: invoice numbers used twice: {dupes[:10]}")
        gaps = sorted(set(range(1, max(values) + 1)) - set(values))
        if gaps:
            found.inconsistent.append(f"{year}: invoice number gaps: {gaps[:10]}")
    found.info["invoices_numbered"] = sum(len(v) for v in seqs.values())
    found.info["invoices_paid"] = sum(1 for r in invoices.values() if r["status"] == InvoiceStatus.PAID.value)
    found.info["payments_succeeded"] = sum(len(v) for v in payments_of.values())
    found.info["emails_logged"] = len(notifications)
    found.info["emails_in_sink"] = sum(sink.values())
    return found


def found_for(found: Findings, label: str) -> bool:
    """Already reported as lost or doubled: the sum mismatch that follows is not a third finding."""
    return any(item.startswith(label) for item in (*found.lost, *found.doubled))


def _failures_before_settled(pay_events: list[tuple[int, CloudEvent]], total: int) -> int:
    """payment.failed events that reached billing.payment before the payments covered the total
    (the only ones the design allows to be mailed)."""
    paid = 0
    failures = 0
    for _, event in pay_events:
        if event.type in (PaymentEventType.SUCCEEDED.value, PaymentEventType.RECORDED.value):
            paid += int(event.data.get("amount", 0))
        elif event.type == PaymentEventType.FAILED.value and paid < total:
            failures += 1
    return failures


# --------------------------------------------------------------------------------------------------
# after the load: unknown outcomes, replays


async def settle_unknowns(stack: Stack, ledger: Ledger, token: str) -> tuple[int, int]:
    """Ask again, with the same key, every request whose outcome the client never learned."""
    unknown = [c for c in ledger.calls() if c.outcome == "unknown"]
    async with httpx.AsyncClient(base_url=stack.url(GATEWAY), timeout=40.0,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(http, Ledger(), secret=stack.endpoints.stripe_webhook_secret, deadline=120.0)
        for call in unknown:
            await client.send(call)
            call.resolved = call.outcome != "unknown"
    for flow in ledger.flows:  # what an accepted answer tells us, now that we have it
        for call in flow.calls:
            if call.resolved and call.outcome == "accepted":
                if call.step == "create":
                    flow.invoice_id, flow.total = call.body["id"], call.body["total"]
                elif call.step == "pay" and call.body["id"] not in flow.manual_payment_ids:
                    flow.manual_payment_ids.append(call.body["id"])
    return len(unknown), sum(1 for c in unknown if c.outcome == "unknown")


async def replay_sample(stack: Stack, ledger: Ledger, token: str, every: int = 10) -> tuple[int, list[str]]:
    """Send every ``every``-th accepted request again with its key: it must answer the same, act never."""
    sample = [c for c in ledger.calls() if c.key and c.outcome == "accepted" and c.step != "setup"][::every]
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=stack.url(GATEWAY), timeout=40.0,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(http, Ledger(), secret=stack.endpoints.stripe_webhook_secret, deadline=60.0)
        for original in sample:
            again = await client.send(Call(original.flow, "replay", original.method, original.path, original.key,
                                           json_body=original.json_body))
            same = (again.status == original.status and isinstance(again.body, dict)
                    and again.body.get("id") == original.body.get("id")
                    and again.body.get("invoiceNumber") == original.body.get("invoiceNumber"))
            if not same:
                problems.append(f"flow {original.flow} {original.step} {original.path}: first {original.status} "
                                f"{_short(original.body)}, replay {again.status} {_short(again.body)}")
    return len(sample), problems


def _short(body: Any) -> str:
    return json.dumps(body)[:160] if body is not None else "-"


# --------------------------------------------------------------------------------------------------
# the run


def login(base_url: str, password: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.post(f"{base_url}/api/auth/login", timeout=10.0,
                                  json={"email": "admin@example.com", "password": password})
            if response.status_code == 200:
                return str(response.json()["accessToken"])
            error = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = repr(exc)
        if time.monotonic() > deadline:
            raise InfraError(f"cannot log in as the admin: {error}")
        time.sleep(0.5)


async def create_clients(stack: Stack, ledger: Ledger, token: str, run_id: str) -> list[str]:
    async with httpx.AsyncClient(base_url=stack.url(GATEWAY), timeout=40.0,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(http, ledger, secret=stack.endpoints.stripe_webhook_secret, deadline=60.0)
        ids = []
        for i in range(CLIENTS):
            call = Call(-1, "setup", "POST", "/api/clients", new_key(f"client{i}"), json_body={
                "name": f"Chaos Client {run_id} {i}", "email": f"ap{i}@chaos.example.com", "currency": "EUR"})
            ledger.setup_calls.append(call)
            if (await client.send(call)).outcome != "accepted":
                raise InfraError(f"cannot create a client: {call.status} {call.body}")
            ids.append(call.body["id"])
        return ids


def start_services(stack: Stack) -> None:
    for spec in SERVICES:
        # JSON logs, as in containers: the console renderer prints each exception as a rich traceback
        # with every frame's locals (some 30,000 lines per error, seconds of CPU in the event loop),
        # which after a PostgreSQL crash kept the invoice service from answering for minutes.
        extra = {f"{spec.env_prefix}OUTBOX_POLL_INTERVAL": "0.5", f"{spec.env_prefix}LOG_JSON": "true"}
        if spec.name == "invoice":
            extra["INVOICE_OVERDUE_SCAN_INTERVAL"] = "3600"
        if spec.name == "notifications":
            # A message claimed by a replica that was killed is taken over after its lease: short here
            # so the run drains in bounded time (the guarantee is the same, only sooner).
            extra |= {"NOTIFICATIONS_LEASE_SECONDS": "20", "NOTIFICATIONS_RETRY_BASE_DELAY": "1",
                      "NOTIFICATIONS_RETRY_MAX_DELAY": "5", "NOTIFICATIONS_SCAN_INTERVAL": "0"}
        if spec.name == GATEWAY:
            # A key whose request died with a killed gateway is taken over after this (the service,
            # which recorded the key with the effect, replays): 120 s by default.
            extra["GATEWAY_IDEMPOTENCY_LOCK_TIMEOUT_SECONDS"] = "10"
        stack.start_service(spec.name, **extra)


@dataclass
class Report:
    duration_s: float
    seed: int
    flows: int
    invoices_accepted: int
    requests_sent: int
    requests_accepted: int
    requests_refused: int
    requests_unknown: int
    unknown_unresolved: int
    errors_total: int
    errors_outside_faults: int
    replayed: int
    faults: list[dict[str, Any]]
    drained: bool
    drain_s: float
    drain_left: dict[str, int]
    lost: int
    doubled: int
    inconsistent: int
    findings: dict[str, list[str]]
    info: dict[str, int]
    unknown_calls: list[str] = field(default_factory=list)
    errors_outside: list[str] = field(default_factory=list)
    stack_root: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # the last pid of each process started

    @property
    def ok(self) -> bool:
        return (not (self.lost or self.doubled or self.inconsistent or self.unknown_unresolved)
                and self.drained and all(f["injected"] and f["restarted"] and f["recover_s"] is not None
                                         for f in self.faults))


def execute(stack: Stack, args: argparse.Namespace) -> Report:
    ledger = Ledger()
    run_id = uuid.uuid4().hex[:6]
    token = login(stack.url(GATEWAY), stack.endpoints.admin_password)
    client_ids = asyncio.run(create_clients(stack, ledger, token, run_id))
    load = Load(stack, ledger, token=token, client_ids=client_ids, seed=args.seed, concurrency=args.concurrency,
                max_invoices=args.invoices, request_deadline=args.request_deadline, run_id=run_id)
    faults = Faults(stack, ledger, token)
    records: list[FaultRecord] = []
    thread = threading.Thread(target=load.run, name="chaos-load", daemon=True)
    started = time.monotonic()
    say(f"load: {args.concurrency} clients for {args.duration:.0f}s (at most {args.invoices} invoices), "
        f"faults: {', '.join(args.faults)}")
    thread.start()
    warmup = min(10.0, args.duration * 0.1)
    spacing = max(args.duration - warmup - 5.0, 1.0) / max(len(args.faults), 1)
    next_progress = started + 10
    try:
        for i, name in enumerate(args.faults):
            at = started + warmup + i * spacing
            while time.monotonic() < at and not load.done.is_set():
                time.sleep(0.2)
                next_progress = _progress(ledger, started, next_progress)
            if load.done.is_set():
                say(f"the load ended (--invoices {args.invoices} reached) before fault {name}")
            records.append(faults.inject(name))
        while time.monotonic() - started < args.duration and not load.done.is_set():
            time.sleep(0.2)
            next_progress = _progress(ledger, started, next_progress)
    finally:
        load.stop.set()
        faults.close()
    say("load stopping: waiting for the requests in flight...")
    thread.join(args.request_deadline + 60)
    elapsed = time.monotonic() - started
    unknown_calls = [f"flow {c.flow} {c.step} {c.path} (last answer {c.status}, {c.attempts} attempts)"
                     for c in ledger.calls() if c.outcome == "unknown"]
    unknown, unresolved = asyncio.run(settle_unknowns(stack, ledger, token))
    say(f"unknown outcomes: {unknown}, still unknown after asking again: {unresolved}")
    drained, drain_s, left = asyncio.run(drain(stack, ledger, args.drain_timeout))
    say(f"pipeline {'drained' if drained else 'NOT drained'} in {drain_s:.1f}s")
    replayed, replay_problems = asyncio.run(replay_sample(stack, ledger, token))
    found = asyncio.run(reconcile(stack, ledger))
    found.doubled += replay_problems
    fault_windows(records, ledger)
    calls = list(ledger.calls())
    in_window = [(r.at, (r._recovered_at or r._restarted_at or r.at) + 2.0) for r in records if r.injected]
    errors = [a for a in ledger.attempts if not a.ok]
    outside = [a for a in errors if not any(lo <= a.ended <= hi for lo, hi in in_window)]
    findings = {"lost": found.lost, "doubled": found.doubled, "inconsistent": found.inconsistent}
    refused = [c for c in calls if c.outcome == "refused"]
    findings["inconsistent"] += [f"flow {c.flow} {c.step} {c.path}: refused {c.status} {_short(c.body)}"
                                 for c in refused]
    return Report(
        duration_s=round(elapsed, 1), seed=args.seed, flows=len(ledger.flows),
        invoices_accepted=sum(1 for f in ledger.flows if f.accepted("create")),
        requests_sent=len(ledger.attempts),
        requests_accepted=sum(1 for c in calls if c.outcome == "accepted"),
        requests_refused=len(refused), requests_unknown=unknown, unknown_unresolved=unresolved,
        errors_total=len(errors),
        errors_outside_faults=len(outside),
        unknown_calls=unknown_calls,
        errors_outside=[f"+{a.ended - load.started_at:.1f}s {a.step}: {a.status}" for a in outside],
        replayed=replayed,
        faults=[{k: v for k, v in asdict(r).items() if not k.startswith("_")} for r in records],
        drained=drained, drain_s=round(drain_s, 1), drain_left=left,
        lost=len(findings["lost"]), doubled=len(findings["doubled"]), inconsistent=len(findings["inconsistent"]),
        findings=findings, info=found.info,
    )


def _progress(ledger: Ledger, started: float, next_at: float) -> float:
    if time.monotonic() < next_at:
        return next_at
    calls = list(ledger.calls())
    accepted = sum(1 for c in calls if c.outcome == "accepted")
    errors = sum(1 for a in ledger.attempts if not a.ok)
    paid = sum(1 for f in ledger.flows if f.total and _expected_paid(f) == f.total)
    say(f"+{time.monotonic() - started:5.0f}s  invoices {len(ledger.flows)}  paid {paid}  requests "
        f"{len(ledger.attempts)}  accepted {accepted}  errors {errors}")
    return time.monotonic() + 10  # not next_at + 10: a long fault must not leave a backlog of lines


def print_report(report: Report) -> None:
    lines = ["", "=" * 78, f"chaos run: {report.duration_s:.0f}s of load, seed {report.seed}", ""]
    lines += [
        f"  invoices created            {report.invoices_accepted} (flows {report.flows})",
        f"  requests sent (attempts)    {report.requests_sent}",
        f"  requests accepted (2xx)     {report.requests_accepted}",
        f"  requests refused (4xx)      {report.requests_refused}",
        f"  outcome unknown             {report.requests_unknown} (still unknown after asking again: "
        f"{report.unknown_unresolved})",
        f"  failed attempts             {report.errors_total} ({report.errors_outside_faults} outside fault windows)",
        f"  replayed with their key     {report.replayed}",
        "",
        f"  {'fault':<14}{'injected':>9}{'errors':>8}{'back (s)':>10}{'answers (s)':>13}{'1st load ok (s)':>17}",
    ]
    for f in report.faults:
        lines.append(f"  {f['name']:<14}{'yes' if f['injected'] and f['restarted'] else 'NO':>9}{f['errors']:>8}"
                     f"{_num(f['down_s']):>10}{_num(f['recover_s']):>13}{_num(f['first_ok_s']):>17}"
                     + (f"  {f['error'].splitlines()[0]}" if f["error"] else ""))
        if len(f["probes"]) > 1:
            lines.append("      answers: " + ", ".join(f"{path} {sec:.1f}s" for path, sec in f["probes"].items()))
    lines += [
        "",
        f"  pipeline drained            {'yes' if report.drained else 'NO'} in {report.drain_s}s"
        + ("" if report.drained else f" (left: {report.drain_left})"),
        "  " + ", ".join(f"{k} {v}" for k, v in report.info.items()),
        *(f"  outcome unknown: {item}" for item in report.unknown_calls),
        *(f"  failed outside fault windows: {item}" for item in report.errors_outside[:10]),
        "",
        f"  lost {report.lost} / doubled {report.doubled} / inconsistent {report.inconsistent}",
    ]
    for kind, items in report.findings.items():
        for item in items[:20]:
            lines.append(f"    {kind}: {item}")
        if len(items) > 20:
            lines.append(f"    {kind}: ... {len(items) - 20} more")
    lines += ["", "RESULT: " + ("OK" if report.ok else "FAILED"), "=" * 78]
    print("\n".join(lines), flush=True)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of load (default 240)")
    parser.add_argument("--invoices", type=int, default=5000, help="at most this many invoices (default 5000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed of amounts and webhook orders")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--faults", default=",".join(ALL_FAULTS),
                        help=f"comma-separated faults, in this order (default: {','.join(ALL_FAULTS)})")
    parser.add_argument("--request-deadline", type=float, default=90.0,
                        help="seconds a client keeps retrying one request before its outcome is unknown")
    parser.add_argument("--drain-timeout", type=float, default=240.0, help="seconds to wait for the pipeline")
    parser.add_argument("--fast-postgres", action="store_true", help="PostgreSQL with fsync off")
    parser.add_argument("--logs", type=Path, default=RUN_DIR / "chaos-logs",
                        help="where the logs of a failed run are copied (default .run/chaos-logs)")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in args.faults if f not in ALL_FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; known: {', '.join(ALL_FAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    report: Report | None = None
    say("starting PostgreSQL, Kafka, stripe-mock, the mail sink and every service on free loopback ports...")
    try:
        with running_stack([], durable=not args.fast_postgres, with_stripe=True, with_mail=True) as stack:
            try:
                start_services(stack)
                report = execute(stack, args)
                report.stack_root = str(stack.root)
                report.pids = {name: p.pid for name, p in stack.processes.items() if p.pid is not None}
                if stack.kafka._proc.pid is not None:
                    report.pids["kafka"] = stack.kafka._proc.pid
            finally:
                for process in reversed(list(stack.processes.values())):
                    with contextlib.suppress(Exception):
                        process.stop()
                if report is None or not report.ok:
                    _keep_logs(stack, args.logs)
    except KeyboardInterrupt:
        say("interrupted: everything stopped")
        return 130
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2) + "\n")
    return 0 if report.ok else 1


def _keep_logs(stack: Stack, target: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(stack.root / "logs", target)
        for name in ("kafka/logs", "pg/postgres.log"):
            source = stack.root / name
            if source.is_dir():
                shutil.copytree(source, target / name.replace("/", "-"))
            elif source.is_file():
                shutil.copy(source, target / Path(name).name)
        say(f"logs kept in {target}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

