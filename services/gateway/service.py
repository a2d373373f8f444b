"""Gateway logic without HTTP: logins (and their throttle), users, idempotency keys."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from kit.db import Database, UnitOfWork
from kit.errors import AppError, Conflict, InvalidInput, TooManyRequests, Unauthorized
from kit.pagination import Page, PageRequest
from services.gateway.models import (
    ROLE_ADMIN,
    STATE_IN_PROGRESS,
    STATE_UNKNOWN,
    THROTTLE_ACCOUNT,
    THROTTLE_ADDRESS,
    LoginCounter,
    User,
)
from services.gateway.repository import IdempotencyRepository, LoginCounterRepository, UserRepository
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
    """Logins and users, inside the caller's unit of work (the request's: it commits, not us).

    With a `throttle`, every login is counted against its account and its client address first
    (in the throttle's own transactions: a refused login rolls the request back, its count stays).
    """

    def __init__(self, uow: UnitOfWork, passwords: Passwords, tokens: TokenCodec, clients: ClientDirectory,
                 throttle: LoginThrottle | None = None) -> None:
        self._users = UserRepository(uow.session)
        self._passwords = passwords
        self._tokens = tokens
        self._clients = clients
        self._throttle = throttle

    async def login(self, email: str, password: str, *, address: str | None = None) -> LoginResponse:
        """A token for the right password. 401 otherwise; 429 (`TooManyRequests`, with the seconds to
        wait) once the account or the `address` has failed too often: then even the right password
        is refused until the lock-out ends."""
        if "\x00" in email:  # PostgreSQL text cannot hold it: no login has it
            raise InvalidInput("The email must not contain NUL characters.",
                               details=[{"field": "email", "message": "NUL character", "type": "value_error"}])
        attempt = await self._throttle.admit(email, address) if self._throttle else None
        user = await self._users.get_by_email(email)
        found = (user_out(user), user.password_hash) if user is not None else None
        ok = await self._passwords.verify(found[1] if found else None, password)
        if found is None or not ok:
            raise Unauthorized("Invalid email or password.", code="invalid_credentials")
        if attempt is not None and self._throttle is not None:
            await self._throttle.succeeded(attempt)
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


# --- login throttle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrottlePolicy:
    """At most `account_max_failures` failed logins per account and `address_max_failures` per client
    address within `window`; the next attempt locks that account or address out for `lockout`, twice
    as long at each further lock-out (up to `max_lockout`) until a successful login, or a quiet
    `max_lockout`, starts the ladder again."""

    account_max_failures: int = 5
    address_max_failures: int = 20
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(minutes=15)
    max_lockout: timedelta = timedelta(hours=24)

    def limit(self, scope: str) -> int:
        return self.account_max_failures if scope == THROTTLE_ACCOUNT else self.address_max_failures

    def lockout_after(self, lockouts: int) -> timedelta:
        return min(self.lockout * (1 << min(lockouts, 32)), self.max_lockout)


@dataclass(frozen=True)
class LoginAttempt:
    """An attempt counted as a failure up front (so parallel guesses cannot slip past the limit);
    `LoginThrottle.succeeded` takes it back."""

    keys: tuple[tuple[str, str], ...] = field(default=())


def _wait_text(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} seconds"
    if seconds < 90 * 60:
        return f"{math.ceil(seconds / 60)} minutes"
    return f"{math.ceil(seconds / 3600)} hours"


class LoginThrottle:
    """Failed logins per account and per client address, counted in the gateway's database (every
    replica sees the same counts), each change in a short transaction of its own."""

    def __init__(self, db: Database, policy: ThrottlePolicy | None = None, *,
                 cleanup_interval_seconds: float = 600.0) -> None:
        self._db = db
        self.policy = policy or ThrottlePolicy()
        self._cleanup = _Periodic("login-throttle-cleanup", cleanup_interval_seconds, self.cleanup)

    @staticmethod
    def keys(email: str, address: str | None) -> tuple[tuple[str, str], ...]:
        account = (THROTTLE_ACCOUNT, email.strip().lower()[:320])
        return (account, (THROTTLE_ADDRESS, address[:320])) if address else (account,)

    async def admit(self, email: str, address: str | None) -> LoginAttempt:
        """Count this attempt, or refuse it (`TooManyRequests`) while its account or address is locked out."""
        self._cleanup.maybe_run()
        keys = self.keys(email, address)
        refused: tuple[LoginCounter, datetime] | None = None
        async with self._db.transaction() as uow:
            now, rows = await LoginCounterRepository(uow.session).lock(list(keys))
            for row in rows.values():
                self._age(row, now)
            locked = [row for row in rows.values() if row.locked_until is not None]
            if not locked:
                over = [row for row in rows.values() if row.failures + 1 > self.policy.limit(row.scope)]
                for row in over:
                    row.locked_until = now + self.policy.lockout_after(row.lockouts)
                    row.lockouts += 1
                    row.failures = 0
                    row.updated_at = now
                    log.warning("login_locked_out", scope=row.scope, key=row.key, lockouts=row.lockouts,
                                until=row.locked_until.isoformat())
                locked = over
            if not locked:
                for row in rows.values():
                    row.failures += 1
                    row.updated_at = now
            else:
                worst = max(locked, key=lambda r: r.locked_until or now)
                refused = (worst, now)
        if refused is not None:
            raise self._refusal(*refused)
        return LoginAttempt(keys)

    async def succeeded(self, attempt: LoginAttempt) -> None:
        """The password was right: the account starts afresh; the address gets this attempt back."""
        async with self._db.transaction() as uow:
            now, rows = await LoginCounterRepository(uow.session).lock(list(attempt.keys))
            for row in rows.values():
                if row.scope == THROTTLE_ACCOUNT:
                    row.failures, row.lockouts, row.locked_until = 0, 0, None
                else:
                    row.failures = max(row.failures - 1, 0)
                row.updated_at = now

    def _age(self, row: LoginCounter, now: datetime) -> None:
        """Apply what time has done to a row: an ended lock-out, an ended window, a long quiet."""
        if row.locked_until is not None and row.locked_until <= now:
            row.locked_until = None
            row.failures = 0
            row.window_started_at = now
        if row.updated_at < now - self.policy.max_lockout:
            row.lockouts = 0
        if row.window_started_at + self.policy.window <= now:
            row.failures = 0
            row.window_started_at = now

    def _refusal(self, row: LoginCounter, now: datetime) -> TooManyRequests:
        until = row.locked_until or now
        seconds = max(1, math.ceil((until - now).total_seconds()))
        whom = "for this account" if row.scope == THROTTLE_ACCOUNT else "from your network address"
        return TooManyRequests(
            f"Too many failed logins {whom}. Try again in {_wait_text(seconds)} "
            f"(after {until:%Y-%m-%d %H:%M:%S} UTC).",
            code="too_many_login_attempts",
            retry_after=seconds,
            details={"scope": row.scope, "retryAfter": seconds, "retryAt": until.isoformat()},
        )

    async def cleanup(self) -> int:
        async with self._db.transaction() as uow:
            removed = await LoginCounterRepository(uow.session).delete_idle(
                self.policy.max_lockout + self.policy.window)
        if removed:
            log.info("login_throttle_counters_forgotten", removed=removed)
        return removed

    async def close(self) -> None:
        await self._cleanup.close()


class _Periodic:
    """Runs `job` in the background at most every `interval` seconds, when `maybe_run` is called."""

    def __init__(self, name: str, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        self._name = name
        self._interval = interval
        self._job = job
        self._last = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def maybe_run(self) -> None:
        now = time.monotonic()
        if now - self._last < self._interval or (self._task is not None and not self._task.done()):
            return
        self._last = now
        self._task = asyncio.create_task(self._quietly(), name=self._name)

    async def _quietly(self) -> None:
        try:
            await self._job()
        except Exception as exc:  # the next call tries again later
            log.warning("background_job_failed", job=self._name, error=str(exc))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


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

