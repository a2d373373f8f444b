"""The gateway application: its own endpoints (auth, users), the proxy, the merged OpenAPI."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from kit.db import Database
from kit.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from kit.metrics import ROUTE_SCOPE_KEY
from kit.pagination import Page, PageParams
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.web import BodyLimit, RequestUnitOfWork, StrictQuery, UtcDateTime
from services.gateway import admin, portal
from services.gateway import routes as route_table
from services.gateway.audit import AuditAction, AuditEntryOut, AuditLog, list_entries
from services.gateway.config import GatewaySettings
from services.gateway.middleware import GatewayMiddleware
from services.gateway.openapi import BEARER_SCHEME, OpenApiAggregator
from services.gateway.proxy import ANONYMOUS, ForwardedActor, UpstreamPool
from services.gateway.repository import AuditFilter
from services.gateway.schemas import (
    CreateUserRequest,
    ErrorResponse,
    LoginRequest,
    LoginResponse,
    UserOut,
)
from services.gateway.security import Passwords, TokenClaims, TokenCodec, bearer_token
from services.gateway.service import AuthService, IdempotencyService, LoginThrottle, ThrottlePolicy, ensure_admin

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass
class GatewayContext:
    settings: GatewaySettings
    tokens: TokenCodec
    passwords: Passwords
    idempotency: IdempotencyService
    upstreams: UpstreamPool
    openapi: OpenApiAggregator
    throttle: LoginThrottle
    audit: AuditLog


async def get_context(request: Request) -> GatewayContext:
    return request.app.state.gateway  # type: ignore[no-any-return]


Context = Annotated[GatewayContext, Depends(get_context)]


def auth_service(uow: RequestUnitOfWork, ctx: Context) -> AuthService:
    """Logins and users in the request's unit of work: committed once the handler has returned."""
    return AuthService(uow, ctx.passwords, ctx.tokens, ctx.upstreams, throttle=ctx.throttle)


Auth = Annotated[AuthService, Depends(auth_service)]
_bearer = HTTPBearer(auto_error=False, scheme_name=BEARER_SCHEME, description="`accessToken` from the login.")


async def current_claims(
    request: Request,
    ctx: Context,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenClaims:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Unauthorized("A bearer token is required.", code="unauthorized")
    return ctx.tokens.decode(token)


async def admin_claims(claims: Annotated[TokenClaims, Depends(current_claims)]) -> TokenClaims:
    if claims.role != "admin":
        raise Forbidden("This action needs an admin.")
    return claims


Claims = Annotated[TokenClaims, Depends(current_claims)]
AdminClaims = Annotated[TokenClaims, Depends(admin_claims)]

def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# The gateway's own routes refuse unknown query parameters, as every service does (the app-wide
# dependency of kit.service; named here too so it stays true whatever builds the app). The proxy
# below is not one of them: it forwards the query string to the service, which judges it.
api = APIRouter(prefix="/api", responses=_errors(400, 422), dependencies=[StrictQuery])


@api.post(
    "/auth/login", response_model=LoginResponse, tags=["auth"], summary="Log in with email and password",
    description="After too many failed logins for one account (5 in 15 minutes by default) or from one "
    "address (20), further attempts, the right password included, are refused with 429 and `Retry-After` "
    "(seconds) until the lock-out ends; each further lock-out lasts twice as long. A successful login "
    "clears the account's count.",
    responses={**_errors(401), 429: {"model": ErrorResponse, "description": "Too many failed logins: try again "
                                     "after `Retry-After` seconds.",
                                     "headers": {"Retry-After": {"schema": {"type": "integer"},
                                                                 "description": "Seconds to wait."}}}},
)
async def login(body: LoginRequest, auth: Auth, request: Request) -> LoginResponse:
    return await auth.login(body.email, body.password, address=client_address(request))


def client_address(request: Request) -> str | None:
    """The caller's address as uvicorn saw it (X-Forwarded-For only from a trusted proxy)."""
    return request.client.host if request.client else None


@api.get("/auth/me", response_model=UserOut, tags=["auth"], summary="The logged-in user", responses=_errors(401))
async def me(claims: Claims, auth: Auth) -> UserOut:
    return await auth.current_user(claims)


@api.post(
    "/users", response_model=UserOut, status_code=201, tags=["users"], summary="Create a login (admin)",
    responses=_errors(401, 403, 409, 503),
)
async def create_user(body: CreateUserRequest, claims: AdminClaims, auth: Auth, uow: RequestUnitOfWork,
                      ctx: Context, request: Request) -> UserOut:
    user = await auth.create_user(body)
    await ctx.audit.record_own(uow, request, user_id=claims.user_id, status=201, created=str(user.id),
                               body=body.model_dump(mode="json", by_alias=True))
    return user


@api.get(
    "/audit", response_model=Page[AuditEntryOut], tags=["audit"], summary="The audit log (admin), newest first",
    description="Every admin action that changed (or, on money, tried to change) money or documents: who, "
    "when, what (action, method, path, target ids, the service's status, a bounded summary of the body "
    "with secrets removed), the request's correlation id and Idempotency-Key. Append-only. `actor` is a "
    "user id or an email; `target` any id the action was about; `from` is inclusive, `to` exclusive.",
    responses=_errors(401, 403),
)
async def audit_log(
    _: AdminClaims, uow: RequestUnitOfWork, page: PageParams,
    actor: Annotated[str | None, Query(min_length=1, max_length=320, description="A user id or an email.")] = None,
    action: Annotated[AuditAction | None, Query(description="An action name.")] = None,
    target: Annotated[str | None, Query(min_length=1, max_length=200, description="Any id the action was about.")
                      ] = None,
    occurred_from: Annotated[UtcDateTime | None, Query(alias="from", description="At or after this instant.")
                             ] = None,
    occurred_to: Annotated[UtcDateTime | None, Query(alias="to", description="Before this instant.")] = None,
) -> Page[AuditEntryOut]:
    if occurred_from and occurred_to and occurred_from > occurred_to:
        raise InvalidInput("`from` must not be after `to`.",
                           details=[{"field": "from", "message": "after to", "type": "value_error"}])
    filters = AuditFilter(actor=actor, action=action.value if action else None, target=target,
                          occurred_from=occurred_from, occurred_to=occurred_to)
    return await list_entries(uow, filters, page)


@api.get(
    "/users", response_model=Page[UserOut], tags=["users"], summary="List logins (admin), oldest first",
    responses=_errors(401, 403),
)
async def list_users(_: AdminClaims, auth: Auth, page: PageParams) -> Page[UserOut]:
    return await auth.list_users(page)


async def proxy(request: Request) -> Response:
    """Everything else goes to the service that owns the path, query string untouched.

    A plain Starlette route, not a FastAPI one: FastAPI's app-wide dependencies (the strict query
    check) must not judge a query string that belongs to the upstream service.
    """
    ctx: GatewayContext = request.app.state.gateway
    path = request.url.path
    route = route_table.resolve(path)
    if route is None:
        raise NotFound(f"No route for {request.method} {path}.")
    request.scope[ROUTE_SCOPE_KEY] = f"{route.prefix}*"  # metrics: the route's pattern, never the raw path
    if route.auth is route_table.Auth.PUBLIC:
        actor = ANONYMOUS
    else:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise Unauthorized("A bearer token is required.")
        claims = ctx.tokens.decode(token)
        actor = ForwardedActor(role=claims.role, user_id=claims.user_id, client_id=claims.client_id)
    body = await request.body()
    return await ctx.upstreams.forward(request, route.upstream, body, actor, read_timeout=route.read_timeout)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    # ServiceRuntime wants a broker; with kafka_enabled False it is never started.
    runtime = ServiceRuntime(settings=settings, db=db, broker=make_broker(settings), migrations=MIGRATIONS)

    secret_generated = not settings.jwt_secret
    secret = settings.jwt_secret or secrets.token_urlsafe(48)
    tokens = TokenCodec(secret, ttl_seconds=settings.jwt_ttl_seconds, issuer=settings.jwt_issuer)
    upstreams = UpstreamPool(
        settings.upstream_urls(),
        internal_token=settings.internal_token,
        connect_timeout=settings.upstream_connect_timeout,
        timeout=settings.upstream_timeout,
        max_connections=settings.upstream_max_connections,
        max_keepalive=settings.upstream_max_keepalive,
        keepalive_expiry=settings.upstream_keepalive_expiry,
    )
    passwords = Passwords()
    audit = AuditLog(db, upstream_urls=settings.upstream_urls())
    upstreams.observers.append(audit.observe)  # admin actions, via the proxy and the admin pages alike
    idempotency = IdempotencyService(
        db,
        ttl_seconds=settings.idempotency_ttl_seconds,
        lock_timeout_seconds=settings.idempotency_lock_timeout_seconds,
        cleanup_interval_seconds=settings.idempotency_cleanup_interval_seconds,
    )
    throttle = LoginThrottle(
        db,
        ThrottlePolicy(
            account_max_failures=settings.login_account_max_failures,
            address_max_failures=settings.login_address_max_failures,
            window=timedelta(seconds=settings.login_window_seconds),
            lockout=timedelta(seconds=settings.login_lockout_seconds),
            max_lockout=timedelta(seconds=settings.login_lockout_max_seconds),
        ),
        cleanup_interval_seconds=settings.idempotency_cleanup_interval_seconds,
    )
    aggregator = OpenApiAggregator(
        upstreams,
        lambda: route_table.ROUTES,
        cache_seconds=settings.openapi_cache_seconds,
        retry_seconds=settings.openapi_retry_seconds,
        fetch_timeout=settings.openapi_fetch_timeout,
    )

    async def on_startup() -> None:
        if secret_generated:
            log.warning(
                "jwt_secret_generated",
                hint="GATEWAY_JWT_SECRET is not set: tokens are signed with a per-process secret and stop "
                "working on restart and across replicas.",
            )
        await ensure_admin(db, passwords, settings.admin_email, settings.admin_password)

    async def on_shutdown() -> None:
        await idempotency.close()
        await throttle.close()
        await upstreams.close()

    runtime.on_startup.append(on_startup)
    runtime.on_shutdown.append(on_shutdown)

    app = create_service_app(
        runtime,
        title="Billing platform API",
        description="Invoices, payments, subscriptions, reminders and reports. Authenticate with "
        "`POST /api/auth/login` and send `Authorization: Bearer <accessToken>`.",
        # The portal's own pages before the catch-all proxy.
        routers=[api, portal.router, admin.router],  # /admin: the admin pages (services/gateway/admin)
        max_body=settings.max_body_bytes,
    )
    # Last: the catch-all proxy.
    app.router.routes.append(StarletteRoute("/{full_path:path}", proxy, methods=PROXY_METHODS))
    app.version = "1.0.0"
    app.state.gateway = GatewayContext(
        settings=settings, tokens=tokens, passwords=passwords, idempotency=idempotency, upstreams=upstreams,
        openapi=aggregator, throttle=throttle, audit=audit,
    )
    admin.configure(app, secret=secret, tokens=tokens, upstreams=upstreams,
                    cookie_secure=settings.admin_cookie_secure)
    _serve_merged_openapi(app, aggregator)
    # Inside the correlation-id middleware (replayed and refused requests carry the id too) and
    # ahead of kit's BodyLimit (same limit): the gateway reads every body itself, for idempotency
    # fingerprints, and drains an oversized one before its 413 so a client still sending sees it.
    gateway_middleware = Middleware(
        GatewayMiddleware, max_body_bytes=settings.max_body_bytes, idempotency=idempotency, tokens=tokens
    )
    body_limit = next(i for i, m in enumerate(app.user_middleware) if getattr(m, "cls", None) is BodyLimit)
    app.user_middleware.insert(body_limit, gateway_middleware)
    return app


def _serve_merged_openapi(app: FastAPI, aggregator: OpenApiAggregator) -> None:
    """Swap FastAPI's /openapi.json for one that merges in the upstream services' documents."""
    url = app.openapi_url or "/openapi.json"

    async def openapi_json(_: Request) -> JSONResponse:
        return JSONResponse(await aggregator.document(app.openapi()))

    merged = StarletteRoute(url, openapi_json, methods=["GET"], include_in_schema=False)
    for i, existing in enumerate(app.router.routes):
        if getattr(existing, "path", None) == url:
            app.router.routes[i] = merged
            return
    app.router.routes.insert(0, merged)
