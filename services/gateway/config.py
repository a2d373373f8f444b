"""Gateway settings (env prefix `GATEWAY_`, plus the shared `BILLING_*` names)."""

from __future__ import annotations

import ipaddress

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from kit.settings import ServiceSettings

# Names of the backend services; each has a `GATEWAY_<NAME>_URL` setting below.
UPSTREAM_NAMES = ("invoice", "payments", "subscriptions", "notifications", "reporting")


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", populate_by_name=True)

    service_name: str = "gateway"
    port: int = 8000
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/gateway"
    kafka_enabled: bool = False  # the gateway neither publishes nor consumes events

    # Upstreams (GATEWAY_INVOICE_URL, ...).
    invoice_url: str = "http://127.0.0.1:8001"
    payments_url: str = "http://127.0.0.1:8002"
    subscriptions_url: str = "http://127.0.0.1:8003"
    notifications_url: str = "http://127.0.0.1:8004"
    reporting_url: str = "http://127.0.0.1:8005"
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 30.0
    upstream_max_connections: int = 100
    upstream_max_keepalive: int = 20
    # Below uvicorn's default keep-alive (5 s) so a pooled connection is never reused after the
    # upstream has closed it.
    upstream_keepalive_expiry: float = 4.0

    # Auth. No secret configured: one is generated per process (tokens die with it; warned at start),
    # which only a gateway on loopback (`make run`, the tests: local mode) may do; see _require_jwt_secret.
    jwt_secret: str | None = None
    jwt_ttl_seconds: int = 3600
    jwt_issuer: str = "billing-gateway"
    admin_email: str = "admin@example.com"
    admin_password: str = Field(
        default="admin-password",
        validation_alias=AliasChoices("BILLING_ADMIN_PASSWORD"),
    )

    # Login throttle (counted in the gateway's database, so shared by every replica): at most this
    # many failed logins per account (known or not) and per client address within the window; the
    # next attempt is locked out (429 with Retry-After) for the lock-out, doubled at each further
    # lock-out up to the maximum. The client address is the peer's, or X-Forwarded-For's when the
    # peer is a trusted proxy (uvicorn's FORWARDED_ALLOW_IPS, loopback by default).
    login_account_max_failures: int = Field(default=5, ge=1)
    login_address_max_failures: int = Field(default=20, ge=1)
    login_window_seconds: float = Field(default=15 * 60, gt=0)
    login_lockout_seconds: float = Field(default=15 * 60, gt=0)
    login_lockout_max_seconds: float = Field(default=24 * 3600, gt=0)

    # Admin pages (/admin): the session cookie is Secure when served over HTTPS (set this behind TLS).
    admin_cookie_secure: bool = False

    # Requests.
    max_body_bytes: int = 5 * 1024 * 1024
    idempotency_ttl_seconds: int = 24 * 3600
    # An "in progress" key older than this is taken to belong to a request that died (crash, lost
    # connection) and may be taken over by a retry.
    idempotency_lock_timeout_seconds: float = 120.0
    idempotency_cleanup_interval_seconds: float = 600.0

    # Merged OpenAPI document.
    openapi_cache_seconds: float = 60.0
    openapi_retry_seconds: float = 5.0
    openapi_fetch_timeout: float = 3.0

    @model_validator(mode="after")
    def _require_jwt_secret(self) -> GatewaySettings:
        # Reachable beyond this machine means it may be one of several replicas behind a proxy: a
        # per-process key would make every token fail on the next replica, so refuse to start.
        if not self.jwt_secret and not _is_loopback(self.host):
            raise ValueError(
                f"GATEWAY_JWT_SECRET is required when the gateway listens on {self.host} (not loopback): "
                "every replica must sign tokens with the same key (e.g. `openssl rand -hex 32`)"
            )
        return self

    def upstream_urls(self) -> dict[str, str]:
        return {name: getattr(self, f"{name}_url") for name in UPSTREAM_NAMES}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
