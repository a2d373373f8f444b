"""The stand-in as a real process, driven with the official stripe SDK, its webhooks received by a
local endpoint that verifies each signature (fixtures ``stripe_standin`` and ``standin_webhooks``).

Every object read back raw and every event delivered during a test is checked against stripe-mock's
OpenAPI spec (required fields, no invented fields, types, enums).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe

from deploy.infra import StripeStandin, free_port
from deploy.stripe_standin.spec import SpecValidator, default_validator
from deploy.stripe_standin.testing import WebhookReceiver

DAY = 86_400
KEY = "sk_test_standin"
SCHEMAS = {
    "subscription": "subscription", "invoice": "invoice", "customer": "customer", "price": "price",
    "product": "product", "checkout.session": "checkout.session", "payment_intent": "payment_intent",
    "invoiceitem": "invoiceitem", "test_helpers.test_clock": "test_helpers.test_clock",
    "billing_portal.configuration": "billing_portal.configuration",
}

Obj = dict[str, Any]
# The fixture is a stripe.StripeClient; typed loosely here because the SDK's TypedDict params and
# expandable-field unions (str | Invoice | None) would need a cast on nearly every line of these tests.
Sdk = Any


def ts(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def spec() -> SpecValidator:
    validator = default_validator()
    if validator is None:
        pytest.skip("stripe-mock's spec3.json is not in the Go module cache")
    return validator


@pytest.fixture(scope="module")
def client(stripe_standin: StripeStandin) -> Sdk:
    return stripe.StripeClient(KEY, base_addresses={"api": stripe_standin.url}, max_network_retries=0)


@pytest.fixture(scope="module")
def http(stripe_standin: StripeStandin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stripe_standin.url, headers={"Authorization": f"Bearer {KEY}"},
                      trust_env=False, timeout=30) as session:
        yield session


@pytest.fixture
def hooks(standin_webhooks: WebhookReceiver, spec: SpecValidator) -> Iterator[WebhookReceiver]:
    """The receiver; afterwards, every event it got is checked against the spec and its signature."""
    yield standin_webhooks
    assert standin_webhooks.invalid == []
    for event in standin_webhooks.events():
        assert event["api_version"] == "2026-10-28.endive"
        assert spec.errors(event, "event") == [], event["type"]
        obj = event["data"]["object"]
        schema = SCHEMAS.get(obj.get("object", ""))
        if schema:
            assert spec.errors(obj, schema) == [], f"{event['type']}: {spec.errors(obj, schema)[:5]}"


def raw(http: httpx.Client, path: str, spec: SpecValidator, schema: str) -> Obj:
    response = http.get(path)
    assert response.status_code == 200, response.text
    document: Obj = response.json()
    if schema:
        assert spec.errors(document, schema) == []
    return document


def monthly_prices(client: Sdk, *amounts: int, currency: str = "usd",
                   name: str = "Maintenance") -> list[Any]:
    product = client.v1.products.create(params={"name": name})
    return [client.v1.prices.create(params={
        "product": product.id, "unit_amount": amount, "currency": currency, "recurring": {"interval": "month"},
        "metadata": {"price_id": f"our-{amount}"}}) for amount in amounts]


def clock_customer(client: Sdk, start: int, **params: Any) -> tuple[Any, Any]:
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": start, "name": "test"})
    customer = client.v1.customers.create(params={"email": "client@example.com", "test_clock": clock.id,
                                                  "metadata": {"client_id": "client-1"}, **params})
    return clock, customer


def advance(client: Sdk, clock: Any, to: int) -> None:
    result = client.v1.test_helpers.test_clocks.advance(clock.id, params={"frozen_time": to})
    assert result.status == "ready" and result.frozen_time == to


def types(hooks: WebhookReceiver, **match: Any) -> list[str]:
    return [e["type"] for e in hooks.events(**match)]


# ------------------------------------------------------------------------------------------------------
# subscriptions on a test clock


def test_trial_then_first_invoice_then_monthly_renewal(
    client: Sdk, hooks: WebhookReceiver, http: httpx.Client, spec: SpecValidator, stripe_standin: StripeStandin,
) -> None:
    [price] = monthly_prices(client, 1000)
    start = ts(2027, 1, 10, 9)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": price.id}], "trial_period_days": 14,
        "metadata": {"client_id": "client-1"}})
    trial_end = start + 14 * DAY
    assert sub.status == "trialing" and sub.trial_end == trial_end and sub.created == start
    assert sub["items"].data[0].current_period_end == trial_end
    [created] = hooks.wait_for("customer.subscription.created", id=sub.id)
    assert created["created"] == start and created["data"]["object"]["status"] == "trialing"

    advance(client, clock, trial_end - 3 * DAY - 60)
    assert stripe_standin.flush(10)
    assert hooks.events("customer.subscription.trial_will_end", id=sub.id) == []
    advance(client, clock, trial_end - 3 * DAY)
    [will_end] = hooks.wait_for("customer.subscription.trial_will_end", id=sub.id)
    assert will_end["created"] == trial_end - 3 * DAY

    advance(client, clock, trial_end + 3600)
    hooks.wait_for("invoice.payment_succeeded", customer=customer.id)  # the last of them
    [paid] = hooks.events("invoice.paid", customer=customer.id)
    invoice = paid["data"]["object"]
    assert invoice["amount_due"] == invoice["amount_paid"] == invoice["total"] == 1000
    assert invoice["billing_reason"] == "subscription_cycle" and invoice["status"] == "paid"
    assert invoice["parent"]["subscription_details"] == {"metadata": {"client_id": "client-1"},
                                                         "subscription": sub.id}
    [line] = invoice["lines"]["data"]
    assert line["amount"] == 1000 and line["quantity"] == 1 and line["pricing"]["price_details"]["price"] == price.id
    assert line["parent"]["subscription_item_details"]["proration"] is False
    next_end = ts(2027, 2, 24, 9)
    assert line["period"] == {"start": trial_end, "end": next_end}
    assert invoice["number"].startswith("STANDIN-") and invoice["created"] == trial_end
    [activated] = hooks.events("customer.subscription.updated", id=sub.id)
    assert activated["data"]["object"]["status"] == "active" and activated["created"] == trial_end
    assert activated["data"]["object"]["latest_invoice"] == invoice["id"]
    assert activated["data"]["previous_attributes"]["status"] == "trialing"
    assert activated["data"]["previous_attributes"]["latest_invoice"] is None
    order = [t for t in types(hooks, customer=customer.id) if t.startswith("invoice.")]
    assert order == ["invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded"]
    current = raw(http, f"/v1/subscriptions/{sub.id}", spec, "subscription")
    assert current["status"] == "active" and current["latest_invoice"] == invoice["id"]
    assert current["items"]["data"][0]["current_period_start"] == trial_end
    assert current["items"]["data"][0]["current_period_end"] == next_end
    assert "current_period_end" not in current

    advance(client, clock, next_end + 60)
    renewals = hooks.wait_for("invoice.paid", 2, customer=customer.id)
    renewal = renewals[-1]["data"]["object"]
    assert renewal["billing_reason"] == "subscription_cycle" and renewal["amount_paid"] == 1000
    assert renewal["lines"]["data"][0]["period"] == {"start": next_end, "end": ts(2027, 3, 24, 9)}
    assert renewal["number"] != invoice["number"]
    raw(http, f"/v1/invoices/{renewal['id']}", spec, "invoice")
    listed = client.v1.invoices.list(params={"subscription": sub.id})
    assert [i.id for i in listed.data] == [renewal["id"], invoice["id"]]  # newest first


def test_declined_card_goes_past_due_and_recovers_after_the_card_is_fixed(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    [price] = monthly_prices(client, 2500)
    start = ts(2027, 3, 1)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    assert sub.status == "active"
    [created] = hooks.wait_for("customer.subscription.created", id=sub.id)
    assert created["data"]["object"]["latest_invoice"] == sub.latest_invoice
    stripe_standin.set_card(customer.id, "decline")
    period_end = ts(2027, 4, 1)
    advance(client, clock, period_end + 60)
    [failed] = hooks.wait_for("invoice.payment_failed", customer=customer.id)
    invoice = failed["data"]["object"]
    assert invoice["status"] == "open" and invoice["attempt_count"] == 1 and invoice["amount_paid"] == 0
    assert invoice["next_payment_attempt"] == period_end + DAY
    hooks.wait_for("customer.subscription.updated", id=sub.id,
                   where=lambda e: e["data"]["object"]["status"] == "past_due"
                   and e["data"]["previous_attributes"] == {"status": "active"})
    assert client.v1.subscriptions.retrieve(sub.id).status == "past_due"

    advance(client, clock, period_end + 2 * DAY)  # retried once more, still declined
    assert len(hooks.wait_for("invoice.payment_failed", 2, customer=customer.id)) == 2
    assert client.v1.invoices.retrieve(invoice["id"]).attempt_count == 2

    stripe_standin.set_card(customer.id, "succeed")
    advance(client, clock, period_end + 3 * DAY)
    [paid] = hooks.wait_for("invoice.paid", customer=customer.id, id=invoice["id"])
    assert paid["data"]["object"]["attempt_count"] == 3 and paid["data"]["object"]["amount_paid"] == 2500
    hooks.wait_for("customer.subscription.updated", id=sub.id,
                   where=lambda e: e["data"]["object"]["status"] == "active")
    assert client.v1.subscriptions.retrieve(sub.id).status == "active"


def test_pay_endpoint_charges_the_card_and_reports_a_decline(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    [price] = monthly_prices(client, 700)
    clock, customer = clock_customer(client, ts(2027, 5, 1))
    stripe_standin.set_card(customer.id, "decline")
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    assert sub.status == "incomplete"
    with pytest.raises(stripe.CardError) as declined:
        client.v1.invoices.pay(sub.latest_invoice)
    assert declined.value.code == "card_declined" and declined.value.http_status == 402
    assert len(hooks.wait_for("invoice.payment_failed", 2, customer=customer.id)) == 2
    stripe_standin.set_card(customer.id, "succeed")
    assert client.v1.invoices.pay(sub.latest_invoice).status == "paid"
    assert client.v1.subscriptions.retrieve(sub.id).status == "active"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.pay(sub.latest_invoice)


def test_upgrade_with_always_invoice_is_charged_exactly_as_previewed(
    client: Sdk, hooks: WebhookReceiver, http: httpx.Client, spec: SpecValidator,
) -> None:
    low, high = monthly_prices(client, 1000, 3000)
    start = ts(2027, 4, 1)  # April: a 30-day period
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": low.id}]})
    item = sub["items"].data[0]
    assert (item.current_period_start, item.current_period_end) == (start, ts(2027, 5, 1))
    middle = start + 15 * DAY
    advance(client, clock, middle)
    change = {"items": [{"id": item.id, "price": high.id}], "proration_date": middle,
              "proration_behavior": "always_invoice"}
    preview_response = http.post("/v1/invoices/create_preview", data={
        "customer": customer.id, "subscription": sub.id, "subscription_details[items][0][id]": item.id,
        "subscription_details[items][0][price]": high.id, "subscription_details[proration_date]": str(middle),
        "subscription_details[proration_behavior]": "always_invoice"})
    assert preview_response.status_code == 200, preview_response.text
    preview = preview_response.json()
    assert spec.errors(preview, "invoice") == []
    assert [(x["amount"], x["parent"]["subscription_item_details"]["proration"]) for x in preview["lines"]["data"]] \
        == [(-500, True), (1500, True)]
    assert preview["total"] == preview["amount_due"] == 1000
    assert preview["lines"]["data"][0]["description"] == "Unused time on Maintenance after 16 Apr 2027"
    assert preview["lines"]["data"][1]["description"] == "Remaining time on Maintenance after 16 Apr 2027"

    updated = client.v1.subscriptions.update(sub.id, params=change)
    assert updated["items"].data[0].price.id == high.id
    assert updated["items"].data[0].current_period_end == ts(2027, 5, 1)  # same cycle
    [paid] = hooks.wait_for("invoice.paid", 2, customer=customer.id)[1:]
    issued = paid["data"]["object"]
    assert issued["billing_reason"] == "subscription_update"

    def essence(inv: Obj) -> Any:
        lines = [(x["description"], x["amount"], x["quantity"], x["period"],
                  x["pricing"]["price_details"]["price"], x["parent"]["subscription_item_details"]["proration"])
                 for x in inv["lines"]["data"]]
        return lines, inv["subtotal"], inv["total"], inv["amount_due"], inv["currency"]

    assert essence(issued) == essence(preview)
    assert issued["amount_paid"] == 1000
    updates = hooks.wait_for("customer.subscription.updated", id=sub.id)
    assert updates[0]["data"]["previous_attributes"]["items"]["data"][0]["price"]["id"] == low.id


def test_create_prorations_wait_for_the_next_renewal_invoice(
    client: Sdk, hooks: WebhookReceiver,
) -> None:
    low, high = monthly_prices(client, 1000, 3000)
    start = ts(2027, 4, 1)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": low.id}]})
    item = sub["items"].data[0]
    middle = start + 15 * DAY
    advance(client, clock, middle)
    upcoming = client.v1.invoices.create_preview(params={
        "subscription": sub.id,
        "subscription_details": {"items": [{"id": item.id, "price": high.id}], "proration_date": middle}})
    client.v1.subscriptions.update(sub.id, params={"items": [{"id": item.id, "price": high.id}],
                                                   "proration_date": middle})
    assert len(client.v1.invoices.list(params={"subscription": sub.id}).data) == 1  # nothing invoiced now
    pending = client.v1.invoice_items.list(params={"customer": customer.id, "pending": True}).data
    assert sorted(i.amount for i in pending) == [-500, 1500] and all(i.proration for i in pending)
    advance(client, clock, ts(2027, 5, 1) + 60)
    renewal = hooks.wait_for("invoice.paid", 2, customer=customer.id)[1]["data"]["object"]
    amounts = [x["amount"] for x in renewal["lines"]["data"]]
    assert amounts == [-500, 1500, 3000] and renewal["total"] == renewal["amount_paid"] == 4000
    assert [x.amount for x in upcoming.lines.data] == amounts and upcoming.total == 4000
    assert client.v1.invoice_items.list(params={"customer": customer.id, "pending": True}).data == []


def test_interval_change_restarts_the_cycle_with_a_credit(client: Sdk, hooks: WebhookReceiver) -> None:
    [monthly] = monthly_prices(client, 1000)
    yearly = client.v1.prices.create(params={"product": monthly.product, "unit_amount": 10000, "currency": "usd",
                                             "recurring": {"interval": "year"}})
    start = ts(2027, 4, 1)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": monthly.id}]})
    middle = start + 15 * DAY
    advance(client, clock, middle)
    updated = client.v1.subscriptions.update(sub.id, params={
        "items": [{"id": sub["items"].data[0].id, "price": yearly.id}], "proration_behavior": "create_prorations"})
    item = updated["items"].data[0]
    assert (item.current_period_start, item.current_period_end) == (middle, ts(2028, 4, 16))
    invoice = hooks.wait_for("invoice.paid", 2, customer=customer.id)[1]["data"]["object"]
    assert [x["amount"] for x in invoice["lines"]["data"]] == [-500, 10000] and invoice["amount_paid"] == 9500


def test_month_end_anchor_quantity_and_zero_decimal_currency(
    client: Sdk, hooks: WebhookReceiver,
) -> None:
    [price] = monthly_prices(client, 999, currency="jpy")
    start = ts(2028, 1, 31, 12)  # 2028 is a leap year
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id,
                                                 "items": [{"price": price.id, "quantity": 3}]})
    assert sub["items"].data[0].current_period_end == ts(2028, 2, 29, 12)
    first = client.v1.invoices.retrieve(sub.latest_invoice)
    assert first.amount_paid == 2997 and first.currency == "jpy"
    assert first.lines.data[0].description == "3 × Maintenance (at ¥999 / month)"
    advance(client, clock, ts(2028, 3, 1))
    item = client.v1.subscriptions.retrieve(sub.id)["items"].data[0]
    assert (item.current_period_start, item.current_period_end) == (ts(2028, 2, 29, 12), ts(2028, 3, 31, 12))
    # quantity 3 -> 2 at a third of the period left: credit 3 × 999 × r, debit 2 × 999 × r, each rounded
    period = item.current_period_end - item.current_period_start
    proration_date = item.current_period_end - period // 3
    preview = client.v1.invoices.create_preview(params={"subscription": sub.id, "subscription_details": {
        "items": [{"id": item.id, "quantity": 2}], "proration_date": proration_date,
        "proration_behavior": "always_invoice"}})
    r = (item.current_period_end - proration_date) / period
    assert [x.amount for x in preview.lines.data] == [-round(2997 * r), round(1998 * r)]
    assert preview.lines.data[0].description.startswith("Unused time on 3 × Maintenance after")
    assert preview.amount_due == 0 and preview.total < 0  # a credit: nothing to pay, balance carries it


def test_ending_a_trial_now_and_expanding(client: Sdk, hooks: WebhookReceiver) -> None:
    [price] = monthly_prices(client, 1200)
    start = ts(2027, 10, 5)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}],
                                                 "trial_end": start + 30 * DAY})
    advance(client, clock, start + 5 * DAY)
    client.v1.subscriptions.update(sub.id, params={"trial_end": "now"})
    current = client.v1.subscriptions.retrieve(sub.id, params={"expand": ["latest_invoice", "customer"]})
    assert current.status == "active" and current.trial_end == start + 5 * DAY
    assert current.latest_invoice.object == "invoice" and current.latest_invoice.amount_paid == 1200
    assert current.customer.email == "client@example.com"
    assert current["items"].data[0].current_period_start == start + 5 * DAY
    listed = client.v1.subscriptions.list(params={"customer": customer.id, "expand": ["data.latest_invoice"]})
    assert listed.data[0].latest_invoice.id == current.latest_invoice.id
    paid = client.v1.invoices.retrieve(current.latest_invoice.id, params={"expand": ["payments"]})
    assert paid.payments.data[0].payment.payment_intent.startswith("pi_")
    assert "payments" not in client.v1.invoices.retrieve(paid.id)  # only when expanded, as on Stripe


def test_proration_date_outside_the_period_is_refused(client: Sdk, hooks: WebhookReceiver) -> None:
    low, high = monthly_prices(client, 1000, 3000)
    clock, customer = clock_customer(client, ts(2027, 4, 1))
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": low.id}]})
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.subscriptions.update(sub.id, params={
            "items": [{"id": sub["items"].data[0].id, "price": high.id}], "proration_date": ts(2027, 6, 1)})
    assert refused.value.http_status == 400 and refused.value.param == "proration_date"
    assert client.v1.subscriptions.retrieve(sub.id)["items"].data[0].price.id == low.id  # nothing changed


def test_cancel_at_period_end_ends_without_an_invoice(client: Sdk, hooks: WebhookReceiver) -> None:
    [price] = monthly_prices(client, 1000)
    clock, customer = clock_customer(client, ts(2027, 6, 1))
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    updated = client.v1.subscriptions.update(sub.id, params={"cancel_at_period_end": True})
    assert updated.cancel_at_period_end and updated.cancel_at == ts(2027, 7, 1) and updated.status == "active"
    advance(client, clock, ts(2027, 7, 1) + 3600)
    [deleted] = hooks.wait_for("customer.subscription.deleted", id=sub.id)
    assert deleted["data"]["object"]["status"] == "canceled" and deleted["created"] == ts(2027, 7, 1)
    assert len(client.v1.invoices.list(params={"subscription": sub.id}).data) == 1  # only the first
    assert client.v1.subscriptions.list(params={"customer": customer.id}).data == []
    assert client.v1.subscriptions.list(params={"customer": customer.id, "status": "canceled"}).data[0].id == sub.id


def test_immediate_cancel(client: Sdk, hooks: WebhookReceiver) -> None:
    [price] = monthly_prices(client, 1000)
    clock, customer = clock_customer(client, ts(2027, 6, 1))
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    canceled = client.v1.subscriptions.cancel(sub.id)
    assert canceled.status == "canceled" and canceled.canceled_at == ts(2027, 6, 1)
    hooks.wait_for("customer.subscription.deleted", id=sub.id)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.update(sub.id, params={"cancel_at_period_end": True})


@pytest.mark.parametrize(("behavior", "status", "event"), [
    ("cancel", "canceled", "customer.subscription.deleted"),
    ("pause", "paused", "customer.subscription.paused"),
    ("create_invoice", "past_due", "invoice.finalized"),
])
def test_trial_end_without_a_payment_method(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
    behavior: str, status: str, event: str,
) -> None:
    [price] = monthly_prices(client, 1000)
    start = ts(2027, 8, 1)
    clock, customer = clock_customer(client, start)
    stripe_standin.set_card(customer.id, "none")
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": price.id}], "trial_period_days": 2,
        "trial_settings": {"end_behavior": {"missing_payment_method": behavior}}})
    hooks.wait_for("customer.subscription.trial_will_end", id=sub.id)  # less than 3 days: at once
    advance(client, clock, start + 2 * DAY + 1)
    hooks.wait_for(event, customer=customer.id)
    assert client.v1.subscriptions.retrieve(sub.id).status == status


def test_send_invoice_subscription_is_paid_on_the_hosted_invoice_page(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    [price] = monthly_prices(client, 4200, currency="eur")
    start = ts(2027, 9, 1)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": price.id}], "collection_method": "send_invoice",
        "days_until_due": 14})
    assert sub.status == "active"
    invoice = client.v1.invoices.retrieve(sub.latest_invoice)
    assert invoice.status == "open" and invoice.due_date == start + 14 * DAY and invoice.attempt_count == 0
    assert invoice.hosted_invoice_url == f"{stripe_standin.url}/invoice/{invoice.id}"
    with httpx.Client(trust_env=False) as browser:
        page = browser.get(invoice.hosted_invoice_url)
        assert page.status_code == 200 and "€42.00" in page.text and invoice.number in page.text
        paid = browser.post(f"{invoice.hosted_invoice_url}/pay", follow_redirects=True)
        assert paid.status_code == 200 and "Payment received" in paid.text
    hooks.wait_for("invoice.paid", id=invoice.id)
    assert client.v1.invoices.retrieve(invoice.id).status == "paid"


def test_send_invoice_customer_has_no_card_so_a_trial_can_pause(
    client: Sdk, hooks: WebhookReceiver, http: httpx.Client,
) -> None:
    [price] = monthly_prices(client, 1000)
    start = ts(2027, 9, 1)
    clock, customer = clock_customer(client, start)
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": price.id}], "collection_method": "send_invoice",
        "days_until_due": 7, "trial_period_days": 10,
        "trial_settings": {"end_behavior": {"missing_payment_method": "pause"}}})
    assert client.v1.customers.retrieve(customer.id).invoice_settings.default_payment_method is None
    advance(client, clock, start + 10 * DAY)
    hooks.wait_for("customer.subscription.paused", id=sub.id)
    assert client.v1.subscriptions.retrieve(sub.id).status == "paused"
    assert client.v1.invoices.list(params={"subscription": sub.id}).data == []


def test_clock_rules(client: Sdk, hooks: WebhookReceiver) -> None:
    start = ts(2027, 1, 1)
    clock, customer = clock_customer(client, start)
    assert customer.created == start
    with pytest.raises(stripe.InvalidRequestError) as backwards:
        client.v1.test_helpers.test_clocks.advance(clock.id, params={"frozen_time": start - 1})
    assert backwards.value.http_status == 400 and backwards.value.param == "frozen_time"
    other = client.v1.customers.create(params={"email": "real@example.com"})
    assert abs(other.created - time.time()) < 60  # no clock: real time
    assert client.v1.test_helpers.test_clocks.retrieve(clock.id).frozen_time == start
    client.v1.test_helpers.test_clocks.delete(clock.id)
    with pytest.raises(stripe.InvalidRequestError) as gone:
        client.v1.test_helpers.test_clocks.retrieve(clock.id)
    assert gone.value.http_status == 404


# ------------------------------------------------------------------------------------------------------
# checkout, portal


def test_payment_checkout_via_the_hosted_page(
    client: Sdk, hooks: WebhookReceiver, http: httpx.Client, spec: SpecValidator,
) -> None:
    def session(invoice_id: str) -> Any:
        return client.v1.checkout.sessions.create(params={
            "mode": "payment", "client_reference_id": invoice_id, "metadata": {"invoice_id": invoice_id},
            "line_items": [{"price_data": {"currency": "eur", "unit_amount": 123450,
                                           "product_data": {"name": "Invoice <2027-0001>"}}, "quantity": 1}],
            "payment_intent_data": {"metadata": {"invoice_id": invoice_id}},
            "customer_email": "ap@acme.example.com", "success_url": "http://portal.local/ok?s={CHECKOUT_SESSION_ID}",
            "cancel_url": "http://portal.local/cancel", "expires_at": int(time.time()) + 3600})

    first, second = session("inv-1"), session("inv-2")
    assert first.id != second.id and first.url.endswith(f"/checkout/{first.id}") and first.payment_intent is None
    raw(http, f"/v1/checkout/sessions/{first.id}", spec, "checkout.session")
    with httpx.Client(trust_env=False) as browser:
        page = browser.get(first.url)
        assert page.status_code == 200 and "€1,234.50" in page.text
        assert "Invoice &lt;2027-0001&gt;" in page.text and "<2027-0001>" not in page.text  # escaped
        declined = browser.post(f"{first.url}/decline")
        assert declined.status_code == 303
        assert "declined" in browser.get(declined.headers["location"], follow_redirects=True).text
        [failed] = hooks.wait_for("payment_intent.payment_failed", where=lambda e: e["data"]["object"]["metadata"]
                                  .get("invoice_id") == "inv-1")
        assert failed["data"]["object"]["last_payment_error"]["code"] == "card_declined"
        assert client.v1.checkout.sessions.retrieve(first.id).status == "open"
        for s in (first, second):
            paid = browser.post(f"{s.url}/pay")
            assert paid.status_code == 303 and paid.headers["location"] == f"http://portal.local/ok?s={s.id}"
    completed = {e["data"]["object"]["id"]: e["data"]["object"] for e in hooks.wait_for(
        "checkout.session.completed", 2, where=lambda e: e["data"]["object"]["id"] in (first.id, second.id))}
    one, two = completed[first.id], completed[second.id]
    assert one["payment_status"] == "paid" and one["status"] == "complete" and one["amount_total"] == 123450
    assert one["client_reference_id"] == "inv-1" and one["metadata"] == {"invoice_id": "inv-1"}
    assert one["currency"] == "eur"
    assert one["payment_intent"].startswith("pi_") and one["payment_intent"] != two["payment_intent"]
    assert one["payment_intent"] == failed["data"]["object"]["id"]  # the same intent, failed then paid
    [succeeded] = hooks.wait_for("payment_intent.succeeded", id=one["payment_intent"])
    assert succeeded["data"]["object"]["metadata"] == {"invoice_id": "inv-1"}
    assert succeeded["data"]["object"]["amount_received"] == 123450
    assert client.v1.payment_intents.retrieve(one["payment_intent"]).status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.expire(first.id)
    expired = client.v1.checkout.sessions.expire(session("inv-3").id)
    assert expired.status == "expired"
    hooks.wait_for("checkout.session.expired", id=expired.id)


def test_concurrent_pay_clicks_complete_the_session_once(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    session = client.v1.checkout.sessions.create(params={
        "mode": "payment", "success_url": "http://portal.local/ok",
        "line_items": [{"price_data": {"currency": "usd", "unit_amount": 100, "product_data": {"name": "x"}},
                        "quantity": 1}]})

    def click(_: int) -> int:
        with httpx.Client(trust_env=False) as browser:
            return browser.post(f"{session.url}/pay").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(click, range(8))) == {303}
    assert stripe_standin.flush(10)
    assert len(hooks.wait_for("checkout.session.completed", id=session.id)) == 1
    assert len(stripe_standin.events("payment_intent.succeeded")) >= 1
    assert len([e for e in stripe_standin.events("checkout.session.completed") if e["object_id"] == session.id]) == 1


def test_subscription_checkout_creates_customer_and_subscription(
    client: Sdk, hooks: WebhookReceiver,
) -> None:
    [price] = monthly_prices(client, 1500, name="Care plan")
    session = client.v1.checkout.sessions.create(params={
        "mode": "subscription", "line_items": [{"price": price.id, "quantity": 2}],
        "customer_email": "new@example.com", "metadata": {"client_id": "client-9"},
        "subscription_data": {"trial_period_days": 7, "metadata": {"client_id": "client-9", "plan_id": "p1"},
                              "trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}}},
        "success_url": "http://portal.local/subscribed", "cancel_url": "http://portal.local/no"})
    with httpx.Client(trust_env=False) as browser:
        page = browser.get(session.url)
        assert "7-day free trial" in page.text and "Care plan" in page.text and "$30.00" in page.text
        browser.post(f"{session.url}/decline")
        hooks.wait_for("payment_intent.payment_failed", where=lambda e: e["data"]["object"]["metadata"]
                       .get("client_id") == "client-9")
        assert client.v1.checkout.sessions.retrieve(session.id).subscription is None
        assert browser.post(f"{session.url}/pay").headers["location"] == "http://portal.local/subscribed"
    [completed] = hooks.wait_for("checkout.session.completed", id=session.id)
    done = completed["data"]["object"]
    assert done["subscription"].startswith("sub_") and done["customer"].startswith("cus_")
    assert done["payment_status"] == "no_payment_required"  # trial
    [created] = hooks.wait_for("customer.subscription.created", id=done["subscription"])
    sub = created["data"]["object"]
    assert sub["status"] == "trialing" and sub["metadata"] == {"client_id": "client-9", "plan_id": "p1"}
    assert sub["items"]["data"][0]["quantity"] == 2
    assert sub["trial_settings"]["end_behavior"]["missing_payment_method"] == "cancel"
    hooks.wait_for("customer.created", id=done["customer"], email="new@example.com")


def test_billing_portal_page_changes_card_plan_and_cancellation(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    low, high = monthly_prices(client, 1000, 3000, name="Hosting")
    clock, customer = clock_customer(client, ts(2027, 4, 1), name="Acme <GmbH>")
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": low.id}]})
    config = client.v1.billing_portal.configurations.create(params={
        "business_profile": {"headline": "Acme billing"},
        "features": {"invoice_history": {"enabled": True}, "payment_method_update": {"enabled": True},
                     "subscription_cancel": {"enabled": True, "mode": "at_period_end"},
                     "subscription_update": {"enabled": True, "default_allowed_updates": ["price"],
                                             "proration_behavior": "create_prorations",
                                             "products": [{"product": low.product, "prices": [low.id, high.id]}]}}})
    assert config.id in [c.id for c in client.v1.billing_portal.configurations.list().data]
    portal = client.v1.billing_portal.sessions.create(params={
        "customer": customer.id, "return_url": "http://portal.local/account", "configuration": config.id})
    assert portal.url == f"{stripe_standin.url}/portal/{portal.id}"
    with httpx.Client(trust_env=False, follow_redirects=True) as browser:
        page = browser.get(portal.url)
        assert page.status_code == 200 and "Acme &lt;GmbH&gt;" in page.text and "Hosting" in page.text
        assert "STANDIN-" in page.text and 'href="http://portal.local/account"' in page.text
        assert "payments are declined" in browser.post(f"{portal.url}/card", data={"outcome": "decline"}).text
        switched = browser.post(f"{portal.url}/subscriptions/{sub.id}/switch", data={"price": high.id})
        assert switched.status_code == 200 and "Plan changed" in switched.text
        canceled = browser.post(f"{portal.url}/subscriptions/{sub.id}/cancel")
        assert "Cancels on" in canceled.text
        assert browser.get(f"{stripe_standin.url}/portal/bps_nope").status_code == 404
    current = client.v1.subscriptions.retrieve(sub.id)
    assert current["items"].data[0].price.id == high.id and current.cancel_at_period_end
    assert sorted(i.amount for i in client.v1.invoice_items.list(params={"customer": customer.id}).data) \
        == [-1000, 3000]  # switched on day 0 of the period: the whole month
    hooks.wait_for("customer.updated", id=customer.id)


# ------------------------------------------------------------------------------------------------------
# API surface, webhooks


def test_catalog_lookup_keys_are_unique_and_transfer(client: Sdk, hooks: WebhookReceiver) -> None:
    product = client.v1.products.create(params={"id": f"prod_our_{int(time.time() * 1000)}", "name": "Basic"})
    assert client.v1.products.retrieve(product.id).name == "Basic"
    key = f"basic_monthly_{product.id}"
    old = client.v1.prices.create(params={"product": product.id, "unit_amount": 900, "currency": "eur",
                                          "recurring": {"interval": "month"}, "lookup_key": key})
    with pytest.raises(stripe.InvalidRequestError) as taken:
        client.v1.prices.create(params={"product": product.id, "unit_amount": 990, "currency": "eur",
                                        "recurring": {"interval": "month"}, "lookup_key": key})
    assert taken.value.param == "lookup_key"
    new = client.v1.prices.create(params={"product": product.id, "unit_amount": 990, "currency": "eur",
                                          "recurring": {"interval": "month"}, "lookup_key": key,
                                          "transfer_lookup_key": True})
    assert [p.id for p in client.v1.prices.list(params={"lookup_keys": [key]}).data] == [new.id]
    assert client.v1.prices.retrieve(old.id).lookup_key is None
    archived = client.v1.prices.update(old.id, params={"active": False, "metadata": {"archived": "yes"}})
    assert not archived.active and archived.metadata["archived"] == "yes"
    assert old.id not in [p.id for p in client.v1.prices.list(params={"active": True, "product": product.id}).data]
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        client.v1.products.create(params={"id": product.id, "name": "again"})
    assert duplicate.value.param == "id"
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.products.retrieve("prod_does_not_exist")
    assert unknown.value.http_status == 404 and unknown.value.code == "resource_missing"


def test_api_answers_match_the_spec(client: Sdk, http: httpx.Client, spec: SpecValidator,
                                   hooks: WebhookReceiver) -> None:
    low, high = monthly_prices(client, 1000, 3000)
    clock, customer = clock_customer(client, ts(2027, 4, 1))
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": low.id}]})
    client.v1.subscriptions.update(sub.id, params={"items": [{"id": sub["items"].data[0].id, "price": high.id}]})
    [item] = client.v1.invoice_items.list(params={"customer": customer.id, "pending": True}).data[:1]
    session = client.v1.checkout.sessions.create(params={
        "mode": "payment", "success_url": "http://x/ok", "customer": customer.id,
        "line_items": [{"price_data": {"currency": "usd", "unit_amount": 500, "product_data": {"name": "One-off"}},
                        "quantity": 2}]})
    config = client.v1.billing_portal.configurations.create(params={"features": {"invoice_history": {
        "enabled": True}}})
    portal = client.v1.billing_portal.sessions.create(params={"customer": customer.id, "configuration": config.id})
    raw(http, f"/v1/products/{low.product}", spec, "product")
    raw(http, f"/v1/prices/{low.id}", spec, "price")
    raw(http, f"/v1/customers/{customer.id}", spec, "customer")
    raw(http, f"/v1/test_helpers/test_clocks/{clock.id}", spec, "test_helpers.test_clock")
    raw(http, f"/v1/subscriptions/{sub.id}?expand[]=latest_invoice", spec, "subscription")
    raw(http, f"/v1/invoices/{sub.latest_invoice}?expand[]=payments", spec, "invoice")
    raw(http, f"/v1/invoiceitems/{item.id}", spec, "invoiceitem")
    raw(http, f"/v1/checkout/sessions/{session.id}", spec, "checkout.session")
    raw(http, f"/v1/billing_portal/configurations/{config.id}", spec, "billing_portal.configuration")
    assert spec.errors(portal.to_dict(), "billing_portal.session") == []
    for li in raw(http, f"/v1/checkout/sessions/{session.id}/line_items", spec, "")["data"]:
        assert spec.errors(li, "item") == []
    for path, schema in [("/v1/subscriptions", "subscription"), ("/v1/invoices", "invoice"),
                         ("/v1/customers", "customer"), ("/v1/prices", "price"), ("/v1/events", "event")]:
        page = http.get(path, params={"limit": 3}).json()
        assert page["object"] == "list" and page["url"] == path and len(page["data"]) <= 3
        for obj in page["data"]:
            assert spec.errors(obj, schema) == []


def test_errors_are_stripe_shaped(http: httpx.Client, stripe_standin: StripeStandin) -> None:
    missing = http.get("/v1/subscriptions/sub_missing")
    assert missing.status_code == 404
    assert missing.json() == {"error": {
        "type": "invalid_request_error", "message": "No such subscription: 'sub_missing'", "param": "id",
        "code": "resource_missing", "doc_url": "https://stripe.com/docs/error-codes/resource-missing"}}
    typo = http.post("/v1/customers", data={"emial": "x@example.com"})
    assert typo.status_code == 400 and typo.json()["error"]["message"] == "Received unknown parameter: emial"
    bad_ref = http.post("/v1/subscriptions", data={"customer": "cus_missing", "items[0][price]": "price_x"})
    assert bad_ref.status_code == 400 and bad_ref.json()["error"]["param"] == "customer"
    with httpx.Client(base_url=stripe_standin.url, trust_env=False) as anonymous:
        assert anonymous.get("/v1/customers").status_code == 401
        live = anonymous.get("/v1/customers", headers={"Authorization": "Bearer sk_live_nope"})
        assert live.status_code == 401 and "live" in live.json()["error"]["message"]


def test_unknown_endpoints_are_forwarded_to_stripe_mock(client: Sdk) -> None:
    balance = client.v1.balance.retrieve()
    assert balance.object == "balance"
    endpoint = client.v1.webhook_endpoints.create(params={"url": "https://example.com/hook",
                                                          "enabled_events": ["invoice.paid"]})
    assert endpoint.object == "webhook_endpoint"


def test_idempotency_key_replays_the_first_answer(http: httpx.Client) -> None:
    key = {"Idempotency-Key": f"standin-test-{time.time()}"}
    first = http.post("/v1/customers", data={"email": "once@example.com"}, headers=key)
    again = http.post("/v1/customers", data={"email": "once@example.com"}, headers=key)
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = http.post("/v1/customers", data={"email": "other@example.com"}, headers=key)
    assert other.status_code == 400 and other.json()["error"]["type"] == "idempotency_error"


def test_signatures_verify_like_stripe(client: Sdk, hooks: WebhookReceiver) -> None:
    customer = client.v1.customers.create(params={"email": "sig@example.com"})
    hooks.wait_for("customer.created", id=customer.id)
    [delivery] = [r for r in hooks.received if r.event and r.event["data"]["object"]["id"] == customer.id]
    timestamp, v1 = (part.split("=", 1)[1] for part in delivery.signature.split(","))
    assert abs(int(timestamp) - time.time()) < 60 and len(v1) == 64
    event = stripe.Webhook.construct_event(delivery.raw.decode(), delivery.signature, "whsec_test")
    assert event.type == "customer.created" and event.data.object.id == customer.id
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(delivery.raw.decode(), delivery.signature, "whsec_wrong")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(delivery.raw.decode().replace("sig@", "sag@"), delivery.signature,
                                       "whsec_test")


def test_duplicate_deliveries_and_shuffle_knobs(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    [price] = monthly_prices(client, 1000)
    start = ts(2027, 1, 1)
    clock, customer = clock_customer(client, start)
    client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    assert stripe_standin.flush(10)
    hooks.clear()
    stripe_standin.configure(duplicate_deliveries=True, shuffle=True)
    try:
        advance(client, clock, ts(2027, 7, 1) + 60)  # six renewals, 5 events each, emitted in one request
        assert stripe_standin.flush(15)
        emitted = [e["id"] for e in stripe_standin.events() if e["id"] in {x["id"] for x in hooks.events()}]
        received = [e["id"] for e in hooks.events()]
        assert len(emitted) >= 30 and len(received) == 2 * len(emitted)
        assert sorted(received) == sorted(emitted * 2)  # every event exactly twice
        assert list(dict.fromkeys(received)) != emitted  # not in emission order
    finally:
        stripe_standin.configure(duplicate_deliveries=False, shuffle=False)
    single = client.v1.customers.create(params={"email": "once@example.com"})
    hooks.wait_for("customer.created", id=single.id)
    assert stripe_standin.flush(10)
    assert len(hooks.events("customer.created", id=single.id)) == 1


def test_failed_delivery_is_retried(
    client: Sdk, hooks: WebhookReceiver, stripe_standin: StripeStandin,
) -> None:
    hooks.fail_next(1)
    customer = client.v1.customers.create(params={"email": "retry@example.com"})
    [event] = hooks.wait_for("customer.created", id=customer.id, timeout=10)
    assert stripe_standin.flush(10)
    [record] = [e for e in stripe_standin.events("customer.created", customer.id) if e["id"] == event["id"]]
    [delivery] = record["deliveries"]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 2
    assert any(r.status == 500 for r in hooks.received)
    assert stripe_standin.pending_deliveries() == 0


def test_state_and_pending_deliveries_survive_a_restart(
    stripe_standin: StripeStandin, hooks: WebhookReceiver, tmp_path: Any,
) -> None:
    state = tmp_path / "standin-state.json"
    other = StripeStandin(free_port(), stripe_standin.stripe_mock_url, state_file=state, webhook_urls=[hooks.url],
                          webhook_secret="whsec_test", log_path=tmp_path / "standin.log")
    other.start()
    hooks.fail_next(1000)  # the endpoint is down: the delivery stays pending
    try:
        c = stripe.StripeClient(KEY, base_addresses={"api": other.url}, max_network_retries=0)
        customer = c.v1.customers.create(params={"email": "kept@example.com"})
        deadline = time.monotonic() + 10
        while not any(r.status == 500 for r in hooks.received) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert other.pending_deliveries() == 1
    finally:
        other.stop()
    assert state.is_file()
    hooks.fail_next(0)
    other.start()
    try:
        assert c.v1.customers.retrieve(customer.id).email == "kept@example.com"
        hooks.wait_for("customer.created", id=customer.id, timeout=15)  # resumed after the restart
        assert other.flush(10)
    finally:
        other.stop()


def test_customers_without_a_clock_live_in_real_time(client: Sdk, hooks: WebhookReceiver) -> None:
    [price] = monthly_prices(client, 800)
    customer = client.v1.customers.create(params={"email": "now@example.com"})
    trial_end = int(time.time()) + 2
    sub = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}],
                                                 "trial_end": trial_end})
    hooks.wait_for("customer.subscription.trial_will_end", id=sub.id)  # less than 3 days: at once
    [paid] = hooks.wait_for("invoice.paid", customer=customer.id, timeout=10)  # the ticker ended the trial
    assert paid["created"] >= trial_end and paid["data"]["object"]["amount_paid"] == 800
    assert client.v1.subscriptions.retrieve(sub.id).status == "active"
