"""Issue 12, audit log, end to end on the real stack: the admin's money and document changes are in
`GET /api/audit` with who, what, the target and the request's correlation id; a client's own actions
are not; the log reads with filters and pages and cannot be rewritten, even in SQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY, InfraEndpoints
from kit.worker import asyncpg_dsn
from tests.conftest import login


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def corr() -> dict[str, str]:
    return {"X-Correlation-Id": f"e2e-audit-{uuid.uuid4()}"}


async def entries(http: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await http.get("/api/audit", params={"limit": "100", **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


async def one(http: httpx.AsyncClient, correlation: dict[str, str], **params: str) -> dict[str, Any]:
    found = [e for e in await entries(http, **params) if e["correlationId"] == correlation["X-Correlation-Id"]]
    assert len(found) == 1, found
    return found[0]


async def test_admin_actions_are_audited_and_the_log_holds(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints,
) -> None:
    me = (await admin.get("/api/auth/me")).json()
    actor = {"userId": me["id"], "email": "admin@example.com", "role": "admin"}
    client = (await admin.post("/api/clients", json={"name": f"Audit {uuid.uuid4().hex[:6]}",
                                                     "email": "ap@audit.example.com", "currency": "EUR"})).json()
    invoice = (await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Audit", "quantity": "1", "unitPrice": 40_000}]})).json()

    template = (await admin.get("/api/invoice-template")).json()
    restore = {k: v for k, v in template.items() if k not in ("version", "createdAt", "createdBy", "logo")}
    gateway_db = await asyncpg.connect(asyncpg_dsn(infra_endpoints.database_urls[GATEWAY]))
    payments_db = await asyncpg.connect(asyncpg_dsn(infra_endpoints.database_urls["payments"]))
    try:
        # 1. send
        send_corr = corr()
        sent = await admin.post(f"/api/invoices/{invoice['id']}/send", headers=send_corr)
        assert sent.status_code == 200, sent.text

        # 2. mark paid (once payments has its copy of the sent invoice, from Kafka)
        async def copy_is_open() -> bool:
            return await payments_db.fetchval("SELECT status FROM invoices WHERE id = $1", invoice["id"]) == "SENT"

        await wait_until(copy_is_open)
        pay_corr = corr()
        key = f"audit-pay-{uuid.uuid4()}"
        paid = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid",
                                json={"amount": 10_000, "method": "bank_transfer", "reference": "wire 7"},
                                headers={**pay_corr, "Idempotency-Key": key})
        assert paid.status_code == 201, paid.text

        # 3. a template change
        template_corr = corr()
        saved = await admin.put("/api/invoice-template", json={**restore, "footerText": "Audited footer"},
                                headers=template_corr)
        assert saved.status_code == 200, saved.text

        send_entry = await one(admin, send_corr, target=invoice["id"])
        assert (send_entry["action"], send_entry["outcome"], send_entry["status"]) == ("invoice.send", "succeeded", 200)
        assert send_entry["actor"] == actor and send_entry["targets"] == {"invoice_id": invoice["id"]}
        assert send_entry["upstream"] == "invoice"

        pay_entry = await one(admin, pay_corr, target=invoice["id"])
        assert (pay_entry["action"], pay_entry["outcome"], pay_entry["status"]) == ("payment.manual", "succeeded", 201)
        assert pay_entry["actor"] == actor and pay_entry["idempotencyKey"] == key
        assert pay_entry["targets"] == {"invoice_id": invoice["id"], "payment_id": paid.json()["id"]}
        assert pay_entry["summary"] == {"body": {"amount": 10_000, "method": "bank_transfer", "reference": "wire 7"}}

        template_entry = await one(admin, template_corr, action="template.update")
        assert template_entry["actor"] == actor and template_entry["status"] == 200
        assert template_entry["summary"]["body"]["footerText"] == "Audited footer"

        # filters and pages: this invoice's three actions (its creation too), newest first, a page each
        mine = await entries(admin, target=invoice["id"])
        assert [e["action"] for e in mine] == ["payment.manual", "invoice.send", "invoice.create"]
        assert mine[0]["id"] == pay_entry["id"] and mine[1]["id"] == send_entry["id"]
        seen: list[int] = []
        cursor: str | None = None
        for _ in range(3):
            params = {"target": invoice["id"], "limit": "1", **({"cursor": cursor} if cursor else {})}
            page = (await admin.get("/api/audit", params=params)).json()
            seen += [e["id"] for e in page["items"]]
            cursor = page["nextCursor"]
        assert seen == [e["id"] for e in mine] and cursor is None and not page["hasMore"]
        assert [e["id"] for e in await entries(admin, target=invoice["id"], action="invoice.send")] == [
            send_entry["id"]]
        assert len(await entries(admin, target=invoice["id"], actor="admin@example.com")) == 3
        assert len(await entries(admin, target=invoice["id"], actor=me["id"])) == 3
        assert [e["action"] for e in await entries(admin, target=invoice["id"], to=send_entry["occurredAt"])] == [
            "invoice.create"]
        assert len(await entries(admin, target=invoice["id"], **{"from": send_entry["occurredAt"]})) == 2

        # a GET records nothing
        before = await gateway_db.fetchval("SELECT count(*) FROM audit_log")
        assert (await admin.get(f"/api/invoices/{invoice['id']}", headers=corr())).status_code == 200
        assert (await admin.get(f"/api/invoices/{invoice['id']}/pdf")).status_code == 200
        assert await gateway_db.fetchval("SELECT count(*) FROM audit_log") == before

        # history cannot be rewritten, not even in SQL
        for statement in ("UPDATE audit_log SET actor_email = 'someone@else.example' WHERE id = $1",
                          "DELETE FROM audit_log WHERE id = $1"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await gateway_db.execute(statement, pay_entry["id"])
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await gateway_db.execute("TRUNCATE audit_log")
        assert await gateway_db.fetchval("SELECT actor_email FROM audit_log WHERE id = $1",
                                         pay_entry["id"]) == "admin@example.com"
    finally:
        await gateway_db.close()
        await payments_db.close()
        # the branding back for the rest of the session (a newer version with the old settings)
        await admin.put("/api/invoice-template", json=restore)


async def test_a_client_cannot_read_the_log_and_its_own_actions_are_not_admin_actions(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess],
) -> None:
    client = (await admin.post("/api/clients", json={"name": f"Audit client {uuid.uuid4().hex[:6]}",
                                                     "email": "ap@audit-client.example.com", "currency": "EUR"})).json()
    invoice = (await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Audit", "quantity": "1", "unitPrice": 12_000}]})).json()
    assert (await admin.post(f"/api/invoices/{invoice['id']}/send")).status_code == 200
    email = f"audit-{uuid.uuid4().hex[:8]}@audit-client.example.com"
    user_corr = corr()
    created = await admin.post("/api/users", json={"email": email, "password": "audit-pass-123", "role": "client",
                                                   "clientId": client["id"]}, headers=user_corr)
    assert created.status_code == 201, created.text
    user_entry = await one(admin, user_corr, target=created.json()["id"])
    assert user_entry["action"] == "user.create" and user_entry["summary"]["body"]["password"] == "[redacted]"

    me = await login(stack[GATEWAY].url, email, "audit-pass-123")
    try:
        refused = await me.get("/api/audit")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"

        async def checkout_opens() -> bool:  # once payments knows the sent invoice
            return (await me.post(f"/api/invoices/{invoice['id']}/checkout")).status_code == 200

        await wait_until(checkout_opens)
    finally:
        await me.aclose()
    assert await entries(admin, actor=created.json()["id"]) == []
    assert [e["action"] for e in await entries(admin, target=invoice["id"])] == ["invoice.send", "invoice.create"]
