"""A second gateway on the same database, with the invoice service down and no internal token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    Gateway,
    assert_error,
    bearer,
    login,
    make_settings,
    serve,
)
from services.gateway.tests.upstream_app import Upstream


@pytest.fixture(scope="module")
async def degraded(
    gateway: Gateway, payments_upstream: Upstream, dead_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        gateway.settings.database_url,
        internal_token=None,
        invoice_url=dead_url,
        payments_url=payments_upstream.url,
        subscriptions_url=dead_url,
        notifications_url=dead_url,
        reporting_url=dead_url,
    )
    served = await serve(create_app(settings))
    async with httpx.AsyncClient(base_url=served.url, timeout=20) as http:
        yield http
    await served.stop()


async def test_second_replica_shares_users_and_bootstrap_is_once(
    degraded: httpx.AsyncClient, gateway: Gateway
) -> None:
    token = await login(degraded, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert (await degraded.get("/api/auth/me", headers=bearer(token))).status_code == 200
    conn = await asyncpg.connect(gateway.settings.database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await conn.fetchval("SELECT count(*) FROM users WHERE email = $1", ADMIN_EMAIL) == 1
    finally:
        await conn.close()
    ready = await degraded.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok"}


async def test_client_check_with_invoice_down_is_503(degraded: httpx.AsyncClient) -> None:
    token = await login(degraded, ADMIN_EMAIL, ADMIN_PASSWORD)
    response = await degraded.post(
        "/api/users",
        json={"email": "later@example.com", "password": "long-enough", "role": "client", "clientId": "client-1"},
        headers=bearer(token),
    )
    assert_error(response, 503, "upstream_unavailable")


async def test_no_internal_token_configured_sends_none(degraded: httpx.AsyncClient) -> None:
    response = await degraded.post("/webhooks/stripe", content=b"{}", headers={"X-Internal-Token": "spoofed"})
    assert response.status_code == 201, response.text
    assert "x-internal-token" not in response.json()["headers"]


async def test_openapi_with_upstreams_down(degraded: httpx.AsyncClient) -> None:
    doc = (await degraded.get("/openapi.json")).json()
    assert "/api/auth/login" in doc["paths"]
    assert "/api/payments/{payment_id}" in doc["paths"]
    assert set(doc["x-unavailable-upstreams"]) == {"invoice", "subscriptions", "notifications", "reporting"}
