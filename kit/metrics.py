"""Prometheus metrics for every service: `/metrics` (mounted by kit.service.create_service_app).

Two kinds of series:

* Process-wide instruments in prometheus-client's default registry, updated where things happen:
  HTTP requests and latency (`HttpMetrics`, a pure ASGI middleware that also writes the access log),
  events handled per consumer, topic, group and outcome (kit.consumer), events relayed by the outbox
  (kit.outbox), dead-lettered events, and FastStream's own broker middleware (`billing_faststream_*`).
  Each service is one uvicorn process (scaled by replicas, not by workers), so the default registry is
  right: no multi-process mode, no shared directory. Several apps in one process (tests) stay apart
  by their `service` label.
* Gauges read on scrape from a `MetricSource` in `ServiceRuntime.metrics`: the DB pool, the polling
  workers (kit.worker.WorkerState), the outbox backlog, consumer lag, and what a service adds itself
  (payments' webhook backlog, notifications' email queue, ...). A source that queries the database or
  the broker does it in `refresh()`, bounded by a timeout and cached for a few seconds, so a scrape
  every second does not become a query every second; `collect()` only reads the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faststream.kafka import KafkaBroker
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.db import Database
from kit.worker import WorkerState

log = structlog.get_logger(__name__)

__all__ = [
    "CONTENT_TYPE_LATEST", "ROUTE_SCOPE_KEY", "CachedSource", "ConsumerLag", "ConsumerWatch", "DbPoolSource",
    "HttpMetrics", "MetricSource", "OutboxSource", "QueryGauge", "Subscription", "WorkerSource",
    "broker_subscriptions", "exposition",
]

# A route the router cannot name (the gateway's catch-all proxy) may put its own template here.
ROUTE_SCOPE_KEY = "billing.route"
UNMATCHED = "<unmatched>"
# Probes and scrapes: counted, but their access lines are DEBUG, not one INFO line every few seconds.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Latency buckets from a 1 ms cached read to a 30 s export or upstream timeout.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter(
    "billing_http_requests_total",
    "HTTP requests answered, by service, method, route template (never the raw path) and status code.",
    ["service", "method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "billing_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by service and route template.",
    ["service", "route"], buckets=_HTTP_BUCKETS,
)
EVENTS_HANDLED = Histogram(
    "billing_consumer_handling_seconds",
    "Time to handle one Kafka event (retries included), by consumer, topic, consumer group and outcome: "
    "applied, duplicate (inbox), ignored (no handler), refused (domain), failed (redelivered), "
    "dead_lettered, malformed.",
    ["consumer", "topic", "group", "outcome"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DEAD_LETTERED = Counter(
    "billing_consumer_dead_lettered_total",
    "Events parked on billing.deadletter after failing every redelivery, by consumer and topic.",
    ["consumer", "topic"],
)
OUTBOX_RELAYED = Counter(
    "billing_outbox_relayed_events_total",
    "Outbox rows published to Kafka (acknowledged by every in-sync replica) by this process's relay.",
    ["service"],
)


def route_template(scope: Scope) -> str:
    """The matched route's template ('/api/invoices/{invoice_id}'): bounded, unlike the raw path."""
    named = scope.get(ROUTE_SCOPE_KEY)
    if isinstance(named, str):
        return named
    # FastAPI puts the route as declared in scope["route"] (without the prefixes of the routers that
    # include it: /admin/invoices would read /invoices); its effective route has the full template.
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        effective = getattr(fastapi_scope.get("effective_route_context"), "path_format", None)
        if isinstance(effective, str):
            return effective
    route = scope.get("route")
    if route is None and "endpoint" in scope:  # a plain Starlette route under FastAPI's router (/openapi.json)
        route = _route_of(scope.get("router"), scope["endpoint"])
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def _route_of(router: Any, endpoint: Any) -> Any:
    try:
        return _ROUTE_OF_ENDPOINT[endpoint]
    except (KeyError, TypeError):
        pass
    route = next((r for r in getattr(router, "routes", ()) if getattr(r, "endpoint", None) is endpoint), None)
    with contextlib.suppress(TypeError):  # not weak-referenceable: looked up again next time
        _ROUTE_OF_ENDPOINT[endpoint] = route
    return route


_ROUTE_OF_ENDPOINT: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class HttpMetrics:
    """Counts and times every request by route template and status, and writes its one access-log
    line (method, route, status, duration_ms; the correlation id comes from the context bound by the
    CorrelationMiddleware outside it). Plain ASGI: no task or body copy per request; the labelled
    children are cached, so the hot path is two dict lookups and two additions."""

    def __init__(self, app: ASGIApp, *, service: str, log_requests: bool = True) -> None:
        self.app = app
        self.service = service
        self.log_requests = log_requests
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # Bound now (the app's stack is built after kit.logging.configure_logging), not cached at import.
        self._access = structlog.get_logger("kit.access").bind()

    def _child(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            child = (HTTP_REQUESTS.labels(self.service, method, route, str(status)),
                     HTTP_DURATION.labels(self.service, route))
            self._children[key] = child
        return child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - start
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"  # a client may invent any
            route = route_template(scope)
            requests, duration = self._child(method, route, status)
            requests.inc()
            duration.observe(elapsed)
            if self.log_requests:
                level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
                self._access.log(level, "http_request", method=method, route=route, status=status,
                               duration_ms=round(elapsed * 1000, 2))


class MetricSource(Protocol):
    """Gauges read on scrape. `refresh()` may do I/O (bounded, cached); `collect()` must not."""

    async def refresh(self) -> None: ...

    def collect(self) -> Iterable[Metric]: ...


class CachedSource:
    """A source measured by one async call at most every `ttl` seconds, each call within `timeout`.
    A failed measurement keeps no stale figures: its gauges disappear and
    `billing_metrics_source_up{source}` says 0, which is what an alert should look at."""

    def __init__(self, name: str, *, ttl: float = 5.0, timeout: float = 2.0) -> None:
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self._families: list[Metric] = []
        self._measured_at: float | None = None
        self._ok = True
        self._lock = asyncio.Lock()

    async def measure(self) -> list[Metric]:
        raise NotImplementedError

    async def refresh(self) -> None:
        if self._fresh():
            return
        async with self._lock:  # concurrent scrapes share one measurement
            if self._fresh():
                return
            try:
                self._families = await asyncio.wait_for(self.measure(), self.timeout)
                self._ok = True
            except Exception as exc:
                self._families, self._ok = [], False
                log.warning("metrics_source_failed", source=self.name, error=f"{type(exc).__name__}: {exc}"[:300])
            self._measured_at = time.monotonic()

    def _fresh(self) -> bool:
        return self._measured_at is not None and time.monotonic() - self._measured_at < self.ttl

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("billing_metrics_source_up",
                               "1 when the source's last measurement (a query with a timeout) succeeded.",
                               labels=["source"])
        up.add_metric([self.name], 1.0 if self._ok else 0.0)
        return [*self._families, up]


class QueryGauge(CachedSource):
    """One gauge from one SQL query whose rows are (label values..., value): a service's own backlog
    figure without domain code in kit. Runs in a read-only transaction with a statement timeout."""

    def __init__(self, db: Database, name: str, documentation: str, sql: str, *,
                 labels: Sequence[str] = (), fill: Iterable[Sequence[str]] = (), ttl: float = 10.0,
                 timeout: float = 2.0) -> None:
        super().__init__(name, ttl=ttl, timeout=timeout)
        self._db = db
        self._documentation = documentation
        self._sql = text(sql)
        self._labels = list(labels)
        self._fill = [tuple(values) for values in fill]  # label sets reported as 0 when no row has them

    async def measure(self) -> list[Metric]:
        async with self._db.engine.connect() as conn:
            await conn.execute(text(f"SET LOCAL statement_timeout = {int(self.timeout * 1000)}"))
            rows = (await conn.execute(self._sql)).all()
            await conn.rollback()
        values = dict.fromkeys(self._fill, 0.0)
        for row in rows:
            *label_values, value = row
            values[tuple(str(v) for v in label_values)] = float(value or 0)
        family = GaugeMetricFamily(self.name, self._documentation, labels=self._labels)
        for key, figure in values.items():
            family.add_metric(list(key), figure)
        return [family]


class OutboxSource(CachedSource):
    """Unpublished outbox rows and the age of the oldest: the relay's backlog, read through the partial
    index on unpublished rows (cheap while the relay keeps up, bounded by the timeout when it does not)."""

    def __init__(self, service: str, db: Database, *, ttl: float = 5.0, timeout: float = 2.0) -> None:
        super().__init__("outbox", ttl=ttl, timeout=timeout)
        self._service = service
        self._db = db

    async def measure(self) -> list[Metric]:
        assert self._db.outbox_model is not None
        table = self._db.outbox_model.__tablename__
        async with self._db.engine.connect() as conn:
            await conn.execute(text(f"SET LOCAL statement_timeout = {int(self.timeout * 1000)}"))
            # one statement: the two figures agree (no row counted in one and missed by the other)
            backlog, age = (await conn.execute(text(
                f"SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at)) FROM {table} "
                "WHERE published_at IS NULL"))).one()
            await conn.rollback()
        rows = GaugeMetricFamily("billing_outbox_backlog", "Outbox rows not yet published to Kafka.",
                                 labels=["service"])
        rows.add_metric([self._service], float(backlog or 0))
        oldest = GaugeMetricFamily("billing_outbox_oldest_age_seconds",
                                   "Age of the oldest unpublished outbox row (0 when none waits).",
                                   labels=["service"])
        oldest.add_metric([self._service], max(0.0, float(age or 0)))
        return [rows, oldest]


class DbPoolSource:
    """The service's SQLAlchemy pool: connections in use, idle, the pool's size and overflow."""

    def __init__(self, service: str, db: Database) -> None:
        self._service = service
        self._db = db

    async def refresh(self) -> None:
        return None

    def collect(self) -> Iterable[Metric]:
        pool: Any = self._db.engine.pool
        figures = {
            "billing_db_pool_size": ("Connections the pool keeps (pool_size).", pool.size()),
            "billing_db_pool_in_use": ("Connections checked out of the pool now.", pool.checkedout()),
            "billing_db_pool_idle": ("Open connections waiting in the pool.", pool.checkedin()),
            "billing_db_pool_overflow": ("Connections beyond pool_size now (negative: not yet opened).",
                                         pool.overflow()),
        }
        for name, (documentation, value) in figures.items():
            family = GaugeMetricFamily(name, documentation, labels=["service"])
            family.add_metric([self._service], float(value))
            yield family


class _Watched(Protocol):
    name: str

    def state(self) -> Any: ...  # kit.worker.WorkerState


class WorkerSource:
    """Every background loop readiness watches (outbox relay, PollingWorkers), from its WorkerState."""

    def __init__(self, service: str, watched: Callable[[], Iterable[_Watched]]) -> None:
        self._service = service
        self._watched = watched

    async def refresh(self) -> None:
        return None

    def collect(self) -> Iterable[Metric]:
        labels = ["service", "worker"]
        up = GaugeMetricFamily("billing_worker_up", "1 while the loop is running and neither dead, stuck nor deaf.",
                               labels=labels)
        runs = CounterMetricFamily("billing_worker_runs", "Runs of the loop since the process started.",
                                   labels=labels)
        failures = CounterMetricFamily("billing_worker_failures", "Failed runs since the process started.",
                                       labels=labels)
        consecutive = GaugeMetricFamily("billing_worker_consecutive_failures",
                                        "Failed runs since the last successful one.", labels=labels)
        age = GaugeMetricFamily("billing_worker_last_success_age_seconds",
                                "Seconds since the loop's last successful run (absent before the first).",
                                labels=labels)
        for watched in self._watched():
            state = watched.state()
            key = [self._service, state.name]
            up.add_metric(key, 1.0 if state.running and state.ok else 0.0)
            runs.add_metric(key, float(state.runs))
            failures.add_metric(key, float(state.failures))
            consecutive.add_metric(key, float(state.consecutive_failures))
            if state.last_success_age is not None:
                age.add_metric(key, state.last_success_age)
        return [up, runs, failures, consecutive, age]


class _SourcesCollector:
    """The runtime's sources as one prometheus-client collector (in a registry of the app's own)."""

    def __init__(self, sources: Callable[[], Sequence[MetricSource]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self._sources():
            try:
                yield from source.collect()
            except Exception as exc:  # one broken source must not cost the whole scrape
                log.warning("metrics_collect_failed", source=type(source).__name__, error=str(exc)[:300])


def exposition(sources: Callable[[], Sequence[MetricSource]]) -> Callable[[], Awaitable[bytes]]:
    """The body of `/metrics`: refresh every source (concurrently, each within its own timeout), then
    the default registry followed by the sources."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SourcesCollector(sources))

    async def render() -> bytes:
        await asyncio.gather(*(source.refresh() for source in sources()), return_exceptions=True)
        return generate_latest(REGISTRY) + generate_latest(registry)

    return render


# ------------------------------------------------------------------------------------------------
# Consumer lag, and readiness of the consumers that it tells about


@dataclass(frozen=True)
class Subscription:
    """A consumer group's subscription as this replica runs it.

    `assigned`: the partitions this replica holds now (readiness judges only those: another replica's
    stuck partition is that replica's problem). `problem`: None, or why its tasks are dead.
    `positions`: where the group stands per partition; None means its offsets committed to Kafka
    (a consumer that keeps its positions elsewhere, reporting's feed, passes its own)."""

    name: str
    group: str
    topics: tuple[str, ...]
    assigned: Callable[[], set[TopicPartition]] | None = None
    problem: Callable[[], str | None] = lambda: None
    positions: Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, int]]] | None = None


def broker_subscriptions(broker: KafkaBroker) -> list[Subscription]:
    """One Subscription per FastStream subscriber that consumes in a group (kit.consumer's)."""
    out: list[Subscription] = []
    for subscriber in broker.subscribers:
        group = getattr(subscriber, "group_id", None)
        topics = tuple(getattr(subscriber, "topic_names_for_subscribe", ()) or ())
        if not group or not topics:
            continue
        out.append(Subscription(name=f"consumer:{group}:{','.join(topics)}", group=group, topics=topics,
                                assigned=_assigned_to(subscriber), problem=_dead_tasks(subscriber)))
    return out


def _consumers_of(subscriber: Any) -> list[Any]:
    group = getattr(subscriber, "consumer_subgroup", None)  # max_workers > 1: one consumer per worker
    if group:
        return list(group)
    single = getattr(subscriber, "consumer", None)
    return [single] if single is not None else []


def _assigned_to(subscriber: Any) -> Callable[[], set[TopicPartition]]:
    def assigned() -> set[TopicPartition]:
        held: set[TopicPartition] = set()
        for consumer in _consumers_of(subscriber):
            with contextlib.suppress(Exception):  # stopped or not yet joined: holds nothing
                held |= set(consumer.assignment())
        return held

    return assigned


def _dead_tasks(subscriber: Any) -> Callable[[], str | None]:
    def problem() -> str | None:
        if not getattr(subscriber, "running", False):
            return None  # not started (or stopped on purpose): nothing to judge
        consumers = len(_consumers_of(subscriber)) or 1
        alive = sum(1 for task in getattr(subscriber, "tasks", ()) if not task.done())
        if alive < consumers:
            return f"dead: {consumers - alive} of {consumers} consume tasks have ended"
        return None

    return problem


class ConsumerLag(CachedSource):
    """Lag per group, topic and partition: the end offset minus the group's position (committed
    offset; the beginning when the group has none). Asked of the broker at most every `ttl` seconds,
    not on every scrape. It also remembers since when each partition's position has not moved, which
    is what `watches()` (readiness) judge: lag with no progress for `stuck_after` seconds is stuck."""

    def __init__(self, bootstrap: str, subscriptions: Callable[[], Sequence[Subscription]], *,
                 ttl: float = 5.0, timeout: float = 3.0, stuck_after: float = 60.0) -> None:
        super().__init__("consumer-lag", ttl=ttl, timeout=timeout)
        self._bootstrap = bootstrap
        self._subscriptions = subscriptions
        self.stuck_after = stuck_after
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None
        # (group, partition) -> (lag, position, monotonic time since when the position is that one)
        self._seen: dict[tuple[str, TopicPartition], tuple[int, int, float]] = {}

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._offsets is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id="billing-metrics")
            offsets = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, client_id="billing-metrics",
                                       enable_auto_commit=False)
            try:
                await admin.start()
                await offsets.start()
            except BaseException:
                await self._close(admin, offsets)
                raise
            self._admin, self._offsets = admin, offsets
        return self._admin, self._offsets

    @staticmethod
    async def _close(admin: AIOKafkaAdminClient | None, offsets: AIOKafkaConsumer | None) -> None:
        if offsets is not None:
            with contextlib.suppress(Exception):
                await offsets.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def close(self) -> None:
        admin, offsets, self._admin, self._offsets = self._admin, self._offsets, None, None
        await self._close(admin, offsets)

    async def measure(self) -> list[Metric]:
        try:
            return await self._measure()
        except BaseException:
            await self.close()  # reconnect next time rather than reuse a client in an unknown state
            raise

    async def _measure(self) -> list[Metric]:
        admin, offsets = await self._clients()
        by_group: dict[str, Subscription] = {}
        topics_of: dict[str, set[str]] = {}
        for sub in self._subscriptions():
            by_group.setdefault(sub.group, sub)
            topics_of.setdefault(sub.group, set()).update(sub.topics)
        family = GaugeMetricFamily("billing_consumer_lag",
                                   "Events not yet handled: end offset minus the group's position, per consumer "
                                   "group, topic and partition.", labels=["group", "topic", "partition"])
        now = time.monotonic()
        for group, topic_names in sorted(topics_of.items()):
            described = await admin.describe_topics(sorted(topic_names))
            tps = sorted(TopicPartition(t["topic"], p["partition"]) for t in described if t["error_code"] == 0
                         for p in t["partitions"])
            if not tps:
                continue
            end = await offsets.end_offsets(tps)
            begin = await offsets.beginning_offsets(tps)
            positions_of = by_group[group].positions
            if positions_of is not None:
                positions = await positions_of(tps)
            else:
                committed = await admin.list_consumer_group_offsets(group, partitions=tps)
                positions = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
            for tp in tps:
                position = max(positions.get(tp, begin[tp]), begin[tp])
                lag = max(0, end[tp] - position)
                previous = self._seen.get((group, tp))
                # since when it has been behind at this very position (progress, or none behind, resets it)
                behind_before = previous is not None and previous[0] > 0 and previous[1] == position
                since = previous[2] if behind_before and lag and previous is not None else now
                self._seen[(group, tp)] = (lag, position, since)
                family.add_metric([group, tp.topic, str(tp.partition)], float(lag))
        return [family]

    def watches(self) -> list[ConsumerWatch]:
        return [ConsumerWatch(self, sub) for sub in self._subscriptions()]

    def stalled(self, sub: Subscription, now: float) -> tuple[TopicPartition, int, float] | None:
        """The partition of `sub` (held by this replica) longest behind with no progress, if any is
        past `stuck_after`."""
        if not self._ok:
            return None  # the broker does not answer: readiness says so through its Kafka check
        held = sub.assigned() if sub.assigned is not None else None
        worst: tuple[TopicPartition, int, float] | None = None
        for (group, tp), (lag, _, since) in self._seen.items():
            if group != sub.group or tp.topic not in sub.topics or (held is not None and tp not in held):
                continue
            quiet = now - since
            if lag > 0 and quiet > self.stuck_after and (worst is None or quiet > worst[2]):
                worst = (tp, lag, quiet)
        return worst


class ConsumerWatch:
    """A consumer subscription as readiness sees it (kit.service.Watched): dead when its consume tasks
    ended, stuck when a partition it holds has lag and its position has not moved for
    `ConsumerLag.stuck_after` seconds (a handler that hangs, a partition that keeps failing)."""

    def __init__(self, lag: ConsumerLag, sub: Subscription) -> None:
        self._lag = lag
        self._sub = sub
        self.name = sub.name

    def state(self) -> WorkerState:
        now = time.monotonic()
        problem = self._sub.problem()
        if problem is None:
            stalled = self._lag.stalled(self._sub, now)
            if stalled is not None:
                tp, lag, quiet = stalled
                problem = (f"stuck: {tp.topic}[{tp.partition}] is {lag} behind with no progress for {quiet:.1f} s "
                           f"(> {self._lag.stuck_after:g} s)")
        return WorkerState(name=self.name, started=True, running=not (problem or "").startswith("dead"),
                           listening=None, consecutive_failures=0, last_success_age=None, last_error=None,
                           problem=problem)
