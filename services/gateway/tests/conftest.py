"""Gateway fixtures: the real gateway (uvicorn, real PostgreSQL) in front of real stand-in upstreams.

PostgreSQL comes from the shared plugin (deploy/testing.py: `database_url_factory`). The invoice and
payments upstreams are small echo apps (tests/upstream_app.py) on free loopback ports; the other
upstreams point at a port that refuses connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.tests.upstream_app import Upstream, build_upstream_app

JWT_SECRET = "test-jwt-secret-which-is-long-enough-for-hs256"
INTERNAL_TOKEN = "internal-test-token"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password"
MAX_BODY = 1024 * 1024


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, timeout=15)


async def serve(app: FastAPI) -> Served:
    """Run `app` under uvicorn on a free loopback port in this event loop (lifespan included)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # leave pytest's handlers
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(600):
        if server.started:
            break
        if task.done():
            task.result()  # raises the startup error
            raise RuntimeError("server exited during startup")
        await asyncio.sleep(0.05)
    else:
        raise TimeoutError("server did not start")
    return Served(url=f"http://127.0.0.1:{port}", server=server, task=task)


@pytest.fixture(scope="session")
def dead_url() -> Iterator[str]:
    """A loopback address that refuses connections (bound, never listening, held for the session)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="session")
async def invoice_upstream() -> AsyncIterator[Upstream]:
    up = Upstream("invoice", known_clients={"client-1", "client-2"})
    served = await serve(build_upstream_app(up))
    up.url = served.url
    yield up
    await served.stop()


@pytest.fixture(scope="session")
async def payments_upstream() -> AsyncIterator[Upstream]:
    up = Upstream("payments")
    served = await serve(build_upstream_app(up))
    up.url = served.url
    yield up
    await served.stop()


@pytest.fixture(scope="session")
def gateway_database_url(database_url_factory: Callable[[str], str]) -> str:
    return database_url_factory("gateway")


def make_settings(database_url: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "jwt_secret": JWT_SECRET,
        "internal_token": INTERNAL_TOKEN,
        "admin_password": ADMIN_PASSWORD,
        "max_body_bytes": MAX_BODY,
        "openapi_cache_seconds": 0.0,
        "openapi_retry_seconds": 0.0,
        "upstream_timeout": 10.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class Gateway:
    url: str
    app: FastAPI
    settings: GatewaySettings


@pytest.fixture(scope="session")
async def gateway(
    gateway_database_url: str, invoice_upstream: Upstream, payments_upstream: Upstream, dead_url: str
) -> AsyncIterator[Gateway]:
    settings = make_settings(
        gateway_database_url,
        invoice_url=invoice_upstream.url,
        payments_url=payments_upstream.url,
        subscriptions_url=dead_url,
        notifications_url=invoice_upstream.url,  # any echo will do for the public /t/ route
        reporting_url=dead_url,
    )
    app = create_app(settings)
    served = await serve(app)
    yield Gateway(url=served.url, app=app, settings=settings)
    await served.stop()


@pytest.fixture(scope="session")
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http:
        yield http


async def login(http: httpx.AsyncClient, email: str, password: str) -> str:
    response = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["accessToken"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
async def admin_token(client: httpx.AsyncClient) -> str:
    return await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)


@dataclass
class ClientLogin:
    token: str
    user_id: str
    client_id: str
    email: str


@pytest.fixture(scope="session")
async def client_login(client: httpx.AsyncClient, admin_token: str) -> ClientLogin:
    email = "client-one@example.com"
    response = await client.post(
        "/api/users",
        json={"email": email, "password": "client-password", "role": "client", "clientId": "client-1"},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    token = await login(client, email, "client-password")
    return ClientLogin(token=token, user_id=response.json()["id"], client_id="client-1", email=email)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]
