"""Stripe setup as code (seed phase 1: S2 webhook endpoint, S3 products and prices, S4 payment methods,
S5 customer portal). Safe to run any number of times:

    python -m services.payments.stripe_setup [--dry-run] [--webhook-url URL] [--catalog FILE]

Idempotency, by what Stripe lets us look things up by:
* webhook endpoint: by URL; its enabled events are brought up to date;
* products: by our own product id (Stripe accepts a custom `id` on create);
* prices: by lookup key. Stripe prices are immutable: a changed amount or interval makes a new price
  that takes the lookup key over (`transfer_lookup_key`); the old one is archived;
* payment methods: the account's default payment method configuration, each method switched on;
* customer portal: the configuration whose metadata.platform is "billing".

Uses STRIPE_SECRET_KEY / STRIPE_API_BASE like the service (offline: stripe-mock, which is stateless,
so there every run looks like a first run; the idempotency logic is tested with a fake in memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stripe
from pydantic import BaseModel, ValidationError

from services.payments.config import PaymentsSettings
from services.payments.stripe.gateway import StripeSdkGateway, StripeSetupApi
from services.payments.stripe.handlers import HANDLERS

PLATFORM = "billing"


class CatalogPrice(BaseModel):
    lookup_key: str
    unit_amount: int
    currency: str
    interval: str | None = None  # month, year; None = one-off
    interval_count: int = 1
    nickname: str | None = None


class CatalogProduct(BaseModel):
    id: str
    name: str
    description: str | None = None
    prices: list[CatalogPrice]
    # Offered for plan changes in the customer portal.
    portal: bool = True


class Catalog(BaseModel):
    products: list[CatalogProduct]


DEFAULT_CATALOG = Catalog(
    products=[
        CatalogProduct(
            id=f"{PLATFORM}_maintenance_{tier}",
            name=f"Website maintenance — {tier.title()}",
            description=desc,
            prices=[
                CatalogPrice(lookup_key=f"maintenance_{tier}_monthly", unit_amount=monthly, currency="eur",
                             interval="month", nickname=f"{tier.title()} monthly"),
                CatalogPrice(lookup_key=f"maintenance_{tier}_yearly", unit_amount=monthly * 10, currency="eur",
                             interval="year", nickname=f"{tier.title()} yearly"),
            ],
        )
        for tier, monthly, desc in (
            ("basic", 4_900, "Updates, backups and uptime monitoring."),
            ("standard", 14_900, "Basic plus 2 hours of changes a month."),
            ("premium", 29_900, "Standard plus priority support and 6 hours of changes a month."),
        )
    ]
)

# Exactly the types payments handles (the endpoint is ours alone: Stripe need not send anything else).
WEBHOOK_EVENTS = sorted(HANDLERS)


CHANGES = ("created", "updated")
PLANNED = ("would create", "would update")


@dataclass
class Action:
    kind: str
    target: str
    verb: str  # created, updated, unchanged, would create, would update
    detail: str = ""


@dataclass
class SetupReport:
    actions: list[Action] = field(default_factory=list)
    webhook_secret: str | None = None

    def add(self, kind: str, target: str, verb: str, detail: str = "") -> None:
        self.actions.append(Action(kind, target, verb, detail))

    @property
    def writes(self) -> int:
        """What was written to Stripe (0 in a dry run)."""
        return sum(1 for a in self.actions if a.verb in CHANGES)

    @property
    def planned(self) -> int:
        """What a dry run would write."""
        return sum(1 for a in self.actions if a.verb in PLANNED)

    def lines(self) -> list[str]:
        return [f"{a.kind:<24} {a.target:<40} {a.verb}{(' — ' + a.detail) if a.detail else ''}" for a in self.actions]


def _subset(desired: Any, current: Any) -> bool:
    """True when everything in `desired` is already so in `current` (lists compared as sets)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(_subset(v, current.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(current, list):
            return False
        norm = lambda items: sorted(json.dumps(i, sort_keys=True) for i in items)  # noqa: E731
        return norm(desired) == norm(current)
    return bool(desired == current)


class StripeSetup:
    def __init__(
        self,
        api: StripeSetupApi,
        *,
        webhook_url: str,
        portal_return_url: str,
        payment_methods: list[str],
        catalog: Catalog = DEFAULT_CATALOG,
        dry_run: bool = False,
        api_version: str | None = None,
    ) -> None:
        self.api = api
        self.webhook_url = webhook_url
        self.portal_return_url = portal_return_url
        self.payment_methods = payment_methods
        self.catalog = catalog
        self.dry_run = dry_run
        self.api_version = api_version
        self.report = SetupReport()

    def _verb(self, verb: str) -> str:
        return f"would {verb.removesuffix('d')}" if self.dry_run else verb

    async def run(self) -> SetupReport:
        await self.webhook_endpoint()
        prices = await self.products_and_prices()
        await self.payment_method_configuration()
        await self.portal_configuration(prices)
        return self.report

    # S2 ------------------------------------------------------------------------------------------
    async def webhook_endpoint(self) -> None:
        endpoints = [e for e in await self.api.list_webhook_endpoints() if e.get("url") == self.webhook_url]
        desired = {"enabled_events": WEBHOOK_EVENTS, "metadata": {"platform": PLATFORM}}
        if not endpoints:
            params: dict[str, Any] = {**desired, "url": self.webhook_url,
                                      "description": "Billing platform: payments service"}
            if self.api_version:
                params["api_version"] = self.api_version
            created: dict[str, Any] = {}
            if not self.dry_run:
                created = await self.api.create_webhook_endpoint(params)
                self.report.webhook_secret = created.get("secret")
            self.report.add("webhook_endpoint", self.webhook_url, self._verb("created"), created.get("id", ""))
            return
        endpoint = endpoints[0]
        wanted = {"enabled_events": WEBHOOK_EVENTS, "metadata": {"platform": PLATFORM}}
        current = {"enabled_events": endpoint.get("enabled_events") or [],
                   "metadata": {"platform": (endpoint.get("metadata") or {}).get("platform")}}
        if _subset(wanted, current) and endpoint.get("status", "enabled") == "enabled":
            self.report.add("webhook_endpoint", self.webhook_url, "unchanged", endpoint.get("id", ""))
            return
        if not self.dry_run:
            await self.api.update_webhook_endpoint(endpoint["id"], {**wanted, "disabled": False})
        self.report.add("webhook_endpoint", self.webhook_url, self._verb("updated"), endpoint.get("id", ""))

    # S3 ------------------------------------------------------------------------------------------
    async def products_and_prices(self) -> dict[str, list[str]]:
        """Returns product id -> ids of its current prices (for the portal's plan changes)."""
        for product in self.catalog.products:
            desired = {"name": product.name, "description": product.description,
                       "metadata": {"platform": PLATFORM}, "active": True}
            current = await self.api.retrieve_product(product.id)
            if current is None:
                if not self.dry_run:
                    await self.api.create_product({"id": product.id, **desired})
                self.report.add("product", product.id, self._verb("created"))
            elif _subset(desired, current):
                self.report.add("product", product.id, "unchanged")
            else:
                if not self.dry_run:
                    await self.api.update_product(product.id, desired)
                self.report.add("product", product.id, self._verb("updated"))

        keys = [p.lookup_key for prod in self.catalog.products for p in prod.prices]
        existing = {p.get("lookup_key"): p for p in await self.api.list_prices(keys) if p.get("lookup_key") in keys}
        result: dict[str, list[str]] = {}
        for product in self.catalog.products:
            for price in product.prices:
                current = existing.get(price.lookup_key)
                if current is not None and self._price_matches(current, product.id, price):
                    self.report.add("price", price.lookup_key, "unchanged", current.get("id", ""))
                    result.setdefault(product.id, []).append(current["id"])
                    continue
                params: dict[str, Any] = {
                    "product": product.id,
                    "currency": price.currency,
                    "unit_amount": price.unit_amount,
                    "lookup_key": price.lookup_key,
                    "transfer_lookup_key": True,
                    "metadata": {"platform": PLATFORM},
                }
                if price.nickname:
                    params["nickname"] = price.nickname
                if price.interval:
                    params["recurring"] = {"interval": price.interval, "interval_count": price.interval_count}
                created = {"id": f"(new {price.lookup_key})"}
                if not self.dry_run:
                    created = await self.api.create_price(params)
                    if current is not None and current.get("id") != created.get("id"):
                        await self.api.update_price(current["id"], {"active": False})
                detail = f"replaces {current['id']} (archived)" if current is not None else ""
                self.report.add("price", price.lookup_key, self._verb("created"), detail)
                result.setdefault(product.id, []).append(created["id"])
        return result

    @staticmethod
    def _price_matches(current: dict[str, Any], product_id: str, price: CatalogPrice) -> bool:
        recurring = current.get("recurring") or {}
        product = current.get("product")
        product = product.get("id") if isinstance(product, dict) else product
        return (
            product == product_id
            and current.get("active", True)
            and (current.get("currency") or "").lower() == price.currency.lower()
            and current.get("unit_amount") == price.unit_amount
            and (recurring.get("interval") if recurring else None) == price.interval
            and (not price.interval or recurring.get("interval_count", 1) == price.interval_count)
        )

    # S4 ------------------------------------------------------------------------------------------
    async def payment_method_configuration(self) -> None:
        configs = await self.api.list_payment_method_configurations()
        default = next((c for c in configs if c.get("is_default") and not c.get("parent")), None)
        default = default or next((c for c in configs if c.get("is_default")), None)
        if default is None:
            self.report.add("payment_methods", "(default configuration)", "unchanged",
                            "no default configuration on this account; sessions pass payment_method_types")
            return
        changes = {
            method: {"display_preference": {"preference": "on"}}
            for method in self.payment_methods
            if ((default.get(method) or {}).get("display_preference") or {}).get("preference") != "on"
        }
        if not changes:
            self.report.add("payment_methods", default["id"], "unchanged", ", ".join(self.payment_methods))
            return
        if not self.dry_run:
            await self.api.update_payment_method_configuration(default["id"], changes)
        self.report.add("payment_methods", default["id"], self._verb("updated"), "on: " + ", ".join(changes))

    # S5 ------------------------------------------------------------------------------------------
    def _portal_params(self, prices: dict[str, list[str]]) -> dict[str, Any]:
        products = [
            {"product": prod.id, "prices": sorted(prices.get(prod.id, []))}
            for prod in self.catalog.products
            if prod.portal and prices.get(prod.id) and all(p.interval for p in prod.prices)
        ]
        features: dict[str, Any] = {
            "customer_update": {"enabled": True, "allowed_updates": ["address", "email", "tax_id"]},
            "invoice_history": {"enabled": True},
            "payment_method_update": {"enabled": True},
            "subscription_cancel": {"enabled": True, "mode": "at_period_end", "proration_behavior": "none"},
        }
        if products:
            features["subscription_update"] = {
                "enabled": True,
                "default_allowed_updates": ["price"],
                "proration_behavior": "create_prorations",
                "products": products,
            }
        return {
            "business_profile": {"headline": "Manage your maintenance subscription and invoices"},
            "default_return_url": self.portal_return_url,
            "features": features,
            "metadata": {"platform": PLATFORM},
        }

    async def portal_configuration(self, prices: dict[str, list[str]]) -> None:
        desired = self._portal_params(prices)
        ours = [c for c in await self.api.list_portal_configurations()
                if (c.get("metadata") or {}).get("platform") == PLATFORM]
        if not ours:
            if not self.dry_run:
                created = await self.api.create_portal_configuration(desired)
                self.report.add("portal_configuration", created.get("id", ""), "created")
            else:
                self.report.add("portal_configuration", "(new)", "would create")
            return
        current = ours[0]
        if _subset(desired, current):
            self.report.add("portal_configuration", current["id"], "unchanged")
            return
        if not self.dry_run:
            await self.api.update_portal_configuration(current["id"], desired)
        self.report.add("portal_configuration", current["id"], self._verb("updated"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.payments.stripe_setup",
        description="Create or update the Stripe objects the billing platform needs: webhook endpoint, "
                    "products and prices (by lookup key), payment methods, customer portal. Idempotent.",
    )
    parser.add_argument("--dry-run", action="store_true", help="read only: print what would change")
    parser.add_argument("--webhook-url", help="public URL of /webhooks/stripe "
                                              "(default: PAYMENTS_PUBLIC_URL + /webhooks/stripe)")
    parser.add_argument("--portal-return-url", help="where the customer portal sends people back "
                                                    "(default: PAYMENTS_PORTAL_URL)")
    parser.add_argument("--catalog", type=Path, help="JSON file with {products: [...]} replacing the built-in catalog")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


async def run(args: argparse.Namespace, settings: PaymentsSettings, api: StripeSetupApi | None = None) -> SetupReport:
    catalog = DEFAULT_CATALOG
    if args.catalog:
        catalog = Catalog.model_validate_json(args.catalog.read_text())
    setup = StripeSetup(
        api or StripeSdkGateway.from_settings(settings),
        webhook_url=args.webhook_url or f"{settings.public_url.rstrip('/')}/webhooks/stripe",
        portal_return_url=args.portal_return_url or settings.portal_url,
        payment_methods=list(settings.payment_methods),
        catalog=catalog,
        dry_run=args.dry_run,
        # stripe-mock knows only the API versions of its spec: let it use its default.
        api_version=None if settings.local_stripe else stripe.api_version,
    )
    return await setup.run()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = PaymentsSettings()
    except ValidationError as exc:
        print("stripe_setup: " + "; ".join(str(e.get("msg")) for e in exc.errors()), file=sys.stderr)
        return 2
    where = settings.stripe_api_base or "Stripe (test mode)"
    print(f"Stripe setup against {where}{' (dry run)' if args.dry_run else ''}", file=sys.stderr)
    try:
        report = asyncio.run(run(args, settings))
    except Exception as exc:  # a Stripe error: say what, exit non-zero
        print(f"stripe_setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"actions": [a.__dict__ for a in report.actions], "writes": report.writes,
                          "planned": report.planned}, indent=2))
    else:
        print("\n".join(report.lines()))
        print(f"{report.planned} change(s) planned." if args.dry_run else f"{report.writes} change(s).")
    if report.webhook_secret:
        print(f"\nNew webhook endpoint: set STRIPE_WEBHOOK_SECRET={report.webhook_secret}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
