"""payment.* events (topic billing.payment, key = invoice id so one invoice's payments stay ordered)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:payment:v1"


class PaymentEventType(StrEnum):
    SUCCEEDED = "payment.succeeded"  # an online (Stripe) payment settled
    RECORDED = "payment.recorded"  # a manual payment (bank transfer, cash, cheque, other)
    FAILED = "payment.failed"
    REFUNDED = "payment.refunded"


class PaymentEventV1(ContractModel):
    payment_id: str
    invoice_id: str
    client_id: str | None = None
    amount: int  # minor units; for a refund, the amount refunded (positive)
    currency: str
    method: str  # card, bank_transfer, cash, cheque, other
    status: str  # succeeded, failed, refunded
    paid_at: datetime | None = None
    reference: str | None = None
    failure_reason: str | None = None
    stripe_payment_intent_id: str | None = None
    stripe_checkout_session_id: str | None = None
    stripe_event_id: str | None = None
