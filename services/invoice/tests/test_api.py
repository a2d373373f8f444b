"""The invoice API on real PostgreSQL and Kafka: happy paths, events, scoping and bad input."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from decimal import Decimal
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
    page = (await api.get("/api/invoices", params={"clientId": client_id, "sort": "total", "limit": 2})).json()
    assert page["total"] == 3 and [i["total"] for i in page["items"]] == [100, 200]
    second = (await api.get("/api/invoices", params={"clientId": client_id, "sort": "total", "limit": 2,
                                                       "cursor": page["nextCursor"]})).json()
    assert [i["total"] for i in second["items"]] == [300]
    drafts = (await api.get("/api/invoices", params={"clientId": client_id, "status": ["SENT"]})).json()
    assert drafts["total"] == 0
    assert (await api.get("/api/invoices", params={"sort": "bogus"})).status_code == 422
    assert (await api.get("/api/invoices", params={"limit": 10_000})).status_code == 422


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
    assert clients.status_code == 200 and clients.json()["items"] == []


# -- PUT replaces a draft and accepts the create body ---------------------------------------------


async def test_put_accepts_the_body_that_created_the_draft(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    body = {"clientId": customer["id"], "taxRate": "19", "projectId": "p-1",
            "items": [line(quantity="2", unit_price=50_000)]}
    created = await api.post("/api/invoices", json=body)
    assert created.status_code == 201, created.text
    invoice = created.json()
    same = await api.put(f"/api/invoices/{invoice['id']}", json=body)
    assert same.status_code == 200, same.text  # was 422 "extra inputs are not permitted" (clientId)
    assert same.json()["total"] == invoice["total"] == 119_000 and same.json()["version"] == invoice["version"] + 1
    changed = await api.put(f"/api/invoices/{invoice['id']}",
                            json={**body, "items": [line(quantity="3", unit_price=50_000)]})
    assert changed.status_code == 200 and changed.json()["total"] == 178_500
    assert changed.json()["projectId"] == "p-1" and Decimal(changed.json()["taxRate"]) == 19


async def test_put_may_move_a_draft_to_another_existing_client(
    api: httpx.AsyncClient, customer: dict[str, Any], invoice_events: EventLog
) -> None:
    other = (await api.post("/api/clients", json={"name": "Other Ltd", "email": "o@other.example.com",
                                                  "currency": "USD"})).json()
    invoice = await create_invoice(api, customer["id"], notes="kept")
    assert invoice["currency"] == "EUR"
    moved = await api.put(f"/api/invoices/{invoice['id']}", json={"clientId": other["id"], "items": [line()]})
    assert moved.status_code == 200, moved.text
    assert moved.json()["clientId"] == other["id"] and moved.json()["currency"] == "USD"  # the new client's
    assert moved.json()["notes"] == "kept"  # omitted: kept
    [*_, updated] = await invoice_events.wait_for(invoice["id"], "invoice.updated")
    assert updated.data["clientId"] == other["id"] and updated.data["clientName"] == "Other Ltd"
    explicit = await api.put(f"/api/invoices/{invoice['id']}", json={"clientId": customer["id"], "currency": "GBP"})
    assert explicit.status_code == 200 and explicit.json()["currency"] == "GBP"
    for bad in ({"clientId": str(uuid.uuid4())}, {"clientId": None}, {"clientId": "nope"}):
        refused = await api.put(f"/api/invoices/{invoice['id']}", json=bad)
        assert refused.status_code == 422, (bad, refused.text)
        assert any("clientId" in d.get("field", "") for d in refused.json()["error"]["details"]), refused.json()
    current = (await api.get(f"/api/invoices/{invoice['id']}")).json()
    assert current["clientId"] == customer["id"] and current["currency"] == "GBP"


async def test_put_on_a_non_draft_is_409_whatever_the_body(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    body = {"clientId": customer["id"], "items": [line()]}
    invoice = (await api.post("/api/invoices", json=body)).json()
    sent = (await api.post(f"/api/invoices/{invoice['id']}/send")).json()
    bodies: list[dict[str, Any]] = [
        {"json": body},  # the create body
        {"json": {"items": "not a list", "taxRate": "500"}},  # invalid: still 409, not 422
        {"json": {"unknownField": 1}},
        {"json": {}},
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
    ]
    for kwargs in bodies:
        response = await api.put(f"/api/invoices/{invoice['id']}", **kwargs)
        assert response.status_code == 409, (kwargs, response.text)
        assert response.json()["error"]["code"] == "invoice_not_editable"
    cancelled = await create_invoice(api, customer["id"])
    await api.post(f"/api/invoices/{cancelled['id']}/cancel")
    assert (await api.put(f"/api/invoices/{cancelled['id']}", json={"items": 5})).status_code == 409
    missing = await api.put(f"/api/invoices/{uuid.uuid4()}", json={"items": 5})
    assert missing.status_code == 404
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["version"] == sent["version"]


async def test_put_with_a_bad_body_on_a_draft_is_422_and_changes_nothing(
    api: httpx.AsyncClient, customer: dict[str, Any]
) -> None:
    invoice = await create_invoice(api, customer["id"])
    for content, field in ((b'{"items": [{"description": "x", "unitPrice": -5}]}', "items.0.unitPrice"),
                           (b'{"unknownField": 1}', "unknownField"), (b"{not json", "")):
        response = await api.put(f"/api/invoices/{invoice['id']}", content=content,
                                 headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error" and set(error) == {"code", "message", "details"}
        assert any(field in d["field"] for d in error["details"]), error
    nothing = await api.put(f"/api/invoices/{invoice['id']}", json={})
    assert nothing.status_code == 422 and nothing.json()["error"]["message"] == "Nothing to update."
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["version"] == invoice["version"]


# -- lists: limit + cursor, answered as a Page ----------------------------------------------------


async def walk(api: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a list, page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        page = (await api.get(path, params={**params, **({"cursor": cursor} if cursor else {})})).json()
        items += page["items"]
        assert page["hasMore"] == (page["nextCursor"] is not None)
        cursor = page["nextCursor"]
        if cursor is None:
            return items
    raise AssertionError("the list never ended")


async def test_invoice_list_takes_limit_and_cursor(api: httpx.AsyncClient) -> None:
    client_id = (await api.post("/api/clients", json={"name": "Pager", "email": "p@pager.example.com"})).json()["id"]
    ids = [(await create_invoice(api, client_id, items=[line(unit_price=100 * (i + 1), quantity="1")]))["id"]
           for i in range(5)]
    first = await api.get("/api/invoices", params={"clientId": client_id, "limit": 1})
    assert first.status_code == 200, first.text
    page = first.json()
    assert set(page) == {"items", "nextCursor", "hasMore", "total"}
    assert len(page["items"]) == 1 and page["hasMore"] is True and page["total"] == 5  # was 44 items
    assert page["items"][0]["id"] == ids[-1]  # newest first (-createdAt)
    second = (await api.get("/api/invoices", params={"clientId": client_id, "limit": 1,
                                                      "cursor": page["nextCursor"]})).json()
    assert [i["id"] for i in second["items"]] == [ids[-2]]
    walked = await walk(api, "/api/invoices", clientId=client_id, limit=2)
    assert [i["id"] for i in walked] == ids[::-1]  # every invoice once, in order
    by_total = await walk(api, "/api/invoices", clientId=client_id, limit=2, sort="-total")
    assert [i["total"] for i in by_total] == [500, 400, 300, 200, 100]
    default = (await api.get("/api/invoices")).json()
    assert len(default["items"]) <= 20  # the default limit


async def test_invoice_list_sorts_nullable_columns_nulls_last_across_pages(api: httpx.AsyncClient) -> None:
    client_id = (await api.post("/api/clients", json={"name": "Nulls", "email": "n@nulls.example.com"})).json()["id"]
    drafts = [(await create_invoice(api, client_id))["id"] for _ in range(2)]  # no number, no due date
    sent = []
    for days in (30, 10, 20):
        invoice = await create_invoice(api, client_id, netDays=days)
        sent.append((await api.post(f"/api/invoices/{invoice['id']}/send")).json())
    for sort in ("dueDate", "-dueDate", "invoiceNumber", "-invoiceNumber"):
        walked = await walk(api, "/api/invoices", clientId=client_id, limit=2, sort=sort)
        assert len(walked) == 5 and len({i["id"] for i in walked}) == 5, sort
        assert {i["id"] for i in walked[3:]} == set(drafts), sort  # NULLs last, both directions
        field = sort.lstrip("-")
        values = [i[field] for i in walked[:3]]
        assert values == sorted(values, reverse=sort.startswith("-")), (sort, values)
    numbers = [i["invoiceNumber"] for i in await walk(api, "/api/invoices", clientId=client_id, sort="invoiceNumber")]
    assert numbers[:3] == [s["invoiceNumber"] for s in sent]
    for sort in ("status", "-status", "issueDate", "createdAt"):
        walked = await walk(api, "/api/invoices", clientId=client_id, limit=1, sort=sort)
        assert len({i["id"] for i in walked}) == len(walked) == 5, sort
    statuses = [i["status"] for i in await walk(api, "/api/invoices", clientId=client_id, limit=2, sort="-status")]
    assert statuses == ["SENT"] * 3 + ["DRAFT"] * 2


async def test_list_parameters_of_the_old_convention_and_bad_cursors_are_400(
    api: httpx.AsyncClient, customer: dict[str, Any]
) -> None:
    for path in ("/api/invoices", "/api/clients", f"/api/invoices/{uuid.uuid4()}/payments"):
        for name in ("page", "pageSize", "offset"):
            response = await api.get(path, params={name: "2"})
            assert response.status_code == 400, (path, name, response.text)
            error = response.json()["error"]
            assert error["code"] == "unknown_query_parameter" and name in error["message"]
    for cursor in ("not-a-cursor", "eyJzIjoxfQ", "A" * 40):
        response = await api.get("/api/invoices", params={"cursor": cursor})
        assert response.status_code == 400, (cursor, response.text)
        assert response.json()["error"]["code"] == "invalid_cursor"
    assert (await api.get("/api/invoices", params={"cursor": "bad cursor!"})).status_code == 422  # not base64url
    for _ in range(2):
        await create_invoice(api, customer["id"])
    page = (await api.get("/api/invoices", params={"clientId": customer["id"], "limit": 1})).json()
    # a cursor belongs to its list, sort and filters
    for other in ({"clientId": customer["id"], "sort": "total"}, {"clientId": customer["id"], "status": "SENT"}, {}):
        response = await api.get("/api/invoices", params={**other, "cursor": page["nextCursor"]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor", other
    clients = await api.get("/api/clients", params={"cursor": page["nextCursor"]})
    assert clients.status_code == 400 and clients.json()["error"]["code"] == "invalid_cursor"
    assert (await api.get("/api/invoices", params={"limit": 0})).status_code == 422
    assert (await api.get("/api/invoices", params={"limit": 101})).status_code == 422


async def test_client_list_takes_limit_and_cursor(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    made = [(await api.post("/api/clients", json={"name": f"C{i}", "email": f"c{i}@c.example.com"})).json()["id"]
            for i in range(3)]
    page = (await api.get("/api/clients", params={"limit": 1})).json()
    assert set(page) == {"items", "nextCursor", "hasMore", "total"}
    assert [c["id"] for c in page["items"]] == [made[-1]] and page["hasMore"] and page["total"] >= 4
    walked = [c["id"] for c in await walk(api, "/api/clients", limit=100)]
    assert len(walked) == len(set(walked)) == page["total"]
    assert walked[:3] == made[::-1] and customer["id"] in walked
    mine = (await api.get("/api/clients", headers=client_headers(customer["id"]))).json()
    assert [c["id"] for c in mine["items"]] == [customer["id"]] and mine["total"] == 1


async def test_payment_ledger_is_a_page(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    invoice = await create_invoice(api, customer["id"])
    ledger = (await api.get(f"/api/invoices/{invoice['id']}/payments", params={"limit": 5})).json()
    assert ledger == {"items": [], "nextCursor": None, "hasMore": False, "total": 0}
    assert (await api.get(f"/api/invoices/{uuid.uuid4()}/payments")).status_code == 404


# -- overdue: the invoice service decides, as of a date ------------------------------------------


async def test_mark_overdue_as_of_a_date_returns_what_it_marked(
    api: httpx.AsyncClient, customer: dict[str, Any], invoice_events: EventLog
) -> None:
    due = date.today() - timedelta(days=20)
    invoice = await create_invoice(api, customer["id"], issueDate=(due - timedelta(days=10)).isoformat(),
                                   dueDate=due.isoformat())
    await api.post(f"/api/invoices/{invoice['id']}/send")
    on_due_date = await api.post("/api/invoices/mark-overdue", json={"asOf": due.isoformat()})
    assert on_due_date.status_code == 200, on_due_date.text
    assert invoice["id"] not in on_due_date.json()["invoiceIds"]  # not past due yet on its due date
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "SENT"
    day_after = (due + timedelta(days=1)).isoformat()
    marked = await api.post("/api/invoices/mark-overdue", json={"asOf": day_after})
    assert marked.status_code == 200, marked.text
    body = marked.json()
    assert set(body) == {"asOf", "markedOverdue", "invoiceIds"}
    assert body["asOf"] == day_after and invoice["id"] in body["invoiceIds"]
    assert body["markedOverdue"] == len(body["invoiceIds"])
    # what it reports is already so: OVERDUE, one event
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "OVERDUE"
    [event] = await invoice_events.wait_for(invoice["id"], "invoice.overdue")
    assert event.data["reason"] == "past_due"
    again = (await api.post("/api/invoices/mark-overdue", json={"asOf": day_after})).json()
    assert invoice["id"] not in again["invoiceIds"]
    today = (await api.post("/api/invoices/mark-overdue")).json()
    assert today["asOf"] == date.today().isoformat()
    bad = await api.post("/api/invoices/mark-overdue", json={"asOf": "2026-02-30"})
    assert bad.status_code == 422


async def test_idempotency_key_is_recorded_with_the_effect(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    """The service itself dedupes a POST by its Idempotency-Key (the gateway may have timed out and
    let the retry through): one invoice, one send, one number."""
    key = {"Idempotency-Key": f"create-{uuid.uuid4()}", "X-Actor-User-Id": "admin-1"}
    body = {"clientId": customer["id"], "items": [line()]}
    first = await api.post("/api/invoices", json=body, headers=key)
    again = await api.post("/api/invoices", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    send_key = {"Idempotency-Key": f"send-{uuid.uuid4()}", "X-Actor-User-Id": "admin-1"}
    sent = [await api.post(f"/api/invoices/{first.json()['id']}/send", headers=send_key) for _ in range(2)]
    assert [s.status_code for s in sent] == [200, 200]
    assert sent[0].json()["invoiceNumber"] == sent[1].json()["invoiceNumber"]
    other = await api.post("/api/invoices", json={**body, "notes": "other"}, headers=key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
