"""`POST /api/invoices/preview` on real PostgreSQL and Kafka: the figures create would store, the
refusals create would give, and nothing saved."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from services.invoice.models import IdempotencyKey, Invoice, InvoiceItem, OutboxMessage
from services.invoice.tests.conftest import client_headers, line

PREVIEW = "/api/invoices/preview"

BODIES: list[dict[str, Any]] = [
    {"items": [line()]},
    # the admin form's three lines: 10 % off shared across the lines, tax per line after its share
    {"taxRate": "19", "discountPercent": "10",
     "items": [line("Design", "10", 9500, discount=5000), line("Hosting", "1", 2000),
               line("Support", "2.5", 4000, taxRate="7")]},
    {"taxRate": "20", "discountFixed": 999,
     "items": [line(quantity="3", unit_price=3333, discountPercent="10"), line("Hosting", "1", 5000, taxRate="0")]},
    {"currency": "JPY", "taxRate": "8", "items": [line(quantity="1.5", unit_price=955)]},
    {"items": []},
]


async def preview(api: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return await api.post(PREVIEW, json=body, **kwargs)


async def stored_counts(api: httpx.AsyncClient) -> dict[str, int]:
    db = api.app.state.runtime.db  # type: ignore[attr-defined]
    async with db.transaction() as uow:
        return {model.__tablename__: await uow.session.scalar(select(func.count()).select_from(model))
                for model in (Invoice, InvoiceItem, OutboxMessage, IdempotencyKey)}


async def line_taxes(api: httpx.AsyncClient, invoice_id: str) -> list[int]:
    db = api.app.state.runtime.db  # type: ignore[attr-defined]
    async with db.transaction() as uow:
        rows = await uow.session.scalars(select(InvoiceItem.tax_amount)
                                         .where(InvoiceItem.invoice_id == uuid.UUID(invoice_id))
                                         .order_by(InvoiceItem.position))
        return list(rows)


@pytest.mark.parametrize("fields", BODIES)
async def test_the_preview_is_what_create_then_stores(
    api: httpx.AsyncClient, customer: dict[str, Any], fields: dict[str, Any]
) -> None:
    body = {"clientId": customer["id"], **fields}
    previewed = await preview(api, body)
    assert previewed.status_code == 200, previewed.text
    created = await api.post("/api/invoices", json=body)
    assert created.status_code == 201, created.text
    invoice = created.json()
    expected = {
        "currency": invoice["currency"], "subtotal": invoice["subtotal"],
        "discountAmount": invoice["discountAmount"], "taxAmount": invoice["taxAmount"], "total": invoice["total"],
        "items": [{"amount": item["amount"], "taxAmount": tax}
                  for item, tax in zip(invoice["items"], await line_taxes(api, invoice["id"]), strict=True)],
    }
    assert previewed.json() == expected
    assert previewed.json()["currency"] == fields.get("currency", "EUR")  # the client's unless given


async def test_the_admin_forms_example_adds_up(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    answer = (await preview(api, {"clientId": customer["id"], **BODIES[1]})).json()
    # 900 + 20 + 100 = 1020.00; 10 % off = 102.00 (90/2/10); tax 19 % of 810 and 18, 7 % of 90
    assert (answer["subtotal"], answer["discountAmount"], answer["taxAmount"], answer["total"]) == (
        102_000, 10_200, 16_362, 108_162)
    assert [i["amount"] for i in answer["items"]] == [90_000, 2_000, 10_000]


async def test_without_a_client_the_currency_is_given_or_required(api: httpx.AsyncClient) -> None:
    answer = await preview(api, {"currency": "usd", "items": [line(quantity="1", unit_price=1234)]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"currency": "USD", "subtotal": 1234, "discountAmount": 0, "taxAmount": 0,
                             "total": 1234, "items": [{"amount": 1234, "taxAmount": 0}]}
    for body in ({}, {"items": [line()]}, {"currency": None}):
        refused = await preview(api, body)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "validation_error"
        assert [(d["field"], d["type"]) for d in error["details"]] == [("currency", "missing")], error


async def test_a_given_currency_wins_over_the_clients(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    answer = await preview(api, {"clientId": customer["id"], "currency": "GBP", "items": [line()]})
    assert answer.status_code == 200 and answer.json()["currency"] == "GBP"


@pytest.mark.parametrize(
    "body",
    [
        {"currency": "EURO"},
        {"currency": "XQX"},
        {"items": [{"description": "x", "unitPrice": -5}]},
        {"items": [{"description": "x", "unitPrice": 10**16}]},
        {"items": [{"description": "x", "unitPrice": 100, "quantity": "0"}]},
        {"items": [{"description": "", "unitPrice": 100}]},
        {"items": [{"description": "x", "unitPrice": "12.50"}]},
        {"items": [{"description": "x", "unitPrice": 100, "discount": 5, "discountPercent": "1"}]},
        {"taxRate": "101"},
        {"discountPercent": "-1"},
        {"discountPercent": "5", "discountFixed": 10},
        {"unknownField": 1},
        {"issueDate": "2026-02-30"},
        {"issueDate": "2026-03-01", "dueDate": "2026-02-01"},
        {"clientId": "not-a-uuid"},
        {"clientId": str(uuid.UUID(int=1))},  # no such client
        {"items": [line(unit_price=100, discount=500)]},  # a line discount above the line
        {"discountFixed": 30_000, "items": [line()]},  # an invoice discount above the subtotal
        {"items": [line(quantity="1000000000", unit_price=10**15)]},  # a total beyond the range
    ],
)
async def test_a_bad_body_is_refused_exactly_as_create_refuses_it(
    api: httpx.AsyncClient, customer: dict[str, Any], body: dict[str, Any]
) -> None:
    payload = {"clientId": customer["id"], **body}
    before = await stored_counts(api)
    previewed = await preview(api, payload)
    created = await api.post("/api/invoices", json=payload)
    assert previewed.status_code == created.status_code == 422, (previewed.text, created.text)
    assert previewed.json() == created.json()
    assert await stored_counts(api) == before


async def test_field_refusals_of_the_amounts_name_their_field(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    body = {"clientId": customer["id"], "items": [line(), line(unit_price=100, discount=500)]}
    error = (await preview(api, body)).json()["error"]
    assert error["code"] == "invalid_amounts"
    assert error["details"] == [{"field": "items.1.discount", "message": error["message"]}]
    error = (await preview(api, {**body, "items": [line()], "discountFixed": 30_000})).json()["error"]
    assert error["code"] == "invalid_amounts" and [d["field"] for d in error["details"]] == ["discountFixed"]


async def test_a_preview_saves_nothing_not_even_its_idempotency_key(
    api: httpx.AsyncClient, customer: dict[str, Any]
) -> None:
    before = await stored_counts(api)
    key = {"Idempotency-Key": f"preview-{uuid.uuid4()}"}
    first = await preview(api, {"clientId": customer["id"], "items": [line()]}, headers=key)
    # The same key with another body: a read, so no "key reused" refusal and no replay either.
    second = await preview(api, {"clientId": customer["id"], "items": [line(unit_price=500)]}, headers=key)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["total"] == 20_000 and second.json()["total"] == 1_000
    assert "idempotent-replayed" not in second.headers
    assert await stored_counts(api) == before
    listed = (await api.get("/api/invoices", params={"clientId": customer["id"]})).json()
    assert listed["total"] == 0


async def test_only_an_admin_previews(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    refused = await preview(api, {"clientId": customer["id"], "items": [line()]},
                            headers=client_headers(customer["id"]))
    assert refused.status_code == 403
