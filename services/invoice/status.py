"""The invoice status machine of DESIGN.md. Pure; the service asks before every change."""

from __future__ import annotations

from enum import StrEnum


class InvoiceStatus(StrEnum):
    DRAFT = "DRAFT"
    SENT = "SENT"
    VIEWED = "VIEWED"
    PARTIAL = "PARTIAL"
    PAID = "PAID"
    OVERDUE = "OVERDUE"
    CANCELLED = "CANCELLED"


S = InvoiceStatus

ALLOWED: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    S.DRAFT: frozenset({S.SENT, S.CANCELLED}),
    S.SENT: frozenset({S.VIEWED, S.PARTIAL, S.PAID, S.OVERDUE, S.CANCELLED}),
    S.VIEWED: frozenset({S.PARTIAL, S.PAID, S.OVERDUE, S.CANCELLED}),
    S.PARTIAL: frozenset({S.PAID, S.OVERDUE}),
    S.OVERDUE: frozenset({S.PARTIAL, S.PAID, S.CANCELLED}),
    S.PAID: frozenset(),
    S.CANCELLED: frozenset(),
}

# States in which money is still expected.
OPEN = frozenset({S.SENT, S.VIEWED, S.PARTIAL, S.OVERDUE})


def can_transition(current: InvoiceStatus, target: InvoiceStatus) -> bool:
    return target in ALLOWED[current]
