"""Check objects against stripe-mock's OpenAPI spec (``embedded/openapi/spec3.json``).

Used by the tests (and handy by hand: ``python -m deploy.stripe_standin.spec``) so the objects the
stand-in returns have Stripe's shape: every required field present, no field the API does not have,
types, nullability and enums as specified, nested objects and lists checked recursively.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

STRIPE_MOCK_MODULE_DIR = "github.com/stripe/stripe-mock@"


def _gomodcache() -> Path:
    env = os.environ.get("GOMODCACHE")
    if env:
        return Path(env)
    go = shutil.which("go")
    if go is not None:
        try:
            out = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return Path.home() / "go" / "pkg" / "mod"


def find_spec(version: str | None = None) -> Path | None:
    """The stripe-mock spec3.json in the Go module cache (the given version, else the newest)."""
    base = _gomodcache() / "github.com" / "stripe"
    pattern = f"stripe-mock@{version}" if version else "stripe-mock@*"
    candidates = sorted(base.glob(f"{pattern}/embedded/openapi/spec3.json"))
    return candidates[-1] if candidates else None


class SpecValidator:
    def __init__(self, spec_path: Path) -> None:
        self.spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
        self.schemas: dict[str, Any] = self.spec["components"]["schemas"]

    @property
    def version(self) -> str:
        return str(self.spec["info"]["version"])

    def unknown_params(self, method: str, path: str, params: dict[str, Any]) -> list[str]:
        """Top-level request parameters the operation does not have (Stripe: "Received unknown parameter")."""
        templates = sorted(self.spec["paths"].items(), key=lambda kv: kv[0].count("{"))
        for template, operations in templates:
            pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
            if not re.match(pattern, path):
                continue
            operation = operations.get(method.lower())
            if operation is None:
                return []
            known = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
            body = operation.get("requestBody", {}).get("content", {}).get("application/x-www-form-urlencoded", {})
            known |= set(self._resolve(body.get("schema", {})).get("properties", {}))
            return sorted(k for k in params if k not in known)
        return []

    def errors(self, obj: Any, schema: str) -> list[str]:
        """Everything in ``obj`` that does not match component ``schema`` (empty list: valid)."""
        problems: list[str] = []
        self._check(obj, {"$ref": f"#/components/schemas/{schema}"}, schema, problems, 0)
        return problems

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = self.schemas[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def _check(self, value: Any, node: dict[str, Any], path: str, problems: list[str], depth: int) -> None:
        if depth > 40:
            return
        nullable = bool(node.get("nullable"))
        if "anyOf" in node:
            if value is None and nullable:
                return
            best: list[str] | None = None
            for option in node["anyOf"]:
                attempt: list[str] = []
                self._check(value, option, path, attempt, depth + 1)
                if not attempt:
                    return
                if best is None or len(attempt) < len(best):
                    best = attempt
            problems.extend(best or [f"{path}: matches no alternative"])
            return
        node = self._resolve(node)
        if value is None:
            if not (nullable or node.get("nullable")):
                problems.append(f"{path}: null but not nullable")
            return
        kind = node.get("type")
        if "enum" in node and not node.get("x-stripeBypassValidation") and value not in node["enum"]:
            problems.append(f"{path}: {value!r} not in {node['enum']}")
        if kind == "string":
            if not isinstance(value, str):
                problems.append(f"{path}: expected string, got {type(value).__name__}")
        elif kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{path}: expected integer, got {value!r}")
        elif kind == "number":
            if not isinstance(value, int | float) or isinstance(value, bool):
                problems.append(f"{path}: expected number, got {value!r}")
        elif kind == "boolean":
            if not isinstance(value, bool):
                problems.append(f"{path}: expected boolean, got {value!r}")
        elif kind == "array":
            if not isinstance(value, list):
                problems.append(f"{path}: expected array, got {type(value).__name__}")
                return
            for index, item in enumerate(value):
                self._check(item, node.get("items", {}), f"{path}[{index}]", problems, depth + 1)
        elif kind == "object" or "properties" in node:
            if not isinstance(value, dict):
                problems.append(f"{path}: expected object, got {type(value).__name__}")
                return
            props: dict[str, Any] = node.get("properties", {})
            for key in node.get("required", []):
                if key not in value:
                    problems.append(f"{path}.{key}: required field missing")
            extra = node.get("additionalProperties")
            for key, item in value.items():
                if key in props:
                    self._check(item, props[key], f"{path}.{key}", problems, depth + 1)
                elif isinstance(extra, dict):
                    self._check(item, extra, f"{path}.{key}", problems, depth + 1)
                elif props and not extra:
                    problems.append(f"{path}.{key}: not a field of this object")


@functools.cache
def default_validator() -> SpecValidator | None:
    path = find_spec()
    return SpecValidator(path) if path else None


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    validator = default_validator()
    if validator is None:
        raise SystemExit("stripe-mock spec3.json not found in the Go module cache")
    document = json.load(sys.stdin)
    found = validator.errors(document, sys.argv[1] if len(sys.argv) > 1 else str(document.get("object")))
    print("\n".join(found) or "valid")
