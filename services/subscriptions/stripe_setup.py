"""Stripe setup of the subscriptions service, as code. Safe to run any number of times:

    python -m services.subscriptions.stripe_setup [--dry-run] [--portal-return-url URL] [--json]

* every active plan's Stripe product and every active price (idempotent by lookup key: an active
  Stripe price with our key and terms is reused, otherwise a new one takes the key over), our rows
  pointed at them;
* the billing-portal configuration the platform's portal sessions use (found again by its
  metadata): payment method update, invoice history, cancel at period end, switching among the
  active prices of each plan with proration.

Uses STRIPE_SECRET_KEY / STRIPE_API_BASE and SUBSCRIPTIONS_DATABASE_URL like the service. `--dry-run`
reads only (Stripe and the database) and prints what it would change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from kit.cli import load_settings
from kit.db import Database
from kit.migrations import upgrade_to_head_async
from services.subscriptions.app import MIGRATIONS
from services.subscriptions.catalog import PLATFORM, CatalogReport, CatalogSync
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.models import PlatformObject
from services.subscriptions.repository import PORTAL_CONFIGURATION, PlanRepository, PlatformRepository
from services.subscriptions.stripe_client import SdkStripeBilling, StripeBilling

SERVICE = "subscriptions"


def _subset(desired: Any, current: Any) -> bool:
    """Everything in `desired` is already so in `current` (lists compared as sets)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(_subset(v, current.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(current, list):
            return False
        norm = lambda items: sorted(json.dumps(i, sort_keys=True, default=str) for i in items)  # noqa: E731
        return norm(desired) == norm(current)
    return bool(desired == current)


def portal_params(products: dict[str, list[str]], *, return_url: str, proration_behavior: str) -> dict[str, Any]:
    features: dict[str, Any] = {
        "invoice_history": {"enabled": True},
        "payment_method_update": {"enabled": True},
        "subscription_cancel": {"enabled": True, "mode": "at_period_end", "proration_behavior": "none"},
    }
    switchable = [{"product": product, "prices": sorted(prices)} for product, prices in sorted(products.items())
                  if prices]
    if switchable:
        features["subscription_update"] = {
            "enabled": True,
            "default_allowed_updates": ["price"],
            "proration_behavior": proration_behavior,
            "products": switchable,
        }
    return {
        "business_profile": {"headline": "Manage your subscription, payment method and invoices"},
        "default_return_url": return_url,
        "features": features,
        "metadata": {"platform": PLATFORM, "service": SERVICE},
    }


async def run(settings: SubscriptionsSettings, *, dry_run: bool, return_url: str | None = None,
              stripe: StripeBilling | None = None) -> CatalogReport:
    api = stripe or SdkStripeBilling.from_settings(settings)
    if not dry_run:
        await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    db = Database(settings.database_url, pool_size=2)
    sync = CatalogSync(api, dry_run=dry_run)
    try:
        async with db.transaction() as uow:
            plans = await PlanRepository(uow.session).all_plans()
            products: dict[str, list[str]] = {}
            for plan in plans:
                if not plan.active and not plan.stripe_product_id:
                    continue
                product_id = await sync.product(plan)
                if not dry_run:
                    plan.stripe_product_id = product_id
                for price in plan.prices:
                    if not price.active or not plan.active:
                        continue  # archived in Stripe when it was archived here
                    stripe_price_id = await sync.price(plan, price)
                    if not dry_run:
                        price.stripe_price_id = stripe_price_id
                    products.setdefault(product_id, []).append(stripe_price_id)
            await portal_configuration(
                api, sync, PlatformRepository(uow.session),
                portal_params(products, return_url=return_url or f"{settings.portal_url.rstrip('/')}/subscription",
                              proration_behavior=settings.upgrade_behavior),
            )
            if dry_run:
                await uow.session.rollback()
    finally:
        await db.dispose()
    return sync.report


async def portal_configuration(api: StripeBilling, sync: CatalogSync, platform: PlatformRepository,
                               desired: dict[str, Any]) -> None:
    ours = [c for c in await api.list_portal_configurations()
            if (c.get("metadata") or {}).get("service") == SERVICE]
    if not ours and sync.dry_run:
        sync.report.add("portal_configuration", "(new)", "would create")
        return
    if not ours:
        created = await api.create_portal_configuration(desired)
        config_id = str(created["id"])
        sync.report.add("portal_configuration", config_id, "created")
    else:
        config_id = str(ours[0]["id"])
        if _subset(desired, ours[0]):
            sync.report.add("portal_configuration", config_id, "unchanged")
        elif sync.dry_run:
            sync.report.add("portal_configuration", config_id, "would update")
        else:
            await api.update_portal_configuration(config_id, desired)
            sync.report.add("portal_configuration", config_id, "updated")
    if sync.dry_run:
        return
    stored = await platform.get(PORTAL_CONFIGURATION, for_update=True)
    if stored is None:
        platform.add(PlatformObject(kind=PORTAL_CONFIGURATION, stripe_id=config_id))
    else:
        stored.stripe_id = config_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.subscriptions.stripe_setup",
        description="Create or update what the plans need in Stripe (products, prices by lookup key) and the "
                    "billing-portal configuration. Idempotent.",
    )
    parser.add_argument("--dry-run", action="store_true", help="read only: print what would change")
    parser.add_argument("--portal-return-url", help="where the billing portal sends people back "
                                                    "(default: SUBSCRIPTIONS_PORTAL_URL + /subscription)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings("stripe_setup", SubscriptionsSettings)
    where = settings.stripe_api_base or "Stripe (test mode)"
    print(f"Stripe setup (subscriptions) against {where}{' (dry run)' if args.dry_run else ''}", file=sys.stderr)
    try:
        report = asyncio.run(run(settings, dry_run=args.dry_run, return_url=args.portal_return_url))
    except Exception as exc:  # a Stripe or database error: say what, exit non-zero
        print(f"stripe_setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"actions": [a.__dict__ for a in report.actions], "writes": report.writes,
                          "planned": report.planned}, indent=2))
    else:
        print("\n".join(report.lines()) or "nothing to set up (no plans yet)")
        print(f"{report.planned} change(s) planned." if args.dry_run else f"{report.writes} change(s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
