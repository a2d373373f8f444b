"""Plans and prices in Stripe: one product per plan (our id in its id and metadata), one Stripe price
per price, idempotent by lookup key. Used by the API (each plan as it is saved) and by the setup
command (every plan at once, or a dry run that only says what it would do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.subscriptions.models import Plan, Price
from services.subscriptions.stripe_client import StripeBilling, StripePrice

PLATFORM = "billing"


def product_id_of(plan: Plan) -> str:
    return f"plan_{plan.id.hex}"


@dataclass
class Action:
    kind: str
    target: str
    verb: str  # created, updated, unchanged, would create, would update
    detail: str = ""


@dataclass
class CatalogReport:
    actions: list[Action] = field(default_factory=list)

    def add(self, kind: str, target: str, verb: str, detail: str = "") -> None:
        self.actions.append(Action(kind, target, verb, detail))

    @property
    def writes(self) -> int:
        return sum(1 for a in self.actions if a.verb in ("created", "updated"))

    @property
    def planned(self) -> int:
        """What a dry run would have changed."""
        return sum(1 for a in self.actions if a.verb.startswith("would "))

    def lines(self) -> list[str]:
        return [f"{a.kind:<22} {a.target:<44} {a.verb}{(' — ' + a.detail) if a.detail else ''}"
                for a in self.actions]


def price_matches(existing: StripePrice, price: Price, product_id: str) -> bool:
    """Stripe's price already is this price (same product, amount, currency, interval)."""
    recurring = existing.recurring
    return (existing.active and existing.product == product_id and existing.unit_amount == price.amount
            and existing.currency == price.currency and recurring is not None
            and recurring.interval == price.interval and (recurring.interval_count or 1) == price.interval_count)


class CatalogSync:
    def __init__(self, stripe: StripeBilling, *, dry_run: bool = False, report: CatalogReport | None = None) -> None:
        self.stripe = stripe
        self.dry_run = dry_run
        self.report = report or CatalogReport()

    def _verb(self, verb: str) -> str:
        return f"would {verb.removesuffix('d')}" if self.dry_run else verb

    async def product(self, plan: Plan) -> str:
        """The plan's Stripe product id, the product created or brought up to date."""
        product_id = plan.stripe_product_id or product_id_of(plan)
        desired: dict[str, Any] = {"name": plan.name, "metadata": {"plan_id": str(plan.id), "platform": PLATFORM}}
        if plan.description:
            desired["description"] = plan.description
        current = await self.stripe.retrieve_product(product_id)
        if current is None:
            if not self.dry_run:
                product_id = (await self.stripe.create_product({"id": product_id, **desired})).id
            self.report.add("product", product_id, self._verb("created"), plan.name)
            return product_id
        wanted_active = plan.active
        if current.name == plan.name and (current.description or None) == (plan.description or None) \
                and current.active == wanted_active:
            self.report.add("product", product_id, "unchanged", plan.name)
            return product_id
        if not self.dry_run:
            await self.stripe.update_product(product_id, {**desired, "active": wanted_active})
        self.report.add("product", product_id, self._verb("updated"), plan.name)
        return product_id

    async def price(self, plan: Plan, price: Price) -> str:
        """The Stripe price id of `price`: an active Stripe price with its lookup key and terms is
        reused; otherwise a new one is created and takes the lookup key over."""
        product_id = plan.stripe_product_id or product_id_of(plan)
        existing = await self.stripe.find_price(price.lookup_key)
        if existing is not None and price_matches(existing, price, product_id):
            self.report.add("price", price.lookup_key, "unchanged", existing.id)
            return existing.id
        params = {
            "product": product_id,
            "currency": price.currency.lower(),
            "unit_amount": price.amount,
            "recurring": {"interval": price.interval, "interval_count": price.interval_count},
            "lookup_key": price.lookup_key,
            "transfer_lookup_key": True,
            "nickname": f"{plan.name} ({price.interval_count} {price.interval})"[:250],
            "metadata": {"price_id": str(price.id), "plan_id": str(plan.id), "platform": PLATFORM},
        }
        stripe_id = price.stripe_price_id or "(new)"
        if not self.dry_run:
            # A retry of the same create is the same Stripe request; a later re-create (the price was
            # archived in Stripe meanwhile) is a new one.
            key = f"price:{price.id}:{existing.id if existing is not None else 'none'}"
            stripe_id = (await self.stripe.create_price(params, idempotency_key=key)).id
        detail = f"takes the key from {existing.id}" if existing is not None else ""
        self.report.add("price", price.lookup_key, self._verb("created"), detail)
        return stripe_id

    async def archive_price(self, price: Price) -> None:
        if not price.stripe_price_id:
            return
        if not self.dry_run:
            await self.stripe.update_price(price.stripe_price_id, {"active": False})
        self.report.add("price", price.lookup_key, self._verb("updated"), "archived")
