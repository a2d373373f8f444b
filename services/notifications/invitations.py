"""Portal invitations: the admin's "Invite to portal" mailed through the one delivery queue.

The gateway owns logins and makes the one-time "set your password" link; this service mails it like
every other message: a row in `notifications` (kind `portal_invitation`) that the delivery worker
sends with its retries and backoff, logged in the message log with its attempts, retried by hand
from there once failed. One email per link: the dedupe key is a hash of the client, the address and
the link, so a repeated request (a second click: the gateway hands out the same link all day) answers
the first message (200) instead of queueing another (201).

`POST /api/notifications/invitations` (admin, through the gateway's route table) takes
`{clientId, email, name?, link, portalUrl?}`; a control character in any of them (C0, DEL, C1,
U+2028/2029: it would end up in a header or break the link) is a 422 naming the field.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, BackgroundTasks, Request, Response
from pydantic import BaseModel, EmailStr, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from contracts.notification import NotificationKind
from kit.actor import AdminActor
from kit.web import RequestUnitOfWork, one_line
from services.notifications import repository as repo
from services.notifications.schemas import InputModel, NotificationOut

if TYPE_CHECKING:
    from services.notifications.app import Notifications

log = structlog.get_logger(__name__)

INVITATION_KIND = NotificationKind.PORTAL_INVITATION
ACTION_LABEL = "Set your password"


def _web_address(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise PydanticCustomError("url", "must be an absolute http(s) address without spaces")
    return value


class InvitationRequest(InputModel):
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    email: EmailStr
    name: Annotated[str, StringConstraints(max_length=300)] | None = None
    link: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    portal_url: Annotated[str, StringConstraints(max_length=2000)] | None = None

    # mode="before": a control character is named as such, before EmailStr calls it a bad address.
    _lines = field_validator("client_id", "email", "name", "link", "portal_url", mode="before")(
        lambda v: one_line(v) if isinstance(v, str) else v)
    _links = field_validator("link", "portal_url")(lambda v: _web_address(v) if isinstance(v, str) else v)


class InvitationContext(BaseModel):
    """What the invitation email says, kept in the message's `context` (rendered again at delivery)."""

    link: str
    portal_url: str | None = None


def dedupe_key(body: InvitationRequest) -> str:
    digest = hashlib.sha256(f"{body.client_id}\n{body.email.lower()}\n{body.link}".encode()).hexdigest()
    return f"{INVITATION_KIND}:{digest}"


router = APIRouter(prefix="/api/notifications/invitations", tags=["notifications"])


@router.post("", response_model=NotificationOut, status_code=201,
             responses={200: {"model": NotificationOut, "description": "This invitation was queued before: "
                                                                      "its message, nothing new queued."}})
async def invite(body: InvitationRequest, request: Request, response: Response, uow: RequestUnitOfWork,
                 _: AdminActor, after: BackgroundTasks) -> NotificationOut:
    """Email a client its portal invitation (201, queued), once per link (200: the earlier message)."""
    parts: Notifications = request.app.state.notifications
    key = dedupe_key(body)
    values = parts.service.message_values(
        kind=INVITATION_KIND,
        dedupe_key=key,
        invoice_id=None,
        client_id=body.client_id,
        recipient=str(body.email),
        recipient_name=body.name or None,
        context={"invitation": InvitationContext(link=body.link, portal_url=body.portal_url).model_dump()},
        invoice_snapshot=None,
    )
    created = await repo.insert_notification(uow.session, values)
    message = await repo.get_notification_by_dedupe_key(uow.session, key)
    assert message is not None  # inserted now, or by the first request (rows are never deleted)
    if created is None:
        response.status_code = 200
        log.info("invitation_already_queued", notification_id=str(message.id), client_id=body.client_id)
    else:
        log.info("invitation_queued", notification_id=str(message.id), client_id=body.client_id)
        after.add_task(parts.wake)  # runs once the request's unit of work has committed
    return NotificationOut.model_validate(message)
