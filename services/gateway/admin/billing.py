"""Payments (every payment, filterable), Emails (the notification log, with retry) and Run reminders."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from contracts.notification import NotificationKind
from services.gateway.admin.api import ApiError
from services.gateway.admin.common import api, clients_by_id, first_error, query_pairs, text
from services.gateway.admin.invoices import _uuid_or_none
from services.gateway.admin.models import Notification, Page, Payment, ReminderRun
from services.gateway.admin.web import AdminSession, Csrf, is_htmx, redirect, render

router = APIRouter()
Cursor = Annotated[str | None, Query(max_length=2000)]

PAYMENT_METHODS = [("", "Any method"), ("card", "Card"), ("bank_transfer", "Bank transfer"), ("cash", "Cash"),
                   ("cheque", "Cheque"), ("other", "Other")]
PAYMENT_SOURCES = [("", "Any source"), ("manual", "Recorded by hand"), ("stripe", "Stripe")]
PAYMENT_STATUSES = [("", "Any status"), ("succeeded", "Succeeded"), ("pending", "Pending"), ("failed", "Failed"),
                    ("refunded", "Refunded"), ("partially_refunded", "Partially refunded")]
EMAIL_STATUSES = [("", "Any status"), ("pending", "Pending"), ("sending", "Sending"), ("sent", "Sent"),
                  ("failed", "Failed"), ("skipped", "Skipped")]
# The filter offers every kind the notifications service sends (contracts.NotificationKind is the list).
KIND_LABELS = {
    NotificationKind.INVOICE_SENT: "Invoice sent", NotificationKind.PAYMENT_RECEIPT: "Payment receipt",
    NotificationKind.PAYMENT_FAILED: "Payment failed", NotificationKind.REMINDER_BEFORE_DUE: "Reminder before due",
    NotificationKind.REMINDER_OVERDUE: "Overdue notice", NotificationKind.INVOICE_CANCELLED: "Invoice cancelled",
    NotificationKind.SUBSCRIPTION: "Subscription", NotificationKind.TRIAL_WILL_END: "Trial ends",
    NotificationKind.CARD_UPDATE: "Update your card", NotificationKind.PORTAL_INVITATION: "Portal invitation",
}
EMAIL_KINDS = [("", "Any kind"), *((kind.value, KIND_LABELS.get(kind, kind.value)) for kind in NotificationKind)]


@router.get("/payments")
async def payment_list(
    request: Request, session: AdminSession, cursor: Cursor = None,
    method: Annotated[str | None, Query(max_length=30)] = None,
    source: Annotated[str | None, Query(max_length=10)] = None,
    status: Annotated[str | None, Query(max_length=30)] = None,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None,
) -> Response:
    a = api(request, session)
    params: dict[str, Any] = {"limit": 20, "cursor": cursor}
    if method in dict(PAYMENT_METHODS):
        params["method"] = method
    if source in dict(PAYMENT_SOURCES):
        params["source"] = source
    if status in dict(PAYMENT_STATUSES):
        params["status"] = status
    if client_id and _uuid_or_none(client_id):
        params["clientId"] = client_id
    page: Page[Payment] = Page[Payment](items=[])
    failure = None
    try:
        page = await a.get(Page[Payment], "/api/payments", params)
    except ApiError as exc:
        failure = "The payments service is not available right now." if exc.unavailable else first_error(exc)
    names = await clients_by_id(a, (p.client_id or "" for p in page.items))
    context = {"page": page, "failure": failure, "names": names, "query": query_pairs(request), "cursor": cursor,
               "filters": {"method": method or "", "source": source or "", "status": status or ""},
               "method_options": PAYMENT_METHODS, "source_options": PAYMENT_SOURCES,
               "status_options": PAYMENT_STATUSES}
    if is_htmx(request) and request.headers.get("hx-target") == "payment-results":
        return render(request, "partials/payment_results.html", context, session=session)
    return render(request, "payments.html", context, session=session)


@router.get("/emails")
async def email_log(
    request: Request, session: AdminSession, cursor: Cursor = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    retried: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    params: dict[str, Any] = {"limit": 20, "cursor": cursor}
    if status in dict(EMAIL_STATUSES):
        params["status"] = status
    if kind in dict(EMAIL_KINDS):
        params["kind"] = kind
    page: Page[Notification] = Page[Notification](items=[])
    failure = None
    try:
        page = await api(request, session).get(Page[Notification], "/api/notifications", params)
    except ApiError as exc:
        failure = "The notifications service is not available right now." if exc.unavailable else first_error(exc)
    context = {"page": page, "failure": failure, "query": query_pairs(request, drop=("retried",)), "cursor": cursor,
               "filters": {"status": status or "", "kind": kind or ""}, "status_options": EMAIL_STATUSES,
               "kind_options": EMAIL_KINDS, "notice": "The email is queued again." if retried else None,
               "error": None}
    if is_htmx(request) and request.headers.get("hx-target") == "email-results":
        return render(request, "partials/email_results.html", context, session=session)
    return render(request, "emails.html", context, session=session)


@router.post("/emails/{notification_id}/retry", dependencies=[Csrf])
async def retry_email(request: Request, session: AdminSession, notification_id: str) -> Response:
    if _uuid_or_none(notification_id) is None:
        return render(request, "error.html", {"title": "No such email", "message": "There is no email here."},
                      status_code=404, session=session)
    try:
        await api(request, session).post(Notification, f"/api/notifications/{notification_id}/retry", {})
    except ApiError as exc:
        return render(request, "error.html", {"title": "Not retried", "message": first_error(exc)},
                      status_code=exc.status if exc.status >= 400 else 422, session=session)
    return redirect(request, f"/admin/emails?retried={notification_id}")


@router.get("/reminders")
async def reminders_page(request: Request, session: AdminSession) -> Response:
    return render(request, "reminders.html", {"as_of": date.today().isoformat(), "result": None, "errors": {},
                                              "failure": None}, session=session)


@router.post("/reminders", dependencies=[Csrf])
async def run_reminders(request: Request, session: AdminSession) -> Response:
    raw = await request.form()
    as_of = text(raw, "as_of").strip()
    errors: dict[str, str] = {}
    body: dict[str, Any] = {}
    if as_of:
        try:
            body["asOf"] = date.fromisoformat(as_of).isoformat()
        except ValueError:
            errors["as_of"] = "Enter a date (YYYY-MM-DD)."
    result: ReminderRun | None = None
    failure = None
    if not errors:
        try:
            result = await api(request, session).post(ReminderRun, "/api/reminders/run", body)
        except ApiError as exc:
            failure = ("Reminders could not run: a service they need is not available. Nothing was sent; "
                       "try again later.") if exc.unavailable else first_error(exc)
    return render(request, "reminders.html", {"as_of": as_of, "result": result, "errors": errors,
                                              "failure": failure},
                  status_code=422 if errors else (503 if failure else 200), session=session)
