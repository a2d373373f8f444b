"""Logins, tokens and the user endpoints."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import jwt

from services.gateway.tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    JWT_SECRET,
    ClientLogin,
    Gateway,
    assert_error,
    bearer,
    login,
)
from services.gateway.tests.upstream_app import Upstream


async def test_login_success_returns_token_and_user(client: httpx.AsyncClient, gateway: Gateway) -> None:
    response = await client.post("/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokenType"] == "bearer"
    assert body["expiresIn"] == gateway.settings.jwt_ttl_seconds
    assert body["user"]["email"] == ADMIN_EMAIL
    assert body["user"]["role"] == "admin"
    assert body["user"]["clientId"] is None
    claims = jwt.decode(body["accessToken"], JWT_SECRET, algorithms=["HS256"], issuer="billing-gateway")
    assert claims["sub"] == body["user"]["id"] and claims["role"] == "admin" and claims["cid"] is None
    assert claims["exp"] > time.time()

    me = await client.get("/api/auth/me", headers=bearer(body["accessToken"]))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == body["user"]["id"]


async def test_login_email_is_case_insensitive(client: httpx.AsyncClient) -> None:
    token = await login(client, "  Admin@Example.COM ", ADMIN_PASSWORD)
    assert token


async def test_login_failures(client: httpx.AsyncClient) -> None:
    wrong = await client.post("/api/auth/login", json={"email": ADMIN_EMAIL, "password": "nope-nope"})
    assert_error(wrong, 401, "invalid_credentials")
    unknown = await client.post("/api/auth/login", json={"email": "ghost@example.com", "password": "whatever1"})
    assert_error(unknown, 401, "invalid_credentials")
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]  # no account probing


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/auth/me"), 401)
    assert_error(await client.get("/api/invoices"), 401)
    assert_error(await client.get("/api/invoices", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}), 401)
    assert_error(await client.get("/api/users"), 401)


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(uuid.uuid4()), "role": "admin", "cid": None, "iat": now, "exp": now + 600, "iss": "billing-gateway",
    }
    claims.update(overrides)
    return claims


async def test_expired_token_is_401(client: httpx.AsyncClient) -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 5), JWT_SECRET, algorithm="HS256")
    for path in ("/api/auth/me", "/api/invoices"):
        assert_error(await client.get(path, headers=bearer(token)), 401, "token_expired")


async def test_forged_tokens_are_401(client: httpx.AsyncClient, invoice_upstream: Upstream) -> None:
    forged = [
        jwt.encode(_claims(), "some-other-secret-that-is-long-enough-too", algorithm="HS256"),
        jwt.encode(_claims(), None, algorithm="none"),  # type: ignore[arg-type]
        jwt.encode(_claims(iss="someone-else"), JWT_SECRET, algorithm="HS256"),
        jwt.encode(_claims(role="superuser"), JWT_SECRET, algorithm="HS256"),
        jwt.encode(_claims(role="client", cid=None), JWT_SECRET, algorithm="HS256"),
        jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, JWT_SECRET, algorithm="HS256"),
        "not.a.jwt",
        "garbage",
    ]
    before = len(invoice_upstream.hits)
    for token in forged:
        assert_error(await client.get("/api/invoices", headers=bearer(token)), 401, "invalid_token")
        assert_error(await client.get("/api/auth/me", headers=bearer(token)), 401, "invalid_token")
    assert len(invoice_upstream.hits) == before  # nothing reached the service


async def test_client_login_is_bound_to_its_client(
    client: httpx.AsyncClient, client_login: ClientLogin, invoice_upstream: Upstream
) -> None:
    me = await client.get("/api/auth/me", headers=bearer(client_login.token))
    assert me.status_code == 200, me.text
    assert me.json()["role"] == "client" and me.json()["clientId"] == "client-1"

    claims = jwt.decode(client_login.token, JWT_SECRET, algorithms=["HS256"], issuer="billing-gateway")
    assert claims["role"] == "client" and claims["cid"] == "client-1"

    response = await client.get("/api/invoices", headers=bearer(client_login.token))
    assert response.status_code == 200, response.text
    seen = response.json()["headers"]
    assert seen["x-actor-role"] == "client"
    assert seen["x-actor-client-id"] == "client-1"
    assert seen["x-actor-user-id"] == client_login.user_id


async def test_only_admins_manage_users(client: httpx.AsyncClient, client_login: ClientLogin) -> None:
    payload = {"email": "sneaky@example.com", "password": "long-enough", "role": "admin"}
    assert_error(await client.post("/api/users", json=payload, headers=bearer(client_login.token)), 403, "forbidden")
    assert_error(await client.get("/api/users", headers=bearer(client_login.token)), 403, "forbidden")
    assert_error(await client.post("/api/users", json=payload), 401)


async def test_create_users(client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream) -> None:
    headers = bearer(admin_token)
    email = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    created = await client.post(
        "/api/users", json={"email": email, "password": "secret-password", "role": "admin"}, headers=headers
    )
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "admin" and created.json()["clientId"] is None
    assert "password" not in created.text and "passwordHash" not in created.text
    assert await login(client, email, "secret-password")

    dup = await client.post(
        "/api/users", json={"email": email.upper(), "password": "secret-password", "role": "admin"}, headers=headers
    )
    assert_error(dup, 409, "email_taken")

    # the gateway asks the invoice service, as the system, whether the client exists
    unknown = await client.post(
        "/api/users",
        json={"email": f"x-{uuid.uuid4().hex[:6]}@example.com", "password": "secret-password", "role": "client",
              "clientId": "no-such-client"},
        headers=headers,
    )
    assert_error(unknown, 422, "client_not_found")
    lookup = [h for h in invoice_upstream.hits if h["path"] == "/api/clients/no-such-client"][-1]
    assert "x-actor-role" not in lookup["headers"]
    assert lookup["headers"]["x-internal-token"] == "internal-test-token"

    bad = [
        {"email": "a@example.com", "password": "short", "role": "admin"},
        {"email": "b@example.com", "password": "long-enough", "role": "client"},
        {"email": "c@example.com", "password": "long-enough", "role": "admin", "clientId": "client-1"},
        {"email": "d@example.com", "password": "long-enough", "role": "root"},
        {"email": "not-an-email", "password": "long-enough", "role": "admin"},
        {"email": 5, "password": ["x"], "role": None},
        {},
    ]
    for payload in bad:
        assert_error(await client.post("/api/users", json=payload, headers=headers), 422, "validation_error")

    listed = await client.get("/api/users", headers=headers, params={"limit": 100})
    assert listed.status_code == 200, listed.text
    emails = [u["email"] for u in listed.json()["items"]]
    assert email in emails and "a@example.com" not in emails
    assert emails.count(ADMIN_EMAIL) == 1
    assert listed.json()["total"] >= 2
    assert_error(await client.get("/api/users", headers=headers, params={"limit": 0}), 422)
    assert_error(await client.get("/api/users", headers=headers, params={"limit": "lots"}), 422)
    assert_error(await client.get("/api/users", headers=headers, params={"limit": 101}), 422)


async def test_users_list_pages_with_a_cursor(client: httpx.AsyncClient, admin_token: str) -> None:
    """The platform's list shape: `{items, nextCursor, hasMore, total}`, oldest first, no repeats."""
    headers = bearer(admin_token)
    for i in range(3):
        created = await client.post("/api/users", headers=headers, json={
            "email": f"paged-{i}-{uuid.uuid4().hex[:6]}@example.com", "password": "long-enough", "role": "admin"})
        assert created.status_code == 201, created.text
    everyone = (await client.get("/api/users", headers=headers, params={"limit": 100})).json()
    assert everyone["hasMore"] is False and everyone["nextCursor"] is None
    expected = [u["email"] for u in everyone["items"]]
    assert len(expected) == everyone["total"] >= 4 and expected[0] == ADMIN_EMAIL
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/users", headers=headers, params=params)).json()
        assert set(page) == {"items", "nextCursor", "hasMore", "total"} and len(page["items"]) <= 2
        seen += [u["email"] for u in page["items"]]
        if not page["hasMore"]:
            break
        cursor = page["nextCursor"]
    assert seen == expected
    assert_error(await client.get("/api/users", headers=headers, params={"cursor": "bm90LWEtY3Vyc29y"}), 400,
                 "invalid_cursor")


async def test_own_routes_refuse_unknown_query_parameters(client: httpx.AsyncClient, admin_token: str) -> None:
    headers = bearer(admin_token)
    error = assert_error(await client.get("/api/users", headers=headers, params={"limt": 1}), 400,
                         "unknown_query_parameter")
    assert "limt" in error["message"] and error["details"]["unknown"] == ["limt"]
    assert_error(await client.get("/api/auth/me", headers=headers, params={"x": "1"}), 400, "unknown_query_parameter")
    login = await client.post("/api/auth/login?debug=1", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert_error(login, 400, "unknown_query_parameter")


async def test_malformed_bodies_are_4xx_in_error_format(client: httpx.AsyncClient, admin_token: str) -> None:
    json_header = {"Content-Type": "application/json"}
    assert_error(await client.post("/api/auth/login", content=b"{bad json", headers=json_header), 422)
    assert_error(await client.post("/api/auth/login", content=b"[1, 2]", headers=json_header), 422)
    not_utf8 = await client.post("/api/auth/login", content=b"\xff\xfe\x00", headers=json_header)
    assert not_utf8.status_code in (400, 422)
    assert_error(not_utf8, not_utf8.status_code)
    assert_error(await client.post("/api/auth/login", json={"email": ["x"], "password": 1}), 422)
    assert_error(await client.post("/api/auth/login"), 422)
    response = await client.post("/api/auth/login", content=b"email=a", headers={"Content-Type": "text/plain"})
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    created = await client.post(
        "/api/users", content=b'{"email": "x@example.com", ', headers={**json_header, **bearer(admin_token)}
    )
    assert_error(created, 422)
