"""The reminder schedule as a pure function: which reminder (if any) is due for one invoice on a day.

The scan does the same in SQL (repository._FIND_DUE_SQL) over an index; this is the reference it is
tested against, and what the benchmark's naive full-table scan uses.
"""

from __future__ import annotations

from datetime import date

from contracts.invoice import OPEN_STATUSES, InvoiceStatus


def reminder_due(
    as_of: date,
    *,
    status: InvoiceStatus,
    amount_due: int,
    due_date: date | None,
    issue_date: date | None,
    days_before: tuple[int, ...] | list[int],
    repeat: int,
    max_notices: int,
) -> tuple[str, int] | None:
    """("before_due", days) or ("overdue", notice number) due as of `as_of`, else None.

    * before the due date: the reminder of the smallest threshold >= days left (so a scan that missed
      the 7-day day still sends it late, but never after the 1-day one), and only if its nominal day
      falls after the issue date (no "due in 7 days" for an invoice issued 3 days before its due date);
    * on the due date: nothing;
    * after it: notice n = 1 + (days overdue - 1) // repeat, at most `max_notices`, and nothing once
      the last notice's period has passed (a late scan sends the current notice, not the backlog);
      and only for an invoice the invoice service says is OVERDUE (`status`: the copy's, or OVERDUE
      when the invoice service has just answered so): the email never contradicts the invoice.
    """
    if status not in OPEN_STATUSES or amount_due <= 0 or due_date is None:
        return None
    days_left = (due_date - as_of).days
    if days_left > 0:
        candidates = [d for d in days_before if d >= days_left]
        if not candidates:
            return None
        threshold = min(candidates)
        if issue_date is not None and (due_date - issue_date).days <= threshold:
            return None
        return ("before_due", threshold)
    if days_left == 0 or max_notices <= 0:
        return None
    overdue = -days_left
    if overdue > max_notices * repeat or status != InvoiceStatus.OVERDUE:
        return None
    return ("overdue", min(max_notices, 1 + (overdue - 1) // repeat))
