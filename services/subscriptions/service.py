"""Domain of the subscriptions service: plans and prices, signup, the mirror of Stripe's
subscriptions, plan changes, cancellation, the billing portal and the platform's test clock.

Stripe Billing owns the lifecycle (periods, renewals, retries, prorations); this service asks Stripe
to change things and mirrors what Stripe then says. Every change of the mirror goes through
`_record` (version bumped once, history row, snapshot event through the outbox); nothing else
assigns a status.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import StripeInvoiceLineV1, StripeInvoiceV1, StripeSubscriptionItemV1, StripeSubscriptionV1
from contracts.subscription import (
    SCHEMA_V1,
    TERMINAL_STATUSES,
    BillingInterval,
    CollectionMethod,
    PendingChangeV1,
    SubscriptionEventType,
    SubscriptionSnapshotV1,
    SubscriptionStatus,
)
from kit.actor import Actor
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.errors import AppError, Conflict, Forbidden, InvalidInput, NotFound
from kit.logging import current_correlation_id
from kit.pagination import PageRequest, PageResult
from services.subscriptions import lifecycle
from services.subscriptions.catalog import CatalogSync
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
    Freshness,
    MirrorState,
    Tariff,
)
from services.subscriptions.models import (
    Customer,
    Plan,
    PlatformObject,
    Price,
    Subscription,
    SubscriptionHistory,
)
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
    PlanCreate,
    PlanUpdate,
    PortalRequest,
    PriceIn,
    SubscriptionCreate,
)
from services.subscriptions.stripe_client import CheckoutSession, InvoicePreview, StripeBilling

log = structlog.get_logger(__name__)

SOURCE = "subscriptions"


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


def default_lookup_key(plan_id: uuid.UUID, entry: PriceIn) -> str:
    # One per plan, currency and interval: a new amount takes the key over (Stripe's transfer_lookup_key).
    return f"plan_{plan_id.hex[:12]}_{entry.currency.lower()}_{entry.interval_count}{entry.interval.value}"


def _as_interval(value: str | None) -> BillingInterval | None:
    # A price made in Stripe's dashboard may bill weekly or daily: shown without an interval.
    return BillingInterval(value) if value is not None and value in BillingInterval._value2member_map_ else None


def _as_collection(value: str | None) -> CollectionMethod | None:
    return CollectionMethod(value) if value is not None and value in CollectionMethod._value2member_map_ else None


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
        self.catalog = CatalogSync(deps.stripe)

    # ==========================================================================================
    # plans and prices (SUB1)
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

    async def _offered_price(self, price_id: uuid.UUID) -> tuple[Price, Plan]:
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
        price, plan = await self._offered_price(body.price_id)
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
        price, plan = await self._offered_price(body.price_id)
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
        row = await self._mirror(data, fetched=True, cause="api:create", hint_client=body.client_id,
                                 hint_price=price.id)
        if row is None:  # cannot happen: the client is given
            raise AppError("The subscription could not be mirrored.", code="mirror_failed")
        return row

    # ==========================================================================================
    # the mirror (ST3/ST4): Stripe's state in, one event per change out
    async def sync(self, data: StripeSubscriptionV1) -> Subscription | None:
        """Apply a Stripe subscription event: an older state never overwrites a newer one; when two
        events of the same second disagree, the current object is fetched from Stripe instead."""
        await advisory_lock(self.session, f"subscription:{data.subscription_id}")
        row = await self.subs.by_stripe_id(data.subscription_id, for_update=True)
        if row is not None:
            decision = lifecycle.freshness(row.stripe_state_at, data.stripe_event_created)
            if decision is Freshness.SKIP:
                log.info("stripe_state_stale_skipped", subscription=data.subscription_id,
                         stripe_event=data.stripe_event_id, held=str(row.stripe_state_at))
                return row
            if decision is Freshness.TIE:
                incoming = await self._state_from_stripe(row, data, row.client_id,
                                                         lifecycle.parse_status(data.status), None)
                if incoming == self._state_of(row):
                    return row  # the same state whichever came first: nothing to settle
                return await self.refresh(row.stripe_subscription_id, cause=data.stripe_event_id)
        return await self._mirror(data, fetched=False, cause=data.stripe_event_id)

    async def refresh(self, stripe_subscription_id: str, *, cause: str) -> Subscription | None:
        """Fetch the subscription from Stripe and mirror what it is now."""
        await advisory_lock(self.session, f"subscription:{stripe_subscription_id}")
        fetched = await self.stripe.retrieve_subscription(stripe_subscription_id)
        if fetched is None:
            log.warning("stripe_subscription_missing", subscription=stripe_subscription_id, cause=cause)
            return await self.subs.by_stripe_id(stripe_subscription_id)
        return await self._mirror(fetched, fetched=True, cause=cause)

    async def trial_will_end(self, data: StripeSubscriptionV1) -> None:
        """Stripe's notice 3 days before a trial ends: mirrored like any state, then announced."""
        row = await self.sync(data)
        if row is not None:
            await self._announce(row, SubscriptionEventType.TRIAL_WILL_END, data.stripe_event_id)

    async def invoice_paid(self, invoice: StripeInvoiceV1) -> None:
        """A paid Stripe invoice extends the paid-through date; a paid renewal is `renewed`."""
        if not invoice.subscription_id:
            return
        await advisory_lock(self.session, f"subscription:{invoice.subscription_id}")
        row = await self.subs.by_stripe_id(invoice.subscription_id, for_update=True)
        if row is None:  # its subscription event has not arrived yet: take Stripe's current object
            row = await self.refresh(invoice.subscription_id, cause=invoice.stripe_event_id)
            if row is None:
                return
        ends = [line.period_end for line in invoice.lines
                if not line.proration and line.period_end is not None and line.amount >= 0]
        period_end = max(ends) if ends else None
        if period_end is None or (row.paid_through is not None and period_end <= row.paid_through):
            log.info("invoice_paid_no_extension", subscription=invoice.subscription_id, invoice=invoice.invoice_id)
            return
        old = self._state_of(row)
        state = self._with_derived(old, paid_through=period_end)
        renewal = invoice.billing_reason == "subscription_cycle"
        self._set_state(row, state)
        await self._record(row, SubscriptionEventType.RENEWED if renewal else SubscriptionEventType.CHANGED,
                           invoice.stripe_event_id)

    async def invoice_payment_failed(self, invoice: StripeInvoiceV1) -> None:
        """Stripe marks the subscription past_due with the failure: mirror its current object."""
        if invoice.subscription_id:
            await self.refresh(invoice.subscription_id, cause=invoice.stripe_event_id)

    async def _mirror(
        self,
        data: StripeSubscriptionV1,
        *,
        fetched: bool,
        cause: str,
        hint_client: uuid.UUID | None = None,
        hint_price: uuid.UUID | None = None,
    ) -> Subscription | None:
        """Make the mirror what `data` says (the caller holds the subscription's lock and has
        decided `data` is the newest state)."""
        row = await self.subs.by_stripe_id(data.subscription_id, for_update=True)
        status = lifecycle.parse_status(data.status)
        if row is not None and lifecycle.parse_status(row.status) in TERMINAL_STATUSES \
                and status not in TERMINAL_STATUSES:
            log.warning("stripe_state_after_end_ignored", subscription=data.subscription_id, status=data.status)
            return row
        client_id = row.client_id if row is not None else await self._client_of(data, hint_client)
        if client_id is None:
            log.info("subscription_not_ours", subscription=data.subscription_id, customer=data.customer_id)
            return None
        state = await self._state_from_stripe(row, data, client_id, status, hint_price)
        # The mark is the newest Stripe event applied; a fetched state leaves it (see lifecycle.freshness).
        stamp = (row.stripe_state_at if row is not None else None) if fetched else data.stripe_event_created
        if row is None:
            row = Subscription(id=uuid.uuid4(), stripe_subscription_id=data.subscription_id, version=1,
                               stripe_state_at=stamp, stripe_state_source="fetch" if fetched else "event")
            self._set_state(row, state)
            self.subs.add(row)
            await self.session.flush()
            await self._record(row, SubscriptionEventType.CREATED, cause)
            return row
        row.stripe_state_at, row.stripe_state_source = stamp, "fetch" if fetched else "event"
        event_type = lifecycle.event_for(self._state_of(row), state)
        if event_type is not None:
            self._set_state(row, state)
            await self._record(row, event_type, cause)
        return row

    async def _client_of(self, data: StripeSubscriptionV1, hint: uuid.UUID | None) -> uuid.UUID | None:
        """Whose subscription this is: ours carry client_id in metadata; one made in Stripe's
        dashboard is ours when its customer maps to a client."""
        if hint is not None:
            return hint
        client_id = lifecycle.parse_uuid(data.client_id or data.metadata.get(META_CLIENT))
        if client_id is not None or not data.customer_id:
            return client_id
        customer = await self.customers.by_stripe_id(data.customer_id)
        if customer is not None:
            return customer.client_id
        remote = await self.stripe.retrieve_customer(data.customer_id)
        if remote is None or remote.deleted:
            return None
        client_id = lifecycle.parse_uuid(remote.metadata.get(META_CLIENT))
        if client_id is not None:
            await self.customers.insert(Customer(client_id=client_id, stripe_customer_id=remote.id,
                                                 test_clock_id=remote.test_clock, name=remote.name,
                                                 email=remote.email))
        return client_id

    async def _our_price(self, item: StripeSubscriptionItemV1 | None, metadata: dict[str, str],
                         hint: uuid.UUID | None) -> Price | None:
        """Our price behind Stripe's item: by Stripe price id, then lookup key, then our id in metadata
        (stripe-mock gives every price the same fixture id, so only metadata tells them apart)."""
        meta_id = lifecycle.parse_uuid(metadata.get(META_PRICE))
        if item is not None and item.price_id:
            candidates = list(await self.plans.prices_by_stripe_id(item.price_id))
            if len(candidates) == 1:
                return candidates[0]
            for wanted in (hint, meta_id):
                match = next((c for c in candidates if c.id == wanted), None)
                if match is not None:
                    return match
            if item.price_lookup_key:
                match = next((c for c in candidates if c.lookup_key == item.price_lookup_key), None)
                if match is None and not candidates:
                    match = await self.plans.active_price_by_lookup_key(item.price_lookup_key)
                if match is not None:
                    return match
        for wanted in (hint, meta_id):
            if wanted is not None and (price := await self.plans.price(wanted)) is not None:
                return price
        return None

    async def _state_from_stripe(self, row: Subscription | None, data: StripeSubscriptionV1, client_id: uuid.UUID,
                                 status: SubscriptionStatus, hint_price: uuid.UUID | None) -> MirrorState:
        item = data.items[0] if data.items else None
        stripe_price = await self._our_price(item, data.metadata, hint_price)
        pending = lifecycle.pending_intent(data.metadata, status=status,
                                           current_period_start=data.current_period_start)
        if pending is not None and (stripe_price is None or stripe_price.id != pending.price_id):
            pending = None  # Stripe bills something else now (e.g. a switch in the billing portal)
        stripe_quantity = (item.quantity if item else None) or data.quantity or 1
        shown: Price | None
        if pending is not None:
            # Stripe already holds the new price (so the renewal bills it); the old one is shown.
            shown_id = row.price_id if row is not None else lifecycle.parse_uuid(data.metadata.get(META_PRICE))
            shown = await self.plans.price(shown_id) if shown_id is not None else None
            quantity = row.quantity if row is not None else stripe_quantity
        else:
            shown = stripe_price
            if shown is None and row is not None and row.price_id is not None:
                log.warning("stripe_price_unknown", subscription=data.subscription_id,
                            stripe_price=item.price_id if item else None)
                shown = await self.plans.price(row.price_id)
            quantity = stripe_quantity
        if shown is not None:
            tariff: tuple[str | None, int | None, str | None, int | None] = (
                shown.currency, shown.amount, shown.interval, shown.interval_count)
        elif item is not None:
            tariff = (item.currency, item.unit_amount, item.interval, item.interval_count)
        else:
            tariff = (data.currency, None, None, None)
        currency, unit_amount, interval, interval_count = tariff
        paid_through = row.paid_through if row is not None else None
        plan_id = shown.plan_id if shown is not None else await self._known_plan(data.plan_id)
        base = MirrorState(
            client_id=client_id,
            status=status,
            plan_id=plan_id,
            price_id=shown.id if shown is not None else None,
            quantity=quantity,
            currency=(currency or data.currency or "").upper() or None,
            unit_amount=unit_amount,
            interval=interval,
            interval_count=interval_count,
            collection_method=data.collection_method or (row.collection_method if row is not None else None),
            days_until_due=data.days_until_due if data.collection_method else (
                row.days_until_due if row is not None else None),
            current_period_start=data.current_period_start,
            current_period_end=data.current_period_end,
            trial_start=data.trial_start,
            trial_end=data.trial_end,
            cancel_at_period_end=data.cancel_at_period_end,
            cancel_at=data.cancel_at,
            canceled_at=data.canceled_at,
            ended_at=data.ended_at,
            paid_through=paid_through,
            access_until=None,
            mrr=0,
            pending_price_id=pending.price_id if pending else None,
            pending_quantity=pending.quantity if pending else None,
            pending_effective_at=pending.effective_at if pending else None,
            stripe_customer_id=data.customer_id or (row.stripe_customer_id if row is not None else None),
            stripe_item_id=item.id if item else (row.stripe_item_id if row is not None else None),
            stripe_price_id=item.price_id if item else None,
            latest_stripe_invoice_id=data.latest_invoice_id,
        )
        return self._with_derived(base)

    async def _known_plan(self, value: str | None) -> uuid.UUID | None:
        """A plan id from Stripe's metadata, if it is one of ours (another environment sharing the
        Stripe account, or a hand-edited metadata, may name anything)."""
        plan_id = lifecycle.parse_uuid(value)
        return plan_id if plan_id is not None and await self.plans.get(plan_id) is not None else None

    @staticmethod
    def _with_derived(state: MirrorState, **changes: Any) -> MirrorState:
        """`state` with `changes` and its derived fields (access, MRR) recomputed."""
        values = {**state.as_columns(), **changes}
        status = values["status"]
        values["access_until"] = lifecycle.access_until(
            status, trial_end=values["trial_end"], current_period_start=values["current_period_start"],
            current_period_end=values["current_period_end"], ended_at=values["ended_at"],
            canceled_at=values["canceled_at"], paid_through=values["paid_through"])
        values["mrr"] = lifecycle.mrr(status, unit_amount=values["unit_amount"], quantity=values["quantity"],
                                      interval=values["interval"], interval_count=values["interval_count"])
        return MirrorState(**values)

    @staticmethod
    def _state_of(row: Subscription) -> MirrorState:
        values = {name: getattr(row, name) for name in lifecycle.STATE_FIELDS}
        values["status"] = lifecycle.parse_status(row.status)
        return MirrorState(**values)

    @staticmethod
    def _set_state(row: Subscription, state: MirrorState) -> None:
        for name, value in state.as_columns().items():
            setattr(row, name, value.value if isinstance(value, SubscriptionStatus) else value)

    async def _record(self, row: Subscription, event_type: SubscriptionEventType, cause: str) -> None:
        """The one way a change of the mirror is made known: version (once), history, event."""
        if event_type != SubscriptionEventType.CREATED:
            row.version += 1
        await self.session.flush()
        await self._announce(row, event_type, cause)

    async def _announce(self, row: Subscription, event_type: SubscriptionEventType, cause: str) -> None:
        snapshot = await self.snapshot(row, cause)
        self.subs.add_history(SubscriptionHistory(
            subscription_id=row.id, version=row.version, event_type=event_type.value, status=row.status,
            cause_id=cause[:255], snapshot=snapshot.model_dump(mode="json", by_alias=True)))
        self.uow.publish(
            CloudEvent.create(source=SOURCE, type=event_type.value, subject=str(row.id), data=snapshot,
                              correlation_id=current_correlation_id(), dataschema=SCHEMA_V1),
            topic=topics.SUBSCRIPTION, key=str(row.id),
        )
        log.info("subscription_event", type=event_type.value, subscription=str(row.id), version=row.version,
                 status=row.status, cause=cause)

    async def snapshot(self, row: Subscription, cause: str | None = None) -> SubscriptionSnapshotV1:
        plan = await self.plans.get(row.plan_id) if row.plan_id else None
        customer = await self.customers.by_client(row.client_id)
        pending = None
        if row.pending_price_id and row.pending_effective_at:
            pending_price = await self.plans.price(row.pending_price_id)
            pending = PendingChangeV1(price_id=str(row.pending_price_id),
                                      plan_id=str(pending_price.plan_id) if pending_price else None,
                                      quantity=row.pending_quantity or row.quantity,
                                      effective_at=row.pending_effective_at)
        return SubscriptionSnapshotV1(
            id=str(row.id), version=row.version, client_id=str(row.client_id),
            client_name=customer.name if customer else None, client_email=customer.email if customer else None,
            plan_id=str(row.plan_id) if row.plan_id else None, plan_name=plan.name if plan else None,
            price_id=str(row.price_id) if row.price_id else None, status=lifecycle.parse_status(row.status),
            quantity=row.quantity, currency=row.currency, unit_amount=row.unit_amount,
            interval=_as_interval(row.interval), interval_count=row.interval_count,
            collection_method=_as_collection(row.collection_method),
            current_period_start=row.current_period_start, current_period_end=row.current_period_end,
            trial_start=row.trial_start, trial_end=row.trial_end, cancel_at_period_end=row.cancel_at_period_end,
            cancel_at=row.cancel_at, canceled_at=row.canceled_at, ended_at=row.ended_at,
            access_until=row.access_until, mrr=row.mrr, pending_change=pending,
            stripe_subscription_id=row.stripe_subscription_id, stripe_customer_id=row.stripe_customer_id,
            latest_stripe_invoice_id=row.latest_stripe_invoice_id, cause_id=cause, occurred_at=utcnow(),
        )

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

    async def plan_names(self, rows: list[Subscription]) -> dict[uuid.UUID, str]:
        plans = await self.plans.plans_by_ids({r.plan_id for r in rows if r.plan_id})
        return {pid: p.name for pid, p in plans.items()}

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
        new, _ = await self._offered_price(price_id)
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
        mirrored = await self._mirror(data, fetched=True, cause="api:change",
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
        mirrored = await self._mirror(data, fetched=True, cause="api:cancel")
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
        mirrored = await self._mirror(data, fetched=True, cause="api:resume")
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

