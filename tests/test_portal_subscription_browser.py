"""The client portal's Subscription page in a real browser against the whole stack (issue 9, point 10).

Headless Chromium (the fixtures of tests/test_portal_browser.py) signs in as a client, subscribes
through the Stripe stand-in's hosted Checkout, sees the trial; the admin advances the platform's test
clock past it through the gateway; the page shows the subscription active and the first invoice
arrives numbered and PAID in the portal with its email; an upgrade shows Stripe's preview before it
is confirmed; cancel at period end and resume; "Manage billing" opens the stand-in's billing portal.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx

import tests.test_portal_browser as portal_browser
from deploy.infra import MailSink, ServiceProcess, StripeStandin
from tests.conftest import wait_until
from tests.test_portal_browser import CHECKOUT_PAGE, PASSWORD, Tab

# The browser and a fresh tab per test, as the invoice pages' browser tests have them.
browser = portal_browser.browser
tab = portal_browser.tab

with contextlib.suppress(ImportError):  # else the `browser` fixture fails the test with what to install
    from playwright.async_api import Request, expect


def _day(value: str) -> str:
    """A moment as the page shows it in en-US, UTC: "Mar 1, 2026"."""
    moment = datetime.fromisoformat(value)
    return f"{moment:%b} {moment.day}, {moment.year}"


async def _plans(admin: httpx.AsyncClient, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    basic = await admin.post("/api/plans", json={
        "name": f"Care {tag}", "description": "Updates & <b>backups</b>", "features": ["Monitoring", "Backups"],
        "prices": [{"currency": "EUR", "amount": 10_000, "interval": "month", "trialDays": 14}],
    })
    assert basic.status_code == 201, basic.text
    plus = await admin.post("/api/plans", json={
        "name": f"Care Plus {tag}", "prices": [{"currency": "EUR", "amount": 30_000, "interval": "month"}],
    })
    assert plus.status_code == 201, plus.text
    return basic.json()["prices"][0], plus.json()["prices"][0]


async def _client(admin: httpx.AsyncClient, tag: str) -> tuple[dict[str, Any], str]:
    client = (await admin.post("/api/clients", json={
        "name": f"Subscriber {tag}", "email": f"billing-{tag}@subscriber.example.com", "currency": "EUR",
    })).json()
    email = f"portal-{tag}@subscriber.example.com"
    created = await admin.post("/api/users", json={"email": email, "password": PASSWORD, "role": "client",
                                                   "clientId": client["id"]})
    assert created.status_code == 201, created.text
    return client, email


async def _mail_to(sink: MailSink, address: str, predicate: Any, timeout: float = 30) -> EmailMessage:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = [m for m in sink.messages() if address in str(m["To"]) and predicate(str(m["Subject"]))]
        if found:
            return found[0]
        await asyncio.sleep(0.2)
    seen = [(str(m["To"]), str(m["Subject"])) for m in sink.messages() if address in str(m["To"])]
    raise AssertionError(f"no email to {address} matched; saw {seen}")


async def test_subscribe_trial_first_invoice_upgrade_cancel_resume_and_billing_portal(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], tab: Tab, services_standin: StripeStandin,
    mail_sink: MailSink,
) -> None:
    tag = uuid.uuid4().hex[:8]
    basic, plus = await _plans(admin, tag)
    client, email = await _client(admin, tag)
    page = tab.page

    # -- sign in; the navigation leads to the Subscription page, which offers the plans ----------------
    await portal_browser._log_in(tab, email)
    await page.get_by_test_id("nav-subscription").click()
    await page.wait_for_url(re.compile(r"/portal/subscription$"))
    await expect(page.get_by_test_id("plans-section")).to_be_visible()
    await expect(page.get_by_test_id("subscriptions")).to_be_hidden()
    offer = page.locator(f'[data-testid="plan-price"][data-price-id="{basic["id"]}"]')
    await expect(offer).to_contain_text("€100.00 / month")
    await expect(offer).to_contain_text("14-day free trial")
    plan_card = page.locator('[data-testid="plan"]').filter(has=offer)
    await expect(plan_card).to_contain_text("Updates & <b>backups</b>")  # text, never HTML
    await expect(plan_card.get_by_test_id("plan-name")).to_have_text(f"Care {tag}")
    await tab.snap("sub-1-plans")

    # -- Subscribe: one checkout per double click, with an Idempotency-Key; cancel comes back --------
    checkout_calls: list[Request] = []
    page.on("request", lambda r: checkout_calls.append(r)
            if r.url.endswith("/api/subscriptions/checkout") and r.method == "POST" else None)
    await offer.get_by_test_id("subscribe").evaluate("button => { button.click(); button.click(); }")
    await page.wait_for_url(CHECKOUT_PAGE)
    assert len(checkout_calls) == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", checkout_calls[0].headers.get("idempotency-key", ""))
    assert page.url.startswith(f"{services_standin.url}/checkout/")
    checkout_url, session_id = page.url, page.url.rsplit("/", 1)[1]
    await expect(page.get_by_test_id("trial")).to_contain_text("14-day free trial")
    await page.get_by_test_id("cancel").click()
    await page.wait_for_url(re.compile(r"/portal/subscription\?checkout=cancel$"))
    await expect(page.get_by_test_id("checkout-status")).to_contain_text("Checkout cancelled")
    await expect(page.get_by_test_id("plans-section")).to_be_visible()

    # A success redirect nobody paid for (typed or forged) only ever shows "processing", and no plans.
    await page.goto(f"/portal/subscription?checkout=success&session_id={session_id}")
    status = page.get_by_test_id("checkout-status")
    await expect(status).to_contain_text("Processing your subscription")
    await page.wait_for_timeout(3_000)
    await expect(status).to_contain_text("Processing your subscription")
    await expect(page.get_by_test_id("plans-section")).to_be_hidden()
    await tab.snap("sub-2-processing")
    assert (await admin.get("/api/subscriptions", params={"clientId": client["id"]})).json()["items"] == []

    # -- pay on the stand-in's page: back here, "processing" until the webhook-fed mirror has it ------
    await page.goto(checkout_url)
    await page.get_by_test_id("pay").click()
    await page.wait_for_url(re.compile(r"/portal/subscription(\?checkout=success&session_id=cs_[^&]+)?$"))
    await expect(status).to_have_text("Your subscription is confirmed. Thank you!")
    card = page.get_by_test_id("subscription")
    await expect(card).to_have_count(1)
    await expect(card.get_by_test_id("sub-status")).to_have_attribute("data-status", "trialing")
    await expect(card.get_by_test_id("sub-status")).to_have_text("Trial")
    await expect(card.get_by_test_id("sub-plan")).to_have_text(f"Care {tag}")
    [sub] = (await admin.get("/api/subscriptions", params={"clientId": client["id"]})).json()["items"]
    assert sub["status"] == "trialing" and sub["trialEnd"]
    await expect(card.get_by_test_id("sub-trial-end")).to_have_text(_day(sub["trialEnd"]))
    await expect(card.get_by_test_id("sub-next-billing")).to_have_text(_day(sub["trialEnd"]))
    await expect(card.get_by_test_id("sub-next-amount")).to_have_text("€100.00")
    await expect(card.get_by_test_id("sub-access-until")).to_have_text(_day(sub["accessUntil"]))
    await expect(page.get_by_test_id("plans-section")).to_be_hidden()
    await expect(page.get_by_test_id("manage-billing")).to_be_visible()
    await tab.snap("sub-3-trialing")

    # -- the admin advances the platform's test clock past the trial, through the gateway -------------
    trial_end = datetime.fromisoformat(sub["trialEnd"])
    advanced = await admin.post("/api/test-clock/advance",
                                json={"to": (trial_end + timedelta(hours=1)).isoformat()})
    assert advanced.status_code == 200, advanced.text
    active = await wait_until(admin, f"/api/subscriptions/{sub['id']}", lambda b: b["status"] == "active", 60)
    page_of = await wait_until(admin, f"/api/invoices?clientId={client['id']}",
                               lambda b: any(i["stripeInvoiceId"] and i["status"] == "PAID" for i in b["items"]), 60)
    [first] = [i for i in page_of["items"] if i["stripeInvoiceId"]]
    assert re.fullmatch(r"\d{4}-\d{4}", first["invoiceNumber"]) and first["total"] == 10_000

    await page.reload()
    await expect(card.get_by_test_id("sub-status")).to_have_attribute("data-status", "active")
    await expect(card.get_by_test_id("sub-trial-end")).to_have_count(0)
    await expect(card.get_by_test_id("sub-next-billing")).to_have_text(_day(active["currentPeriodEnd"]))
    await expect(card.get_by_test_id("sub-next-amount")).to_have_text("€100.00")

    # The first invoice in the portal's list: numbered and PAID; its email is in the mail sink.
    await page.get_by_test_id("nav-invoices").click()
    await page.wait_for_url(re.compile(r"/portal/invoices$"))
    row = page.locator(f'[data-testid="invoice-row"][data-invoice-id="{first["id"]}"]')
    await expect(row).to_contain_text(first["invoiceNumber"])
    await expect(row.locator(".badge")).to_have_attribute("data-status", "PAID")
    await expect(row).to_contain_text("€100.00")
    mail = await _mail_to(mail_sink, client["email"], lambda subject: first["invoiceNumber"] in subject, 60)
    assert first["invoiceNumber"] in str(mail["Subject"])
    await _mail_to(mail_sink, client["email"], lambda subject: "trial" in subject.lower())
    await tab.snap("sub-4-invoice-paid")

    # -- upgrade: Stripe's preview is shown before anything changes; confirming applies it -----------
    await page.get_by_test_id("nav-subscription").click()
    await page.wait_for_url(re.compile(r"/portal/subscription$"))
    await card.get_by_test_id("change-plan").click()
    await card.get_by_test_id("change-price").select_option(plus["id"])
    change_calls: list[Request] = []
    page.on("request", lambda r: change_calls.append(r) if r.url.endswith("/change") and r.method == "POST" else None)
    await card.get_by_test_id("preview").click()
    box = card.get_by_test_id("preview-box")
    await expect(box).to_be_visible()
    # The clock stands still: the same question asked by the admin gets the same answer, to the cent.
    expected = (await admin.get(f"/api/subscriptions/{sub['id']}/change-preview",
                                params={"priceId": plus["id"], "quantity": 1})).json()
    assert expected["kind"] == "upgrade" and expected["effective"] == "now" and expected["amountDueNow"] > 0
    await expect(box.get_by_test_id("preview-line")).to_have_count(len(expected["lines"]))
    await expect(box.get_by_test_id("preview-due-now")).to_have_text(_eur(expected["amountDueNow"]))
    await expect(box.get_by_test_id("preview-next-total")).to_have_text("€300.00")
    await expect(box.get_by_test_id("preview-effective")).to_contain_text("Upgrade. The change takes effect now.")
    await expect(card.get_by_test_id("sub-plan")).to_have_text(f"Care {tag}")  # nothing changed yet
    assert change_calls == []
    await tab.snap("sub-5-preview")
    await box.get_by_test_id("confirm-change").click()
    await expect(card.get_by_test_id("sub-message")).to_have_text("Your plan has been changed.")
    await expect(card.get_by_test_id("sub-plan")).to_have_text(f"Care Plus {tag}")
    await expect(card.get_by_test_id("sub-price")).to_have_text("€300.00 / month")
    await expect(card.get_by_test_id("sub-next-amount")).to_have_text("€300.00")
    assert len(change_calls) == 1
    sent = change_calls[0].post_data_json
    assert sent == {"priceId": plus["id"], "quantity": 1, "prorationDate": expected["prorationDate"]}
    assert change_calls[0].headers.get("idempotency-key")
    upgraded = (await admin.get(f"/api/subscriptions/{sub['id']}")).json()
    assert upgraded["priceId"] == plus["id"]

    # -- cancel at period end shows it; resume undoes it ----------------------------------------------
    await card.get_by_test_id("cancel").click()
    await expect(card.get_by_test_id("cancel-panel")).to_contain_text(_day(upgraded["currentPeriodEnd"]))
    await card.get_by_test_id("confirm-cancel").click()
    await expect(card.get_by_test_id("sub-message")).to_have_text("Your cancellation is recorded.")
    await expect(card.get_by_test_id("sub-ends-on")).to_have_text(_day(upgraded["currentPeriodEnd"]))
    await expect(card.get_by_test_id("sub-cancel-notice")).to_be_visible()
    await expect(card.get_by_test_id("sub-next-billing")).to_have_count(0)
    await expect(card.get_by_test_id("change-plan")).to_have_count(0)
    assert (await admin.get(f"/api/subscriptions/{sub['id']}")).json()["cancelAtPeriodEnd"] is True
    await tab.snap("sub-6-cancelled")
    await card.get_by_test_id("resume").click()
    await expect(card.get_by_test_id("sub-message")).to_have_text("Your subscription continues.")
    await expect(card.get_by_test_id("sub-ends-on")).to_have_count(0)
    await expect(card.get_by_test_id("cancel")).to_be_visible()
    await expect(card.get_by_test_id("sub-next-billing")).to_have_text(_day(upgraded["currentPeriodEnd"]))
    assert (await admin.get(f"/api/subscriptions/{sub['id']}")).json()["cancelAtPeriodEnd"] is False

    # -- Manage billing opens the stand-in's billing portal, which links back here --------------------
    await page.get_by_test_id("manage-billing").click()
    # The stand-in's billing portal (its own origin; the gateway's pages live under /portal/ too).
    await page.wait_for_url(re.compile(rf"^{re.escape(services_standin.url)}/portal/bps_[^/?]+$"))
    stripe_sub = page.get_by_test_id(f"subscription-{upgraded['stripeSubscriptionId']}")
    await expect(stripe_sub.get_by_test_id("sub-status")).to_have_text("active")
    await tab.snap("sub-7-billing-portal")
    await page.get_by_test_id("return").click()
    await page.wait_for_url(re.compile(r"/portal/subscription$"))
    await expect(card.get_by_test_id("sub-status")).to_have_attribute("data-status", "active")
    assert tab.errors == []  # no script errors, no CSP violations


def _eur(minor: int) -> str:
    return f"€{minor / 100:,.2f}" if minor >= 0 else f"-€{-minor / 100:,.2f}"


async def test_an_admin_sees_the_page_without_the_client_actions(
    admin: httpx.AsyncClient, tab: Tab, infra_endpoints: Any,
) -> None:
    await portal_browser._log_in(tab, "admin@example.com", infra_endpoints.admin_password)
    page = tab.page
    await page.goto("/portal/subscription")
    await expect(page.get_by_test_id("checkout-status")).to_contain_text("Signed in as an admin")
    await expect(page.get_by_test_id("plans-section")).to_be_hidden()
    await expect(page.get_by_test_id("manage-billing")).to_be_hidden()
    await expect(page.get_by_test_id("change-plan")).to_have_count(0)
    assert tab.errors == []
