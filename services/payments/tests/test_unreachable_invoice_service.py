"""Found by the chaos run (deploy/chaos.py): while the invoice service was down, a mark-paid for an
invoice sent moments before was refused with a 409 "is a draft" (payments' copy still lagged behind
invoice.sent, and the re-read that should settle the doubt failed). A client takes a 409 as final and
never records the payment. Unable to check, the service must say so: a 503 the client retries."""

from __future__ import annotations

from typing import Any

import httpx

from contracts.invoice import InvoiceEventType
from services.payments.invoice_client import InvoiceServiceUnavailable
from services.payments.tests.conftest import FakeInvoiceReader, publish_invoice, snapshot, wait_for_copy


async def test_no_refusal_from_a_lagging_copy_while_the_invoice_service_is_down(
    api: httpx.AsyncClient, producer: Any, db: Any, invoice_reader: FakeInvoiceReader
) -> None:
    draft = snapshot(status="DRAFT", version=1)
    await publish_invoice(producer, draft, InvoiceEventType.CREATED)
    await wait_for_copy(db, draft.id, 1)
    url = f"/api/invoices/{draft.id}/mark-paid"
    # The invoice was sent (only the invoice service knows yet), and that service is down.
    invoice_reader.invoices[draft.id] = snapshot(invoice_id=draft.id, client_id=draft.client_id, status="SENT",
                                                 version=2)

    async def down(invoice_id: str) -> None:
        raise InvoiceServiceUnavailable("The invoice service cannot be reached; try again.")

    invoice_reader.probe = down
    try:
        refused = await api.post(url, json={"amount": 2_000, "method": "cash"})
    finally:
        invoice_reader.probe = None
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "invoice_service_unavailable"
    # The retry, once the invoice service answers, records it.
    retried = await api.post(url, json={"amount": 2_000, "method": "cash"})
    assert retried.status_code == 201, retried.text
