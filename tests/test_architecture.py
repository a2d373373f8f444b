"""Services never import each other: each runs as its own process and talks to the others over HTTP
and Kafka only (DESIGN.md, "Layout"). The shared words live in contracts/, the shared machinery in
kit/, and neither of those depends on any service.

Every .py file is parsed with `ast` (nothing is imported or run): under services/<name>/ (tests
folders included; the gateway is a service like the others) no import may name
`services.<other>`; under kit/ and contracts/ no import may name `services` at all. Imports are
`import x.y`, `from x.y import z`, `from x import y` (y may be a module), relative imports resolved
against the file's package, and `importlib.import_module("x.y")` / `__import__("x.y")` with a
literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
SHARED = ("kit", "contracts")
SKIPPED_DIRS = {"__pycache__", ".venv", ".run", "node_modules"}

# Imports of a service that exist today and are not the service code's to fix, each with why and
# who fixes it. The test fails as soon as an entry is no longer needed, so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def service_names() -> list[str]:
    return sorted(p.name for p in SERVICES.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def python_files(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*.py")):
        if not SKIPPED_DIRS & set(path.relative_to(ROOT).parts):
            yield path


def package_of(path: Path, root: Path) -> list[str]:
    """The dotted package a file's relative imports start from."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py, its own package (the "__init__" dropped)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(path, root)
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from services import invoice` imports the module services.invoice
                if alias.name != "*":
                    yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _names_service(module: str) -> str | None:
    """The service a dotted module belongs to (`services.invoice.money` → `invoice`), else None."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "services" else None


@cache
def violations() -> tuple[tuple[str, int, str], ...]:
    """(file, line, module) of every forbidden import in the tree."""
    names = set(service_names())
    found: list[tuple[str, int, str]] = []
    for name in sorted(names):
        for path in python_files(SERVICES / name):
            for line, module in imported_modules(path):
                other = _names_service(module)
                if other is not None and other != name and other in names:
                    found.append((str(path.relative_to(ROOT)), line, module))
    for top in SHARED:
        for path in python_files(ROOT / top):
            for line, module in imported_modules(path):
                if module == "services" or module.startswith("services."):
                    found.append((str(path.relative_to(ROOT)), line, module))
    # `from services.x import y` names services.x and services.x.y: one line, one finding (the first)
    first = {(file, line): module for file, line, module in reversed(found)}
    return tuple((file, line, module) for (file, line), module in sorted(first.items()))


def test_there_are_services_to_check() -> None:
    assert {"gateway", "invoice", "payments", "notifications", "reporting", "subscriptions"} <= set(service_names())
    assert all(any(python_files(SERVICES / name)) for name in service_names())


def test_no_service_imports_another_and_kit_and_contracts_import_no_service() -> None:
    unexpected = [f"{file}:{line} imports {module}" for file, line, module in violations()
                  if (file, module) not in KNOWN]
    assert not unexpected, "services talk over HTTP and Kafka, never by import:\n" + "\n".join(unexpected)


def test_every_known_exception_is_still_needed() -> None:
    present = {(file, module) for file, _, module in violations()}
    stale = [f"{file} imports {module}" for file, module in KNOWN if (file, module) not in present]
    assert not stale, "fixed: remove from KNOWN:\n" + "\n".join(stale)


@pytest.mark.parametrize(
    ("source", "where", "expected"),
    [
        ("import services.invoice.money", "services/gateway/admin/x.py", ["services.invoice.money"]),
        ("from services.invoice.money import compute_totals", "services/gateway/admin/x.py",
         ["services.invoice.money", "services.invoice.money.compute_totals"]),
        ("from services import invoice", "services/gateway/x.py", ["services", "services.invoice"]),
        ("from ...invoice import money", "services/gateway/admin/x.py", ["services.invoice", "services.invoice.money"]),
        ("from . import web", "services/gateway/admin/__init__.py",
         ["services.gateway.admin", "services.gateway.admin.web"]),
        ("import importlib\nimportlib.import_module('services.payments.app')", "services/gateway/x.py",
         ["importlib", "services.payments.app"]),
        ("__import__('services.reporting')", "kit/x.py", ["services.reporting"]),
    ],
)
def test_every_form_of_import_is_seen(tmp_path: Path, source: str, where: str, expected: list[str]) -> None:
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(source, encoding="utf-8")
    assert [module for _, module in imported_modules(path, tmp_path)] == expected
