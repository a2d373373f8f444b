"""The setup command: idempotent by lookup key (checked with an in-memory Stripe, since stripe-mock
forgets everything), a dry run that writes nothing, and its requests accepted by stripe-mock."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from kit.db import Database
from kit.migrations import upgrade_to_head_async
from services.subscriptions.app import MIGRATIONS
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.models import PlatformObject, Price
from services.subscriptions.plans import PlanService
from services.subscriptions.repository import PORTAL_CONFIGURATION
from services.subscriptions.schemas import PlanCreate, PriceIn
from services.subscriptions.stripe_client import Recurring, StripePrice, StripeProduct
from services.subscriptions.stripe_setup import run


class MemoryStripe:
    """What the catalog and the setup use of Stripe, remembered (products, prices, portal configs)."""

    def __init__(self) -> None:
        self.products: dict[str, StripeProduct] = {}
        self.prices: dict[str, StripePrice] = {}
        self.portals: list[dict[str, Any]] = []
        self.writes: list[str] = []

    async def retrieve_product(self, product_id: str) -> StripeProduct | None:
        return self.products.get(product_id)

    async def create_product(self, params: dict[str, Any]) -> StripeProduct:
        self.writes.append("create_product")
        product = StripeProduct(id=params["id"], name=params["name"], description=params.get("description"))
        self.products[product.id] = product
        return product

    async def update_product(self, product_id: str, params: dict[str, Any]) -> StripeProduct:
        self.writes.append("update_product")
        product = self.products[product_id].model_copy(update={k: v for k, v in params.items()
                                                               if k in ("name", "description", "active")})
        self.products[product_id] = product
        return product

    async def find_price(self, lookup_key: str) -> StripePrice | None:
        return next((p for p in self.prices.values() if p.lookup_key == lookup_key and p.active), None)

    async def create_price(self, params: dict[str, Any], *, idempotency_key: str) -> StripePrice:
        self.writes.append("create_price")
        for other in self.prices.values():
            if other.lookup_key == params["lookup_key"]:
                self.prices[other.id] = other.model_copy(update={"lookup_key": None})
        price = StripePrice(id=f"price_{uuid.uuid4().hex[:12]}", product=params["product"],
                            unit_amount=params["unit_amount"], currency=params["currency"].upper(),
                            lookup_key=params["lookup_key"], recurring=Recurring(**params["recurring"]),
                            metadata=params["metadata"])
        self.prices[price.id] = price
        return price

    async def update_price(self, price_id: str, params: dict[str, Any]) -> StripePrice:
        self.writes.append("update_price")
        self.prices[price_id] = self.prices[price_id].model_copy(update=params)
        return self.prices[price_id]

    async def list_portal_configurations(self) -> list[dict[str, Any]]:
        return list(self.portals)

    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create_portal_configuration")
        config = {"id": f"bpc_{len(self.portals) + 1}", **params}
        self.portals.append(config)
        return config

    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("update_portal_configuration")
        config = next(c for c in self.portals if c["id"] == config_id)
        config.update(params)
        return config


async def test_setup_is_idempotent_and_a_dry_run_writes_nothing(
    database_url_factory: Callable[[str], str], stripe_mock: Any
) -> None:
    settings = SubscriptionsSettings(database_url=database_url_factory("subscriptions_setup"), kafka_enabled=False,
                                     stripe_api_base=stripe_mock.url, public_url="http://gateway.test")
    await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    stripe = MemoryStripe()
    db = Database(settings.database_url, pool_size=2)
    try:
        async with db.transaction() as uow:
            svc = PlanService(uow, stripe)  # type: ignore[arg-type]
            basic = await svc.create_plan(PlanCreate(name="Basic", prices=[
                PriceIn(currency="EUR", amount=4_900, interval="month"),
                PriceIn(currency="EUR", amount=49_000, interval="year")]))
            await svc.create_plan(PlanCreate(name="Pro", prices=[PriceIn(currency="EUR", amount=9_900,
                                                                         interval="month")]))
            archived = await svc.create_plan(PlanCreate(name="Old", prices=[
                PriceIn(currency="EUR", amount=100, interval="month")]))
            await svc.archive_plan(archived.id)
        created_in_api = list(stripe.writes)
        assert created_in_api.count("create_price") == 4

        # an empty Stripe account (e.g. a new test-mode key): a dry run only says what it would do
        empty = MemoryStripe()
        dry = await run(settings, dry_run=True, stripe=empty)  # type: ignore[arg-type]
        assert empty.writes == [] and dry.writes == 0 and dry.planned == 7  # 3 products, 3 prices, portal
        verbs = {(a.kind, a.verb) for a in dry.actions}
        assert ("price", "would create") in verbs and ("product", "would create") in verbs
        assert ("portal_configuration", "would create") in verbs

        first = await run(settings, dry_run=False, stripe=stripe)  # type: ignore[arg-type]
        assert stripe.writes[len(created_in_api):] == ["create_portal_configuration"]
        assert {a.verb for a in first.actions if a.kind == "price"} == {"unchanged"}
        portal = stripe.portals[0]
        assert portal["features"]["subscription_cancel"]["mode"] == "at_period_end"
        assert portal["features"]["payment_method_update"] == {"enabled": True}
        assert portal["features"]["invoice_history"] == {"enabled": True}
        switch = portal["features"]["subscription_update"]
        assert switch["proration_behavior"] == "always_invoice"
        by_product = {p["product"]: p["prices"] for p in switch["products"]}
        assert len(by_product[basic.stripe_product_id]) == 2 and len(by_product) == 2  # not the archived plan
        assert portal["default_return_url"] == "http://gateway.test/portal/subscription"

        before = len(stripe.writes)
        second = await run(settings, dry_run=False, stripe=stripe)  # type: ignore[arg-type]
        assert stripe.writes[before:] == [] and second.writes == 0

        # a price archived in Stripe's dashboard is made again (and takes the lookup key back)
        some = next(p for p in stripe.prices.values() if p.unit_amount == 4_900 and p.active)
        stripe.prices[some.id] = some.model_copy(update={"active": False})
        third = await run(settings, dry_run=False, stripe=stripe)  # type: ignore[arg-type]
        assert stripe.writes[-2:] == ["create_price", "update_portal_configuration"] and third.writes == 2
        async with db.transaction() as uow:
            stored = await uow.session.get(PlatformObject, PORTAL_CONFIGURATION)
            assert stored is not None and stored.stripe_id == portal["id"]
            prices = {p.amount: p.stripe_price_id for p in (await uow.session.scalars(select(Price))).all()}
        assert prices[4_900] != some.id and stripe.prices[prices[4_900]].lookup_key == some.lookup_key
    finally:
        await db.dispose()


async def test_setup_requests_pass_stripe_mock(database_url_factory: Callable[[str], str], stripe_mock: Any) -> None:
    settings = SubscriptionsSettings(database_url=database_url_factory("subscriptions_setup_mock"),
                                     kafka_enabled=False, stripe_api_base=stripe_mock.url)
    await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    db = Database(settings.database_url, pool_size=2)
    try:
        async with db.transaction() as uow:
            svc = PlanService(uow, MemoryStripe())  # type: ignore[arg-type]
            await svc.create_plan(PlanCreate(name="Basic", prices=[PriceIn(currency="EUR", amount=4_900,
                                                                           interval="month")]))
    finally:
        await db.dispose()
    report = await run(settings, dry_run=False)
    assert any(a.kind == "portal_configuration" for a in report.actions)
