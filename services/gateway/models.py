"""Gateway tables: users (logins), idempotency keys, the login throttle's counters, the audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    String,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLE_ADMIN = "admin"
ROLE_CLIENT = "client"

STATE_IN_PROGRESS = "in_progress"
STATE_COMPLETED = "completed"
# The upstream answered 5xx or not at all: it may or may not have done the work. The key is kept;
# a retry goes to the service again with the same key, and the service (which records the key in
# the same transaction as the effect) replays its answer or runs it for the first time.
STATE_UNKNOWN = "unknown"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('admin', 'client')", name="ck_users_role"),
        CheckConstraint("(role = 'client') = (client_id IS NOT NULL)", name="ck_users_client_binding"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # stored lower-cased
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class IdempotencyKey(Base):
    """One row per (owner, key). `lock_id` identifies the request currently holding an in-progress row."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        CheckConstraint("state IN ('in_progress', 'completed', 'unknown')", name="ck_idempotency_keys_state"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)  # user id or "anon"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256(method, path, sha256(body))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16))
    lock_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_headers: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


THROTTLE_ACCOUNT = "account"
THROTTLE_ADDRESS = "address"


class LoginCounter(Base):
    """Failed logins of one account (lower-cased email, known or not) or one client address.

    In the database, not in memory, so every gateway replica counts the same failures.
    """

    __tablename__ = "login_throttle"
    __table_args__ = (
        CheckConstraint("scope IN ('account', 'address')", name="ck_login_throttle_scope"),
        Index("ix_login_throttle_updated_at", "updated_at"),
    )

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(320), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # in the window that began at window_started_at
    window_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lockouts: Mapped[int] = mapped_column(Integer, default=0)  # each one twice as long as the last
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


OUTCOME_SUCCEEDED = "succeeded"  # the service answered 2xx
OUTCOME_REFUSED = "refused"  # the service answered 4xx (kept for actions on money)
OUTCOME_UNKNOWN = "unknown"  # a 5xx, a timeout or a broken answer: it may or may not have happened
OUTCOMES = (OUTCOME_SUCCEEDED, OUTCOME_REFUSED, OUTCOME_UNKNOWN)


class AuditEntry(Base):
    """One admin action that changed (or tried to change) money or documents. Append-only: a trigger
    (migration 0004) refuses every UPDATE, DELETE and TRUNCATE of the table."""

    __tablename__ = "audit_log"
    __table_args__ = (
        CheckConstraint("outcome IN ('succeeded', 'refused', 'unknown')", name="ck_audit_log_outcome"),
        Index("ix_audit_log_occurred_at", "occurred_at", "id"),
        Index("ix_audit_log_actor", "actor_user_id", "occurred_at"),
        Index("ix_audit_log_action", "action", "occurred_at"),
        Index("ix_audit_log_target_ids", "target_ids", postgresql_using="gin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor_user_id: Mapped[str] = mapped_column(String(64))
    # A copy, not a reference: the entry keeps saying who it was after the login changes or goes.
    actor_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    actor_role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(2048))
    upstream: Mapped[str] = mapped_column(String(32))  # the service that did it ("gateway" for its own)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no answer at all
    targets: Mapped[dict[str, str]] = mapped_column(JSONB)  # path parameter (or created id) -> value
    target_ids: Mapped[list[str]] = mapped_column(ARRAY(String(200)))  # the values, for the target filter
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    correlation_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
