"""The client portal in a real browser against the whole stack (issue #3: Pay Now, CUI1-CUI6).

Headless Chromium (Debian's `chromium`, driven by Python Playwright with its bundled driver; no
browser download) logs in as a client, lists and opens an invoice, downloads its PDF, pays it on the
Stripe stand-in's hosted checkout page (deploy/stripe_standin: what Stripe's Checkout is in test mode),
and watches the invoice turn PAID only once the stand-in's signed webhook reached payments.

Missing browser pieces fail the tests with what to install; they never skip silently.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.infra import ServiceProcess, StripeStandin
from deploy.services import GATEWAY, InfraEndpoints
from services.payments.stripe import testing as stripe_events
from tests.conftest import wait_until

try:
    from playwright.async_api import Browser, BrowserContext, Page, Request, async_playwright, expect
except ImportError as exc:  # reported by the `browser` fixture as a failure, not a skip
    PLAYWRIGHT_IMPORT_ERROR: ImportError | None = exc
else:
    PLAYWRIGHT_IMPORT_ERROR = None
    expect.set_options(timeout=30_000)  # the payment's confirmation travels webhook -> Kafka -> invoice

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]
PASSWORD = "portal-pass-123"
TIMEOUT_MS = 30_000
CHECKOUT_PAGE = re.compile(r"^http://127\.0\.0\.1:\d+/checkout/cs_[^/?]+$")  # the stand-in's hosted Checkout

# Records every text the checkout-status box shows, with the status badge at that moment; set up
# before any page script runs (init scripts are not subject to the page's CSP).
STATUS_RECORDER = """
window.__statusLog = [];
new MutationObserver(() => {
  const box = document.getElementById("checkout-status");
  if (!box || box.hidden) return;
  const badge = document.getElementById("invoice-status");
  const entry = [box.textContent, badge ? (badge.dataset.status || "") : ""];
  const last = window.__statusLog[window.__statusLog.length - 1];
  if (!last || last[0] !== entry[0] || last[1] !== entry[1]) window.__statusLog.push(entry);
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


def _chromium_installed() -> bool:
    return CHROMIUM.is_file()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if PLAYWRIGHT_IMPORT_ERROR is not None:
        pytest.fail(f"Python Playwright is missing ({PLAYWRIGHT_IMPORT_ERROR}): pip install playwright==1.65.2 "
                    "(its bundled driver works offline; do not run `playwright install`).")
    if not _chromium_installed():
        pytest.fail(f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    async with async_playwright() as p:
        try:
            launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}")
        yield launched
        await launched.close()


# Set PORTAL_SCREENSHOT_DIR to keep screenshots of the main flow's pages (for looking at the UI).
SCREENSHOT_DIR = os.environ.get("PORTAL_SCREENSHOT_DIR")


class Tab:
    """A browser context + page that remembers page errors and console errors (CSP violations show there)."""

    def __init__(self, context: BrowserContext, page: Page) -> None:
        self.context = context
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(f"pageerror: {err}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # A 4xx answer the page handles (wrong password, 409) is logged by Chromium as a failed load.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    async def snap(self, name: str) -> None:
        if SCREENSHOT_DIR:
            await self.page.screenshot(path=str(Path(SCREENSHOT_DIR) / f"{name}.png"), full_page=True)

    async def session_token(self) -> str | None:
        return await self.page.evaluate("() => sessionStorage.getItem('portal.accessToken')")  # type: ignore[no-any-return]


@pytest.fixture
async def tab(browser: Browser, stack: dict[str, ServiceProcess]) -> AsyncIterator[Tab]:
    context = await browser.new_context(
        base_url=stack[GATEWAY].url, locale="en-US", timezone_id="UTC", accept_downloads=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    await context.add_init_script(STATUS_RECORDER)
    page = await context.new_page()
    yield Tab(context, page)
    await context.close()


async def _client_login(admin: httpx.AsyncClient, *, currency: str = "EUR") -> tuple[dict[str, Any], str]:
    client = (await admin.post("/api/clients", json={
        "name": f"Portal {uuid.uuid4().hex[:6]}", "email": "portal@portal.example.com", "currency": currency,
    })).json()
    email = f"portal-{uuid.uuid4().hex[:8]}@portal.example.com"
    created = await admin.post("/api/users", json={"email": email, "password": PASSWORD, "role": "client",
                                                   "clientId": client["id"]})
    assert created.status_code == 201, created.text
    return client, email


async def _sent_invoice(admin: httpx.AsyncClient, client_id: str, items: list[dict[str, Any]],
                        notes: str | None = None) -> dict[str, Any]:
    created = await admin.post("/api/invoices", json={"clientId": client_id, "items": items, "notes": notes})
    assert created.status_code == 201, created.text
    sent = await admin.post(f"/api/invoices/{created.json()['id']}/send")
    assert sent.status_code == 200, sent.text
    return sent.json()  # type: ignore[no-any-return]


async def _log_in(tab: Tab, email: str, password: str = PASSWORD) -> None:
    page = tab.page
    await page.goto("/portal/invoices")
    await page.wait_for_url(re.compile(r"/portal/login\?next=%2Fportal%2Finvoices$"))  # no token yet
    await page.get_by_test_id("email").fill(email)
    await page.get_by_test_id("password").fill(password)
    await page.get_by_test_id("login-submit").click()
    await page.wait_for_url(re.compile(r"/portal/invoices$"))


async def test_client_logs_in_opens_an_invoice_and_pays_it(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], tab: Tab, tmp_path: Path,
    services_standin: StripeStandin,
) -> None:
    client, email = await _client_login(admin)
    hostile = 'Design <b>work</b> & <img src=x onerror="window.__xss=1">'
    invoice = await _sent_invoice(admin, client["id"], [
        {"description": hostile, "quantity": "2", "unitPrice": 10_000},
        {"description": "Hosting", "quantity": "1", "unitPrice": 5_000},
    ], notes="<script>window.__xss=2</script>Thank you!")
    assert invoice["total"] == 25_000 and invoice["status"] == "SENT"
    invoice_id, number = invoice["id"], invoice["invoiceNumber"]
    page = tab.page

    # -- login: a wrong password is refused with a clear message, the right one gets in ------------
    await page.goto("/portal/invoices")
    await page.wait_for_url(re.compile(r"/portal/login"))
    await page.get_by_test_id("email").fill(email)
    await page.get_by_test_id("password").fill("not-the-password")
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("login-error")).to_have_text("Wrong email or password.")
    await tab.snap("1-login-error")
    assert await tab.session_token() is None
    await page.get_by_test_id("password").fill(PASSWORD)
    await page.get_by_test_id("login-submit").click()
    await page.wait_for_url(re.compile(r"/portal/invoices$"))
    token = await tab.session_token()
    assert token

    # -- CUI1: the list ------------------------------------------------------------------------------
    row = page.locator(f'[data-testid="invoice-row"][data-invoice-id="{invoice_id}"]')
    await expect(row).to_contain_text(number)
    await expect(row).to_contain_text("€250.00")
    await expect(row.locator(".badge")).to_have_attribute("data-status", "SENT")
    await expect(page.get_by_test_id("invoice-row")).to_have_count(1)  # only this client's invoices
    await tab.snap("2-list")

    # -- CUI2: the detail; opening it marks it VIEWED; data is shown as text, never as HTML ---------
    await row.get_by_test_id("invoice-link").click()
    await page.wait_for_url(re.compile(rf"/portal/invoices/{invoice_id}$"))
    await expect(page.get_by_test_id("invoice-number")).to_have_text(f"Invoice {number}")
    await expect(page.get_by_test_id("invoice-status")).to_have_attribute("data-status", "VIEWED")
    items = page.get_by_test_id("line-item")
    await expect(items).to_have_count(2)
    await expect(items.nth(0).locator("td").first).to_have_text(hostile)
    await expect(items.nth(0).locator("td").nth(1)).to_have_text("2")  # quantity "2.0000" shown as 2
    await expect(items.nth(0).locator("td").last).to_have_text("€200.00")
    await expect(page.get_by_test_id("total")).to_have_text("€250.00")
    await expect(page.get_by_test_id("amount-due")).to_have_text("€250.00")
    await expect(page.get_by_test_id("notes")).to_have_text("<script>window.__xss=2</script>Thank you!")
    await expect(page.get_by_test_id("history-empty")).to_be_visible()
    assert await page.evaluate("() => window.__xss") is None
    await tab.snap("3-detail")
    assert token not in page.url

    # -- CUI3: the PDF, fetched with the bearer token, named as the API names it ---------------------
    expected_name = re.search(r'filename="([^"]+)"',
                              (await admin.get(f"/api/invoices/{invoice_id}/pdf")).headers["content-disposition"])
    assert expected_name
    async with page.expect_download() as download_info:
        await page.get_by_test_id("download-pdf").click()
    download = await download_info.value
    assert download.suggested_filename == expected_name.group(1)
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    assert saved.read_bytes().startswith(b"%PDF-")

    # -- CUI4: Pay now; a double click creates one checkout, sent with an Idempotency-Key -----------
    checkout_calls: list[Request] = []
    page.on("request", lambda r: checkout_calls.append(r) if r.url.endswith("/checkout") and r.method == "POST"
            else None)
    await page.get_by_test_id("pay-now").evaluate("button => { button.click(); button.click(); }")
    await page.wait_for_url(CHECKOUT_PAGE)
    assert len(checkout_calls) == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", checkout_calls[0].headers.get("idempotency-key", ""))
    checkout_url = page.url
    session_id = checkout_url.rsplit("/", 1)[1]
    assert checkout_url == f"{services_standin.url}/checkout/{session_id}"
    await expect(page.get_by_test_id("amount")).to_have_text("€250.00")

    # Cancel on the checkout page: back to the invoice with a note, still payable.
    await page.get_by_test_id("cancel").click()
    await page.wait_for_url(re.compile(rf"/portal/invoices/{invoice_id}\?checkout=cancelled$"))
    await expect(page.get_by_test_id("checkout-status")).to_contain_text("Payment cancelled")
    await expect(page.get_by_test_id("pay-now")).to_be_visible()

    # A success redirect nobody paid for (typed or forged) only ever shows "processing".
    await page.goto(f"/portal/invoices/{invoice_id}?checkout=success&session_id={session_id}")
    await expect(page.get_by_test_id("checkout-status")).to_contain_text("Payment processing")
    await page.wait_for_timeout(3_000)
    await expect(page.get_by_test_id("checkout-status")).to_contain_text("Payment processing")
    await expect(page.get_by_test_id("invoice-status")).not_to_have_attribute("data-status", "PAID")
    await expect(page.get_by_test_id("pay-now")).to_be_hidden()  # no second payment while one is pending
    await tab.snap("4-processing")
    assert (await admin.get(f"/api/invoices/{invoice_id}")).json()["status"] == "VIEWED"

    # -- pay on the stand-in's checkout page (its webhook goes to payments); back on the portal: -----
    # -- processing, then received, PAID --------------------------------------------------------------
    await page.goto(checkout_url)
    await page.get_by_test_id("pay").click()
    await page.wait_for_url(re.compile(rf"/portal/invoices/{invoice_id}\?checkout=success&session_id={session_id}$"))
    # CUI5: the payment status, confirmed by the API (webhook processed), not by the redirect.
    await expect(page.get_by_test_id("checkout-status")).to_have_text("Payment received. Thank you!")
    await expect(page.get_by_test_id("invoice-status")).to_have_attribute("data-status", "PAID")
    await expect(page.get_by_test_id("invoice-status")).to_have_text("Paid")
    await expect(page.get_by_test_id("amount-due")).to_have_text("€0.00")
    await expect(page.get_by_test_id("amount-paid")).to_have_text("€250.00")
    await expect(page.get_by_test_id("pay-now")).to_be_hidden()
    # CUI6: the payment history.
    history = page.get_by_test_id("payment-row")
    await expect(history).to_have_count(1)
    await expect(history.first).to_contain_text("€250.00")
    await expect(history.first).to_contain_text("Card")
    await tab.snap("5-paid")

    # What the status box showed on this page: maybe "processing" first (if the page asked before the
    # webhook was handled), never "processing" next to a PAID invoice, and "received" last.
    log: list[list[str]] = await page.evaluate("() => window.__statusLog")
    assert log[-1] == ["Payment received. Thank you!", "PAID"], log
    assert all(state != "PAID" for text, state in log if text.startswith("Payment processing")), log

    done = await wait_until(admin, f"/api/invoices/{invoice_id}", lambda b: b["status"] == "PAID")
    assert done["amountPaid"] == 25_000 and done["amountDue"] == 0
    assert tab.errors == []  # no script errors, no CSP violations


async def _open_checkout(tab: Tab, invoice_id: str) -> str:
    """Click Pay now on the invoice page; the checkout session id of the stand-in's page it lands on."""
    page = tab.page
    await page.goto(f"/portal/invoices/{invoice_id}")
    await page.get_by_test_id("pay-now").click()
    await page.wait_for_url(CHECKOUT_PAGE)
    return page.url.rsplit("/", 1)[1]


async def _deliver(gateway_url: str, secret: str, event: dict[str, Any]) -> None:
    body, headers = stripe_events.signed_request(event, secret)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as stripe_like:
        response = await stripe_like.post("/webhooks/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text


async def test_an_asynchronous_payment_that_fails_is_reported_and_stays_payable(
    admin: httpx.AsyncClient, tab: Tab, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints
) -> None:
    """A bank debit: Checkout completes unpaid, the customer is sent back, the debit fails later."""
    client, email = await _client_login(admin)
    invoice = await _sent_invoice(admin, client["id"], [{"description": "Audit", "unitPrice": 9_900}])
    await _log_in(tab, email)
    session_id = await _open_checkout(tab, invoice["id"])
    page, gateway, secret = tab.page, stack[GATEWAY].url, infra_endpoints.stripe_webhook_secret

    def event(event_type: str, payment_status: str, status: str = "complete") -> dict[str, Any]:
        session = stripe_events.checkout_session(
            invoice_id=invoice["id"], client_id=client["id"], amount_total=9_900, currency="eur",
            session_id=session_id, payment_intent=f"pi_{uuid.uuid4().hex}", payment_status=payment_status,
            status=status,
        )
        return stripe_events.build_event(event_type, session)

    completed = event("checkout.session.completed", "unpaid")
    await _deliver(gateway, secret, completed)
    await page.goto(f"/portal/invoices/{invoice['id']}?checkout=success&session_id={session_id}")
    status = page.get_by_test_id("checkout-status")
    await expect(status).to_contain_text("Payment processing")
    await expect(page.get_by_test_id("pay-now")).to_be_hidden()

    failed = event("checkout.session.async_payment_failed", "unpaid")
    failed["data"]["object"]["payment_intent"] = completed["data"]["object"]["payment_intent"]
    await _deliver(gateway, secret, failed)
    await expect(status).to_contain_text("The payment failed")
    await expect(status).to_have_attribute("data-state", "error")
    await expect(page.get_by_test_id("invoice-status")).not_to_have_attribute("data-status", "PAID")
    await expect(page.get_by_test_id("pay-now")).to_be_visible()  # they can try again
    assert tab.errors == []


async def test_an_expired_checkout_is_reported(
    admin: httpx.AsyncClient, tab: Tab, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints
) -> None:
    client, email = await _client_login(admin)
    invoice = await _sent_invoice(admin, client["id"], [{"description": "Support", "unitPrice": 4_200}])
    await _log_in(tab, email)
    session_id = await _open_checkout(tab, invoice["id"])
    expired = stripe_events.checkout_session(
        invoice_id=invoice["id"], client_id=client["id"], amount_total=4_200, currency="eur",
        session_id=session_id, payment_status="unpaid", status="expired",
    )
    await _deliver(stack[GATEWAY].url, infra_endpoints.stripe_webhook_secret,
                   stripe_events.build_event("checkout.session.expired", expired))
    page = tab.page
    await page.goto(f"/portal/invoices/{invoice['id']}?checkout=success&session_id={session_id}")
    status = page.get_by_test_id("checkout-status")
    await expect(status).to_contain_text("This checkout expired")
    await expect(status).to_have_attribute("data-state", "error")
    await expect(page.get_by_test_id("pay-now")).to_be_visible()
    assert tab.errors == []


async def test_pagination_and_logout(admin: httpx.AsyncClient, tab: Tab) -> None:
    client, email = await _client_login(admin, currency="JPY")
    for i in range(21):
        await _sent_invoice(admin, client["id"], [{"description": f"Item {i}", "unitPrice": 1_000 + i}])
    page = tab.page
    await _log_in(tab, email)
    rows = page.get_by_test_id("invoice-row")
    await expect(rows).to_have_count(20)
    await expect(page.get_by_test_id("page-info")).to_have_text("Page 1 of 2 · 21 invoices")
    await expect(rows.first).to_contain_text("¥1,020")  # zero-decimal currency: 1020 minor units = ¥1,020
    await page.get_by_test_id("next-page").click()
    await page.wait_for_url(re.compile(r"/portal/invoices\?page=2$"))
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("¥1,000")
    await expect(page.get_by_test_id("next-page")).to_be_disabled()
    href = await rows.first.get_by_test_id("invoice-link").get_attribute("href")
    assert href and href.startswith("/portal/invoices/")

    await page.get_by_test_id("logout").click()
    await page.wait_for_url(re.compile(r"/portal/login$"))
    assert await tab.session_token() is None
    await page.goto("/portal/invoices")
    await page.wait_for_url(re.compile(r"/portal/login\?next="))

    # A token the API no longer accepts: back to the login, then on to the page that was asked for.
    await page.evaluate("() => sessionStorage.setItem('portal.accessToken', 'no.longer.valid')")
    await page.goto(href)
    await page.wait_for_url(re.compile(r"/portal/login\?next=%2Fportal%2Finvoices%2F"))
    await page.get_by_test_id("email").fill(email)
    await page.get_by_test_id("password").fill(PASSWORD)
    await page.get_by_test_id("login-submit").click()
    await page.wait_for_url(re.compile(rf"{re.escape(href)}$"))
    await expect(page.get_by_test_id("invoice-status")).to_have_attribute("data-status", "VIEWED")
    assert tab.errors == []


async def test_an_admin_sees_any_clients_invoice(
    admin: httpx.AsyncClient, tab: Tab, infra_endpoints: InfraEndpoints
) -> None:
    client, _ = await _client_login(admin)
    invoice = await _sent_invoice(admin, client["id"], [{"description": "Retainer", "unitPrice": 50_000}])
    page = tab.page
    await _log_in(tab, "admin@example.com", infra_endpoints.admin_password)
    await expect(page.get_by_test_id("invoice-row").first).to_be_visible()
    await page.goto(f"/portal/invoices/{invoice['id']}")
    await expect(page.get_by_test_id("invoice-number")).to_have_text(f"Invoice {invoice['invoiceNumber']}")
    # An admin opening it does not count as the client viewing it.
    await expect(page.get_by_test_id("invoice-status")).to_have_attribute("data-status", "SENT")
    assert tab.errors == []
