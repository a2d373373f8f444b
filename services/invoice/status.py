"""The invoice status machine of DESIGN.md. Pure; the service asks before every change."""

from __future__ import annotations

from contracts.invoice import OPEN_STATUSES, InvoiceStatus

__all__ = ["ALLOWED", "ALLOWED_ON_REFUND", "OPEN", "InvoiceStatus", "can_transition"]

S = InvoiceStatus

# The moves of the ordinary life of an invoice. None of them goes backwards: a late or replayed
# event (a payment failure after the payment, an email opened after the payment) never moves it.
ALLOWED: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    S.DRAFT: frozenset({S.SENT, S.CANCELLED}),
    S.SENT: frozenset({S.VIEWED, S.PARTIAL, S.PAID, S.OVERDUE, S.CANCELLED}),
    S.VIEWED: frozenset({S.PARTIAL, S.PAID, S.OVERDUE, S.CANCELLED}),
    S.PARTIAL: frozenset({S.PAID, S.OVERDUE}),
    S.OVERDUE: frozenset({S.PARTIAL, S.PAID, S.CANCELLED}),
    S.PAID: frozenset(),
    S.CANCELLED: frozenset(),
}

# The moves only a refund makes. A refund is new money going back to the client, not a stale
# event, so it may reopen an invoice: a PAID invoice becomes PARTIAL while something stays paid,
# and PAID or PARTIAL go back to the open state they would have without any payment (SENT, VIEWED
# once opened, OVERDUE once past due) when the refund takes amountPaid to 0. Kept apart from
# ALLOWED so that only a refund, asked for by name, can move an invoice backwards.
ALLOWED_ON_REFUND: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    S.PAID: frozenset({S.PARTIAL, S.SENT, S.VIEWED, S.OVERDUE}),
    S.PARTIAL: frozenset({S.SENT, S.VIEWED}),
}

OPEN = OPEN_STATUSES


def can_transition(current: InvoiceStatus, target: InvoiceStatus, *, refund: bool = False) -> bool:
    if target in ALLOWED[current]:
        return True
    return refund and target in ALLOWED_ON_REFUND.get(current, frozenset())
