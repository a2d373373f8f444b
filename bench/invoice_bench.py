"""Issue 2 / 13 benchmark: creating and sending invoices through the gateway vs a bare FastAPI endpoint.

    python -m bench.invoice_bench [--concurrency 16] [--low-concurrency 4] [--duration 15]

Prints requests/s and p50/p99 for: the bare endpoint, invoice create through the gateway, and
create + send (two calls) through the gateway, all at `--concurrency`, then create again at
`--low-concurrency`; the ratios of the create paths to the bare endpoint (target >= 40% / 20%); and
the delay from the DB commit to the event being on Kafka (target p99 < 100 ms) for each phase,
measured as the time a consumer receives each invoice.created minus the event's own timestamp,
which is taken just before the commit (so the figure slightly over-states the delay).

Checks beside the speed: every invoice answered 201 has exactly one invoice.created on Kafka, every
one sent exactly one invoice.sent after it (per-invoice order), and the invoice numbers in the
invoice database run 1..N without gap or repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer

from bench.cpu import CpuMeter, CpuSplit
from bench.report import Report, current, invoice_numbers, number_gaps, out_of_order
from bench.stack import LoadResult, Stack, percentile, run_load, running_stack
from contracts.envelope import CloudEvent
from deploy.infra import ServiceProcess, free_port

ITEMS = [
    {"description": "Design sprint", "quantity": "3", "unitPrice": 45_000, "taxRate": "20"},
    {"description": "Hosting (monthly)", "quantity": "1", "unitPrice": 2_900},
]


@dataclass(frozen=True)
class Seen:
    """One invoice event as the probe received it (plain tuple-like, so it crosses processes)."""
    type: str
    subject: str
    event_time: float  # epoch seconds, the event's own timestamp (just before the commit)
    delay: float  # receive time minus event_time


async def _collect(bootstrap: str, ready: Any, stop: Any, seen_count: Any) -> list[Seen]:
    consumer = AIOKafkaConsumer("billing.invoice", bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                group_id=f"bench-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    seen: list[Seen] = []
    try:
        await consumer.seek_to_end()
        ready.set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            received = datetime.now(UTC)
            for records in batch.values():
                for record in records:
                    event = CloudEvent.model_validate_json(record.value)
                    if event.subject is not None:
                        seen.append(Seen(event.type, event.subject, event.time.timestamp(),
                                         (received - event.time).total_seconds()))
            seen_count.value = len(seen)
    finally:
        await consumer.stop()
    return seen


def _probe(bootstrap: str, ready: Any, stop: Any, seen_count: Any, results: Any) -> None:
    """In its own process, so the load generator's busy event loop doesn't delay the reading."""
    results.put(asyncio.run(_collect(bootstrap, ready, stop, seen_count)))


@dataclass
class Phase:
    result: LoadResult
    started: float  # epoch seconds of the measured window (after the warm-up)
    ended: float
    concurrency: int
    cpu: CpuSplit  # over the measured window: where the cores went

    def delays(self, seen: list[Seen]) -> list[float]:
        return [s.delay for s in seen if s.type == "invoice.created" and self.started <= s.event_time <= self.ended]


async def measured(label: str, operation: Any, concurrency: int, duration: float, meter: CpuMeter,
                   warmup: float = 1.0) -> Phase:
    began = time.time()
    asyncio.get_running_loop().call_later(warmup, meter.start)  # as run_load starts counting
    result = await run_load(label, operation, concurrency=concurrency, duration=duration, warmup=warmup)
    return Phase(result, began + warmup, time.time(), concurrency, meter.stop())


async def bench(stack: Stack, bare_url: str, args: argparse.Namespace, rep: Report, bare_pid: int | None = None) -> int:
    concurrency, duration = args.concurrency, args.duration
    gateway = stack.url("gateway")
    pool = max(concurrency, args.low_concurrency) * 2
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    created_ids: list[str] = []
    sent_ids: list[str] = []
    async with httpx.AsyncClient(base_url=gateway, limits=limits, timeout=30) as http:
        login = await http.post("/api/auth/login", json={"email": "admin@example.com",
                                                         "password": stack.endpoints.admin_password})
        login.raise_for_status()
        http.headers["Authorization"] = f"Bearer {login.json()['accessToken']}"
        client = await http.post("/api/clients", json={"name": "Bench Ltd", "email": "bench@example.com",
                                                       "currency": "EUR"})
        client.raise_for_status()
        client_id = client.json()["id"]

        async with httpx.AsyncClient(base_url=bare_url, limits=limits, timeout=30) as bare_http:
            async def bare(_: int) -> None:
                (await bare_http.post("/bare", json={"clientId": client_id, "items": ITEMS})).raise_for_status()

            bare_phase = await measured("bare FastAPI endpoint", bare, concurrency, duration,
                                        CpuMeter({}, {"bare endpoint": bare_pid}))
            bare_result, bare_cpu = bare_phase.result, bare_phase.cpu

        async def create(_: int) -> None:
            created = await http.post("/api/invoices", json={"clientId": client_id, "items": ITEMS})
            created.raise_for_status()
            created_ids.append(created.json()["id"])

        async def create_and_send(_: int) -> None:
            created = await http.post("/api/invoices", json={"clientId": client_id, "items": ITEMS})
            created.raise_for_status()
            invoice_id = created.json()["id"]
            created_ids.append(invoice_id)
            (await http.post(f"/api/invoices/{invoice_id}/send")).raise_for_status()
            sent_ids.append(invoice_id)

        mp = multiprocessing.get_context("spawn")
        ready, stop, results, seen_count = mp.Event(), mp.Event(), mp.Queue(), mp.Value("i", 0)
        probe = mp.Process(target=_probe, args=(stack.kafka.bootstrap, ready, stop, seen_count, results),
                           daemon=True)
        probe.start()
        await asyncio.to_thread(ready.wait, 60)
        meter = CpuMeter.of(stack, **{"bench's Kafka probe": probe.pid})
        stack.load_begins()
        create_phase = await measured("create invoice (gateway)", create, concurrency, duration, meter)
        send_phase = await measured("create + send (gateway, 2 calls)", create_and_send, concurrency, duration,
                                    meter)
        low_phase = await measured(f"create invoice (gateway), c={args.low_concurrency}", create,
                                   args.low_concurrency, duration, meter)
        stack.load_ends()
        expected = len(created_ids) + len(sent_ids)
        deadline = time.monotonic() + 60
        while seen_count.value < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - a shared counter
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a doubled event would be right behind the last one
        stop.set()
        seen: list[Seen] = await asyncio.to_thread(results.get, True, 60)
        probe.join(10)

    numbers = await invoice_numbers(stack.endpoints.database_urls["invoice"])
    print(f"\nbare c{concurrency}: {bare_cpu.table(len(bare_result.latencies), 'request')}")
    bare_cpu.record(rep, f"bare c{concurrency}", len(bare_result.latencies), "request")
    report(rep, args, bare_result, create_phase, send_phase, low_phase, seen, created_ids, sent_ids, numbers)
    return 0 if rep.ok else 1


def report(rep: Report, args: argparse.Namespace, bare: LoadResult, create: Phase, send: Phase, low: Phase,
           seen: list[Seen], created_ids: list[str], sent_ids: list[str], numbers: list[tuple[int, int]]) -> None:
    print(f"\n== invoice create path, concurrency {args.concurrency} (and {args.low_concurrency}), "
          f"{os.cpu_count()}-core machine, fsync on ==")
    c, lc = args.concurrency, args.low_concurrency
    for name, result, unit in [(f"bare c{c}", bare, "req"), (f"create c{c}", create.result, "req"),
                               (f"create+send c{c}", send.result, "invoice"), (f"create c{lc}", low.result, "req")]:
        print(result.line(unit))
        rep.load(name, result, f"{unit}/s")
    ratio = rep.ratio(f"create / bare c{c}", create.result.rate, bare.rate, target=">= 40%")
    send_ratio = rep.ratio(f"create+send / bare c{c}", send.result.rate, bare.rate, target=">= 20%")
    print(f"ratio create / bare:            {ratio:6.1%}  (target >= 40%)")
    print(f"ratio create+send / bare:       {send_ratio:6.1%}  (target >= 20%)")
    for name, phase in [(f"create c{c}", create), (f"create+send c{c}", send), (f"create c{lc}", low)]:
        delays = phase.delays(seen)
        p50 = rep.figure(f"commit->kafka {name} p50", percentile(delays, 50) * 1000, "ms")
        p99 = rep.figure(f"commit->kafka {name} p99", percentile(delays, 99) * 1000, "ms")
        print(f"commit -> Kafka, {name:<16} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   n={len(delays)}"
              "  (target p99 < 100 ms)")

    for name, phase, unit in [(f"create c{c}", create, "invoice"), (f"create+send c{c}", send, "invoice"),
                              (f"create c{lc}", low, "invoice")]:
        print(f"\n{name}: {phase.cpu.table(len(phase.result.latencies), unit)}")
        phase.cpu.record(rep, name, len(phase.result.latencies), unit)

    created = Counter(s.subject for s in seen if s.type == "invoice.created")
    sent = Counter(s.subject for s in seen if s.type == "invoice.sent")
    sequences: dict[str, list[str]] = {}
    for s in seen:
        sequences.setdefault(s.subject, []).append(s.type)
    ours = set(created_ids)
    rep.check("invoice.created lost", not (lost := sum(1 for i in ours if created[i] == 0)),
              f"{lost} of {len(ours)} created invoices without invoice.created on Kafka")
    rep.check("invoice.created doubled", not (doubled := sum(1 for i in ours if created[i] > 1)),
              f"{doubled} with more than one")
    rep.check("invoice.sent lost", not (sent_lost := sum(1 for i in sent_ids if sent[i] == 0)),
              f"{sent_lost} of {len(sent_ids)} sent invoices without invoice.sent")
    rep.check("invoice.sent doubled", not (sent_doubled := sum(1 for i in sent_ids if sent[i] > 1)),
              f"{sent_doubled} with more than one")
    disorder = out_of_order({i: sequences.get(i, []) for i in ours}, ["invoice.created", "invoice.sent"])
    rep.check("per-invoice order (created before sent)", not disorder, f"{disorder} invoices out of order")
    in_use, repeats, gaps = number_gaps(numbers)
    rep.check("invoice numbers gapless", not (repeats or gaps) and in_use == len(sent_ids),
              f"{in_use} numbers for {len(sent_ids)} sent, {repeats} repeated, {gaps} missing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invoice_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--low-concurrency", type=int, default=4, help="the second create phase's concurrency")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    args = parser.parse_args(argv)
    rep = current("invoices")
    print("starting Postgres, Kafka, the invoice service and the gateway...", flush=True)
    with running_stack(["invoice", "gateway"]) as stack:
        bare_port = free_port()
        bare = ServiceProcess("bare", [sys.executable, "-m", "bench.bare_app", str(bare_port)], env=dict(os.environ),
                              port=bare_port, log_path=stack.root / "logs" / "bare.log")
        bare.start()
        try:
            return asyncio.run(bench(stack, bare.url, args, rep, bare.pid))
        finally:
            bare.stop()


if __name__ == "__main__":
    sys.exit(main())
