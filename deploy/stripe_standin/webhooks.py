"""Signed, at-least-once webhook delivery, as Stripe does it.

Each event is POSTed to every configured endpoint as pretty-printed JSON with
``Stripe-Signature: t=<unix now>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw_body}")>`` (signed afresh at
each attempt, like Stripe). One worker per endpoint delivers that endpoint's queue in order; a non-2xx
answer or a connection error is retried with backoff 1 s, 2 s, 4 s, ... capped at ``max_backoff``,
until ``retry_for_seconds`` after the first attempt, then the delivery is marked failed. Test knobs:
``duplicate_deliveries`` (each event queued twice) and ``shuffle`` (the worker picks a random pending
delivery instead of the oldest).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from deploy.stripe_standin.state import new_id

log = logging.getLogger("stripe_standin.webhooks")

SIGNATURE_HEADER = "Stripe-Signature"
MAX_KEPT_DELIVERIES = 20_000


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, indent=2).encode()


@dataclass
class DeliveryConfig:
    webhook_urls: list[str] = field(default_factory=list)
    duplicate_deliveries: bool = False
    shuffle: bool = False
    retry_for_seconds: float = 900.0
    max_backoff: float = 30.0
    enabled_events: list[str] = field(default_factory=lambda: ["*"])

    def wants(self, event_type: str) -> bool:
        for pattern in self.enabled_events:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Delivery:
    id: str
    event_id: str
    event_type: str
    url: str
    body: str
    created: float
    next_attempt: float
    status: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("body")
        return out


class Deliverer:
    def __init__(self, secret: str, config: DeliveryConfig) -> None:
        self.secret = secret
        self.config = config
        self.deliveries: list[Delivery] = []
        self.by_event: dict[str, list[Delivery]] = {}
        self._queues: dict[str, list[Delivery]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._running = False

    # -- queueing ---------------------------------------------------------------------------------
    def enqueue(self, event: dict[str, Any]) -> None:
        if not self.config.webhook_urls or not self.config.wants(str(event["type"])):
            return
        body = encode_event(event).decode()
        copies = 2 if self.config.duplicate_deliveries else 1
        now = time.time()
        for url in self.config.webhook_urls:
            for _ in range(copies):
                self._add(Delivery(new_id("whd"), event["id"], str(event["type"]), url, body, now, now))

    def _add(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.by_event.setdefault(delivery.event_id, []).append(delivery)
        self._queues.setdefault(delivery.url, []).append(delivery)
        self._trim()
        if self._running:
            self._ensure_worker(delivery.url)
            self._wake[delivery.url].set()

    def _trim(self) -> None:
        if len(self.deliveries) <= MAX_KEPT_DELIVERIES:
            return
        keep: list[Delivery] = []
        excess = len(self.deliveries) - MAX_KEPT_DELIVERIES
        for delivery in self.deliveries:
            if excess > 0 and delivery.status != "pending":
                excess -= 1
                items = self.by_event.get(delivery.event_id, [])
                if delivery in items:
                    items.remove(delivery)
                if not items:
                    self.by_event.pop(delivery.event_id, None)
                continue
            keep.append(delivery)
        self.deliveries = keep

    def pending_count(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pending_count():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def for_event(self, event_id: str) -> list[dict[str, Any]]:
        return [d.public() for d in self.by_event.get(event_id, [])]

    def pending_state(self) -> list[dict[str, Any]]:
        """Pending deliveries, for the state file (resumed after a restart)."""
        return [asdict(d) for queue in self._queues.values() for d in queue]

    def restore(self, pending: list[dict[str, Any]]) -> None:
        for raw in pending:
            with contextlib.suppress(TypeError):
                delivery = Delivery(**raw)
                delivery.status = "pending"
                self._add(delivery)

    def clear(self) -> None:
        self.deliveries.clear()
        self.by_event.clear()
        for queue in self._queues.values():
            queue.clear()

    # -- workers ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=10.0, trust_env=False)
        self._running = True
        for url in list(self._queues):
            self._ensure_worker(url)
            self._wake[url].set()

    async def stop(self) -> None:
        self._running = False
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _ensure_worker(self, url: str) -> None:
        self._wake.setdefault(url, asyncio.Event())
        task = self._tasks.get(url)
        if task is None or task.done():
            self._tasks[url] = asyncio.create_task(self._worker(url), name=f"webhooks {url}")

    async def _sleep_or_wake(self, url: str, seconds: float) -> None:
        wake = self._wake[url]
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(0.0, seconds))

    def _pick(self, queue: list[Delivery], now: float) -> tuple[Delivery | None, float]:
        """The next delivery to attempt, or None and how long to wait."""
        if not self.config.shuffle:
            head = queue[0]
            return (head, 0.0) if head.next_attempt <= now else (None, head.next_attempt - now)
        ready = [d for d in queue if d.next_attempt <= now]
        if ready:
            return random.choice(ready), 0.0
        return None, min(d.next_attempt for d in queue) - now

    async def _worker(self, url: str) -> None:
        queue = self._queues.setdefault(url, [])
        idle = True
        while self._running:
            if not queue:
                idle = True
                await self._sleep_or_wake(url, 3600)
                continue
            if self.config.shuffle and idle:
                await asyncio.sleep(0.05)  # let a burst of events gather, so there is something to shuffle
            idle = False
            delivery, wait = self._pick(queue, time.time())
            if delivery is None:
                await self._sleep_or_wake(url, wait)
                continue
            ok = await self._attempt(delivery)
            now = time.time()
            if ok:
                delivery.status = "delivered"
                delivery.delivered_at = now
            elif now - delivery.created >= self.config.retry_for_seconds:
                delivery.status = "failed"
                log.warning("giving up on %s to %s after %d attempts", delivery.event_id, url, delivery.attempts)
            else:
                delivery.next_attempt = now + min(2.0 ** (delivery.attempts - 1), self.config.max_backoff)
                continue
            if delivery in queue:
                queue.remove(delivery)

    async def _attempt(self, delivery: Delivery) -> bool:
        assert self._client is not None
        body = delivery.body.encode()
        headers = {
            SIGNATURE_HEADER: sign(body, self.secret),
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        delivery.attempts += 1
        try:
            response = await self._client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            delivery.last_status, delivery.last_error = None, f"{type(exc).__name__}: {exc}"
            return False
        delivery.last_status = response.status_code
        delivery.last_error = None if response.is_success else response.text[:300]
        return response.is_success
