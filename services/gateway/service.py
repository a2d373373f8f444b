"""Gateway logic without HTTP: logins, users, idempotency keys."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog

from kit.db import Database, UnitOfWork
from kit.errors import AppError, Conflict, InvalidInput, Unauthorized
from kit.pagination import Page, PageRequest
from services.gateway.models import ROLE_ADMIN, STATE_IN_PROGRESS, STATE_UNKNOWN, User
from services.gateway.repository import IdempotencyRepository, UserRepository
from services.gateway.schemas import CreateUserRequest, LoginResponse, UserOut
from services.gateway.security import Passwords, TokenClaims, TokenCodec

log = structlog.get_logger(__name__)


class ClientDirectory(Protocol):
    """Answers whether a client exists (the invoice service owns clients)."""

    async def client_exists(self, client_id: str) -> bool: ...


def user_out(user: User) -> UserOut:
    return UserOut(id=user.id, email=user.email, role=user.role, client_id=user.client_id,
                   created_at=user.created_at)


class AuthService:
    """Logins and users, inside the caller's unit of work (the request's: it commits, not us)."""

    def __init__(self, uow: UnitOfWork, passwords: Passwords, tokens: TokenCodec, clients: ClientDirectory) -> None:
        self._users = UserRepository(uow.session)
        self._passwords = passwords
        self._tokens = tokens
        self._clients = clients

    async def login(self, email: str, password: str) -> LoginResponse:
        user = await self._users.get_by_email(email)
        found = (user_out(user), user.password_hash) if user is not None else None
        ok = await self._passwords.verify(found[1] if found else None, password)
        if found is None or not ok:
            raise Unauthorized("Invalid email or password.", code="invalid_credentials")
        out, password_hash = found
        if self._passwords.needs_rehash(password_hash):
            await self._users.set_password_hash(out.id, await self._passwords.hash(password))
        token = self._tokens.issue(user_id=str(out.id), role=out.role, client_id=out.client_id)
        log.info("login_succeeded", user_id=str(out.id), role=out.role)
        return LoginResponse(access_token=token, expires_in=self._tokens.ttl_seconds, user=out)

    async def current_user(self, claims: TokenClaims) -> UserOut:
        try:
            user_id = uuid.UUID(claims.user_id)
        except ValueError as exc:
            raise Unauthorized("The access token is invalid.", code="invalid_token") from exc
        user = await self._users.get(user_id)
        if user is None:
            raise Unauthorized("This login no longer exists.", code="invalid_token")
        return user_out(user)

    async def create_user(self, request: CreateUserRequest) -> UserOut:
        if await self._users.get_by_email(request.email) is not None:
            raise Conflict("A login with this email already exists.", code="email_taken")
        if request.role == "client":
            assert request.client_id is not None
            if not await self._clients.client_exists(request.client_id):
                raise InvalidInput(
                    f"Client {request.client_id} does not exist.",
                    code="client_not_found",
                    details=[{"field": "clientId", "message": "unknown client", "type": "client_not_found"}],
                )
        password_hash = await self._passwords.hash(request.password)
        user = await self._users.insert(
            email=request.email, password_hash=password_hash, role=request.role, client_id=request.client_id
        )
        if user is None:
            raise Conflict("A login with this email already exists.", code="email_taken")
        log.info("user_created", user_id=str(user.id), role=user.role, client_id=user.client_id)
        return user_out(user)

    async def list_users(self, page: PageRequest) -> Page[UserOut]:
        result = await self._users.list_page(page)
        return Page[UserOut](items=[user_out(u) for u in result.items], next_cursor=result.next_cursor,
                             has_more=result.has_more, total=result.total)


async def ensure_admin(db: Database, passwords: Passwords, email: str, password: str) -> bool:
    """Create the first admin when there is none. Safe with several replicas starting at once.

    A startup job, not a request: its own units of work, and the slow hash between them, not inside one.
    """
    async with db.transaction() as uow:
        if await UserRepository(uow.session).any_admin():
            return False
    password_hash = await passwords.hash(password)
    async with db.transaction() as uow:
        created = await UserRepository(uow.session).insert(
            email=email, password_hash=password_hash, role=ROLE_ADMIN, client_id=None
        )
    if created is None:
        log.warning("bootstrap_admin_email_taken", email=email)
        return False
    log.info("bootstrap_admin_created", email=created.email)
    return True


# --- idempotency ---------------------------------------------------------------------------------

MAX_KEY_LENGTH = 255


class IdempotencyKeyReused(AppError):
    status_code = 422
    code = "idempotency_key_reused"


class IdempotencyInProgress(AppError):
    status_code = 409
    code = "idempotency_in_progress"


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class KeyClaim:
    """This request holds the key; it must end with `complete` or `release`."""

    owner: str
    key: str
    lock_id: uuid.UUID


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    body_hash = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{method.upper()}\n{path}\n{body_hash}".encode()).hexdigest()


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise AppError(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
            code="invalid_idempotency_key",
        )
    return key


class IdempotencyService:
    def __init__(
        self,
        db: Database,
        *,
        ttl_seconds: float,
        lock_timeout_seconds: float,
        cleanup_interval_seconds: float,
    ) -> None:
        self._db = db
        self._ttl = timedelta(seconds=ttl_seconds)
        self._lock_timeout = timedelta(seconds=lock_timeout_seconds)
        self._cleanup_interval = cleanup_interval_seconds
        self._last_cleanup = float("-inf")
        self._cleanup_task: asyncio.Task[None] | None = None

    async def begin(self, *, owner: str, key: str, method: str, path: str, body: bytes) -> KeyClaim | StoredResponse:
        """Claim `key` for this request, or return the response stored for its first run.

        Raises `IdempotencyKeyReused` (the key was used for another request) or
        `IdempotencyInProgress` (the first request with this key has not finished).
        """
        validate_key(key)
        self._maybe_cleanup()
        fingerprint = request_fingerprint(method, path, body)
        lock_id = uuid.uuid4()
        async with self._db.transaction() as uow:
            repo = IdempotencyRepository(uow.session)
            for _ in range(3):
                if await repo.try_insert(
                    owner=owner, key=key, fingerprint=fingerprint, method=method, path=path[:2048], lock_id=lock_id
                ):
                    return KeyClaim(owner, key, lock_id)
                existing = await repo.get_for_update(owner, key, ttl=self._ttl, lock_timeout=self._lock_timeout)
                if existing is None:
                    continue  # released between our insert and select: try again
                row = existing.row
                if existing.expired:
                    await repo.restart(owner=owner, key=key, fingerprint=fingerprint, method=method,
                                       path=path[:2048], lock_id=lock_id, keep_created_at=False)
                    return KeyClaim(owner, key, lock_id)
                if row.fingerprint != fingerprint:
                    raise IdempotencyKeyReused(
                        "This Idempotency-Key was already used for a different request.",
                        details={"method": row.method, "path": row.path},
                    )
                if row.state == STATE_UNKNOWN:
                    # The first try's outcome is unknown (5xx, timeout): send it again with the same key.
                    # The service replays its recorded answer if it did commit, or runs it now.
                    log.info("idempotency_retry_after_unknown_outcome", key=key, owner=owner)
                    await repo.restart(owner=owner, key=key, fingerprint=fingerprint, method=method,
                                       path=path[:2048], lock_id=lock_id, keep_created_at=True)
                    return KeyClaim(owner, key, lock_id)
                if row.state == STATE_IN_PROGRESS:
                    if existing.stale:
                        log.warning("idempotency_abandoned_claim_taken_over", key=key, owner=owner)
                        await repo.restart(owner=owner, key=key, fingerprint=fingerprint, method=method,
                                           path=path[:2048], lock_id=lock_id, keep_created_at=True)
                        return KeyClaim(owner, key, lock_id)
                    raise IdempotencyInProgress(
                        "A request with this Idempotency-Key is still being processed; retry later."
                    )
                assert row.response_status is not None
                return StoredResponse(
                    status=row.response_status, headers=dict(row.response_headers or {}), body=row.response_body or b""
                )
        raise IdempotencyInProgress("A request with this Idempotency-Key is changing state; retry later.")

    async def complete(self, claim: KeyClaim, response: StoredResponse) -> None:
        async with self._db.transaction() as uow:
            stored = await IdempotencyRepository(uow.session).complete(
                owner=claim.owner, key=claim.key, lock_id=claim.lock_id,
                status=response.status, headers=response.headers, body=response.body,
            )
        if not stored:
            log.warning("idempotency_claim_lost", key=claim.key, owner=claim.owner)

    async def release(self, claim: KeyClaim) -> None:
        """Forget the claim: only when the request certainly did nothing (it never reached a service)."""
        async with self._db.transaction() as uow:
            await IdempotencyRepository(uow.session).release(owner=claim.owner, key=claim.key, lock_id=claim.lock_id)

    async def mark_unknown(self, claim: KeyClaim) -> None:
        """Keep the key with an unknown outcome (5xx or no answer): never forget a key that may have
        had an effect; its retry is forwarded again, with the key, to the service that knows."""
        async with self._db.transaction() as uow:
            await IdempotencyRepository(uow.session).mark_unknown(owner=claim.owner, key=claim.key,
                                                                  lock_id=claim.lock_id)

    async def cleanup(self) -> int:
        async with self._db.transaction() as uow:
            removed = await IdempotencyRepository(uow.session).delete_expired(self._ttl)
        if removed:
            log.info("idempotency_keys_expired", removed=removed)
        return removed

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup < self._cleanup_interval:
            return
        if self._cleanup_task is not None and not self._cleanup_task.done():
            return
        self._last_cleanup = now
        self._cleanup_task = asyncio.create_task(self._cleanup_quietly(), name="idempotency-cleanup")

    async def _cleanup_quietly(self) -> None:
        try:
            await self.cleanup()
        except Exception as exc:  # the next request tries again later
            log.warning("idempotency_cleanup_failed", error=str(exc))

    async def close(self) -> None:
        if self._cleanup_task is not None and not self._cleanup_task.done():
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup_task

