"""Request and response bodies of the payments API (camelCase JSON, amounts in minor units)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.alias_generators import to_camel

from kit.web import MIN_DATE, utc_datetime

MAX_AMOUNT = 10**13  # minor units; far above any invoice, far below int64


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class InputModel(ApiModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL text cannot hold U+0000: refused here rather than failing the insert (a 500).
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        return value


class ManualMethod(StrEnum):
    BANK_TRANSFER = "bank_transfer"
    CASH = "cash"
    CHEQUE = "cheque"
    OTHER = "other"


class MarkPaidRequest(InputModel):
    amount: Annotated[int, Field(gt=0, le=MAX_AMOUNT, strict=True, description="minor units (cents)")]
    method: ManualMethod
    # With its timezone (e.g. 2026-03-01T10:00:00Z), stored in UTC: an offset that takes the
    # instant out of UTC's range (0001-01-01T00:00:00+14:00) is a 422, not a failed insert.
    paid_at: Annotated[AwareDatetime, AfterValidator(utc_datetime)] | None = None
    reference: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    # Optional; when given it must be the invoice's currency (a payment takes the invoice's currency).
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True)] | None = None

    @field_validator("paid_at")
    @classmethod
    def _not_before_1970(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.date() < MIN_DATE:
            raise ValueError(f"paidAt must be after {MIN_DATE}")
        return value


class RefundOut(ApiModel):
    id: uuid.UUID
    amount: int
    currency: str
    stripe_refund_id: str | None
    created_at: datetime


class PaymentOut(ApiModel):
    id: uuid.UUID
    invoice_id: str
    client_id: str | None
    amount: int
    currency: str
    method: str
    source: str
    status: str
    amount_refunded: int
    paid_at: datetime | None
    reference: str | None
    failure_code: str | None
    failure_message: str | None
    flags: list[str]
    held: bool
    applied: bool
    stripe_checkout_session_id: str | None
    stripe_payment_intent_id: str | None
    refunds: list[RefundOut] = []
    created_at: datetime
    updated_at: datetime


class CheckoutOut(ApiModel):
    """Where to send the client to pay: `sessionId` of a Checkout Session, or for a subscription's
    invoice `stripeInvoiceId` (its page at Stripe; no session, no expiry)."""

    url: str
    session_id: str | None = None
    stripe_invoice_id: str | None = None
    expires_at: datetime | None = None
    amount: int
    currency: str
    reused: bool = False


class CheckoutStatusOut(ApiModel):
    """What the portal's success page polls: it shows "processing" until the webhook confirms."""

    session_id: str
    invoice_id: str
    session_status: str  # open | complete | expired
    payment_status: str  # processing | paid | failed | expired
    payment_id: uuid.UUID | None = None
    amount: int
    currency: str
