"""Start real infrastructure and services for a benchmark run (same launch path as `make run`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from deploy.infra import (
    RUN_DIR,
    KafkaServer,
    MailSink,
    PostgresServer,
    ServiceProcess,
    StripeMock,
    ensure_kafka_jars,
    free_port,
    free_ports,
    make_traversable,
)
from deploy.services import SERVICES, InfraEndpoints, make_service_process, service_by_name


class LoadObserver(Protocol):
    """Watches the service processes while a bench's measured load runs (bench.profile's py-spy)."""

    def start(self, stack: Stack) -> None: ...

    def stop(self) -> None: ...


# Set by `python -m bench.profile`; None in a plain run, so the hooks below cost nothing.
OBSERVER: LoadObserver | None = None


@dataclass
class Stack:
    root: Path
    postgres: PostgresServer
    kafka: KafkaServer
    endpoints: InfraEndpoints
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    stripe_pid: int | None = None  # stripe-mock's, when the stack has it

    def url(self, name: str) -> str:
        return self.endpoints.url_of(name)

    def start_service(self, name: str, **extra_env: str) -> ServiceProcess:
        process = make_service_process(service_by_name(name), self.endpoints, self.root / "logs", extra_env=extra_env)
        process.start()
        self.processes[name] = process
        return process

    def load_begins(self) -> None:
        """A bench calls this as its measured load on the services starts (after setup and the bare run)."""
        if OBSERVER is not None:
            OBSERVER.start(self)

    def load_ends(self) -> None:
        """...and this when it is over, before it stops any process; called again at the stack's exit."""
        if OBSERVER is not None:
            OBSERVER.stop()


@contextlib.contextmanager
def running_stack(services: Sequence[str], *, durable: bool = True, with_stripe: bool = False,
                  with_mail: bool = False) -> Iterator[Stack]:
    """Postgres (fsync on unless durable=False), Kafka, optional stripe-mock / mail sink, then `services`."""
    root = RUN_DIR / f"bench-{int(time.time())}"
    root.mkdir(parents=True, exist_ok=True)
    make_traversable(root)
    stops: list[Callable[[], None]] = []
    try:
        postgres = PostgresServer(root / "pg", free_port(), fast=not durable)
        postgres.ensure_installed()
        postgres.start()
        stops.append(postgres.stop)
        kafka_port, controller_port = free_ports(2)
        jars = ensure_kafka_jars(RUN_DIR / "kafka-jars")
        kafka = KafkaServer(root / "kafka", kafka_port, controller_port, jars_dir=jars)
        kafka.start()
        stops.append(kafka.stop)
        stripe_url, smtp_port, stripe_pid = "http://127.0.0.1:1", 1, None
        if with_stripe:
            stripe = StripeMock(free_port(), bin_dir=RUN_DIR / "bin", log_path=root / "logs" / "stripe-mock.log")
            stripe.start()
            stops.append(stripe.stop)
            stripe_url, stripe_pid = stripe.url, stripe.pid
        if with_mail:
            sink = MailSink(root / "mail", free_port(), log_path=root / "logs" / "mailsink.log")
            sink.start()
            stops.append(sink.stop)
            smtp_port = sink.port
        endpoints = InfraEndpoints(
            kafka_bootstrap=kafka.bootstrap,
            database_urls={s.name: postgres.create_database(s.database_name) for s in SERVICES},
            stripe_api_base=stripe_url,
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            mail_dir=root / "mail",
            ports=dict(zip([s.name for s in SERVICES], free_ports(len(SERVICES)), strict=True)),
        )
        stack = Stack(root=root, postgres=postgres, kafka=kafka, endpoints=endpoints, stripe_pid=stripe_pid)
        for name in services:
            stack.start_service(name)
            stops.append(stack.processes[name].stop)
        try:
            yield stack
        finally:
            stack.load_ends()
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class LoadResult:
    label: str
    latencies: list[float]
    errors: int
    elapsed: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    def line(self, unit: str = "req", width: int = 38) -> str:
        return (f"{self.label:<{width}} {self.rate:8.1f} {unit}/s   p50 {self.pct(50) * 1000:7.1f} ms   "
                f"p99 {self.pct(99) * 1000:7.1f} ms   n={len(self.latencies)} errors={self.errors}")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(q) - 1, 0), 98)]


async def run_load(label: str, operation: Callable[[int], Awaitable[None]], *, concurrency: int,
                   duration: float, warmup: float = 1.0) -> LoadResult:
    """Call `operation(i)` from `concurrency` workers for `duration` seconds after a warm-up."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    loop = asyncio.get_running_loop()
    start_measuring = loop.time() + warmup
    stop_at = start_measuring + duration

    async def worker() -> None:
        nonlocal errors, counter
        while (now := loop.time()) < stop_at:
            counter += 1
            began = loop.time()
            try:
                await operation(counter)
            except Exception as exc:
                if now >= start_measuring:
                    errors += 1
                    if errors <= 3:
                        print(f"  [{label}] error: {exc!r}", file=sys.stderr)
                continue
            if began >= start_measuring:
                latencies.append(loop.time() - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(label, latencies, errors, duration)
