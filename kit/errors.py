"""One error model for every service: `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger(__name__)


class AppError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class InvalidInput(AppError):
    status_code = 422
    code = "validation_error"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(AppError):
    """A dependency (database, another service, Stripe) is down: the caller may retry later."""

    status_code = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message, code=code, details=details)
        self.retry_after = retry_after


class TooManyRequests(AppError):
    """Refused for now (a throttle): `retry_after` seconds go out as the `Retry-After` header."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, details: Any = None) -> None:
        super().__init__(message, code=code, details=details)
        self.retry_after = retry_after


def retry_after_headers(exc: AppError) -> dict[str, str] | None:
    """`Retry-After` for an error that says when to come back (429, 503), else None."""
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if isinstance(retry_after, int) else None


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "service_unavailable",
}


def _clean_validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        cleaned.append(
            {
                "field": ".".join(str(part) for part in err.get("loc", ()) if part != "body"),
                "message": err.get("msg", "invalid"),
                "type": err.get("type"),
            }
        )
    return cleaned


def database_unreachable(exc: DBAPIError) -> bool:
    """The connection was lost or could not be made (PostgreSQL restarting, a stale pooled connection
    after a restart), as opposed to a statement the database refused."""
    if exc.connection_invalidated:
        return True
    # SQLAlchemy's asyncpg adapter wraps the driver's exception: it is the wrapper's __cause__.
    causes = (exc.orig, getattr(exc.orig, "__cause__", None), exc.__cause__)
    return any(isinstance(cause, _UNREACHABLE) for cause in causes)


_UNREACHABLE = (OSError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.CannotConnectNowError,
                asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
                asyncpg.exceptions.InterfaceError)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status_code,
                            headers=retry_after_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _clean_validation_errors(list(exc.errors()))
        return JSONResponse(
            error_body("validation_error", "The request is invalid.", details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unreachable(exc):
            log.exception("unhandled_error", error=str(exc))
            return JSONResponse(error_body("internal_error", "An unexpected error occurred."), status_code=500)
        # Nothing was committed (the unit of work rolled back with the connection): safe to retry.
        log.warning("database_unavailable", error=str(exc.orig or exc)[:300])
        return JSONResponse(error_body("database_unavailable", "The database is not reachable right now; "
                                       "retry shortly."), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", error=str(exc))
        return JSONResponse(error_body("internal_error", "An unexpected error occurred."), status_code=500)
