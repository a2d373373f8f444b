"""Issue 2 'done when', through the gateway on real Kafka and Postgres: log in, create, edit, send,
part-pay and fully pay an invoice, and watch its events arrive on Kafka."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY
from tests.conftest import TopicWatcher, login, wait_until


async def every_item(http: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """All items of a list endpoint, following `nextCursor` page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await http.get(path, params={**params, "limit": 100, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["nextCursor"]
        if cursor is None:
            return items


async def test_invoice_lifecycle_through_the_gateway(admin: httpx.AsyncClient, kafka_events: TopicWatcher) -> None:
    client = (await admin.post("/api/clients", json={"name": "E2E GmbH", "email": "e2e@e2e.example.com",
                                                     "currency": "EUR"})).json()
    created = await admin.post("/api/invoices", json={
        "clientId": client["id"], "taxRate": "19",
        "items": [{"description": "Sprint", "quantity": "2", "unitPrice": 50_000}],
    })
    assert created.status_code == 201, created.text
    invoice = created.json()
    edited = await admin.put(f"/api/invoices/{invoice['id']}", json={
        "items": [{"description": "Sprint", "quantity": "3", "unitPrice": 50_000}]})
    assert edited.status_code == 200 and edited.json()["total"] == 178_500
    sent = await admin.post(f"/api/invoices/{invoice['id']}/send")
    assert sent.status_code == 200 and sent.json()["status"] == "SENT"

    part = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid",
                            json={"amount": 78_500, "method": "bank_transfer", "reference": "WIRE-1"})
    assert part.status_code == 201, part.text
    await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PARTIAL")
    over = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid", json={"amount": 100_001, "method": "cash"})
    assert over.status_code == 422, over.text  # overpayment refused
    rest = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid", json={"amount": 100_000, "method": "cash"})
    assert rest.status_code == 201, rest.text
    paid = await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PAID")
    assert paid["amountPaid"] == 178_500 and paid["amountDue"] == 0

    for event_type in ("invoice.created", "invoice.updated", "invoice.sent", "invoice.partially_paid",
                       "invoice.paid"):
        await kafka_events.wait_for(invoice["id"], event_type)
    assert len(kafka_events.matching(invoice["id"], "payment.recorded")) == 2
    history = (await admin.get(f"/api/invoices/{invoice['id']}/payments")).json()["items"]
    assert sorted(p["amount"] for p in history) == [78_500, 100_000]


async def test_client_login_sees_only_its_invoices(admin: httpx.AsyncClient, stack: dict[str, ServiceProcess]) -> None:
    mine = (await admin.post("/api/clients", json={"name": "Mine", "email": "me@mine.example.com"})).json()
    theirs = (await admin.post("/api/clients", json={"name": "Theirs", "email": "t@theirs.example.com"})).json()
    item = [{"description": "Work", "quantity": "1", "unitPrice": 1000}]
    my_invoice = (await admin.post("/api/invoices", json={"clientId": mine["id"], "items": item})).json()
    their_invoice = (await admin.post("/api/invoices", json={"clientId": theirs["id"], "items": item})).json()
    await admin.post(f"/api/invoices/{my_invoice['id']}/send")
    email = f"user-{uuid.uuid4().hex[:6]}@mine.example.com"
    user = await admin.post("/api/users", json={"email": email, "password": "s3cret-pass", "role": "client",
                                                "clientId": mine["id"]})
    assert user.status_code == 201, user.text
    me = await login(stack[GATEWAY].url, email, "s3cret-pass")
    try:
        listing = (await me.get("/api/invoices")).json()
        assert [i["id"] for i in listing["items"]] == [my_invoice["id"]]
        assert (await me.get(f"/api/invoices/{their_invoice['id']}")).status_code == 404
        viewed = (await me.get(f"/api/invoices/{my_invoice['id']}")).json()
        assert viewed["status"] == "VIEWED"
        forbidden = await me.post("/api/invoices", json={"clientId": mine["id"], "items": item})
        assert forbidden.status_code == 403
        assert (await me.post("/api/users", json={"email": "x@x.example.com", "password": "abcdefgh",
                                                  "role": "admin"})).status_code == 403
    finally:
        await me.aclose()


async def test_idempotency_key_returns_the_first_response(admin: httpx.AsyncClient) -> None:
    body = {"name": "Once Ltd", "email": "once@once.example.com"}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await admin.post("/api/clients", json=body, headers=key)
    second = await admin.post("/api/clients", json=body, headers=key)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    clients = await every_item(admin, "/api/clients")
    assert sum(1 for c in clients if c["email"] == "once@once.example.com") == 1


async def test_unauthenticated_and_bad_requests(stack: dict[str, ServiceProcess]) -> None:
    async with httpx.AsyncClient(base_url=stack[GATEWAY].url) as anon:
        response = await anon.get("/api/invoices")
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        bad = await anon.post("/api/auth/login", json={"email": "admin@example.com", "password": "wrong"})
        assert bad.status_code == 401
        docs = await anon.get("/openapi.json")
        assert docs.status_code == 200 and "/api/invoices" in docs.json()["paths"]


async def test_correlation_id_flows_from_request_to_event(admin: httpx.AsyncClient,
                                                          kafka_events: TopicWatcher) -> None:
    client = (await admin.post("/api/clients", json={"name": "Trace", "email": "t@trace.example.com"})).json()
    correlation_id = f"trace-{uuid.uuid4().hex}"
    created = await admin.post("/api/invoices", headers={"X-Correlation-Id": correlation_id}, json={
        "clientId": client["id"], "items": [{"description": "Work", "quantity": "1", "unitPrice": 100}]})
    assert created.headers["X-Correlation-Id"] == correlation_id
    [event] = await kafka_events.wait_for(created.json()["id"], "invoice.created")
    assert event.correlationid == correlation_id


async def test_put_and_lists_follow_the_public_convention(admin: httpx.AsyncClient) -> None:
    """Issue 8 through the gateway: a PUT takes the create body (409 on a non-draft whatever the body)
    and lists answer `limit`/`cursor` pages; an old or unknown parameter is a 400 naming it."""
    client, _ = [(await admin.post("/api/clients", json={"name": f"Convention {i}",
                                                        "email": "c@convention.example.com"})).json() for i in range(2)]
    body = {"clientId": client["id"], "items": [{"description": "Work", "quantity": "1", "unitPrice": 1_000}]}
    drafts = [(await admin.post("/api/invoices", json=body)).json() for _ in range(3)]
    replaced = await admin.put(f"/api/invoices/{drafts[0]['id']}", json=body)
    assert replaced.status_code == 200, replaced.text
    await admin.post(f"/api/invoices/{drafts[0]['id']}/send")
    for put in (body, {"items": "not a list"}):
        refused = await admin.put(f"/api/invoices/{drafts[0]['id']}", json=put)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "invoice_not_editable"

    first = (await admin.get("/api/invoices", params={"clientId": client["id"], "limit": 1})).json()
    assert len(first["items"]) == 1 and first["hasMore"] is True and first["total"] == 3
    walked = await every_item(admin, "/api/invoices", clientId=client["id"])
    assert sorted(i["id"] for i in walked) == sorted(d["id"] for d in drafts)
    old = await admin.get("/api/invoices", params={"page": 2})
    assert old.status_code == 400 and "page" in old.json()["error"]["message"]
    bad = await admin.get("/api/invoices", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    clients = (await admin.get("/api/clients", params={"limit": 1})).json()
    assert len(clients["items"]) == 1 and clients["hasMore"] is True and clients["total"] >= 2
