"""Process wiring shared by every service: logging, errors, health, DB, Kafka, outbox relay, jobs.

`/readyz` is 503 while the database or Kafka does not answer, or while the outbox relay or a worker
registered in `ServiceRuntime.workers` is dead, stuck or deaf (kit.worker.PollingWorker.state()), or a
Kafka consumer is dead (its consume tasks ended) or stuck (a partition it holds has lag and no progress
for `consumer_stuck_after` seconds, kit.metrics.ConsumerWatch); its body reports each of them.
`/metrics` serves the Prometheus metrics (kit.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import uvicorn
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import REGISTRY
from starlette.responses import Response

from contracts import topics
from kit import tracing
from kit.child import ChildProcess
from kit.db import Database
from kit.errors import NotFound, install_error_handlers
from kit.logging import CorrelationMiddleware, configure_logging
from kit.metrics import (
    CONTENT_TYPE_LATEST,
    ConsumerLag,
    DbPoolSource,
    HttpMetrics,
    MetricSource,
    OutboxSource,
    Subscription,
    WorkerSource,
    broker_subscriptions,
    exposition,
)
from kit.migrations import upgrade_to_head_async
from kit.outbox import RelayProcess, RelayThread
from kit.settings import ServiceSettings
from kit.web import DEFAULT_MAX_BODY, BodyLimit, StrictQuery
from kit.worker import WorkerState

log = structlog.get_logger(__name__)

# What a reverse proxy adds to what it forwards (RFC 7239, and the de facto ones).
FORWARDED_HEADERS = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip"})


def make_broker(settings: ServiceSettings) -> KafkaBroker:
    # Idempotent producer: forces acks=all and keeps per-partition order across retries.
    return KafkaBroker(
        settings.kafka_bootstrap,
        client_id=settings.service_name,
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        graceful_timeout=10.0,
        # Through the root handler (kit.logging's one format) instead of FastStream's own coloured
        # stdout handler; its per-message "Received/Processed" lines at DEBUG, not one INFO per event.
        logger=logging.getLogger("faststream.kafka"),
        log_level=logging.DEBUG,
        middlewares=[KafkaPrometheusMiddleware(registry=REGISTRY, app_name=settings.service_name,
                                               metrics_prefix="billing_faststream")],
    )


async def ensure_topics(bootstrap: str, names: Sequence[str], partitions: int = 3) -> None:
    """Create the platform's topics up front so partition counts are ours, not the broker default."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names
                   if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


@dataclass
class PeriodicJob:
    """A coroutine run every `interval` seconds; it must itself be safe with several replicas."""

    name: str
    interval: float
    run: Callable[[], Awaitable[object]]


class Watched(Protocol):
    """What readiness asks of a background loop: a kit.worker.PollingWorker, the relay, or a loop in a
    child process (kit.child.ChildProcess)."""

    name: str

    def state(self) -> WorkerState: ...


@dataclass(frozen=True)
class Readiness:
    """The dependencies' checks ("ok" or what is wrong) and the state of every background loop."""

    checks: dict[str, str]
    workers: dict[str, WorkerState] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values()) and all(w.ok for w in self.workers.values())

    def body(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": self.checks,
                "workers": {name: state.as_json() for name, state in self.workers.items()}}


@dataclass
class ServiceRuntime:
    settings: ServiceSettings
    db: Database
    broker: KafkaBroker
    migrations: Path | None = None
    jobs: Sequence[PeriodicJob] = ()
    relay: RelayProcess | RelayThread | None = None
    # The service's PollingWorkers (webhook worker, email delivery, ...): readiness reports them.
    workers: list[Watched] = field(default_factory=list)
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Gauges of the service's own (kit.metrics.MetricSource: a webhook backlog, an email queue), served
    # at /metrics next to kit's (DB pool, workers, outbox, consumer lag).
    metrics: list[MetricSource] = field(default_factory=list)
    # Consumers FastStream does not run (reporting's feed): their lag is reported and judged too.
    consumers: list[Subscription] = field(default_factory=list)
    # /readyz: a consumer whose partition has lag and no progress for this long is stuck.
    consumer_stuck_after: float = 60.0
    consumer_lag_ttl: float = 5.0
    consumer_lag: ConsumerLag | None = None
    _kit_metrics: list[MetricSource] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def metric_sources(self) -> list[MetricSource]:
        return [*self._kit_metrics, *self.metrics]

    async def start(self) -> None:
        service = self.settings.service_name
        self._kit_metrics = [DbPoolSource(service, self.db),
                             WorkerSource(service, lambda: [*([self.relay] if self.relay else []), *self.workers])]
        if self.db.outbox_model is not None:
            self._kit_metrics.append(OutboxSource(service, self.db))
        if self.settings.migrate_on_start and self.migrations is not None:
            await upgrade_to_head_async(self.migrations, self.settings.database_url)
        if self.settings.kafka_enabled:
            await ensure_topics(self.settings.kafka_bootstrap, topics.ALL)
            await self.broker.start()
            if self.db.outbox_model is not None and self.settings.relay_enabled:
                self.relay = self._make_relay()
                await self.relay.start()
            self.consumer_lag = ConsumerLag(
                self.settings.kafka_bootstrap, lambda: [*broker_subscriptions(self.broker), *self.consumers],
                ttl=self.consumer_lag_ttl, stuck_after=self.consumer_stuck_after,
            )
            self._kit_metrics.append(self.consumer_lag)
        for hook in self.on_startup:
            await hook()
        for loop in [self.relay, *self.workers]:  # children spawned above started meanwhile
            if isinstance(loop, ChildProcess):
                await loop.wait_ready()
        self._tasks = [asyncio.create_task(self._loop(job), name=job.name) for job in self.jobs]
        log.info("service_started", port=self.settings.port)

    def _make_relay(self) -> RelayProcess | RelayThread:
        assert self.db.outbox_model is not None
        settings = self.settings
        if settings.relay_mode == "thread":
            return RelayThread(settings.database_url, self.db.outbox_model, lambda: make_broker(settings),
                               service=settings.service_name, poll_interval=settings.outbox_poll_interval)
        # Crosses to the child by pickling: make_broker by reference, the settings by value.
        return RelayProcess(settings.database_url, self.db.outbox_model, functools.partial(make_broker, settings),
                            service=settings.service_name, poll_interval=settings.outbox_poll_interval,
                            log_level=settings.log_level, log_json=settings.log_json)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for hook in self.on_shutdown:
            await hook()
        if self.relay is not None:
            await self.relay.stop()
        if self.consumer_lag is not None:
            await self.consumer_lag.close()
        if self.settings.kafka_enabled:
            await self.broker.stop()
        await self.db.dispose()
        log.info("service_stopped")

    async def _loop(self, job: PeriodicJob) -> None:
        while True:
            await asyncio.sleep(job.interval)
            try:
                await job.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job_failed", job=job.name, error=str(exc))

    async def readiness(self) -> Readiness:
        """Database and Kafka answer; the relay and every registered worker run, succeed and listen."""
        checks: dict[str, str] = {}
        try:
            await self.db.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {exc}"
        if self.settings.kafka_enabled:
            try:
                ok = await self.broker.ping(timeout=2.0)
                checks["kafka"] = "ok" if ok else "unreachable"
            except Exception as exc:
                checks["kafka"] = f"error: {exc}"
        workers: dict[str, WorkerState] = {}
        consumers: list[Watched] = []
        if self.consumer_lag is not None:
            await self.consumer_lag.refresh()  # cached: a probe every second asks the broker every few
            consumers = list(self.consumer_lag.watches())
        for watched in [*([self.relay] if self.relay is not None else []), *self.workers, *consumers]:
            state = watched.state()
            name, n = state.name, 2
            while name in workers:  # two loops of one kind: both reported
                name, n = f"{state.name}-{n}", n + 1
            workers[name] = state
        return Readiness(checks, workers)


def create_service_app(
    runtime: ServiceRuntime,
    *,
    title: str,
    routers: Sequence[APIRouter] = (),
    description: str = "",
    max_body: int = DEFAULT_MAX_BODY,
    body_limits: Mapping[str, int] | None = None,
) -> FastAPI:
    """The service's FastAPI app: health and readiness, the error model, correlation ids, strict
    query strings (an unknown parameter is a 400) and one body-size limit (`body_limits` maps path
    prefixes to their own limit)."""
    settings = runtime.settings
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    tracing.configure(settings.service_name)  # off unless OTEL_EXPORTER_OTLP_ENDPOINT is set

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=title, description=description, lifespan=lifespan, dependencies=[StrictQuery])
    app.state.runtime = runtime
    app.state.internal_token = settings.internal_token
    app.add_middleware(BodyLimit, limit=max_body, limits=body_limits)
    # Inside the correlation id (its access line carries it), outside everything that may answer.
    app.add_middleware(HttpMetrics, service=settings.service_name)
    app.add_middleware(CorrelationMiddleware)
    install_error_handlers(app)
    tracing.instrument_app(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        readiness = await runtime.readiness()
        return JSONResponse(readiness.body(), status_code=200 if readiness.ready else 503)

    render_metrics = exposition(runtime.metric_sources)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # For the scraper on the cluster's network, which asks the process directly: a request that a
        # proxy forwarded (the compose nginx, an Ingress: they add these headers) is from outside, and
        # finds nothing here, as for any unknown path.
        if any(header in request.headers for header in FORWARDED_HEADERS):  # case-insensitive
            raise NotFound("Not Found")
        return Response(await render_metrics(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    # log_config=None: uvicorn's records go to the root handler (kit.logging's format), not to its own
    # handlers; the access line is kit.metrics.HttpMetrics', so uvicorn's stays off.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False, log_config=None)
