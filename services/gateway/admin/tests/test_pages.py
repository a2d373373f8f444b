"""The admin pages without a browser or a database: the gateway app in-process, the services faked.

What is checked here is what a browser cannot easily show: headers (CSP, cookies), CSRF refusals, that
every value is escaped, the money parsing rules and the server-side totals. The whole flow against
the real services runs in a real browser in tests/test_admin_browser.py.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kit.web import request_unit_of_work
from services.gateway.admin import auth, static
from services.gateway.admin.formatting import MoneyInputError, money, parse_major
from services.gateway.admin.tests.fake_services import FakeServices, build_fake_services
from services.gateway.admin.web import SESSION_COOKIE
from services.gateway.app import create_app
from services.gateway.schemas import LoginResponse, UserOut
from services.gateway.tests.conftest import make_settings, serve

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeServices]:
    state = FakeServices()
    served = await serve(build_fake_services(state))
    state.url = served.url
    yield state
    await served.stop()


@pytest.fixture(scope="module")
async def gateway_app(fake: FakeServices) -> AsyncIterator[Any]:
    settings = make_settings("postgresql+asyncpg://nobody@127.0.0.1:1/none", invoice_url=fake.url,
                             payments_url=fake.url, notifications_url=fake.url, reporting_url=fake.url,
                             subscriptions_url=fake.url)
    app = create_app(settings)
    yield app
    await app.state.gateway.upstreams.close()


@pytest.fixture
async def http(gateway_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as client:
        yield client


def sign_in(http: httpx.AsyncClient, app: Any, role: str = "admin") -> None:
    token = app.state.gateway.tokens.issue(user_id=str(uuid.uuid4()), role=role,
                                           client_id=str(uuid.uuid4()) if role == "client" else None)
    http.cookies.set(SESSION_COOKIE, token, domain="admin.test", path="/admin")


async def csrf_token(http: httpx.AsyncClient, path: str = "/admin/clients/new") -> str:
    page = await http.get(path)
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match, page.text[:500]
    return match.group(1)


class Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.labels: list[str] = []
        self.forms: list[dict[str, str | None]] = []
        self.hidden: list[dict[str, str | None]] = []
        self._label = False
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        if tag == "style":
            self.inline.append("<style>")
        if tag == "form":
            self.forms.append(a)
        if tag == "input" and a.get("type") == "hidden":
            self.hidden.append(a)
        if tag in ("label", "button", "th"):
            self._label, self._text = True, []
        for name, _ in attrs:
            if name == "style" or name.startswith("on") or name.startswith("hx-on"):
                self.inline.append(f"{tag}[{name}]")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("label", "button", "th") and self._label:
            self.labels.append(" ".join("".join(self._text).split()))
            self._label = False

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append("inline script")
        if self._label:
            self._text.append(data)


def parse(html: str) -> Parsed:
    p = Parsed()
    p.feed(html)
    return p


def test_money_is_typed_in_major_units_by_the_currency_exponent() -> None:
    assert parse_major("95.00", "EUR") == 9500
    assert parse_major("1,234.5", "EUR") == 123450
    assert parse_major("950", "JPY") == 950
    assert parse_major("95,5", "EUR", "de_DE") == 9550
    for text, currency in (("95.001", "EUR"), ("95.5", "JPY"), ("abc", "EUR"), ("-1", "EUR"), ("", "EUR")):
        with pytest.raises(MoneyInputError):
            parse_major(text, currency)
    with pytest.raises(MoneyInputError, match="JPY has no decimals"):
        parse_major("1.5", "JPY")
    assert money(9500, "EUR", "en_US") == "€95.00"
    assert money(950, "JPY", "en_US") == "¥950"
    assert money(9500, "EUR", "de_DE") == "95,00\xa0€"


async def test_signed_out_pages_go_to_the_sign_in_page_and_back(http: httpx.AsyncClient) -> None:
    response = await http.get("/admin/invoices?status=open")
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login?next=%2Fadmin%2Finvoices%3Fstatus%3Dopen"
    htmx = await http.get("/admin/invoices", headers={"HX-Request": "true"})
    assert htmx.status_code == 204 and htmx.headers["hx-redirect"].startswith("/admin/login?next=")
    page = await http.get("/admin/login?next=%2Fadmin%2Finvoices")
    assert page.status_code == 200
    parsed = parse(page.text)
    assert {"Email", "Password", "Sign in"} <= set(parsed.labels)
    assert any(h.get("name") == "next" and h.get("value") == "/admin/invoices" for h in parsed.hidden)
    # no open redirect
    evil = await http.get("/admin/login?next=https%3A%2F%2Fevil.example%2F")
    assert 'value="/admin"' in evil.text


async def test_sign_in_sets_a_strict_session_cookie_and_refuses_client_logins(
    http: httpx.AsyncClient, gateway_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = gateway_app.state.gateway.tokens

    class FakeAuth:
        async def login(self, email: str, password: str, *, address: str | None = None) -> LoginResponse:
            role = "admin" if email.startswith("admin") else "client"
            user = UserOut(id=uuid.uuid4(), email=email, role=role, client_id=None if role == "admin" else "c1")
            token = tokens.issue(user_id=str(user.id), role=role, client_id=user.client_id)
            return LoginResponse(access_token=token, expires_in=3600, user=user)

    async def no_uow() -> AsyncIterator[None]:
        yield None

    monkeypatch.setattr(auth, "auth_service", lambda request, uow, throttled=False: FakeAuth())
    gateway_app.dependency_overrides[request_unit_of_work] = no_uow
    try:
        token = await csrf_token(http, "/admin/login")
        refused = await http.post("/admin/login", data={"email": "admin@example.com", "password": "x"})
        assert refused.status_code == 403  # no CSRF token
        ok = await http.post("/admin/login", data={"email": "admin@example.com", "password": "x",
                                                  "next": "/admin/invoices", "csrf_token": token})
        assert ok.status_code == 303 and ok.headers["location"] == "/admin/invoices"
        cookie = next(v for k, v in ok.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "max-age"} <= attributes
        assert "samesite=lax" in cookie.lower() and "path=/admin" in cookie.lower()
        assert "secure" not in attributes  # GATEWAY_ADMIN_COOKIE_SECURE is off by default (plain http locally)
        gateway_app.state.admin.cookie_secure = True
        try:
            secure = await http.post("/admin/login", data={"email": "admin@example.com", "password": "x",
                                                          "csrf_token": token})
        finally:
            gateway_app.state.admin.cookie_secure = False
        cookie = next(v for k, v in secure.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
        assert "secure" in {part.strip().lower() for part in cookie.split(";")}

        http.cookies.delete(SESSION_COOKIE)
        client = await http.post("/admin/login", data={"email": "client@example.com", "password": "x",
                                                      "csrf_token": token})
        assert client.status_code == 403
        assert 'href="/portal"' in client.text
        assert not any(k == "set-cookie" and v.startswith(SESSION_COOKIE) for k, v in client.headers.multi_items())
    finally:
        gateway_app.dependency_overrides.clear()


async def test_a_client_session_gets_403_with_a_link_to_the_portal(http: httpx.AsyncClient, gateway_app: Any) -> None:
    sign_in(http, gateway_app, role="client")
    for path in ("/admin", "/admin/invoices", "/admin/clients"):
        response = await http.get(path)
        assert response.status_code == 403, path
        assert 'href="/portal"' in response.text


async def test_every_post_needs_the_csrf_token(http: httpx.AsyncClient, gateway_app: Any, fake: FakeServices) -> None:
    sign_in(http, gateway_app)
    client = fake.add_client("CSRF Co")
    body = {"name": "Evil", "email": "e@example.com", "currency": "EUR"}
    before = len(fake.clients)
    assert (await http.post("/admin/clients", data=body)).status_code == 403
    assert (await http.post("/admin/clients", data={**body, "csrf_token": "forged"})).status_code == 403
    token = await csrf_token(http)
    other_site = await http.post("/admin/clients", data={**body, "csrf_token": token},
                                 headers={"Origin": "https://evil.example"})
    assert other_site.status_code == 403
    assert len(fake.clients) == before
    fresh = httpx.AsyncClient(transport=http._transport, base_url="http://admin.test")  # another browser
    sign_in(fresh, gateway_app)
    assert (await fresh.post("/admin/clients", data={**body, "csrf_token": token})).status_code == 403
    await fresh.aclose()
    created = await http.post("/admin/clients", data={**body, "csrf_token": token})
    assert created.status_code == 303
    totals = await http.post("/admin/invoices/form/totals", data={"client_id": client["id"]},
                             headers={"X-CSRF-Token": token, "HX-Request": "true"})
    assert totals.status_code == 200  # htmx sends it as a header
    assert len(fake.clients) == before + 1


async def test_pages_have_a_strict_csp_nothing_inline_and_escape_everything(
    http: httpx.AsyncClient, gateway_app: Any, fake: FakeServices
) -> None:
    sign_in(http, gateway_app)
    client = fake.add_client(XSS)
    invoice = fake.build_invoice({"clientId": client["id"], "notes": XSS, "projectId": XSS,
                                  "items": [{"description": XSS, "quantity": "2", "unitPrice": 1000}]})
    fake.invoices[invoice["id"]] = invoice
    pages = ["/admin", "/admin/invoices", "/admin/invoices/new", f"/admin/invoices/{invoice['id']}",
             f"/admin/invoices/{invoice['id']}/edit", f"/admin/invoices/{invoice['id']}/send", "/admin/clients",
             "/admin/clients/new", f"/admin/clients/{client['id']}", "/admin/payments", "/admin/emails",
             "/admin/reminders", "/admin/reports", "/admin/template", "/admin/plans", "/admin/plans/new",
             "/admin/subscriptions", "/admin/subscriptions/new"]
    for path in pages:
        response = await http.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, path
        assert response.headers["x-frame-options"] == "DENY"
        parsed = parse(response.text)
        assert parsed.inline == [], (path, parsed.inline)
        for script in parsed.scripts:
            src = script.get("src") or ""
            assert src.startswith("/admin/static/") and not urlsplit(src).netloc, (path, src)
        assert "<script>alert(1)</script>" not in response.text, path
        for form in parsed.forms:
            if (form.get("method") or "get").lower() == "post":
                assert any(h.get("name") == "csrf_token" for h in parsed.hidden), path
    detail = (await http.get(f"/admin/invoices/{invoice['id']}")).text
    assert detail.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # client, line, notes, project


async def test_the_totals_are_the_servers_and_bad_amounts_are_refused_next_to_their_field(
    http: httpx.AsyncClient, gateway_app: Any, fake: FakeServices
) -> None:
    sign_in(http, gateway_app)
    eur = fake.add_client("Totals EUR")
    token = await csrf_token(http)
    form = {"client_id": eur["id"], "line_description": ["Design", "Hosting", "Support"],
            "line_quantity": ["10", "1", "2.5"], "line_unit_price": ["95.00", "20", "40"],
            "line_discount": ["50", "", ""], "line_tax_rate": ["", "", "7"], "discount_kind": "percent",
            "discount": "10", "tax_rate": "19", "csrf_token": token}
    response = await http.post("/admin/invoices/form/totals", data=form, headers={"HX-Request": "true"})
    assert response.status_code == 200
    # 900 + 20 + 100 = 1020.00; 10 % off = 102.00; tax per line after its share of the discount
    assert 'data-testid="subtotal">€1,020.00<' in response.text
    assert 'data-testid="discount-amount">€102.00<' in response.text
    assert 'data-testid="total">' in response.text
    bad = await http.post("/admin/invoices/form/totals", data={**form, "line_unit_price": ["95.001", "20", "40"]},
                          headers={"HX-Request": "true"})
    assert re.search(r'id="err-line-0-unit_price"[^>]*hx-swap-oob="true">EUR has 2 decimals at most', bad.text)
    jpy = fake.add_client("Totals JPY", currency="JPY")
    yen = await http.post("/admin/invoices/form/totals", headers={"HX-Request": "true"}, data={
        "client_id": jpy["id"], "line_description": "Work", "line_quantity": "1", "line_unit_price": "950.5",
        "line_discount": "", "line_tax_rate": "", "csrf_token": token})
    assert "JPY has no decimals" in yen.text
    saved = await http.post("/admin/invoices", data={**form, "csrf_token": token, "idempotency_key": "form-key-1"})
    assert saved.status_code == 303
    created = fake.requests[-1]
    assert created[0] == "POST" and created[1] == "/api/invoices"
    assert created[2]["x-actor-role"] == "admin" and created[2]["idempotency-key"] == "form-key-1"
    sent = __import__("json").loads(created[3])
    assert [i["unitPrice"] for i in sent["items"]] == [9500, 2000, 4000] and sent["discountPercent"] == "10"


async def test_the_totals_and_the_amount_refusals_are_the_invoice_services_preview(
    http: httpx.AsyncClient, gateway_app: Any, fake: FakeServices
) -> None:
    sign_in(http, gateway_app)
    eur = fake.add_client("Preview EUR")
    token = await csrf_token(http)
    form = {"client_id": eur["id"], "line_description": ["Design", "Hosting"], "line_quantity": ["2", "1"],
            "line_unit_price": ["95.00", "20"], "line_discount": ["", "50"], "line_tax_rate": ["", ""],
            "discount_kind": "amount", "discount": "", "tax_rate": "", "due_date": "not a date",
            "csrf_token": token}
    before = len(fake.requests)
    refused = await http.post("/admin/invoices/form/totals", data=form, headers={"HX-Request": "true"})
    asked = [r for r in fake.requests[before:] if r[1] == "/api/invoices/preview"]
    assert [r[0] for r in asked] == ["POST"] and asked[0][2]["x-actor-role"] == "admin"
    sent = json.loads(asked[0][3])
    # the body the form would save, the field in error (the due date) left out
    assert sent["clientId"] == eur["id"] and "dueDate" not in sent
    assert [(i["unitPrice"], i.get("discount")) for i in sent["items"]] == [(9500, None), (2000, 5000)]
    # the service's refusal, next to the line's discount; no totals then
    assert re.search(r'id="err-line-1-discount"[^>]*hx-swap-oob="true">'
                     r'A line discount cannot exceed the line amount\.<', refused.text)
    assert 'data-testid="totals-pending"' in refused.text and 'data-testid="subtotal"' not in refused.text
    assert re.search(r'id="err-due_date"[^>]*hx-swap-oob="true">Enter a date', refused.text)

    fixed = await http.post("/admin/invoices/form/totals", data={**form, "line_discount": ["", "5"]},
                            headers={"HX-Request": "true"})
    assert 'data-testid="subtotal">€205.00<' in fixed.text  # the preview's figures, due date still in error
    assert re.search(r'id="line-0-amount"[^>]*hx-swap-oob="true">€190.00<', fixed.text)
    assert re.search(r'id="line-1-amount"[^>]*hx-swap-oob="true">€15.00<', fixed.text)

    invoices = len(fake.invoices)
    saved = await http.post("/admin/invoices", data={**form, "due_date": "", "idempotency_key": "preview-key-1"})
    assert saved.status_code == 422 and len(fake.invoices) == invoices
    assert re.search(r'id="err-line-1-discount"[^>]*>A line discount cannot exceed the line amount\.<', saved.text)

    fake.preview_up = False
    try:
        down = await http.post("/admin/invoices/form/totals", data={**form, "line_discount": ["", "5"]},
                               headers={"HX-Request": "true"})
    finally:
        fake.preview_up = True
    assert down.status_code == 200
    assert 'data-testid="totals-unavailable">The invoice service is not available right now.<' in down.text


async def test_an_overpayment_is_refused_next_to_the_amount_with_what_is_due(
    http: httpx.AsyncClient, gateway_app: Any, fake: FakeServices
) -> None:
    sign_in(http, gateway_app)
    client = fake.add_client("Payer")
    invoice = fake.build_invoice({"clientId": client["id"], "items": [{"description": "A", "unitPrice": 10000}]})
    invoice["status"] = "SENT"
    fake.invoices[invoice["id"]] = invoice
    token = await csrf_token(http)
    response = await http.post(f"/admin/invoices/{invoice['id']}/payments", data={
        "amount": "150.00", "method": "bank_transfer", "date": "", "reference": "", "csrf_token": token})
    assert response.status_code == 422
    assert re.search(r'id="err-amount"[^>]*>That is more than the €100.00 still due.<', response.text)


async def test_unavailable_services_show_a_clear_state(http: httpx.AsyncClient, gateway_app: Any,
                                                       fake: FakeServices) -> None:
    sign_in(http, gateway_app)
    fake.reporting_up = fake.subscriptions_up = False
    try:
        for path in ("/admin", "/admin/reports", "/admin/plans", "/admin/subscriptions"):
            response = await http.get(path)
            assert response.status_code == 200, path
            assert 'data-testid="unavailable"' in response.text, path
            assert "not available" in response.text
    finally:
        fake.reporting_up = fake.subscriptions_up = True
    dashboard = (await http.get("/admin")).text
    assert "€123.45" in dashboard and 'data-chart=' in dashboard


async def test_the_template_preview_is_the_services_pdf_framed_by_our_pages_only(
    http: httpx.AsyncClient, gateway_app: Any
) -> None:
    sign_in(http, gateway_app)
    token = await csrf_token(http, "/admin/template")
    fields = {"company_name": "New Name", "brand_color": "#112233", "accent_color": "#445566",
              "default_net_days": "30", "locale": "de_DE", "page_size": "auto", "csrf_token": token}
    fragment = await http.post("/admin/template/preview", data=fields, headers={"HX-Request": "true"})
    src = re.search(r'<iframe src="([^"]+)"', fragment.text)
    assert src, fragment.text
    pdf = await http.get(src.group(1).replace("&amp;", "&"))
    assert pdf.status_code == 200 and pdf.content == b"%PDF-1.4 New Name"
    assert "frame-ancestors 'self'" in pdf.headers["content-security-policy"]
    bad = await http.post("/admin/template/preview", data={**fields, "brand_color": "red"},
                          headers={"HX-Request": "true"})
    assert "<iframe" not in bad.text and "Choose a colour" in bad.text


def test_vendored_assets_are_pinned_with_their_licences() -> None:
    names = set(static.STATIC)
    assert {"vendor/htmx-2.0.11.min.js", "vendor/htmx-LICENSE.txt", "vendor/chart-4.6.1.umd.min.js",
            "vendor/chart.js-LICENSE.md", "admin.js", "charts.js", "admin.css"} <= names
    htmx = static.STATIC["vendor/htmx-2.0.11.min.js"][0].decode()
    assert 'version:"2.0.11"' in htmx.replace(" ", "")
    for name, (content, _, _) in static.STATIC.items():
        if name.endswith(".js") and not name.startswith("vendor/"):
            source = content.decode()
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in source, f"{name} uses {sink}"


async def test_static_paths_outside_the_allow_list_are_404(http: httpx.AsyncClient) -> None:
    for path in ("/admin/static/../web.py", "/admin/static/vendor/../../web.py", "/admin/static/nothing.js"):
        assert (await http.get(path)).status_code in (400, 404), path
    asset = await http.get("/admin/static/admin.css")
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/css")
    again = await http.get("/admin/static/admin.css", headers={"If-None-Match": asset.headers["etag"]})
    assert again.status_code == 304


async def test_a_failed_email_can_be_queued_again(http: httpx.AsyncClient, gateway_app: Any,
                                                  fake: FakeServices) -> None:
    sign_in(http, gateway_app)
    log = await http.get("/admin/emails")
    assert 'data-testid="retry"' in log.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in log.text
    action = re.search(r'action="(/admin/emails/[0-9a-f-]{36}/retry)"', log.text)
    assert action
    token = await csrf_token(http, "/admin/emails")
    response = await http.post(action.group(1), data={"csrf_token": token})
    assert response.status_code == 303 and response.headers["location"].startswith("/admin/emails?retried=")
    assert fake.requests[-1][:2] == ("POST", action.group(1).replace("/admin/emails", "/api/notifications"))
    assert "queued again" in (await http.get(response.headers["location"])).text
