"""The invoice template API: versions, validation, the logo upload and the live preview."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from PIL import Image

from services.invoice.app import create_app
from services.invoice.config import InvoiceSettings
from services.invoice.models import Base
from services.invoice.pdf.logo import MAX_LOGO_BYTES
from services.invoice.tests.conftest import ADMIN, client_headers, line
from services.invoice.tests.helpers_pdf import SVG_LOGO, image_bytes, pdf_text, put_template

TEMPLATE = "/api/invoice-template"
LOGO = f"{TEMPLATE}/logo"


@pytest.fixture(scope="module")
async def fresh_api(database_url_factory: Callable[[str], str]) -> AsyncIterator[httpx.AsyncClient]:
    """The invoice app on a database of its own (nothing saved yet), without Kafka."""
    settings = InvoiceSettings(database_url=database_url_factory("invoice_tpl"), kafka_enabled=False,
                               overdue_scan_interval=3600, default_net_days=21)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://invoice", headers=ADMIN) as client:
            yield client


async def current(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get(TEMPLATE)
    assert response.status_code == 200, response.text
    return response.json()


async def test_defaults_before_anything_is_saved(fresh_api: httpx.AsyncClient) -> None:
    body = await current(fresh_api)
    assert body["version"] == 0 and body["logo"] is None and body["createdAt"] is None
    assert body["companyName"] == "Your Company"
    assert body["brandColor"] == "#1F3A5F" and body["defaultNetDays"] == 30 and body["locale"] == "en_US"
    assert (await fresh_api.get(LOGO)).status_code == 404
    # sent before any save: the service's default net days, and the built-in look for good
    client = await fresh_api.post("/api/clients", json={"name": "Fresh Client", "email": "f@fresh.example.com"})
    created = await fresh_api.post("/api/invoices", json={"clientId": client.json()["id"], "items": [line()]})
    early = (await fresh_api.post(f"/api/invoices/{created.json()['id']}/send")).json()
    assert early["dueDate"] == (date.fromisoformat(early["issueDate"]) + timedelta(days=21)).isoformat()
    # the first save is version 1
    saved = await put_template(fresh_api, companyName="First Saved Co")
    assert saved["version"] == 1 and saved["createdBy"] == "admin-1"
    old = pdf_text((await fresh_api.get(f"/api/invoices/{early['id']}/pdf")).content)
    assert "Your Company" in old and "First Saved Co" not in old
    draft = await fresh_api.post("/api/invoices", json={"clientId": client.json()["id"], "items": [line()]})
    new = pdf_text((await fresh_api.get(f"/api/invoices/{draft.json()['id']}/pdf")).content)
    assert "First Saved Co" in new


async def test_migrations_match_the_models(fresh_api: httpx.AsyncClient) -> None:
    db = fresh_api._transport.app.state.runtime.db  # type: ignore[attr-defined]

    def diff(connection: Any) -> list[Any]:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_every_put_is_a_new_version_and_a_full_replace(api: httpx.AsyncClient) -> None:
    first = await put_template(api, companyName="Versioned Co", footerText="Footer one", brandColor="#0b6e4f",
                               bankDetails={"iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"})
    assert first["brandColor"] == "#0B6E4F" and first["bankDetails"]["bic"] == "COBADEFFXXX"
    second = await put_template(api, companyName="Versioned Co 2", defaultNetDays=14)
    third = await put_template(api, companyName="Versioned Co 3")
    assert [second["version"], third["version"]] == [first["version"] + 1, first["version"] + 2]
    assert second["defaultNetDays"] == 14
    # omitted fields are back to their defaults, not carried over
    assert second["footerText"] == "" and second["bankDetails"] is None and third["defaultNetDays"] == 30
    assert await current(api) == third


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"companyName": "X", "brandColor": "red"}, "brandColor"),
        ({"companyName": "X", "accentColor": "#12345"}, "accentColor"),
        ({"companyName": "X", "defaultNetDays": 400}, "defaultNetDays"),
        ({"companyName": "X", "defaultNetDays": -1}, "defaultNetDays"),
        ({"companyName": "X", "unknownField": 1}, "unknownField"),
        ({"companyName": "X", "bankDetails": {"swift": "X"}}, "bankDetails.swift"),
        ({"companyName": "X", "locale": "xx_QQ"}, "locale"),
        ({"companyName": "X", "pageSize": "A3"}, "pageSize"),
        ({"companyName": "X", "footerText": "x" * 1001}, "footerText"),
        ({"companyName": "X", "logo": {"data": "AAAA", "mime": "image/png", "width": 1, "height": 1}}, "logo"),
        ({"companyName": "X", "companyAddress": None}, "companyAddress"),
        ({"companyName": "Nul\u0000Co"}, "companyName"),
        ({"companyName": "   "}, "companyName"),
        ({"footerText": "no company"}, "companyName"),
    ],
)
async def test_invalid_template_is_422_and_changes_nothing(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    before = await current(api)
    response = await api.put(TEMPLATE, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["message"]
    assert any(d["field"] == field for d in error["details"]), error
    assert await current(api) == before


async def test_malformed_bodies_are_4xx(api: httpx.AsyncClient) -> None:
    before = await current(api)
    for content in (b"{not json", b"[]", b"", b'"text"'):
        response = await api.put(TEMPLATE, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (content, response.text)
        assert set(response.json()["error"]) == {"code", "message", "details"}
    huge = await api.put(TEMPLATE, content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                         headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    assert await current(api) == before


async def test_stale_version_is_a_conflict(api: httpx.AsyncClient) -> None:
    start = await current(api)
    ok = await api.put(TEMPLATE, json={"companyName": "Editor A", "version": start["version"]})
    assert ok.status_code == 200, ok.text
    stale = await api.put(TEMPLATE, json={"companyName": "Editor B", "version": start["version"]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "template_version_conflict"
    assert (await current(api))["companyName"] == "Editor A"


async def test_concurrent_saves_get_distinct_consecutive_versions(api: httpx.AsyncClient) -> None:
    start = (await current(api))["version"]
    responses = await asyncio.gather(
        *(api.put(TEMPLATE, json={"companyName": f"Racer {i}"}) for i in range(12)),
        api.post(LOGO, content=image_bytes(), headers={"content-type": "image/png"}),
    )
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    versions = sorted(r.json()["version"] for r in responses)
    assert versions == list(range(start + 1, start + 14))
    assert (await current(api))["version"] == start + 13
    # no lost update: every save that came after the logo upload kept the logo
    logo_version = next(r.json()["version"] for r in responses if r.request.method == "POST")
    assert all(r.json()["logo"] is not None for r in responses if r.json()["version"] > logo_version)


async def test_admin_only_except_the_logo(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    me = client_headers(customer["id"])
    assert (await api.get(TEMPLATE, headers=me)).status_code == 403
    assert (await api.put(TEMPLATE, json={"companyName": "Hijack"}, headers=me)).status_code == 403
    assert (await api.post(f"{TEMPLATE}/preview", json={}, headers=me)).status_code == 403
    upload = await api.post(LOGO, content=image_bytes(), headers={**me, "content-type": "image/png"})
    assert upload.status_code == 403
    await api.post(LOGO, content=image_bytes(), headers={"content-type": "image/png"})
    assert (await api.get(LOGO, headers=me)).status_code == 200


# -- logo --------------------------------------------------------------------------------------------


async def test_png_upload_is_stored_and_served(api: httpx.AsyncClient) -> None:
    await put_template(api, companyName="Logo Co", footerText="kept with the logo")
    png = image_bytes(size=(640, 200))
    response = await api.post(LOGO, files={"file": ("logo.png", png, "image/png")})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["logo"]["mime"] == "image/png" and (body["logo"]["width"], body["logo"]["height"]) == (640, 200)
    assert body["companyName"] == "Logo Co" and body["footerText"] == "kept with the logo"  # settings carried over
    served = await api.get(LOGO)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(served.content)) as img:
        assert img.format == "PNG" and img.size == (640, 200)
    assert served.headers["x-content-type-options"] == "nosniff"
    pinned = await api.get(body["logo"]["url"])
    assert pinned.content == served.content and "immutable" in pinned.headers["cache-control"]
    assert (await api.get(LOGO, headers={"If-None-Match": served.headers["etag"]})).status_code == 304
    # a later save keeps the logo; removeLogo drops it (the old version still has it)
    kept = await put_template(api, companyName="Logo Co 2")
    assert kept["logo"]["width"] == 640
    removed = await put_template(api, companyName="Logo Co 3", removeLogo=True)
    assert removed["logo"] is None and (await api.get(LOGO)).status_code == 404
    assert (await api.get(body["logo"]["url"])).status_code == 200


async def test_raw_jpeg_and_svg_uploads(api: httpx.AsyncClient) -> None:
    jpeg = await api.post(LOGO, content=image_bytes("JPEG"), headers={"content-type": "image/jpeg"})
    assert jpeg.status_code == 201, jpeg.text
    assert jpeg.json()["logo"]["mime"] == "image/png" and jpeg.json()["logo"]["sourceMime"] == "image/jpeg"
    svg = await api.post(LOGO, files={"file": ("logo.svg", SVG_LOGO, "application/octet-stream")})
    assert svg.status_code == 201, svg.text
    assert svg.json()["logo"]["mime"] == "image/svg+xml"
    served = await api.get(LOGO)
    assert served.headers["content-type"].startswith("image/svg+xml") and b"<svg" in served.content
    assert "default-src 'none'" in served.headers["content-security-policy"]


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("oversized raw", 413, "logo_too_large"),
        ("oversized multipart", 413, "logo_too_large"),
        ("oversized chunked", 413, "logo_too_large"),
        ("text as png", 422, "invalid_logo"),
        ("text as png multipart", 422, "invalid_logo"),
        ("png declared as svg", 422, "invalid_logo"),
        ("broken svg", 422, "invalid_logo"),
        ("svg with external image", 422, "invalid_logo"),
        ("truncated png", 422, "invalid_logo"),
        ("tiny png", 422, "invalid_logo"),
        ("gif in multipart", 422, "invalid_logo"),
        ("empty", 422, "invalid_logo"),
        ("text/plain body", 415, "unsupported_media_type"),
        ("multipart without file", 422, "validation_error"),
        ("broken multipart", 422, "invalid_upload"),
    ],
)
async def test_bad_logos_are_refused_and_change_nothing(
    api: httpx.AsyncClient, kind: str, status: int, code: str
) -> None:
    before = await current(api)
    big = image_bytes(size=(1200, 1200)) + b"\0" * (MAX_LOGO_BYTES + 1)
    png = image_bytes()
    requests: dict[str, Callable[[], Any]] = {
        "oversized raw": lambda: api.post(LOGO, content=big, headers={"content-type": "image/png"}),
        "oversized multipart": lambda: api.post(LOGO, files={"file": ("big.png", big, "image/png")}),
        "oversized chunked": lambda: api.post(LOGO, content=_chunks(big), headers={"content-type": "image/png"}),
        "text as png": lambda: api.post(LOGO, content=b"just some text\n" * 10,
                                        headers={"content-type": "image/png"}),
        "text as png multipart": lambda: api.post(LOGO, files={"file": ("notes.png", b"hello", "image/png")}),
        "png declared as svg": lambda: api.post(LOGO, content=png, headers={"content-type": "image/svg+xml"}),
        "broken svg": lambda: api.post(LOGO, content=b'<svg xmlns="http://www.w3.org/2000/svg"><rect',
                                       headers={"content-type": "image/svg+xml"}),
        "svg with external image": lambda: api.post(
            LOGO, content=b'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                          b'width="10" height="10"><image xlink:href="http://evil.example/x.png"/></svg>',
            headers={"content-type": "image/svg+xml"}),
        "truncated png": lambda: api.post(LOGO, content=png[: len(png) // 2], headers={"content-type": "image/png"}),
        "tiny png": lambda: api.post(LOGO, content=image_bytes(size=(4, 4)), headers={"content-type": "image/png"}),
        "gif in multipart": lambda: api.post(LOGO, files={"file": ("a.gif", image_bytes("GIF"), "image/gif")}),
        "empty": lambda: api.post(LOGO, content=b"", headers={"content-type": "image/png"}),
        "text/plain body": lambda: api.post(LOGO, content=b"hello", headers={"content-type": "text/plain"}),
        "multipart without file": lambda: api.post(LOGO, files={"logo": ("a.png", png, "image/png")}),
        "broken multipart": lambda: api.post(LOGO, content=b"--nope\r\ngarbage",
                                             headers={"content-type": "multipart/form-data; boundary=xyz"}),
    }
    response = await requests[kind]()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    assert await current(api) == before


# -- preview -----------------------------------------------------------------------------------------


async def test_preview_renders_unsaved_settings(api: httpx.AsyncClient) -> None:
    await put_template(api, companyName="Saved Co")
    await api.post(LOGO, content=image_bytes(), headers={"content-type": "image/png"})
    before = await current(api)
    name = f"Unsaved Preview {uuid.uuid4().hex[:6]}"
    response = await api.post(f"{TEMPLATE}/preview", json={"companyName": name, "brandColor": "#AA3377",
                                                          "defaultNotes": "Preview notes here"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf" and response.content.startswith(b"%PDF")
    text = pdf_text(response.content)
    assert name in text and "Preview notes here" in text and "Saved Co" not in text
    assert await current(api) == before  # nothing saved
    # the saved logo is used when none is given; a given (validated form) logo is checked again
    svg = base64.b64encode(SVG_LOGO).decode()
    given = await api.post(f"{TEMPLATE}/preview",
                           json={"logo": {"data": svg, "mime": "image/svg+xml", "width": 240, "height": 80}})
    assert given.status_code == 200 and given.content.startswith(b"%PDF")
    junk = base64.b64encode(b"not an image").decode()
    bad = await api.post(f"{TEMPLATE}/preview",
                         json={"logo": {"data": junk, "mime": "image/png", "width": 10, "height": 10}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_logo"
    assert (await api.post(f"{TEMPLATE}/preview", json={"removeLogo": True})).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{"brandColor": "blue"}, {"defaultNetDays": 400}, {"bogus": True}, {"logo": {"data": "!!", "mime": "image/png"}}],
)
async def test_invalid_preview_is_422(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await api.post(f"{TEMPLATE}/preview", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


# -- defaults used by invoices -----------------------------------------------------------------------


async def test_template_net_days_apply_when_sending(api: httpx.AsyncClient, customer: dict[str, Any]) -> None:
    await put_template(api, companyName="Net Days Co", defaultNetDays=14)
    today = date.today()

    async def send(**fields: Any) -> dict[str, Any]:
        created = await api.post("/api/invoices", json={"clientId": customer["id"], "items": [line()], **fields})
        sent = await api.post(f"/api/invoices/{created.json()['id']}/send")
        assert sent.status_code == 200, sent.text
        return sent.json()

    assert (await send())["dueDate"] == (today + timedelta(days=14)).isoformat()
    assert (await send(netDays=3))["dueDate"] == (today + timedelta(days=3)).isoformat()  # the invoice's own wins
    await put_template(api, companyName="Net Days Co", defaultNetDays=0)
    assert (await send())["dueDate"] == today.isoformat()

