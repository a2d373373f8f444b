"""Forwarding: trusted headers, body and header pass-through, public routes, failures."""

from __future__ import annotations

import hashlib
import uuid

import httpx

from services.gateway.tests.conftest import INTERNAL_TOKEN, MAX_BODY, ClientLogin, assert_error, bearer
from services.gateway.tests.upstream_app import PDF_BYTES, Upstream


async def test_spoofed_actor_headers_are_replaced(
    client: httpx.AsyncClient, client_login: ClientLogin, payments_upstream: Upstream
) -> None:
    spoof = {
        "X-Actor-Role": "admin",
        "x-actor-client-id": "client-2",
        "X-ACTOR-USER-ID": "someone-else",
        "X-Actor-Impersonate": "yes",
        "X-Internal-Token": "guessed",
        "X_Actor_Role": "admin",
    }
    response = await client.get(
        "/api/payments", headers={**spoof, **bearer(client_login.token)}, params={"status": "paid", "q": "a b"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-upstream"] == "payments"
    seen = response.json()["headers"]
    assert seen["x-actor-role"] == "client"
    assert seen["x-actor-client-id"] == "client-1"
    assert seen["x-actor-user-id"] == client_login.user_id
    assert "x-actor-impersonate" not in seen and "x_actor_role" not in seen
    assert seen["x-internal-token"] == INTERNAL_TOKEN
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "authorization" not in seen  # the bearer token stays at the gateway
    assert response.json()["query"] == "status=paid&q=a+b"


async def test_admin_actor_has_no_client(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await client.get(
        "/api/clients/client-9/things", headers={**bearer(admin_token), "X-Actor-Client-Id": "client-2"}
    )
    seen = response.json()["headers"]
    assert seen["x-actor-role"] == "admin"
    assert "x-actor-client-id" not in seen


async def test_correlation_id_is_propagated(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await client.get("/api/invoices", headers={**bearer(admin_token), "X-Correlation-Id": "corr-123"})
    assert response.headers["x-correlation-id"] == "corr-123"
    assert response.json()["headers"]["x-correlation-id"] == "corr-123"
    generated = await client.get("/api/invoices", headers=bearer(admin_token))
    assert generated.json()["headers"]["x-correlation-id"] == generated.headers["x-correlation-id"]


async def test_json_body_and_method_pass_through(client: httpx.AsyncClient, admin_token: str) -> None:
    body = '{"name": "Ünïcode", "n": 1}'.encode()
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        response = await client.request(
            method, "/api/invoices/inv-1", content=body,
            headers={**bearer(admin_token), "Content-Type": "application/json; charset=utf-8"},
        )
        assert response.status_code in (200, 201), response.text
        echoed = response.json()
        assert echoed["method"] == method
        assert echoed["bodySha256"] == hashlib.sha256(body).hexdigest()
        assert echoed["headers"]["content-type"] == "application/json; charset=utf-8"


async def test_pdf_bytes_pass_through(client: httpx.AsyncClient, client_login: ClientLogin) -> None:
    response = await client.get("/api/invoices/2026-0001/pdf", headers=bearer(client_login.token))
    assert response.status_code == 200
    assert response.content == PDF_BYTES
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"] == 'attachment; filename="2026-0001.pdf"'
    assert int(response.headers["content-length"]) == len(PDF_BYTES)


async def test_upstream_status_and_error_pass_through(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await client.get("/api/clients/nobody", headers=bearer(admin_token))
    assert_error(response, 404, "not_found")


async def test_stripe_webhook_raw_body_untouched_and_no_auth(
    client: httpx.AsyncClient, payments_upstream: Upstream
) -> None:
    raw = b'{\n  "id": "evt_1",\t"type": "checkout.session.completed",  "data": {"x": "\\u00e9 \xc3\xa9"}}\r\n'
    signature = "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd,v0=abc"
    headers = {
        "Stripe-Signature": signature,
        "Content-Type": "application/json; charset=utf-8",
        "Idempotency-Key": "stripe-is-not-deduplicated-here",
        "X-Actor-Role": "admin",
    }
    for _ in range(2):
        response = await client.post("/webhooks/stripe", content=raw, headers=headers)
        assert response.status_code == 201, response.text
        assert "idempotent-replayed" not in response.headers
        seen = response.json()
        assert seen["path"] == "/webhooks/stripe"
        assert seen["bodySha256"] == hashlib.sha256(raw).hexdigest()
        assert seen["headers"]["stripe-signature"] == signature
        assert seen["headers"]["content-type"] == "application/json; charset=utf-8"
        assert seen["headers"]["x-actor-role"] == "anonymous"  # never the implicit "system"
        assert "x-actor-user-id" not in seen["headers"]
    assert len(payments_upstream.hits_with("idempotency-key", "stripe-is-not-deduplicated-here")) == 2


async def test_tracking_routes_are_public(client: httpx.AsyncClient) -> None:
    response = await client.get("/t/o/abc123.gif")
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/t/o/abc123.gif"
    assert response.json()["headers"]["x-actor-role"] == "anonymous"


async def test_upstream_down_is_503(client: httpx.AsyncClient, admin_token: str) -> None:
    error = assert_error(await client.get("/api/reports/revenue", headers=bearer(admin_token)), 503,
                         "upstream_unavailable")
    assert error["details"] == {"service": "reporting"}
    key = f"k-{uuid.uuid4()}"
    for _ in range(2):  # a 5xx is not remembered: the retry runs (and fails) again
        response = await client.post(
            "/api/plans", json={"name": "x"}, headers={**bearer(admin_token), "Idempotency-Key": key}
        )
        assert_error(response, 503, "upstream_unavailable")


async def test_unknown_routes_are_404(client: httpx.AsyncClient, admin_token: str) -> None:
    for path in ("/api/nope", "/nothing-here", "/api/invoicesX", "/webhooks/paypal"):
        assert_error(await client.get(path, headers=bearer(admin_token)), 404, "not_found")
    assert_error(await client.post("/api/unknown", json={}, headers=bearer(admin_token)), 404, "not_found")


async def test_dot_segments_are_refused(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await client.get("/api/invoices/%2E%2E/users", headers=bearer(admin_token))
    assert_error(response, 400, "invalid_path")


async def test_body_size_is_capped(client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream) -> None:
    before = len(invoice_upstream.hits)
    big = b"x" * (MAX_BODY + 1)
    response = await client.post("/api/invoices", content=big, headers=bearer(admin_token))
    assert_error(response, 413, "payload_too_large")

    async def chunks():  # no Content-Length: counted while reading
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"y" * 65536

    async with httpx.AsyncClient(base_url=str(client.base_url), timeout=20) as fresh:
        chunked = await fresh.post("/api/invoices", content=chunks(), headers=bearer(admin_token))
    assert_error(chunked, 413, "payload_too_large")
    assert_error(await client.post("/api/auth/login", content=big), 413, "payload_too_large")
    assert len(invoice_upstream.hits) == before

    ok = await client.post("/api/invoices", content=b"z" * (MAX_BODY - 10), headers=bearer(admin_token))
    assert ok.status_code == 201
