"""Issue 9 end to end, API only, through the gateway on the real stack (Kafka, PostgreSQL, the Stripe
stand-in in front of stripe-mock, every service as a process): signup through Checkout with a 14-day
trial, trial_will_end email, the first invoice numbered and PAID with a card payment and its email, an
upgrade that costs what its preview said (Stripe's invoice and ours, to the cent), the deployment's
downgrade mode, cancel at period end and at once, a failed renewal and its recovery.

Every subscription lives on the platform's test clock (one for all customers, moved only forward with
POST /api/test-clock/advance), so each test moves it relative to its own subscription's dates.
Conditions are awaited with deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from deploy.infra import MailSink, ServiceProcess, StripeStandin
from deploy.seed import CLIENT_LOGIN, DEMO_CLIENT_EMAIL, DEMO_PLAN, Seeder
from deploy.services import GATEWAY, InfraEndpoints
from tests.conftest import login, wait_until

PASSWORD = "subscriber-pass-123"
NUMBER = re.compile(r"\d{4}-\d{4}")  # our invoice numbers: YYYY-NNNN
DEADLINE = 45.0  # webhook -> payments -> Kafka -> subscriptions / invoice / notifications


@pytest.fixture
async def subscriber(admin: httpx.AsyncClient, stack: dict[str, ServiceProcess]) -> AsyncIterator[dict[str, Any]]:
    """A client of ours (EUR, its own address) with a portal login: {client, http, email}."""
    tag = uuid.uuid4().hex[:8]
    client = (await admin.post("/api/clients", json={
        "name": f"Subscriber {tag}", "email": f"billing-{tag}@e2e-subscriptions.example.com", "currency": "EUR",
    })).json()
    user = f"login-{tag}@e2e-subscriptions.example.com"
    created = await admin.post("/api/users", json={"email": user, "password": PASSWORD, "role": "client",
                                                   "clientId": client["id"]})
    assert created.status_code == 201, created.text
    http = await login(stack[GATEWAY].url, user, PASSWORD)
    yield {"client": client, "http": http, "email": client["email"]}
    await http.aclose()


@pytest.fixture
def stripe_api(services_standin: StripeStandin) -> Callable[[str], Any]:
    """Reads Stripe's side (the stand-in the services talk to), as a person would in Stripe's dashboard."""

    async def get(path: str) -> Any:
        async with httpx.AsyncClient(base_url=services_standin.url, timeout=20,
                                     headers={"Authorization": "Bearer sk_test_local"}) as http:
            response = await http.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    return get


async def _price(admin: httpx.AsyncClient, name: str, amount: int, trial_days: int = 0) -> dict[str, Any]:
    created = await admin.post("/api/plans", json={"name": f"{name} {uuid.uuid4().hex[:6]}", "prices": [
        {"currency": "EUR", "amount": amount, "interval": "month", "trialDays": trial_days}]})
    assert created.status_code == 201, created.text
    return created.json()["prices"][0]  # type: ignore[no-any-return]


async def _advance(admin: httpx.AsyncClient, standin: StripeStandin, to: datetime) -> None:
    """Move the platform's clock (never backwards: another test may have moved it further already)."""
    clock = (await admin.get("/api/test-clock")).json()
    if clock["frozenTime"] and datetime.fromisoformat(clock["frozenTime"]) >= to:
        return
    response = await admin.post("/api/test-clock/advance", json={"to": to.isoformat()})
    assert response.status_code == 200, response.text
    assert await asyncio.to_thread(standin.flush, DEADLINE)  # every webhook of the advance delivered


async def _clock(admin: httpx.AsyncClient) -> datetime:
    return datetime.fromisoformat((await admin.get("/api/test-clock")).json()["frozenTime"])


async def _subscription(http: httpx.AsyncClient, sub_id: str, predicate: Callable[[dict[str, Any]], bool]
                        ) -> dict[str, Any]:
    return await wait_until(http, f"/api/subscriptions/{sub_id}", predicate, DEADLINE)


async def _our_invoices(admin: httpx.AsyncClient, client_id: str,
                        predicate: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The client's invoices that mirror a Stripe invoice, oldest first, once `predicate` holds."""
    def of_stripe(body: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted((i for i in body["items"] if i["stripeInvoiceId"]), key=lambda i: i["createdAt"])

    body = await wait_until(admin, f"/api/invoices?clientId={client_id}&limit=100",
                            lambda b: predicate(of_stripe(b)), DEADLINE)
    return of_stripe(body)


async def _mail(sink: MailSink, address: str, subject: Callable[[str], bool]) -> list[EmailMessage]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        found = [m for m in sink.messages() if address in str(m["To"]) and subject(str(m["Subject"]))]
        if found:
            return found
        if loop.time() > deadline:
            seen = [str(m["Subject"]) for m in sink.messages() if address in str(m["To"])]
            raise AssertionError(f"no email to {address} matched in {DEADLINE}s; got {seen}")
        await asyncio.sleep(0.2)


def _text(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


async def _link_target(message: EmailMessage, label: str) -> str:
    """Where the email's `label: <tracked link>` leads (the link is the notifications service's /t/l/...)."""
    match = re.search(rf"{re.escape(label)}: (\S+)", _text(message))
    assert match, _text(message)
    async with httpx.AsyncClient(timeout=20) as reader:
        response = await reader.get(match.group(1))
    assert response.status_code in (302, 303, 307), response.text
    return response.headers["location"]


async def _checkout_and_pay(me: httpx.AsyncClient, price_id: str) -> None:
    """Signup as the client does it: a Checkout Session, paid on the stand-in's hosted page."""
    checkout = await me.post("/api/subscriptions/checkout", json={"priceId": price_id},
                             headers={"Idempotency-Key": str(uuid.uuid4())})
    assert checkout.status_code == 201, checkout.text
    async with httpx.AsyncClient(timeout=20) as browser:
        paid = await browser.post(f"{checkout.json()['url']}/pay")
    assert paid.status_code == 303  # back to the portal, which waits for the webhook's word
    assert "/portal/subscription?checkout=success&session_id=cs_" in paid.headers["location"]


async def _only_subscription(me: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    page = await wait_until(me, "/api/subscriptions", lambda b: len(b["items"]) == 1 and predicate(b["items"][0]),
                            DEADLINE)
    return page["items"][0]  # type: ignore[no-any-return]


async def _active_subscription(admin: httpx.AsyncClient, client_id: str, price_id: str) -> dict[str, Any]:
    """A subscription the admin sets up, charged at once to the customer's (simulated) card: active."""
    created = await admin.post("/api/subscriptions", json={"clientId": client_id, "priceId": price_id},
                               headers={"Idempotency-Key": str(uuid.uuid4())})
    assert created.status_code == 201, created.text
    return await _subscription(admin, created.json()["id"], lambda s: s["status"] == "active")


async def _card(standin: StripeStandin, customer: str, outcome: str) -> None:
    async with httpx.AsyncClient(base_url=standin.url, timeout=20) as http:
        response = await http.post(f"/_standin/customers/{customer}/card", json={"outcome": outcome})
    assert response.status_code == 200, response.text


def _stripe_amounts(invoice: dict[str, Any]) -> list[int]:
    return sorted(int(line["amount"]) for line in invoice["lines"]["data"])


async def test_signup_trial_first_invoice_paid_and_an_upgrade_that_costs_its_preview(
    admin: httpx.AsyncClient, subscriber: dict[str, Any], services_standin: StripeStandin, mail_sink: MailSink,
    stripe_api: Callable[[str], Any],
) -> None:
    basic = await _price(admin, "Care", 10_000, trial_days=14)
    pro = await _price(admin, "Care Pro", 30_000)
    me, client_id, address = subscriber["http"], subscriber["client"]["id"], subscriber["email"]

    # -- signup with a 14-day trial: granted by the webhook, no invoice during the trial ---------------
    await _checkout_and_pay(me, basic["id"])
    sub = await _only_subscription(me, lambda s: s["status"] == "trialing")
    started = await _clock(admin)
    trial_end = datetime.fromisoformat(sub["trialEnd"])
    assert trial_end == started + timedelta(days=14)
    assert (sub["priceId"], sub["mrr"], sub["accessUntil"]) == (basic["id"], 0, sub["trialEnd"])

    # -- three days before its end, Stripe's trial_will_end: the client is told by email ---------------
    await _advance(admin, services_standin, trial_end - timedelta(days=2))
    notices = await _mail(mail_sink, address, lambda s: "trial" in s.lower() and "ends on" in s)
    # One email; the SMTP sink may see it twice only as a redelivery of the same message (same
    # Message-ID, the documented at-most-once-per-Message-ID guarantee), never as a second email.
    assert len({str(m["Message-ID"]) for m in notices}) == 1, [str(m["Subject"]) for m in notices]
    notice = notices[0]
    assert f"{trial_end:%B} {trial_end.day}, {trial_end.year}" in str(notice["Subject"])
    assert (await _link_target(notice, "Manage your subscription")).endswith("/portal/subscription")
    assert (await _our_invoices(admin, client_id, lambda found: True)) == []

    # -- past the trial: the first invoice, numbered, PAID, a card payment, its email ------------------
    await _advance(admin, services_standin, trial_end + timedelta(hours=1))
    active = await _subscription(me, sub["id"], lambda s: s["status"] == "active")
    assert active["currentPeriodStart"] == sub["trialEnd"] and active["mrr"] == 10_000
    [first] = await _our_invoices(admin, client_id, lambda found: [i["status"] for i in found] == ["PAID"])
    assert NUMBER.fullmatch(first["invoiceNumber"]) and first["total"] == first["amountPaid"] == 10_000
    payments = (await admin.get("/api/payments", params={"invoiceId": first["id"]})).json()["items"]
    assert [(p["amount"], p["method"], p["reference"]) for p in payments] == [
        (10_000, "card", first["stripeInvoiceId"])]
    await _mail(mail_sink, address, lambda s: first["invoiceNumber"] in s)
    stripe_first = await stripe_api(f"/v1/invoices/{first['stripeInvoiceId']}")
    assert (stripe_first["status"], stripe_first["amount_paid"]) == ("paid", 10_000)

    # -- upgrade mid-period: preview == the invoice Stripe issues == our invoice, to the cent -----------
    period_start = datetime.fromisoformat(active["currentPeriodStart"])
    await _advance(admin, services_standin, period_start + timedelta(days=12, hours=5, minutes=7, seconds=3))
    preview = await me.get(f"/api/subscriptions/{sub['id']}/change-preview", params={"priceId": pro["id"]})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert (body["kind"], body["effective"], body["prorationBehavior"]) == ("upgrade", "now", "always_invoice")
    credit, debit = sorted(line["amount"] for line in body["lines"])
    assert credit < 0 < debit and body["amountDueNow"] == credit + debit
    assert 0 < body["amountDueNow"] < 20_000 and body["nextInvoiceTotal"] == 30_000
    changed = await me.post(f"/api/subscriptions/{sub['id']}/change",
                            json={"priceId": pro["id"], "prorationDate": body["prorationDate"]},
                            headers={"Idempotency-Key": str(uuid.uuid4())})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["priceId"], changed.json()["mrr"]) == (pro["id"], 30_000)
    assert changed.json()["currentPeriodEnd"] == active["currentPeriodEnd"]  # the cycle stays
    invoices = await _our_invoices(admin, client_id, lambda found: len(found) == 2 and found[1]["status"] == "PAID")
    upgrade = invoices[1]
    stripe_upgrade = await stripe_api(f"/v1/invoices/{upgrade['stripeInvoiceId']}")
    assert stripe_upgrade["billing_reason"] == "subscription_update"
    assert body["amountDueNow"] == stripe_upgrade["total"] == stripe_upgrade["amount_paid"] == upgrade["total"]
    assert _stripe_amounts(stripe_upgrade) == sorted(line["amount"] for line in body["lines"])
    assert sorted(item["amount"] for item in upgrade["items"]) == sorted(line["amount"] for line in body["lines"])
    assert NUMBER.fullmatch(upgrade["invoiceNumber"]) and upgrade["invoiceNumber"] > first["invoiceNumber"]
    payments = (await admin.get("/api/payments", params={"invoiceId": upgrade["id"]})).json()["items"]
    assert [(p["amount"], p["method"]) for p in payments] == [(body["amountDueNow"], "card")]


async def test_a_downgrade_follows_the_deployments_mode_and_its_renewal_costs_the_preview(
    admin: httpx.AsyncClient, subscriber: dict[str, Any], services_standin: StripeStandin,
    stripe_api: Callable[[str], Any],
) -> None:
    pro = await _price(admin, "Retainer Pro", 30_000)
    basic = await _price(admin, "Retainer", 10_000)
    me, client_id = subscriber["http"], subscriber["client"]["id"]
    sub = await _active_subscription(admin, client_id, pro["id"])
    start, end = datetime.fromisoformat(sub["currentPeriodStart"]), datetime.fromisoformat(sub["currentPeriodEnd"])
    await _our_invoices(admin, client_id, lambda found: [i["status"] for i in found] == ["PAID"])

    # Late in the period, so the credit for the unused time is small beside the renewal.
    await _advance(admin, services_standin, start + (end - start) * 4 / 5)
    preview = await me.get(f"/api/subscriptions/{sub['id']}/change-preview", params={"priceId": basic["id"]})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["kind"] == "downgrade" and body["amountDueNow"] == 0
    changed = await me.post(f"/api/subscriptions/{sub['id']}/change",
                            json={"priceId": basic["id"], "prorationDate": body["prorationDate"]},
                            headers={"Idempotency-Key": str(uuid.uuid4())})
    assert changed.status_code == 200, changed.text
    after = changed.json()
    if body["effective"] == "now":
        # create_prorations: the new price at once, the prorations credited on the next invoice.
        assert body["prorationBehavior"] == "create_prorations"
        credit, debit = sorted(line["amount"] for line in body["lines"] if line["proration"])
        assert credit < 0 < debit
        assert body["nextInvoiceTotal"] == 10_000 + credit + debit
        assert (after["priceId"], after["pendingChange"]) == (basic["id"], None)
    else:
        # at_period_end: pending until the renewal, which bills the new price as it is.
        assert (body["effective"], body["prorationBehavior"], body["nextInvoiceTotal"]) == ("period_end", "none",
                                                                                           10_000)
        assert after["priceId"] == pro["id"] and after["pendingChange"]["priceId"] == basic["id"]
    assert len(await _our_invoices(admin, client_id, lambda found: True)) == 1  # nothing charged now

    await _advance(admin, services_standin, end + timedelta(hours=1))
    renewed = await _subscription(me, sub["id"], lambda s: s["currentPeriodStart"] == sub["currentPeriodEnd"]
                                  and s["status"] == "active")
    assert (renewed["priceId"], renewed["pendingChange"], renewed["mrr"]) == (basic["id"], None, 10_000)
    invoices = await _our_invoices(admin, client_id, lambda found: len(found) == 2 and found[1]["status"] == "PAID")
    stripe_renewal = await stripe_api(f"/v1/invoices/{invoices[1]['stripeInvoiceId']}")
    assert stripe_renewal["billing_reason"] == "subscription_cycle"
    assert body["nextInvoiceTotal"] == stripe_renewal["total"] == invoices[1]["total"]


async def test_cancel_at_period_end_keeps_access_until_then_and_bills_nothing_more(
    admin: httpx.AsyncClient, subscriber: dict[str, Any], services_standin: StripeStandin,
    stripe_api: Callable[[str], Any],
) -> None:
    price = await _price(admin, "Hosting", 5_000)
    me, client_id = subscriber["http"], subscriber["client"]["id"]
    sub = await _active_subscription(admin, client_id, price["id"])
    end = datetime.fromisoformat(sub["currentPeriodEnd"])

    refused = await me.post(f"/api/subscriptions/{sub['id']}/cancel", json={"atPeriodEnd": False})
    assert refused.status_code == 403  # a client cancels at the period end; at once is for admins
    cancel = await me.post(f"/api/subscriptions/{sub['id']}/cancel", json={"atPeriodEnd": True},
                           headers={"Idempotency-Key": str(uuid.uuid4())})
    assert cancel.status_code == 200, cancel.text
    cancelled = cancel.json()
    assert (cancelled["status"], cancelled["cancelAtPeriodEnd"]) == ("active", True)
    assert cancelled["accessUntil"] == sub["currentPeriodEnd"]
    [first] = await _our_invoices(admin, client_id, lambda found: [i["status"] for i in found] == ["PAID"])

    # Still active just before the end; canceled after it, with access up to the end and no invoice.
    await _advance(admin, services_standin, end - timedelta(hours=1))
    assert (await me.get(f"/api/subscriptions/{sub['id']}")).json()["status"] == "active"
    await _advance(admin, services_standin, end + timedelta(hours=1))
    ended = await _subscription(me, sub["id"], lambda s: s["status"] == "canceled")
    assert ended["endedAt"] == sub["currentPeriodEnd"] == ended["accessUntil"] and ended["mrr"] == 0
    stripe_invoices = await stripe_api(f"/v1/invoices?customer={sub['stripeCustomerId']}&limit=100")
    assert [i["id"] for i in stripe_invoices["data"]] == [first["stripeInvoiceId"]]
    assert [i["id"] for i in await _our_invoices(admin, client_id, lambda found: True)] == [first["id"]]
    again = await me.post(f"/api/subscriptions/{sub['id']}/resume")
    assert again.status_code == 409  # over: nothing to resume


async def test_an_admin_cancels_at_once_and_access_ends_now(
    admin: httpx.AsyncClient, subscriber: dict[str, Any], services_standin: StripeStandin,
) -> None:
    price = await _price(admin, "Support", 7_500)
    me, client_id = subscriber["http"], subscriber["client"]["id"]
    sub = await _active_subscription(admin, client_id, price["id"])
    cancel = await admin.post(f"/api/subscriptions/{sub['id']}/cancel", json={"atPeriodEnd": False},
                              headers={"Idempotency-Key": str(uuid.uuid4())})
    assert cancel.status_code == 200, cancel.text
    now = await _clock(admin)
    ended = cancel.json()
    assert ended["status"] == "canceled" and ended["mrr"] == 0
    assert datetime.fromisoformat(ended["endedAt"]) == now
    assert datetime.fromisoformat(ended["accessUntil"]) <= now < datetime.fromisoformat(sub["currentPeriodEnd"])
    seen = await _subscription(me, sub["id"], lambda s: s["status"] == "canceled")  # the webhook agrees
    assert seen["endedAt"] == ended["endedAt"]
    refused = await admin.post(f"/api/subscriptions/{sub['id']}/cancel", json={"atPeriodEnd": True})
    assert refused.status_code == 409


async def test_a_failed_renewal_is_past_due_overdue_and_emailed_then_recovers_with_a_working_card(
    admin: httpx.AsyncClient, subscriber: dict[str, Any], services_standin: StripeStandin, mail_sink: MailSink,
    infra_endpoints: InfraEndpoints,
) -> None:
    price = await _price(admin, "Maintenance", 15_000)
    me, client_id, address = subscriber["http"], subscriber["client"]["id"], subscriber["email"]
    sub = await _active_subscription(admin, client_id, price["id"])
    end = datetime.fromisoformat(sub["currentPeriodEnd"])
    await _our_invoices(admin, client_id, lambda found: [i["status"] for i in found] == ["PAID"])

    # The card now declines: the renewal fails -> past_due, our invoice OVERDUE, "update your card".
    await _card(services_standin, sub["stripeCustomerId"], "decline")
    await _advance(admin, services_standin, end + timedelta(hours=1))
    past_due = await _subscription(me, sub["id"], lambda s: s["status"] == "past_due")
    assert past_due["accessUntil"] == sub["currentPeriodEnd"]  # paid through the old period only
    invoices = await _our_invoices(admin, client_id, lambda found: len(found) == 2 and found[1]["status"] == "OVERDUE")
    renewal = invoices[1]
    assert NUMBER.fullmatch(renewal["invoiceNumber"]) and renewal["amountDue"] == 15_000
    [card_mail] = await _mail(mail_sink, address, lambda s: "update your card" in s.lower())
    # Stripe's failure event and past_due travel on two topics: whichever comes first, the amount is in.
    assert "150.00" in _text(card_mail), _text(card_mail)
    target = await _link_target(card_mail, "Update your card")
    assert target == f"{infra_endpoints.url_of(GATEWAY)}/portal/subscription"

    # Card fixed; Stripe retries a day later: PAID, active, paid through the new period.
    await _card(services_standin, sub["stripeCustomerId"], "succeed")
    await _advance(admin, services_standin, end + timedelta(days=2))
    recovered = await _subscription(me, sub["id"], lambda s: s["status"] == "active"
                                    and s["accessUntil"] != sub["currentPeriodEnd"])
    assert recovered["currentPeriodStart"] == sub["currentPeriodEnd"]
    assert recovered["accessUntil"] == recovered["currentPeriodEnd"]
    paid = await _our_invoices(admin, client_id, lambda found: len(found) == 2 and found[1]["status"] == "PAID")
    assert paid[1]["id"] == renewal["id"] and paid[1]["amountPaid"] == 15_000
    payments = (await admin.get("/api/payments", params={"invoiceId": renewal["id"]})).json()["items"]
    assert [(p["amount"], p["method"]) for p in payments] == [(15_000, "card")]
    # One "update your card" for the failed invoice, however many events asked for it.
    assert len(await _mail(mail_sink, address, lambda s: "update your card" in s.lower())) == 1


async def test_the_seed_offers_the_demo_plan_once_and_the_demo_client_can_subscribe_to_it(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], services_standin: StripeStandin,
) -> None:
    """`make run`'s seed (deploy/seed.py), run twice: one plan "Maintenance" in the demo client's currency,
    monthly and yearly with 14 trial days, which the demo client's login can check out right away."""

    def seed() -> None:
        with httpx.Client(base_url=stack[GATEWAY].url, timeout=30,
                          headers={"Authorization": admin.headers["Authorization"]}) as http:
            Seeder(http).run()

    await asyncio.to_thread(seed)
    await asyncio.to_thread(seed)  # idempotent
    plans = [p for p in (await admin.get("/api/plans", params={"limit": 100})).json()["items"]
             if p["name"] == DEMO_PLAN]
    assert len(plans) == 1 and plans[0]["active"]
    prices = sorted((p["currency"], p["interval"], p["amount"], p["trialDays"], p["active"])
                    for p in plans[0]["prices"])
    assert prices == [("EUR", "month", 15_000, 14, True), ("EUR", "year", 150_000, 14, True)]
    # ... and the demo client on the monthly price, once (the second run found it), so MRR shows.
    demo_client = next(c for c in (await admin.get("/api/clients", params={"limit": 100})).json()["items"]
                       if c["email"] == DEMO_CLIENT_EMAIL)
    subs = (await admin.get("/api/subscriptions", params={"clientId": demo_client["id"]})).json()["items"]
    assert [(s["planName"], s["interval"], s["status"], s["collectionMethod"], s["mrr"]) for s in subs] == [
        (DEMO_PLAN, "month", "active", "send_invoice", 15_000)]
    demo = await login(stack[GATEWAY].url, *CLIENT_LOGIN)
    try:
        offered = (await demo.get("/api/plans", params={"limit": 100})).json()["items"]
        assert DEMO_PLAN in [p["name"] for p in offered]
        monthly = next(p for p in plans[0]["prices"] if p["interval"] == "month")
        checkout = await demo.post("/api/subscriptions/checkout", json={"priceId": monthly["id"]})
        assert checkout.status_code == 201, checkout.text
        assert checkout.json()["url"].startswith(f"{services_standin.url}/checkout/cs_")
    finally:
        await demo.aclose()
