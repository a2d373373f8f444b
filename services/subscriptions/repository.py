"""Queries of the subscriptions service (SQLAlchemy 2, async). No commits here: the unit of work does."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.subscription import SubscriptionStatus
from kit.pagination import PageRequest, PageResult, SortKey, paginate
from services.subscriptions.models import (
    Customer,
    Plan,
    PlatformObject,
    Price,
    Subscription,
    SubscriptionHistory,
)

TEST_CLOCK = "test_clock"
PORTAL_CONFIGURATION = "portal_configuration"


async def advisory_lock(session: AsyncSession, key: str) -> None:
    """Held until the transaction ends: serializes the API and the consumers on one Stripe object."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})


class PlanRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, plan: Plan) -> None:
        self.session.add(plan)

    async def get(self, plan_id: uuid.UUID, *, for_update: bool = False) -> Plan | None:
        return await self.session.get(Plan, plan_id, with_for_update=for_update, populate_existing=for_update)

    async def page(self, page: PageRequest, *, active: bool | None) -> PageResult[Plan]:
        stmt = select(Plan)
        if active is not None:
            stmt = stmt.where(Plan.active.is_(active))
        order = [SortKey(Plan.created_at), SortKey(Plan.id)]
        return await paginate(self.session, stmt, order=order, page=page, with_total=True,
                              scope=f"plans:active={active}")

    async def price(self, price_id: uuid.UUID) -> Price | None:
        return await self.session.get(Price, price_id)

    async def prices_by_stripe_id(self, stripe_price_id: str) -> Sequence[Price]:
        return (await self.session.scalars(select(Price).where(Price.stripe_price_id == stripe_price_id))).all()

    async def active_price_by_lookup_key(self, lookup_key: str) -> Price | None:
        return await self.session.scalar(select(Price).where(Price.lookup_key == lookup_key, Price.active.is_(True)))

    async def plans_by_ids(self, ids: set[uuid.UUID]) -> dict[uuid.UUID, Plan]:
        if not ids:
            return {}
        return {p.id: p for p in (await self.session.scalars(select(Plan).where(Plan.id.in_(ids)))).all()}

    async def all_plans(self) -> Sequence[Plan]:
        return (await self.session.scalars(select(Plan).order_by(Plan.created_at, Plan.id))).all()


class CustomerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def by_client(self, client_id: uuid.UUID) -> Customer | None:
        return await self.session.get(Customer, client_id)

    async def by_stripe_id(self, stripe_customer_id: str) -> Customer | None:
        return await self.session.scalar(select(Customer).where(Customer.stripe_customer_id == stripe_customer_id))

    async def insert(self, customer: Customer) -> bool:
        """False when the client (or the Stripe customer) is mapped already."""
        stmt = insert(Customer).values(
            client_id=customer.client_id, stripe_customer_id=customer.stripe_customer_id,
            test_clock_id=customer.test_clock_id, name=customer.name, email=customer.email,
        ).on_conflict_do_nothing().returning(Customer.client_id)
        return (await self.session.execute(stmt)).first() is not None


@dataclass(frozen=True)
class SubscriptionFilter:
    client_id: uuid.UUID | None = None
    statuses: tuple[SubscriptionStatus, ...] = ()

    def scope(self) -> str:
        return f"subscriptions:client={self.client_id}:status={','.join(self.statuses)}"


class SubscriptionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, sub: Subscription) -> None:
        self.session.add(sub)

    async def get(self, sub_id: uuid.UUID, *, for_update: bool = False) -> Subscription | None:
        return await self.session.get(Subscription, sub_id, with_for_update=for_update,
                                      populate_existing=for_update)

    async def by_stripe_id(self, stripe_subscription_id: str, *, for_update: bool = False) -> Subscription | None:
        stmt = select(Subscription).where(Subscription.stripe_subscription_id == stripe_subscription_id)
        if for_update:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(stmt)

    async def page(self, f: SubscriptionFilter, page: PageRequest) -> PageResult[Subscription]:
        stmt = select(Subscription)
        if f.client_id is not None:
            stmt = stmt.where(Subscription.client_id == f.client_id)
        if f.statuses:
            stmt = stmt.where(Subscription.status.in_([s.value for s in f.statuses]))
        order = [SortKey(Subscription.created_at, descending=True), SortKey(Subscription.id, descending=True)]
        return await paginate(self.session, stmt, order=order, page=page, with_total=True, scope=f.scope())

    def add_history(self, row: SubscriptionHistory) -> None:
        self.session.add(row)

    async def history(self, sub_id: uuid.UUID, page: PageRequest) -> PageResult[SubscriptionHistory]:
        stmt = select(SubscriptionHistory).where(SubscriptionHistory.subscription_id == sub_id)
        order = [SortKey(SubscriptionHistory.id)]
        return await paginate(self.session, stmt, order=order, page=page, scope=f"history:{sub_id}")

    async def count_by_status(self) -> dict[str, int]:
        rows = (await self.session.execute(
            select(Subscription.status, func.count()).group_by(Subscription.status))).all()
        return {str(status): int(count) for status, count in rows}


class PlatformRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, kind: str, *, for_update: bool = False) -> PlatformObject | None:
        return await self.session.get(PlatformObject, kind, with_for_update=for_update, populate_existing=for_update)

    def add(self, obj: PlatformObject) -> None:
        self.session.add(obj)
