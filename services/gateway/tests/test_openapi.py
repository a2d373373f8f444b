"""The merged OpenAPI document and the docs page."""

from __future__ import annotations

import httpx


async def test_merged_openapi(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    doc = response.json()
    paths = doc["paths"]
    # the gateway's own
    assert "post" in paths["/api/auth/login"] and "/api/users" in paths and "/api/auth/me" in paths
    assert paths["/api/auth/me"]["get"]["security"] == [{"bearerAuth": []}]
    # the upstreams', where the route table sends them
    send = paths["/api/invoices/{invoice_id}/send"]["post"]
    assert send["security"] == [{"bearerAuth": []}]
    assert any(p["name"] == "Idempotency-Key" for p in send["parameters"])
    assert "/api/invoices/{invoice_id}/pdf" in paths
    assert "/api/payments/{payment_id}" in paths
    assert paths["/webhooks/stripe"]["post"]["security"] == []
    assert "/api/clients/{client_id}/cards" not in paths  # the payments app serves it, but we route it to invoice
    assert "/api/clients/{client_id}" in paths
    # components
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    # both services call a schema "Item", with different shapes: one is renamed, refs follow
    schemas = doc["components"]["schemas"]

    def schema_of(operation: dict) -> dict:
        ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[-1]]  # type: ignore[no-any-return]

    assert set(schema_of(paths["/api/payments/{payment_id}"]["get"])["properties"]) == {"amount", "method"}
    assert set(schema_of(send)["properties"]) == {"description", "quantity"}
    assert "LoginRequest" in schemas and "Item" in schemas
    assert {"InvoiceItem", "PaymentsItem"} & set(schemas)
    # down upstreams are tolerated and named
    assert "subscriptions" in doc["x-unavailable-upstreams"] and "reporting" in doc["x-unavailable-upstreams"]


async def test_docs_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in response.text
