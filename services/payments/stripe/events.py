"""Typed models of the Stripe objects payments reads: only the fields it uses, parsed once per event.

The edge of the service: a stored webhook body becomes an `Event[<object model>]` here, and nothing
past this module touches Stripe's JSON. Money is `int` (minor units, as Stripe sends it), a currency
is a checked ISO 4217 code normalised to upper case, a timestamp is an aware datetime and a
reference that may be expanded (`"cus_1"` or `{"id": "cus_1", ...}`) is its id (kit.stripe's `Ts`,
`Ref` and `StripeModel`, with the sub-objects subscriptions reads the same way). The models accept
the shapes of older and current Stripe API versions where they differ (`invoice.subscription` before
2025-03-31, `invoice.parent.subscription_details` after; billing periods on the subscription before,
on its items after; `plan` before `price`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictInt, ValidationError

from kit.clock import from_unix
from kit.stripe import Period, PriceDetails, ProrationDetails, Recurring, Ref, StripeModel, Ts

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _currency(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isalpha():
        return value.upper()
    raise ValueError("a currency is a 3-letter ISO 4217 code")


def _list_object(value: Any) -> Any:
    """Stripe's list object `{"object": "list", "data": [...]}`, or a plain list."""
    if value is None:
        return []
    if isinstance(value, dict):
        return value.get("data") or []
    return value


def _metadata(value: Any) -> Any:
    if isinstance(value, ObjectMetadata):
        return value
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


Currency = Annotated[str | None, BeforeValidator(_currency)]


class ObjectMetadata(BaseModel):
    """A Stripe object's `metadata`: every key is kept (other services get it whole), and ours
    (DESIGN.md: Stripe objects we create carry our ids) are typed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    invoice_id: str | None = None
    client_id: str | None = None
    plan_id: str | None = None
    price_id: str | None = None  # our price (a subscription's), not Stripe's

    def as_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items() if value is not None}


Metadata = Annotated[ObjectMetadata, BeforeValidator(_metadata)]


# -- Checkout ----------------------------------------------------------------------------------------


class CheckoutSession(StripeModel):
    """`checkout.session.*` events, and what Stripe answers when a session is created."""

    id: str
    mode: str | None = None
    client_reference_id: str | None = None
    metadata: Metadata = ObjectMetadata()
    payment_intent: Ref = None
    customer: Ref = None
    payment_status: str | None = None
    amount_total: int | None = None
    currency: Currency = None
    payment_method_types: list[str] = []
    url: str | None = None
    expires_at: Ts = None

    @property
    def invoice_id(self) -> str | None:
        """Our invoice: `metadata.invoice_id`, else `client_reference_id` (both set by our checkout)."""
        return self.metadata.invoice_id or self.client_reference_id

    @property
    def for_a_payment(self) -> bool:
        """A one-off payment (ours), not a subscription or setup session."""
        return self.mode in (None, "payment")

    @property
    def paid(self) -> bool:
        return self.payment_status in ("paid", "no_payment_required")

    @property
    def method(self) -> str:
        return payment_method(self.payment_method_types)


class Customer(StripeModel):
    id: str | None = None
    metadata: Metadata = ObjectMetadata()
    deleted: bool = False


# -- PaymentIntent and Charge ------------------------------------------------------------------------


class PaymentError(StripeModel):
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None


class PaymentIntent(StripeModel):
    id: str
    metadata: Metadata = ObjectMetadata()
    amount: int | None = None
    currency: Currency = None
    last_payment_error: PaymentError | None = None
    payment_method_types: list[str] = []

    @property
    def failure_code(self) -> str:
        error = self.last_payment_error or PaymentError()
        return error.decline_code or error.code or "payment_failed"

    @property
    def failure_message(self) -> str:
        error = self.last_payment_error or PaymentError()
        return error.message or "The payment failed."

    @property
    def method(self) -> str:
        return payment_method(self.payment_method_types)


class RefundRef(StripeModel):
    id: str | None = None


class Charge(StripeModel):
    id: str | None = None
    payment_intent: Ref = None
    metadata: Metadata = ObjectMetadata()
    amount_refunded: int = 0  # cumulative, over every refund of the charge
    currency: Currency = None
    refunds: Annotated[list[RefundRef], BeforeValidator(_list_object)] = []

    @property
    def latest_refund_id(self) -> str | None:
        return self.refunds[0].id if self.refunds else None


# -- Subscriptions -----------------------------------------------------------------------------------


def _price(value: Any) -> Any:
    return {"id": value} if isinstance(value, str) else value  # an unexpanded `plan`


class Price(StripeModel):
    """A price, or the `plan` of older API versions (amount and interval at the top level)."""

    id: str | None = None
    lookup_key: str | None = None
    product: Ref = None
    unit_amount: int | None = None
    amount: int | None = None
    currency: Currency = None
    recurring: Recurring | None = None
    interval: str | None = None
    interval_count: int | None = None


class SubscriptionItem(StripeModel):
    id: str = ""
    price: Annotated[Price | None, BeforeValidator(_price)] = None
    plan: Annotated[Price | None, BeforeValidator(_price)] = None
    quantity: int | None = None
    current_period_start: Ts = None
    current_period_end: Ts = None


class Subscription(StripeModel):
    """`customer.subscription.*` events."""

    id: str
    customer: Ref = None
    metadata: Metadata = ObjectMetadata()
    status: str | None = None
    currency: Currency = None
    items: Annotated[list[SubscriptionItem], BeforeValidator(_list_object)] = []
    current_period_start: Ts = None
    current_period_end: Ts = None
    cancel_at_period_end: bool = False
    cancel_at: Ts = None
    canceled_at: Ts = None
    ended_at: Ts = None
    trial_start: Ts = None
    trial_end: Ts = None
    start_date: Ts = None
    latest_invoice: Ref = None


# -- Stripe invoices (subscription billing) ----------------------------------------------------------


class SubscriptionDetails(StripeModel):
    subscription: Ref = None
    metadata: Metadata = ObjectMetadata()


class InvoiceParent(StripeModel):
    subscription_details: SubscriptionDetails | None = None


class StatusTransitions(StripeModel):
    finalized_at: Ts = None
    paid_at: Ts = None


class LinePricing(StripeModel):
    price_details: PriceDetails | None = None
    unit_amount_decimal: Decimal | None = None  # minor units; a proration's may have a fraction


class LineParent(StripeModel):
    subscription_item_details: ProrationDetails | None = None
    invoice_item_details: ProrationDetails | None = None


class InvoiceLine(StripeModel):
    id: str = ""
    description: str | None = None
    amount: Annotated[int, BeforeValidator(lambda v: v or 0)] = 0
    currency: Currency = None
    quantity: int | None = None
    price: Annotated[Price | None, BeforeValidator(_price)] = None  # API versions before 2025-03-31
    unit_amount_excluding_tax: Decimal | None = None  # idem
    pricing: LinePricing | None = None
    proration: bool | None = None
    parent: LineParent | None = None
    period: Period = Period()

    @property
    def price_id(self) -> str | None:
        if self.price and self.price.id:
            return self.price.id
        details = self.pricing.price_details if self.pricing else None
        return details.price if details else None

    @property
    def unit_amount_decimal(self) -> Decimal | None:
        """The unit price in minor units, as Stripe states it (current API first, then older ones)."""
        if self.pricing and self.pricing.unit_amount_decimal is not None:
            return self.pricing.unit_amount_decimal
        if self.unit_amount_excluding_tax is not None:
            return self.unit_amount_excluding_tax
        if self.price and self.price.unit_amount is not None:
            return Decimal(self.price.unit_amount)
        return None

    @property
    def is_proration(self) -> bool:
        if self.proration is not None:
            return self.proration
        for details in (self.parent.subscription_item_details, self.parent.invoice_item_details) if self.parent else ():
            if details is not None and details.proration is not None:
                return details.proration
        return False


class Invoice(StripeModel):
    """`invoice.*` events (Stripe's invoices of subscriptions, not ours)."""

    id: str
    customer: Ref = None
    subscription: Ref = None  # API versions before 2025-03-31
    subscription_details: SubscriptionDetails | None = None  # idem
    parent: InvoiceParent | None = None
    metadata: Metadata = ObjectMetadata()
    status: str | None = None
    number: str | None = None
    currency: Currency = None
    collection_method: str | None = None
    created: Ts = None
    due_date: Ts = None
    subtotal: int | None = None
    tax: int | None = None
    total: int | None = None
    amount_due: Annotated[int, BeforeValidator(lambda v: v or 0)] = 0
    amount_paid: Annotated[int, BeforeValidator(lambda v: v or 0)] = 0
    amount_remaining: int | None = None
    billing_reason: str | None = None
    attempt_count: int | None = None
    next_payment_attempt: Ts = None
    period_start: Ts = None
    period_end: Ts = None
    status_transitions: StatusTransitions = StatusTransitions()
    hosted_invoice_url: str | None = None
    invoice_pdf: str | None = None
    lines: Annotated[list[InvoiceLine], BeforeValidator(_list_object)] = []

    @property
    def subscription_id(self) -> str | None:
        if self.subscription:
            return self.subscription
        details = self.parent.subscription_details if self.parent else None
        return details.subscription if details else None

    @property
    def price_id(self) -> str | None:
        """The Stripe price the subscription bills: its line for the period (not a proration), else any."""
        priced = [line for line in self.lines if line.price_id]
        regular = [line for line in priced if not line.is_proration]
        chosen = (regular or priced)[:1]
        return chosen[0].price_id if chosen else None

    @property
    def subscription_metadata(self) -> ObjectMetadata:
        """The subscription's metadata copied onto the invoice (either API shape; the older wins)."""
        merged: dict[str, str] = {}
        for details in (self.parent.subscription_details if self.parent else None, self.subscription_details):
            if details is not None:
                merged.update(details.metadata.as_dict())
        return ObjectMetadata.model_validate(merged)


# -- the event -----------------------------------------------------------------------------------------

ObjT = TypeVar("ObjT", bound=StripeModel)


class EventData(StripeModel, Generic[ObjT]):
    object: ObjT


class Event(StripeModel, Generic[ObjT]):
    """A stored Stripe event with its `data.object` parsed into the model its type carries."""

    id: str
    type: str
    created: StrictInt  # unix seconds; Stripe's order of events (one-second resolution)
    livemode: bool = False
    data: EventData[ObjT]

    @property
    def object(self) -> ObjT:
        return self.data.object

    @property
    def created_at(self) -> datetime:
        return from_unix(self.created) or EPOCH


@cache
def _event_of(model: type[ObjT]) -> type[Event[ObjT]]:
    # Held here: pydantic keeps a parametrized generic only weakly, and built Event[model] anew (a
    # class creation, milliseconds) after each garbage collection (bench.payments_cpu under py-spy).
    return Event[model]  # type: ignore[valid-type]


def parse_event(payload: bytes, model: type[ObjT]) -> Event[ObjT]:
    """The event in `payload`, its object as `model`. A payload Stripe would never send (a string
    where an amount belongs, a currency that is no code) is a ValueError naming the field."""
    try:
        return _event_of(model).model_validate_json(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)[:5]
        )
        raise ValueError(f"unreadable Stripe {model.__name__} event: {problems}") from None


def payment_method(types: list[str]) -> str:
    """The method of a payment: the one method offered, else just "stripe"."""
    return types[0] if len(types) == 1 else "stripe"

