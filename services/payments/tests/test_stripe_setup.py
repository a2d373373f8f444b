"""Stripe setup as code: idempotency against a stateful in-memory Stripe, plus one smoke run against
the real stripe-mock (stateless, so there it only proves the requests are valid)."""

from __future__ import annotations

import argparse
import copy
import itertools
from typing import Any

import pytest

from services.payments.config import PaymentsSettings
from services.payments.stripe import setup as setup_command
from services.payments.stripe.handlers import HANDLERS
from services.payments.stripe.setup import (
    DEFAULT_CATALOG,
    WEBHOOK_EVENTS,
    Catalog,
    StripeSetup,
    main,
    run,
)


class FakeStripe:
    """Just enough of Stripe's behaviour for the setup: ids, custom product ids, lookup keys with
    transfer_lookup_key, a default payment method configuration, portal configurations."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.webhooks: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.pmcs = {"pmc_default": {"id": "pmc_default", "is_default": True, "parent": None,
                                     "card": {"display_preference": {"preference": "off"}}}}
        self.portals: dict[str, dict[str, Any]] = {
            "bpc_other": {"id": "bpc_other", "metadata": {}, "features": {}}}  # someone else's
        self.writes: list[str] = []

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids)}"

    async def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(w) for w in self.webhooks.values()]

    async def create_webhook_endpoint(self, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create_webhook_endpoint")
        wid = self._id("we")
        self.webhooks[wid] = {"id": wid, "status": "enabled", **copy.deepcopy(params)}
        return {**self.webhooks[wid], "secret": "whsec_new"}

    async def update_webhook_endpoint(self, endpoint_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_webhook_endpoint")
        self.webhooks[endpoint_id].update(copy.deepcopy(params))
        return self.webhooks[endpoint_id]

    async def retrieve_product(self, product_id: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.products.get(product_id))

    async def create_product(self, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create_product")
        assert params["id"] not in self.products
        self.products[params["id"]] = copy.deepcopy(params)
        return self.products[params["id"]]

    async def update_product(self, product_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_product")
        self.products[product_id].update(copy.deepcopy(params))
        return self.products[product_id]

    async def list_prices(self, lookup_keys: list[str]) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for p in self.prices.values() if p.get("lookup_key") in lookup_keys and p["active"]]

    async def create_price(self, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create_price")
        params = copy.deepcopy(params)
        transfer = params.pop("transfer_lookup_key", False)
        holders = [p for p in self.prices.values() if p.get("lookup_key") == params.get("lookup_key")]
        if holders:
            assert transfer, "Stripe refuses a taken lookup key without transfer_lookup_key"
            for p in holders:
                p["lookup_key"] = None
        pid = self._id("price")
        self.prices[pid] = {"id": pid, "active": True, **params}
        return self.prices[pid]

    async def update_price(self, price_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_price")
        self.prices[price_id].update(params)
        return self.prices[price_id]

    async def list_payment_method_configurations(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in self.pmcs.values()]

    async def update_payment_method_configuration(self, pmc_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_payment_method_configuration")
        for method, value in params.items():
            self.pmcs[pmc_id][method] = copy.deepcopy(value)
        return self.pmcs[pmc_id]

    async def list_portal_configurations(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in self.portals.values()]

    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create_portal_configuration")
        cid = self._id("bpc")
        self.portals[cid] = {"id": cid, **copy.deepcopy(params)}
        return self.portals[cid]

    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_portal_configuration")
        self.portals[config_id].update(copy.deepcopy(params))
        return self.portals[config_id]


def make_setup(api: FakeStripe, *, dry_run: bool = False, catalog: Catalog = DEFAULT_CATALOG) -> StripeSetup:
    return StripeSetup(api, webhook_url="https://billing.example/webhooks/stripe",
                       portal_return_url="https://billing.example/portal", payment_methods=["card", "sepa_debit"],
                       catalog=catalog, dry_run=dry_run)


async def test_first_run_creates_everything_second_run_changes_nothing() -> None:
    api = FakeStripe()
    first = await make_setup(api).run()
    assert first.webhook_secret == "whsec_new"
    [endpoint] = api.webhooks.values()
    assert endpoint["url"] == "https://billing.example/webhooks/stripe"
    assert set(endpoint["enabled_events"]) == set(WEBHOOK_EVENTS)
    assert {"checkout.session.completed", "invoice.paid", "customer.subscription.updated",
            "charge.refunded"} <= set(endpoint["enabled_events"])
    assert set(api.products) == {"billing_maintenance_basic", "billing_maintenance_standard",
                                 "billing_maintenance_premium"}
    assert sorted(p["lookup_key"] for p in api.prices.values()) == sorted(
        f"maintenance_{t}_{i}" for t in ("basic", "standard", "premium") for i in ("monthly", "yearly"))
    assert api.pmcs["pmc_default"]["card"]["display_preference"]["preference"] == "on"
    assert api.pmcs["pmc_default"]["sepa_debit"]["display_preference"]["preference"] == "on"
    ours = [c for c in api.portals.values() if c.get("metadata", {}).get("platform") == "billing"]
    assert len(ours) == 1
    update = ours[0]["features"]["subscription_update"]
    assert {p["product"] for p in update["products"]} == set(api.products)
    assert api.portals["bpc_other"] == {"id": "bpc_other", "metadata": {}, "features": {}}  # untouched

    writes = len(api.writes)
    second = await make_setup(api).run()
    assert second.writes == 0 and len(api.writes) == writes, api.writes[writes:]
    assert {a.verb for a in second.actions} == {"unchanged"}


async def test_dry_run_writes_nothing() -> None:
    api = FakeStripe()
    report = await make_setup(api, dry_run=True).run()
    assert api.writes == []
    assert report.writes == 0
    assert {a.verb for a in report.actions} >= {"would create", "would update"}


async def test_changed_price_moves_the_lookup_key_and_archives_the_old_price() -> None:
    api = FakeStripe()
    await make_setup(api).run()
    old_id = next(p["id"] for p in api.prices.values() if p["lookup_key"] == "maintenance_basic_monthly")
    catalog = DEFAULT_CATALOG.model_copy(deep=True)
    catalog.products[0].prices[0].unit_amount = 5_900
    report = await make_setup(api, catalog=catalog).run()
    holders = [p for p in api.prices.values() if p.get("lookup_key") == "maintenance_basic_monthly"]
    assert len(holders) == 1 and holders[0]["unit_amount"] == 5_900 and holders[0]["id"] != old_id
    assert api.prices[old_id]["active"] is False
    assert [a.target for a in report.actions if a.verb == "created"] == ["maintenance_basic_monthly"]
    # the portal now offers the new price
    portal = next(c for c in api.portals.values() if c.get("metadata", {}).get("platform") == "billing")
    basic = next(p for p in portal["features"]["subscription_update"]["products"]
                 if p["product"] == "billing_maintenance_basic")
    assert holders[0]["id"] in basic["prices"] and old_id not in basic["prices"]
    assert (await make_setup(api, catalog=catalog).run()).writes == 0


async def test_drifted_objects_are_put_back() -> None:
    api = FakeStripe()
    await make_setup(api).run()
    [endpoint] = api.webhooks.values()
    endpoint["enabled_events"] = ["checkout.session.completed"]
    api.products["billing_maintenance_basic"]["name"] = "renamed by hand"
    report = await make_setup(api).run()
    assert {(a.kind, a.verb) for a in report.actions if a.verb != "unchanged"} == {
        ("webhook_endpoint", "updated"), ("product", "updated")}
    assert set(endpoint["enabled_events"]) == set(WEBHOOK_EVENTS)
    assert len(api.webhooks) == 1


async def test_smoke_against_stripe_mock(stripe_mock: Any) -> None:
    settings = PaymentsSettings(stripe_api_base=stripe_mock.url, stripe_secret_key="sk_test_local")
    args = argparse.Namespace(dry_run=False, webhook_url=None, portal_return_url=None, catalog=None, json=False)
    report = await run(args, settings)
    kinds = {a.kind for a in report.actions}
    assert kinds == {"webhook_endpoint", "product", "price", "payment_methods", "portal_configuration"}


def test_cli_help_and_live_key_refusal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_" + "a" * 30)
    assert main([]) == 2
    assert "live-mode key" in capsys.readouterr().err


def test_the_endpoint_subscribes_to_exactly_the_handled_types() -> None:
    assert sorted(HANDLERS) == WEBHOOK_EVENTS


def test_dry_run_counts_the_changes_it_lists(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary line counts the actions above it: N "would ..." lines, "N change(s) planned."."""
    api = FakeStripe()
    monkeypatch.setattr(setup_command.StripeSdkGateway, "from_settings", classmethod(lambda cls, settings: api))
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_local")

    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    planned = [line for line in out if " would " in line]
    # webhook endpoint, 3 products, 6 prices, payment methods, portal: nothing exists yet
    assert len(planned) == 12 and api.writes == []
    assert out[-1] == "12 change(s) planned."

    assert main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{len(api.writes)} change(s)." and len(api.writes) == 12
    assert main(["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 change(s) planned."
