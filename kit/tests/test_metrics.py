"""kit.metrics without infrastructure: the HTTP middleware (route templates, statuses, the access
line), /metrics on a service app, the log format of stdlib records, the correlation-id httpx hook."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import structlog
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from kit.db import Database
from kit.logging import (
    CORRELATION_HEADER,
    CorrelationMiddleware,
    bind_correlation_id,
    configure_logging,
    correlation_hooks,
)
from kit.metrics import UNMATCHED, HttpMetrics
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.settings import ServiceSettings


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Logs of the test as JSON lines in a buffer (kit.logging's one root handler)."""
    buffer = io.StringIO()
    configure_logging("metrics-test", "INFO", json=True, stream=buffer)
    yield buffer
    configure_logging("metrics-test", "INFO", json=False)


def parsed(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def small_app(service: str) -> FastAPI:
    app = FastAPI()
    pages, nested = APIRouter(prefix="/admin"), APIRouter()

    @nested.get("/clients/{client_id}")
    async def client_page(client_id: str) -> dict[str, str]:
        return {"id": client_id}

    pages.include_router(nested)
    app.include_router(pages)

    @app.get("/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    app.add_middleware(HttpMetrics, service=service)
    app.add_middleware(CorrelationMiddleware)
    return app


async def test_requests_are_counted_by_route_template_and_status(log_lines: io.StringIO) -> None:
    service = f"svc-{uuid.uuid4().hex[:6]}"
    app = small_app(service)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for thing in (1, 2, 3):
            assert (await http.get(f"/things/{thing}", headers={CORRELATION_HEADER: f"c-{thing}"})).status_code == 200
        assert (await http.get("/things/not-a-number")).status_code == 422
        assert (await http.get("/nowhere/at/all")).status_code == 404
        assert (await http.get("/boom")).status_code == 500
        assert (await http.request("BREW", "/things/1")).status_code == 405
        assert (await http.get("/admin/clients/c-1")).status_code == 200

    template = "/things/{thing_id}"
    assert sample("billing_http_requests_total", service=service, method="GET", route=template, status="200") == 3
    assert sample("billing_http_requests_total", service=service, method="GET", route=template, status="422") == 1
    assert sample("billing_http_requests_total", service=service, method="GET", route=UNMATCHED, status="404") == 1
    assert sample("billing_http_requests_total", service=service, method="GET", route="/boom", status="500") == 1
    # a method a client made up is one label value, not a new series per invention
    assert sample("billing_http_requests_total", service=service, method="OTHER", route=template, status="405") == 1
    assert sample("billing_http_request_duration_seconds_count", service=service, route=template) == 5
    # a route included through a router with a prefix: the whole template, not the one declared inside it
    assert sample("billing_http_requests_total", service=service, method="GET", route="/admin/clients/{client_id}",
                  status="200") == 1
    # no series carries a raw path
    raw = [s for m in REGISTRY.collect() if m.name == "billing_http_requests"
           for s in m.samples if s.labels.get("service") == service and "/things/1" in s.labels.get("route", "")]
    assert raw == []

    access = [line for line in parsed(log_lines) if line.get("event") == "http_request"]
    assert len(access) == 8  # one line per request
    first = access[0]
    assert first["method"] == "GET" and first["route"] == template and first["status"] == 200
    assert first["correlation_id"] == "c-1" and first["level"] == "info" and first["logger"] == "kit.access"
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert [line["status"] for line in access] == [200, 200, 200, 422, 404, 500, 405, 200]


def service_app(name: str) -> FastAPI:
    settings = ServiceSettings(service_name=name, kafka_enabled=False,
                               database_url="postgresql+asyncpg://nobody@127.0.0.1:9/none")
    runtime = ServiceRuntime(settings=settings, db=Database(settings.database_url), broker=make_broker(settings))
    return create_service_app(runtime, title=name)


async def test_service_app_serves_metrics_outside_its_schema(log_lines: io.StringIO) -> None:
    name = f"svc-{uuid.uuid4().hex[:6]}"
    app = service_app(name)
    configure_logging(name, "INFO", json=True, stream=log_lines)  # the app configured stderr
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.get("/healthz")).status_code == 200
        scraped = await http.get("/metrics")
        # Through a reverse proxy (compose nginx, an Ingress): from outside, so nothing is there.
        proxied = [await http.get("/metrics", headers={header: "203.0.113.9"})
                   for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP")]
        schema = (await http.get("/openapi.json")).json()
        assert (await http.get("/no/such/page")).status_code == 404
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert [r.status_code for r in proxied] == [404, 404, 404]
    assert all("billing_" not in r.text and r.json()["error"]["code"] == "not_found" for r in proxied)
    text = scraped.text
    assert "# HELP billing_http_requests_total " in text
    assert f'billing_http_requests_total{{method="GET",route="/healthz",service="{name}",status="200"}} 1.0' in text
    assert "# HELP billing_http_request_duration_seconds " in text
    assert "/metrics" not in schema["paths"] and "/healthz" not in schema["paths"]
    # probes and scrapes are not INFO lines every few seconds
    access = [(line["route"], line["status"]) for line in parsed(log_lines) if line.get("event") == "http_request"]
    assert access == [("/openapi.json", 200), (UNMATCHED, 404)]


def test_stdlib_records_take_the_structlog_format() -> None:
    buffer = io.StringIO()
    try:
        configure_logging("fmt-test", "INFO", json=False, stream=buffer)
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received: %s", "x")
        structlog.get_logger("kit.test").info("own_event", answer=42)
        console = buffer.getvalue().splitlines()
        configure_logging("fmt-test", "INFO", json=True, stream=buffer)
        logging.getLogger("faststream.kafka").error("consumer died", extra={"topic": "billing.invoice"})
    finally:
        configure_logging("fmt-test", "INFO", json=False)
    # console: the same layout for both (ISO time, level, event, [logger], key=value), no ANSI colour
    assert "[warning  ] Invalid HTTP request received: x" in console[0] and "[uvicorn.error]" in console[0]
    assert "service=fmt-test" in console[0]
    assert "[info     ] own_event" in console[1] and "answer=42" in console[1]
    assert all("\x1b[" not in line for line in console)
    record = json.loads(buffer.getvalue().splitlines()[-1])
    assert record["event"] == "consumer died" and record["level"] == "error"
    assert record["logger"] == "faststream.kafka" and record["topic"] == "billing.invoice"
    assert record["service"] == "fmt-test" and "timestamp" in record


async def test_internal_calls_carry_the_correlation_id() -> None:
    seen: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(CORRELATION_HEADER))
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream), event_hooks=correlation_hooks(),
                                 base_url="http://invoice") as http:
        bound = bind_correlation_id("corr-123")
        await http.get("/api/clients/1")
        await http.get("/api/clients/1", headers={CORRELATION_HEADER: "explicit"})  # the caller's own wins
        structlog.contextvars.unbind_contextvars("correlation_id")
        await http.get("/api/clients/1")  # nothing bound: nothing invented
    assert bound == "corr-123"
    assert seen == ["corr-123", "explicit", None]


async def test_middleware_overhead_is_small() -> None:
    """The hot path: the middleware around a bare ASGI app costs microseconds per request."""

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    measured = HttpMetrics(bare, service="overhead", log_requests=False)
    scope: Scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(_: object) -> None:
        return None

    async def per_request(app: object, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)  # type: ignore[operator]
        return (time.perf_counter() - start) / n

    await per_request(measured, 1000)  # warm the label cache
    best = min([await per_request(measured, 5000) - await per_request(bare, 5000) for _ in range(3)])
    print(f"HttpMetrics overhead: {best * 1e6:.1f} us per request")
    assert best < 200e-6  # generous for a loaded 2-core machine; typically a few microseconds


def test_a_console_traceback_is_plain_and_short() -> None:
    """An error's traceback without every frame's local variables: the rich default made one error
    ~30,000 lines in a service log and stalled the service that rendered it."""
    buffer = io.StringIO()

    def deep(n: int, payload: str) -> None:
        if n == 0:
            raise RuntimeError("database went away")
        deep(n - 1, payload)

    try:
        configure_logging("fmt-test", "INFO", json=False, stream=buffer)
        try:
            deep(30, "x" * 10_000)
        except RuntimeError:
            structlog.get_logger("kit.test").exception("request_failed")
    finally:
        configure_logging("fmt-test", "INFO", json=False)
    text = buffer.getvalue()
    assert "RuntimeError: database went away" in text and "request_failed" in text
    assert "x" * 100 not in text  # no locals
    assert len(text.splitlines()) < 120
