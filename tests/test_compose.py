"""docker-compose.yml, checked without Docker (there is no engine here, so `docker compose config`
cannot run): the YAML parses, every entry is a real service or piece of infrastructure, every
reference (module, host:port, database, mount, ${VARIABLE}) points at something that exists, and
the scaling rules hold (the gateway publishes no port, a proxy does; one JWT secret is required).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.infra import KAFKA_VERSION, STRIPE_MOCK_VERSION
from deploy.services import DATABASES, GATEWAY, SERVICES
from services.invoice.pdf.system import FONT_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
INFRA = {"kafka", "postgres", "stripe-mock", "stripe-standin", "mailsink", "gateway-proxy"}
REGISTRY = {spec.name: spec for spec in SERVICES}


def load() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_TEXT)


def services() -> dict[str, dict[str, Any]]:
    return load()["services"]


def listen_port(name: str, service: dict[str, Any]) -> int | None:
    """The port a compose service listens on inside the network."""
    if name in REGISTRY:
        return int(service["environment"][f"{REGISTRY[name].env_prefix}PORT"])
    return {"kafka": 9092, "postgres": 5432, "stripe-mock": 12111, "stripe-standin": 12113, "mailsink": 1025,
            "gateway-proxy": 8000}.get(name)


def test_compose_parses_and_has_the_infrastructure() -> None:
    compose = load()
    assert set(compose["services"]) >= INFRA
    kafka_env = compose["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_the_services_are_exactly_the_registry() -> None:
    """No entry for a service that does not exist, none missing (deploy/services.py is the list)."""
    assert set(services()) - INFRA == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert services()[name]["command"] == ["python", "-m", spec.module], name


def test_every_python_entry_runs_a_module_that_exists() -> None:
    for name, service in services().items():
        command = service.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        path = ROOT.joinpath(*command[2].split("."))
        assert (path / "__main__.py").is_file() or path.with_suffix(".py").is_file(), f"{name}: {command[2]} missing"
        assert service.get("build") == "." and (ROOT / "Dockerfile").is_file()


def test_every_entry_has_a_healthcheck() -> None:
    for name, service in services().items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    for name, spec in REGISTRY.items():
        test = " ".join(services()[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{spec.port}/healthz" in test, name


def test_every_url_points_at_a_service_and_its_port() -> None:
    entries = services()
    for name, service in entries.items():
        for key, value in (service.get("environment") or {}).items():
            for host, port in re.findall(r"//(?:[^@/\s]*@)?([a-z][\w-]*):(\d+)", str(value)):
                if host == "127.0.0.1":
                    continue
                assert host in entries, f"{name}: {key} names {host}, which compose does not run"
                assert listen_port(host, entries[host]) == int(port), f"{name}: {key}: {host} listens elsewhere"
    gateway_env = entries[GATEWAY]["environment"]
    for spec in SERVICES:
        if spec.name != GATEWAY:
            assert gateway_env[f"GATEWAY_{spec.name.upper()}_URL"] == f"http://{spec.name}:{spec.port}"


def test_the_gateway_scales_behind_one_published_port() -> None:
    entries = services()
    gateway = entries[GATEWAY]
    # A fixed host port or container name would make `--scale gateway=3` fail on the second replica.
    assert "ports" not in gateway and "container_name" not in gateway
    assert not any("container_name" in s for s in entries.values())
    proxy = entries["gateway-proxy"]
    assert proxy["ports"] == ["127.0.0.1:${BILLING_HTTP_PORT:-8000}:8000"]
    conf_mount = next(v for v in proxy["volumes"] if v.endswith("/etc/nginx/conf.d/default.conf:ro"))
    conf = (ROOT / conf_mount.split(":", 1)[0]).read_text()
    assert "resolver 127.0.0.11" in conf  # re-resolved, so replicas started later are used too
    assert f"http://{GATEWAY}:{REGISTRY[GATEWAY].port}" in conf and "proxy_pass $gateway;" in conf
    published = [p.rsplit(":", 1)[0] for s in entries.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), "two entries publish the same host port"
    assert all(p.startswith("127.0.0.1:") for p in published), "published on loopback only"


def test_a_jwt_secret_is_required_not_defaulted() -> None:
    value = services()[GATEWAY]["environment"]["GATEWAY_JWT_SECRET"]
    assert value.startswith("${GATEWAY_JWT_SECRET:?"), value  # compose refuses to start without it
    assert services()[GATEWAY]["environment"]["GATEWAY_HOST"] == "0.0.0.0"  # so the gateway refuses too


def test_logs_are_json_in_containers() -> None:
    for name, spec in REGISTRY.items():
        assert services()[name]["environment"][f"{spec.env_prefix}LOG_JSON"] == "true", name


def test_images_are_pinned() -> None:
    for name, service in services().items():
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: {service['image']}"
    assert services()["stripe-mock"]["image"] == f"stripe/stripe-mock:{STRIPE_MOCK_VERSION}"
    assert services()["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def _connections_per_replica(name: str) -> int:
    """What one replica opens at most with the config.py defaults (see the postgres comment)."""
    from deploy.k8s.settings import settings_class

    settings = settings_class(REGISTRY[name])()
    pool = 2 * settings.db_pool_size  # pool_size + max_overflow (kit/db.py)
    relay = 5 if name in ("invoice", "payments", "subscriptions", "notifications") else 0  # pool 2+2, LISTEN
    extra = {"payments": 1 + getattr(settings, "webhook_intake_pool_size", 0), "notifications": 1}.get(name, 0)
    return pool + relay + extra


def test_postgres_max_connections_fits_one_of_everything_plus_three_gateways() -> None:
    command = services()["postgres"]["command"]
    max_connections = int(next(arg.split("=", 1)[1] for arg in command if arg.startswith("max_connections=")))
    one_of_each = sum(_connections_per_replica(name) for name in REGISTRY)
    needed = one_of_each + len(REGISTRY) + 4 + 2 * _connections_per_replica(GATEWAY) + 3
    assert one_of_each == 152  # the figure the comment in docker-compose.yml states
    assert max_connections >= needed + 20, (max_connections, needed)
    assert f"max_connections={max_connections}" in COMPOSE_TEXT


def test_databases_and_mounts_exist() -> None:
    created = set(re.findall(r"CREATE DATABASE (\w+);", (ROOT / "deploy/compose/init-databases.sql").read_text()))
    assert created == set(DATABASES)
    for name, service in services().items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if key.endswith("_DATABASE_URL"):
                assert value.rsplit("/", 1)[-1] in created, f"{name}: database of {key} is never created"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: mount {source} does not exist"
            else:
                assert source in load()["volumes"], f"{name}: volume {source} is not declared"


def _variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", text))


def test_env_example_lists_every_variable_compose_reads() -> None:
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    assert _variables(COMPOSE_TEXT) - listed == set()
    assert listed - _variables(COMPOSE_TEXT) == set(), "documented but never read"
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_TEXT))
    set_in_example = set(re.findall(r"^([A-Z][A-Z0-9_]+)=.+$", example, re.MULTILINE))
    assert required <= set_in_example, "`cp .env.example .env && docker compose up` must start"


@pytest.mark.parametrize("package", sorted(FONT_PACKAGES))
def test_the_image_has_the_pdf_fonts(package: str) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"apt-get install[^\n]*\b{re.escape(package)}\b", dockerfile), package


def test_the_build_context_leaves_out_run_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".run", ".git", ".env"} <= set(ignored)
