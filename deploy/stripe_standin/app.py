"""HTTP layer: Stripe's API for the stateful objects, the hosted pages, the test knobs, and a
pass-through to stripe-mock for everything else.

Requests to the stateful endpoints are form-encoded like Stripe's (``a[b][c]=x``); they are first
validated by stripe-mock (unknown or malformed parameters come back as stripe-mock's 400, so a typo
fails here as it would on Stripe), then answered from the stand-in's own state. State changes run
under one asyncio lock, atomically: an error rolls the change back and no event leaves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from deploy.stripe_standin import API_VERSION, pages
from deploy.stripe_standin.engine import CARD_OUTCOMES, Engine, Obj
from deploy.stripe_standin.errors import StripeError
from deploy.stripe_standin.forms import parse_form, parse_pairs
from deploy.stripe_standin.spec import default_validator
from deploy.stripe_standin.state import State, load_json, new_id, save_json
from deploy.stripe_standin.webhooks import Deliverer, DeliveryConfig

log = logging.getLogger("stripe_standin")

Handler = Callable[[Engine, Obj, tuple[str, ...]], Obj]
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding",
               "proxy-authorization", "te", "upgrade"}
IDEMPOTENCY_TTL = 24 * 3600
MAX_IDEMPOTENCY_KEYS = 5000


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 12112
    stripe_mock_url: str = "http://127.0.0.1:12111"
    webhook_urls: list[str] = field(default_factory=list)
    webhook_secret: str = "whsec_local"
    public_url: str | None = None
    state_file: Path | None = None
    retry_for_seconds: float = 900.0
    validate_with_mock: bool = True
    tick_interval: float = 1.0

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


# -- route table -------------------------------------------------------------------------------------
ID = r"([^/]+)"
RESERVED_IDS = {"search"}  # /v1/customers/search etc. go to stripe-mock


def _route(method: str, pattern: str, handler: Handler, mutates: bool | None = None) -> tuple[str, re.Pattern[str],
                                                                                              Handler, bool]:
    return method, re.compile(f"^{pattern}$"), handler, method != "GET" if mutates is None else mutates


ROUTES = [
    _route("POST", "/v1/products", lambda e, p, a: e.create_product(p)),
    _route("GET", "/v1/products", lambda e, p, a: e.list_products(p)),
    _route("GET", f"/v1/products/{ID}", lambda e, p, a: e.get("product", a[0])),
    _route("POST", f"/v1/products/{ID}", lambda e, p, a: e.update_product(a[0], p)),
    _route("DELETE", f"/v1/products/{ID}", lambda e, p, a: e.delete_product(a[0])),
    _route("POST", "/v1/prices", lambda e, p, a: e.create_price(p)),
    _route("GET", "/v1/prices", lambda e, p, a: e.list_prices(p)),
    _route("GET", f"/v1/prices/{ID}", lambda e, p, a: e.get("price", a[0])),
    _route("POST", f"/v1/prices/{ID}", lambda e, p, a: e.update_price(a[0], p)),
    _route("POST", "/v1/customers", lambda e, p, a: e.create_customer(p)),
    _route("GET", "/v1/customers", lambda e, p, a: e.list_customers(p)),
    _route("GET", f"/v1/customers/{ID}", lambda e, p, a: e.retrieve_customer(a[0])),
    _route("POST", f"/v1/customers/{ID}", lambda e, p, a: e.update_customer(a[0], p)),
    _route("DELETE", f"/v1/customers/{ID}", lambda e, p, a: e.delete_customer(a[0])),
    _route("POST", "/v1/test_helpers/test_clocks", lambda e, p, a: e.create_test_clock(p)),
    _route("GET", "/v1/test_helpers/test_clocks", lambda e, p, a: e.list_test_clocks(p)),
    _route("GET", f"/v1/test_helpers/test_clocks/{ID}", lambda e, p, a: e.get("test_clock", a[0])),
    _route("DELETE", f"/v1/test_helpers/test_clocks/{ID}", lambda e, p, a: e.delete_test_clock(a[0])),
    _route("POST", f"/v1/test_helpers/test_clocks/{ID}/advance", lambda e, p, a: e.advance_test_clock(a[0], p)),
    _route("POST", "/v1/checkout/sessions", lambda e, p, a: e.create_checkout_session(p)),
    _route("GET", "/v1/checkout/sessions", lambda e, p, a: e.list_checkout_sessions(p)),
    _route("GET", f"/v1/checkout/sessions/{ID}", lambda e, p, a: e.checkout_session(a[0]), mutates=True),
    _route("GET", f"/v1/checkout/sessions/{ID}/line_items", lambda e, p, a: e.checkout_line_items(a[0], p)),
    _route("POST", f"/v1/checkout/sessions/{ID}/expire", lambda e, p, a: e.expire_checkout_session(a[0])),
    _route("POST", "/v1/subscriptions", lambda e, p, a: e.create_subscription(p)),
    _route("GET", "/v1/subscriptions", lambda e, p, a: e.list_subscriptions(p)),
    _route("GET", f"/v1/subscriptions/{ID}", lambda e, p, a: e.retrieve_subscription(a[0])),
    _route("POST", f"/v1/subscriptions/{ID}", lambda e, p, a: e.update_subscription(a[0], p)),
    _route("DELETE", f"/v1/subscriptions/{ID}", lambda e, p, a: e.cancel_subscription(a[0], p)),
    _route("POST", "/v1/invoices/create_preview", lambda e, p, a: e.create_preview(p), mutates=False),
    _route("GET", "/v1/invoices", lambda e, p, a: e.list_invoices(p)),
    _route("GET", f"/v1/invoices/{ID}", lambda e, p, a: e.retrieve_invoice(a[0])),
    _route("GET", f"/v1/invoices/{ID}/lines", lambda e, p, a: e.invoice_lines(a[0], p)),
    _route("POST", f"/v1/invoices/{ID}/pay", lambda e, p, a: e.pay_invoice(a[0], p)),
    _route("POST", f"/v1/invoices/{ID}/void", lambda e, p, a: e.void_invoice(a[0])),
    _route("POST", f"/v1/invoices/{ID}/mark_uncollectible", lambda e, p, a: e.mark_uncollectible(a[0])),
    _route("GET", "/v1/invoiceitems", lambda e, p, a: e.list_invoice_items(p)),
    _route("GET", f"/v1/invoiceitems/{ID}", lambda e, p, a: e.get("invoiceitem", a[0])),
    _route("POST", "/v1/billing_portal/sessions", lambda e, p, a: e.create_portal_session(p)),
    _route("POST", "/v1/billing_portal/configurations", lambda e, p, a: e.create_portal_configuration(p)),
    _route("GET", "/v1/billing_portal/configurations", lambda e, p, a: e.list_portal_configurations(p)),
    _route("GET", f"/v1/billing_portal/configurations/{ID}", lambda e, p, a: e.get("portal_configuration", a[0])),
    _route("POST", f"/v1/billing_portal/configurations/{ID}",
           lambda e, p, a: e.update_portal_configuration(a[0], p)),
    _route("GET", "/v1/events", lambda e, p, a: e.list_events(p)),
    _route("GET", f"/v1/events/{ID}", lambda e, p, a: e.retrieve_event(a[0])),
]
# Ours only when the id is one we issued; otherwise stripe-mock answers.
OWN_IF_KNOWN = [
    (re.compile(f"^/v1/payment_intents/{ID}$"), "payment_intent"),
]


def match_route(method: str, path: str, engine: Engine) -> tuple[Handler, tuple[str, ...], bool] | None:
    for route_method, pattern, handler, mutates in ROUTES:
        if route_method != method:
            continue
        m = pattern.match(path)
        if m and not any(group in RESERVED_IDS for group in m.groups()):
            return handler, m.groups(), mutates
    if method == "GET":
        for pattern, kind in OWN_IF_KNOWN:
            m = pattern.match(path)
            if m and m.group(1) in engine.s.bucket(kind):
                return (lambda e, p, a, kind=kind: e.get(kind, a[0])), m.groups(), False
    return None


def error_response(error: StripeError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={"Request-Id": new_id("req", 14)})


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if auth.lower().startswith("basic "):
        with contextlib.suppress(ValueError):
            return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
    return None


def check_key(request: Request) -> str:
    key = _api_key(request)
    if not key:
        raise StripeError("You did not provide an API key. You need to provide your API key in the Authorization "
                          "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').", status=401)
    if "_live_" in key:
        raise StripeError("The Stripe stand-in refuses live keys: use a test key (sk_test_...).", status=401)
    if not key.startswith(("sk_test_", "rk_test_")):
        raise StripeError(f"Invalid API Key provided: {key[:8]}{'*' * 8}", status=401)
    return key


class Standin:
    """The running stand-in: state, engine, deliverer, lock, and the link to stripe-mock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = State()
        self.idempotency: dict[str, Obj] = {}
        self.deliverer = Deliverer(settings.webhook_secret, DeliveryConfig(
            webhook_urls=list(settings.webhook_urls), retry_for_seconds=settings.retry_for_seconds))
        self.buffer: list[Obj] = []
        self.engine = Engine(self.state, public_url=settings.base_url, on_event=self.buffer.append)
        self.lock = asyncio.Lock()
        self.mock: httpx.AsyncClient | None = None
        self.dirty = False
        self._ticker: asyncio.Task[None] | None = None
        self._load()

    # -- persistence ------------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.settings.state_file
        if path is None:
            return
        data = load_json(path)
        if data is None:
            return
        self.state = State.from_json(data)
        self.engine.s = self.state
        self.idempotency = dict(data.get("idempotency", {}))
        knobs = data.get("config") or {}
        for key in ("duplicate_deliveries", "shuffle", "enabled_events"):
            if key in knobs:
                setattr(self.deliverer.config, key, knobs[key])
        self.deliverer.restore(data.get("pending_deliveries", []))
        log.info("state loaded from %s", path)

    def save(self) -> None:
        path = self.settings.state_file
        if path is None or not self.dirty:
            return
        config = self.deliverer.config
        save_json(path, self.state.to_json({
            "idempotency": self.idempotency,
            "pending_deliveries": self.deliverer.pending_state(),
            "config": {"duplicate_deliveries": config.duplicate_deliveries, "shuffle": config.shuffle,
                       "enabled_events": config.enabled_events},
        }))
        self.dirty = False

    # -- running state changes atomically ------------------------------------------------------------
    def _snapshot(self) -> tuple[bytes, int]:
        s = self.state
        return orjson.dumps({"o": s.objects, "i": s.internal, "c": s.counters}), len(s.events)

    def _restore(self, snapshot: tuple[bytes, int]) -> None:
        data = orjson.loads(snapshot[0])
        self.state.objects, self.state.internal, self.state.counters = data["o"], data["i"], data["c"]
        del self.state.events[snapshot[1]:]

    def _flush_events(self) -> None:
        for event in self.buffer:
            self.deliverer.enqueue(event)
        self.buffer.clear()

    async def run(self, action: Callable[[Engine], Obj], *, mutates: bool = True) -> Obj:
        """Run ``action`` under the lock; on a StripeError undo its changes (unless ``commit``)."""
        async with self.lock:
            snapshot = self._snapshot() if mutates else None
            try:
                result = action(self.engine)
                out = self.engine.view(result) if result.get("object") != "list" else result
            except StripeError as error:
                if snapshot is not None and not error.commit:
                    self._restore(snapshot)
                    self.buffer.clear()
                self._flush_events()
                self.dirty = self.dirty or bool(mutates and error.commit)
                raise
            except Exception:
                if snapshot is not None:
                    self._restore(snapshot)
                self.buffer.clear()
                raise
            self._flush_events()
            if mutates:
                self.dirty = True
            return out

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.mock = httpx.AsyncClient(base_url=self.settings.stripe_mock_url, timeout=30.0, trust_env=False)
        await self.deliverer.start()
        self._ticker = asyncio.create_task(self._tick_loop(), name="standin ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.deliverer.stop()
        if self.mock is not None:
            await self.mock.aclose()
        self.dirty = True
        self.save()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_interval)
            try:
                async with self.lock:
                    if self.engine.tick():
                        self.dirty = True
                    if self.buffer:
                        self.dirty = True
                    self._flush_events()
                    self.save()
            except Exception:  # keep ticking; the log says what broke
                log.exception("tick failed")

    # -- stripe-mock --------------------------------------------------------------------------------
    async def forward(self, request: Request, body: bytes) -> Response:
        assert self.mock is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            answer = await self.mock.request(request.method, request.url.path, params=request.url.query or None,
                                             content=body, headers=headers)
        except httpx.HTTPError as exc:
            return error_response(StripeError(f"stripe-mock is unreachable: {exc}", status=502, type="api_error"))
        passthrough = {k: v for k, v in answer.headers.items()
                       if k.lower() not in HOP_HEADERS | {"content-encoding", "date", "server"}}
        return Response(answer.content, status_code=answer.status_code, headers=passthrough)

    async def validate(self, request: Request, body: bytes, params: Obj) -> JSONResponse | None:
        """stripe-mock checks the parameters against Stripe's spec; its 400 is Stripe's 400."""
        if not self.settings.validate_with_mock or self.mock is None:
            return None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | {"idempotency-key"}}
        try:
            answer = await self.mock.request(request.method, request.url.path, params=request.url.query or None,
                                             content=body, headers=headers)
        except httpx.HTTPError:
            return None
        if answer.status_code != 400:
            return None
        try:
            document = answer.json()
        except ValueError:
            return None
        message = str(document.get("error", {}).get("message", ""))
        if not message.startswith("Request validation error") and "unknown parameter" not in message.lower():
            return None
        validator = await asyncio.to_thread(default_validator)
        if validator is not None:
            unknown = validator.unknown_params(request.method, request.url.path, params)
            if unknown:
                return error_response(StripeError(f"Received unknown parameter: {unknown[0]}", param=unknown[0]))
        return error_response(StripeError(f"{message} (stripe-mock checked this request against Stripe's API "
                                          "spec)"))


def _expand_paths(params: Obj) -> list[str]:
    raw = params.get("expand")
    if isinstance(raw, list):
        return [str(x) for x in raw]
    if isinstance(raw, str) and raw:
        return [raw]
    return []


def create_app(settings: Settings) -> FastAPI:
    standin = Standin(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await standin.start()
        try:
            yield
        finally:
            await standin.stop()

    app = FastAPI(title="Stripe stand-in", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.standin = standin

    # -- test knobs -----------------------------------------------------------------------------------
    @app.get("/_standin/health")
    async def health() -> Obj:
        return {"status": "ok", "api_version": API_VERSION, "webhook_urls": standin.deliverer.config.webhook_urls}

    @app.get("/_standin/config")
    async def get_config() -> Obj:
        return standin.deliverer.config.public()

    @app.post("/_standin/config")
    async def set_config(request: Request) -> Response:
        try:
            knobs = json.loads(await request.body() or b"{}")
        except ValueError:
            return error_response(StripeError("The body must be JSON."))
        config = standin.deliverer.config
        for key in ("duplicate_deliveries", "shuffle"):
            if key in knobs:
                setattr(config, key, bool(knobs[key]))
        for key in ("retry_for_seconds", "max_backoff"):
            if key in knobs:
                setattr(config, key, float(knobs[key]))
        if "webhook_urls" in knobs:
            config.webhook_urls = [str(u) for u in knobs["webhook_urls"]]
        if "enabled_events" in knobs:
            config.enabled_events = [str(e) for e in knobs["enabled_events"]] or ["*"]
        standin.dirty = True
        return JSONResponse(config.public())

    @app.post("/_standin/customers/{customer_id}/card")
    async def set_card(customer_id: str, request: Request) -> Response:
        try:
            outcome = json.loads(await request.body() or b"{}").get("outcome")
        except (ValueError, AttributeError):
            return error_response(StripeError("The body must be JSON: {\"outcome\": \"succeed\"|\"decline\"}"))
        if outcome not in CARD_OUTCOMES:
            return error_response(StripeError(f"outcome must be one of {', '.join(CARD_OUTCOMES)}", param="outcome"))
        try:
            customer = await standin.run(lambda e: e.set_card(customer_id, str(outcome)))
        except StripeError as error:
            return error_response(error)
        return JSONResponse({"customer": customer["id"], "card": outcome})

    @app.get("/_standin/events")
    async def events(request: Request) -> Obj:
        query = dict(request.query_params)
        kind, object_id = query.get("type"), query.get("object")
        limit = int(query["limit"]) if query.get("limit", "").isdigit() else 1000
        out = []
        for event in standin.state.events:
            obj = event["data"]["object"]
            if kind and event["type"] != kind:
                continue
            if object_id and object_id not in (obj.get("id"), obj.get("customer"), obj.get("subscription")):
                continue
            entry = {"id": event["id"], "type": event["type"], "created": event["created"],
                     "object_id": obj.get("id"), "deliveries": standin.deliverer.for_event(event["id"])}
            if query.get("full") in ("1", "true"):
                entry["event"] = event
            out.append(entry)
        return {"data": out[-limit:], "pending": standin.deliverer.pending_count()}

    @app.get("/_standin/deliveries/pending")
    async def pending() -> Obj:
        return {"pending": standin.deliverer.pending_count()}

    @app.post("/_standin/flush")
    async def flush(request: Request) -> Obj:
        timeout = float(request.query_params.get("timeout", "10"))
        drained = await standin.deliverer.wait_idle(min(timeout, 120.0))
        return {"drained": drained, "pending": standin.deliverer.pending_count()}

    @app.post("/_standin/tick")
    async def tick() -> Obj:
        async with standin.lock:
            steps = standin.engine.tick()
            standin._flush_events()
            standin.dirty = True
        return {"steps": steps}

    @app.post("/_standin/reset")
    async def reset() -> Obj:
        async with standin.lock:
            standin.state = State()
            standin.engine.s = standin.state
            standin.idempotency.clear()
            standin.deliverer.clear()
            standin.buffer.clear()
            standin.dirty = True
        return {"reset": True}

    # -- hosted pages ---------------------------------------------------------------------------------
    async def form(request: Request) -> dict[str, str]:
        return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))

    def names() -> dict[str, str]:
        return {pid: str(p["name"]) for pid, p in standin.state.bucket("product").items()}

    def html(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status)

    async def page_error(action: Callable[[Engine], Obj]) -> Obj | HTMLResponse:
        try:
            return await standin.run(action)
        except StripeError as error:
            status = 404 if error.status == 404 else 400
            return html(pages.message_page("Not found" if status == 404 else "Cannot do that", error.message), status)

    @app.get("/checkout/{session_id}", response_class=HTMLResponse)
    async def checkout_page(session_id: str, request: Request) -> HTMLResponse:
        session = await page_error(lambda e: e.checkout_session(session_id))
        if isinstance(session, HTMLResponse):
            return session
        meta = standin.state.meta(session_id)
        notice = "Your card was declined. Try again." if request.query_params.get("declined") else None
        trial = (meta.get("subscription_data") or {}).get("trial_period_days")
        return html(pages.checkout_page(session, meta.get("line_items", []), names(), notice=notice,
                                        trial_days=int(trial) if trial else None))

    @app.post("/checkout/{session_id}/pay")
    async def checkout_pay(session_id: str) -> Response:
        session = await page_error(lambda e: e.complete_checkout(session_id))
        if isinstance(session, HTMLResponse):
            return session
        success = session.get("success_url")
        if session["status"] == "complete" and success:
            return RedirectResponse(str(success).replace("{CHECKOUT_SESSION_ID}", session_id), status_code=303)
        return RedirectResponse(f"{settings.base_url}/checkout/{session_id}", status_code=303)

    @app.post("/checkout/{session_id}/decline")
    async def checkout_decline(session_id: str) -> Response:
        session = await page_error(lambda e: e.decline_checkout(session_id))
        if isinstance(session, HTMLResponse):
            return session
        return RedirectResponse(f"{settings.base_url}/checkout/{session_id}?declined=1", status_code=303)

    @app.post("/checkout/{session_id}/cancel")
    async def checkout_cancel(session_id: str) -> Response:
        session = await page_error(lambda e: e.checkout_session(session_id))
        if isinstance(session, HTMLResponse):
            return session
        return RedirectResponse(str(session.get("cancel_url") or f"{settings.base_url}/checkout/{session_id}"),
                                status_code=303)

    @app.get("/invoice/{invoice_id}", response_class=HTMLResponse)
    async def invoice_page(invoice_id: str, request: Request) -> HTMLResponse:
        invoice = await page_error(lambda e: e.retrieve_invoice(invoice_id))
        if isinstance(invoice, HTMLResponse):
            return invoice
        if invoice["status"] == "draft":
            return html(pages.message_page("Invoice not finalized", "This invoice is not finalized yet."), 404)
        q = request.query_params
        return html(pages.invoice_page(invoice, notice="Payment received. Thank you!" if q.get("paid") else None,
                                       error="Your card was declined." if q.get("declined") else None))

    @app.post("/invoice/{invoice_id}/pay")
    async def invoice_pay(invoice_id: str) -> Response:
        result = await page_error(lambda e: e.pay_invoice(invoice_id, {}, outcome="succeed"))
        if isinstance(result, HTMLResponse):
            return result
        return RedirectResponse(f"{settings.base_url}/invoice/{invoice_id}?paid=1", status_code=303)

    @app.post("/invoice/{invoice_id}/decline")
    async def invoice_decline(invoice_id: str) -> Response:
        result = await page_error(lambda e: e.fail_invoice_payment(invoice_id))
        if isinstance(result, HTMLResponse):
            return result
        return RedirectResponse(f"{settings.base_url}/invoice/{invoice_id}?declined=1", status_code=303)

    @app.get("/portal/{session_id}", response_class=HTMLResponse)
    async def portal_page(session_id: str, request: Request) -> HTMLResponse:
        async with standin.lock:
            engine = standin.engine
            try:
                session = engine.get("portal_session", session_id)
                customer = engine.get("customer", session["customer"])
                config = engine.get("portal_configuration", session["configuration"])
            except StripeError as error:
                return html(pages.message_page("Not found", error.message), 404)
            subs = [engine.view(s) for s in reversed(list(standin.state.bucket("subscription").values()))
                    if s["customer"] == customer["id"]]
            options = {s["id"]: engine.portal_switch_options(s, config) for s in subs}
            invoices = [i for i in reversed(list(standin.state.bucket("invoice").values()))
                        if i["customer"] == customer["id"] and i["status"] != "draft"]
            q = request.query_params
            return html(pages.portal_page(session, customer, engine.card(customer["id"]), subs, invoices, options,
                                          names(), notice=q.get("notice"), error=q.get("error")))

    def back_to_portal(session_id: str, result: Obj | HTMLResponse, notice: str) -> Response:
        if isinstance(result, HTMLResponse):
            return result
        return RedirectResponse(f"{settings.base_url}/portal/{session_id}?notice={notice}", status_code=303)

    @app.post("/portal/{session_id}/card")
    async def portal_card(session_id: str, request: Request) -> Response:
        outcome = (await form(request)).get("outcome", "")

        def action(e: Engine) -> Obj:
            session = e.get("portal_session", session_id)
            return e.set_card(session["customer"], outcome)

        return back_to_portal(session_id, await page_error(action), "Payment+method+updated.")

    @app.post("/portal/{session_id}/subscriptions/{sub_id}/cancel")
    async def portal_cancel(session_id: str, sub_id: str) -> Response:
        result = await page_error(lambda e: e.portal_cancel(session_id, sub_id, True))
        return back_to_portal(session_id, result, "Your+subscription+will+end+at+the+end+of+the+period.")

    @app.post("/portal/{session_id}/subscriptions/{sub_id}/renew")
    async def portal_renew(session_id: str, sub_id: str) -> Response:
        result = await page_error(lambda e: e.portal_cancel(session_id, sub_id, False))
        return back_to_portal(session_id, result, "Your+subscription+will+renew.")

    @app.post("/portal/{session_id}/subscriptions/{sub_id}/switch")
    async def portal_switch(session_id: str, sub_id: str, request: Request) -> Response:
        price = (await form(request)).get("price", "")
        result = await page_error(lambda e: e.portal_switch(session_id, sub_id, price))
        return back_to_portal(session_id, result, "Plan+changed.")

    # -- the Stripe API ---------------------------------------------------------------------------------
    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def api(path: str, request: Request) -> Response:
        body = await request.body()
        route = match_route(request.method, request.url.path, standin.engine)
        if route is None:
            return await standin.forward(request, body)
        handler, args, mutates = route
        try:
            key = check_key(request)
            if request.method == "GET" or request.method == "DELETE":
                params = parse_pairs(parse_qsl(request.url.query, keep_blank_values=True))
            else:
                params = parse_form(body)
        except StripeError as error:
            return error_response(error)
        invalid = await standin.validate(request, body, params)
        if invalid is not None:
            return invalid
        idem = request.headers.get("idempotency-key") if request.method == "POST" else None
        fingerprint = hashlib.sha256(f"{request.method} {request.url.path} ".encode() + body).hexdigest()
        cache_key = f"{hashlib.sha256(key.encode()).hexdigest()[:16]}:{idem}" if idem else None
        if cache_key is not None:
            cached = standin.idempotency.get(cache_key)
            if cached is not None and cached["at"] > time.time() - IDEMPOTENCY_TTL:
                if cached["fingerprint"] != fingerprint:
                    return error_response(StripeError(
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{idem}' if you meant to execute a different "
                        "request.", type="idempotency_error"))
                return JSONResponse(cached["body"], status_code=cached["status"],
                                    headers={"Idempotent-Replayed": "true", "Request-Id": new_id("req", 14)})
        expand = _expand_paths(params)
        try:
            result = await standin.run(lambda e: handler(e, params, args), mutates=mutates)
            if expand:
                async with standin.lock:
                    result = standin.engine.expand(result, expand)
            status, document = 200, result
        except StripeError as error:
            if not (cache_key and error.commit):
                return error_response(error)
            status, document = error.status, error.body()
        if cache_key is not None:
            standin.idempotency[cache_key] = {"fingerprint": fingerprint, "status": status, "body": document,
                                              "at": time.time()}
            if len(standin.idempotency) > MAX_IDEMPOTENCY_KEYS:
                for old in sorted(standin.idempotency, key=lambda k: standin.idempotency[k]["at"])[:500]:
                    del standin.idempotency[old]
        return JSONResponse(document, status_code=status,
                            headers={"Request-Id": new_id("req", 14), "Stripe-Version": API_VERSION})

    return app
