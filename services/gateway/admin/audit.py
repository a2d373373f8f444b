"""Audit log page: who changed money or documents, when, and what (services.gateway.audit).

The log lives in the gateway's own database, so the page reads it there (as `GET /api/audit` does),
with the same filters and keyset pages. Filter input is judged here: a bad date or an unknown action
is a message on the page, never a 500.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kit.errors import AppError
from kit.pagination import Page, PageRequest
from kit.web import RequestUnitOfWork, calendar_date
from services.gateway.admin.common import query_pairs
from services.gateway.admin.web import AdminSession, render
from services.gateway.audit import ACTIONS, AuditEntryOut, list_entries
from services.gateway.repository import AuditFilter

router = APIRouter()
PAGE_SIZE = 50
Text = Annotated[str | None, Query(max_length=320)]
ACTION_OPTIONS = [("", "Any action"), *((name, name) for name in ACTIONS)]
OUTCOME_LABELS = {"succeeded": "Done", "refused": "Refused", "unknown": "Unknown outcome"}


def _day(value: str | None, field: str, errors: dict[str, str]) -> date | None:
    if not value:
        return None
    try:
        return calendar_date(date.fromisoformat(value))
    except ValueError:
        errors[field] = "Enter a date as YYYY-MM-DD between 1970 and 2100."
        return None


@router.get("/audit")
async def audit_page(
    request: Request, session: AdminSession, uow: RequestUnitOfWork,
    cursor: Annotated[str | None, Query(max_length=2000, pattern=r"^[A-Za-z0-9_\-]*$")] = None,
    actor: Text = None, action: Text = None, target: Text = None,
    occurred_from: Annotated[str | None, Query(alias="from", max_length=10)] = None,
    occurred_to: Annotated[str | None, Query(alias="to", max_length=10)] = None,
) -> Response:
    errors: dict[str, str] = {}
    if action and action not in ACTIONS:
        errors["action"] = "Choose an action from the list."
    first = _day(occurred_from, "from", errors)
    last = _day(occurred_to, "to", errors)
    if first and last and first > last:
        errors["to"] = "The last day is before the first."
    # Days, in UTC: `to` takes in the whole of its day.
    filters = AuditFilter(
        actor=(actor or "").strip() or None, action=action if action in ACTIONS else None,
        target=(target or "").strip()[:200] or None,
        occurred_from=datetime.combine(first, time(), UTC) if first else None,
        occurred_to=datetime.combine(last + timedelta(days=1), time(), UTC) if last else None,
    )
    page: Page[AuditEntryOut] = Page[AuditEntryOut](items=[])
    failure = None
    if not errors:
        try:
            page = await list_entries(uow, filters, PageRequest(limit=PAGE_SIZE, cursor=cursor or None))
        except AppError as exc:  # a cursor of another filter: start again from the first page
            failure = exc.message
    context = {
        "page": page, "failure": failure, "errors": errors, "query": query_pairs(request), "cursor": cursor,
        "filters": {"actor": actor or "", "action": action or "", "target": target or "",
                    "from": occurred_from or "", "to": occurred_to or ""},
        "action_options": ACTION_OPTIONS, "outcome_labels": OUTCOME_LABELS,
    }
    return render(request, "audit.html", context, status_code=422 if errors else 200, session=session)
