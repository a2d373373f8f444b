"""The audit log on the real gateway and real PostgreSQL, in front of the echo upstreams."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from services.gateway.tests.conftest import ClientLogin, Gateway, assert_error, bearer
from services.gateway.tests.upstream_app import Upstream


def _dsn(gateway: Gateway) -> str:
    return gateway.settings.database_url.replace("postgresql+asyncpg://", "postgresql://")


def _corr() -> dict[str, str]:
    return {"X-Correlation-Id": f"audit-{uuid.uuid4()}"}


async def _entries(client: httpx.AsyncClient, token: str, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/api/audit", params=params, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


async def _by_correlation(client: httpx.AsyncClient, token: str, target: str, correlation: str) -> list[dict[str, Any]]:
    return [e for e in await _entries(client, token, target=target, limit="100") if e["correlationId"] == correlation]


async def test_an_admin_change_through_the_proxy_is_recorded(
    client: httpx.AsyncClient, admin_token: str, invoice_upstream: Upstream
) -> None:
    invoice_id = f"inv-{uuid.uuid4()}"
    corr, key = _corr(), f"k-{uuid.uuid4()}"
    response = await client.post(f"/api/invoices/{invoice_id}/send", json={},
                                 headers={**bearer(admin_token), **corr, "Idempotency-Key": key})
    assert response.status_code == 200, response.text
    me = (await client.get("/api/auth/me", headers=bearer(admin_token))).json()
    [entry] = await _by_correlation(client, admin_token, invoice_id, corr["X-Correlation-Id"])
    assert entry["action"] == "invoice.send" and entry["outcome"] == "succeeded" and entry["status"] == 200
    assert entry["actor"] == {"userId": me["id"], "email": "admin@example.com", "role": "admin"}
    assert entry["targets"] == {"invoice_id": invoice_id} and entry["upstream"] == "invoice"
    assert entry["method"] == "POST" and entry["path"] == f"/api/invoices/{invoice_id}/send"
    assert entry["idempotencyKey"] == key
    # a replay of the same key is not a second action
    again = await client.post(f"/api/invoices/{invoice_id}/send", json={},
                              headers={**bearer(admin_token), **_corr(), "Idempotency-Key": key})
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(await _entries(client, admin_token, target=invoice_id)) == 1


async def test_money_refusals_and_unknown_outcomes_are_kept_other_refusals_not(
    client: httpx.AsyncClient, admin_token: str, payments_upstream: Upstream
) -> None:
    invoice_id = f"inv-{uuid.uuid4()}"
    body = {"amount": 1500, "method": "bank_transfer", "reference": "wire"}
    refused = await client.post(f"/api/invoices/{invoice_id}/mark-paid", json=body,
                                headers={**bearer(admin_token), "X-Test-Status": "409"})
    assert refused.status_code == 409
    broken = await client.post(f"/api/invoices/{invoice_id}/mark-paid", json=body,
                               headers={**bearer(admin_token), "X-Test-Status": "500"})
    assert broken.status_code == 500
    paid = await client.post(f"/api/invoices/{invoice_id}/mark-paid", json=body, headers=bearer(admin_token))
    assert paid.status_code == 201
    entries = await _entries(client, admin_token, target=invoice_id)
    assert [(e["outcome"], e["status"]) for e in entries] == [("succeeded", 201), ("unknown", 500), ("refused", 409)]
    assert {e["action"] for e in entries} == {"payment.manual"}
    assert entries[0]["summary"] == {"body": body}
    # a refused change that moves no money is not an action worth keeping
    other = f"inv-{uuid.uuid4()}"
    no = await client.put(f"/api/invoices/{other}", json={}, headers={**bearer(admin_token), "X-Test-Status": "409"})
    assert no.status_code == 409
    assert await _entries(client, admin_token, target=other) == []


async def test_a_get_and_a_clients_change_record_nothing(
    client: httpx.AsyncClient, admin_token: str, client_login: ClientLogin
) -> None:
    invoice_id = f"inv-{uuid.uuid4()}"
    assert (await client.get(f"/api/invoices/{invoice_id}", headers=bearer(admin_token))).status_code == 200
    paid = await client.post(f"/api/invoices/{invoice_id}/mark-paid", json={"amount": 1},
                             headers=bearer(client_login.token))
    assert paid.status_code == 201  # the echo lets it through: only the actor's role matters here
    assert await _entries(client, admin_token, target=invoice_id) == []


async def test_only_admins_read_the_log(client: httpx.AsyncClient, client_login: ClientLogin) -> None:
    assert_error(await client.get("/api/audit", headers=bearer(client_login.token)), 403)
    assert_error(await client.get("/api/audit"), 401)


async def test_user_creation_is_recorded_without_its_password(client: httpx.AsyncClient, admin_token: str) -> None:
    corr = _corr()
    email = f"audited-{uuid.uuid4().hex[:8]}@example.com"
    created = await client.post("/api/users", json={"email": email, "password": "secret-password-1",
                                                    "role": "client", "clientId": "client-2"},
                                headers={**bearer(admin_token), **corr})
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    [entry] = await _entries(client, admin_token, target=user_id)
    assert entry["action"] == "user.create" and entry["upstream"] == "gateway" and entry["status"] == 201
    assert entry["correlationId"] == corr["X-Correlation-Id"] and entry["targets"] == {"user_id": user_id}
    assert entry["summary"]["body"]["password"] == "[redacted]" and entry["summary"]["body"]["email"] == email
    assert "secret-password-1" not in str(entry)


async def test_filters_and_pages(client: httpx.AsyncClient, admin_token: str, client_login: ClientLogin) -> None:
    invoice_id = f"inv-{uuid.uuid4()}"
    for _ in range(5):
        assert (await client.post(f"/api/invoices/{invoice_id}/send", json={},
                                  headers=bearer(admin_token))).status_code == 200
    assert (await client.post(f"/api/invoices/{invoice_id}/cancel", json={},
                              headers=bearer(admin_token))).status_code == 201
    everything = await _entries(client, admin_token, target=invoice_id)
    assert [e["action"] for e in everything] == ["invoice.cancel"] + ["invoice.send"] * 5  # newest first
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)

    seen: list[int] = []
    cursor: str | None = None
    while True:
        params = {"target": invoice_id, "limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/audit", params=params, headers=bearer(admin_token))).json()
        seen += [e["id"] for e in page["items"]]
        cursor = page["nextCursor"]
        assert page["hasMore"] == (cursor is not None)
        if cursor is None:
            break
    assert seen == [e["id"] for e in everything]
    # a cursor of one filtered list is refused by another
    first = (await client.get("/api/audit", params={"target": invoice_id, "limit": "2"},
                              headers=bearer(admin_token))).json()
    assert_error(await client.get("/api/audit", params={"action": "invoice.send", "cursor": first["nextCursor"]},
                                  headers=bearer(admin_token)), 400, "invalid_cursor")

    sends = await _entries(client, admin_token, target=invoice_id, action="invoice.send")
    assert len(sends) == 5
    me = (await client.get("/api/auth/me", headers=bearer(admin_token))).json()
    assert len(await _entries(client, admin_token, target=invoice_id, actor=me["id"])) == 6
    assert len(await _entries(client, admin_token, target=invoice_id, actor="ADMIN@example.com")) == 6
    assert await _entries(client, admin_token, target=invoice_id, actor=client_login.user_id) == []
    newest = everything[0]["occurredAt"]
    assert [e["id"] for e in await _entries(client, admin_token, target=invoice_id, **{"from": newest})] == [
        everything[0]["id"]]
    assert len(await _entries(client, admin_token, target=invoice_id, to=newest)) == 5
    assert await _entries(client, admin_token, target=invoice_id, to="2000-01-01T00:00:00Z") == []


@pytest.mark.parametrize("params", [
    {"action": "invoice.explode"}, {"from": "not-a-date"}, {"from": "0001-01-01T00:00:00+14:00"},
    {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, {"target": "a" * 201}, {"limit": "0"},
])
async def test_bad_filters_are_422(client: httpx.AsyncClient, admin_token: str, params: dict[str, str]) -> None:
    assert_error(await client.get("/api/audit", params=params, headers=bearer(admin_token)), 422)


async def test_unknown_parameters_and_nul_are_refused(client: httpx.AsyncClient, admin_token: str) -> None:
    assert_error(await client.get("/api/audit", params={"actr": "x"}, headers=bearer(admin_token)), 400,
                 "unknown_query_parameter")
    response = await client.get("/api/audit", params={"target": "a\x00b"}, headers=bearer(admin_token))
    assert_error(response, 422)


async def test_the_log_cannot_be_rewritten(
    gateway: Gateway, client: httpx.AsyncClient, admin_token: str
) -> None:
    invoice_id = f"inv-{uuid.uuid4()}"
    sent = await client.post(f"/api/invoices/{invoice_id}/send", json={}, headers=bearer(admin_token))
    assert sent.status_code == 200
    conn = await asyncpg.connect(_dsn(gateway))
    try:
        for statement in ("UPDATE audit_log SET action = 'nothing' WHERE $1 = ANY(target_ids)",
                          "DELETE FROM audit_log WHERE $1 = ANY(target_ids)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement, invoice_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("TRUNCATE audit_log")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # even one that matches nothing
            await conn.execute("DELETE FROM audit_log WHERE false")
        assert await conn.fetchval("SELECT action FROM audit_log WHERE $1 = ANY(target_ids)", invoice_id) == \
            "invoice.send"
    finally:
        await conn.close()


async def test_the_route_is_in_the_merged_openapi(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    operation = doc["paths"]["/api/audit"]["get"]
    for status in ("400", "401", "403", "422"):
        response = operation["responses"][status]
        if "$ref" in response:
            response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert operation["security"] == [{"bearerAuth": []}]
    names = {p["name"] for p in operation["parameters"]}
    assert {"actor", "action", "target", "from", "to", "limit", "cursor"} <= names


async def test_the_admin_page_lists_escaped_entries_with_filters(
    gateway: Gateway, client: httpx.AsyncClient, admin_token: str
) -> None:
    invoice_id = f"<script>{uuid.uuid4().hex[:8]}"
    sent = await client.post(f"/api/invoices/{invoice_id}/send", json={}, headers=bearer(admin_token))
    assert sent.status_code == 200
    async with httpx.AsyncClient(base_url=gateway.url, cookies={"admin_session": admin_token}, timeout=20) as pages:
        page = await pages.get("/admin/audit", params={"target": invoice_id})
        assert page.status_code == 200, page.text
        assert page.text.count('data-testid="audit-row"') == 1 and "invoice.send" in page.text
        assert invoice_id not in page.text and invoice_id.replace("<", "&lt;").replace(">", "&gt;") in page.text
        assert 'href="/admin/audit"' in page.text  # the nav link
        empty = await pages.get("/admin/audit", params={"target": invoice_id, "action": "invoice.cancel"})
        assert empty.status_code == 200 and "No entries match." in empty.text
        for bad in ({"from": "2026-13-40"}, {"action": "invoice.explode"}, {"from": "2026-02-01", "to": "2026-01-01"}):
            refused = await pages.get("/admin/audit", params=bad)
            assert refused.status_code == 422 and 'role="alert"' in refused.text


async def test_the_admin_pages_calls_are_audited_as_the_proxys(invoice_upstream: Upstream) -> None:
    """The admin pages call the services through the same upstream pool: its observer records them."""
    from services.gateway.admin.api import Api
    from services.gateway.audit import AuditLog, Record
    from services.gateway.proxy import ForwardedActor, UpstreamPool

    records: list[Record] = []

    class Recorder(AuditLog):
        async def write(self, record: Record) -> bool:
            records.append(record)
            return True

    pool = UpstreamPool({"invoice": invoice_upstream.url}, internal_token=None)
    pool.observers.append(Recorder(db=None).observe)  # type: ignore[arg-type]
    try:
        api = Api(pool, ForwardedActor(role="admin", user_id="00000000-0000-0000-0000-000000000001"))
        await api.request("POST", "/api/invoices/inv-7/cancel", json={}, headers={"Idempotency-Key": "form-1"})
        await api.request("GET", "/api/invoices/inv-7")
    finally:
        await pool.close()
    [record] = records
    assert (record.action, record.targets, record.idempotency_key) == ("invoice.cancel", {"invoice_id": "inv-7"},
                                                                       "form-1")
