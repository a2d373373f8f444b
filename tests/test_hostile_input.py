"""Hostile input through the gateway on the real stack (issue 12, defect 6): a NUL byte, an int past
2^63, a date or an instant out of range is a clear 4xx with the error body, never a 5xx.

The cases were found by going through every request model and query parameter of the merged
OpenAPI document for the ints, dates, date-times and strings that reach a database, plus forged
cursors (their values are bound as query parameters). One parametrised test per service.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from kit.pagination import encode_cursor

BIG = 2**63  # one past BIGINT
NUL = "\u0000"
BEFORE_YEAR_1 = "0001-01-01T00:00:00+14:00"  # 0000-12-31T10:00Z: no such instant in UTC
AFTER_9999 = "9999-12-31T23:59:59-14:00"  # 10000-01-01T13:59:59Z


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str  # may name {invoice}, {draft}, {client}
    params: dict[str, Any] | str | None = None  # a str is sent raw (already percent-encoded)
    json: Any = None
    status: int | None = None  # the exact 4xx when it matters
    field_name: str | None = None  # a field the error's details must name
    headers: dict[str, bytes] | None = None
    marks: tuple[Any, ...] = field(default=())


@dataclass
class Ids:
    client: str
    invoice: str  # sent, with an amount due
    draft: str


@pytest.fixture(scope="module")
async def ids(admin: httpx.AsyncClient) -> Ids:
    client = (await admin.post("/api/clients", json={"name": "Hostile Input", "email": "hostile@example.com",
                                                     "currency": "EUR"})).json()
    body = {"clientId": client["id"], "items": [{"description": "Work", "unitPrice": 10_000}]}
    invoice = (await admin.post("/api/invoices", json=body)).json()
    sent = await admin.post(f"/api/invoices/{invoice['id']}/send")
    assert sent.status_code == 200, sent.text
    draft = (await admin.post("/api/invoices", json=body)).json()
    return Ids(client=client["id"], invoice=invoice["id"], draft=draft["id"])


def forged_cursor(scope: str, *values: Any) -> str:
    """A cursor a client can write: the scope digest is a sha256 of a guessable string."""
    try:
        return encode_cursor(list(values), scope)
    except TypeError:
        raw = json.dumps({"s": hashlib.sha256(scope.encode()).hexdigest()[:12], "v": list(values)}).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


OUT_OF_UTC = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
PAST_9999_IN_UTC = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-14)))
CASES: dict[str, list[Case]] = {
    "gateway": [
        Case("login-email-nul", "POST", "/api/auth/login", json={"email": f"admin{NUL}@example.com", "password": "x"},
             status=422, field_name="email"),
        Case("login-email-trailing-nul", "POST", "/api/auth/login",
             json={"email": f"admin@example.com{NUL}", "password": "x"}, status=422),
        Case("users-limit-2^63", "GET", "/api/users", {"limit": BIG}, status=422),
        Case("users-cursor-nul", "GET", "/api/users", "cursor=%00", status=422),
        Case("users-cursor-instant-before-year-1", "GET", "/api/users",
             {"cursor": forged_cursor("users", OUT_OF_UTC, "a@example.com")}, status=400),
        Case("users-cursor-number-for-a-timestamp", "GET", "/api/users",
             {"cursor": forged_cursor("users", 5, "a@example.com")}, status=400),
        Case("users-cursor-nul-text", "GET", "/api/users",
             {"cursor": forged_cursor("users", datetime(2026, 1, 1, tzinfo=UTC), "a\x00")}, status=400),
        # Found by Schemathesis: a header the proxy cannot encode (latin-1, not ASCII) was a 500.
        Case("non-ascii-header-to-a-service", "GET", "/api/invoices", headers={"X-Note": "café".encode("latin-1")},
             status=400, field_name="x-note"),
        Case("non-ascii-idempotency-key-to-the-webhook", "POST", "/webhooks/stripe", json={"id": "evt_1"},
             headers={"Stripe-Signature": b"", "Idempotency-Key": "\xe9\xe9".encode("latin-1")}, status=400),
        Case("create-user-nul", "POST", "/api/users",
             json={"email": f"x{NUL}@example.com", "password": "long-enough", "role": "admin"}, status=422),
    ],
    "invoice": [
        Case("number-nul", "GET", "/api/invoices", "number=%00", status=422, field_name="number"),
        Case("project-nul", "GET", "/api/invoices", "projectId=a%00b", status=422),
        Case("limit-2^63", "GET", "/api/invoices", {"limit": BIG}, status=422),
        Case("client-path-nul", "GET", "/api/clients/a%00b", status=422),
        Case("clients-cursor-instant-past-9999", "GET", "/api/clients",
             {"cursor": forged_cursor("clients:only=None", PAST_9999_IN_UTC, uuid.uuid4())}, status=400),
        Case("create-issue-date-9999", "POST", "/api/invoices",
             json={"clientId": "{client}", "issueDate": "9999-12-31", "netDays": 30,
                   "items": [{"description": "x", "unitPrice": 1}]}, status=422, field_name="issueDate"),
        Case("create-issue-date-0001", "POST", "/api/invoices",
             json={"clientId": "{client}", "issueDate": "0001-01-01", "items": [{"description": "x", "unitPrice": 1}]},
             status=422, field_name="issueDate"),
        Case("create-due-date-9999", "POST", "/api/invoices",
             json={"clientId": "{client}", "dueDate": "9999-12-31", "items": [{"description": "x", "unitPrice": 1}]},
             status=422, field_name="dueDate"),
        Case("create-unit-price-2^63", "POST", "/api/invoices",
             json={"clientId": "{client}", "items": [{"description": "x", "unitPrice": BIG}]}, status=422),
        Case("create-discount-2^63", "POST", "/api/invoices",
             json={"clientId": "{client}", "discountFixed": BIG, "items": [{"description": "x", "unitPrice": 1}]},
             status=422),
        Case("create-notes-nul", "POST", "/api/invoices",
             json={"clientId": "{client}", "notes": f"a{NUL}", "items": [{"description": "x", "unitPrice": 1}]},
             status=422),
        Case("update-issue-date-9999", "PUT", "/api/invoices/{draft}", json={"issueDate": "9999-12-31"}, status=422),
        Case("preview-issue-date-9999", "POST", "/api/invoices/preview",
             json={"currency": "EUR", "issueDate": "9999-12-31", "items": [{"description": "x", "unitPrice": 1}]},
             status=422),
        Case("mark-overdue-as-of-0001", "POST", "/api/invoices/mark-overdue", json={"asOf": "0001-01-01"},
             status=422, field_name="asOf"),
        Case("mark-overdue-as-of-9999", "POST", "/api/invoices/mark-overdue", json={"asOf": "9999-12-31"},
             status=422),
        Case("template-version-2^63", "PUT", "/api/invoice-template", json={"companyName": "x", "version": BIG},
             status=422),
        Case("logo-version-2^63", "GET", "/api/invoice-template/logo", {"version": BIG}, status=422),
        Case("client-name-nul", "POST", "/api/clients", json={"name": f"a{NUL}", "email": "n@example.com"},
             status=422),
    ],
    "payments": [
        Case("reference-nul", "POST", "/api/invoices/{invoice}/mark-paid",
             json={"amount": 1, "method": "cash", "reference": f"WIRE{NUL}1"}, status=422, field_name="reference"),
        Case("paid-at-before-year-1-in-utc", "POST", "/api/invoices/{invoice}/mark-paid",
             json={"amount": 1, "method": "cash", "paidAt": BEFORE_YEAR_1}, status=422, field_name="paidAt"),
        Case("paid-at-past-9999-in-utc", "POST", "/api/invoices/{invoice}/mark-paid",
             json={"amount": 1, "method": "cash", "paidAt": AFTER_9999}, status=422, field_name="paidAt"),
        Case("paid-at-1969", "POST", "/api/invoices/{invoice}/mark-paid",
             json={"amount": 1, "method": "cash", "paidAt": "1969-12-31T12:00:00Z"}, status=422),
        Case("amount-2^63", "POST", "/api/invoices/{invoice}/mark-paid", json={"amount": BIG, "method": "cash"},
             status=422),
        Case("list-status-nul", "GET", "/api/payments", "status=a%00", status=422),
        Case("list-limit-2^63", "GET", "/api/payments", {"limit": BIG}, status=422),
        Case("checkout-session-path-nul", "GET", "/api/payments/checkout-sessions/cs_a%00b", status=422),
        Case("payment-path-nul", "GET", "/api/payments/a%00b", status=422),
    ],
    "subscriptions": [
        Case("list-client-nul", "GET", "/api/subscriptions", "clientId=%00", status=422),
        Case("list-limit-2^63", "GET", "/api/subscriptions", {"limit": BIG}, status=422),
        Case("plans-cursor-instant-before-year-1", "GET", "/api/plans",
             {"cursor": forged_cursor("plans:active=None", OUT_OF_UTC, uuid.uuid4())}, status=400),
        Case("plan-name-nul", "POST", "/api/plans",
             json={"name": f"a{NUL}", "prices": [{"currency": "EUR", "amount": 100, "interval": "month"}]},
             status=422),
        Case("plan-amount-2^63", "POST", "/api/plans",
             json={"name": "a", "prices": [{"currency": "EUR", "amount": BIG, "interval": "month"}]}, status=422),
        Case("change-preview-quantity-2^63", "GET", f"/api/subscriptions/{uuid.uuid4()}/change-preview",
             {"priceId": str(uuid.uuid4()), "quantity": BIG}, status=422),
        Case("change-proration-past-9999", "POST", f"/api/subscriptions/{uuid.uuid4()}/change",
             json={"priceId": str(uuid.uuid4()), "prorationDate": AFTER_9999}),
        Case("test-clock-past-9999", "POST", "/api/test-clock/advance", json={"to": AFTER_9999}, status=422),
        Case("test-clock-too-far", "POST", "/api/test-clock/advance", json={"to": "2990-01-01T00:00:00Z"},
             status=422),
    ],
    "notifications": [
        Case("list-recipient-nul", "GET", "/api/notifications", "recipient=a%00", status=422),
        Case("list-limit-2^63", "GET", "/api/notifications", {"limit": BIG}, status=422),
        Case("invoice-path-nul", "GET", "/api/notifications/invoices/a%00b", status=422),
        Case("created-from-before-year-1", "GET", "/api/notifications", {"createdFrom": BEFORE_YEAR_1}),
        Case("created-to-past-9999", "GET", "/api/notifications", {"createdTo": AFTER_9999}),
        Case("reminders-as-of-0001", "POST", "/api/reminders/run", json={"asOf": "0001-01-01"}),
        Case("reminders-as-of-9999", "POST", "/api/reminders/run", json={"asOf": "9999-12-31"}),
        Case("reminders-limit-2^63", "GET", "/api/reminders", {"limit": BIG}, status=422),
    ],
    "reporting": [
        Case("summary-as-of-0001", "GET", "/api/reports/summary", {"asOf": "0001-01-01"}, status=422),
        Case("summary-currency-nul", "GET", "/api/reports/summary", "currency=E%00R", status=422),
        Case("revenue-from-0001", "GET", "/api/reports/revenue/monthly", {"from": "0001-01-01"}, status=422),
        Case("outstanding-limit-2^63", "GET", "/api/reports/outstanding", {"limit": BIG}, status=422),
    ],
}


def _params(service: str) -> list[Any]:
    return [pytest.param(case, id=case.id, marks=case.marks) for case in CASES[service]]


def _fill(value: Any, ids: Ids) -> Any:
    if isinstance(value, str):
        return value.format(client=ids.client, invoice=ids.invoice, draft=ids.draft) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


async def check(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    path = _fill(case.path, ids)
    if isinstance(case.params, str):
        path, params = f"{path}?{case.params}", None
    else:
        params = case.params
    response = await admin.request(case.method, path, params=params, json=_fill(case.json, ids),
                                   headers=case.headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if case.status is not None:
        assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["message"]
    if case.field_name is not None:
        assert case.field_name in json.dumps(body["error"]["details"]), body


@pytest.mark.parametrize("case", _params("gateway"))
async def test_gateway(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


@pytest.mark.parametrize("case", _params("invoice"))
async def test_invoice(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


@pytest.mark.parametrize("case", _params("payments"))
async def test_payments(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


@pytest.mark.parametrize("case", _params("subscriptions"))
async def test_subscriptions(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


@pytest.mark.parametrize("case", _params("notifications"))
async def test_notifications(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


@pytest.mark.parametrize("case", _params("reporting"))
async def test_reporting(admin: httpx.AsyncClient, ids: Ids, case: Case) -> None:
    await check(admin, ids, case)


async def test_sent_invoice_with_far_dates_cannot_be_made(admin: httpx.AsyncClient, ids: Ids) -> None:
    """The 500 the far issue date caused came at send (issueDate + net days past 9999): the draft
    with it can no longer be created, and one at the edge of the range sends fine."""
    body = {"clientId": ids.client, "issueDate": "2100-12-31", "netDays": 0,
            "items": [{"description": "x", "unitPrice": 1}]}
    draft = await admin.post("/api/invoices", json=body)
    assert draft.status_code == 201, draft.text
    sent = await admin.post(f"/api/invoices/{draft.json()['id']}/send")
    assert sent.status_code == 200, sent.text
    assert sent.json()["dueDate"] == "2100-12-31"
