"""One polling worker and one backoff policy for every background loop (outbox relay, Stripe webhook
worker, email delivery, ...).

A worker runs `run_once()` in `concurrency` tasks. It runs again at once while `run_once()` reports a
full batch; otherwise it waits for a wake-up (`wake()`, or a PostgreSQL NOTIFY on `channel` from
another process) or `poll_interval`. A failing `run_once()` (database or Kafka down) is retried after
`backoff_delay`, growing with consecutive failures. The LISTEN connection is re-established when it
drops (a PostgreSQL restart), so wake-ups come back without a service restart; until then polling
keeps everything moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import structlog
from sqlalchemy.engine import make_url
from tenacity import RetryCallState, wait_exponential

log = structlog.get_logger(__name__)


def backoff_delay(attempt: int, *, initial: float = 1.0, maximum: float = 3600.0) -> float:
    """Seconds to wait before retry number `attempt` (1-based): initial × 2^(attempt−1), capped."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait_exponential(multiplier=initial, min=initial, max=maximum)(state))


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """An asyncpg DSN for a SQLAlchemy URL (`postgresql+asyncpg://…` → `postgresql://…`)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class PollingWorker:
    """Subclass and implement `run_once()`; it returns how many items it handled."""

    name = "worker"

    def __init__(
        self,
        *,
        database_url: str | None = None,
        channel: str | None = None,
        concurrency: int = 1,
        poll_interval: float = 1.0,
        batch_size: int = 100,
        start_delay: float = 0.0,
        coalesce: float = 0.0,
        max_error_backoff: float = 30.0,
    ) -> None:
        self.database_url = database_url
        self.channel = channel
        self.concurrency = max(1, concurrency)
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.start_delay = start_delay
        self.coalesce = coalesce
        self.max_error_backoff = max_error_backoff
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._next_listen_try = 0.0
        self.consecutive_failures = 0
        self.last_success: float | None = None

    async def run_once(self) -> int:
        raise NotImplementedError

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not all(task.done() for task in self._tasks)

    async def start(self) -> None:
        if self.channel and self.database_url:
            await self._ensure_listening()
        self._tasks = [asyncio.create_task(self._run(i), name=f"{self.name}-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._close_listener()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def _ensure_listening(self) -> None:
        """(Re)connect the LISTEN connection, at most once per poll interval while it fails."""
        if not (self.channel and self.database_url) or self.listening or time.monotonic() < self._next_listen_try:
            return
        async with self._listen_lock:
            if self.listening:
                return
            await self._close_listener()
            try:
                conn = await asyncpg.connect(asyncpg_dsn(self.database_url), timeout=5)
                await conn.add_listener(self.channel, self._on_notify)
                conn.add_termination_listener(self._on_terminated)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:  # polling still works
                self._next_listen_try = time.monotonic() + self.poll_interval
                log.warning("listen_unavailable", worker=self.name, channel=self.channel, error=str(exc)[:200])
                return
            was_lost = self._next_listen_try > 0
            self._listener = conn
            if was_lost:
                log.info("listen_restored", worker=self.name, channel=self.channel)
                self.wake()  # NOTIFYs sent while we were deaf are lost: look now

    def _on_notify(self, *_: object) -> None:
        self.wake()

    def _on_terminated(self, *_: object) -> None:
        self._next_listen_try = time.monotonic()
        log.warning("listen_lost", worker=self.name, channel=self.channel)

    async def _run(self, index: int) -> None:
        if self.start_delay > 0:
            await asyncio.sleep(self.start_delay)
        while True:
            self._wakeup.clear()
            try:
                done = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dependency is down: keep the work, try again later
                self.consecutive_failures += 1
                delay = backoff_delay(self.consecutive_failures, initial=min(self.poll_interval, 1.0) or 0.1,
                                      maximum=self.max_error_backoff)
                log.warning("worker_error", worker=self.name, task=index, error=str(exc)[:500],
                            failures=self.consecutive_failures, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            self.consecutive_failures = 0
            self.last_success = time.monotonic()
            if done >= self.batch_size:
                continue  # more may be waiting
            await self._ensure_listening()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.poll_interval)
                if self.coalesce > 0:  # let commits landing right behind this one join the batch
                    await asyncio.sleep(self.coalesce)

