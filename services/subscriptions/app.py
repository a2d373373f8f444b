"""HTTP API of the subscriptions service (behind the gateway, which authenticates the caller).

Admins manage plans and any subscription; a client sees and manages its own (404 for others'):
signup through Checkout, plan changes with a preview, cancel at period end, resume, billing portal.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, status

from contracts.subscription import SubscriptionStatus
from kit.actor import Actor, AdminActor, CurrentActor
from kit.db import Database, UnitOfWork
from kit.idempotency import HEADER as IDEMPOTENCY_HEADER
from kit.idempotency import Idempotent, IdempotentRoute
from kit.pagination import Page, PageParams
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.web import RequestUnitOfWork
from services.subscriptions.clients import ClientDirectory, HttpClientDirectory
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.consumers import register_consumers
from services.subscriptions.mirror import Mirror
from services.subscriptions.models import IdempotencyKey, InboxEvent, OutboxMessage, Plan, Subscription
from services.subscriptions.plans import PlanService
from services.subscriptions.repository import SubscriptionFilter
from services.subscriptions.schemas import (
    CancelRequest,
    ChangePreviewOut,
    ChangeRequest,
    CheckoutOut,
    CheckoutRequest,
    ClockAdvance,
    ClockOut,
    HistoryOut,
    PendingChangeOut,
    PlanCreate,
    PlanOut,
    PlanUpdate,
    PortalOut,
    PortalRequest,
    PreviewLine,
    PriceOut,
    SubscriptionCreate,
    SubscriptionOut,
)
from services.subscriptions.service import Deps, SubscriptionService
from services.subscriptions.stripe_client import SdkStripeBilling, StripeBilling

MIGRATIONS = Path(__file__).parent / "migrations"


def subscription_service(uow: RequestUnitOfWork, request: Request) -> SubscriptionService:
    return SubscriptionService(uow, request.app.state.deps)


Service = Annotated[SubscriptionService, Depends(subscription_service)]


def plan_service(uow: RequestUnitOfWork, request: Request) -> PlanService:
    return PlanService(uow, request.app.state.deps.stripe)


Plans = Annotated[PlanService, Depends(plan_service)]
def request_key(request: Request) -> str | None:
    """The caller's Idempotency-Key (kit.idempotency replays our answer); it also makes a retried
    request the same request to Stripe."""
    return request.headers.get(IDEMPOTENCY_HEADER)


RequestKey = Annotated[str | None, Depends(request_key)]


def plan_out(plan: Plan, actor: Actor) -> PlanOut:
    prices = [PriceOut.model_validate(p) for p in plan.prices if p.active or actor.is_admin]
    return PlanOut(id=plan.id, name=plan.name, description=plan.description, features=list(plan.features),
                   active=plan.active, prices=prices, stripe_product_id=plan.stripe_product_id,
                   created_at=plan.created_at, updated_at=plan.updated_at)


async def subscription_out(svc: SubscriptionService, row: Subscription) -> SubscriptionOut:
    snap = await svc.mirror.snapshot(row)
    pending = None
    if snap.pending_change is not None:
        pending = PendingChangeOut(price_id=uuid.UUID(snap.pending_change.price_id),
                                   plan_id=uuid.UUID(snap.pending_change.plan_id) if snap.pending_change.plan_id
                                   else None,
                                   quantity=snap.pending_change.quantity,
                                   effective_at=snap.pending_change.effective_at)
    return SubscriptionOut(
        id=row.id, client_id=row.client_id, plan_id=row.plan_id, plan_name=snap.plan_name, price_id=row.price_id,
        status=snap.status, quantity=row.quantity, currency=row.currency, unit_amount=row.unit_amount,
        interval=snap.interval, interval_count=row.interval_count, collection_method=snap.collection_method,
        current_period_start=row.current_period_start, current_period_end=row.current_period_end,
        trial_start=row.trial_start, trial_end=row.trial_end, cancel_at_period_end=row.cancel_at_period_end,
        canceled_at=row.canceled_at, ended_at=row.ended_at, access_until=row.access_until, mrr=row.mrr,
        pending_change=pending, stripe_subscription_id=row.stripe_subscription_id,
        stripe_customer_id=row.stripe_customer_id, version=row.version, created_at=row.created_at,
        updated_at=row.updated_at,
    )


plans = APIRouter(prefix="/api/plans", tags=["plans"], route_class=IdempotentRoute)
subscriptions = APIRouter(prefix="/api/subscriptions", tags=["subscriptions"], route_class=IdempotentRoute)
portal = APIRouter(prefix="/api/billing-portal", tags=["subscriptions"], route_class=IdempotentRoute)
clock = APIRouter(prefix="/api/test-clock", tags=["test clock"], route_class=IdempotentRoute)


# -- plans -----------------------------------------------------------------------------------------
@plans.post("", status_code=status.HTTP_201_CREATED, response_model=PlanOut)
async def create_plan(body: PlanCreate, svc: Plans, actor: AdminActor, _: Idempotent) -> PlanOut:
    """A plan with its prices, each created in Stripe (idempotent by lookup key, `metadata.price_id`)."""
    return plan_out(await svc.create_plan(body), actor)


@plans.get("", response_model=Page[PlanOut])
async def list_plans(
    svc: Plans, actor: CurrentActor, page: PageParams,
    active: Annotated[bool | None, Query(description="Admins: only active (true) or archived (false) plans.")] = None,
) -> Page[PlanOut]:
    """Plans, oldest first; clients see the active ones with their active prices."""
    result = await svc.list_plans(actor, page, active)
    return Page[PlanOut](items=[plan_out(p, actor) for p in result.items], next_cursor=result.next_cursor,
                         has_more=result.has_more, total=result.total)


@plans.get("/{plan_id}", response_model=PlanOut)
async def get_plan(plan_id: uuid.UUID, svc: Plans, actor: CurrentActor) -> PlanOut:
    return plan_out(await svc.get_plan(plan_id, actor), actor)


@plans.put("/{plan_id}", response_model=PlanOut)
async def update_plan(plan_id: uuid.UUID, body: PlanUpdate, svc: Plans, actor: AdminActor) -> PlanOut:
    """Replace name, description, features and prices. Prices are immutable: an entry with `id` keeps
    that price (only `trialDays` may change), an entry without `id` is a new price (one for the same
    currency and interval replaces the old, which is archived), an active price left out is archived."""
    return plan_out(await svc.update_plan(plan_id, body), actor)


@plans.post("/{plan_id}/archive", response_model=PlanOut)
async def archive_plan(plan_id: uuid.UUID, svc: Plans, actor: AdminActor, _: Idempotent) -> PlanOut:
    """No new signups or changes to the plan; running subscriptions carry on."""
    return plan_out(await svc.archive_plan(plan_id), actor)


# -- subscriptions ---------------------------------------------------------------------------------
@subscriptions.post("/checkout", status_code=status.HTTP_201_CREATED, response_model=CheckoutOut)
async def checkout(body: CheckoutRequest, svc: Service, actor: CurrentActor, key: RequestKey,
                   _: Idempotent) -> CheckoutOut:
    """A Stripe Checkout Session (subscription mode) for the client itself, or for `clientId` (admin).
    The subscription appears when Stripe's webhook says so, never on the redirect."""
    session = await svc.start_checkout(actor, body, key)
    assert session.url is not None
    return CheckoutOut(url=session.url, session_id=session.id)


@subscriptions.post("", status_code=status.HTTP_201_CREATED, response_model=SubscriptionOut)
async def create_subscription(body: SubscriptionCreate, svc: Service, _admin: AdminActor, key: RequestKey,
                              _: Idempotent) -> SubscriptionOut:
    """A subscription set up by an admin, charged automatically or billed by invoice (`send_invoice`,
    due after `daysUntilDue`, default 30)."""
    return await subscription_out(svc, await svc.create_subscription(body, key))


@subscriptions.get("", response_model=Page[SubscriptionOut])
async def list_subscriptions(
    svc: Service, actor: CurrentActor, page: PageParams,
    client_id: Annotated[uuid.UUID | None, Query(alias="clientId")] = None,
    status_: Annotated[list[SubscriptionStatus] | None, Query(alias="status")] = None,
) -> Page[SubscriptionOut]:
    """Subscriptions, newest first; a client sees its own."""
    f = SubscriptionFilter(client_id=client_id, statuses=tuple(sorted(set(status_ or ()))))
    result = await svc.search(actor, f, page)
    return Page[SubscriptionOut](items=[await subscription_out(svc, r) for r in result.items],
                                 next_cursor=result.next_cursor, has_more=result.has_more, total=result.total)


@subscriptions.get("/{subscription_id}", response_model=SubscriptionOut)
async def get_subscription(subscription_id: uuid.UUID, svc: Service, actor: CurrentActor) -> SubscriptionOut:
    return await subscription_out(svc, await svc.get(subscription_id, actor))


@subscriptions.get("/{subscription_id}/history", response_model=Page[HistoryOut])
async def subscription_history(subscription_id: uuid.UUID, svc: Service, actor: CurrentActor,
                               page: PageParams) -> Page[HistoryOut]:
    """Every version of the subscription, oldest first, with what caused it."""
    result = await svc.history(subscription_id, actor, page)
    return Page[HistoryOut](items=[HistoryOut.model_validate(h) for h in result.items],
                            next_cursor=result.next_cursor, has_more=result.has_more)


@subscriptions.get("/{subscription_id}/change-preview", response_model=ChangePreviewOut)
async def change_preview(
    subscription_id: uuid.UUID, svc: Service, actor: CurrentActor,
    price_id: Annotated[uuid.UUID, Query(alias="priceId")],
    quantity: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> ChangePreviewOut:
    """What a change to `priceId` (and `quantity`) costs: Stripe's proration lines as of a pinned
    `prorationDate`, the amount due now and the next invoice's total."""
    preview = await svc.preview_change(subscription_id, actor, price_id, quantity)
    return ChangePreviewOut(
        proration_date=preview.proration_date,
        kind=preview.plan.kind,
        proration_behavior=preview.plan.proration_behavior,
        effective="period_end" if preview.plan.at_period_end else "now",
        lines=[PreviewLine(description=line.description, amount=line.amount, currency=line.currency,
                           quantity=line.quantity, price_id=ours, proration=line.proration,
                           period_start=line.period_start, period_end=line.period_end)
               for line, ours in preview.lines],
        amount_due_now=preview.amount_due_now,
        next_invoice_total=preview.next_invoice_total,
        currency=preview.currency,
    )


@subscriptions.post("/{subscription_id}/change", response_model=SubscriptionOut)
async def change_subscription(subscription_id: uuid.UUID, body: ChangeRequest, svc: Service, actor: CurrentActor,
                              key: RequestKey, _: Idempotent) -> SubscriptionOut:
    """Apply a previewed change with the preview's `prorationDate`. Upgrades are invoiced now;
    downgrades per the deployment's policy (credited on the next invoice, or at the period end: then
    `pendingChange` shows it until the renewal); an interval change restarts the cycle now."""
    return await subscription_out(svc, await svc.change(subscription_id, actor, body, key))


@subscriptions.post("/{subscription_id}/cancel", response_model=SubscriptionOut)
async def cancel_subscription(subscription_id: uuid.UUID, svc: Service, actor: CurrentActor, key: RequestKey,
                              _: Idempotent, body: CancelRequest | None = None) -> SubscriptionOut:
    """Cancel at the period end (default; access lasts until `accessUntil`) or at once (admins)."""
    at_period_end = body.at_period_end if body is not None else True
    return await subscription_out(svc, await svc.cancel(subscription_id, actor, at_period_end=at_period_end,
                                                        request_key=key))


@subscriptions.post("/{subscription_id}/resume", response_model=SubscriptionOut)
async def resume_subscription(subscription_id: uuid.UUID, svc: Service, actor: CurrentActor, key: RequestKey,
                              _: Idempotent) -> SubscriptionOut:
    """Undo a cancellation at period end (only before the period ends), or resume a paused one."""
    return await subscription_out(svc, await svc.resume(subscription_id, actor, key))


# -- billing portal and test clock -------------------------------------------------------------
@portal.post("", response_model=PortalOut)
async def billing_portal(svc: Service, actor: CurrentActor, body: PortalRequest | None = None) -> PortalOut:
    """A Stripe billing-portal session for the caller's customer (or `clientId`'s, for an admin)."""
    return PortalOut(url=await svc.portal_session(actor, body or PortalRequest()))


@clock.get("", response_model=ClockOut)
async def get_clock(svc: Service, _: AdminActor) -> ClockOut:
    """The platform's test clock (created on first use)."""
    current = await svc.platform_clock(create=False)
    if current is None:
        return ClockOut(id="", frozen_time=None, status=None)
    return ClockOut(id=current.stripe_id, frozen_time=current.frozen_time, status=current.status)


@clock.post("/advance", response_model=ClockOut)
async def advance_clock(body: ClockAdvance, svc: Service, _admin: AdminActor, _: Idempotent) -> ClockOut:
    """Advance the platform's test clock to `to` (test mode only; never backwards). Renewals and trial
    ends of the customers on it follow, as Stripe's webhooks report them."""
    advanced = await svc.advance_clock(body.to)
    return ClockOut(id=advanced.stripe_id, frozen_time=advanced.frozen_time, status=advanced.status)


# -- wiring ----------------------------------------------------------------------------------------
def build_runtime(
    settings: SubscriptionsSettings | None = None,
    *,
    stripe: StripeBilling | None = None,
    clients: ClientDirectory | None = None,
) -> tuple[ServiceRuntime, Deps]:
    settings = settings or SubscriptionsSettings()
    db = Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  idempotency_model=IdempotencyKey, pool_size=settings.db_pool_size)
    directory = clients or HttpClientDirectory(settings.invoice_url, settings.internal_token)
    deps = Deps(settings=settings, stripe=stripe or SdkStripeBilling.from_settings(settings), clients=directory)
    broker = make_broker(settings)

    def mirror(uow: UnitOfWork) -> Mirror:
        return Mirror(uow, deps.stripe)

    register_consumers(broker, db, mirror, settings.group_id)

    async def close_directory() -> None:
        if isinstance(directory, HttpClientDirectory):
            await directory.aclose()

    runtime = ServiceRuntime(settings=settings, db=db, broker=broker, migrations=MIGRATIONS,
                             on_shutdown=[close_directory])
    return runtime, deps


def create_app(
    settings: SubscriptionsSettings | None = None,
    *,
    stripe: StripeBilling | None = None,
    clients: ClientDirectory | None = None,
) -> FastAPI:
    runtime, deps = build_runtime(settings, stripe=stripe, clients=clients)
    app = create_service_app(
        runtime,
        title="Subscriptions service",
        description="Plans and prices, signup, the mirror of Stripe's subscriptions, plan changes with "
                    "proration, cancellation, the billing portal and the test clock.",
        routers=[plans, subscriptions, portal, clock],
    )
    app.state.deps = deps
    return app
