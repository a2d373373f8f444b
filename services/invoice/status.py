"""The invoice status machine of DESIGN.md. Pure; the service asks before every change."""

from __future__ import annotations

from contracts.invoice import OPEN_STATUSES, InvoiceStatus

__all__ = ["ALLOWED", "OPEN", "InvoiceStatus", "can_transition"]

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

OPEN = OPEN_STATUSES


def can_transition(current: InvoiceStatus, target: InvoiceStatus) -> bool:
    return target in ALLOWED[current]
