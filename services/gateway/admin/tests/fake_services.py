"""A small in-memory stand-in for the services behind the admin pages, for the fast page tests.

It answers the same paths and shapes as the real services (camelCase, minor units, cursor pages)
for what the pages read and write, and records every request with its actor headers. The browser
tests (tests/test_admin_browser.py) run the real services instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class FakeServices:
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    payments: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    reporting_up: bool = True
    subscriptions_up: bool = True
    preview_up: bool = True
    template_version: int = 0
    url: str = ""

    def add_client(self, name: str, currency: str = "EUR") -> dict[str, Any]:
        cid = str(uuid.uuid4())
        self.clients[cid] = {"id": cid, "name": name, "email": "ap@client.example.com", "address": None,
                             "currency": currency, "taxId": None, "createdAt": _now()}
        return self.clients[cid]

    def totals(self, body: dict[str, Any]) -> dict[str, Any]:
        """The preview's answer for a create body: the same shape as the invoice service's, figures
        by a plain rule of the fake's own (line = quantity × price − discount, the invoice discount
        off the subtotal, tax on each line's amount less its share of that discount)."""
        currency = body.get("currency") or self.clients[body["clientId"]]["currency"]
        items = body.get("items", [])
        amounts = [_round(Decimal(i.get("quantity", "1")) * i["unitPrice"]) - i.get("discount", 0) for i in items]
        subtotal = sum(amounts)
        pct = body.get("discountPercent")
        discount = _round(subtotal * Decimal(pct) / 100) if pct is not None else body.get("discountFixed") or 0
        taxes = []
        for item, amount in zip(items, amounts, strict=True):
            rate = item.get("taxRate") if item.get("taxRate") is not None else body.get("taxRate")
            net = amount - (Decimal(discount * amount) / subtotal if subtotal else 0)
            taxes.append(_round(net * Decimal(rate) / 100) if rate is not None else 0)
        return {"currency": currency, "subtotal": subtotal, "discountAmount": discount, "taxAmount": sum(taxes),
                "total": subtotal - discount + sum(taxes),
                "items": [{"amount": a, "taxAmount": t} for a, t in zip(amounts, taxes, strict=True)]}

    def refusal(self, body: dict[str, Any]) -> JSONResponse | None:
        """The invoice service's 422s that the admin pages must place next to a field."""
        if body.get("clientId") is not None and body["clientId"] not in self.clients:
            return _error(422, "validation_error", "Client does not exist.", [{"field": "clientId"}])
        for n, item in enumerate(body.get("items", [])):
            if item.get("discount", 0) > _round(Decimal(item.get("quantity", "1")) * item["unitPrice"]):
                message = "A line discount cannot exceed the line amount."
                return _error(422, "invalid_amounts", message, [{"field": f"items.{n}.discount", "message": message}])
        return None

    def build_invoice(self, body: dict[str, Any], invoice_id: str | None = None) -> dict[str, Any]:
        client = self.clients[body["clientId"]]
        items = body.get("items", [])
        totals = self.totals(body)
        iid = invoice_id or str(uuid.uuid4())
        return {
            "id": iid, "invoiceNumber": None, "status": "DRAFT", "currency": client["currency"],
            "subtotal": totals["subtotal"], "discountAmount": totals["discountAmount"],
            "discountPercent": body.get("discountPercent"), "discountFixed": body.get("discountFixed") or 0,
            "taxRate": body.get("taxRate"), "taxAmount": totals["taxAmount"], "total": totals["total"],
            "amountPaid": 0, "amountDue": totals["total"], "issueDate": None, "dueDate": body.get("dueDate"),
            "paidAt": None, "clientId": client["id"], "projectId": body.get("projectId"),
            "items": [{"id": str(uuid.uuid4()), "description": i["description"], "quantity": i.get("quantity", "1"),
                       "unitPrice": i["unitPrice"], "discount": i.get("discount", 0), "discountPercent": None,
                       "taxRate": i.get("taxRate"), "amount": r["amount"]}
                      for i, r in zip(items, totals["items"], strict=True)],
            "notes": body.get("notes"), "stripeInvoiceId": None, "stripeCheckoutSessionId": None, "version": 1,
            "createdAt": _now(), "updatedAt": _now(),
        }


def _round(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _page(items: list[Any]) -> dict[str, Any]:
    return {"items": items, "nextCursor": None, "hasMore": False, "total": len(items)}


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details}}, status_code=status)


def build_fake_services(state: FakeServices) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Response:
        body = await request.body()
        state.requests.append((request.method, request.url.path, dict(request.headers), body))
        if request.url.path.startswith("/api/reports") and not state.reporting_up:
            return _error(503, "service_unavailable", "down")
        if request.url.path.startswith(("/api/plans", "/api/subscriptions")) and not state.subscriptions_up:
            return _error(503, "service_unavailable", "down")
        return await call_next(request)  # type: ignore[no-any-return]

    @app.get("/api/clients")
    async def clients() -> Any:
        return _page(list(reversed(state.clients.values())))

    @app.post("/api/clients", status_code=201)
    async def create_client(request: Request) -> Any:
        body = await request.json()
        client = state.add_client(body["name"], body.get("currency", "USD"))
        client.update(email=body["email"], address=body.get("address"))
        return client

    @app.get("/api/clients/{client_id}")
    async def get_client(client_id: str) -> Any:
        return state.clients.get(client_id) or _error(404, "not_found", "No such client.")

    @app.get("/api/invoices")
    async def invoices(request: Request) -> Any:
        items = list(reversed(state.invoices.values()))
        client_id = request.query_params.get("clientId")
        if client_id:
            items = [i for i in items if i["clientId"] == client_id]
        return _page(items)

    @app.post("/api/invoices/preview")
    async def preview_invoice(request: Request) -> Any:
        if not state.preview_up:
            return _error(503, "service_unavailable", "down")
        body = await request.json()
        return state.refusal(body) or state.totals(body)

    @app.post("/api/invoices", status_code=201)
    async def create_invoice(request: Request) -> Any:
        body = await request.json()
        refused = state.refusal(body)
        if refused is not None:
            return refused
        invoice = state.build_invoice(body)
        state.invoices[invoice["id"]] = invoice
        return invoice

    @app.get("/api/invoices/{invoice_id}")
    async def get_invoice(invoice_id: str) -> Any:
        return state.invoices.get(invoice_id) or _error(404, "not_found", "No such invoice.")

    @app.put("/api/invoices/{invoice_id}")
    async def put_invoice(invoice_id: str, request: Request) -> Any:
        if state.invoices[invoice_id]["status"] != "DRAFT":
            return _error(409, "invoice_not_editable", "Only drafts.")
        invoice = state.build_invoice(await request.json(), invoice_id)
        state.invoices[invoice_id] = invoice
        return invoice

    @app.post("/api/invoices/{invoice_id}/send")
    async def send(invoice_id: str) -> Any:
        invoice = state.invoices[invoice_id]
        invoice.update(status="SENT", invoiceNumber=f"{date.today().year}-{len(state.invoices):04d}",
                       issueDate=date.today().isoformat())
        return invoice

    @app.post("/api/invoices/{invoice_id}/mark-paid", status_code=201)
    async def mark_paid(invoice_id: str, request: Request) -> Any:
        invoice = state.invoices[invoice_id]
        body = await request.json()
        if body["amount"] > invoice["amountDue"]:
            return _error(422, "overpayment", "Overpayment refused.",
                          {"amountDue": invoice["amountDue"], "requested": body["amount"],
                           "currency": invoice["currency"], "pending": 0})
        payment = {"id": str(uuid.uuid4()), "invoiceId": invoice_id, "clientId": invoice["clientId"],
                   "amount": body["amount"], "currency": invoice["currency"], "method": body["method"],
                   "source": "manual", "status": "succeeded", "amountRefunded": 0,
                   "paidAt": body.get("paidAt") or _now(), "reference": body.get("reference"), "applied": True,
                   "held": False, "createdAt": _now()}
        state.payments.append(payment)
        invoice["amountPaid"] += body["amount"]
        invoice["amountDue"] -= body["amount"]
        invoice["status"] = "PAID" if invoice["amountDue"] == 0 else "PARTIAL"
        return payment

    @app.get("/api/invoices/{invoice_id}/pdf")
    async def pdf(invoice_id: str) -> Any:
        return Response(b"%PDF-1.4 fake", media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="invoice-{invoice_id}.pdf"'})

    @app.get("/api/payments")
    async def payments(request: Request) -> Any:
        invoice_id = request.query_params.get("invoiceId")
        return _page([p for p in state.payments if not invoice_id or p["invoiceId"] == invoice_id])

    @app.get("/api/notifications")
    async def notifications() -> Any:
        return _page([{"id": str(uuid.uuid4()), "kind": "invoice_sent", "status": "failed", "invoiceId": None,
                       "recipient": "<b>x</b>@example.com", "subject": "<script>alert(1)</script>",
                       "attempts": 5, "lastError": "550 nope", "createdAt": _now()}])

    @app.post("/api/notifications/{notification_id}/retry")
    async def retry(notification_id: str) -> Any:
        return {"id": notification_id, "kind": "invoice_sent", "status": "pending", "createdAt": _now()}

    @app.get("/api/notifications/invoices/{invoice_id}")
    async def invoice_notifications(invoice_id: str) -> Any:
        return _page([])

    @app.post("/api/reminders/run")
    async def run_reminders(request: Request) -> Any:
        body = await request.json() if await request.body() else {}
        return {"asOf": body.get("asOf") or date.today().isoformat(), "created": 0, "reminders": []}

    @app.get("/api/invoice-template")
    async def template() -> Any:
        return {"version": state.template_version, "companyName": "Agency <b>Co</b>", "locale": "en_US"}

    @app.put("/api/invoice-template")
    async def put_template(request: Request) -> Any:
        state.template_version += 1
        body = await request.json()
        return {"version": state.template_version, "companyName": body["companyName"], "locale": body["locale"]}

    @app.post("/api/invoice-template/preview")
    async def preview(request: Request) -> Any:
        body = await request.json()
        return Response(b"%PDF-1.4 " + body["companyName"].encode(), media_type="application/pdf")

    @app.get("/api/reports/summary")
    async def summary() -> Any:
        return {"asOf": date.today().isoformat(), "currencies": [
            {"currency": "EUR", "collectedThisMonth": 12345, "outstanding": 50000, "overdue": 1000, "mrr": 9900,
             "openInvoices": 2, "overdueInvoices": 1}]}

    @app.get("/api/reports/revenue/monthly")
    async def revenue() -> Any:
        return {"currencies": ["EUR"], "months": [{"month": "2026-01", "amounts": [
            {"currency": "EUR", "amount": 12345, "count": 1}]}], "totals": []}

    @app.get("/api/reports/ar-aging")
    async def aging() -> Any:
        return {"asOf": date.today().isoformat(), "rows": [], "totals": [
            {"currency": "EUR", "current": 49000, "days1To30": 1000, "days31To60": 0, "days61To90": 0, "over90": 0,
             "total": 50000, "invoices": 2}]}

    @app.get("/api/reports/payment-methods")
    async def methods() -> Any:
        return {"rows": [{"currency": "EUR", "method": "bank_transfer", "count": 1, "amount": 12345}]}

    @app.get("/api/reports/outstanding")
    async def outstanding() -> Any:
        return _page([])

    @app.get("/api/reports/mrr")
    async def mrr() -> Any:
        return {"currencies": ["EUR"], "months": []}

    @app.get("/api/plans")
    async def plans() -> Any:
        return _page([])

    @app.get("/api/subscriptions")
    async def subscriptions() -> Any:
        return _page([])

    return app
