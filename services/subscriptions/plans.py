"""Plans and their prices (SUB1): prices are immutable like Stripe's; every one is in Stripe
(catalog.py), with our id in its metadata."""

from __future__ import annotations

import uuid

from kit.actor import Actor
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.errors import Conflict, InvalidInput, NotFound
from kit.pagination import PageRequest, PageResult
from services.subscriptions.catalog import CatalogSync
from services.subscriptions.models import Plan, Price
from services.subscriptions.repository import PlanRepository
from services.subscriptions.schemas import PlanCreate, PlanUpdate, PriceIn
from services.subscriptions.stripe_client import StripeBilling


def default_lookup_key(plan_id: uuid.UUID, entry: PriceIn) -> str:
    # One per plan, currency and interval: a new amount takes the key over (Stripe's transfer_lookup_key).
    return f"plan_{plan_id.hex[:12]}_{entry.currency.lower()}_{entry.interval_count}{entry.interval.value}"


class PlanService:
    def __init__(self, uow: UnitOfWork, stripe: StripeBilling) -> None:
        self.session = uow.session
        self.plans = PlanRepository(uow.session)
        self.catalog = CatalogSync(stripe)

    async def create_plan(self, body: PlanCreate) -> Plan:
        plan = Plan(id=uuid.uuid4(), name=body.name, description=body.description, features=list(body.features),
                    active=True, prices=[])
        self.plans.add(plan)
        plan.stripe_product_id = await self.catalog.product(plan)
        for entry in body.prices:
            await self._add_price(plan, entry)
        await self.session.flush()
        return plan

    async def update_plan(self, plan_id: uuid.UUID, body: PlanUpdate) -> Plan:
        plan = await self._plan_for_update(plan_id)
        if not plan.active:
            raise Conflict("An archived plan cannot be edited.", code="plan_archived")
        plan.name, plan.description, plan.features = body.name, body.description, list(body.features)
        plan.stripe_product_id = await self.catalog.product(plan)
        by_id = {p.id: p for p in plan.prices}
        kept: set[uuid.UUID] = set()
        new_entries: list[PriceIn] = []
        for entry in body.prices:
            if entry.id is None:
                new_entries.append(entry)
                continue
            existing = by_id.get(entry.id)
            if existing is None:
                raise InvalidInput(f"Price {entry.id} is not a price of this plan.", code="unknown_price",
                                   details=[{"field": "prices.id", "message": "not a price of this plan"}])
            if not existing.active:
                raise Conflict(f"Price {entry.id} is archived; add a new price (an entry without id) instead.",
                               code="price_archived")
            if (existing.currency, existing.amount, existing.interval, existing.interval_count) != (
                    entry.currency, entry.amount, entry.interval.value, entry.interval_count) or (
                    entry.lookup_key is not None and entry.lookup_key != existing.lookup_key):
                raise InvalidInput(
                    f"Price {entry.id} cannot change: prices are immutable. Give the new amount as a new entry "
                    "(without id); the old price is archived.", code="price_immutable")
            existing.trial_days = entry.trial_days  # ours, not Stripe's: applied at signup
            kept.add(existing.id)
        for price in plan.prices:
            if price.active and price.id not in kept:
                await self._archive_price(price)
        await self.session.flush()  # the archived prices free their lookup keys
        for entry in new_entries:
            await self._add_price(plan, entry)
        await self.session.flush()
        return plan

    async def archive_plan(self, plan_id: uuid.UUID) -> Plan:
        """No new signups or changes to it; running subscriptions carry on as they are."""
        plan = await self._plan_for_update(plan_id)
        if not plan.active:
            return plan
        plan.active = False
        for price in plan.prices:
            if price.active:
                await self._archive_price(price)
        await self.catalog.product(plan)  # inactive in Stripe too
        await self.session.flush()
        return plan

    async def get_plan(self, plan_id: uuid.UUID, actor: Actor) -> Plan:
        plan = await self.plans.get(plan_id)
        if plan is None or (not plan.active and not actor.is_admin):
            raise NotFound(f"Plan {plan_id} not found.")
        return plan

    async def list_plans(self, actor: Actor, page: PageRequest, active: bool | None) -> PageResult[Plan]:
        if not actor.is_admin:
            active = True  # clients choose among what is on offer
        return await self.plans.page(page, active=active)

    async def _plan_for_update(self, plan_id: uuid.UUID) -> Plan:
        plan = await self.plans.get(plan_id, for_update=True)
        if plan is None:
            raise NotFound(f"Plan {plan_id} not found.")
        return plan

    async def _add_price(self, plan: Plan, entry: PriceIn) -> Price:
        lookup_key = entry.lookup_key or default_lookup_key(plan.id, entry)
        taken = await self.plans.active_price_by_lookup_key(lookup_key)
        if taken is not None:
            raise Conflict(f"The lookup key {lookup_key!r} belongs to the active price {taken.id}.",
                           code="lookup_key_taken")
        price = Price(id=uuid.uuid4(), plan_id=plan.id, currency=entry.currency, amount=entry.amount,
                      interval=entry.interval.value, interval_count=entry.interval_count,
                      trial_days=entry.trial_days, lookup_key=lookup_key, active=True)
        plan.prices.append(price)
        price.stripe_price_id = await self.catalog.price(plan, price)
        return price

    async def _archive_price(self, price: Price) -> None:
        price.active = False
        price.archived_at = utcnow()
        await self.catalog.archive_price(price)

    async def offered_price(self, price_id: uuid.UUID) -> tuple[Price, Plan]:
        price = await self.plans.price(price_id)
        if price is None:
            raise InvalidInput(f"Price {price_id} does not exist.", code="unknown_price",
                               details=[{"field": "priceId", "message": "unknown price"}])
        plan = await self.plans.get(price.plan_id)
        if not price.active or plan is None or not plan.active:
            raise Conflict(f"Price {price_id} is archived: choose one of the plan's current prices.",
                           code="price_archived")
        if not price.stripe_price_id:
            raise Conflict(f"Price {price_id} is not in Stripe yet: run the setup command "
                           "(python -m services.subscriptions.stripe_setup).", code="price_not_in_stripe")
        return price, plan
