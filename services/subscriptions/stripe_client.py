"""The only place that talks to Stripe: an async adapter over the official SDK (`StripeClient`).

Parse at the edge: every Stripe object that comes back is validated here into a typed model (the
current API version's shapes, with the pre-2025 top-level period fields as a fallback), so the
domain never reads a Stripe dict. A subscription comes back as the same `StripeSubscriptionV1` the
payments service publishes on billing.stripe, stamped with the time we read it, so an object we
fetched and one a webhook brought go through one mirror rule. The client, the error mapping and the
parsing are kit.stripe's; offline, STRIPE_API_BASE points at stripe-mock or the local stand-in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

from pydantic import BeforeValidator

from contracts.stripe import StripeInvoiceLineV1, StripeSubscriptionItemV1, StripeSubscriptionV1
from kit.clock import utcnow
from kit.stripe import (
    Period,
    PriceDetails,
    ProrationDetails,
    Recurring,
    Ref,
    StripeAdapter,
    StripeModel,
    Ts,
    parse_stripe,
    to_dict,
)

FETCHED_EVENT_TYPE = "subscription.fetched"  # stripe_event_type of a state we read ourselves
T = TypeVar("T")


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) and value else None


def _str_dict(value: object) -> object:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


Currency = Annotated[str | None, BeforeValidator(_upper)]
Metadata = Annotated[dict[str, str], BeforeValidator(_str_dict)]


class StripeList(StripeModel, Generic[T]):
    data: list[T] = []


class StripePrice(StripeModel):
    id: str
    active: bool = True
    lookup_key: str | None = None
    product: Ref = None
    unit_amount: int | None = None
    currency: Currency = None
    recurring: Recurring | None = None
    metadata: Metadata = {}


class StripeProduct(StripeModel):
    id: str
    active: bool = True
    name: str | None = None
    description: str | None = None
    metadata: Metadata = {}


class SubscriptionItem(StripeModel):
    id: str
    price: StripePrice | None = None
    quantity: int | None = None
    current_period_start: Ts = None
    current_period_end: Ts = None


class StripeSubscriptionObject(StripeModel):
    id: str
    customer: Ref = None
    status: str
    currency: Currency = None
    items: StripeList[SubscriptionItem] = StripeList[SubscriptionItem]()
    cancel_at_period_end: bool = False
    cancel_at: Ts = None
    canceled_at: Ts = None
    ended_at: Ts = None
    trial_start: Ts = None
    trial_end: Ts = None
    start_date: Ts = None
    current_period_start: Ts = None  # before API 2025-03-31; now on the items
    current_period_end: Ts = None
    latest_invoice: Ref = None
    collection_method: str | None = None
    days_until_due: int | None = None
    metadata: Metadata = {}

    def to_contract(self, *, as_of: datetime) -> StripeSubscriptionV1:
        """The normalized shape of billing.stripe, as of `as_of` (when we read it)."""
        items = [
            StripeSubscriptionItemV1(
                id=item.id,
                price_id=item.price.id if item.price else None,
                price_lookup_key=item.price.lookup_key if item.price else None,
                product_id=item.price.product if item.price else None,
                quantity=item.quantity,
                unit_amount=item.price.unit_amount if item.price else None,
                currency=item.price.currency if item.price else None,
                interval=item.price.recurring.interval if item.price and item.price.recurring else None,
                interval_count=item.price.recurring.interval_count if item.price and item.price.recurring else None,
                current_period_start=item.current_period_start or self.current_period_start,
                current_period_end=item.current_period_end or self.current_period_end,
            )
            for item in self.items.data
        ]
        first = items[0] if items else None
        return StripeSubscriptionV1(
            stripe_event_id=f"fetch:{self.id}:{int(as_of.timestamp())}",
            stripe_event_type=FETCHED_EVENT_TYPE,
            stripe_event_created=as_of,
            subscription_id=self.id,
            customer_id=self.customer,
            client_id=self.metadata.get("client_id"),
            plan_id=self.metadata.get("plan_id"),
            status=self.status,
            currency=self.currency or (first.currency if first else None),
            items=items,
            price_id=first.price_id if first else None,
            price_lookup_key=first.price_lookup_key if first else None,
            quantity=first.quantity if first else None,
            current_period_start=first.current_period_start if first else self.current_period_start,
            current_period_end=first.current_period_end if first else self.current_period_end,
            cancel_at_period_end=self.cancel_at_period_end,
            cancel_at=self.cancel_at,
            canceled_at=self.canceled_at,
            ended_at=self.ended_at,
            trial_start=self.trial_start,
            trial_end=self.trial_end,
            start_date=self.start_date,
            latest_invoice_id=self.latest_invoice,
            metadata=self.metadata,
            collection_method=self.collection_method,
            days_until_due=self.days_until_due,
        )


class StripeCustomer(StripeModel):
    id: str
    deleted: bool = False
    email: str | None = None
    name: str | None = None
    test_clock: Ref = None
    metadata: Metadata = {}


class CheckoutSession(StripeModel):
    id: str
    url: str | None = None


class PortalSession(StripeModel):
    id: str
    url: str


class TestClock(StripeModel):
    __test__ = False  # not a pytest class

    id: str
    frozen_time: Ts = None
    status: str | None = None


class LinePricing(StripeModel):
    price_details: PriceDetails | None = None


class LineParent(StripeModel):
    subscription_item_details: ProrationDetails | None = None
    invoice_item_details: ProrationDetails | None = None
    type: str | None = None


class InvoiceLine(StripeModel):
    id: str | None = None
    description: str | None = None
    amount: int = 0
    currency: Currency = None
    quantity: int | None = None
    period: Period | None = None
    pricing: LinePricing | None = None
    parent: LineParent | None = None
    price: Ref = None  # before 2025-03-31
    proration: bool | None = None  # before 2025-03-31

    def is_proration(self) -> bool:
        if self.proration is not None:
            return self.proration
        if self.parent is None:
            return False
        details = (self.parent.subscription_item_details if self.parent.type == "subscription_item_details"
                   else self.parent.invoice_item_details if self.parent.type == "invoice_item_details"
                   else self.parent.subscription_item_details or self.parent.invoice_item_details)
        return bool(details and details.proration)

    def to_contract(self, currency: str) -> StripeInvoiceLineV1:
        details = self.pricing.price_details if self.pricing else None
        price = self.price or (details.price if details else None)
        return StripeInvoiceLineV1(
            id=self.id or "",
            description=self.description,
            amount=self.amount,
            currency=self.currency or currency,
            quantity=self.quantity,
            price_id=price,
            proration=self.is_proration(),
            period_start=self.period.start if self.period else None,
            period_end=self.period.end if self.period else None,
        )


class InvoicePreview(StripeModel):
    """The invoice Stripe would issue (invoices.create_preview)."""

    total: int
    amount_due: int
    subtotal: int | None = None
    currency: Currency = None
    lines: StripeList[InvoiceLine] = StripeList[InvoiceLine]()

    def contract_lines(self) -> list[StripeInvoiceLineV1]:
        currency = self.currency or "XXX"
        return [line.to_contract(currency) for line in self.lines.data]


class StripeBilling(Protocol):
    """What the subscriptions service needs from Stripe."""

    async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> StripeCustomer: ...
    async def retrieve_customer(self, customer_id: str) -> StripeCustomer | None: ...
    async def create_subscription(self, params: dict[str, Any], *, idempotency_key: str) -> StripeSubscriptionV1: ...
    async def retrieve_subscription(self, subscription_id: str) -> StripeSubscriptionV1 | None: ...
    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any], *, idempotency_key: str
    ) -> StripeSubscriptionV1: ...
    async def cancel_subscription(self, subscription_id: str, *, idempotency_key: str) -> StripeSubscriptionV1: ...
    async def resume_subscription(self, subscription_id: str, *, idempotency_key: str) -> StripeSubscriptionV1: ...
    async def preview_invoice(self, params: dict[str, Any]) -> InvoicePreview: ...
    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> CheckoutSession: ...
    async def create_portal_session(self, params: dict[str, Any]) -> PortalSession: ...
    async def create_test_clock(self, frozen_time: int, name: str) -> TestClock: ...
    async def advance_test_clock(self, clock_id: str, frozen_time: int) -> TestClock: ...
    async def retrieve_product(self, product_id: str) -> StripeProduct | None: ...
    async def create_product(self, params: dict[str, Any]) -> StripeProduct: ...
    async def update_product(self, product_id: str, params: dict[str, Any]) -> StripeProduct: ...
    async def find_price(self, lookup_key: str) -> StripePrice | None: ...
    async def create_price(self, params: dict[str, Any], *, idempotency_key: str) -> StripePrice: ...
    async def update_price(self, price_id: str, params: dict[str, Any]) -> StripePrice: ...
    async def list_portal_configurations(self) -> list[dict[str, Any]]: ...
    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]: ...


def fetch_time() -> datetime:
    """When we read an object, in Stripe's whole seconds."""
    return utcnow().replace(microsecond=0)


class SdkStripeBilling(StripeAdapter):
    """`StripeBilling` on the official SDK, async (httpx)."""

    refusals = True  # a 4xx invalid request: the object's state at Stripe does not allow it (409)

    # -- customers -------------------------------------------------------------------------------
    async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> StripeCustomer:
        request = self.client.v1.customers.create_async(
            params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        return await self._read("create the customer", StripeCustomer, request)

    async def retrieve_customer(self, customer_id: str) -> StripeCustomer | None:
        return await self._read_or_none("read the customer", StripeCustomer,
                                        self.client.v1.customers.retrieve_async(customer_id))

    # -- subscriptions ---------------------------------------------------------------------------
    async def create_subscription(self, params: dict[str, Any], *, idempotency_key: str) -> StripeSubscriptionV1:
        request = self.client.v1.subscriptions.create_async(
            params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        sub = await self._read("create the subscription", StripeSubscriptionObject, request)
        return sub.to_contract(as_of=fetch_time())

    async def retrieve_subscription(self, subscription_id: str) -> StripeSubscriptionV1 | None:
        sub = await self._read_or_none("read the subscription", StripeSubscriptionObject,
                                       self.client.v1.subscriptions.retrieve_async(subscription_id))
        return sub.to_contract(as_of=fetch_time()) if sub else None

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any], *, idempotency_key: str
    ) -> StripeSubscriptionV1:
        request = self.client.v1.subscriptions.update_async(
            subscription_id, params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        sub = await self._read("update the subscription", StripeSubscriptionObject, request)
        return sub.to_contract(as_of=fetch_time())

    async def cancel_subscription(self, subscription_id: str, *, idempotency_key: str) -> StripeSubscriptionV1:
        request = self.client.v1.subscriptions.cancel_async(
            subscription_id, options={"idempotency_key": idempotency_key})
        sub = await self._read("cancel the subscription", StripeSubscriptionObject, request)
        return sub.to_contract(as_of=fetch_time())

    async def resume_subscription(self, subscription_id: str, *, idempotency_key: str) -> StripeSubscriptionV1:
        request = self.client.v1.subscriptions.resume_async(
            subscription_id, params={"billing_cycle_anchor": "now"},  # type: ignore[arg-type]
            options={"idempotency_key": idempotency_key})
        sub = await self._read("resume the subscription", StripeSubscriptionObject, request)
        return sub.to_contract(as_of=fetch_time())

    async def preview_invoice(self, params: dict[str, Any]) -> InvoicePreview:
        request = self.client.v1.invoices.create_preview_async(params=params)  # type: ignore[arg-type]
        return await self._read("preview the invoice", InvoicePreview, request)

    # -- checkout and portal ---------------------------------------------------------------------
    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> CheckoutSession:
        request = self.client.v1.checkout.sessions.create_async(
            params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        return await self._read("create the checkout session", CheckoutSession, request)

    async def create_portal_session(self, params: dict[str, Any]) -> PortalSession:
        request = self.client.v1.billing_portal.sessions.create_async(params=params)  # type: ignore[arg-type]
        return await self._read("open the billing portal", PortalSession, request)

    # -- test clocks -----------------------------------------------------------------------------
    async def create_test_clock(self, frozen_time: int, name: str) -> TestClock:
        request = self.client.v1.test_helpers.test_clocks.create_async(
            params={"frozen_time": frozen_time, "name": name})
        return await self._read("create the test clock", TestClock, request)

    async def advance_test_clock(self, clock_id: str, frozen_time: int) -> TestClock:
        request = self.client.v1.test_helpers.test_clocks.advance_async(
            clock_id, params={"frozen_time": frozen_time})
        return await self._read("advance the test clock", TestClock, request)

    # -- catalog ---------------------------------------------------------------------------------
    async def retrieve_product(self, product_id: str) -> StripeProduct | None:
        return await self._read_or_none("read the product", StripeProduct,
                                        self.client.v1.products.retrieve_async(product_id))

    async def create_product(self, params: dict[str, Any]) -> StripeProduct:
        request = self.client.v1.products.create_async(params=params)  # type: ignore[arg-type]
        return await self._read("create the product", StripeProduct, request)

    async def update_product(self, product_id: str, params: dict[str, Any]) -> StripeProduct:
        request = self.client.v1.products.update_async(product_id, params=params)  # type: ignore[arg-type]
        return await self._read("update the product", StripeProduct, request)

    async def find_price(self, lookup_key: str) -> StripePrice | None:
        page = await self._call("look up the price", self.client.v1.prices.list_async(
            params={"lookup_keys": [lookup_key], "active": True, "limit": 10}))
        prices = [parse_stripe(StripePrice, p, "look up the price") for p in page.data]
        # stripe-mock ignores the filter: only a price that really has the key counts.
        return next((p for p in prices if p.lookup_key == lookup_key), None)

    async def create_price(self, params: dict[str, Any], *, idempotency_key: str) -> StripePrice:
        request = self.client.v1.prices.create_async(
            params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        return await self._read("create the price", StripePrice, request)

    async def update_price(self, price_id: str, params: dict[str, Any]) -> StripePrice:
        request = self.client.v1.prices.update_async(price_id, params=params)  # type: ignore[arg-type]
        return await self._read("update the price", StripePrice, request)

    async def list_portal_configurations(self) -> list[dict[str, Any]]:
        page = await self._call("list the portal configurations",
                                self.client.v1.billing_portal.configurations.list_async(params={"limit": 100}))
        return [to_dict(c) for c in page.data]

    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        request = self.client.v1.billing_portal.configurations.create_async(params=params)  # type: ignore[arg-type]
        return to_dict(await self._call("create the portal configuration", request))

    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]:
        request = self.client.v1.billing_portal.configurations.update_async(
            config_id, params=params)  # type: ignore[arg-type]
        return to_dict(await self._call("update the portal configuration", request))
