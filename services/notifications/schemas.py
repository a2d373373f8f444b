"""Request and response bodies of the notifications API (camelCase JSON)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from kit.web import CalendarDate


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class InputModel(ApiModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


NotificationStatus = Literal["pending", "sending", "sent", "failed", "skipped"]


class NotificationOut(ApiModel):
    id: uuid.UUID
    kind: str
    status: str
    invoice_id: str | None
    client_id: str | None
    recipient: str | None
    recipient_name: str | None
    subject: str | None
    smtp_message_id: str
    reminder_sequence: int | None
    attempts: int
    pdf_attempts: int
    attachment_missing: bool
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    sent_at: datetime | None
    failed_at: datetime | None
    opened_at: datetime | None
    opened_via: str | None
    clicked_at: datetime | None


class AttemptOut(ApiModel):
    attempt: int
    outcome: str
    error: str | None
    smtp_code: int | None
    at: datetime


class NotificationDetail(NotificationOut):
    delivery_attempts: list[AttemptOut]


class ReminderRunRequest(InputModel):
    as_of: CalendarDate | None = None


class ReminderCreated(ApiModel):
    invoice_id: str
    kind: str
    sequence: int
    notification_id: uuid.UUID


class ReminderRunResult(ApiModel):
    as_of: date
    created: int
    reminders: list[ReminderCreated]


class ReminderOut(ApiModel):
    id: int
    invoice_id: str
    kind: str
    sequence: int
    due_date: date
    as_of: date
    created_at: datetime
    notification_id: uuid.UUID | None
    notification_status: str | None
    sent_at: datetime | None
