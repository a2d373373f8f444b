"""Domain of the subscriptions service: signup, plan and quantity changes, cancellation, the billing
portal, customers and the platform's test clock. Plans live in plans.py, the mirror of Stripe's
subscriptions in mirror.py.

Stripe Billing owns the lifecycle: this service asks Stripe to change a subscription and mirrors the
object Stripe answers with (then, again, what its webhooks say).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog

from contracts.stripe import StripeInvoiceLineV1
from contracts.subscription import TERMINAL_STATUSES, CollectionMethod, SubscriptionStatus
from kit.actor import Actor
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.errors import AppError, Conflict, Forbidden, InvalidInput, NotFound
from kit.pagination import PageRequest, PageResult
from services.subscriptions import lifecycle
from services.subscriptions.clients import ClientDirectory
from services.subscriptions.config import SubscriptionsSettings
from services.subscriptions.lifecycle import (
    CHANGEABLE_STATUSES,
    META_CLIENT,
    META_PENDING_AT,
    META_PENDING_PLAN,
    META_PENDING_PRICE,
    META_PENDING_QUANTITY,
    META_PLAN,
    META_PRICE,
    ChangePlan,
    Tariff,
)
from services.subscriptions.mirror import Mirror
from services.subscriptions.models import (
    Customer,
    PlatformObject,
    Price,
    Subscription,
    SubscriptionHistory,
)
from services.subscriptions.plans import PlanService
from services.subscriptions.proration import ChangePreview, prorate, restart_cycle, seconds
from services.subscriptions.repository import (
    PORTAL_CONFIGURATION,
    TEST_CLOCK,
    CustomerRepository,
    PlanRepository,
    PlatformRepository,
    SubscriptionFilter,
    SubscriptionRepository,
    advisory_lock,
)
from services.subscriptions.schemas import (
    ChangeRequest,
    CheckoutRequest,
    PortalRequest,
    SubscriptionCreate,
)
from services.subscriptions.stripe_client import CheckoutSession, InvoicePreview, StripeBilling

log = structlog.get_logger(__name__)
MAX_CLOCK_STEP = timedelta(days=730)


@dataclass(frozen=True)
class Deps:
    """What the domain needs besides its unit of work (shared by the API, consumers and tools)."""

    settings: SubscriptionsSettings
    stripe: StripeBilling
    clients: ClientDirectory


@dataclass(frozen=True)
class Preview:
    proration_date: datetime
    plan: ChangePlan
    lines: list[tuple[StripeInvoiceLineV1, uuid.UUID | None]]  # with our price id, where it is ours
    amount_due_now: int
    next_invoice_total: int
    currency: str


@dataclass(frozen=True)
class _Change:
    row: Subscription
    new: Price
    quantity: int
    old: Tariff
    plan: ChangePlan


def _whole_seconds(value: datetime) -> datetime:
    return value.replace(microsecond=0)


def idempotency_key(action: str, scope: object, request_key: str | None) -> str:
    """Stripe's idempotency key for an action: the caller's Idempotency-Key makes a retry of the same
    request the same Stripe request; without one every call is new."""
    return f"{action}:{scope}:{request_key or uuid.uuid4()}"


class SubscriptionService:
    def __init__(self, uow: UnitOfWork, deps: Deps) -> None:
        self.uow = uow
        self.deps = deps
        self.settings = deps.settings
        self.stripe = deps.stripe
        session = uow.session
        self.session = session
        self.plans = PlanRepository(session)
        self.customers = CustomerRepository(session)
        self.subs = SubscriptionRepository(session)
        self.platform = PlatformRepository(session)
        self.plan_service = PlanService(uow, deps.stripe)
        self.mirror = Mirror(uow, deps.stripe)

    # ==========================================================================================
    # customers and the platform's test clock
    def _client_of_actor(self, actor: Actor, requested: uuid.UUID | None) -> uuid.UUID:
        if actor.is_admin:
            if requested is None:
                raise InvalidInput("clientId is required when an admin acts for a client.", code="client_required",
                                   details=[{"field": "clientId", "message": "required"}])
            return requested
        if actor.role == "client" and actor.client_id:
            own = lifecycle.parse_uuid(actor.client_id)
            if own is None or (requested is not None and requested != own):
                raise NotFound(f"Client {requested} not found.")
            return own
        raise Forbidden("Sign in as the client or an admin.")

    async def ensure_customer(self, client_id: uuid.UUID) -> Customer:
        """The client's Stripe customer, created on first use (on the platform's test clock in test
        mode, so advancing it moves this customer's subscriptions)."""
        await advisory_lock(self.session, f"customer:{client_id}")
        customer = await self.customers.by_client(client_id)
        if customer is not None:
            return customer
        info = await self.deps.clients.get(client_id)
        if info is None:
            raise InvalidInput(f"Client {client_id} does not exist.", code="unknown_client",
                               details=[{"field": "clientId", "message": "unknown client"}])
        clock = await self.platform_clock(create=True) if self.settings.uses_test_clock else None
        params: dict[str, Any] = {"metadata": {META_CLIENT: str(client_id), "platform": "billing"}}
        if info.name:
            params["name"] = info.name
        if info.email:
            params["email"] = info.email
        if clock is not None:
            params["test_clock"] = clock.stripe_id
        created = await self.stripe.create_customer(
            params, idempotency_key=f"customer:{client_id}:{clock.stripe_id if clock else 'realtime'}")
        customer = Customer(client_id=client_id, stripe_customer_id=created.id,
                            test_clock_id=clock.stripe_id if clock else None, name=info.name, email=info.email)
        await self.customers.insert(customer)
        mapped = await self.customers.by_client(client_id)
        assert mapped is not None
        return mapped

    async def platform_clock(self, *, create: bool) -> PlatformObject | None:
        clock = await self.platform.get(TEST_CLOCK)
        if clock is not None or not create:
            return clock
        await advisory_lock(self.session, "platform:test_clock")
        clock = await self.platform.get(TEST_CLOCK, for_update=True)
        if clock is None:
            created = await self.stripe.create_test_clock(int(utcnow().timestamp()), "billing platform")
            clock = PlatformObject(kind=TEST_CLOCK, stripe_id=created.id,
                                   frozen_time=created.frozen_time or _whole_seconds(utcnow()), status=created.status)
            self.platform.add(clock)
            await self.session.flush()
        return clock

    async def advance_clock(self, to: datetime) -> PlatformObject:
        """Move the platform's test clock (and with it every customer created on it) forward."""
        if not self.settings.test_mode:
            raise Forbidden("Test clocks exist in Stripe test mode only.", code="not_test_mode")
        if not self.settings.test_clock_enabled:
            raise Conflict("The platform's test clock is switched off (SUBSCRIPTIONS_TEST_CLOCK_ENABLED).",
                           code="test_clock_disabled")
        await self.platform_clock(create=True)
        clock = await self.platform.get(TEST_CLOCK, for_update=True)
        assert clock is not None
        target = _whole_seconds(to)
        if clock.frozen_time is not None and target < clock.frozen_time:
            raise Conflict(f"A test clock never goes backwards: it is at {clock.frozen_time.isoformat()}.",
                           code="clock_backwards", details={"frozenTime": clock.frozen_time.isoformat()})
        if clock.frozen_time is not None and target == clock.frozen_time:
            return clock
        # Stripe refuses to move a test clock more than about two billing intervals at once; we allow
        # up to two years per step, so a typo such as year 9999 is a 422, not thousands of years of renewals.
        start = clock.frozen_time or utcnow()
        if target - start > MAX_CLOCK_STEP:
            raise InvalidInput(f"A test clock moves at most {MAX_CLOCK_STEP.days} days at once (it is at "
                               f"{start.isoformat()}); advance in smaller steps.", code="clock_step_too_large",
                               details=[{"field": "to", "message": "more than two years ahead of the clock"}])
        advanced = await self.stripe.advance_test_clock(clock.stripe_id, int(target.timestamp()))
        clock.frozen_time = advanced.frozen_time or target
        clock.status = advanced.status
        await self.session.flush()
        return clock

    async def now_for(self, stripe_customer_id: str | None) -> datetime:
        """"Now" for a customer: its test clock's time when it was created on the platform's clock,
        real time for everyone else."""
        if stripe_customer_id:
            customer = await self.customers.by_stripe_id(stripe_customer_id)
            if customer is not None and customer.test_clock_id:
                clock = await self.platform.get(TEST_CLOCK)
                if clock is not None and clock.stripe_id == customer.test_clock_id and clock.frozen_time:
                    return clock.frozen_time
        return _whole_seconds(utcnow())

    # ==========================================================================================
    # signup (SUB2)
    async def start_checkout(self, actor: Actor, body: CheckoutRequest, request_key: str | None) -> CheckoutSession:
        """A Checkout Session in subscription mode. Access comes with the webhook, not the redirect."""
        client_id = self._client_of_actor(actor, body.client_id)
        price, plan = await self.plan_service.offered_price(body.price_id)
        customer = await self.ensure_customer(client_id)
        trial_days = price.trial_days if body.trial_days is None else body.trial_days
        metadata = {META_CLIENT: str(client_id), META_PLAN: str(plan.id), META_PRICE: str(price.id)}
        subscription_data: dict[str, Any] = {"metadata": metadata}
        if trial_days > 0:
            subscription_data["trial_period_days"] = trial_days
            subscription_data["trial_settings"] = {
                "end_behavior": {"missing_payment_method": self.settings.trial_end_behavior}}
        portal = self.settings.portal_url.rstrip("/")
        params: dict[str, Any] = {
            "mode": "subscription",
            "customer": customer.stripe_customer_id,
            "client_reference_id": str(client_id),
            "line_items": [{"price": price.stripe_price_id, "quantity": body.quantity}],
            "metadata": metadata,
            "subscription_data": subscription_data,
            "success_url": f"{portal}/subscription?checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{portal}/subscription?checkout=cancel",
        }
        session = await self.stripe.create_checkout_session(
            params, idempotency_key=idempotency_key("checkout", client_id, request_key))
        if not session.url:
            raise AppError("Stripe returned a checkout session without a URL.", code="payment_provider_error")
        log.info("subscription_checkout_created", client_id=str(client_id), price_id=str(price.id),
                 session_id=session.id)
        return session

    async def create_subscription(self, body: SubscriptionCreate, request_key: str | None) -> Subscription:
        """A subscription the admin sets up (e.g. a retainer billed by invoice)."""
        price, plan = await self.plan_service.offered_price(body.price_id)
        customer = await self.ensure_customer(body.client_id)
        trial_days = price.trial_days if body.trial_days is None else body.trial_days
        params: dict[str, Any] = {
            "customer": customer.stripe_customer_id,
            "items": [{"price": price.stripe_price_id, "quantity": body.quantity}],
            "collection_method": body.collection_method.value,
            "metadata": {META_CLIENT: str(body.client_id), META_PLAN: str(plan.id), META_PRICE: str(price.id)},
        }
        if body.collection_method == CollectionMethod.SEND_INVOICE:
            params["days_until_due"] = body.days_until_due or 30
        # charge_automatically: Stripe charges the customer's saved card at once (allow_incomplete, its
        # default); without one the subscription stays incomplete until its first invoice is paid.
        if trial_days > 0:
            params["trial_period_days"] = trial_days
            params["trial_settings"] = {"end_behavior": {"missing_payment_method": self.settings.trial_end_behavior}}
        data = await self.stripe.create_subscription(
            params, idempotency_key=idempotency_key("subscription", body.client_id, request_key))
        row = await self.mirror.apply(data, fetched=True, cause="api:create", hint_client=body.client_id,
                                 hint_price=price.id)
        if row is None:  # cannot happen: the client is given
            raise AppError("The subscription could not be mirrored.", code="mirror_failed")
        return row

    # ==========================================================================================
    # reading
    async def get(self, sub_id: uuid.UUID, actor: Actor) -> Subscription:
        row = await self.subs.get(sub_id)
        if row is None or not actor.can_see_client(str(row.client_id)):
            raise NotFound(f"Subscription {sub_id} not found.")
        return row

    async def search(self, actor: Actor, f: SubscriptionFilter, page: PageRequest) -> PageResult[Subscription]:
        if not actor.is_admin:
            own = lifecycle.parse_uuid(actor.client_id)
            if own is None or (f.client_id is not None and f.client_id != own):
                return PageResult(items=[], next_cursor=None, has_more=False, total=0)
            f = SubscriptionFilter(client_id=own, statuses=f.statuses)
        return await self.subs.page(f, page)

    async def history(self, sub_id: uuid.UUID, actor: Actor, page: PageRequest) -> PageResult[SubscriptionHistory]:
        await self.get(sub_id, actor)
        return await self.subs.history(sub_id, page)

    # ==========================================================================================
    # plan and quantity changes (SUB3, SUB5)
    async def _locked(self, sub_id: uuid.UUID, actor: Actor) -> Subscription:
        row = await self.get(sub_id, actor)
        await advisory_lock(self.session, f"subscription:{row.stripe_subscription_id}")
        locked = await self.subs.get(sub_id, for_update=True)
        assert locked is not None
        return locked

    async def _change(self, row: Subscription, price_id: uuid.UUID, quantity: int | None) -> _Change:
        status = lifecycle.parse_status(row.status)
        if status not in CHANGEABLE_STATUSES:
            raise Conflict(f"A {status.value} subscription cannot change plan.", code="subscription_not_changeable",
                           details={"status": status.value})
        if row.pending_price_id is not None:
            when = row.pending_effective_at.isoformat() if row.pending_effective_at else "the period end"
            raise Conflict(f"A change is already scheduled for {when}; only one change can be pending.",
                           code="change_already_pending")
        new, _ = await self.plan_service.offered_price(price_id)
        wanted = quantity if quantity is not None else row.quantity
        if new.id == row.price_id and wanted == row.quantity:
            raise InvalidInput("That is the subscription's current price and quantity.", code="no_change",
                               details=[{"field": "priceId", "message": "same price and quantity"}])
        if row.currency and new.currency != row.currency:
            raise InvalidInput(f"The subscription is billed in {row.currency}; that price is in {new.currency}.",
                               code="currency_mismatch", details=[{"field": "priceId", "message": "other currency"}])
        if row.unit_amount is None or row.interval is None or not row.stripe_item_id:
            raise Conflict("The subscription's current price is unknown here; it cannot be changed.",
                           code="price_unknown")
        if row.current_period_start is None or row.current_period_end is None \
                or row.current_period_end <= row.current_period_start:
            raise Conflict("The subscription has no current billing period.", code="no_current_period")
        old = Tariff(row.unit_amount, row.interval, row.interval_count or 1)
        kind = lifecycle.change_kind(old, row.quantity, Tariff(new.amount, new.interval, new.interval_count), wanted)
        plan = lifecycle.plan_change(kind, trialing=status == SubscriptionStatus.TRIALING,
                                     upgrade_behavior=self.settings.upgrade_behavior,
                                     downgrade_behavior=self.settings.downgrade_behavior)
        return _Change(row, new, wanted, old, plan)

    def _expected(self, change: _Change, at: datetime) -> ChangePreview | None:
        """Our own computation of Stripe's proration lines (None when Stripe prorates nothing)."""
        row = change.row
        assert row.current_period_start is not None and row.current_period_end is not None
        if change.plan.proration_behavior == "none":
            return None
        common = dict(old_unit=change.old.amount, old_quantity=row.quantity, new_unit=change.new.amount,
                      new_quantity=change.quantity, period_start=row.current_period_start,
                      period_end=row.current_period_end, proration_date=at)
        if change.plan.restart_cycle:
            return restart_cycle(**common,  # type: ignore[arg-type]
                                 new_period_end=lifecycle.add_interval(at, change.new.interval,
                                                                       change.new.interval_count))
        return prorate(**common)  # type: ignore[arg-type]

    def _items(self, change: _Change) -> list[dict[str, Any]]:
        return [{"id": change.row.stripe_item_id, "price": change.new.stripe_price_id, "quantity": change.quantity}]

    async def preview_change(self, sub_id: uuid.UUID, actor: Actor, price_id: uuid.UUID,
                             quantity: int | None) -> Preview:
        """What the change costs now and at the renewal, from Stripe's own preview, with a pinned
        proration date (pass it to the change so the charge equals the preview)."""
        row = await self.get(sub_id, actor)
        change = await self._change(row, price_id, quantity)
        assert row.current_period_start is not None and row.current_period_end is not None
        now = await self.now_for(row.stripe_customer_id)
        at = min(max(now, row.current_period_start), row.current_period_end)
        details: dict[str, Any] = {"items": self._items(change), "proration_behavior": change.plan.proration_behavior}
        if change.plan.proration_behavior != "none":
            details["proration_date"] = seconds(at)
        if change.plan.restart_cycle:
            details["billing_cycle_anchor"] = "now"
        stripe_preview = await self.stripe.preview_invoice(
            {"customer": row.stripe_customer_id, "subscription": row.stripe_subscription_id,
             "subscription_details": details})
        lines = stripe_preview.contract_lines()
        self._cross_check(change, at, stripe_preview)
        invoice_now = change.plan.proration_behavior == "always_invoice"
        mapped = []
        for line in lines:
            ours = list(await self.plans.prices_by_stripe_id(line.price_id)) if line.price_id else []
            mapped.append((line, ours[0].id if len(ours) == 1 else None))
        return Preview(
            proration_date=at,
            plan=change.plan,
            lines=mapped,
            amount_due_now=stripe_preview.amount_due if invoice_now else 0,
            # After an invoiced change the renewal bills the new price as it is; otherwise Stripe's
            # preview is the renewal invoice itself (with any proration credits carried into it).
            next_invoice_total=change.new.amount * change.quantity if invoice_now else stripe_preview.total,
            currency=(stripe_preview.currency or change.new.currency).upper(),
        )

    def _cross_check(self, change: _Change, at: datetime, stripe_preview: InvoicePreview) -> None:
        expected = self._expected(change, at)
        if expected is None:
            return
        stripe_total = sum(line.amount for line in stripe_preview.contract_lines() if line.proration)
        if stripe_total != expected.proration_total:
            # Loud: a preview that disagrees with our reading of Stripe's rule needs a look, but
            # Stripe's figures are what gets charged, so they are what the preview shows.
            log.error("proration_mismatch", subscription=str(change.row.id), proration_date=seconds(at),
                      stripe_proration=stripe_total, expected_proration=expected.proration_total,
                      expected_lines=[line.amount for line in expected.lines], kind=change.plan.kind)

    async def change(self, sub_id: uuid.UUID, actor: Actor, body: ChangeRequest,
                     request_key: str | None) -> Subscription:
        row = await self._locked(sub_id, actor)
        change = await self._change(row, body.price_id, body.quantity)
        assert row.current_period_start is not None and row.current_period_end is not None
        at = _whole_seconds(body.proration_date)
        if at.tzinfo is None:
            raise InvalidInput("prorationDate needs a time zone (pass the preview's value unchanged).",
                               code="invalid_proration_date")
        if not row.current_period_start <= at <= row.current_period_end:
            raise InvalidInput(
                f"prorationDate must lie in the current period ({row.current_period_start.isoformat()} – "
                f"{row.current_period_end.isoformat()}): ask for a new preview.", code="proration_date_out_of_period",
                details=[{"field": "prorationDate", "message": "outside the current period"}])
        new = change.new
        params: dict[str, Any] = {"items": self._items(change)}
        if change.plan.at_period_end:
            params["proration_behavior"] = "none"
            params["metadata"] = {META_PENDING_PRICE: str(new.id), META_PENDING_PLAN: str(new.plan_id),
                                  META_PENDING_QUANTITY: str(change.quantity),
                                  META_PENDING_AT: str(seconds(row.current_period_end))}
        else:
            params["proration_behavior"] = change.plan.proration_behavior
            if change.plan.proration_behavior != "none":
                params["proration_date"] = seconds(at)
            if change.plan.restart_cycle:
                params["billing_cycle_anchor"] = "now"
            params["metadata"] = {META_PRICE: str(new.id), META_PLAN: str(new.plan_id),
                                  **lifecycle.clear_pending_metadata()}
        data = await self.stripe.update_subscription(
            row.stripe_subscription_id, params, idempotency_key=idempotency_key("change", row.id, request_key))
        log.info("subscription_change_requested", subscription=str(row.id), kind=change.plan.kind,
                 proration_behavior=params["proration_behavior"], price_id=str(new.id), quantity=change.quantity)
        mirrored = await self.mirror.apply(data, fetched=True, cause="api:change",
                                      hint_price=None if change.plan.at_period_end else new.id)
        assert mirrored is not None
        return mirrored

    # ==========================================================================================
    # cancellation (SUB4)
    async def cancel(self, sub_id: uuid.UUID, actor: Actor, *, at_period_end: bool,
                     request_key: str | None) -> Subscription:
        row = await self._locked(sub_id, actor)
        if lifecycle.parse_status(row.status) in TERMINAL_STATUSES:
            raise Conflict("The subscription has ended already.", code="subscription_ended")
        if not at_period_end and not actor.is_admin:
            raise Forbidden("Only an admin can end a subscription at once; cancel at the period end instead.")
        key = idempotency_key("cancel", row.id, request_key)
        if at_period_end:
            if row.cancel_at_period_end:
                return row
            data = await self.stripe.update_subscription(row.stripe_subscription_id,
                                                         {"cancel_at_period_end": True}, idempotency_key=key)
        else:
            data = await self.stripe.cancel_subscription(row.stripe_subscription_id, idempotency_key=key)
        mirrored = await self.mirror.apply(data, fetched=True, cause="api:cancel")
        assert mirrored is not None
        return mirrored

    async def resume(self, sub_id: uuid.UUID, actor: Actor, request_key: str | None) -> Subscription:
        """Undo a cancellation at period end (before the period ends), or resume a paused one."""
        row = await self._locked(sub_id, actor)
        status = lifecycle.parse_status(row.status)
        key = idempotency_key("resume", row.id, request_key)
        if row.cancel_at_period_end and status not in TERMINAL_STATUSES:
            now = await self.now_for(row.stripe_customer_id)
            if row.current_period_end is not None and now >= row.current_period_end:
                raise Conflict("The period has ended: the subscription cannot be resumed.", code="period_ended")
            data = await self.stripe.update_subscription(row.stripe_subscription_id,
                                                         {"cancel_at_period_end": False}, idempotency_key=key)
        elif status == SubscriptionStatus.PAUSED:
            data = await self.stripe.resume_subscription(row.stripe_subscription_id, idempotency_key=key)
        else:
            raise Conflict("Nothing to resume: the subscription is not set to cancel and not paused.",
                           code="nothing_to_resume")
        mirrored = await self.mirror.apply(data, fetched=True, cause="api:resume")
        assert mirrored is not None
        return mirrored

    # ==========================================================================================
    # billing portal (S5)
    async def portal_session(self, actor: Actor, body: PortalRequest) -> str:
        client_id = self._client_of_actor(actor, body.client_id)
        customer = await self.customers.by_client(client_id)
        if customer is None:
            raise NotFound("This client has no billing account yet: subscribe first.", code="no_billing_account")
        return_url = body.return_url or f"{self.settings.portal_url.rstrip('/')}/subscription"
        allowed = {urlsplit(u)[:2] for u in (self.settings.public_url, self.settings.portal_url)}
        if urlsplit(return_url)[:2] not in allowed:
            raise InvalidInput("returnUrl must be a page of this platform.", code="return_url_not_allowed",
                               details=[{"field": "returnUrl", "message": "other site"}])
        params: dict[str, Any] = {"customer": customer.stripe_customer_id, "return_url": return_url}
        configuration = await self.platform.get(PORTAL_CONFIGURATION)
        if configuration is not None:
            params["configuration"] = configuration.stripe_id
        session = await self.stripe.create_portal_session(params)
        return session.url
