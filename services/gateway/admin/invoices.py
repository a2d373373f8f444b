"""Invoices: the list (AUI1), the new-invoice form (AUI2), editing a draft (AUI3), sending (AUI4),
recording a payment (AUI5), cancelling, the PDF, and the invoice's history."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from contracts.invoice import OPEN_STATUSES, InvoiceStatus
from services.gateway.admin import formatting
from services.gateway.admin.api import Api, ApiError
from services.gateway.admin.common import (
    api,
    clients_by_id,
    first_error,
    idempotency_headers,
    query_pairs,
    recent_clients,
    text,
    with_selected,
)
from services.gateway.admin.formatting import MoneyInputError, parse_major
from services.gateway.admin.invoice_form import Checked, InvoiceForm, add_totals, api_errors, check
from services.gateway.admin.models import Client, Invoice, Notification, Page, Payment
from services.gateway.admin.web import AdminSession, Csrf, is_htmx, redirect, render

router = APIRouter()

OPEN = "open"
STATUS_OPTIONS = [("", "Any status"), (OPEN, "Open (sent, viewed, partly paid, overdue)")] + [
    (s.value, formatting.STATUS_LABELS[s.value]) for s in InvoiceStatus
]
SORT_OPTIONS = [
    ("-createdAt", "Newest first"), ("createdAt", "Oldest first"),
    ("dueDate", "Due soonest"), ("-dueDate", "Due latest"),
    ("-issueDate", "Issued latest"), ("issueDate", "Issued earliest"),
    ("-total", "Largest total"), ("total", "Smallest total"),
    ("-invoiceNumber", "Number, high to low"), ("invoiceNumber", "Number, low to high"),
    ("status", "Status"),
]
PAGE_SIZE = 20
MAX_POLLS = 60  # one a second while a recorded payment reaches the invoice
SETTLED = ("succeeded", "refunded", "partially_refunded")
METHOD_OPTIONS = [("bank_transfer", "Bank transfer"), ("cash", "Cash"), ("cheque", "Cheque"), ("other", "Other")]
Filter = Annotated[str | None, Query(max_length=100)]
Day = Annotated[str | None, Query(max_length=10)]


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


# -- the list ------------------------------------------------------------------------------------


@router.get("/invoices")
async def invoice_list(
    request: Request,
    session: AdminSession,
    status: Annotated[str | None, Query(max_length=20)] = None,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None,
    number: Annotated[str | None, Query(max_length=20)] = None,
    issued_from: Annotated[str | None, Query(alias="issuedFrom", max_length=10)] = None,
    issued_to: Annotated[str | None, Query(alias="issuedTo", max_length=10)] = None,
    due_after: Annotated[str | None, Query(alias="dueAfter", max_length=10)] = None,
    due_before: Annotated[str | None, Query(alias="dueBefore", max_length=10)] = None,
    sort: Annotated[str, Query(max_length=20)] = "-createdAt",
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    a = api(request, session)
    errors: dict[str, str] = {}
    params: dict[str, Any] = {"limit": PAGE_SIZE, "cursor": cursor}
    if status == OPEN:
        params["status"] = sorted(s.value for s in OPEN_STATUSES)
    elif status:
        if status in InvoiceStatus.__members__:
            params["status"] = status
        else:
            errors["status"] = "Choose a status from the list."
    if client_id:
        if _uuid_or_none(client_id) is None:
            errors["clientId"] = "Choose a client from the list."
        else:
            params["clientId"] = client_id
    if number and number.strip():
        params["number"] = number.strip()
    for key, value in (("issuedFrom", issued_from), ("issuedTo", issued_to), ("dueAfter", due_after),
                       ("dueBefore", due_before)):
        if value:
            try:
                params[key] = date.fromisoformat(value).isoformat()
            except ValueError:
                errors[key] = "Enter a date (YYYY-MM-DD)."
    if sort not in dict(SORT_OPTIONS):
        errors["sort"] = "Choose an order from the list."
        sort = "-createdAt"
    params["sort"] = sort

    page: Page[Invoice] = Page[Invoice](items=[])
    failure: str | None = None
    clients: list[Client] = []
    try:
        clients_task = asyncio.ensure_future(recent_clients(a))
        if not errors:
            page = await a.get(Page[Invoice], "/api/invoices", params)
        clients = await clients_task
    except ApiError as exc:
        failure = "The invoice service is not available right now." if exc.unavailable else first_error(exc)
    names = await clients_by_id(a, (i.client_id for i in page.items), clients)
    context = {
        "page": page, "client_options": [("", "Any client")] + [(c.id, c.name) for c in clients], "names": names,
        "errors": errors, "failure": failure,
        "filters": {"status": status or "", "clientId": client_id or "", "number": number or "",
                    "issuedFrom": issued_from or "", "issuedTo": issued_to or "", "dueAfter": due_after or "",
                    "dueBefore": due_before or "", "sort": sort},
        "status_options": STATUS_OPTIONS, "sort_options": SORT_OPTIONS,
        "query": query_pairs(request), "cursor": cursor,
    }
    if is_htmx(request) and request.headers.get("hx-target") == "invoice-results":
        return render(request, "partials/invoice_results.html", context, session=session)
    return render(request, "invoices.html", context, session=session)


# -- the form ------------------------------------------------------------------------------------


async def _currency_of(a: Api, client_id: str, clients: list[Client] | None = None) -> str | None:
    if not client_id or _uuid_or_none(client_id) is None:
        return None
    for c in clients or ():
        if c.id == client_id:
            return c.currency
    try:
        return (await a.get(Client, f"/api/clients/{client_id}")).currency
    except ApiError:
        return None


async def _form_page(
    request: Request, session: AdminSession, form: InvoiceForm, *, invoice: Invoice | None,
    checked: Checked | None = None, status_code: int = 200, failure: str | None = None,
) -> Response:
    a = api(request, session)
    locale = formatting.request_locale(request)
    try:
        clients = await recent_clients(a)
    except ApiError as exc:
        clients = []
        failure = failure or ("The invoice service is not available right now." if exc.unavailable
                              else first_error(exc))
    if invoice is not None:
        clients = await with_selected(a, clients, invoice.client_id)
    clients = await with_selected(a, clients, form.client_id)
    currency = await _currency_of(a, form.client_id, clients) if form.client_id else None
    if checked is None:
        checked = await add_totals(a, check(form, currency, locale, require_client=False), currency)
        checked.errors = {}  # a fresh form shows no errors until it is typed in or saved
    return render(request, "invoice_form.html", {
        "form": form, "invoice": invoice, "clients": clients, "currency": currency,
        "client_options": [("", "Choose a client…")] + [(c.id, f"{c.name} ({c.currency})") for c in clients],
        "checked": checked,
        "errors": checked.errors, "failure": failure, "method_options": METHOD_OPTIONS,
    }, status_code=status_code, session=session)


@router.get("/invoices/new")
async def new_invoice(
    request: Request, session: AdminSession,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None,
) -> Response:
    form = InvoiceForm(client_id=_uuid_or_none(client_id or "") or "")
    return await _form_page(request, session, form, invoice=None)


@router.post("/invoices/form/totals", dependencies=[Csrf])
async def form_totals(request: Request, session: AdminSession) -> Response:
    """The server's totals for the form as typed, with each field's error (htmx, on every input)."""
    form = InvoiceForm.from_form(await request.form())
    a = api(request, session)
    locale = formatting.request_locale(request)
    currency = await _currency_of(a, form.client_id)
    checked = await add_totals(a, check(form, currency, locale), currency)
    checked.errors.pop("lines", None)  # "add a line" is said on saving, not while typing
    return render(request, "partials/invoice_totals_inner.html", {
        "form": form, "currency": currency, "checked": checked, "errors": checked.errors, "oob": True,
    }, session=session)


@router.post("/invoices/form/lines", dependencies=[Csrf])
async def form_lines(request: Request, session: AdminSession) -> Response:
    """Add a line or remove one; the lines come back with what was typed in them."""
    raw = await request.form()
    form = InvoiceForm.from_form(raw)
    op = text(raw, "op")
    focus: int | None = None
    if op == "add":
        form.with_line_added()
        focus = len(form.lines) - 1
    elif op.startswith("remove-") and op[7:].isdigit():
        form.with_line_removed(int(op[7:]))
        focus = min(int(op[7:]), len(form.lines) - 1)
    a = api(request, session)
    currency = await _currency_of(a, form.client_id)
    checked = await add_totals(a, check(form, currency, formatting.request_locale(request), require_client=False),
                               currency)
    checked.errors = {}
    return render(request, "partials/invoice_lines.html", {
        "form": form, "currency": currency, "checked": checked, "errors": {}, "focus": focus,
    }, session=session, headers={"HX-Trigger": "lines-changed"})


def _submitted_op(raw: Any) -> str:
    return text(raw, "op")


async def _save(request: Request, session: AdminSession, invoice: Invoice | None) -> Response:
    raw = await request.form()
    form = InvoiceForm.from_form(raw)
    op = _submitted_op(raw)
    if op == "add" or op.startswith("remove-"):  # without JavaScript the line buttons submit the form
        if op == "add":
            form.with_line_added()
        elif op[7:].isdigit():
            form.with_line_removed(int(op[7:]))
        return await _form_page(request, session, form, invoice=invoice)
    a = api(request, session)
    locale = formatting.request_locale(request)
    currency = await _currency_of(a, form.client_id)
    if form.client_id and currency is None:
        checked = check(form, None, locale)
        checked.errors["client_id"] = "This client does not exist (any more). Choose another."
        return await _form_page(request, session, form, invoice=invoice, checked=checked, status_code=422)
    checked = check(form, currency, locale)
    if checked.body is None:
        await add_totals(a, checked, currency)  # the totals of what is right so far, beside the errors
        return await _form_page(request, session, form, invoice=invoice, checked=checked, status_code=422)
    try:
        if invoice is None:
            body = {k: v for k, v in checked.body.items() if v is not None}
            saved = await a.post(Invoice, "/api/invoices", body, headers=idempotency_headers(raw))
        else:
            saved = await a.put(Invoice, f"/api/invoices/{invoice.id}", checked.body)
    except ApiError as exc:
        if exc.status == 422:
            # The service's own refusal (e.g. a discount above its line), next to the field at fault;
            # the preview of the same body would refuse it the same way, so no totals are asked.
            checked.errors.update(api_errors(exc.field_errors(), checked.api_lines) or {"form": first_error(exc)})
            return await _form_page(request, session, form, invoice=invoice, checked=checked, status_code=422)
        return await _form_page(request, session, form, invoice=invoice, checked=checked, status_code=422,
                                failure=first_error(exc))
    return redirect(request, f"/admin/invoices/{saved.id}?saved=1")


@router.post("/invoices", dependencies=[Csrf])
async def create_invoice(request: Request, session: AdminSession) -> Response:
    return await _save(request, session, None)


async def _invoice(request: Request, session: AdminSession, invoice_id: str) -> Invoice | Response:
    if _uuid_or_none(invoice_id) is None:
        return render(request, "error.html", {"title": "No such invoice", "message": "There is no invoice here."},
                      status_code=404, session=session)
    try:
        return await api(request, session).get(Invoice, f"/api/invoices/{invoice_id}")
    except ApiError as exc:
        if exc.status == 404:
            return render(request, "error.html", {"title": "No such invoice",
                                                  "message": "There is no invoice with this id."},
                          status_code=404, session=session)
        return render(request, "error.html", {"title": "Invoice unavailable", "message": first_error(exc)},
                      status_code=exc.status if exc.status >= 500 else 502, session=session)


@router.get("/invoices/{invoice_id}/edit")
async def edit_invoice(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    if not found.editable:
        return redirect(request, f"/admin/invoices/{found.id}")
    form = InvoiceForm.from_invoice(found, formatting.request_locale(request))
    return await _form_page(request, session, form, invoice=found)


@router.post("/invoices/{invoice_id}", dependencies=[Csrf])
async def update_invoice(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    if not found.editable:
        return await _detail(request, session, found, notice=None,
                             error=f"This invoice is {formatting.STATUS_LABELS[found.status]}: only a draft can "
                             "be edited.", status_code=409)
    return await _save(request, session, found)


# -- the detail ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    at: datetime
    text: str
    kind: str


def _start_of(day_value: date) -> datetime:
    return datetime.combine(day_value, time.min, tzinfo=UTC)


def timeline(invoice: Invoice, payments: list[Payment], emails: list[Notification], locale: str) -> list[Event]:
    """What happened to the invoice, from what the services expose: its dates, payments and emails."""
    events = [Event(invoice.created_at, "Draft created", "created")]
    sent_email = next((e for e in reversed(emails) if e.kind == "invoice_sent"), None)
    if invoice.invoice_number:
        at = sent_email.created_at if sent_email else (_start_of(invoice.issue_date) if invoice.issue_date
                                                       else invoice.updated_at)
        events.append(Event(at, f"Sent as {invoice.invoice_number}", "sent"))
    for p in payments:
        what = "Payment received" if p.source == "stripe" else "Payment recorded"
        amount = formatting.money(p.amount, p.currency, locale)
        state = "" if p.status in ("succeeded", "refunded", "partially_refunded") else f" ({p.status})"
        events.append(Event(p.paid_at or p.created_at,
                            f"{what}: {amount} by {formatting.label(p.method, formatting.METHOD_LABELS)}{state}",
                            "payment"))
    for e in emails:
        subject = e.subject or e.kind.replace("_", " ")
        if e.sent_at:
            events.append(Event(e.sent_at, f"Email sent to {e.recipient or 'the client'}: {subject}", "email"))
        elif e.failed_at:
            events.append(Event(e.failed_at, f"Email failed: {subject}", "email"))
        if e.opened_at:
            events.append(Event(e.opened_at, f"Email opened: {subject}", "opened"))
    if invoice.paid_at:
        events.append(Event(invoice.paid_at, "Paid in full", "paid"))
    if invoice.status == InvoiceStatus.CANCELLED:
        events.append(Event(invoice.updated_at, "Cancelled", "cancelled"))
    elif invoice.status == InvoiceStatus.OVERDUE:
        events.append(Event(invoice.updated_at, "Marked overdue", "overdue"))
    return sorted(events, key=lambda e: e.at)


async def _history(a: Api, invoice_id: str) -> tuple[list[Payment] | None, list[Notification] | None]:
    async def payments() -> list[Payment] | None:
        try:
            return (await a.get(Page[Payment], "/api/payments", {"invoiceId": invoice_id, "limit": 100})).items
        except ApiError:
            return None

    async def emails() -> list[Notification] | None:
        try:
            return (await a.get(Page[Notification], f"/api/notifications/invoices/{invoice_id}",
                                {"limit": 100})).items
        except ApiError:
            return None

    p, e = await asyncio.gather(payments(), emails())
    return (sorted(p, key=lambda x: x.paid_at or x.created_at) if p is not None else None), e


async def _detail(
    request: Request, session: AdminSession, invoice: Invoice, *, notice: str | None, error: str | None = None,
    pay_errors: dict[str, str] | None = None, pay_values: dict[str, str] | None = None,
    confirm: str | None = None, status_code: int = 200, template: str = "invoice.html", poll: int = 0,
) -> Response:
    a = api(request, session)
    locale = formatting.request_locale(request)
    (payments, emails), clients = await asyncio.gather(_history(a, invoice.id), clients_by_id(a, [invoice.client_id]))
    # A payment is applied to the invoice by the invoice service (over Kafka) a moment after it is
    # recorded: until the invoice's amountPaid has caught up, the page refreshes its live part.
    settled = sum(p.amount - p.amount_refunded for p in payments or () if p.status in SETTLED and not p.held)
    # (At most MAX_POLLS refreshes: a ledger that never matches must not keep the page busy forever.)
    waiting = payments is not None and settled != invoice.amount_paid and poll < MAX_POLLS
    return render(request, template, {
        "invoice": invoice, "client": clients.get(invoice.client_id), "payments": payments, "emails": emails,
        "events": timeline(invoice, payments or [], emails or [], locale), "notice": notice, "error": error,
        "pay_errors": pay_errors or {}, "pay_values": pay_values or {"method": "bank_transfer",
                                                                     "date": date.today().isoformat()},
        "method_options": METHOD_OPTIONS, "confirm": confirm, "waiting": waiting, "poll": poll,
    }, status_code=status_code, session=session)


NOTICES = {"saved": "Draft saved.", "sent": "Invoice sent.", "paid": "Payment recorded.",
           "cancelled": "Invoice cancelled."}


@router.get("/invoices/{invoice_id}")
async def invoice_detail(
    request: Request, session: AdminSession, invoice_id: str,
    saved: Annotated[str | None, Query(max_length=5)] = None,
    sent: Annotated[str | None, Query(max_length=5)] = None,
    paid: Annotated[str | None, Query(max_length=5)] = None,
    cancelled: Annotated[str | None, Query(max_length=5)] = None,
    poll: Annotated[int, Query(ge=0, le=MAX_POLLS)] = 0,
) -> Response:
    """`poll`: how many times the page has refreshed its live part while a payment was being applied."""
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    notice = next((NOTICES[k] for k, v in (("saved", saved), ("sent", sent), ("paid", paid),
                                            ("cancelled", cancelled)) if v), None)
    if is_htmx(request) and request.headers.get("hx-target") == "invoice-live":
        return await _detail(request, session, found, notice=None, template="partials/invoice_live.html",
                             poll=poll)
    return await _detail(request, session, found, notice=notice)


@router.get("/invoices/{invoice_id}/send")
async def confirm_send(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    return await _detail(request, session, found, notice=None, confirm="send")


@router.post("/invoices/{invoice_id}/send", dependencies=[Csrf])
async def send_invoice(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    try:
        await api(request, session).post(Invoice, f"/api/invoices/{found.id}/send", {},
                                         headers=idempotency_headers(form))
    except ApiError as exc:
        return await _detail(request, session, found, notice=None, error=first_error(exc), status_code=422)
    return redirect(request, f"/admin/invoices/{found.id}?sent=1")


@router.get("/invoices/{invoice_id}/cancel")
async def confirm_cancel(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    return await _detail(request, session, found, notice=None, confirm="cancel")


@router.post("/invoices/{invoice_id}/cancel", dependencies=[Csrf])
async def cancel_invoice(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    try:
        await api(request, session).post(Invoice, f"/api/invoices/{found.id}/cancel", {},
                                         headers=idempotency_headers(form))
    except ApiError as exc:
        return await _detail(request, session, found, notice=None, error=first_error(exc), status_code=422)
    return redirect(request, f"/admin/invoices/{found.id}?cancelled=1")


@router.post("/invoices/{invoice_id}/payments", dependencies=[Csrf])
async def record_payment(request: Request, session: AdminSession, invoice_id: str) -> Response:
    found = await _invoice(request, session, invoice_id)
    if isinstance(found, Response):
        return found
    raw = await request.form()
    locale = formatting.request_locale(request)
    values = {k: text(raw, k) for k in ("amount", "method", "date", "reference")}
    errors: dict[str, str] = {}
    amount = 0
    try:
        amount = parse_major(values["amount"], found.currency, locale, allow_zero=False)
    except MoneyInputError as exc:
        errors["amount"] = str(exc)
    if values["method"] not in dict(METHOD_OPTIONS):
        errors["method"] = "Choose how it was paid."
    paid_at: datetime | None = None
    if values["date"]:
        try:
            paid_day = date.fromisoformat(values["date"])
        except ValueError:
            errors["date"] = "Enter a date (YYYY-MM-DD)."
        else:
            today = datetime.now(UTC).date()
            if paid_day > today:
                errors["date"] = "The date is in the future."
            elif paid_day < today:
                # Midday UTC: the day typed stays that day in every time zone the reports may use.
                paid_at = datetime.combine(paid_day, time(12), tzinfo=UTC)
            # today: no paidAt, the payments service records the moment it is recorded
    reference = values["reference"].strip()
    if len(reference) > 200:
        errors["reference"] = "Keep the reference under 200 characters."
    if not errors:
        body: dict[str, Any] = {"amount": amount, "method": values["method"]}
        if paid_at is not None:
            body["paidAt"] = paid_at.isoformat()
        if reference:
            body["reference"] = reference
        try:
            await api(request, session).post(Payment, f"/api/invoices/{found.id}/mark-paid", body)
        except ApiError as exc:
            errors.update(_payment_errors(exc, found, locale))
        else:
            return redirect(request, f"/admin/invoices/{found.id}?paid=1")
    return await _detail(request, session, found, notice=None, pay_errors=errors, pay_values=values,
                         status_code=422)


def _payment_errors(exc: ApiError, invoice: Invoice, locale: str) -> dict[str, str]:
    if exc.code == "overpayment" and isinstance(exc.details, dict):
        due = exc.details.get("amountDue")
        currency = str(exc.details.get("currency") or invoice.currency)
        pending = exc.details.get("pending") or 0
        if isinstance(due, int):
            message = f"That is more than the {formatting.money(due, currency, locale)} still due."
            if isinstance(pending, int) and pending > 0:
                message += f" ({formatting.money(pending, currency, locale)} is already recorded and being applied.)"
            return {"amount": message}
    if exc.code == "invoice_not_payable":
        return {"amount": first_error(exc)}
    fields = exc.field_errors()
    if fields:
        names = {"amount": "amount", "method": "method", "paidAt": "date", "reference": "reference"}
        return {names.get(k, "amount"): formatting.label(v, {}) for k, v in fields.items()}
    return {"amount": first_error(exc)}


@router.get("/invoices/{invoice_id}/pdf")
async def invoice_pdf(request: Request, session: AdminSession, invoice_id: str) -> Response:
    if _uuid_or_none(invoice_id) is None:
        return render(request, "error.html", {"title": "No such invoice", "message": "There is no invoice here."},
                      status_code=404, session=session)
    try:
        upstream = await api(request, session).request("GET", f"/api/invoices/{invoice_id}/pdf")
    except ApiError as exc:
        return render(request, "error.html", {"title": "PDF unavailable", "message": first_error(exc)},
                      status_code=exc.status, session=session)
    disposition = upstream.headers.get("content-disposition", f'attachment; filename="invoice-{invoice_id}.pdf"')
    return Response(upstream.content, media_type="application/pdf",
                    headers={"Content-Disposition": disposition, "Cache-Control": "private, no-store",
                             "X-Content-Type-Options": "nosniff"})
