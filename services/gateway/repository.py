"""Data access for users, idempotency keys, login throttle counters and the audit log (one AsyncSession,
no commits here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Uuid, bindparam, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from kit.pagination import PageRequest, PageResult, SortKey, paginate
from services.gateway.models import (
    ROLE_ADMIN,
    STATE_COMPLETED,
    STATE_IN_PROGRESS,
    STATE_UNKNOWN,
    AuditEntry,
    IdempotencyKey,
    LoginCounter,
    User,
)


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: uuid.UUID) -> User | None:
        return await self.session.get(User, user_id)

    async def get_by_email(self, email: str) -> User | None:
        return await self.session.scalar(select(User).where(User.email == email.strip().lower()))

    async def insert(self, *, email: str, password_hash: str, role: str, client_id: str | None) -> User | None:
        """The new user, or None when the email is taken (no exception, no aborted transaction)."""
        stmt = (
            insert(User)
            .values(id=uuid.uuid4(), email=email.strip().lower(), password_hash=password_hash, role=role,
                    client_id=client_id)
            .on_conflict_do_nothing(index_elements=[User.email])
            .returning(User)
        )
        return (await self.session.scalars(stmt)).first()

    async def any_admin(self) -> bool:
        return (await self.session.scalar(select(User.id).where(User.role == ROLE_ADMIN).limit(1))) is not None

    async def list_page(self, page: PageRequest) -> PageResult[User]:
        """Oldest first; the email (unique) breaks ties so the order is total."""
        order = [SortKey(User.created_at), SortKey(User.email)]
        return await paginate(self.session, select(User), order=order, page=page, scope="users", with_total=True)

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        await self.session.execute(update(User).where(User.id == user_id).values(password_hash=password_hash))


@dataclass(frozen=True)
class ExistingKey:
    row: IdempotencyKey
    expired: bool
    stale: bool


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def try_insert(
        self, *, owner: str, key: str, fingerprint: str, method: str, path: str, lock_id: uuid.UUID
    ) -> bool:
        """Claim the key atomically; False when a row already exists."""
        stmt = (
            insert(IdempotencyKey)
            .values(
                owner=owner, key=key, fingerprint=fingerprint, method=method, path=path,
                state=STATE_IN_PROGRESS, lock_id=lock_id, created_at=func.now(), locked_at=func.now(),
            )
            .on_conflict_do_nothing(index_elements=[IdempotencyKey.owner, IdempotencyKey.key])
            .returning(IdempotencyKey.key)
        )
        return (await self.session.execute(stmt)).first() is not None

    async def get_for_update(
        self, owner: str, key: str, *, ttl: timedelta, lock_timeout: timedelta
    ) -> ExistingKey | None:
        stmt = (
            select(
                IdempotencyKey,
                (IdempotencyKey.created_at < func.now() - ttl).label("expired"),
                (IdempotencyKey.locked_at < func.now() - lock_timeout).label("stale"),
            )
            .where(IdempotencyKey.owner == owner, IdempotencyKey.key == key)
            .with_for_update()
        )
        found = (await self.session.execute(stmt)).first()
        if found is None:
            return None
        row, expired, stale = found
        return ExistingKey(row=row, expired=bool(expired), stale=bool(stale))

    async def restart(
        self, *, owner: str, key: str, fingerprint: str, method: str, path: str, lock_id: uuid.UUID,
        keep_created_at: bool,
    ) -> None:
        """Turn an expired or abandoned row into a fresh in-progress claim held by `lock_id`."""
        values: dict[str, Any] = {
            "fingerprint": fingerprint, "method": method, "path": path, "state": STATE_IN_PROGRESS,
            "lock_id": lock_id, "locked_at": func.now(), "response_status": None, "response_headers": None,
            "response_body": None, "completed_at": None,
        }
        if not keep_created_at:
            values["created_at"] = func.now()
        await self.session.execute(
            update(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key).values(**values)
        )

    async def complete(
        self, *, owner: str, key: str, lock_id: uuid.UUID, status: int, headers: dict[str, str], body: bytes
    ) -> bool:
        result = await self.session.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.owner == owner, IdempotencyKey.key == key, IdempotencyKey.lock_id == lock_id,
                IdempotencyKey.state == STATE_IN_PROGRESS,
            )
            .values(
                state=STATE_COMPLETED, response_status=status, response_headers=headers, response_body=body,
                completed_at=func.now(), lock_id=None,
            )
            .returning(IdempotencyKey.key)
        )
        return result.first() is not None

    async def mark_unknown(self, *, owner: str, key: str, lock_id: uuid.UUID) -> None:
        await self.session.execute(
            update(IdempotencyKey).where(
                IdempotencyKey.owner == owner, IdempotencyKey.key == key, IdempotencyKey.lock_id == lock_id,
                IdempotencyKey.state == STATE_IN_PROGRESS,
            ).values(state=STATE_UNKNOWN, lock_id=None)
        )

    async def release(self, *, owner: str, key: str, lock_id: uuid.UUID) -> None:
        await self.session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.owner == owner, IdempotencyKey.key == key, IdempotencyKey.lock_id == lock_id,
                IdempotencyKey.state == STATE_IN_PROGRESS,
            )
        )

    async def delete_expired(self, ttl: timedelta) -> int:
        result = await self.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - ttl))
        return int(getattr(result, "rowcount", 0) or 0)


class LoginCounterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, keys: list[tuple[str, str]]) -> tuple[datetime, dict[tuple[str, str], LoginCounter]]:
        """The database's time and the counter rows of `keys` (created at zero), locked until commit.

        Rows are created and locked in one order (scope, key), so two logins sharing keys never deadlock.
        """
        ordered = sorted(set(keys))
        await self.session.execute(
            insert(LoginCounter)
            .values([{"scope": scope, "key": key, "failures": 0, "lockouts": 0} for scope, key in ordered])
            .on_conflict_do_nothing(index_elements=[LoginCounter.scope, LoginCounter.key])
        )
        now = (await self.session.execute(select(func.now()))).scalar_one()
        rows = (await self.session.scalars(
            select(LoginCounter)
            .where(tuple_(LoginCounter.scope, LoginCounter.key).in_(ordered))
            .order_by(LoginCounter.scope, LoginCounter.key)
            .with_for_update()
            .execution_options(populate_existing=True)
        )).all()
        return now, {(row.scope, row.key): row for row in rows}

    async def delete_idle(self, idle: timedelta) -> int:
        """Forget counters nobody has touched for `idle` (no lock-out of theirs is still running)."""
        result = await self.session.execute(
            delete(LoginCounter).where(
                LoginCounter.updated_at < func.now() - idle,
                (LoginCounter.locked_until.is_(None)) | (LoginCounter.locked_until < func.now()),
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class AuditFilter:
    """`actor` is a user id or an email; `target` any id the action was about."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None

    def scope(self) -> str:
        """Names the filters, so a cursor of one filtered list is refused by another."""
        bounds = [b.isoformat() if b else "" for b in (self.occurred_from, self.occurred_to)]
        return "audit:" + "\x1f".join([self.actor or "", self.action or "", self.target or "", *bounds])


class AuditRepository:
    """Appends and reads; the table refuses anything else (its trigger)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def append(self, *, actor_user_id: str, actor_role: str, action: str, outcome: str, method: str,
                     path: str, upstream: str, status: int | None, targets: dict[str, str],
                     summary: dict[str, Any] | None, correlation_id: str | None,
                     idempotency_key: str | None) -> None:
        try:
            actor_uuid: uuid.UUID | None = uuid.UUID(actor_user_id)
        except ValueError:
            actor_uuid = None
        # One prepared statement with bound values: building `.values(...)` per call cost as much CPU
        # as the insert itself (bench.profile of the gateway under the invoice bench).
        await self.session.execute(_APPEND_AUDIT, {
            "actor_uuid": actor_uuid, "actor_user_id": actor_user_id, "actor_role": actor_role,
            "action": action, "outcome": outcome, "method": method, "path": path, "upstream": upstream,
            "status": status, "targets": targets, "target_ids": sorted(set(targets.values())),
            "summary": summary, "correlation_id": correlation_id, "idempotency_key": idempotency_key,
        })

    async def list_page(self, filters: AuditFilter, page: PageRequest) -> PageResult[AuditEntry]:
        """Newest first (the id breaks ties of one instant)."""
        stmt = select(AuditEntry)
        if filters.actor:
            try:
                stmt = stmt.where(AuditEntry.actor_user_id == str(uuid.UUID(filters.actor)))
            except ValueError:
                stmt = stmt.where(AuditEntry.actor_email == filters.actor.strip().lower())
        if filters.action:
            stmt = stmt.where(AuditEntry.action == filters.action)
        if filters.target:
            stmt = stmt.where(AuditEntry.target_ids.contains([filters.target]))
        if filters.occurred_from:
            stmt = stmt.where(AuditEntry.occurred_at >= filters.occurred_from)
        if filters.occurred_to:
            stmt = stmt.where(AuditEntry.occurred_at < filters.occurred_to)
        order = [SortKey(AuditEntry.occurred_at, descending=True), SortKey(AuditEntry.id, descending=True)]
        return await paginate(self.session, stmt, order=order, page=page, scope=filters.scope())


# The email as the users table has it now, copied in the same statement.
_APPEND_AUDIT = insert(AuditEntry).values(
    actor_email=select(User.email).where(User.id == bindparam("actor_uuid", type_=Uuid)).scalar_subquery())
