"""Stripe webhook intake and the worker that processes what was taken in.

Intake (`POST /webhooks/stripe`): verify the signature on the raw bytes (300 s tolerance), store the
event keyed by Stripe's event id (a redelivery is a no-op), answer 200. Nothing else happens before
the 200, so Stripe never times out on us and a crash after the 200 loses nothing.

Worker: claims pending rows with FOR UPDATE SKIP LOCKED (safe with several replicas), applies each in
a savepoint of one transaction together with its outbox events, and marks it processed. A crash
before commit leaves the rows pending; they are processed once after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import stripe
import structlog
from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError

from kit.db import Database
from kit.errors import AppError
from kit.outbox import asyncpg_dsn
from services.payments.config import PaymentsSettings
from services.payments.invoice_client import InvoiceReader, InvoiceServiceUnavailable
from services.payments.models import StripeEvent
from services.payments.repository import Repository
from services.payments.service import HANDLED_EVENTS, RetryLater, StripeEventProcessor, utcnow

log = structlog.get_logger(__name__)


class WebhookRejected(AppError):
    """Stripe is told 400: the delivery is not from Stripe (or not usable); nothing was stored."""

    status_code = 400
    code = "webhook_rejected"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


def verify_and_parse(body: bytes, signature: str | None, secret: str, tolerance: int) -> dict[str, Any]:
    """Verify like stripe.Webhook.construct_event (the SDK's own check), then parse the event."""
    if not signature:
        raise WebhookRejected("Missing Stripe-Signature header.", code="missing_signature")
    try:
        stripe.WebhookSignature.verify_header(body, signature, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        message = f"Invalid Stripe signature: {exc.user_message or exc}"
        raise WebhookRejected(message, code="invalid_signature") from None
    except UnicodeDecodeError:
        raise WebhookRejected("The body is not UTF-8.", code="invalid_payload") from None
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookRejected("The body is not JSON.", code="invalid_payload") from None
    if not isinstance(event, dict) or event.get("object") not in (None, "event"):
        raise WebhookRejected("The body is not a Stripe event.", code="invalid_payload")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    data = event.get("data")
    if (
        not isinstance(event_id, str) or not event_id or len(event_id) > 255
        or not isinstance(event_type, str) or not event_type or len(event_type) > 100
        or not isinstance(created, int) or isinstance(created, bool)
        or not isinstance(data, dict) or not isinstance(data.get("object"), dict)
    ):
        raise WebhookRejected("The event lacks id, type, created or data.object.", code="invalid_payload")
    return event


WEBHOOK_CHANNEL = "stripe_events"

_INSERT_EVENT = """
INSERT INTO stripe_events (id, type, created, livemode, object_id, payload, status, outcome, attempts,
                           next_attempt_at, received_at, processed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::varchar, $8, 0, now(), now(),
        CASE WHEN $7::varchar = 'pending' THEN NULL ELSE now() END)
ON CONFLICT (id) DO NOTHING
RETURNING id, status
"""
# One round trip: store the event and, if it waits for processing, wake workers in other processes
# (delivered on commit; this statement runs in autocommit).
_INSERT_EVENT = f"""
WITH stored AS ({_INSERT_EVENT.strip()})
SELECT id, CASE WHEN status = 'pending' THEN pg_notify('{WEBHOOK_CHANNEL}', '') END FROM stored
"""


class WebhookIntake:
    """The hot path before the 200: one INSERT ... ON CONFLICT DO NOTHING, in autocommit, on a small
    asyncpg pool of its own (no ORM, no pre-ping: one round trip to PostgreSQL per delivery)."""

    def __init__(self, db: Database, settings: PaymentsSettings, on_stored: Callable[[], None]) -> None:
        self.db = db
        self.settings = settings
        self.on_stored = on_stored
        self.livemode_allowed = False  # this platform never runs in live mode
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            asyncpg_dsn(self.db.url), min_size=1, max_size=self.settings.webhook_intake_pool_size,
            statement_cache_size=16,
        )

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def receive(self, body: bytes, signature: str | None) -> dict[str, Any]:
        event = verify_and_parse(body, signature, self.settings.stripe_webhook_secret, self.settings.webhook_tolerance)
        event_type: str = event["type"]
        obj = event["data"]["object"]
        status, outcome = "pending", None
        if event_type not in HANDLED_EVENTS:
            status, outcome = "ignored", f"event type {event_type} is not handled"
        elif bool(event.get("livemode")) and not self.livemode_allowed:
            status, outcome = "ignored", "live-mode event delivered to a test-mode integration"
        object_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        if self._pool is None:
            raise RuntimeError("webhook intake not started")
        inserted = await self._pool.fetchval(
            _INSERT_EVENT, event["id"], event_type, event["created"], bool(event.get("livemode")),
            object_id[:255] if object_id else None, body, status, outcome,
        ) is not None
        if inserted and status == "pending":
            self.on_stored()
        if not inserted:
            log.info("stripe_event_duplicate", event_id=event["id"], event_type=event_type)
        elif status == "ignored":
            log.info("stripe_event_ignored", event_id=event["id"], event_type=event_type, reason=outcome)
        return {"received": True, "duplicate": not inserted, "ignored": status == "ignored"}


class WebhookWorker:
    """Processes pending Stripe events; `wake()` after storing one. Safe with several replicas."""

    def __init__(
        self,
        db: Database,
        settings: PaymentsSettings,
        invoices: InvoiceReader,
        *,
        concurrency: int = 1,
    ) -> None:
        self.db = db
        self.settings = settings
        self.invoices = invoices
        self.concurrency = max(1, concurrency)
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        if not self.settings.webhook_worker_enabled:
            log.warning("webhook_worker_disabled")
            return
        try:  # events stored by intake-only replicas (other processes) wake this worker too
            self._listener = await asyncpg.connect(asyncpg_dsn(self.db.url))
            await self._listener.add_listener(WEBHOOK_CHANNEL, lambda *_: self.wake())
        except (OSError, asyncpg.PostgresError) as exc:  # polling still works without LISTEN
            log.warning("webhook_listen_unavailable", error=str(exc))
        self._tasks = [asyncio.create_task(self._run(i), name=f"stripe-webhook-worker-{i}")
                       for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def _run(self, index: int) -> None:
        if self.settings.webhook_worker_start_delay > 0:
            await asyncio.sleep(self.settings.webhook_worker_start_delay)
        while True:
            self._wakeup.clear()
            try:
                done = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # database down and the like: keep the rows, try again
                log.warning("webhook_worker_error", error=str(exc)[:500])
                done = 0
                await asyncio.sleep(self.settings.webhook_worker_poll_interval)
            if done >= self.settings.webhook_worker_batch:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.settings.webhook_worker_poll_interval)

    async def run_once(self) -> int:
        """Process one batch of due events; returns how many rows were claimed.

        Fast path: the whole batch in one savepoint. If any event fails, that savepoint is rolled back
        (the claimed rows stay locked) and the batch is redone with one savepoint per event, so one bad
        event never holds the others back.
        """
        async with self.db.unit_of_work() as uow:
            rows = await Repository(uow.session).claim_events(self.settings.webhook_worker_batch)
            if not rows:
                return 0
            processor = StripeEventProcessor(uow, self.invoices)
            outcomes: list[tuple[str, str]] | None = None
            if len(rows) > 1:
                try:
                    async with uow.session.begin_nested():
                        outcomes = [await processor.process(row, orjson.loads(row.payload)) for row in rows]
                except Exception as exc:  # redo one by one below
                    log.info("webhook_batch_retry_one_by_one", events=len(rows), error=str(exc)[:200])
                    outcomes = None
            if outcomes is not None:
                # One executemany for the whole batch (an ORM flush would send one UPDATE per row).
                await uow.session.execute(
                    update(StripeEvent),
                    [{"id": row.id, "status": status, "outcome": outcome[:2000], "processed_at": utcnow(),
                      "last_error": None} for row, (status, outcome) in zip(rows, outcomes, strict=True)],
                )
                for row, (status, outcome) in zip(rows, outcomes, strict=True):
                    log.info("stripe_event_handled", event_id=row.id, event_type=row.type, status=status,
                             outcome=outcome)
            else:
                for row in rows:
                    await self._process_one(uow, processor, row)
            if self.settings.webhook_debug_stall_seconds > 0:
                log.warning("webhook_debug_stall", seconds=self.settings.webhook_debug_stall_seconds,
                            events=[r.id for r in rows])
                await asyncio.sleep(self.settings.webhook_debug_stall_seconds)
            await uow.commit()
        return len(rows)

    async def _process_one(self, uow: Any, processor: StripeEventProcessor, row: StripeEvent) -> None:
        event_id, event_type = row.id, row.type
        try:
            event = orjson.loads(row.payload)
            async with uow.session.begin_nested():
                status, outcome = await processor.process(row, event)
        except RetryLater as exc:
            self._retry(row, str(exc), quick=False)
            log.info("stripe_event_deferred", event_id=event_id, event_type=event_type, reason=str(exc))
            return
        except (IntegrityError, InvoiceServiceUnavailable) as exc:
            # A concurrent replica wrote the same payment first (retry at once), or the invoice service
            # is down (back off).
            self._retry(row, str(exc)[:500], quick=isinstance(exc, IntegrityError))
            log.warning("stripe_event_retry", event_id=event_id, event_type=event_type, error=str(exc)[:300])
            return
        except Exception as exc:  # a bug or bad data in this one event: the others go on
            self._retry(row, f"{type(exc).__name__}: {exc}"[:1000], quick=False)
            log.exception("stripe_event_error", event_id=event_id, event_type=event_type)
            return
        self._done(row, status, outcome)

    @staticmethod
    def _done(row: StripeEvent, status: str, outcome: str) -> None:
        row.status = status
        row.outcome = outcome[:2000]
        row.processed_at = func.now()
        row.last_error = None
        log.info("stripe_event_handled", event_id=row.id, event_type=row.type, status=status, outcome=outcome)

    def _retry(self, row: StripeEvent, error: str, *, quick: bool) -> None:
        row.attempts += 1
        row.last_error = error
        if row.attempts >= self.settings.webhook_max_attempts:
            row.status = "failed"
            row.processed_at = func.now()
            log.error("stripe_event_gave_up", event_id=row.id, event_type=row.type, attempts=row.attempts,
                      error=error)
            return
        delay = 0.2 * row.attempts if quick else min(2 ** row.attempts, 3600)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)
