"""merge_documents: a wrapper that reads the same in two services but wraps two different models
stays two components (found by Schemathesis: `GET /api/payments` promised the invoice service's
`PaymentOut` items, because both services call their list body `Page_PaymentOut_`)."""

from __future__ import annotations

from typing import Any

from services.gateway.openapi import merge_documents
from services.gateway.routes import Route


def _service(path: str, payment_fields: list[str]) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "paths": {path: {"get": {"operationId": f"list{len(payment_fields)}", "responses": {"200": {
            "description": "ok",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Page_PaymentOut_"}}}}}}}},
        "components": {"schemas": {
            "PaymentOut": {"type": "object", "properties": {f: {"type": "string"} for f in payment_fields},
                           "required": payment_fields},
            "Page_PaymentOut_": {"type": "object", "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/PaymentOut"}}}},
        }},
    }


def _items_schema(doc: dict[str, Any], path: str) -> dict[str, Any]:
    schemas = doc["components"]["schemas"]
    page_ref = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    page = schemas[page_ref.rsplit("/", 1)[1]]
    return schemas[page["properties"]["items"]["items"]["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def test_same_wrapper_over_different_models_stays_apart() -> None:
    routes = [Route("/api/payments", "payments"), Route("/api/invoices", "invoice")]
    doc = merge_documents(
        {"openapi": "3.1.0", "paths": {}},
        {"payments": _service("/api/payments", ["id", "invoiceId"]),
         "invoice": _service("/api/invoices/{invoice_id}/payments", ["paymentId", "kind"])},
        routes,
    )
    assert set(_items_schema(doc, "/api/payments")["properties"]) == {"id", "invoiceId"}
    assert set(_items_schema(doc, "/api/invoices/{invoice_id}/payments")["properties"]) == {"paymentId", "kind"}
    assert {"PaymentOut", "InvoicePaymentOut", "Page_PaymentOut_", "InvoicePage_PaymentOut_"} <= set(
        doc["components"]["schemas"])


def test_identical_components_are_shared() -> None:
    routes = [Route("/api/payments", "payments"), Route("/api/invoices", "invoice")]
    same = ["id", "amount"]
    doc = merge_documents({"openapi": "3.1.0", "paths": {}},
                          {"payments": _service("/api/payments", same), "invoice": _service("/api/invoices", same)},
                          routes)
    assert not {"InvoicePaymentOut", "InvoicePage_PaymentOut_"} & set(doc["components"]["schemas"])
