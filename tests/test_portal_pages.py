"""The client portal's pages as the gateway serves them: fast, no browser, no database.

The gateway app runs in-process (httpx ASGI transport, no lifespan: nothing here touches its
database); the payments upstream is the gateway tests' echo app on a real port, to show what is
proxied to it and that no checkout page is (paying happens on Stripe's hosted pages, locally the
Stripe stand-in's).
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest

from services.gateway import portal
from services.gateway.app import create_app
from services.gateway.tests.conftest import make_settings, serve
from services.gateway.tests.upstream_app import Upstream, build_upstream_app
from services.payments.config import PaymentsSettings
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.service import SubscriptionService

PAGES = ["/portal/login", "/portal/invoices", f"/portal/invoices/{uuid.uuid4()}", "/portal/subscription"]


@pytest.fixture(scope="module")
async def payments_echo() -> AsyncIterator[Upstream]:
    up = Upstream("payments")
    served = await serve(build_upstream_app(up))
    up.url = served.url
    yield up
    await served.stop()


@pytest.fixture(scope="module")
async def http(payments_echo: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        # Never connected to: page and proxy requests without an Idempotency-Key skip the database.
        "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        payments_url=payments_echo.url,
        invoice_url=payments_echo.url,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://portal.test") as client:
        yield client
    await app.state.gateway.upstreams.close()


def csp_directives(value: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


class _Page(HTMLParser):
    """Collects what matters for the CSP: scripts, styles, inline handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.stylesheets: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        if tag == "style":
            self.inline.append("<style>")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a["href"] or "")
        for name, _ in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag}[{name}]")

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append("inline script")


@pytest.mark.parametrize("path", PAGES)
async def test_pages_are_served_with_a_strict_csp(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = csp_directives(response.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    for directive in ("script-src", "style-src", "connect-src", "form-action"):
        assert csp[directive] == ["'self'"], directive
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"

    head = await http.head(path)
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("path", PAGES)
async def test_pages_have_nothing_inline_and_only_local_assets(http: httpx.AsyncClient, path: str) -> None:
    parsed = _Page()
    parsed.feed((await http.get(path)).text)
    assert parsed.inline == []  # the CSP would block them anyway
    assert parsed.scripts and all(s.get("type") == "module" and s.get("src") for s in parsed.scripts)
    for url in [str(s["src"]) for s in parsed.scripts] + parsed.stylesheets:
        assert urlsplit(url).netloc == "" and url.startswith("/portal/static/"), url  # no CDN: offline
        asset = await http.get(url)
        assert asset.status_code == 200, url
        expected = "text/javascript" if url.endswith(".js") else "text/css"
        assert asset.headers["content-type"].startswith(expected)
        assert asset.headers["x-content-type-options"] == "nosniff"


async def test_static_assets_imports_resolve_and_revalidate(http: httpx.AsyncClient) -> None:
    for name in portal.STATIC:
        response = await http.get(f"/portal/static/{name}")
        assert response.status_code == 200
        for imported in re.findall(r'from\s+"\./([^"]+)"', response.text):
            assert imported in portal.STATIC, f"{name} imports a missing {imported}"
        again = await http.get(f"/portal/static/{name}", headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/portal/static/missing.js", "/portal/static/..%2Fapp.py",
                                  "/portal/static/%2e%2e/__init__.py", "/portal/static/sub/portal.js"])
async def test_unknown_static_paths_are_404(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code in (400, 404), response.text
    assert "import" not in response.text  # no Python source leaked


def test_scripts_never_write_html_or_put_the_token_in_urls() -> None:
    for name, (content, _, _) in portal.STATIC.items():
        if not name.endswith(".js"):
            continue
        source = content.decode()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{name} uses {sink}"
        assert "localStorage" not in source, f"{name}: the token belongs in sessionStorage only"
        assert not re.search(r"searchParams\.set\([^)]*token", source, re.IGNORECASE), name


@pytest.mark.parametrize("path", ["/portal", "/portal/"])
async def test_portal_root_redirects_to_the_invoices(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 302
    assert response.headers["location"] == "/portal/invoices"


async def test_a_non_uuid_invoice_page_is_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/portal/invoices/not-an-id")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_unknown_portal_paths_are_not_served(http: httpx.AsyncClient) -> None:
    assert (await http.get("/portal/nothing-here")).status_code == 404


async def test_no_checkout_page_is_proxied_to_payments_any_more(
    http: httpx.AsyncClient, payments_echo: Upstream
) -> None:
    """The stand-in checkout moved out of the payments service into the Stripe stand-in's own process:
    a checkout's URL is Stripe's (the stand-in's), so the gateway has no public /portal/checkout route."""
    page = await http.get("/portal/checkout/cs_test_123")
    assert page.status_code == 404 and "x-upstream" not in page.headers
    pay = await http.post("/portal/checkout/cs_test_123/pay")
    assert pay.status_code == 404 and "x-upstream" not in pay.headers

    hook = await http.get("/webhooks/stripe")  # still public and proxied to payments
    assert hook.headers["x-upstream"] == "payments" and hook.json()["path"] == "/webhooks/stripe"
    assert hook.json()["headers"]["x-actor-role"] == "anonymous"  # public route: no token needed


async def test_the_payments_return_urls_land_on_the_invoice_page(http: httpx.AsyncClient) -> None:
    """Payments builds `{portal_url}/invoices/{id}?checkout=success&session_id=...` and `?checkout=cancelled`."""
    portal_path = urlsplit(PaymentsSettings().portal_url).path.rstrip("/")
    assert portal_path == "/portal"
    invoice_id = uuid.uuid4()
    for query in ("checkout=success&session_id=cs_test_abc", "checkout=cancelled"):
        response = await http.get(f"{portal_path}/invoices/{invoice_id}?{query}")
        assert response.status_code == 200
        assert 'src="/portal/static/invoice.js"' in response.text
    script = portal.STATIC["invoice.js"][0].decode()
    assert 'params.get("checkout")' in script and 'params.get("session_id")' in script
    assert '"success"' in script and '"cancelled"' in script


def test_portal_pages_stay_out_of_the_openapi_document() -> None:
    app_paths = [route.path for route in portal.router.routes]  # type: ignore[attr-defined]
    assert "/portal/login" in app_paths
    assert all(not getattr(route, "include_in_schema", True) for route in portal.router.routes)


async def test_pages_accept_the_query_parameters_their_scripts_read_and_refuse_others(
    http: httpx.AsyncClient,
) -> None:
    invoice_id = uuid.uuid4()
    for path in ("/portal/login?next=%2Fportal%2Finvoices", "/portal/invoices?page=2",
                 f"/portal/invoices/{invoice_id}?checkout=cancelled",
                 "/portal/subscription?checkout=success&session_id=cs_test_1", "/portal/subscription?checkout=cancel"):
        assert (await http.get(path)).status_code == 200, path
    for path in ("/portal/login?nxt=/portal", "/portal/invoices?pageSize=50", f"/portal/invoices/{invoice_id}?x=1",
                 "/portal/subscription?plan=1"):
        response = await http.get(path)
        assert response.status_code == 400, path
        assert response.json()["error"]["code"] == "unknown_query_parameter"
    # The proxy does not judge a query string: the service that owns the path does.
    forwarded = await http.get("/webhooks/stripe?anything=1")
    assert forwarded.headers["x-upstream"] == "payments"


async def test_the_subscription_returns_land_on_the_subscription_page(http: httpx.AsyncClient) -> None:
    """The subscriptions service sends Checkout back to `{portal_url}/subscription?checkout=success&
    session_id={CHECKOUT_SESSION_ID}` (or `?checkout=cancel`), and the billing portal to `/subscription`."""
    settings = SubscriptionsSettings(public_url="http://portal.test")
    assert urlsplit(settings.portal_url).path.rstrip("/") == "/portal"
    source = "".join(inspect.getsource(f) for f in (SubscriptionService.start_checkout,
                                                    SubscriptionService.portal_session))
    assert "/subscription?checkout=success&session_id={{CHECKOUT_SESSION_ID}}" in source
    assert "/subscription?checkout=cancel" in source and "/subscription\"" in source
    for query in ("", "?checkout=success&session_id=cs_test_abc", "?checkout=cancel"):
        response = await http.get(f"/portal/subscription{query}")
        assert response.status_code == 200
        assert 'src="/portal/static/subscription.js"' in response.text
    script = portal.STATIC["subscription.js"][0].decode()
    assert 'params.get("checkout")' in script and '"success"' in script and '"cancel"' in script


@pytest.mark.parametrize("path", ["/portal/invoices", f"/portal/invoices/{uuid.uuid4()}", "/portal/subscription"])
async def test_every_page_links_the_invoices_and_the_subscription(http: httpx.AsyncClient, path: str) -> None:
    text = (await http.get(path)).text
    assert 'href="/portal/invoices"' in text and 'href="/portal/subscription"' in text


def test_the_subscription_script_sends_every_post_with_an_idempotency_key_and_the_bearer_token() -> None:
    """The portal's CSRF defence: the API takes the bearer token from sessionStorage, sent by the script in
    a header (never a cookie a forged cross-site form could carry); each POST carries an Idempotency-Key."""
    script = portal.STATIC["subscription.js"][0].decode()
    shared = portal.STATIC["portal.js"][0].decode()
    assert "init.headers.Authorization = `Bearer ${current}`" in shared and "credentials" not in shared
    assert "fetch(" not in script  # every request goes through api(), which adds the token
    posts = re.findall(r'method: "POST"', script)
    assert len(posts) == 1 and '"Idempotency-Key": key' in script  # one helper makes every POST
    for action in ("change", "cancel", "resume"):
        assert f"post(`/api/subscriptions/${{encodeURIComponent(s.id)}}/{action}`" in script, action
    assert 'post("/api/billing-portal")' in script and 'post("/api/subscriptions/checkout"' in script
