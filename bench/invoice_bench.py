"""Issue 2 benchmark: creating and sending invoices through the gateway vs a bare FastAPI endpoint.

    python -m bench.invoice_bench [--concurrency 16] [--duration 15]

Prints requests/s and p50/p99 for: the bare endpoint, invoice create through the gateway, and
create + send (two calls) through the gateway; the ratio of the create path to the bare endpoint
(target >= 25%); and the p99 delay from the DB commit to the event being on Kafka (target < 250 ms),
measured as the time a consumer receives each invoice.created minus the event's own timestamp,
which is taken just before the commit (so the figure slightly over-states the delay).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer

from bench.stack import LoadResult, Stack, percentile, run_load, running_stack
from contracts.envelope import CloudEvent
from deploy.infra import ServiceProcess, free_port

ITEMS = [
    {"description": "Design sprint", "quantity": "3", "unitPrice": 45_000, "taxRate": "20"},
    {"description": "Hosting (monthly)", "quantity": "1", "unitPrice": 2_900},
]


async def _collect_delays(bootstrap: str, ready: Any, stop: Any) -> list[float]:
    consumer = AIOKafkaConsumer("billing.invoice", bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                group_id=f"bench-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    delays: list[float] = []
    try:
        await consumer.seek_to_end()
        ready.set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            received = datetime.now(UTC)
            for records in batch.values():
                for record in records:
                    event = CloudEvent.model_validate_json(record.value)
                    if event.type == "invoice.created":
                        delays.append((received - event.time).total_seconds())
    finally:
        await consumer.stop()
    return delays


def _delay_probe(bootstrap: str, ready: Any, stop: Any, results: Any) -> None:
    """In its own process, so the load generator's busy event loop doesn't delay the reading."""
    results.put(asyncio.run(_collect_delays(bootstrap, ready, stop)))


async def bench(stack: Stack, bare_url: str, concurrency: int, duration: float) -> int:
    gateway = stack.url("gateway")
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
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

            bare_result = await run_load("bare FastAPI endpoint", bare, concurrency=concurrency, duration=duration)

        async def create(_: int) -> None:
            (await http.post("/api/invoices", json={"clientId": client_id, "items": ITEMS})).raise_for_status()

        async def create_and_send(_: int) -> None:
            created = await http.post("/api/invoices", json={"clientId": client_id, "items": ITEMS})
            created.raise_for_status()
            (await http.post(f"/api/invoices/{created.json()['id']}/send")).raise_for_status()

        mp = multiprocessing.get_context("spawn")
        ready, stop, results = mp.Event(), mp.Event(), mp.Queue()
        probe = mp.Process(target=_delay_probe, args=(stack.kafka.bootstrap, ready, stop, results), daemon=True)
        probe.start()
        await asyncio.to_thread(ready.wait, 60)
        create_result = await run_load("create invoice (gateway)", create, concurrency=concurrency,
                                       duration=duration)
        send_result = await run_load("create + send (gateway, 2 calls)", create_and_send,
                                     concurrency=concurrency, duration=duration)
        await asyncio.sleep(2.0)  # let the last events arrive
        stop.set()
        delays = await asyncio.to_thread(results.get, True, 60)
        probe.join(10)

    report(concurrency, bare_result, create_result, send_result, delays)
    return 0


def report(concurrency: int, bare: LoadResult, create: LoadResult, send: LoadResult, delays: list[float]) -> None:
    print(f"\n== invoice create path, concurrency {concurrency}, 2-core machine, fsync on ==")
    print(bare.line())
    print(create.line())
    print(send.line("invoice"))
    ratio = create.rate / bare.rate if bare.rate else 0.0
    send_ratio = send.rate / bare.rate if bare.rate else 0.0
    print(f"ratio create / bare:            {ratio:6.1%}  (target >= 25%)")
    print(f"ratio create+send / bare:       {send_ratio:6.1%}")
    p99 = percentile(delays, 99) * 1000
    print(f"commit -> Kafka delay:          p50 {percentile(delays, 50) * 1000:.1f} ms   p99 {p99:.1f} ms"
          f"   n={len(delays)}  (target p99 < 250 ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invoice_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    args = parser.parse_args(argv)
    print("starting Postgres, Kafka, the invoice service and the gateway...", flush=True)
    with running_stack(["invoice", "gateway"]) as stack:
        bare_port = free_port()
        bare = ServiceProcess("bare", [sys.executable, "-m", "bench.bare_app", str(bare_port)], env=dict(os.environ),
                              port=bare_port, log_path=stack.root / "logs" / "bare.log")
        bare.start()
        try:
            return asyncio.run(bench(stack, bare.url, args.concurrency, args.duration))
        finally:
            bare.stop()


if __name__ == "__main__":
    sys.exit(main())
