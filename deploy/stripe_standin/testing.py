"""Test helper: a tiny local HTTP endpoint that receives the stand-in's webhooks and verifies them.

    receiver = WebhookReceiver("whsec_test"); receiver.start()
    standin.set_webhook_urls([receiver.url])
    ...
    [event] = receiver.wait_for("invoice.paid", customer=customer_id)

Each delivery is checked with ``stripe.Webhook.construct_event`` (the SDK's own verification, the
one the payments service uses); ``invalid`` lists deliveries whose signature did not verify.
``fail_next(n)`` answers the next ``n`` deliveries with 500 (to see the stand-in retry).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import stripe

Event = dict[str, Any]


@dataclass
class Received:
    raw: bytes
    signature: str
    event: Event | None  # None when the signature did not verify
    error: str | None
    status: int
    at: float


class WebhookReceiver:
    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0, path: str = "/webhooks/stripe") -> None:
        self.secret = secret
        self.path = path
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._fail_next = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                receiver._receive(self, raw)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.path}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _receive(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        signature = handler.headers.get("Stripe-Signature", "")
        event: Event | None = None
        error: str | None = None
        try:
            stripe.Webhook.construct_event(raw.decode(), signature, self.secret, tolerance=300)
            event = json.loads(raw)
        except (stripe.SignatureVerificationError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            failing = self._fail_next > 0
            if failing:
                self._fail_next -= 1
            status = 500 if failing else (200 if event is not None else 400)
            self.received.append(Received(raw, signature, event if not failing else None,
                                          error or ("answered 500 on purpose" if failing else None), status,
                                          time.time()))
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(b'{"received": true}' if status == 200 else b'{"error": "refused"}')

    # -- knobs and queries ------------------------------------------------------------------------
    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._fail_next = n

    def clear(self) -> None:
        with self._lock:
            self.received.clear()
            self._fail_next = 0

    @property
    def invalid(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.event is None and r.status == 400]

    def events(self, event_type: str | None = None, *, where: Callable[[Event], bool] | None = None,
               **match: Any) -> list[Event]:
        """Verified events (duplicates included, in arrival order) of ``event_type`` whose
        ``data.object`` has the given field values and for which ``where(event)`` holds."""
        with self._lock:
            events = [r.event for r in self.received if r.event is not None]
        return [
            e for e in events
            if (event_type is None or e["type"] == event_type)
            and all(e["data"]["object"].get(k) == v for k, v in match.items())
            and (where is None or where(e))
        ]

    def wait_for(self, event_type: str | None = None, count: int = 1, timeout: float = 15.0, *,
                 where: Callable[[Event], bool] | None = None, **match: Any) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event_type, where=where, **match)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [e["type"] for e in self.events(where=where, **match)]
                raise AssertionError(f"timed out waiting for {count}x {event_type} {match or ''}; saw {seen}")
            time.sleep(0.02)
