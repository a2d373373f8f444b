"""HTTP API of the notifications service.

Through the gateway (admin only): the message log `GET /api/notifications` (filterable) and per
invoice, retrying a failed message, and the reminder scan on demand `POST /api/reminders/run`.
Public, unauthenticated (the gateway forwards /t/...): the tracking pixel `/t/o/{token}.gif` and the
tracked portal link `/t/l/{token}`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

import structlog
from fastapi import APIRouter, BackgroundTasks, FastAPI, Query, Request
from fastapi.responses import RedirectResponse, Response

from kit.actor import AdminActor
from kit.db import Database
from kit.metrics import QueryGauge
from kit.pagination import Page, PageParams, PageResult
from kit.service import PeriodicJob, ServiceRuntime, create_service_app, make_broker
from kit.web import RequestUnitOfWork, UtcDateTime
from services.notifications import invitations
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.consumers import register_consumers
from services.notifications.delivery import DeliveryWorker
from services.notifications.invoices import InvoiceServiceClient
from services.notifications.mailer import SmtpMailer
from services.notifications.models import InboxEvent, Notification, OutboxMessage
from services.notifications.pdf import PdfFetcher
from services.notifications.schemas import (
    AttemptOut,
    NotificationDetail,
    NotificationOut,
    NotificationStatus,
    ReminderCreated,
    ReminderOut,
    ReminderRunRequest,
    ReminderRunResult,
)
from services.notifications.service import PIXEL_GIF, NotificationService

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

_NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}


class Notifications:
    """Everything one replica needs, reachable from request handlers as app.state.notifications."""

    def __init__(self, settings: NotificationsSettings) -> None:
        self.settings = settings
        self.db = Database(
            settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent, pool_size=settings.db_pool_size
        )
        self.invoices = InvoiceServiceClient(settings.invoice_url, settings.internal_token,
                                             timeout=settings.invoice_timeout)
        self.service = NotificationService(settings, invoices=self.invoices, on_new_messages=self.wake)
        self.worker = DeliveryWorker(
            self.db,
            self.service,
            SmtpMailer(settings),
            PdfFetcher(settings.invoice_url, settings.internal_token, timeout=settings.pdf_timeout),
            clients=self.invoices,
        )

    def wake(self) -> None:
        self.worker.wake()

    async def scheduled_scan(self) -> int:
        return len((await self.service.scan_reminders(self.db)).created)

    async def close(self) -> None:
        await self.worker.stop()
        await self.invoices.close()


def state(request: Request) -> Notifications:
    return request.app.state.notifications  # type: ignore[no-any-return]


notifications_router = APIRouter(prefix="/api/notifications", tags=["notifications"])
reminders_router = APIRouter(prefix="/api/reminders", tags=["reminders"])
tracking_router = APIRouter(prefix="/t", tags=["tracking"])


def _page(result: PageResult[Notification]) -> Page[NotificationOut]:
    return Page[NotificationOut](
        items=[NotificationOut.model_validate(n) for n in result.items], next_cursor=result.next_cursor,
        has_more=result.has_more, total=result.total,
    )


@notifications_router.get("", response_model=Page[NotificationOut])
async def list_notifications(
    uow: RequestUnitOfWork,
    _: AdminActor,
    page: PageParams,
    invoice_id: Annotated[str | None, Query(alias="invoiceId", max_length=64)] = None,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    status: NotificationStatus | None = None,
    recipient: Annotated[str | None, Query(max_length=320)] = None,
    opened: bool | None = None,
    created_from: Annotated[UtcDateTime | None, Query(alias="createdFrom")] = None,
    created_to: Annotated[UtcDateTime | None, Query(alias="createdTo")] = None,
) -> Page[NotificationOut]:
    """The message log, newest first: to, subject, kind, invoice, sent/failed/opened times."""
    f = repo.NotificationFilter(
        invoice_id=invoice_id, client_id=client_id, kind=kind, status=status, recipient=recipient,
        opened=opened, created_from=created_from, created_to=created_to,
    )
    return _page(await repo.list_notifications(uow.session, f, page))


@notifications_router.get("/invoices/{invoice_id}", response_model=Page[NotificationOut])
async def invoice_notifications(
    invoice_id: str, uow: RequestUnitOfWork, _: AdminActor, page: PageParams
) -> Page[NotificationOut]:
    """Every message about one invoice, newest first."""
    return _page(await repo.list_notifications(uow.session, repo.NotificationFilter(invoice_id=invoice_id), page))


@notifications_router.get("/{notification_id}", response_model=NotificationDetail)
async def get_notification(notification_id: uuid.UUID, request: Request, uow: RequestUnitOfWork,
                           _: AdminActor) -> NotificationDetail:
    n, attempts = await state(request).service.notification_detail(uow, notification_id)
    out = NotificationOut.model_validate(n).model_dump()
    return NotificationDetail(**out, delivery_attempts=[AttemptOut.model_validate(a) for a in attempts])


@notifications_router.post("/{notification_id}/retry", response_model=NotificationOut)
async def retry_notification(
    notification_id: uuid.UUID, request: Request, uow: RequestUnitOfWork, _: AdminActor, after: BackgroundTasks
) -> NotificationOut:
    """Queue a failed message again (same Message-ID, attempts counted afresh)."""
    st = state(request)
    n = await st.service.retry(uow, notification_id)
    after.add_task(st.wake)  # runs once the request's unit of work has committed: the worker will see it
    return NotificationOut.model_validate(n)


@reminders_router.post("/run", response_model=ReminderRunResult, responses={503: {"description": (
    "The invoice service could not mark overdue invoices: nothing was queued, try again later.")}})
async def run_reminders(
    request: Request, _: AdminActor, body: ReminderRunRequest | None = None
) -> ReminderRunResult:
    """Run the reminder scan as of `asOf` (default today). Idempotent: a reminder is created once.

    The invoice service first marks what is past due as of that day; an overdue notice goes only to an
    invoice it says is OVERDUE. When it cannot be reached the run is a 503 and queues nothing.
    """
    st = state(request)
    # A job, not one unit of work: the scan commits batch by batch (db.transaction() inside).
    result = await st.service.scan_reminders(st.db, body.as_of if body else None)
    return ReminderRunResult(
        as_of=result.as_of,
        created=len(result.created),
        reminders=[ReminderCreated.model_validate(r) for r in result.created],
    )


@reminders_router.get("", response_model=Page[ReminderOut])
async def list_reminders(
    uow: RequestUnitOfWork,
    _: AdminActor,
    page: PageParams,
    invoice_id: Annotated[str | None, Query(alias="invoiceId", max_length=64)] = None,
) -> Page[ReminderOut]:
    """Claimed reminders, newest first, each with the message it queued."""
    result = await repo.list_reminders(uow.session, invoice_id=invoice_id, page=page)
    items = [
        ReminderOut(
            id=r.reminder.id, invoice_id=r.reminder.invoice_id, kind=r.reminder.kind, sequence=r.reminder.sequence,
            due_date=r.reminder.due_date, as_of=r.reminder.as_of, created_at=r.reminder.created_at,
            notification_id=r.notification_id, notification_status=r.notification_status, sent_at=r.sent_at,
        )
        for r in result.items
    ]
    return Page[ReminderOut](items=items, next_cursor=result.next_cursor, has_more=result.has_more,
                             total=result.total)


@tracking_router.get("/o/{token}.gif", include_in_schema=False)
async def open_pixel(token: str, request: Request) -> Response:
    """The tracking pixel: always a GIF; the first open of a known token is recorded and published."""
    st = state(request)
    try:
        # Its own unit of work rather than the request's: a failure to record (or to commit) the open
        # must still answer the image, never an error, to the reader's mail client.
        async with st.db.transaction() as uow:
            await st.service.record_open(uow, token, "pixel")
    except Exception:  # noqa: BLE001 - never break the image for the reader
        log.exception("pixel_open_error")
    return Response(content=PIXEL_GIF, media_type="image/gif", headers=_NO_CACHE)


@tracking_router.get("/l/{token}", include_in_schema=False)
async def tracked_link(token: str, request: Request, uow: RequestUnitOfWork) -> RedirectResponse:
    """The tracked "View and pay" link: counts as an open, then on to the invoice in the portal."""
    target = await state(request).service.follow_link(uow, token)
    return RedirectResponse(target, status_code=302, headers=_NO_CACHE)


def build(settings: NotificationsSettings | None = None) -> tuple[ServiceRuntime, Notifications]:
    settings = settings or NotificationsSettings()
    parts = Notifications(settings)
    broker = make_broker(settings)
    register_consumers(broker, parts.db, parts.service, after_commit=parts.wake)
    jobs = []
    if settings.scan_interval > 0:
        jobs.append(PeriodicJob("reminder-scan", settings.scan_interval, parts.scheduled_scan))
    runtime = ServiceRuntime(settings=settings, db=parts.db, broker=broker, migrations=MIGRATIONS, jobs=jobs,
                             workers=[parts.worker])
    runtime.on_startup.append(parts.worker.start)
    runtime.on_shutdown.append(parts.close)
    # /metrics: the email queue (sent messages are history, not queue: not counted here)
    runtime.metrics.append(QueryGauge(
        parts.db, "billing_notifications_emails",
        "Emails by status: pending (queued), sending (leased by a replica), failed (given up, retry by hand).",
        "SELECT status, count(*) FROM notifications WHERE status IN ('pending', 'sending', 'failed') GROUP BY status",
        labels=["status"], fill=[("pending",), ("sending",), ("failed",)]))
    return runtime, parts


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    runtime, parts = build(settings)
    app = create_service_app(
        runtime,
        title="Notifications service",
        description="Emails for invoices and payments, payment reminders, open tracking, the message log.",
        # Invitations before the log's /{notification_id} routes.
        routers=[invitations.router, notifications_router, reminders_router, tracking_router],
    )
    app.state.notifications = parts
    return app
