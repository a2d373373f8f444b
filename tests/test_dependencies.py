"""pyproject.toml declares what the code imports, and imports what it declares.

* Every third-party top-level import of the runtime code (kit/, contracts/, services/, tests excluded)
  comes from a declared runtime dependency (importlib.metadata.packages_distributions() says which
  distribution provides an import name).
* Every runtime dependency is imported somewhere in that code, or listed in USED_WITHOUT_IMPORT with
  the reason.
* Tests, bench/ and deploy/ may also use the `dev` and `local` extras, and nothing else.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIRS = ("kit", "contracts", "services")
DEV_DIRS = ("tests", "bench", "deploy")
FIRST_PARTY = {"kit", "contracts", "services", "deploy", "bench", "tests", "conftest"}
# Runtime dependencies that work without being imported by our code.
USED_WITHOUT_IMPORT = {
    "python-multipart": "FastAPI parses multipart uploads (the template logo) with it",
    "rl-accel": "reportlab's C accelerator (_rl_accel), which reportlab loads itself",
    "sniffio": "httpcore looks it up on every call and retries a failed import each time (5.8% of the gateway)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
        assert match, f"cannot read requirement {requirement!r}"
        names.add(canonical(match.group(0)))
    return names


@cache
def project() -> dict[str, set[str]]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = meta.get("optional-dependencies", {})
    return {
        "runtime": requirement_names(meta["dependencies"]),
        **{name: requirement_names(reqs) for name, reqs in extras.items()},
    }


def is_test_file(path: Path) -> bool:
    return "tests" in path.relative_to(ROOT).parts or path.name.startswith("test_") or path.name == "conftest.py"


def python_files(*dirs: str) -> list[Path]:
    return [path for d in dirs for path in sorted((ROOT / d).rglob("*.py"))]


@cache
def third_party_imports(paths: tuple[Path, ...]) -> dict[str, set[str]]:
    """Top-level import name -> files importing it (imports inside functions included)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def runtime_files() -> tuple[Path, ...]:
    return tuple(path for path in python_files(*RUNTIME_DIRS) if not is_test_file(path))


def dev_files() -> tuple[Path, ...]:
    tests = [path for path in python_files(*RUNTIME_DIRS) if is_test_file(path)]
    return (*python_files(*DEV_DIRS), *tests, ROOT / "conftest.py")


def undeclared(imports: dict[str, set[str]], allowed: set[str]) -> list[str]:
    providers = packages_distributions()
    problems = []
    for name, files in sorted(imports.items()):
        dists = {canonical(d) for d in providers.get(name, [])}
        if not dists:
            problems.append(f"{name} (imported by {sorted(files)[0]}) is not installed at all")
        elif not dists & allowed:
            problems.append(f"{name} (distribution {'/'.join(sorted(dists))}, imported by {sorted(files)[0]})")
    return problems


def test_runtime_imports_are_declared_runtime_dependencies() -> None:
    problems = undeclared(third_party_imports(runtime_files()), project()["runtime"])
    assert not problems, "imported by the runtime code but not in [project] dependencies:\n  " + "\n  ".join(problems)


def test_every_runtime_dependency_is_imported() -> None:
    imported = set(third_party_imports(runtime_files()))
    providers = packages_distributions()
    imported_dists = {canonical(d) for name in imported for d in providers.get(name, [])}
    unused = sorted(project()["runtime"] - imported_dists - set(USED_WITHOUT_IMPORT))
    assert not unused, (
        f"runtime dependencies nothing in {', '.join(RUNTIME_DIRS)} imports: {unused}; remove them, move them to "
        "an extra, or say in USED_WITHOUT_IMPORT why they are needed"
    )


def test_unused_exceptions_are_still_dependencies() -> None:
    assert set(USED_WITHOUT_IMPORT) <= project()["runtime"]


def test_dev_code_uses_only_declared_dependencies() -> None:
    groups = project()
    allowed = groups["runtime"] | groups.get("dev", set()) | groups.get("local", set())
    problems = undeclared(third_party_imports(dev_files()), allowed)
    assert not problems, "imported by tests, bench/ or deploy/ but declared nowhere:\n  " + "\n  ".join(problems)


def test_local_stack_dependencies_stay_out_of_the_services() -> None:
    local_only = project().get("local", set()) - project()["runtime"]
    providers = packages_distributions()
    leaks = [
        f"{name} ({sorted(files)[0]})"
        for name, files in third_party_imports(runtime_files()).items()
        if {canonical(d) for d in providers.get(name, [])} & local_only
    ]
    assert not leaks, f"runtime code imports the local-stack extra: {leaks}"
