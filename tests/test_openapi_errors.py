"""The gateway's merged OpenAPI document lists the 4xx statuses each operation can answer, with the
one error body as a named component (issue 12, defect 9), from the real services' documents."""

from __future__ import annotations

from typing import Any

import httpx

from deploy.infra import ServiceProcess
from deploy.services import GATEWAY

ERROR_REF = "#/components/schemas/ErrorResponse"
METHODS = ("get", "put", "post", "delete", "patch")


async def _document(stack: dict[str, ServiceProcess]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack[GATEWAY].url, timeout=30) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    assert "x-unavailable-upstreams" not in doc, doc["x-unavailable-upstreams"]
    return doc


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = doc["components"][kind][name]
    return node


def _error_statuses(doc: dict[str, Any], op: dict[str, Any]) -> set[str]:
    """The 4xx/5xx statuses of `op` whose JSON body is the ErrorResponse component."""
    found = set()
    for status, response in op["responses"].items():
        body = _resolve(doc, response).get("content", {}).get("application/json", {}).get("schema", {})
        if status[0] in "45" and body.get("$ref") == ERROR_REF:
            found.add(status)
    return found


async def test_error_schema_is_a_named_component(stack: dict[str, ServiceProcess]) -> None:
    doc = await _document(stack)
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    detail = _resolve(doc, error["properties"]["error"])
    assert set(detail["properties"]) == {"code", "message", "details"}
    assert {"code", "message"} <= set(detail["required"])
    # FastAPI's own 422 shape is nowhere: every service answers the shared error body.
    fastapi_shape = doc["components"]["schemas"].get("HTTPValidationError")
    assert fastapi_shape is None or fastapi_shape["properties"] == error["properties"]


async def test_every_operation_lists_its_4xx_with_the_error_schema(stack: dict[str, ServiceProcess]) -> None:
    doc = await _document(stack)
    operations = [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items() if m in METHODS]
    assert len(operations) > 50
    missing = []
    for method, path, op in operations:
        statuses = _error_statuses(doc, op)
        expected = {"400", "422"}
        if op.get("security"):
            expected |= {"401", "403"}
        if "{" in path:
            expected.add("404")
        if method in ("post", "put", "patch"):
            expected.add("413")
        if not path.startswith(("/api/auth/", "/api/users", "/api/audit")):  # the gateway's own
            expected |= {"502", "503", "504"}  # proxied to a service
        if not expected <= statuses:
            missing.append((method.upper(), path, sorted(expected - statuses)))
        # Any status an operation declares as an error carries the error body.
        for status, response in op["responses"].items():
            if status[0] in "45":
                assert status in statuses, (method, path, status, response)
    assert not missing, missing


async def test_specific_statuses(stack: dict[str, ServiceProcess]) -> None:
    doc = await _document(stack)
    mark_paid = doc["paths"]["/api/invoices/{invoice_id}/mark-paid"]["post"]
    assert {"401", "403", "404", "409", "422"} <= _error_statuses(doc, mark_paid)
    put_invoice = doc["paths"]["/api/invoices/{invoice_id}"]["put"]
    assert {"404", "409", "422"} <= _error_statuses(doc, put_invoice)  # only drafts are editable
    login = doc["paths"]["/api/auth/login"]["post"]
    assert {"401", "422", "429"} <= _error_statuses(doc, login)
    assert "Retry-After" in _resolve(doc, login["responses"]["429"])["headers"]
    assert "401" not in _error_statuses(doc, doc["paths"]["/webhooks/stripe"]["post"])  # public, signed by Stripe
    listing = doc["paths"]["/api/invoices"]["get"]
    assert "unknown query parameter" in _resolve(doc, listing["responses"]["400"])["description"]
