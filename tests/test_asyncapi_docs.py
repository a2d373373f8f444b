"""docs/asyncapi/<service>.json stays what `make asyncapi` would write today.

Every `services/*/consumers.py` that defines `asyncapi_app` (the Makefile's rule, so a new service is
covered without touching this test) is generated in process the way
`faststream docs gen services.<name>.consumers:asyncapi_app --factory` does it (FastStream 0.7.8:
call the factory, then `app.schema.to_specification().to_jsonable()`), and compared with the
committed document.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "asyncapi"
SERVICES = sorted(
    path.parent.name
    for path in ROOT.glob("services/*/consumers.py")
    if "def asyncapi_app" in path.read_text(encoding="utf-8")
)


def generate(service: str) -> Any:
    factory = importlib.import_module(f"services.{service}.consumers").asyncapi_app
    return factory().schema.to_specification().to_jsonable()


def test_some_service_has_a_document() -> None:
    assert SERVICES, "no services/*/consumers.py defines asyncapi_app"


@pytest.mark.parametrize("service", SERVICES)
def test_committed_asyncapi_document_is_up_to_date(service: str) -> None:
    path = DOCS / f"{service}.json"
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run `make asyncapi` and commit it"
    committed = json.loads(path.read_text(encoding="utf-8"))
    assert generate(service) == committed, (
        f"{path.relative_to(ROOT)} is out of date with services/{service}/consumers.py: "
        "run `make asyncapi` and commit the result"
    )


def test_no_document_without_a_service() -> None:
    stale = sorted(p.name for p in DOCS.glob("*.json") if p.stem not in SERVICES)
    assert not stale, f"docs/asyncapi/{stale} belong to no services/*/consumers.py with asyncapi_app: delete them"
