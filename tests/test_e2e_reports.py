"""Issue 10 end to end, through the gateway with every service running: an invoice sent and partly paid
shows in the reports (which only read the events the invoice and payments services publish), a
client login gets 403, and an export comes through with its filename."""

from __future__ import annotations

import csv
import io
import uuid

import httpx

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY
from tests.conftest import login, wait_until


async def test_a_partly_paid_invoice_shows_in_the_reports(admin: httpx.AsyncClient,
                                                          stack: dict[str, ServiceProcess]) -> None:
    name = f"Reports {uuid.uuid4().hex[:6]}"
    client = (await admin.post("/api/clients", json={"name": name, "email": "ap@reports.example.com",
                                                     "currency": "EUR"})).json()
    invoice = (await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Audit", "quantity": "2", "unitPrice": 30_000}],
    })).json()
    sent = (await admin.post(f"/api/invoices/{invoice['id']}/send")).json()
    paid = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid", json={"amount": 15_000,
                                                                             "method": "bank_transfer"})
    assert paid.status_code in (200, 201, 202), paid.text

    outstanding = await wait_until(
        admin, f"/api/reports/outstanding?clientId={client['id']}",
        lambda body: [(i["invoiceNumber"], i["amountDue"]) for i in body["items"]] == [
            (sent["invoiceNumber"], sent["total"] - 15_000)])
    assert outstanding["items"][0]["clientName"] == name and outstanding["items"][0]["currency"] == "EUR"

    aging = (await admin.get("/api/reports/ar-aging", params={"groupBy": "client"})).json()
    [row] = [r for r in aging["rows"] if r["clientId"] == client["id"]]
    assert (row["current"], row["total"], row["invoices"]) == (sent["total"] - 15_000,) * 2 + (1,)
    reconciliation = await wait_until(admin, "/api/reports/reconciliation",
                                      lambda body: all(m["invoiceId"] != invoice["id"] for m in body["mismatches"]))
    assert reconciliation["invoicesChecked"] >= 1

    export = await admin.get("/api/reports/outstanding", params={"clientId": client["id"], "format": "csv"})
    assert export.status_code == 200 and export.headers["content-disposition"].startswith(
        'attachment; filename="outstanding-')
    rows = list(csv.reader(io.StringIO(export.text, newline="")))
    assert rows[1][0] == sent["invoiceNumber"] and rows[1][8] == f"{(sent['total'] - 15_000) / 100:.2f}"

    email = f"u-{uuid.uuid4().hex[:8]}@reports.example.com"
    created = await admin.post("/api/users", json={"email": email, "password": "reports-pass-1", "role": "client",
                                                   "clientId": client["id"]})
    assert created.status_code == 201, created.text
    me = await login(stack[GATEWAY].url, email, "reports-pass-1")
    try:
        assert (await me.get("/api/reports/summary")).status_code == 403
    finally:
        await me.aclose()
