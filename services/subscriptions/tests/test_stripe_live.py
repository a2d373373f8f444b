"""Opt-in: a plan upgrade against real Stripe test mode (seed T6). Never a live key, never a real card.

Runs only when STRIPE_SECRET_KEY holds a Stripe-issued test key (sk_test_ + a long random part);
otherwise the whole module is skipped and pytest prints why (`-ra`). It needs the internet.

    STRIPE_SECRET_KEY=sk_test_... pytest services/subscriptions/tests/test_stripe_live.py -ra

So that the steps themselves stay known to work without a key, STRIPE_LIVE_TEST_AGAINST_STANDIN=1
runs the same test against the local Stripe stand-in (the `stripe_standin` fixture, key
`sk_test_standin`).

Everything goes through the service's own code: the SDK adapter (stripe_client.py on kit.stripe),
the catalog sync and lookup keys of plans.py/catalog.py, and proration.py for the expected figures.
What it leaves in the test account: two archived products with one archived price each (lookup keys
unique per run); the customer and its subscription go with the test clock, deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from kit.clock import utcnow
from kit.stripe import looks_like_real_test_key, stripe_client
from services.subscriptions.catalog import CatalogSync
from services.subscriptions.models import Plan, Price
from services.subscriptions.plans import default_lookup_key
from services.subscriptions.proration import prorate, seconds
from services.subscriptions.schemas import PriceIn
from services.subscriptions.stripe_client import InvoicePreview, SdkStripeBilling, TestClock

AGAINST_STANDIN = os.environ.get("STRIPE_LIVE_TEST_AGAINST_STANDIN") == "1"
KEY = os.environ.get("STRIPE_SECRET_KEY", "")
if not AGAINST_STANDIN and (not KEY.startswith("sk_test_") or not looks_like_real_test_key(KEY)):
    reason = (
        "real Stripe test mode not exercised: set STRIPE_SECRET_KEY=sk_test_... (a key from the Stripe "
        "dashboard) to run it, or STRIPE_LIVE_TEST_AGAINST_STANDIN=1 for the local stand-in"
        + (f"; '{KEY[:12]}…' is a local placeholder" if KEY else "; no key is set")
    )
    print(f"\n[subscriptions] {reason}")
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def billing(request: pytest.FixtureRequest) -> SdkStripeBilling:
    if AGAINST_STANDIN:
        standin = request.getfixturevalue("stripe_standin")
        return SdkStripeBilling(stripe_client("sk_test_standin", api_base=standin.url))
    return SdkStripeBilling(stripe_client(KEY))


def transient_plan(name: str, amount: int) -> Plan:
    """A plan with one USD monthly price, as plans.py builds it (not stored: Stripe is what is tested)."""
    plan = Plan(id=uuid.uuid4(), name=name, description=None, features=[], active=True, prices=[])
    entry = PriceIn(currency="USD", amount=amount, interval="month")
    plan.prices.append(Price(id=uuid.uuid4(), plan_id=plan.id, currency=entry.currency, amount=entry.amount,
                             interval=entry.interval.value, interval_count=entry.interval_count, trial_days=0,
                             lookup_key=default_lookup_key(plan.id, entry), active=True))
    return plan


async def wait_ready(billing: SdkStripeBilling, clock_id: str) -> TestClock:
    """Real Stripe advances a test clock in the background; the stand-in is ready at once."""
    for _ in range(60):
        clock = TestClock.model_validate(
            (await billing.client.v1.test_helpers.test_clocks.retrieve_async(clock_id)).to_dict())
        if clock.status == "ready":
            return clock
        await asyncio.sleep(2)
    raise AssertionError(f"test clock {clock_id} never became ready")


@pytest.fixture
async def catalog(billing: SdkStripeBilling) -> AsyncIterator[tuple[Plan, Plan]]:
    """$10 and $30 a month, each a product + price created by CatalogSync; archived afterwards."""
    sync = CatalogSync(billing)
    tag = uuid.uuid4().hex[:6]
    basic, pro = transient_plan(f"Live Basic {tag}", 1_000), transient_plan(f"Live Pro {tag}", 3_000)
    try:
        for plan in (basic, pro):
            plan.stripe_product_id = await sync.product(plan)
            for price in plan.prices:
                price.stripe_price_id = await sync.price(plan, price)
        yield basic, pro
    finally:
        for plan in (basic, pro):
            for price in plan.prices:
                await sync.archive_price(price)
            if plan.stripe_product_id:
                await billing.update_product(plan.stripe_product_id, {"active": False})


# infra: it needs Stripe (the internet) or the stand-in, which `billing` asks for at run time.
@pytest.mark.infra
async def test_upgrade_preview_equals_invoice_and_proration(
    billing: SdkStripeBilling, catalog: tuple[Plan, Plan]
) -> None:
    basic, pro = catalog
    [basic_price], [pro_price] = basic.prices, pro.prices
    assert basic_price.stripe_price_id and pro_price.stripe_price_id
    found = await billing.find_price(pro_price.lookup_key)
    assert found is not None and found.id == pro_price.stripe_price_id and found.unit_amount == 3_000

    run = uuid.uuid4().hex[:8]
    clock = await billing.create_test_clock(int(utcnow().timestamp()), f"subscriptions live test {run}")
    try:
        customer = await billing.create_customer(
            {"name": f"Live test {run}", "email": f"live-{run}@example.com", "test_clock": clock.id},
            idempotency_key=f"live-customer-{run}")
        assert customer.test_clock == clock.id
        await billing.client.v1.payment_methods.attach_async("pm_card_visa", params={"customer": customer.id})
        await billing.client.v1.customers.update_async(
            customer.id, params={"invoice_settings": {"default_payment_method": "pm_card_visa"}})

        sub = await billing.create_subscription(
            {"customer": customer.id, "items": [{"price": basic_price.stripe_price_id, "quantity": 1}],
             "metadata": {"price_id": str(basic_price.id), "plan_id": str(basic.id)}},
            idempotency_key=f"live-sub-{run}")
        assert sub.status == "active", sub.status
        assert sub.price_id == basic_price.stripe_price_id
        assert sub.current_period_start is not None and sub.current_period_end is not None
        [item] = sub.items

        # Half a month on (an odd second, so the rounding is exercised), then upgrade at a pinned date.
        target = sub.current_period_start + timedelta(days=14, hours=7, seconds=1_237)
        await billing.advance_test_clock(clock.id, seconds(target))
        await wait_ready(billing, clock.id)
        proration_date = seconds(target) - 61
        items = [{"id": item.id, "price": pro_price.stripe_price_id, "quantity": 1}]

        preview = await billing.preview_invoice({
            "customer": customer.id, "subscription": sub.subscription_id,
            "subscription_details": {"items": items, "proration_behavior": "always_invoice",
                                     "proration_date": proration_date}})
        expected = prorate(old_unit=1_000, old_quantity=1, new_unit=3_000, new_quantity=1,
                           period_start=sub.current_period_start, period_end=sub.current_period_end,
                           proration_date=proration_date)
        preview_lines = preview.contract_lines()
        prorations = sorted(line.amount for line in preview_lines if line.proration)
        assert prorations == sorted(line.amount for line in expected.lines), (prorations, expected)
        assert preview.total == expected.total, (preview.total, expected.total)

        changed = await billing.update_subscription(
            sub.subscription_id,
            {"items": items, "proration_behavior": "always_invoice", "proration_date": proration_date,
             "metadata": {"price_id": str(pro_price.id), "plan_id": str(pro.id)}},
            idempotency_key=f"live-change-{run}")
        assert changed.price_id == pro_price.stripe_price_id
        assert changed.latest_invoice_id

        raw: Any = await billing.client.v1.invoices.retrieve_async(changed.latest_invoice_id)
        issued = InvoicePreview.model_validate(raw.to_dict())
        assert issued.total == preview.total and issued.amount_due == preview.amount_due
        assert sorted((line.amount, line.proration, line.price_id) for line in issued.contract_lines()) == sorted(
            (line.amount, line.proration, line.price_id) for line in preview_lines)

        canceled = await billing.update_subscription(
            sub.subscription_id, {"cancel_at_period_end": True}, idempotency_key=f"live-cancel-{run}")
        assert canceled.cancel_at_period_end and canceled.status == "active"
        again = await billing.retrieve_subscription(sub.subscription_id)
        assert again is not None and again.cancel_at_period_end
    finally:
        # Deleting the clock deletes its customer and subscription with it.
        await billing.client.v1.test_helpers.test_clocks.delete_async(clock.id)
