"""A stand-in backend service for gateway tests: a real FastAPI app that echoes what it receives.

Steering headers (they pass through the gateway untouched):
  X-Test-Status: <code>   answer with that status
  X-Test-Block: <name>    wait until the test opens gate <name> (`upstream.gate(name).set()`)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

# Every byte value, so any re-encoding would show.
PDF_BYTES = b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n"


@dataclass
class Upstream:
    name: str
    known_clients: set[str] = field(default_factory=set)
    hits: list[dict[str, Any]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    entered: dict[str, asyncio.Event] = field(default_factory=dict)
    url: str = ""

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def arrived(self, name: str) -> asyncio.Event:
        return self.entered.setdefault(name, asyncio.Event())

    def hits_with(self, header: str, value: str) -> list[dict[str, Any]]:
        return [h for h in self.hits if h["headers"].get(header.lower()) == value]


def build_upstream_app(up: Upstream) -> FastAPI:
    app = FastAPI(title=f"{up.name} service")

    if up.name == "invoice":

        class Item(BaseModel):
            description: str
            quantity: str

        @app.get("/api/invoices/{invoice_id}/pdf")
        async def pdf(invoice_id: str) -> Response:
            return Response(
                PDF_BYTES,
                media_type="application/pdf",
                headers={"Content-Disposition": f'attachment; filename="{invoice_id}.pdf"'},
            )

        @app.get("/api/clients/{client_id}")
        async def get_client(client_id: str, request: Request) -> JSONResponse:
            up.hits.append(_describe(request, b""))
            if client_id in up.known_clients:
                return JSONResponse({"id": client_id, "name": f"Client {client_id}"})
            return JSONResponse({"error": {"code": "not_found", "message": "no client", "details": None}}, 404)

        @app.post("/api/invoices/{invoice_id}/send", response_model=Item, summary="Send an invoice")
        async def send_invoice(invoice_id: str) -> Item:  # only here for the OpenAPI document
            return Item(description=invoice_id, quantity="1")

    else:

        class Item(BaseModel):  # type: ignore[no-redef]  # same name, other shape: must not clash
            amount: int
            method: str

        @app.get("/api/payments/{payment_id}", response_model=Item, summary="A payment")
        async def get_payment(payment_id: str) -> Item:
            return Item(amount=100, method=payment_id)

        @app.get("/api/clients/{client_id}/cards", summary="Not routed here by the gateway")
        async def cards(client_id: str) -> list[str]:
            return []

        @app.post("/webhooks/stripe", summary="Stripe webhook", include_in_schema=True)
        async def webhook(request: Request) -> JSONResponse:
            return await _echo(up, request)

    @app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def echo(request: Request, path: str) -> JSONResponse:
        return await _echo(up, request)

    return app


def _describe(request: Request, body: bytes) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return {
        "method": request.method,
        "path": request.url.path,
        "rawPath": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.url.query,
        "headers": headers,
        "bodySha256": hashlib.sha256(body).hexdigest(),
        "bodyBase64": base64.b64encode(body).decode(),
    }


async def _echo(up: Upstream, request: Request) -> JSONResponse:
    body = await request.body()
    hit = _describe(request, body)
    hit["service"] = up.name
    hit["seq"] = len(up.hits) + 1
    up.hits.append(hit)
    block = request.headers.get("x-test-block")
    if block:
        up.arrived(block).set()
        await up.gate(block).wait()
    default = 201 if request.method == "POST" else 200
    status = int(request.headers.get("x-test-status", default))
    return JSONResponse(hit, status_code=status, headers={"X-Upstream": up.name})
