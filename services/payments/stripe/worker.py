"""The webhook worker: handles the Stripe events the intake stored, after Stripe got its 200.

It claims pending rows with FOR UPDATE SKIP LOCKED (safe with several replicas and several tasks),
parses each once into its typed event, has its handler (handlers.py) apply it in one transaction
together with its outbox events, and marks the row processed. A crash before commit leaves the rows
pending; they are handled once after the restart. An event that fails is retried on its own with
kit's backoff (2 s doubling up to an hour) and parked as failed after `webhook_max_attempts`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError

from kit import tracing
from kit.child import ChildContext, run_worker
from kit.clock import utcnow
from kit.db import Database, UnitOfWork
from kit.worker import PollingWorker, backoff_delay
from services.payments.config import PaymentsSettings
from services.payments.invoice_client import HttpInvoiceReader, InvoiceReader, InvoiceServiceUnavailable
from services.payments.models import StripeEvent, payments_database
from services.payments.repository import Repository
from services.payments.stripe.gateway import StripeGateway, StripeSdkGateway
from services.payments.stripe.handlers import HANDLERS
from services.payments.stripe.intake import WEBHOOK_CHANNEL
from services.payments.stripe.payments import Outcome, RetryLater, StripePayments, ignored

log = structlog.get_logger(__name__)

Apply = Callable[[], Awaitable[Outcome]]
RETRY_INITIAL = 2.0  # seconds before the first retry of an event that failed
QUICK_RETRY_INITIAL = 0.2  # a concurrent replica wrote the same payment first: look again soon
RETRY_MAX = 3600.0


async def _not_handled(event_type: str) -> Outcome:
    return ignored(f"event type {event_type} is not handled")


class WebhookWorker(PollingWorker):
    """Processes pending Stripe events; `wake()` after storing one (NOTIFY wakes other processes)."""

    name = "stripe-webhook-worker"

    def __init__(self, db: Database, settings: PaymentsSettings, invoices: InvoiceReader,
                 stripe: StripeGateway) -> None:
        super().__init__(
            database_url=db.url,
            channel=WEBHOOK_CHANNEL,
            concurrency=settings.webhook_worker_concurrency,
            poll_interval=settings.webhook_worker_poll_interval,
            batch_size=settings.webhook_worker_batch,
            start_delay=settings.webhook_worker_start_delay,
        )
        self.db = db
        self.settings = settings
        self.invoices = invoices
        self.stripe = stripe  # a customer's metadata, for a Stripe invoice that names no client of ours

    async def start(self) -> None:
        if not self.settings.webhook_worker_enabled:
            log.warning("webhook_worker_disabled")
            return
        await super().start()

    async def run_once(self) -> int:
        """Process one batch of due events; returns how many rows were claimed.

        Fast path: the whole batch in one savepoint. If any event fails, that savepoint is rolled back
        (the claimed rows stay locked) and the batch is redone with one savepoint per event, so one bad
        event never holds the others back.
        """
        async with self.db.transaction() as uow:
            rows = await Repository(uow.session).claim_events(self.batch_size)
            if not rows:
                return 0
            payments = StripePayments(uow, self.invoices, self.stripe)
            ready: list[tuple[StripeEvent, Apply]] = []
            for row in rows:
                try:
                    ready.append((row, self._bind(payments, row)))
                except ValueError as exc:  # Stripe's object is not what we read: keep it, retry, then park
                    self._retry(row, f"{type(exc).__name__}: {exc}"[:1000], quick=False)
                    log.error("stripe_event_unreadable", event_id=row.id, event_type=row.type, error=str(exc)[:500])
            if not await self._apply_batch(uow, ready):
                for row, apply in ready:
                    await self._apply_one(uow, row, apply)
            if self.settings.webhook_debug_stall_seconds > 0:
                log.warning("webhook_debug_stall", seconds=self.settings.webhook_debug_stall_seconds,
                            events=[r.id for r in rows])
                await asyncio.sleep(self.settings.webhook_debug_stall_seconds)
        return len(rows)

    @staticmethod
    def _bind(payments: StripePayments, row: StripeEvent) -> Apply:
        """The row's handler with its event, parsed once (ValueError when it cannot be)."""
        handler = HANDLERS.get(row.type)
        if handler is None:  # stored as pending by a version that handled it; not any more
            return functools.partial(_not_handled, row.type)
        apply = functools.partial(handler.handle, payments, handler.parse(row.payload))
        # In a span continuing the delivery's trace (stored by the intake): the events it publishes,
        # and all that follows from them in the other services, join the webhook's trace.
        return tracing.traced(apply, row.trace_context, "stripe.webhook.process",
                              attributes={"stripe.event_id": row.id, "stripe.event_type": row.type})

    async def _apply_batch(self, uow: UnitOfWork, ready: list[tuple[StripeEvent, Apply]]) -> bool:
        """All events in one savepoint; False (nothing kept) when one of them fails."""
        if len(ready) < 2:
            return not ready
        try:
            async with uow.session.begin_nested():
                outcomes = [await apply() for _, apply in ready]
        except Exception as exc:  # redone one by one
            log.info("webhook_batch_retry_one_by_one", events=len(ready), error=str(exc)[:200])
            return False
        # One executemany for the whole batch (an ORM flush would send one UPDATE per row).
        await uow.session.execute(
            update(StripeEvent),
            [{"id": row.id, "status": outcome.status, "outcome": outcome.detail[:2000], "processed_at": utcnow(),
              "last_error": None} for (row, _), outcome in zip(ready, outcomes, strict=True)],
        )
        for (row, _), outcome in zip(ready, outcomes, strict=True):
            log.info("stripe_event_handled", event_id=row.id, event_type=row.type, status=outcome.status,
                     outcome=outcome.detail)
        return True

    async def _apply_one(self, uow: UnitOfWork, row: StripeEvent, apply: Apply) -> None:
        event_id, event_type = row.id, row.type
        try:
            async with uow.session.begin_nested():
                outcome = await apply()
        except RetryLater as exc:
            self._retry(row, str(exc), quick=False)
            log.info("stripe_event_deferred", event_id=event_id, event_type=event_type, reason=str(exc))
            return
        except (IntegrityError, InvoiceServiceUnavailable) as exc:
            # A concurrent replica wrote the same payment first (retry soon), or the invoice service
            # is down (back off).
            self._retry(row, str(exc)[:500], quick=isinstance(exc, IntegrityError))
            log.warning("stripe_event_retry", event_id=event_id, event_type=event_type, error=str(exc)[:300])
            return
        except Exception as exc:  # a bug or bad data in this one event: the others go on
            self._retry(row, f"{type(exc).__name__}: {exc}"[:1000], quick=False)
            log.exception("stripe_event_error", event_id=event_id, event_type=event_type)
            return
        row.status = outcome.status
        row.outcome = outcome.detail[:2000]
        row.processed_at = func.now()
        row.last_error = None
        log.info("stripe_event_handled", event_id=event_id, event_type=event_type, status=outcome.status,
                 outcome=outcome.detail)

    def _retry(self, row: StripeEvent, error: str, *, quick: bool) -> None:
        row.attempts += 1
        row.last_error = error
        if row.attempts >= self.settings.webhook_max_attempts:
            row.status = "failed"
            row.processed_at = func.now()
            log.error("stripe_event_gave_up", event_id=row.id, event_type=row.type, attempts=row.attempts,
                      error=error)
            return
        delay = backoff_delay(row.attempts, initial=QUICK_RETRY_INITIAL if quick else RETRY_INITIAL,
                              maximum=RETRY_MAX)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)


async def run_worker_child(ctx: ChildContext, settings: PaymentsSettings) -> None:
    """The worker of a payments replica, in its child process (kit.child): its own pool, invoice
    reader and Stripe client; woken by the intake's NOTIFY."""
    # A connection per worker task and one to spare (x2 with the overflow): docker-compose.yml and
    # deploy/k8s/base/postgres.yaml count them in max_connections.
    db = payments_database(settings.database_url, settings.webhook_worker_concurrency + 1)
    reader = HttpInvoiceReader(settings.invoice_url, settings.internal_token)
    try:
        await run_worker(ctx, WebhookWorker(db, settings, reader, StripeSdkGateway.from_settings(settings)))
    finally:
        await reader.aclose()
        await db.dispose()
