"""One polling worker and one backoff policy for every background loop (outbox relay, Stripe webhook
worker, email delivery, ...).

A worker runs `run_once()` in `concurrency` tasks. It runs again at once while `run_once()` reports a
full batch; otherwise it waits for a wake-up (`wake()`, or a PostgreSQL NOTIFY on `channel` from
another process) or `poll_interval`. A failing `run_once()` (database or Kafka down) is retried after
`backoff_delay`, growing with consecutive failures; a wake-up during that wait (a commit elsewhere: the
database is back) cuts it short to the first step. The LISTEN connection is re-established when it
drops (a PostgreSQL restart): its loss wakes the loop, which tries again every `min(poll_interval, 1 s)`
and polls at that pace until it listens again, so wake-ups come back without a service restart.

`state()` is what readiness reports (kit.service): running, listening, consecutive failures, the age
of the last successful run, and the problem if any: dead (its tasks ended), stuck (failing with no
success for more than `stuck_polls` poll intervals) or deaf (not listening for more than
`listen_grace` seconds). It may be read from another thread (RelayThread); a worker in a child
process publishes it to its parent (kit.child).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class WorkerState:
    """A worker as readiness sees it. `problem` is None when it is fine (or was never started)."""

    name: str
    started: bool
    running: bool
    listening: bool | None  # None: the worker listens on no channel
    consecutive_failures: int
    last_success_age: float | None  # seconds since the last successful run; None: none yet
    last_error: str | None
    problem: str | None
    runs: int = 0  # since the process started (billing_worker_runs_total)
    failures: int = 0  # failed runs since the process started

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        if not self.started:
            return "off"
        return "ok" if self.problem is None else self.problem.split(":", 1)[0]

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "problem": self.problem,
            "running": self.running,
            "listening": self.listening,
            "consecutiveFailures": self.consecutive_failures,
            "lastSuccessAgeSeconds": None if self.last_success_age is None else round(self.last_success_age, 3),
            "lastError": self.last_error,
        }


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
        stuck_polls: int = 5,
        listen_grace: float = 10.0,
    ) -> None:
        self.database_url = database_url
        self.channel = channel
        self.concurrency = max(1, concurrency)
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.start_delay = start_delay
        self.coalesce = coalesce
        self.max_error_backoff = max_error_backoff
        self.stuck_polls = stuck_polls
        self.listen_grace = listen_grace
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._next_listen_try = 0.0
        self._listen_lost = False
        # Written by the worker's loop, read by readiness (possibly from another thread): under a lock.
        self._state_lock = threading.Lock()
        self._started_at: float | None = None
        self._deaf_since: float | None = None
        self._last_error: str | None = None
        self.consecutive_failures = 0
        self.last_success: float | None = None
        self._runs_total = 0
        self._failures_total = 0

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

    @property
    def _listens(self) -> bool:
        return bool(self.channel and self.database_url)

    @property
    def _first_backoff(self) -> float:
        return min(self.poll_interval, 1.0) or 0.1

    async def start(self) -> None:
        with self._state_lock:
            self._started_at = time.monotonic()
            self._deaf_since = time.monotonic() if self._listens else None
        if self._listens:
            await self._ensure_listening()
        self._tasks = [asyncio.create_task(self._run(i), name=f"{self.name}-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # it had died already (readiness said so): stopping goes on
                log.error("worker_task_died", worker=self.name, error=f"{type(exc).__name__}: {exc}"[:500])
        self._tasks = []
        with self._state_lock:
            self._started_at = None
        await self._close_listener()

    # ------------------------------------------------------------------------------------------
    # readiness

    def state(self, now: float | None = None) -> WorkerState:
        """This worker for readiness: dead, stuck or deaf is a `problem`; safe from any thread."""
        now = time.monotonic() if now is None else now
        with self._state_lock:
            started_at, deaf_since = self._started_at, self._deaf_since
            failures, last_success, last_error = self.consecutive_failures, self.last_success, self._last_error
            runs, failures_total = self._runs_total, self._failures_total
        listening = self.listening if self._listens else None
        running = self.running
        problem: str | None = None
        if started_at is not None:
            quiet_since = last_success if last_success is not None else started_at
            stuck_after = self.stuck_polls * self.poll_interval
            if not running:
                problem = "dead: its tasks have ended"
            elif failures and now - quiet_since > stuck_after:
                problem = (f"stuck: {failures} failed runs, none successful for {now - quiet_since:.1f} s "
                           f"(> {stuck_after:g} s)")
            elif listening is False and deaf_since is not None and now - deaf_since > self.listen_grace:
                problem = (f"deaf: not listening on {self.channel!r} for {now - deaf_since:.1f} s "
                           f"(> {self.listen_grace:g} s), polling only")
        return WorkerState(
            name=self.name, started=started_at is not None, running=running, listening=listening,
            consecutive_failures=failures,
            last_success_age=None if last_success is None else max(0.0, now - last_success),
            last_error=last_error, problem=problem, runs=runs, failures=failures_total,
        )

    def _record_success(self) -> None:
        with self._state_lock:
            self._runs_total += 1
            self.consecutive_failures = 0
            self.last_success = time.monotonic()
            self._last_error = None

    def _record_failure(self, exc: BaseException) -> int:
        with self._state_lock:
            self._runs_total += 1
            self._failures_total += 1
            self.consecutive_failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"[:500]
            return self.consecutive_failures

    # ------------------------------------------------------------------------------------------
    # LISTEN

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.remove_termination_listener(self._on_terminated)  # ours to close: not "lost"
                await self._listener.close()
            self._listener = None

    async def _ensure_listening(self) -> None:
        """(Re)connect the LISTEN connection; while that fails, again every min(poll interval, 1 s)."""
        if not self._listens or self.listening or time.monotonic() < self._next_listen_try:
            return
        async with self._listen_lock:
            if self.listening:
                return
            await self._close_listener()
            assert self.database_url is not None and self.channel is not None
            try:
                conn = await asyncpg.connect(asyncpg_dsn(self.database_url), timeout=5)
                await conn.add_listener(self.channel, self._on_notify)
                conn.add_termination_listener(self._on_terminated)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self._next_listen_try = time.monotonic() + self._first_backoff  # polling still works
                self._listen_lost = True
                log.warning("listen_unavailable", worker=self.name, channel=self.channel, error=str(exc)[:200])
                return
            self._listener = conn
            with self._state_lock:
                self._deaf_since = None
            if self._listen_lost:
                self._listen_lost = False
                log.info("listen_restored", worker=self.name, channel=self.channel)
                self.wake()  # NOTIFYs sent while we were deaf are lost: look now

    def _on_notify(self, *_: object) -> None:
        self.wake()

    def _on_terminated(self, *_: object) -> None:
        self._next_listen_try = time.monotonic()
        self._listen_lost = True
        with self._state_lock:
            self._deaf_since = time.monotonic()
        log.warning("listen_lost", worker=self.name, channel=self.channel)
        self.wake()  # reconnect (and look for work) now rather than at the next poll

    # ------------------------------------------------------------------------------------------
    # the loop

    def _idle_timeout(self) -> float:
        """The poll interval; while deaf, only until the next LISTEN try (polling at that pace too)."""
        if self._listens and not self.listening:
            return max(0.0, min(self.poll_interval, self._next_listen_try - time.monotonic()))
        return self.poll_interval

    async def _back_off(self, delay: float) -> None:
        """Wait `delay`; a wake-up meanwhile (something committed: the database answers again) cuts the
        wait to the first backoff step, so recovery is prompt without hammering a dependency that is
        still down (a Kafka outage under load wakes the relay on every commit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
            await asyncio.sleep(max(0.0, min(self._first_backoff, deadline - loop.time())))

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
                failures = self._record_failure(exc)
                delay = backoff_delay(failures, initial=self._first_backoff, maximum=self.max_error_backoff)
                log.warning("worker_error", worker=self.name, task=index, error=str(exc)[:500],
                            failures=failures, retry_in=round(delay, 2))
                await self._ensure_listening()  # whatever fails, be woken when it works again
                await self._back_off(delay)
                continue
            self._record_success()
            if done >= self.batch_size:
                continue  # more may be waiting
            await self._ensure_listening()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._idle_timeout())
                if self.coalesce > 0:  # let commits landing right behind this one join the batch
                    await asyncio.sleep(self.coalesce)
