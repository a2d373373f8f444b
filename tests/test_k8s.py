"""deploy/k8s, checked offline (no cluster here): rendered by the real kustomize, every object
validated against a schema, then what the schemas cannot say.

- Built-in kinds: kubernetes-validate's bundled Kubernetes JSON schemas, strict (an unknown field is
  an error, as `kubectl apply --validate=strict` makes it), for Kubernetes MIN_KUBERNETES.
- Strimzi and CloudNativePG objects: the openAPIV3Schema of the operators' own CRDs (vendored in
  deploy/k8s/schemas/, see its README), made strict the same way (an object schema that lists its
  properties and keeps no unknown fields gets additionalProperties: false: the API server would
  silently prune a misspelt field, this test refuses it).
- Semantics: every service has its Deployment (probes, resources), HPA, PDB and migration Job; every
  setting of every config.py reaches the pods; every env reference resolves; only the gateway has an
  Ingress; Kafka topics, PostgreSQL databases and NetworkPolicies match the registry.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from contracts import topics
from deploy.install import ensure_kubernetes_validate, ensure_kustomize
from deploy.k8s import settings as k8s_settings
from deploy.services import GATEWAY, SERVICES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
MIN_KUBERNETES = "1.33.0"
Obj = dict[str, Any]


def _render(path: Path) -> list[Obj]:
    kustomize = ensure_kustomize()
    proc = subprocess.run([str(kustomize), "build", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def local() -> list[Obj]:
    return _render(K8S / "overlays" / "local")


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return _render(K8S / "base")


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schemas() -> dict[tuple[str, str], Any]:
    found = {}
    for path in SCHEMAS.glob("*.json"):
        doc = json.loads(path.read_text())
        found[(doc["apiVersion"], doc["kind"])] = _strict(doc["schema"])
    return found


def schema_errors(objs: list[Obj]) -> list[str]:
    kubernetes_validate = ensure_kubernetes_validate()  # make install's; installed here when missing
    crds = crd_schemas()
    errors = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        key = (obj["apiVersion"], obj["kind"])
        if key in crds:
            errors += [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message[:300]}"
                       for e in jsonschema.Draft7Validator(crds[key]).iter_errors(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, MIN_KUBERNETES, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema for {obj['apiVersion']} {obj['kind']} (not Kubernetes, no vendored CRD)")
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0][:300]}")
    return errors


@pytest.mark.parametrize("overlay", ["base", "local"])
def test_every_object_passes_its_schema(overlay: str, request: pytest.FixtureRequest) -> None:
    objs = request.getfixturevalue(overlay)
    assert len(objs) > 40
    assert schema_errors(objs) == []


def test_the_validation_catches_mistakes(local: list[Obj]) -> None:
    """The checks above can fail: a misspelt field in a built-in kind and in each operator's CRD."""
    bad_probe = copy.deepcopy(by_kind(local, "Deployment")["invoice"])
    bad_probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    bad_topic = copy.deepcopy(by_kind(local, "KafkaTopic")["billing.invoice"])
    bad_topic["spec"]["partitionz"] = bad_topic["spec"].pop("partitions")
    bad_pooler = copy.deepcopy(by_kind(local, "Pooler")["billing-pg-pooler-rw"])
    bad_pooler["spec"]["pgbouncer"]["poolMode"] = "statement"
    assert len(schema_errors([bad_probe, bad_topic, bad_pooler])) == 3


def test_settings_env_is_generated_from_the_config_classes() -> None:
    assert (K8S / "base" / "settings.env").read_text() == k8s_settings.render_settings_env(), (
        "run `.venv/bin/python -m deploy.k8s.settings --write`")


def _containers(obj: Obj) -> list[Obj]:
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "Job")]


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_service_has_its_deployment_hpa_pdb_and_migration_job(local: list[Obj], base: list[Obj]) -> None:
    for objs in (base, local):
        deployments, hpas = by_kind(objs, "Deployment"), by_kind(objs, "HorizontalPodAutoscaler")
        pdbs, jobs, services = by_kind(objs, "PodDisruptionBudget"), by_kind(objs, "Job"), by_kind(objs, "Service")
        ours = {n for n, d in deployments.items()
                if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "service"}
        assert ours == {spec.name for spec in SERVICES}
        for spec in SERVICES:
            deployment = deployments[spec.name]
            app = deployment["spec"]["template"]["spec"]["containers"][0]
            assert app["command"] == ["python", "-m", spec.module]
            assert app["ports"][0]["containerPort"] == spec.port
            assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert services[spec.name]["spec"]["ports"][0]["port"] == spec.port
            hpa = hpas[spec.name]
            assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name}
            assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
            pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert _labels_match(pdbs[spec.name]["spec"]["selector"]["matchLabels"], pod_labels)
            job = jobs[f"migrate-{spec.name}"]
            assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
                "python", "-m", "deploy.k8s.migrate", spec.name]
            waits = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
            assert waits[:5] == ["python", "-m", "deploy.k8s.migrate", spec.name, "--wait"]


def test_every_container_has_probes_and_resources(local: list[Obj]) -> None:
    for obj in _workloads(local):
        for container in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"
        if obj["kind"] == "Deployment":
            app = obj["spec"]["template"]["spec"]["containers"][0]
            assert "readinessProbe" in app and "livenessProbe" in app, obj["metadata"]["name"]


def test_every_setting_reaches_the_pods(local: list[Obj]) -> None:
    named = {o["kind"] + "/" + o["metadata"]["name"].rsplit("-", 1)[0]: o for o in local}
    configmap = named["ConfigMap/billing-config"]
    secret = named["Secret/billing-secrets"]
    deployments = by_kind(local, "Deployment")
    missing = []
    for env, setting in k8s_settings.catalogue().items():
        if setting.database_url:
            owner = next(s for s in SERVICES if env == f"{s.env_prefix}DATABASE_URL")
            names = {e["name"] for e in deployments[owner.name]["spec"]["template"]["spec"]["containers"][0]["env"]}
            if env not in names:
                missing.append(f"{env} (in the {owner.name} Deployment)")
        elif setting.secret:
            if env not in secret["data"]:
                missing.append(f"{env} (Secret)")
        elif env not in configmap["data"]:
            missing.append(f"{env} (ConfigMap)")
    assert missing == []
    # Migrations are the Jobs' work, never a replica's at start.
    for spec in SERVICES:
        assert configmap["data"][f"{spec.env_prefix}MIGRATE_ON_START"] == "false"
        assert configmap["data"][f"{spec.env_prefix}LOG_JSON"] == "true"


def test_every_env_reference_resolves(local: list[Obj]) -> None:
    data = {(o["kind"], o["metadata"]["name"]): set(o.get("data", {})) for o in local
            if o["kind"] in ("ConfigMap", "Secret")}
    problems = []
    for obj in _workloads(local):
        for container in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            defined: set[str] = set()
            for source in container.get("envFrom", []):
                kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else (
                    "Secret", source["secretRef"])
                if (kind, ref["name"]) not in data:
                    problems.append(f"{where}: envFrom {kind} {ref['name']} does not exist")
                defined |= data.get((kind, ref["name"]), set())
            for var in container.get("env", []):
                for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    ref = var.get("valueFrom", {}).get(ref_kind)
                    if ref and ref["key"] not in data.get((kind, ref["name"]), set()):
                        problems.append(f"{where}: {var['name']} refers to {kind} {ref['name']} key {ref['key']}")
                for used in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                    if used not in defined:
                        problems.append(f"{where}: {var['name']} uses $({used}), not defined before it")
                defined.add(var["name"])
            for arg in [*container.get("command", []), *container.get("args", [])]:
                problems += [f"{where}: argument uses $({used}), not defined"
                             for used in re.findall(r"\$\((\w+)\)", arg) if used not in defined]
    assert problems == []


def test_only_the_gateway_is_exposed(local: list[Obj], base: list[Obj]) -> None:
    for objs in (base, local):
        ingresses = by_kind(objs, "Ingress")
        assert list(ingresses) == [GATEWAY]
        backends = {path["backend"]["service"]["name"] for rule in ingresses[GATEWAY]["spec"]["rules"]
                    for path in rule["http"]["paths"]}
        assert backends == {GATEWAY}
        for name, service in by_kind(objs, "Service").items():
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name


def test_network_policies_fence_every_pod(local: list[Obj]) -> None:
    policies = list(by_kind(local, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "a default deny of all ingress"

    def callers(labels: dict[str, str]) -> list[Obj]:
        return [peer for p in policies if _labels_match(p["spec"]["podSelector"].get("matchLabels", {}), labels)
                and p["spec"]["podSelector"] for rule in p["spec"].get("ingress", []) for peer in rule["from"]]

    deployments = by_kind(local, "Deployment")
    gateway_peers = callers(deployments[GATEWAY]["spec"]["template"]["metadata"]["labels"])
    assert gateway_peers and all("namespaceSelector" in peer for peer in gateway_peers), "gateway: ingress only"
    for spec in SERVICES:
        if spec.name == GATEWAY:
            continue
        peers = callers(deployments[spec.name]["spec"]["template"]["metadata"]["labels"])
        names = {peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") for peer in peers
                 if "podSelector" in peer}
        assert GATEWAY in names, spec.name
        outside = [peer for peer in peers if "podSelector" not in peer]
        assert all(peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                   for peer in outside), f"{spec.name}: only pods inside, or Prometheus"
    kafka = by_kind(local, "Kafka")["billing-kafka"]
    assert all(listener.get("networkPolicyPeers") for listener in kafka["spec"]["kafka"]["listeners"])


def test_kafka_topics_match_contracts_and_bound_the_consumers(base: list[Obj]) -> None:
    kafka_topics = {t["spec"]["topicName"]: t for t in by_kind(base, "KafkaTopic").values()}
    assert set(kafka_topics) == set(topics.ALL)
    for name, topic in kafka_topics.items():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "billing-kafka"
        assert topic["spec"]["replicas"] == 3, name
        assert topic["spec"]["config"]["min.insync.replicas"] == 2, name
    consumed = [t for t in topics.ALL if t != topics.DEADLETTER]
    hpas = by_kind(base, "HorizontalPodAutoscaler")
    for name, deployment in by_kind(base, "Deployment").items():
        if deployment["spec"]["template"]["metadata"]["labels"].get("billing.example.com/kafka-client") == "true":
            ceiling = min(kafka_topics[t]["spec"]["partitions"] for t in consumed)
            assert hpas[name]["spec"]["maxReplicas"] <= ceiling, name
    kafka = by_kind(base, "Kafka")["billing-kafka"]["spec"]["kafka"]["config"]
    assert kafka["min.insync.replicas"] == 2 and kafka["default.replication.factor"] == 3
    assert sum(pool["spec"]["replicas"] for pool in by_kind(base, "KafkaNodePool").values()) >= 3


def test_postgres_has_a_database_and_role_per_service(local: list[Obj]) -> None:
    cluster = by_kind(local, "Cluster")["billing-pg"]
    roles = {role["name"]: role for role in cluster["spec"]["managed"]["roles"]}
    databases = {d["spec"]["name"]: d for d in by_kind(local, "Database").values()}
    secrets = by_kind(local, "Secret")
    for spec in SERVICES:
        assert databases[spec.database_name]["spec"]["owner"] == spec.name
        assert databases[spec.database_name]["spec"]["cluster"]["name"] == "billing-pg"
        secret = secrets[roles[spec.name]["passwordSecret"]["name"]]
        assert secret["type"] == "kubernetes.io/basic-auth" and {"username", "password"} <= set(secret["data"])
    pooler = by_kind(local, "Pooler")["billing-pg-pooler-rw"]
    assert pooler["spec"]["cluster"]["name"] == "billing-pg" and pooler["spec"]["type"] == "rw"
    # LISTEN/NOTIFY, session advisory locks and prepared statements need session pooling.
    assert pooler["spec"]["pgbouncer"]["poolMode"] == "session"
    for spec in SERVICES:
        app = by_kind(local, "Deployment")[spec.name]["spec"]["template"]["spec"]["containers"][0]
        url = next(e["value"] for e in app["env"] if e["name"] == f"{spec.env_prefix}DATABASE_URL")
        assert f"@{pooler['metadata']['name']}:5432/{spec.database_name}" in url, url


def test_migrate_answers_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "deploy.k8s.migrate", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "--wait" in proc.stdout


def _migrate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_DATABASE_URL": database_url,
           "GATEWAY_HOST": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "deploy.k8s.migrate", "gateway", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=180)


def test_the_migration_job_migrates_and_the_init_container_waits_for_it(database_url_factory: Any) -> None:
    url = database_url_factory("k8s_migrate")
    waited = _migrate(url, "--wait", "--timeout", "0")
    assert waited.returncode == 1 and "waiting for the migration Job" in waited.stdout, waited.stdout + waited.stderr
    migrated = _migrate(url)
    assert migrated.returncode == 0 and "migrated to head" in migrated.stdout, migrated.stderr
    assert _migrate(url).returncode == 0  # a Job re-run is harmless
    waited = _migrate(url, "--wait", "--timeout", "0")
    assert waited.returncode == 0 and "database at head" in waited.stdout, waited.stdout + waited.stderr


def test_vendored_crd_schemas_say_where_they_come_from() -> None:
    kinds: Iterator[tuple[str, str]] = iter(crd_schemas())
    assert {kind for _, kind in kinds} == {"Kafka", "KafkaNodePool", "KafkaTopic", "Cluster", "Pooler", "Database"}
    for path in SCHEMAS.glob("*.json"):
        assert re.match(r"^\S+/\S+ \S+ \S+\.yaml$", json.loads(path.read_text())["source"]), path
