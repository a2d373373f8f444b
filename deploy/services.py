"""The registry of services and how each one is configured and launched.

``make run`` (deploy/run.py) and the end-to-end tests use the same functions, so a service starts the
same way in both: ``python -m <module>`` with environment from ``build_service_env``.

Per service (prefix e.g. ``INVOICE_``):
  <PREFIX>DATABASE_URL   postgresql+asyncpg://postgres@127.0.0.1:<pg port>/<database>
  <PREFIX>KAFKA_BOOTSTRAP 127.0.0.1:<kafka port>
  <PREFIX>PORT / <PREFIX>HOST=127.0.0.1
The gateway also gets ``GATEWAY_<NAME>_URL`` for every other service (GATEWAY_INVOICE_URL, ...).
Every service gets: BILLING_INTERNAL_TOKEN, STRIPE_WEBHOOK_SECRET, STRIPE_API_BASE, STRIPE_SECRET_KEY,
SMTP_HOST, SMTP_PORT, BILLING_ADMIN_PASSWORD, BILLING_MAIL_DIR.

Stripe: locally ``STRIPE_API_BASE`` is the Stripe stand-in (deploy/stripe_standin, in front of
stripe-mock), which delivers its signed events to ``InfraEndpoints.stripe_webhook_url`` (payments'
``/webhooks/stripe``). That is the only difference from Stripe's test mode: with a key Stripe issued
(``STRIPE_SECRET_KEY=sk_test_...``) no ``STRIPE_API_BASE`` is set and the SDK talks to Stripe.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploy.infra import REPO_ROOT, ServiceProcess
from kit.stripe import looks_like_real_test_key

__all__ = [
    "ServiceSpec",
    "SERVICES",
    "GATEWAY",
    "InfraEndpoints",
    "service_by_name",
    "available_services",
    "build_service_env",
    "make_service_process",
]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port: int
    env_prefix: str
    database: str = ""  # defaults to ``name``

    @property
    def database_name(self) -> str:
        return self.database or self.name

    @property
    def package_dir(self) -> Path:
        return REPO_ROOT.joinpath(*self.module.split("."))

    @property
    def runnable(self) -> bool:
        """True when the package has a ``__main__.py`` (so ``python -m`` can start it)."""
        return (self.package_dir / "__main__.py").is_file()

    def with_port(self, port: int) -> ServiceSpec:
        return replace(self, port=port)


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(name="invoice", module="services.invoice", port=8001, env_prefix="INVOICE_"),
    ServiceSpec(name="payments", module="services.payments", port=8002, env_prefix="PAYMENTS_"),
    ServiceSpec(name="subscriptions", module="services.subscriptions", port=8003, env_prefix="SUBSCRIPTIONS_"),
    ServiceSpec(name="notifications", module="services.notifications", port=8004, env_prefix="NOTIFICATIONS_"),
    ServiceSpec(name="reporting", module="services.reporting", port=8005, env_prefix="REPORTING_"),
    ServiceSpec(name="gateway", module="services.gateway", port=8000, env_prefix="GATEWAY_"),
)
"""In start order: the gateway last, after the services it calls."""

GATEWAY = "gateway"
DATABASES: tuple[str, ...] = tuple(spec.database_name for spec in SERVICES)


def service_by_name(name: str) -> ServiceSpec:
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown service {name!r}; known: {', '.join(s.name for s in SERVICES)}")


def available_services() -> list[ServiceSpec]:
    """The registered services whose package can already be run with ``python -m``."""
    return [spec for spec in SERVICES if spec.runnable]


@dataclass
class InfraEndpoints:
    """Where the infrastructure is, plus the shared secrets of one run."""

    kafka_bootstrap: str
    database_urls: Mapping[str, str]  # service name -> SQLAlchemy URL
    stripe_api_base: str  # the Stripe stand-in (unused with a real test key)
    smtp_host: str
    smtp_port: int
    mail_dir: Path | None = None
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # One signing key for every gateway replica of a run, so tokens survive across replicas.
    jwt_secret: str = field(default_factory=lambda: os.environ.get("GATEWAY_JWT_SECRET") or secrets.token_urlsafe(32))
    stripe_webhook_secret: str = field(default_factory=lambda: os.environ.get("STRIPE_WEBHOOK_SECRET", "whsec_local"))
    stripe_secret_key: str = field(default_factory=lambda: os.environ.get("STRIPE_SECRET_KEY", "sk_test_local"))
    admin_password: str = field(default_factory=lambda: os.environ.get("BILLING_ADMIN_PASSWORD", "admin-password"))
    ports: Mapping[str, int] = field(default_factory=dict)  # service name -> port, overriding the spec's

    def port_of(self, spec: ServiceSpec) -> int:
        return self.ports.get(spec.name, spec.port)

    def url_of(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port_of(service_by_name(name))}"

    @property
    def stripe_webhook_url(self) -> str:
        """Where the Stripe stand-in delivers its events: the payments service's webhook endpoint."""
        return f"{self.url_of('payments')}/webhooks/stripe"

    @property
    def uses_real_stripe(self) -> bool:
        """A key Stripe issued is set: Stripe's test mode, nothing local (no stand-in, no stripe-mock)."""
        return looks_like_real_test_key(self.stripe_secret_key)

    def global_env(self) -> dict[str, str]:
        env = {
            "BILLING_INTERNAL_TOKEN": self.internal_token,
            "GATEWAY_JWT_SECRET": self.jwt_secret,
            "STRIPE_WEBHOOK_SECRET": self.stripe_webhook_secret,
            "STRIPE_SECRET_KEY": self.stripe_secret_key,
            "SMTP_HOST": self.smtp_host,
            "SMTP_PORT": str(self.smtp_port),
            "BILLING_ADMIN_PASSWORD": self.admin_password,
            "BILLING_GATEWAY_URL": self.url_of(GATEWAY),
        }
        # With a key Stripe issued, the SDK talks to Stripe's test mode, never to the stand-in.
        if not self.uses_real_stripe:
            env["STRIPE_API_BASE"] = self.stripe_api_base
        if self.mail_dir is not None:
            env["BILLING_MAIL_DIR"] = str(self.mail_dir)
        return env


def build_service_env(
    spec: ServiceSpec,
    infra: InfraEndpoints,
    *,
    base_env: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment for ``python -m <spec.module>``.

    ``base_env`` defaults to this process's environment; ``extra`` is applied last (overrides).
    """
    env = dict(os.environ if base_env is None else base_env)
    env.update(infra.global_env())
    prefix = spec.env_prefix
    env[f"{prefix}DATABASE_URL"] = infra.database_urls[spec.name]
    env[f"{prefix}KAFKA_BOOTSTRAP"] = infra.kafka_bootstrap
    env[f"{prefix}PORT"] = str(infra.port_of(spec))
    env[f"{prefix}HOST"] = "127.0.0.1"
    if spec.name in ("payments", "notifications", "subscriptions"):
        # They read invoices (amounts due, PDFs) or clients from the invoice service over HTTP.
        env[f"{prefix}INVOICE_URL"] = infra.url_of("invoice")
    if spec.name == GATEWAY:
        for other in SERVICES:
            if other.name != GATEWAY:
                env[f"GATEWAY_{other.name.upper()}_URL"] = infra.url_of(other.name)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    env.update(extra or {})
    return env


def make_service_process(
    spec: ServiceSpec,
    infra: InfraEndpoints,
    log_dir: Path,
    *,
    python: str = sys.executable,
    extra_env: Mapping[str, str] | None = None,
    name: str | None = None,
    port: int | None = None,
) -> ServiceProcess:
    """A (not yet started) ServiceProcess for ``spec``.

    ``name`` and ``port`` let tests run a second replica beside the first (own log, own HTTP port).
    """
    name = name or spec.name
    env = build_service_env(spec, infra, extra=extra_env)
    if port is not None:
        env[f"{spec.env_prefix}PORT"] = str(port)
    return ServiceProcess(
        name=name,
        argv=[python, "-m", spec.module],
        env=env,
        port=port if port is not None else infra.port_of(spec),
        log_path=Path(log_dir) / f"{name}.log",
        cwd=REPO_ROOT,
    )
