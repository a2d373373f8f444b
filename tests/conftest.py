"""Cross-service fixtures: every runnable service and the gateway as real processes on real infra."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY, InfraEndpoints, available_services, make_service_process
from deploy.testing import KafkaEventLog as TopicWatcher


@pytest.fixture(scope="session")
def stack(infra_endpoints: InfraEndpoints, infra_dir: Path) -> Iterator[dict[str, ServiceProcess]]:
    """All services that exist (python -m works), the gateway last; stopped at the end."""
    processes: dict[str, ServiceProcess] = {}
    try:
        for spec in available_services():
            extra = {f"{spec.env_prefix}OUTBOX_POLL_INTERVAL": "0.5"}
            if spec.name == "invoice":
                extra["INVOICE_OVERDUE_SCAN_INTERVAL"] = "3600"
            process = make_service_process(spec, infra_endpoints, infra_dir / "logs", extra_env=extra)
            process.start()
            processes[spec.name] = process
        assert GATEWAY in processes, "the gateway must be runnable for end-to-end tests"
        yield processes
    finally:
        for process in reversed(list(processes.values())):
            process.stop()


async def login(base_url: str, email: str, password: str) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=base_url, timeout=20)
    response = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    http.headers["Authorization"] = f"Bearer {response.json()['accessToken']}"
    return http


@pytest.fixture(scope="session")
async def admin(stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints) -> AsyncIterator[httpx.AsyncClient]:
    http = await login(stack[GATEWAY].url, "admin@example.com", infra_endpoints.admin_password)
    yield http
    await http.aclose()


@pytest.fixture(scope="session")
async def kafka_events(infra_endpoints: InfraEndpoints) -> AsyncIterator[TopicWatcher]:
    watcher = TopicWatcher(infra_endpoints.kafka_bootstrap, "billing.invoice", "billing.payment",
                           "billing.notification", "billing.stripe")
    await watcher.start()
    yield watcher
    await watcher.stop()


async def wait_until(http: httpx.AsyncClient, path: str, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body: dict[str, Any] = {}
    while loop.time() < deadline:
        response = await http.get(path)
        body = response.json()
        if response.status_code == 200 and predicate(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition on {path} not met in {timeout}s; last: {body}")
