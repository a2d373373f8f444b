"""The invoice API on real PostgreSQL and Kafka: happy paths, events, scoping and bad input."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from services.invoice.tests.conftest import ADMIN, EventLog, client_headers, line


async def create_invoice(api: httpx.AsyncClient, client_id: str, **fields: Any) -> dict[str, Any]:
    body = {"clientId": client_id, "items": [line()], **fields}
    response = await api.post("/api/invoices", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_edit_send_flow_publishes_events(
    api: httpx.AsyncClient, customer: dict[str, Any], invoice_events: EventLog
) -> None:
    invoice = await create_invoice(
        api, customer["id"], taxRate="20", projectId="proj-42",
        items=[line(quantity="3", unit_price=3333, discountPercent="10"), line("Hosting", "1", 5000, taxRate="0")],
    )
    assert invoice["status"] == "DRAFT" and invoice["invoiceNumber"] is None
    assert invoice["currency"] == "EUR"  # the client's currency
    assert invoice["subtotal"] == 8999 + 5000
    assert invoice["taxAmount"] == 1800  # 20% of 8999 (rounded half up), hosting at 0%
    assert invoice["total"] == invoice["subtotal"] + invoice["taxAmount"] == invoice["amountDue"]
    assert invoice["projectId"] == "proj-42"

    edited = await api.put(f"/api/invoices/{invoice['id']}", json={"discountFixed": 999, "notes": "Thanks!"})
    assert edited.status_code == 200, edited.text
    assert edited.json()["discountAmount"] == 999 and edited.json()["notes"] == "Thanks!"
    assert edited.json()["total"] == edited.json()["subtotal"] - 999 + edited.json()["taxAmount"]

    sent = await api.post(f"/api/invoices/{invoice['id']}/send")
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert body["status"] == "SENT"
    assert body["invoiceNumber"].startswith(f"{body['issueDate'][:4]}-")
    assert body["dueDate"] > body["issueDate"]

    for event_type in ("invoice.created", "invoice.updated", "invoice.sent"):
        [event] = await invoice_events.wait_for(invoice["id"], event_type)
        assert event.source == "invoice" and event.specversion == "1.0"
        assert event.dataschema == "urn:billing:invoice:v1"
    [sent_event] = invoice_events.matching(invoice["id"], "invoice.sent")
    assert sent_event.data["invoiceNumber"] == body["invoiceNumber"]
    assert sent_event.data["amountDue"] == body["amountDue"]
    records = [(key, partition) for e, key, partition in invoice_events.records if e.subject == invoice["id"]]
    assert {key for key, _ in records} == {invoice["id"]}  # keyed by invoice id → one partition, in order
    assert len({partition for _, partition in records}) == 1


async def test_only_drafts_are_editable(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    invoice = await create_invoice(api, customer["id"])
    assert (await api.post(f"/api/invoices/{invoice['id']}/send")).status_code == 200
    response = await api.put(f"/api/invoices/{invoice['id']}", json={"notes": "too late"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "invoice_not_editable"
    again = await api.post(f"/api/invoices/{invoice['id']}/send")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    current = (await api.get(f"/api/invoices/{invoice['id']}")).json()
    assert current["notes"] is None and current["version"] == invoice["version"] + 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "clientId"),
        ({"currency": "EURO"}, "currency"),
        ({"currency": "XQX"}, "currency"),
        ({"items": [{"description": "x", "unitPrice": -5}]}, "items.0.unitPrice"),
        ({"items": [{"description": "x", "unitPrice": 10**16}]}, "items.0.unitPrice"),
        ({"items": [{"description": "x", "unitPrice": 100, "quantity": "0"}]}, "items.0.quantity"),
        ({"items": [{"description": "x", "unitPrice": 100, "quantity": "1e12"}]}, "items.0.quantity"),
        ({"items": [{"description": "", "unitPrice": 100}]}, "items.0.description"),
        ({"items": [{"description": "x", "unitPrice": "12.50"}]}, "items.0.unitPrice"),
        ({"items": [{"description": "x", "unitPrice": 12.5}]}, "items.0.unitPrice"),
        ({"taxRate": "101"}, "taxRate"),
        ({"discountPercent": "-1"}, "discountPercent"),
        ({"unknownField": 1}, "unknownField"),
        ({"issueDate": "2026-02-30"}, "issueDate"),
    ],
)
async def test_bad_invoice_input_is_422_and_creates_nothing(
    api: httpx.AsyncClient, customer: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    before = (await api.get("/api/invoices", params={"clientId": customer["id"]})).json()["total"]
    payload = {"clientId": customer["id"], **body} if field != "clientId" else body
    response = await api.post("/api/invoices", json=payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert any(field in d["field"] for d in error["details"]), error
    after = (await api.get("/api/invoices", params={"clientId": customer["id"]})).json()["total"]
    assert after == before


async def test_domain_refusals(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    unknown = str(uuid.uuid4())
    response = await api.post("/api/invoices", json={"clientId": unknown, "items": [line()]})
    assert response.status_code == 422 and "does not exist" in response.json()["error"]["message"]
    too_much = await api.post(
        "/api/invoices", json={"clientId": customer["id"], "items": [line(unit_price=100, discount=500)]}
    )
    assert too_much.status_code == 422 and too_much.json()["error"]["code"] == "invalid_amounts"
    assert (await api.get(f"/api/invoices/{unknown}")).status_code == 404
    assert (await api.post(f"/api/invoices/{unknown}/send")).status_code == 404
    assert (await api.get("/api/invoices/not-a-uuid")).status_code == 422
    empty = await api.post("/api/invoices", json={"clientId": customer["id"], "items": []})
    assert empty.status_code == 201
    refused = await api.post(f"/api/invoices/{empty.json()['id']}/send")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invoice_empty"
    malformed = await api.post("/api/invoices", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    bad_client = await api.post("/api/clients", json={"name": "X", "email": "not-an-email"})
    assert bad_client.status_code == 422


async def test_cancel_rules(api: httpx.AsyncClient, customer: dict[str, Any], invoice_events: EventLog) -> None:
    invoice = await create_invoice(api, customer["id"])
    cancelled = await api.post(f"/api/invoices/{invoice['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["invoiceNumber"] is None  # a cancelled draft never took a number
    await invoice_events.wait_for(invoice["id"], "invoice.cancelled")
    assert (await api.post(f"/api/invoices/{invoice['id']}/cancel")).status_code == 409
    assert (await api.post(f"/api/invoices/{invoice['id']}/send")).status_code == 409


async def test_client_sees_only_its_own(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    other = await api.post("/api/clients", json={"name": "Other", "email": "o@other.example.com", "currency": "USD"})
    theirs = await create_invoice(api, other.json()["id"])
    mine = await create_invoice(api, customer["id"])
    draft = await create_invoice(api, customer["id"])
    await api.post(f"/api/invoices/{mine['id']}/send")
    me = client_headers(customer["id"])
    assert (await api.get(f"/api/invoices/{draft['id']}", headers=me)).status_code == 404  # drafts stay private
    assert (await api.get(f"/api/invoices/{draft['id']}/pdf", headers=me)).status_code == 404
    assert (await api.get(f"/api/invoices/{theirs['id']}", headers=me)).status_code == 404
    assert (await api.get(f"/api/clients/{other.json()['id']}", headers=me)).status_code == 404
    listing = (await api.get("/api/invoices", headers=me)).json()
    assert {i["clientId"] for i in listing["items"]} == {customer["id"]}
    assert mine["id"] in {i["id"] for i in listing["items"]}
    assert draft["id"] not in {i["id"] for i in listing["items"]}
    assert all(i["invoiceNumber"] for i in listing["items"])
    sneaky = (await api.get("/api/invoices", params={"clientId": other.json()["id"]}, headers=me)).json()
    assert sneaky["items"] == []
    assert (await api.post("/api/invoices", json={"clientId": customer["id"]}, headers=me)).status_code == 403
    assert (await api.post(f"/api/invoices/{mine['id']}/send", headers=me)).status_code == 403


async def test_client_opening_a_sent_invoice_marks_it_viewed_once(
    api: httpx.AsyncClient, customer: dict[str, Any], invoice_events: EventLog
) -> None:
    invoice = await create_invoice(api, customer["id"])
    await api.post(f"/api/invoices/{invoice['id']}/send")
    me = client_headers(customer["id"])
    first = await api.get(f"/api/invoices/{invoice['id']}", headers=me)
    assert first.json()["status"] == "VIEWED"
    await api.get(f"/api/invoices/{invoice['id']}", headers=me)
    await invoice_events.wait_for(invoice["id"], "invoice.viewed")
    await asyncio.sleep(1.0)
    assert len(invoice_events.matching(invoice["id"], "invoice.viewed")) == 1


async def test_list_filters_sort_and_paginate(api: httpx.AsyncClient) -> None:
    created = await api.post(
        "/api/clients", json={"name": "Lister", "email": "l@lister.example.com", "currency": "USD"}
    )
    client_id = created.json()["id"]
    for price in (300, 100, 200):
        await create_invoice(api, client_id, items=[line(unit_price=price, quantity="1")])
    page = (await api.get("/api/invoices", params={"clientId": client_id, "sort": "total", "pageSize": 2})).json()
    assert page["total"] == 3 and [i["total"] for i in page["items"]] == [100, 200]
    second = (await api.get("/api/invoices", params={"clientId": client_id, "sort": "total", "pageSize": 2,
                                                       "page": 2})).json()
    assert [i["total"] for i in second["items"]] == [300]
    drafts = (await api.get("/api/invoices", params={"clientId": client_id, "status": ["SENT"]})).json()
    assert drafts["total"] == 0
    assert (await api.get("/api/invoices", params={"sort": "bogus"})).status_code == 422
    assert (await api.get("/api/invoices", params={"pageSize": 10_000})).status_code == 422


async def test_concurrent_sends_get_gapless_unique_numbers(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    invoices = [await create_invoice(api, customer["id"]) for _ in range(25)]
    responses = await asyncio.gather(*(api.post(f"/api/invoices/{i['id']}/send") for i in invoices))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    numbers = sorted(int(r.json()["invoiceNumber"].split("-")[1]) for r in responses)
    assert len(set(numbers)) == 25
    assert numbers == list(range(numbers[0], numbers[0] + 25))  # no gaps within this burst


async def test_health(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "kafka": "ok"}


async def test_errors_use_the_error_format(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/nope", headers=ADMIN)
    assert response.status_code == 404 and set(response.json()["error"]) == {"code", "message", "details"}


async def test_anonymous_caller_sees_nothing(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    anonymous = {"X-Actor-Role": "anonymous"}
    invoices = await api.get("/api/invoices", headers=anonymous)
    assert invoices.status_code == 200 and invoices.json()["items"] == []
    clients = await api.get("/api/clients", headers=anonymous)
    assert clients.status_code == 200 and clients.json() == []
