"""notification.* events (topic billing.notification, key = invoice id, else the message id).

Published by the notifications service through its outbox. `notification.opened` is what moves an
invoice from SENT to VIEWED (the invoice service consumes it); it is published at most once per
message, on the first open of its tracking pixel or tracked link.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:notification:v1"


class NotificationEventType(StrEnum):
    SENT = "notification.sent"  # the SMTP server accepted the message
    FAILED = "notification.failed"  # gave up after the configured number of attempts
    OPENED = "notification.opened"  # first open (pixel or tracked link) of one message


class NotificationKind(StrEnum):
    INVOICE_SENT = "invoice_sent"  # the invoice, PDF attached
    PAYMENT_RECEIPT = "payment_receipt"  # payment.succeeded / payment.recorded
    PAYMENT_FAILED = "payment_failed"  # payment.failed: please retry
    INVOICE_CANCELLED = "invoice_cancelled"
    REMINDER_BEFORE_DUE = "reminder_before_due"  # R2/R3: N days before the due date
    REMINDER_OVERDUE = "reminder_overdue"  # R4: the day after the due date, then every N days
    SUBSCRIPTION = "subscription"  # subscription.* notices
    TRIAL_WILL_END = "trial_will_end"  # subscription.trial_will_end: "your trial ends on <date>"
    CARD_UPDATE = "card_update"  # a failed renewal charge: "update your card", once per Stripe invoice
    PORTAL_INVITATION = "portal_invitation"  # the admin's "Invite to portal": the set-password link


class NotificationEventV1(ContractModel):
    """Payload of notification.sent and notification.failed."""

    message_id: str  # the notification's id in the notifications service (uuid)
    smtp_message_id: str | None = None  # the RFC 5322 Message-ID header of the email
    invoice_id: str | None = None
    kind: str  # a NotificationKind value
    recipient: str
    subject: str
    attempts: int = 0
    sent_at: datetime | None = None
    failed_at: datetime | None = None
    error: str | None = None
    attachment_missing: bool = False  # the invoice PDF could not be fetched; sent without it
    reminder_sequence: int | None = None  # days before due, or the overdue notice number


class NotificationOpenedV1(ContractModel):
    """Payload of notification.opened: the first open of one message (pixel or tracked link)."""

    message_id: str
    invoice_id: str | None = None
    kind: str
    opened_at: datetime
    recipient: str
    via: str = "pixel"  # pixel | link
