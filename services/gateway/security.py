"""Password hashing (argon2id) and access tokens (JWT, HS256)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request

from kit.errors import Unauthorized

JWT_ALGORITHM = "HS256"


class Passwords:
    """argon2id via argon2-cffi. Hashing is deliberately slow, so it runs in a worker thread."""

    def __init__(self, hasher: PasswordHasher | None = None, *, max_concurrent: int = 4) -> None:
        self._hasher = hasher or PasswordHasher()
        # Each hash takes ~64 MiB and real CPU: a login flood queues here instead of exhausting memory.
        self._slots = asyncio.Semaphore(max_concurrent)
        # Verified against when the email is unknown, so both paths cost the same.
        self._dummy_hash = self._hasher.hash("not-a-real-password")

    def hash_sync(self, password: str) -> str:
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    def _verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash or self._dummy_hash, password) and password_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True when `password` matches; with no hash (unknown user) still spends the same time."""
        async with self._slots:
            return await asyncio.to_thread(self._verify, password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True


@dataclass(frozen=True)
class TokenClaims:
    user_id: str
    role: str
    client_id: str | None
    expires_at: int


class TokenCodec:
    def __init__(self, secret: str, *, ttl_seconds: int, issuer: str) -> None:
        if not secret:
            raise ValueError("JWT secret must not be empty")
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self._issuer = issuer

    def issue(self, *, user_id: str, role: str, client_id: str | None, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        payload = {
            "sub": user_id,
            "role": role,
            "cid": client_id,
            "iat": issued,
            "exp": issued + self.ttl_seconds,
            "iss": self._issuer,
        }
        return jwt.encode(payload, self._secret, algorithm=JWT_ALGORITHM)

    def decode(self, token: str) -> TokenClaims:
        """Claims of a valid token; `Unauthorized` for anything else (expired, forged, malformed)."""
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                issuer=self._issuer,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("The access token has expired.", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("The access token is invalid.", code="invalid_token") from exc
        role = payload.get("role")
        sub = payload.get("sub")
        cid = payload.get("cid")
        bad_cid = cid is not None and not isinstance(cid, str)
        if role not in ("admin", "client") or not isinstance(sub, str) or bad_cid:
            raise Unauthorized("The access token is invalid.", code="invalid_token")
        if role == "client" and not cid:
            raise Unauthorized("The access token is invalid.", code="invalid_token")
        return TokenClaims(user_id=sub, role=role, client_id=cid if role == "client" else None,
                           expires_at=int(payload["exp"]))


def client_address(request: Request) -> str | None:
    """The caller's address as uvicorn saw it (X-Forwarded-For only from a trusted proxy): the key of
    the login throttle's per-address count, for the API login and the admin sign-in page alike."""
    return request.client.host if request.client else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
