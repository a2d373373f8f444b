"""Every setting of every service, as the Kubernetes manifests carry it.

    python -m deploy.k8s.settings --check   # exit 1 if base/settings.env is out of date (make test does it)
    python -m deploy.k8s.settings --write   # regenerate base/settings.env after a config.py changed

The list comes from the services' settings classes (``services/<name>/config.py``), read through
``kit.cli.env_names``, so a new field cannot be forgotten: tests/test_k8s.py fails until it is here.
Each setting lands in exactly one place:

- ``base/settings.env``: the ConfigMap ``billing-config`` (kustomize configMapGenerator), every plain
  setting with its value for a cluster (``CLUSTER_VALUES``) or else its default from config.py;
- the Secret ``billing-secrets`` (``SECRET_KEYS``): not in git; ``overlays/local`` generates one with
  development values, a real cluster creates it (deploy/k8s/README.md);
- ``<PREFIX>DATABASE_URL``: composed in each Deployment from the CloudNativePG role's password Secret
  (``billing-pg-<service>``), so the password lives in one place.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.services import GATEWAY, SERVICES, ServiceSpec
from kit.cli import env_names
from kit.settings import ServiceSettings

K8S_DIR = Path(__file__).resolve().parent
SETTINGS_ENV = K8S_DIR / "base" / "settings.env"

KAFKA_BOOTSTRAP = "billing-kafka-kafka-bootstrap:9092"  # Strimzi: <cluster>-kafka-bootstrap
POSTGRES_HOST = "billing-pg-pooler-rw"  # the CloudNativePG Pooler's Service (PgBouncer)
PUBLIC_URL = "https://billing.example.com"  # the Ingress host; overlays replace it

# Named like a secret (kit.cli's rule for hiding values), plus the SMTP user, which is a credential.
_SECRET_NAME = re.compile(r"secret|password|token|key", re.IGNORECASE)
_ALSO_SECRET = {"SMTP_USERNAME"}

# Not settings of ours but read by every process: uvicorn trusts X-Forwarded-For from these peers.
# "*" is safe here because the NetworkPolicies let only the ingress controller reach the gateway
# and only the gateway (and service-to-service callers) reach the others.
# OTEL_EXPORTER_OTLP_ENDPOINT (kit/tracing.py): empty is off; an overlay sets its collector's URL.
PROCESS_ENV = {"FORWARDED_ALLOW_IPS": "*", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}


@dataclass(frozen=True)
class Setting:
    env: str  # the first environment variable it is read from (the one the manifests set)
    default: str  # as an environment value ("" for unset)
    services: tuple[str, ...]

    @property
    def secret(self) -> bool:
        return bool(_SECRET_NAME.search(self.env)) or self.env in _ALSO_SECRET

    @property
    def database_url(self) -> bool:
        return self.env.endswith("_DATABASE_URL")


def settings_class(spec: ServiceSpec) -> type[ServiceSettings]:
    module = importlib.import_module(f"{spec.module}.config")
    found = [c for c in vars(module).values()
             if inspect.isclass(c) and issubclass(c, ServiceSettings) and c.__module__ == module.__name__]
    if len(found) != 1:
        raise LookupError(f"{module.__name__}: expected one ServiceSettings subclass, found {found}")
    return found[0]


def _as_env(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | set):
        return ",".join(str(v) for v in value)
    return str(value)


def catalogue() -> dict[str, Setting]:
    """Environment name -> setting, over every registered service (shared names once)."""
    found: dict[str, Setting] = {}
    for spec in SERVICES:
        cls = settings_class(spec)
        for field_name, field in cls.model_fields.items():
            env = env_names(cls, field_name)[0]
            default = _as_env(field.get_default(call_default_factory=True, validated_data={}))
            if env in found:
                found[env] = Setting(env, found[env].default, (*found[env].services, spec.name))
            else:
                found[env] = Setting(env, default, (spec.name,))
    return found


def cluster_values() -> dict[str, str]:
    """What differs from config.py's defaults in a cluster (the overlays merge their own on top)."""
    values: dict[str, str] = {}
    for spec in SERVICES:
        p = spec.env_prefix
        values |= {
            f"{p}HOST": "0.0.0.0",
            f"{p}PORT": str(spec.port),
            f"{p}KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP,
            f"{p}LOG_JSON": "true",  # one JSON object per line for the cluster's log collector
            # Migrations run as a Job per service (migrations.yaml), never at a replica's start.
            f"{p}MIGRATE_ON_START": "false",
            # Half the local pool: 2 x 5 connections per replica keeps max_connections in reach of
            # the HPA maxima (postgres.yaml states the sum).
            f"{p}DB_POOL_SIZE": "5",
        }
        if spec.name != GATEWAY:
            values[f"GATEWAY_{spec.name.upper()}_URL"] = f"http://{spec.name}:{spec.port}"
    invoice = next(s for s in SERVICES if s.name == "invoice")
    for name in ("payments", "subscriptions", "notifications"):
        values[f"{name.upper()}_INVOICE_URL"] = f"http://invoice:{invoice.port}"
        values[f"{name.upper()}_PUBLIC_URL"] = PUBLIC_URL
    values |= {
        "INVOICE_PORTAL_URL": f"{PUBLIC_URL}/portal",
        "GATEWAY_ADMIN_COOKIE_SECURE": "true",  # the Ingress terminates TLS
        "PAYMENTS_WEBHOOK_INTAKE_POOL_SIZE": "5",
        "STRIPE_API_BASE": "",  # Stripe itself
        "SMTP_HOST": "smtp.example.com",
        "SMTP_PORT": "587",
        "SMTP_STARTTLS": "true",
    }
    return values


def configmap_values() -> dict[str, str]:
    values = cluster_values()
    plain = {env: values.get(env, s.default) for env, s in catalogue().items() if not s.secret and not s.database_url}
    return plain | PROCESS_ENV


def secret_keys() -> list[str]:
    return sorted(env for env, s in catalogue().items() if s.secret)


def render_settings_env() -> str:
    lines = [
        "# GENERATED by `python -m deploy.k8s.settings --write` from services/*/config.py: do not edit by hand.",
        "# The ConfigMap billing-config (every Deployment reads it whole with envFrom). Secrets are not here:",
        "# they are the Secret billing-secrets (" + ", ".join(secret_keys()) + ").",
        "# <PREFIX>DATABASE_URL is composed in each Deployment from the CloudNativePG role's Secret.",
    ]
    current = ""
    for env, value in configmap_values().items():
        owner = catalogue()[env].services[0] if env in catalogue() else "process"
        if owner != current:
            lines.append(f"# {owner}")
            current = owner
        if "\n" in value:
            raise ValueError(f"{env}: a multi-line value cannot go into an env file")
        lines.append(f"{env}={value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s.settings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="exit 1 if base/settings.env is out of date")
    group.add_argument("--write", action="store_true", help="regenerate base/settings.env")
    args = parser.parse_args(argv)
    wanted = render_settings_env()
    if args.write:
        SETTINGS_ENV.write_text(wanted)
        print(f"wrote {SETTINGS_ENV} ({len(configmap_values())} settings; secrets: {', '.join(secret_keys())})")
        return 0
    if not SETTINGS_ENV.is_file() or SETTINGS_ENV.read_text() != wanted:
        print(f"{SETTINGS_ENV} is out of date: run `.venv/bin/python -m deploy.k8s.settings --write`",
              file=sys.stderr)
        return 1
    print(f"{SETTINGS_ENV} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
