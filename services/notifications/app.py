"""HTTP API of the notifications service.

Through the gateway (admin only): the message log `GET /api/notifications` (filterable) and per
invoice, retrying a failed message, and the reminder scan on demand `POST /api/reminders/run`.
Public, unauthenticated (the gateway forwards /t/...): the tracking pixel `/t/o/{token}.gif` and the
tracked portal link `/t/l/{token}`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import RedirectResponse, Response

from kit.actor import AdminActor
from kit.db import Database
from kit.errors import Conflict, NotFound
from kit.service import PeriodicJob, ServiceRuntime, create_service_app, make_broker
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.consumers import register_consumers
from services.notifications.delivery import DeliveryWorker
from services.notifications.mailer import SmtpMailer
from services.notifications.models import InboxEvent, OutboxMessage
from services.notifications.pdf import PdfFetcher
from services.notifications.schemas import (
    AttemptOut,
    NotificationDetail,
    NotificationOut,
    NotificationPage,
    NotificationStatus,
    ReminderCreated,
    ReminderOut,
    ReminderRunRequest,
    ReminderRunResult,
)
from services.notifications.service import PIXEL_GIF, NotificationService

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
        self.service = NotificationService(settings, on_new_messages=self.wake)
        self.worker = DeliveryWorker(
            self.db,
            self.service,
            SmtpMailer(settings),
            PdfFetcher(settings.invoice_url, settings.internal_token, timeout=settings.pdf_timeout),
        )

    def wake(self) -> None:
        self.worker.wake()

    async def scheduled_scan(self) -> int:
        return len((await self.service.scan_reminders(self.db)).created)


def state(request: Request) -> Notifications:
    return request.app.state.notifications  # type: ignore[no-any-return]


notifications_router = APIRouter(prefix="/api/notifications", tags=["notifications"])
reminders_router = APIRouter(prefix="/api/reminders", tags=["reminders"])
tracking_router = APIRouter(prefix="/t", tags=["tracking"])


@notifications_router.get("", response_model=NotificationPage)
async def list_notifications(
    request: Request,
    _: AdminActor,
    invoice_id: Annotated[str | None, Query(alias="invoiceId", max_length=64)] = None,
    client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    status: NotificationStatus | None = None,
    recipient: Annotated[str | None, Query(max_length=320)] = None,
    opened: bool | None = None,
    created_from: Annotated[datetime | None, Query(alias="createdFrom")] = None,
    created_to: Annotated[datetime | None, Query(alias="createdTo")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> NotificationPage:
    """The message log, newest first: to, subject, kind, invoice, sent/failed/opened times."""
    f = repo.NotificationFilter(
        invoice_id=invoice_id, client_id=client_id, kind=kind, status=status, recipient=recipient,
        opened=opened, created_from=created_from, created_to=created_to,
    )
    async with state(request).db.unit_of_work() as uow:
        items, total = await repo.list_notifications(uow.session, f, limit=limit, offset=offset)
        return NotificationPage(
            items=[NotificationOut.model_validate(n) for n in items], total=total, limit=limit, offset=offset
        )


@notifications_router.get("/invoices/{invoice_id}", response_model=list[NotificationOut])
async def invoice_notifications(invoice_id: str, request: Request, _: AdminActor) -> list[NotificationOut]:
    """Every message about one invoice, newest first."""
    async with state(request).db.unit_of_work() as uow:
        items, _total = await repo.list_notifications(
            uow.session, repo.NotificationFilter(invoice_id=invoice_id), limit=500, offset=0
        )
        return [NotificationOut.model_validate(n) for n in items]


@notifications_router.get("/{notification_id}", response_model=NotificationDetail)
async def get_notification(notification_id: uuid.UUID, request: Request, _: AdminActor) -> NotificationDetail:
    async with state(request).db.unit_of_work() as uow:
        n = await repo.get_notification(uow.session, notification_id)
        if n is None:
            raise NotFound("No such notification.")
        attempts = await repo.list_attempts(uow.session, notification_id)
        out = NotificationOut.model_validate(n).model_dump()
        return NotificationDetail(**out, delivery_attempts=[AttemptOut.model_validate(a) for a in attempts])


@notifications_router.post("/{notification_id}/retry", response_model=NotificationOut)
async def retry_notification(notification_id: uuid.UUID, request: Request, _: AdminActor) -> NotificationOut:
    """Queue a failed message again (same Message-ID, attempts counted afresh)."""
    st = state(request)
    async with st.db.unit_of_work() as uow:
        n = await repo.requeue_failed(uow.session, notification_id)
        if n is None:
            if await repo.get_notification(uow.session, notification_id) is None:
                raise NotFound("No such notification.")
            raise Conflict("Only a failed notification can be retried.")
        await uow.commit()
    st.wake()
    return NotificationOut.model_validate(n)


@reminders_router.post("/run", response_model=ReminderRunResult)
async def run_reminders(
    request: Request, _: AdminActor, body: ReminderRunRequest | None = None
) -> ReminderRunResult:
    """Run the reminder scan as of `asOf` (default today). Idempotent: a reminder is created once."""
    st = state(request)
    result = await st.service.scan_reminders(st.db, body.as_of if body else None)
    return ReminderRunResult(
        as_of=result.as_of,
        created=len(result.created),
        reminders=[ReminderCreated.model_validate(r) for r in result.created],
    )


@reminders_router.get("", response_model=list[ReminderOut])
async def list_reminders(
    request: Request,
    _: AdminActor,
    invoice_id: Annotated[str | None, Query(alias="invoiceId", max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[ReminderOut]:
    async with state(request).db.unit_of_work() as uow:
        rows = await repo.list_reminders(uow.session, invoice_id=invoice_id, limit=limit, offset=offset)
        return [
            ReminderOut(
                id=r.id, invoice_id=r.invoice_id, kind=r.kind, sequence=r.sequence, due_date=r.due_date,
                as_of=r.as_of, created_at=r.created_at, notification_id=nid, notification_status=nstatus,
                sent_at=sent_at,
            )
            for r, nid, nstatus, sent_at in rows
        ]


@tracking_router.get("/o/{token}.gif", include_in_schema=False)
async def open_pixel(token: str, request: Request) -> Response:
    """The tracking pixel: always a GIF; the first open of a known token is recorded and published."""
    st = state(request)
    try:
        await st.service.record_open(st.db, token, "pixel")
    except Exception:  # noqa: BLE001 - never break the image for the reader
        import structlog

        structlog.get_logger(__name__).exception("pixel_open_error")
    return Response(content=PIXEL_GIF, media_type="image/gif", headers=_NO_CACHE)


@tracking_router.get("/l/{token}", include_in_schema=False)
async def tracked_link(token: str, request: Request) -> RedirectResponse:
    """The tracked "View and pay" link: counts as an open, then on to the invoice in the portal."""
    st = state(request)
    target = await st.service.follow_link(st.db, token)
    return RedirectResponse(target, status_code=302, headers=_NO_CACHE)


def build(settings: NotificationsSettings | None = None) -> tuple[ServiceRuntime, Notifications]:
    settings = settings or NotificationsSettings()
    parts = Notifications(settings)
    broker = make_broker(settings)
    register_consumers(broker, parts.db, parts.service, after_commit=parts.wake)
    jobs = []
    if settings.scan_interval > 0:
        jobs.append(PeriodicJob("reminder-scan", settings.scan_interval, parts.scheduled_scan))
    runtime = ServiceRuntime(settings=settings, db=parts.db, broker=broker, migrations=MIGRATIONS, jobs=jobs)
    runtime.on_startup.append(parts.worker.start)
    runtime.on_shutdown.append(parts.worker.stop)
    return runtime, parts


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    runtime, parts = build(settings)
    app = create_service_app(
        runtime,
        title="Notifications service",
        description="Emails for invoices and payments, payment reminders, open tracking, the message log.",
        routers=[notifications_router, reminders_router, tracking_router],
    )
    app.state.notifications = parts
    return app
