"""docker-compose.yml cannot run here (no Docker engine): check it parses and points at real things."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deploy.services import SERVICES

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_parses_and_has_the_infrastructure() -> None:
    compose = load()
    assert {"kafka", "postgres", "stripe-mock", "mailsink", "gateway", "invoice"} <= set(compose["services"])
    kafka_env = compose["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_every_python_service_runs_a_module_that_exists() -> None:
    compose = load()
    registry = {spec.module for spec in SERVICES}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        module = command[2]
        path = ROOT.joinpath(*module.split("."))
        assert (path / "__main__.py").is_file() or path.with_suffix(".py").is_file(), f"{name}: {module} missing"
        if module.startswith("services."):
            assert module in registry, f"{name}: {module} is not in deploy/services.py"
        if service.get("build"):
            assert (ROOT / "Dockerfile").is_file()


def test_databases_and_mounts_exist() -> None:
    compose = load()
    created = set(re.findall(r"CREATE DATABASE (\w+);", (ROOT / "deploy/compose/init-databases.sql").read_text()))
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if key.endswith("_DATABASE_URL"):
                assert value.rsplit("/", 1)[-1] in created, f"{name}: database of {key} is never created"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: mount {source} does not exist"
