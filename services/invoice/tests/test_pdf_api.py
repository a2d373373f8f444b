"""GET /api/invoices/{id}/pdf on the real app: content, file name, access, caching and re-rendering."""

from __future__ import annotations

import io
import re
import uuid
from datetime import date
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from pypdf import PdfReader

from contracts import topics
from services.invoice import documents
from services.invoice.pdf import format_money
from services.invoice.pdf.money import format_date
from services.invoice.tests.conftest import client_headers, line, publish
from services.invoice.tests.helpers_pdf import pdf_text, pdf_uris, put_template
from services.invoice.tests.test_payments_consumed import payment_event, wait_status

PORTAL = "http://127.0.0.1:8000/portal"  # InvoiceSettings.portal_url default


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts real renders of invoice PDFs (the cache is proven by this staying put)."""
    calls: list[str] = []
    real = documents.render_invoice_pdf

    def counting(doc: Any, template: Any) -> bytes:
        calls.append(str(doc.id))
        return real(doc, template)

    monkeypatch.setattr(documents, "render_invoice_pdf", counting)
    return calls


async def new_invoice(api: httpx.AsyncClient, client_id: str, **fields: Any) -> dict[str, Any]:
    body = {"clientId": client_id, "items": [line("Design work", "2", 12_345)], **fields}
    response = await api.post("/api/invoices", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def send(api: httpx.AsyncClient, invoice_id: str) -> dict[str, Any]:
    response = await api.post(f"/api/invoices/{invoice_id}/send")
    assert response.status_code == 200, response.text
    return response.json()


async def get_pdf(api: httpx.AsyncClient, invoice_id: str, **kwargs: Any) -> httpx.Response:
    return await api.get(f"/api/invoices/{invoice_id}/pdf", **kwargs)


def assert_pdf(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    pdf = response.content
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert len(PdfReader(io.BytesIO(pdf)).pages) >= 1
    return pdf


async def test_draft_then_sent_pdf(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    await put_template(api, companyName="Acme Digital Studio", defaultNotes="Template notes apply",
                       defaultTerms="Payable within the stated terms.")
    draft = await new_invoice(api, customer["id"], taxRate="19")
    response = await get_pdf(api, draft["id"])
    text = pdf_text(assert_pdf(response))
    short = draft["id"].replace("-", "")[:8]
    assert response.headers["content-disposition"] == f'attachment; filename="invoice-draft-{short}.pdf"'
    assert "DRAFT" in text and "Acme Digital Studio" in text and customer["name"] in text
    assert "Template notes apply" in text and "Payable within the stated terms." in text
    assert pdf_uris(response.content) == []  # nothing to pay on a draft

    sent = await send(api, draft["id"])
    number = sent["invoiceNumber"]
    assert re.fullmatch(r"\d{4}-\d{4,}", number)
    response = await get_pdf(api, draft["id"])
    text = pdf_text(assert_pdf(response))
    assert response.headers["content-disposition"] == f'attachment; filename="invoice-{number}.pdf"'
    assert number in text
    total = format_money(sent["total"], "EUR", "en_US").replace("\xa0", " ")
    assert sent["total"] == 24_690 + 4_691 and total in text  # €293.81
    assert format_date(date.fromisoformat(sent["dueDate"]), "en_US") in text
    assert format_date(date.fromisoformat(sent["issueDate"]), "en_US") in text
    assert f"{PORTAL}/invoices/{draft['id']}" in pdf_uris(response.content)


async def test_unchanged_invoice_is_served_from_cache_with_etag(
    api: httpx.AsyncClient, customer: dict[str, Any], renders: list[str]
) -> None:
    invoice = await new_invoice(api, customer["id"])
    await send(api, invoice["id"])
    first = await get_pdf(api, invoice["id"])
    assert_pdf(first)
    assert first.headers["x-pdf-cache"] == "miss" and renders == [invoice["id"]]
    etag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{64}"', etag)

    second = await get_pdf(api, invoice["id"])
    assert second.headers["x-pdf-cache"] == "hit" and second.content == first.content
    assert second.headers["etag"] == etag and renders == [invoice["id"]]  # not rendered again

    not_modified = await get_pdf(api, invoice["id"], headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    weak = await get_pdf(api, invoice["id"], headers={"If-None-Match": f'"other", W/{etag}'})
    assert weak.status_code == 304
    assert (await get_pdf(api, invoice["id"], headers={"If-None-Match": '"stale"'})).status_code == 200
    assert renders == [invoice["id"]]


async def test_a_payment_that_makes_it_paid_gives_a_fresh_pdf(
    api: httpx.AsyncClient, customer: dict[str, Any], producer: AIOKafkaProducer, renders: list[str]
) -> None:
    invoice = await send(api, (await new_invoice(api, customer["id"]))["id"])
    before = await get_pdf(api, invoice["id"])
    assert "PAID" not in pdf_text(assert_pdf(before))
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"]), invoice["id"])
    await wait_status(api, invoice["id"], "PAID")
    after = await get_pdf(api, invoice["id"])
    text = pdf_text(assert_pdf(after))
    assert after.headers["etag"] != before.headers["etag"] and after.headers["x-pdf-cache"] == "miss"
    assert "PAID" in text and len(renders) == 2
    assert pdf_uris(after.content) == []  # nothing left to pay: no pay link
    # the old ETag no longer matches
    assert (await get_pdf(api, invoice["id"], headers={"If-None-Match": before.headers["etag"]})).status_code == 200


async def test_sent_invoice_keeps_its_template_while_drafts_follow(
    api: httpx.AsyncClient, customer: dict[str, Any]
) -> None:
    old_name, new_name = f"Old Look {uuid.uuid4().hex[:6]}", f"New Look {uuid.uuid4().hex[:6]}"
    await put_template(api, companyName=old_name, defaultNotes="Old default notes")
    sent = await send(api, (await new_invoice(api, customer["id"]))["id"])
    old_text = pdf_text(assert_pdf(await get_pdf(api, sent["id"])))
    assert old_name in old_text

    await put_template(api, companyName=new_name, defaultNotes="New default notes", brandColor="#AA3377")
    draft = await new_invoice(api, customer["id"])
    sent_text = pdf_text(assert_pdf(await get_pdf(api, sent["id"])))
    draft_text = pdf_text(assert_pdf(await get_pdf(api, draft["id"])))
    assert old_name in sent_text and new_name not in sent_text and "Old default notes" in sent_text
    assert new_name in draft_text and old_name not in draft_text and "New default notes" in draft_text
    # the draft keeps following the template until it is sent, then it is pinned
    await send(api, draft["id"])
    await put_template(api, companyName="Newest Look")
    assert new_name in pdf_text(assert_pdf(await get_pdf(api, draft["id"])))


async def test_access_admin_system_owner_only(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    invoice = await send(api, (await new_invoice(api, customer["id"]))["id"])
    other = await api.post("/api/clients", json={"name": "Other Co", "email": "o@other.example.com"})
    stranger = client_headers(other.json()["id"])
    response = await get_pdf(api, invoice["id"], headers=stranger)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    anonymous = await get_pdf(api, invoice["id"], headers={"X-Actor-Role": "anonymous"})
    assert anonymous.status_code == 404
    owner = await get_pdf(api, invoice["id"], headers=client_headers(customer["id"]))
    assert_pdf(owner)
    # a service call (no actor headers), e.g. notifications attaching the PDF to the email
    async with httpx.AsyncClient(transport=api._transport, base_url="http://invoice") as bare:
        assert_pdf(await bare.get(f"/api/invoices/{invoice['id']}/pdf"))
    # downloading is not viewing: only opening the invoice in the portal marks it VIEWED
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "SENT"
    missing = await get_pdf(api, str(uuid.uuid4()))
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"code", "message", "details"}
    assert (await get_pdf(api, "not-a-uuid")).status_code == 422


async def test_absurdly_long_names_and_descriptions_still_lay_out(
    api: httpx.AsyncClient, customer: dict[str, Any]
) -> None:
    name = ("Überlange Firmenbezeichnung GmbH & Co. KG " * 10)[:300]
    client = await api.post("/api/clients", json={"name": name, "email": "long@long.example.com",
                                                  "address": "Street 1\n" * 200})
    assert client.status_code == 201, client.text
    words = " ".join(f"word{i}" for i in range(2000))
    description = words[: 10_000 - len(" THE-END")] + " THE-END"
    assert len(description) == 10_000
    invoice = await new_invoice(api, client.json()["id"], notes="N" * 10_000,
                                items=[line(description, "1", 100), line("<b>not markup</b> & 'quotes'", "3", 7)])
    draft = assert_pdf(await get_pdf(api, invoice["id"]))
    sent = await send(api, invoice["id"])
    pdf = assert_pdf(await get_pdf(api, sent["id"]))
    assert pdf != draft
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) >= 2
    text = pdf_text(pdf)
    assert sent["invoiceNumber"] in text and "THE-END" in text and "<b>not markup</b>" in text
    assert "Überlange Firmenbezeichnung" in text


async def test_description_over_the_limit_is_422(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    response = await api.post("/api/invoices", json={"clientId": customer["id"],
                                                     "items": [line("x" * 10_001, "1", 100)]})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "items.0.description"


async def test_cache_keeps_one_row_per_invoice(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    from sqlalchemy import func, select

    from services.invoice.models import InvoicePdf

    invoice = await new_invoice(api, customer["id"])
    assert_pdf(await get_pdf(api, invoice["id"]))
    await api.put(f"/api/invoices/{invoice['id']}", json={"notes": "changed"})
    assert_pdf(await get_pdf(api, invoice["id"]))
    await send(api, invoice["id"])
    latest = await get_pdf(api, invoice["id"])
    db = api.app.state.runtime.db  # type: ignore[attr-defined]
    async with db.unit_of_work() as uow:
        rows = await uow.session.scalar(
            select(func.count()).select_from(InvoicePdf).where(InvoicePdf.invoice_id == uuid.UUID(invoice["id"]))
        )
        fingerprint = await uow.session.scalar(
            select(InvoicePdf.fingerprint).where(InvoicePdf.invoice_id == uuid.UUID(invoice["id"]))
        )
    assert rows == 1 and f'"{fingerprint}"' == latest.headers["etag"]


async def test_nul_characters_are_422_not_500(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    # PostgreSQL text cannot store U+0000: refused up front wherever text reaches the database
    client = await api.post("/api/clients", json={"name": "Nul\u0000Co", "email": "n@nul.example.com"})
    assert client.status_code == 422 and client.json()["error"]["details"][0]["field"] == "name"
    invoice = await api.post("/api/invoices", json={"clientId": customer["id"], "notes": "a\u0000b",
                                                    "items": [line("x\u0000", "1", 100)]})
    assert invoice.status_code == 422
    assert {d["field"] for d in invoice.json()["error"]["details"]} == {"notes", "items.0.description"}
    for params in ({"number": "\u0000"}, {"projectId": "p\u0000"}):
        response = await api.get("/api/invoices", params=params)
        assert response.status_code == 422, response.text
    assert (await api.get("/api/invoices", params={"number": "2026"})).status_code == 200
