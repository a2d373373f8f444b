"""The admin web UI in a real browser against the whole stack (issue 11: AUI1-AUI6, REP1-REP4).

Headless Chromium (Debian's, driven by Python Playwright; the `browser` fixture of the portal's
browser tests) signs in as the admin and runs an agency's month: a client (named like a script, which
must stay text everywhere), a three-line invoice with discount and tax whose totals the server computes
as it is typed, an edit, sending, a partial payment then the rest, an overpayment refused, the template
with its live PDF preview, plans and a subscription with a plan change, the dashboard against the
reporting API, reports downloads, reminders, a portal invitation, and a client login refused.

Every page visited is checked by axe-core (vendored from npm in tests/vendor, evaluated by the test:
the pages' CSP allows no injected script) for serious or critical violations, must raise no script
error or CSP violation, and is saved as a screenshot under .run/test-artifacts/admin/.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from babel.numbers import format_currency
from PIL import Image
from pypdf import PdfReader

from deploy.infra import RUN_DIR, MailSink, ServiceProcess
from deploy.services import GATEWAY, InfraEndpoints
from tests.conftest import wait_until
from tests.test_portal_browser import PLAYWRIGHT_IMPORT_ERROR, TIMEOUT_MS, browser  # noqa: F401  (a fixture)

if PLAYWRIGHT_IMPORT_ERROR is None:
    from playwright.async_api import Browser, BrowserContext, Page, expect
    from playwright.async_api import Error as PlaywrightError

ARTIFACTS = RUN_DIR / "test-artifacts" / "admin"
AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1.min.js"
XSS = "<script>alert(1)</script>"
ADMIN = "admin@example.com"
CLIENT_PASSWORD = "client-pass-123"


async def submitted(page: Page, pattern: str) -> None:
    """Wait for the page a form submit leads to; when it is not the one expected, say what the page said."""
    try:
        await page.wait_for_url(re.compile(pattern), timeout=15_000)
    except Exception:
        said = await page.locator(".alert, .notice, .field-error:not(:empty)").all_inner_texts()
        raise AssertionError(f"still on {page.url}: {said}") from None


async def read_bytes(download: Any) -> bytes:
    return await asyncio.to_thread(Path(await download.path()).read_bytes)


async def mails_to(sink: MailSink, address: str, count: int = 1, timeout: float = 30) -> list[EmailMessage]:
    """The sink's messages to `address`, once there are at least `count` (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for path in sink.paths():
            try:
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            except FileNotFoundError:
                continue
            assert isinstance(message, EmailMessage)
            if address in [a.addr_spec for a in message["To"].addresses]:
                found.append(message)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{len(found)} email(s) to {address} in {timeout} s"
        await asyncio.sleep(0.2)


def plain_text(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def eur(minor: int) -> str:
    return str(format_currency(Decimal(minor) / 100, "EUR", locale="en_US"))


class AdminTab:
    """One signed-in browser tab that remembers script errors, CSP violations and dialogs."""

    def __init__(self, context: BrowserContext, page: Page) -> None:
        self.context = context
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(f"pageerror: {err}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        # A 4xx the page shows (a form with its errors) is logged by Chromium as a failed load.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)  # an alert() would be the XSS payload running
        asyncio.ensure_future(dialog.dismiss())

    async def check(self, name: str) -> None:
        """axe-core (serious and critical), no script ran from data, a screenshot."""
        page = self.page
        await page.wait_for_load_state("load")
        await page.evaluate(AXE.read_text(encoding="utf-8"))
        violations = await page.evaluate(
            """async () => {
                const result = await axe.run(document, {resultTypes: ["violations"]});
                return result.violations.filter(v => v.impact === "serious" || v.impact === "critical")
                    .map(v => `${v.id} (${v.impact}): ${v.help} -> ${v.nodes.map(n => n.target.join(" ")).join(", ")}`);
            }"""
        )
        assert violations == [], f"{name}: {violations}"
        assert self.dialogs == [], f"{name}: a dialog opened: {self.dialogs}"
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\n[admin UI] screenshots in {ARTIFACTS}")
    return ARTIFACTS


async def new_tab(browser: Browser, base_url: str) -> AdminTab:  # noqa: F811
    context = await browser.new_context(base_url=base_url, locale="en-US", timezone_id="UTC", accept_downloads=True,
                                        viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    return AdminTab(context, await context.new_page())


@pytest.fixture(scope="module")
async def tab(browser: Browser, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints,  # noqa: F811
              artifacts: Path) -> AsyncIterator[AdminTab]:
    """The admin's tab, signed in through the sign-in page (which the first test checks)."""
    t = await new_tab(browser, stack[GATEWAY].url)
    page = t.page
    await page.goto("/admin/invoices")
    await page.wait_for_url(re.compile(r"/admin/login\?next=%2Fadmin%2Finvoices$"))
    await t.check("01-sign-in")
    await page.get_by_label("Email").fill(ADMIN)
    await page.get_by_label("Password").fill("not-the-password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_test_id("login-error")).to_have_text("Wrong email or password.")
    await page.get_by_label("Password").fill(infra_endpoints.admin_password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(re.compile(r"/admin/invoices$"))
    yield t
    assert t.errors == [], t.errors
    await t.context.close()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What one test leaves for the next (the module runs in order: one agency month)."""
    return {}


async def test_sign_in_sets_a_strict_session_cookie(tab: AdminTab) -> None:
    cookies = {c["name"]: c for c in await tab.context.cookies()}
    session = cookies["admin_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax" and session["path"] == "/admin"
    assert cookies["admin_csrf"]["httpOnly"]
    assert "accessToken" not in tab.page.url
    await tab.check("02-invoices-empty")


async def test_create_a_client_whose_name_is_a_script(tab: AdminTab, state: dict[str, Any]) -> None:
    page = tab.page
    await page.get_by_role("link", name="Clients", exact=True).click()
    await page.wait_for_url(re.compile(r"/admin/clients$"))
    await page.get_by_test_id("new-client").click()
    name = f"{XSS} {uuid.uuid4().hex[:6]}"
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("Email").fill("ap@script.example.com")
    await page.get_by_label("Currency").select_option("EUR")
    await tab.check("03-new-client")
    await page.get_by_test_id("create-client").click()
    await page.wait_for_url(re.compile(r"/admin/clients/[0-9a-f-]{36}\?created=1$"))
    await expect(page.get_by_test_id("client-title")).to_have_text(name)
    state["client_id"] = page.url.split("/")[-1].split("?")[0]
    state["client_name"] = name
    await tab.check("04-client")


async def test_a_three_line_invoice_shows_the_servers_totals_as_typed(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    page = tab.page
    await page.get_by_test_id("new-invoice-for-client").click()
    await page.wait_for_url(re.compile(r"/admin/invoices/new\?clientId="))
    await expect(page.get_by_test_id("currency-code")).to_have_text("EUR")
    # Keyboard only: "Add line" with Enter; the new line's description gets the focus.
    for expected in (1, 2):
        await page.get_by_test_id("add-line").focus()
        await page.keyboard.press("Enter")
        await expect(page.get_by_test_id("line")).to_have_count(expected + 1)
        await expect(page.get_by_test_id(f"line-{expected}-description")).to_be_focused()
    lines = [("Design", "10", "95.001", "50", ""), ("Hosting", "1", "20.00", "", ""), ("Support", "2.5", "40", "", "7")]
    for i, (description, quantity, price, discount, rate) in enumerate(lines):
        await page.get_by_test_id(f"line-{i}-description").fill(description)
        await page.get_by_test_id(f"line-{i}-quantity").fill(quantity)
        await page.get_by_test_id(f"line-{i}-unit_price").fill(price)
        await page.get_by_test_id(f"line-{i}-discount").fill(discount)
        await page.get_by_test_id(f"line-{i}-tax_rate").fill(rate)
    # 95.001 EUR is refused next to its field, in plain words.
    await expect(page.get_by_test_id("error-line-0-unit_price")).to_have_text(
        "EUR has 2 decimals at most: 95.001 has more.")
    await expect(page.get_by_test_id("totals-pending")).to_be_visible()
    await tab.check("05-new-invoice-error")
    await page.get_by_test_id("line-0-unit_price").fill("95.00")
    await page.get_by_test_id("invoice-discount").fill("10")
    await page.get_by_test_id("discount-kind").select_option("percent")
    await page.get_by_test_id("invoice-tax-rate").fill("19")
    await page.get_by_test_id("due-date").fill("2030-01-31")
    await page.get_by_test_id("project").fill("Website relaunch")
    await page.get_by_label("Notes").fill(XSS)
    # 900 + 20 + 100 = 1020.00; 10 % off (102.00, shared 90/2/10); tax 19 % on 810 and 18, 7 % on 90.
    await expect(page.get_by_test_id("error-line-0-unit_price")).to_have_text("")
    await expect(page.get_by_test_id("subtotal")).to_have_text(eur(102_000))
    await expect(page.get_by_test_id("discount-amount")).to_have_text(eur(10_200))
    await expect(page.get_by_test_id("tax-amount")).to_have_text(eur(16_362))
    await expect(page.get_by_test_id("total")).to_have_text(eur(108_162))
    await expect(page.get_by_test_id("line-0-amount")).to_have_text(eur(90_000))
    await tab.check("06-new-invoice-totals")
    await page.get_by_test_id("save-draft").click()
    await page.wait_for_url(re.compile(r"/admin/invoices/[0-9a-f-]{36}\?saved=1$"))
    invoice_id = page.url.split("/")[-1].split("?")[0]
    stored = (await admin.get(f"/api/invoices/{invoice_id}")).json()
    assert (stored["subtotal"], stored["discountAmount"], stored["taxAmount"], stored["total"]) == (
        102_000, 10_200, 16_362, 108_162)
    assert [i["unitPrice"] for i in stored["items"]] == [9_500, 2_000, 4_000]
    await expect(page.get_by_test_id("total")).to_have_text(eur(108_162))
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "DRAFT")
    await expect(page.get_by_test_id("notes")).to_have_text(XSS)
    state["invoice_id"] = invoice_id
    await tab.check("07-draft")


async def test_edit_the_draft(tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient) -> None:
    page = tab.page
    await page.get_by_test_id("edit").click()
    await page.wait_for_url(re.compile(r"/edit$"))
    await expect(page.get_by_test_id("line-0-unit_price")).to_have_value("95.00")
    await page.get_by_test_id("line-1-quantity").fill("2")
    # 1040.00 - 104.00 + (153.90 + 6.84 + 6.30) = 1103.04
    await expect(page.get_by_test_id("total")).to_have_text(eur(110_304))
    await tab.check("08-edit")
    await page.get_by_test_id("save-draft").click()
    await page.wait_for_url(re.compile(r"\?saved=1$"))
    await expect(page.get_by_test_id("total")).to_have_text(eur(110_304))
    assert (await admin.get(f"/api/invoices/{state['invoice_id']}")).json()["total"] == 110_304


async def test_send_it_after_confirming_and_see_its_number(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    page = tab.page
    await page.get_by_test_id("send").click()
    await expect(page.get_by_test_id("confirm-send")).to_be_visible()
    assert (await admin.get(f"/api/invoices/{state['invoice_id']}")).json()["status"] == "DRAFT"  # not yet
    await tab.check("09-confirm-send")
    await page.get_by_test_id("confirm-send-button").click()
    await page.wait_for_url(re.compile(r"\?sent=1$"))
    number = (await admin.get(f"/api/invoices/{state['invoice_id']}")).json()["invoiceNumber"]
    assert re.fullmatch(r"\d{4}-\d{4,}", number)
    await expect(page.get_by_test_id("invoice-number")).to_have_text(number)
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "SENT")
    await expect(page.get_by_test_id("edit")).to_have_count(0)  # read-only now
    state["number"] = number


async def test_record_payments_partial_then_the_rest_and_an_overpayment_refused(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    page = tab.page
    await page.get_by_test_id("pay-amount").fill("2000.00")
    await page.get_by_test_id("record-payment").click()
    await expect(page.get_by_test_id("error-amount")).to_have_text(f"That is more than the {eur(110_304)} still due.")
    await tab.check("10-overpayment")
    await page.get_by_label("Amount").fill("500.00")
    await page.get_by_label("Method").select_option("bank_transfer")
    await page.get_by_label("Reference").fill("TX-0001")
    await page.get_by_test_id("record-payment").click()
    await page.wait_for_url(re.compile(r"\?paid=1$"))
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "PARTIAL")
    await expect(page.get_by_test_id("amount-due")).to_have_text(eur(60_304))
    await tab.check("11-partial")
    await page.get_by_label("Amount").fill("603.04")
    await page.get_by_label("Method").select_option("cash")
    await page.get_by_test_id("record-payment").click()
    await page.wait_for_url(re.compile(r"\?paid=1$"))
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "PAID")
    await expect(page.get_by_test_id("amount-due")).to_have_text(eur(0))
    await expect(page.get_by_test_id("payment-row")).to_have_count(2)
    await expect(page.get_by_test_id("payment-history")).to_contain_text("TX-0001")
    await expect(page.get_by_test_id("timeline")).to_contain_text(f"Sent as {state['number']}")
    await expect(page.get_by_test_id("timeline")).to_contain_text("Paid in full")
    await expect(page.get_by_test_id("pay-amount")).to_have_count(0)
    done = await wait_until(admin, f"/api/invoices/{state['invoice_id']}", lambda b: b["status"] == "PAID")
    assert done["amountPaid"] == 110_304
    await tab.check("12-paid")

    async with page.expect_download() as info:
        await page.get_by_test_id("download-pdf").click()
    download = await info.value
    assert (await read_bytes(download)).startswith(b"%PDF-")
    assert download.suggested_filename.endswith(".pdf")


async def test_the_list_filters_searches_sorts_and_pages(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    for i in range(21):
        item = {"description": f"Extra {i}", "unitPrice": 100 + i}
        created = await admin.post("/api/invoices", json={"clientId": state["client_id"], "items": [item]})
        assert created.status_code == 201
        state["draft_id"] = created.json()["id"]
    page = tab.page
    await page.goto(f"/admin/invoices?clientId={state['client_id']}")
    rows = page.get_by_test_id("invoice-row")
    await expect(rows).to_have_count(20)
    await expect(page.get_by_test_id("page-info")).to_have_text("22 in all")
    await expect(rows.first).to_contain_text(state["client_name"])  # the script name, as text
    await tab.check("13-invoice-list")
    await page.get_by_test_id("next-page").click()
    await page.wait_for_url(re.compile(r"cursor="))
    await expect(rows).to_have_count(2)
    await page.go_back()
    await expect(rows).to_have_count(20)
    await page.get_by_label("Status").select_option("PAID")
    await page.wait_for_url(re.compile(r"status=PAID"))
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(state["number"])
    await page.get_by_label("Status").select_option("")
    await page.get_by_label("Number").fill(state["number"])
    await page.wait_for_url(re.compile(r"number="))
    await expect(rows).to_have_count(1)
    await page.get_by_label("Number").fill("")
    # The number filter is sent 400 ms after typing stops: wait for it, so the history is what the
    # test says (without this, its late request raced the sort and the next test's navigation).
    await page.wait_for_url(re.compile(r"number=(&|$)"))
    await expect(rows).to_have_count(20)
    await page.get_by_label("Sort").select_option("total")
    await page.wait_for_url(re.compile(r"sort=total"))
    await expect(rows.first).to_contain_text(eur(100))
    await page.go_back()  # the back button returns to the previous filters
    await page.wait_for_url(re.compile(r"sort=-createdAt"))
    await expect(rows).to_have_count(20)
    await expect(page.get_by_label("Sort")).to_have_value("-createdAt")
    await page.wait_for_load_state("networkidle")


async def test_the_template_preview_is_the_real_pdf_and_saving_makes_a_version(
    tab: AdminTab, admin: httpx.AsyncClient
) -> None:
    page = tab.page
    before = (await admin.get("/api/invoice-template")).json()
    try:
        await page.goto("/admin/template")
    except PlaywrightError as exc:  # a navigation the previous page still had pending
        if "interrupted by another navigation" not in str(exc):
            raise
        await page.goto("/admin/template")
    frame = page.get_by_test_id("preview-frame")
    first_src = await frame.get_attribute("src")
    assert first_src
    company = f"Preview Studio {uuid.uuid4().hex[:6]}"
    await page.get_by_test_id("company_name").fill(company)
    await expect(frame).not_to_have_attribute("src", first_src)
    src = await frame.get_attribute("src")
    assert src
    pdf = await page.request.get(src)
    assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(await pdf.body())).pages)
    assert company in text
    await page.get_by_test_id("brand_color").fill("#ff0000")
    await page.get_by_test_id("company_name").fill("")
    await expect(page.get_by_test_id("error-company_name")).to_have_text(
        "Enter the company name printed on the invoices.")
    await page.get_by_test_id("company_name").fill(company)
    await expect(page.get_by_test_id("preview-frame")).to_be_visible()
    await tab.check("14-template")
    await page.get_by_test_id("save-template").click()
    await page.wait_for_url(re.compile(r"/admin/template\?saved=\d+$"))
    after = (await admin.get("/api/invoice-template")).json()
    assert after["version"] == before["version"] + 1 and after["companyName"] == company
    assert after["brandColor"].lower() == "#ff0000"
    await expect(page.get_by_test_id("notice")).to_contain_text(f"version {after['version']}")
    # Put the branding back for the rest of the session (a newer version with the old settings).
    restore = {k: v for k, v in before.items() if k not in ("version", "createdAt", "createdBy", "logo")}
    assert (await admin.put("/api/invoice-template", json=restore)).status_code == 200


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def pdf_image_count(data: bytes) -> int:
    return sum(len(p.images) for p in PdfReader(io.BytesIO(data)).pages)


async def test_a_logo_upload_shows_in_the_preview_and_bad_files_are_refused_plainly(
    tab: AdminTab, admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    page = tab.page
    before = (await admin.get("/api/invoice-template")).json()
    if before["logo"] is not None:  # start without one: the preview must gain the image
        restore = {k: v for k, v in before.items() if k not in ("version", "createdAt", "createdBy", "logo")}
        assert (await admin.put("/api/invoice-template", json=restore | {"removeLogo": True})).status_code == 200
    await page.goto("/admin/template")
    src = await page.get_by_test_id("preview-frame").get_attribute("src")
    assert src
    assert pdf_image_count(await (await page.request.get(src)).body()) == 0
    await expect(page.get_by_test_id("current-logo")).to_have_count(0)

    # Not an image: a plain sentence next to the field, the page itself (no 500, no JSON).
    notes = tmp_path / "notes.txt"
    notes.write_text("not a logo")
    await page.get_by_test_id("logo-file").set_input_files(str(notes))
    await page.get_by_test_id("upload-logo").click()
    await expect(page.get_by_test_id("error-logo")).to_have_text(
        "This file is not an image the invoices can show: choose a PNG, JPEG or SVG file.")
    fake = tmp_path / "fake.png"  # named and typed as a PNG, but not one
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    await page.get_by_test_id("logo-file").set_input_files(str(fake))
    await page.get_by_test_id("upload-logo").click()
    await expect(page.get_by_test_id("error-logo")).to_have_text(
        "This file could not be read as a PNG, JPEG or SVG image: choose another file.")
    await tab.check("14b-logo-refused")
    # Too large: said before anything is sent.
    big = tmp_path / "big.png"
    big.write_bytes(png(16, 16) + b"\0" * (1024 * 1024))
    await page.get_by_test_id("logo-file").set_input_files(str(big))
    await page.get_by_test_id("upload-logo").click()
    await expect(page.get_by_test_id("error-logo")).to_have_text("The logo may be 1 MB at most: choose a smaller file.")
    assert (await admin.get("/api/invoice-template")).json()["logo"] is None
    # ... and refused by the server too when a script sends it anyway (a page, not a 500).
    csrf = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    sent = await page.request.post("/admin/template/logo", headers={"X-CSRF-Token": csrf}, multipart={
        "logo": {"name": "big.png", "mimeType": "image/png", "buffer": big.read_bytes()}})
    assert sent.status == 422 and "The logo may be 1 MB at most" in await sent.text()

    logo = tmp_path / "logo.png"
    logo.write_bytes(png(120, 40))
    await page.get_by_test_id("logo-file").set_input_files(str(logo))
    await page.get_by_test_id("upload-logo").click()
    await page.wait_for_url(re.compile(r"/admin/template\?saved=\d+&logo=1$"))
    await expect(page.get_by_test_id("notice")).to_contain_text("Logo uploaded")
    after = (await admin.get("/api/invoice-template")).json()
    assert after["logo"] is not None and after["logo"]["width"] == 120
    thumbnail = page.get_by_test_id("current-logo")
    await expect(thumbnail).to_be_visible()
    assert await thumbnail.evaluate("img => img.complete && img.naturalWidth") == 120
    src = await page.get_by_test_id("preview-frame").get_attribute("src")
    assert src
    preview = await page.request.get(src)
    assert preview.status == 200 and pdf_image_count(await preview.body()) >= 1  # the preview shows it
    await tab.check("14c-logo")
    restore = {k: v for k, v in after.items() if k not in ("version", "createdAt", "createdBy", "logo")}
    assert (await admin.put("/api/invoice-template", json=restore | {"removeLogo": True})).status_code == 200


async def test_plans_and_a_subscription_with_a_previewed_plan_change(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    page = tab.page
    plans = {}
    for name, amount in (("Basic", "10.00"), ("Pro", "30.00")):
        await page.goto("/admin/plans/new")
        plan_name = f"{name} {uuid.uuid4().hex[:4]}"
        await page.get_by_test_id("plan-name").fill(plan_name)
        await page.get_by_test_id("price-0-currency").fill("EUR")
        await page.get_by_test_id("price-0-amount").fill(amount)
        await page.get_by_test_id("price-0-interval").select_option("month")
        if name == "Basic":
            await tab.check("15-new-plan")
        await page.get_by_test_id("create-plan").click()
        await page.wait_for_url(re.compile(r"/admin/plans/[0-9a-f-]{36}\?created=1$"))
        await expect(page.get_by_test_id("plan-title")).to_have_text(plan_name)
        plans[name] = plan_name
    await page.goto("/admin/plans")
    await expect(page.get_by_test_id("plan-table")).to_contain_text(plans["Pro"])
    await tab.check("16-plans")

    await page.goto(f"/admin/subscriptions/new?clientId={state['client_id']}")
    price = page.get_by_test_id("sub-price")
    basic_option = await price.locator("option", has_text=plans["Basic"]).get_attribute("value")
    await price.select_option(basic_option)
    await page.get_by_test_id("sub-collection").select_option("send_invoice")
    await tab.check("17-new-subscription")
    await page.get_by_test_id("create-subscription").click()
    await submitted(page, r"/admin/subscriptions/[0-9a-f-]{36}\?created=1$")
    sub_id = page.url.split("/")[-1].split("?")[0]
    await expect(page.get_by_test_id("subscription-title")).to_have_text(plans["Basic"])
    await expect(page.get_by_test_id("sub-mrr")).to_have_text(eur(1_000))

    change = page.get_by_test_id("change-price")
    pro_option = await change.locator("option", has_text=plans["Pro"]).get_attribute("value")
    await change.select_option(pro_option)
    await page.get_by_test_id("preview-change").click()
    await expect(page.get_by_test_id("change-preview")).to_be_visible()
    preview = (await admin.get(f"/api/subscriptions/{sub_id}/change-preview",
                               params={"priceId": pro_option, "quantity": 1})).json()
    await expect(page.get_by_test_id("amount-due-now")).to_have_text(eur(preview["amountDueNow"]))
    await tab.check("18-change-preview")
    await page.get_by_test_id("confirm-change").click()
    await submitted(page, r"\?changed=1$")
    changed = (await admin.get(f"/api/subscriptions/{sub_id}")).json()
    assert changed["priceId"] == pro_option
    await expect(page.get_by_test_id("subscription-title")).to_have_text(plans["Pro"])

    await page.get_by_test_id("cancel-subscription").click()
    await submitted(page, r"\?canceled=1$")
    await expect(page.get_by_test_id("sub-ends")).to_be_visible()
    assert (await admin.get(f"/api/subscriptions/{sub_id}")).json()["cancelAtPeriodEnd"] is True
    await page.get_by_test_id("resume").click()
    await submitted(page, r"\?resumed=1$")
    assert (await admin.get(f"/api/subscriptions/{sub_id}")).json()["cancelAtPeriodEnd"] is False
    await tab.check("19-subscription")
    await page.goto("/admin/subscriptions")
    await expect(page.locator(f'[data-subscription-id="{sub_id}"]')).to_contain_text(state["client_name"])
    await tab.check("20-subscriptions")


async def test_the_dashboard_shows_the_reporting_apis_figures(tab: AdminTab, admin: httpx.AsyncClient) -> None:
    page = tab.page
    cells = ("collected", "outstanding", "overdue", "mrr")
    keys = ("collectedThisMonth", "outstanding", "overdue", "mrr")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:  # the reporting read models follow Kafka: compare once both sides agree on a moment
        api_row = next((r for r in (await admin.get("/api/reports/summary")).json()["currencies"]
                        if r["currency"] == "EUR"), None)
        await page.goto("/admin")
        row = page.locator('[data-testid="summary-row"][data-currency="EUR"]')
        shown = [await row.get_by_test_id(c).get_attribute("data-minor") for c in cells] if await row.count() else []
        expected = [str(api_row[k]) for k in keys] if api_row else []
        again = next((r for r in (await admin.get("/api/reports/summary")).json()["currencies"]
                      if r["currency"] == "EUR"), None)
        if api_row and api_row == again and shown == expected and api_row["collectedThisMonth"] >= 110_304:
            break
        assert loop.time() < deadline, f"dashboard {shown} vs API {api_row}"
        await asyncio.sleep(0.5)
    for cell, key in zip(cells, keys, strict=True):
        assert api_row is not None
        await expect(row.get_by_test_id(cell)).to_contain_text(eur(api_row[key]))
    await expect(page.get_by_test_id("methods-table")).to_contain_text("Bank transfer")
    await expect(page.locator("canvas[data-chart]").first).to_have_attribute("data-drawn", "1")
    await tab.check("21-dashboard")


async def test_reports_download_csv_and_excel(tab: AdminTab) -> None:
    page = tab.page
    await page.goto("/admin/reports")
    await tab.check("22-reports")
    async with page.expect_download() as info:
        await page.get_by_test_id("csv-summary").click()
    csv = (await read_bytes(await info.value)).decode("utf-8-sig")
    assert "EUR" in csv
    async with page.expect_download() as info:
        await page.get_by_test_id("xlsx-payment-methods").click()
    download = await info.value
    assert download.suggested_filename.endswith(".xlsx")
    assert (await read_bytes(download)).startswith(b"PK")  # a zip: an xlsx workbook


async def test_cancel_an_invoice_after_confirming(tab: AdminTab, state: dict[str, Any],
                                                 admin: httpx.AsyncClient) -> None:
    page = tab.page
    await page.goto(f"/admin/invoices/{state['draft_id']}")
    await page.get_by_test_id("cancel-invoice").click()
    await expect(page.get_by_test_id("confirm-cancel")).to_be_visible()
    await tab.check("23-confirm-cancel")
    await page.get_by_test_id("confirm-cancel-button").click()
    await submitted(page, r"\?cancelled=1$")
    await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "CANCELLED")
    await expect(page.get_by_test_id("cancel-invoice")).to_have_count(0)
    assert (await admin.get(f"/api/invoices/{state['draft_id']}")).json()["status"] == "CANCELLED"


async def test_payments_emails_and_reminders_pages(tab: AdminTab, state: dict[str, Any]) -> None:
    page = tab.page
    await page.goto("/admin/payments")
    await expect(page.get_by_test_id("payment-table")).to_contain_text("TX-0001")
    await page.get_by_label("Method").select_option("cash")
    await page.wait_for_url(re.compile(r"method=cash"))
    await expect(page.get_by_test_id("payment-table")).not_to_contain_text("TX-0001")
    await tab.check("24-payments")
    for _ in range(30):  # the invoice email is sent by the notifications service, after Kafka
        await page.goto("/admin/emails")
        if await page.get_by_test_id("email-table").filter(has_text=state["number"]).count():
            break
        await asyncio.sleep(0.5)
    await expect(page.get_by_test_id("email-table")).to_contain_text(state["number"])
    await tab.check("25-emails")
    await page.goto("/admin/reminders")
    await page.get_by_test_id("run-reminders").click()
    await expect(page.get_by_test_id("reminders-result")).to_contain_text("queued as of")
    await tab.check("26-reminders")


async def test_invite_to_portal_emails_a_one_time_password_link_once(
    tab: AdminTab, state: dict[str, Any], browser: Browser, stack: dict[str, ServiceProcess],  # noqa: F811
    fresh_mail_sink: MailSink, admin: httpx.AsyncClient,
) -> None:
    page = tab.page
    await page.goto(f"/admin/clients/{state['client_id']}")
    email = f"invited-{uuid.uuid4().hex[:6]}@script.example.com"
    await page.get_by_test_id("invite-email").fill(email)
    await page.get_by_test_id("invite").click()
    await expect(page.get_by_test_id("invite-emailed")).to_have_attribute("data-outcome", "sent")
    await expect(page.get_by_test_id("invite-emailed")).to_have_text(f"Invitation emailed to {email}.")
    link = await page.get_by_test_id("invite-link").input_value()
    assert link.startswith(f"{stack[GATEWAY].url}/admin/invite/")
    await expect(page.get_by_test_id("client-invoices")).to_be_visible()  # its invoices (20 newest) beside it
    await expect(page.get_by_role("link", name=re.compile(r"^All \d+ invoices$"))).to_be_visible()
    await tab.check("27-invite")

    # The email: to the client's new login, in the client's (script) name as text, with the link.
    [mail] = await mails_to(fresh_mail_sink, email)
    assert "client portal" in mail["Subject"] and mail["X-Billing-Kind"] == "portal_invitation"
    assert mail["To"].addresses[0].display_name == state["client_name"]
    text = plain_text(mail)
    assert f"Set your password: {link}" in text
    assert f"{stack[GATEWAY].url}/portal" in text
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert f'href="{link}"' in html and "<script>" not in html

    # A repeated click sends nothing new: the same link, the one message of the log, one email.
    await page.get_by_test_id("invite").click()
    await expect(page.get_by_test_id("invite-emailed")).to_have_attribute("data-outcome", "already")
    assert await page.get_by_test_id("invite-link").input_value() == link
    logged = await wait_until(admin, f"/api/notifications?kind=portal_invitation&recipient={email}",
                              lambda b: b["total"] == 1 and b["items"][0]["status"] == "sent")
    assert logged["items"][0]["recipient"] == email
    assert len(await mails_to(fresh_mail_sink, email)) == 1
    await page.goto("/admin/emails?kind=portal_invitation")
    await expect(page.get_by_test_id("email-table")).to_contain_text(email)
    # Audited once each: the login the page created (in its transaction) and the emailed invitation.
    made = []
    for action in ("user.create", "client.invite"):
        entries = (await admin.get("/api/audit", params={"action": action, "limit": 100})).json()["items"]
        made += [(e["action"], e["outcome"], e["path"]) for e in entries
                 if ((e["summary"] or {}).get("body") or {}).get("email") == email]
    invite_page = f"/admin/clients/{state['client_id']}/invite"
    assert sorted(made) == [("client.invite", "succeeded", "/api/notifications/invitations")] * 2 + [
        ("user.create", "succeeded", invite_page)], made

    guest = await new_tab(browser, stack[GATEWAY].url)
    try:
        await guest.page.goto(link)
        await guest.page.get_by_test_id("new-password").fill(CLIENT_PASSWORD)
        await guest.page.get_by_test_id("repeat-password").fill(CLIENT_PASSWORD)
        await guest.check("28-set-password")
        await guest.page.get_by_test_id("set-password").click()
        await expect(guest.page.get_by_test_id("invite-done")).to_be_visible()
        await guest.page.goto(link)  # one time only
        await expect(guest.page.get_by_test_id("invite-invalid")).to_be_visible()
        async with httpx.AsyncClient(base_url=stack[GATEWAY].url) as http:
            login = await http.post("/api/auth/login", json={"email": email, "password": CLIENT_PASSWORD})
        assert login.status_code == 200 and login.json()["user"]["clientId"] == state["client_id"]
        state["client_email"] = email
        assert guest.errors == []
    finally:
        await guest.context.close()


async def test_a_client_login_is_refused_and_sent_to_the_portal(
    state: dict[str, Any], browser: Browser, stack: dict[str, ServiceProcess]  # noqa: F811
) -> None:
    guest = await new_tab(browser, stack[GATEWAY].url)
    try:
        page = guest.page
        await page.goto("/admin/login")
        await page.get_by_label("Email").fill(state["client_email"])
        await page.get_by_label("Password").fill(CLIENT_PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_test_id("forbidden")).to_be_visible()
        assert not any(c["name"] == "admin_session" for c in await guest.context.cookies())
        await guest.check("29-client-refused")
        await page.get_by_test_id("portal-link").click()
        await page.wait_for_url(re.compile(r"/portal/"))
        response = await page.goto("/admin/invoices")
        assert response is not None and "/admin/login" in page.url  # no admin session was given
        assert guest.errors == []
    finally:
        await guest.context.close()


async def test_the_script_name_is_inert_on_every_page(tab: AdminTab, state: dict[str, Any]) -> None:
    page = tab.page
    for path in (f"/admin/clients/{state['client_id']}", "/admin/clients", "/admin/invoices",
                 f"/admin/invoices/{state['invoice_id']}", "/admin/payments", "/admin/subscriptions",
                 f"/admin/invoices/new?clientId={state['client_id']}"):
        await page.goto(path)
        await expect(page.locator("main")).to_contain_text(XSS)
        assert await page.locator("main script").count() == 0, path
    assert tab.dialogs == []


async def test_the_client_pickers_search_finds_clients_beyond_the_first_page(
    tab: AdminTab, state: dict[str, Any], admin: httpx.AsyncClient
) -> None:
    """Last in the module: it adds more clients than the picker's page (100) holds."""
    tag = uuid.uuid4().hex[:6]
    target = (await admin.post("/api/clients", json={
        "name": f"Zephyr {tag} GmbH", "email": f"ap-{tag}@zephyr.example.com", "currency": "CHF"})).json()
    for i in range(101):  # the target is older than the newest 100: not in the picker until searched for
        created = await admin.post("/api/clients", json={"name": f"Filler {tag} {i:03d}",
                                                         "email": f"filler-{i}@example.com"})
        assert created.status_code == 201
    page = tab.page
    await page.goto("/admin/invoices/new")
    picker = page.get_by_test_id("client")
    await expect(picker.locator(f'option[value="{target["id"]}"]')).to_have_count(0)

    await page.get_by_test_id("client-search").fill(f"zephyr {tag}")  # any case
    await expect(picker.locator("option")).to_have_count(2)  # "Choose a client…" and the one match
    await expect(page.get_by_test_id("client-search-status")).to_have_text(f"1 client matches “zephyr {tag}”.")
    await picker.select_option(target["id"])
    await expect(page.get_by_test_id("currency-code")).to_have_text("CHF")  # the form follows the choice
    await tab.check("30-client-search")
    # By email, and the chosen client stays chosen while searching on.
    await page.get_by_test_id("client-search").fill(f"ap-{tag}@")
    await expect(picker.locator("option")).to_have_count(2)
    await page.get_by_test_id("client-search").fill(f"filler {tag} 00")
    await expect(page.get_by_test_id("client-search-status")).to_have_text(f"10 clients match “filler {tag} 00”.")
    await expect(picker).to_have_value(target["id"])
    await page.get_by_test_id("client-search").fill("no such client at all")
    await expect(page.get_by_test_id("client-search-status")).to_have_text("No client matches “no such client at all”.")
    # A script name found by search is text in the options.
    await page.get_by_test_id("client-search").fill(state["client_name"][-6:])
    await expect(picker.locator("option", has_text=XSS)).to_have_count(1)
    assert tab.dialogs == []

    await page.goto("/admin/subscriptions/new")
    sub_picker = page.get_by_test_id("sub-client")
    await page.get_by_test_id("client-search").fill(f"Zephyr {tag}")
    await expect(sub_picker.locator(f'option[value="{target["id"]}"]')).to_have_count(1)
    await sub_picker.select_option(target["id"])
    await expect(sub_picker).to_have_value(target["id"])
    await tab.check("31-subscription-client-search")
