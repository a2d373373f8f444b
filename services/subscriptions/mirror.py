"""The mirror of Stripe's subscriptions (ST3/ST4): Stripe's state in, one event per change out.

Stripe Billing owns the lifecycle (periods, renewals, retries, prorations). Its events arrive twice
and out of order; the mirror keeps the newest Stripe state (lifecycle.freshness), asks Stripe when two
events of one second disagree, and publishes every change it makes through `_record`: version bumped
once, a history row, the snapshot event through the outbox. Nothing else assigns a status.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import StripeInvoiceV1, StripeSubscriptionItemV1, StripeSubscriptionV1
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
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.logging import current_correlation_id
from services.subscriptions import lifecycle
from services.subscriptions.lifecycle import META_CLIENT, META_PRICE, Freshness, MirrorState
from services.subscriptions.models import Customer, Price, Subscription, SubscriptionHistory
from services.subscriptions.repository import (
    CustomerRepository,
    PlanRepository,
    SubscriptionRepository,
    advisory_lock,
)
from services.subscriptions.stripe_client import StripeBilling

log = structlog.get_logger(__name__)

SOURCE = "subscriptions"


def _as_interval(value: str | None) -> BillingInterval | None:
    # A price made in Stripe's dashboard may bill weekly or daily: shown without an interval.
    return BillingInterval(value) if value is not None and value in BillingInterval._value2member_map_ else None


def _as_collection(value: str | None) -> CollectionMethod | None:
    return CollectionMethod(value) if value is not None and value in CollectionMethod._value2member_map_ else None


class Mirror:
    def __init__(self, uow: UnitOfWork, stripe: StripeBilling) -> None:
        self.uow = uow
        self.stripe = stripe
        self.session = uow.session
        self.plans = PlanRepository(uow.session)
        self.customers = CustomerRepository(uow.session)
        self.subs = SubscriptionRepository(uow.session)

    async def sync(self, data: StripeSubscriptionV1) -> Subscription | None:
        """Apply a Stripe subscription event: an older state never overwrites a newer one; when two
        events of the same second disagree, the current object is fetched from Stripe instead."""
        await advisory_lock(self.session, f"subscription:{data.subscription_id}")
        row = await self.subs.by_stripe_id(data.subscription_id, for_update=True)
        if row is not None:
            decision = lifecycle.freshness(row.stripe_state_at, data.stripe_event_created,
                                           held_period_start=row.current_period_start,
                                           incoming_period_start=data.current_period_start)
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
        return await self.apply(data, fetched=False, cause=data.stripe_event_id)

    async def refresh(self, stripe_subscription_id: str, *, cause: str) -> Subscription | None:
        """Fetch the subscription from Stripe and mirror what it is now."""
        await advisory_lock(self.session, f"subscription:{stripe_subscription_id}")
        fetched = await self.stripe.retrieve_subscription(stripe_subscription_id)
        if fetched is None:
            log.warning("stripe_subscription_missing", subscription=stripe_subscription_id, cause=cause)
            return await self.subs.by_stripe_id(stripe_subscription_id)
        return await self.apply(fetched, fetched=True, cause=cause)

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

    async def apply(
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
