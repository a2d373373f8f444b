"""Idempotency-Key on POST: replay, reuse, in-flight, 5xx release, expiry, per-user keys."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import httpx

from services.gateway.tests.conftest import ClientLogin, Gateway, assert_error, bearer
from services.gateway.tests.upstream_app import Upstream


def _key() -> str:
    return f"key-{uuid.uuid4()}"


def _dsn(gateway: Gateway) -> str:
    return gateway.settings.database_url.replace("postgresql+asyncpg://", "postgresql://")


async def test_replay_returns_first_response_and_hits_upstream_once(
    client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream
) -> None:
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    payload = {"clientId": "client-1", "items": [{"description": "Design", "quantity": "2", "unitPrice": 5000}]}
    first = await client.post("/api/invoices", json=payload, headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert first.json()["headers"]["idempotency-key"] == key  # passed on, for the service's own use

    again = await client.post("/api/invoices", json=payload, headers=headers)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 1


async def test_same_key_different_request_is_422(client: httpx.AsyncClient, admin_token: str) -> None:
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    assert (await client.post("/api/invoices", json={"n": 1}, headers=headers)).status_code == 201
    assert_error(await client.post("/api/invoices", json={"n": 2}, headers=headers), 422, "idempotency_key_reused")
    assert_error(await client.post("/api/clients", json={"n": 1}, headers=headers), 422, "idempotency_key_reused")


async def test_in_flight_repeat_is_409(
    client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream
) -> None:
    key = _key()
    gate = f"gate-{key}"
    headers = {**bearer(admin_token), "Idempotency-Key": key, "X-Test-Block": gate}
    first = asyncio.create_task(client.post("/api/invoices/inv-9/remind", json={}, headers=headers))
    await asyncio.wait_for(invoice_upstream.arrived(gate).wait(), timeout=10)

    repeat = await client.post("/api/invoices/inv-9/remind", json={}, headers=headers)
    assert_error(repeat, 409, "idempotency_in_progress")

    invoice_upstream.gate(gate).set()
    done = await asyncio.wait_for(first, timeout=10)
    assert done.status_code == 201, done.text
    replay = await client.post("/api/invoices/inv-9/remind", json={}, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == done.content
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 1


async def test_caller_hanging_up_still_stores_the_response(
    gateway: Gateway, admin_token: str, invoice_upstream: Upstream, client: httpx.AsyncClient
) -> None:
    key = _key()
    gate = f"gate-{key}"
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as impatient:
        pending = asyncio.create_task(
            impatient.post("/api/invoices/inv-7/remind", json={}, headers={**headers, "X-Test-Block": gate})
        )
        await asyncio.wait_for(invoice_upstream.arrived(gate).wait(), timeout=10)
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
    invoice_upstream.gate(gate).set()
    for _ in range(100):
        retry = await client.post("/api/invoices/inv-7/remind", json={}, headers=headers)
        if retry.status_code != 409:
            break
        await asyncio.sleep(0.05)
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 1


async def test_concurrent_duplicates_run_once(
    client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream
) -> None:
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    responses = await asyncio.gather(
        *(client.post("/api/invoices", json={"same": True}, headers=headers) for _ in range(8))
    )
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 1


async def test_5xx_is_not_stored(client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream) -> None:
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    failed = await client.post("/api/invoices", json={"x": 1}, headers={**headers, "X-Test-Status": "500"})
    assert failed.status_code == 500
    retried = await client.post("/api/invoices", json={"x": 1}, headers=headers)
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    replay = await client.post("/api/invoices", json={"x": 1}, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == retried.content
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 2


async def test_5xx_keeps_the_key_with_an_unknown_outcome(
    client: httpx.AsyncClient, admin_token: str, gateway: Gateway, invoice_upstream: Upstream
) -> None:
    """The upstream may have committed before answering 5xx (or timing out): the gateway must not
    forget the key, and the retry reaches the service with the same key (which replays or runs)."""
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    failed = await client.post("/api/invoices", json={"x": 1}, headers={**headers, "X-Test-Status": "504"})
    assert failed.status_code == 504
    conn = await asyncpg.connect(_dsn(gateway))
    try:
        state = await conn.fetchval("SELECT state FROM idempotency_keys WHERE key = $1", key)
    finally:
        await conn.close()
    assert state == "unknown"
    retried = await client.post("/api/invoices", json={"x": 1}, headers=headers)
    assert retried.status_code == 201
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 2  # both tries carried the key


async def test_4xx_is_stored(client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream) -> None:
    key = _key()
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    first = await client.post("/api/invoices", json={"x": 1}, headers={**headers, "X-Test-Status": "409"})
    again = await client.post("/api/invoices", json={"x": 1}, headers=headers)
    assert first.status_code == again.status_code == 409
    assert again.headers["idempotent-replayed"] == "true"
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 1


async def test_keys_belong_to_their_user(
    client: httpx.AsyncClient, admin_token: str, client_login: ClientLogin, invoice_upstream: Upstream
) -> None:
    key = _key()
    as_admin = await client.post("/api/invoices", json={}, headers={**bearer(admin_token), "Idempotency-Key": key})
    as_client = await client.post(
        "/api/invoices", json={}, headers={**bearer(client_login.token), "Idempotency-Key": key}
    )
    assert as_admin.status_code == as_client.status_code == 201
    assert "idempotent-replayed" not in as_client.headers
    assert as_client.json()["headers"]["x-actor-role"] == "client"
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 2


async def test_own_endpoints_are_idempotent_too(client: httpx.AsyncClient, admin_token: str) -> None:
    key = _key()
    payload = {"email": f"idem-{uuid.uuid4().hex[:8]}@example.com", "password": "secret-password", "role": "admin"}
    headers = {**bearer(admin_token), "Idempotency-Key": key}
    first = await client.post("/api/users", json=payload, headers=headers)
    second = await client.post("/api/users", json=payload, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()  # created once, not a 409 for the repeat


async def test_gets_and_bad_tokens_are_not_deduplicated(
    client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream
) -> None:
    key = _key()
    for _ in range(2):
        response = await client.get("/api/invoices", headers={**bearer(admin_token), "Idempotency-Key": key})
        assert "idempotent-replayed" not in response.headers
    assert len(invoice_upstream.hits_with("idempotency-key", key)) == 2
    bad = await client.post("/api/invoices", json={}, headers={**bearer("forged"), "Idempotency-Key": key})
    assert_error(bad, 401)


async def test_invalid_keys_are_400(client: httpx.AsyncClient, admin_token: str) -> None:
    headers = {**bearer(admin_token), "Idempotency-Key": "k" * 300}
    response = await client.post("/api/invoices", json={}, headers=headers)
    assert_error(response, 400, "invalid_idempotency_key")


async def test_expired_and_abandoned_keys_can_run_again(
    client: httpx.AsyncClient, admin_token: str, gateway: Gateway, invoice_upstream: Upstream
) -> None:
    expired_key, abandoned_key = _key(), _key()
    headers = {**bearer(admin_token)}
    first = await client.post("/api/invoices", json={}, headers={**headers, "Idempotency-Key": expired_key})
    assert first.status_code == 201

    conn = await asyncpg.connect(_dsn(gateway))
    try:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = $1", expired_key
        )
        owner = await conn.fetchval("SELECT owner FROM idempotency_keys WHERE key = $1", expired_key)
        # a claim left behind by a gateway that died mid-request, long ago
        from services.gateway.service import request_fingerprint

        await conn.execute(
            "INSERT INTO idempotency_keys (owner, key, fingerprint, method, path, state, lock_id, locked_at)"
            " VALUES ($1, $2, $3, 'POST', '/api/invoices', 'in_progress', $4, now() - interval '1 hour')",
            owner, abandoned_key, request_fingerprint("POST", "/api/invoices", b"{}"), uuid.uuid4(),
        )
    finally:
        await conn.close()

    again = await client.post("/api/invoices", json={}, headers={**headers, "Idempotency-Key": expired_key})
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert len(invoice_upstream.hits_with("idempotency-key", expired_key)) == 2

    taken_over = await client.post(
        "/api/invoices", content=b"{}", headers={**headers, "Idempotency-Key": abandoned_key,
                                                 "Content-Type": "application/json"}
    )
    assert taken_over.status_code == 201, taken_over.text
    assert len(invoice_upstream.hits_with("idempotency-key", abandoned_key)) == 1


async def test_cleanup_removes_expired_keys(client: httpx.AsyncClient, admin_token: str, gateway: Gateway) -> None:
    key = _key()
    await client.post("/api/invoices", json={}, headers={**bearer(admin_token), "Idempotency-Key": key})
    conn = await asyncpg.connect(_dsn(gateway))
    try:
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '2 days' WHERE key = $1", key)
        removed = await gateway.app.state.gateway.idempotency.cleanup()
        assert removed >= 1
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0
    finally:
        await conn.close()
