"""A service's background loop in a child process of its own: its own interpreter, so its own GIL.

A loop in a thread of the service (the outbox relay, the Stripe webhook worker) waits for the GIL
behind the request handlers and consumers of its process: under load each of its steps (a read from
PostgreSQL, a send to Kafka, an ack) queued for one or more 5 ms switch intervals, which is most of
the commit → Kafka delay measured by `python -m bench invoices` and what held the webhook intake's
acks back. In a child process the loop runs on the other core, and the parent's readiness and
metrics still see it:

* the child publishes a `ChildReport` (its loop's `WorkerState` and counters) a few times a second
  into shared memory; `ChildProcess.state()` reads the newest without blocking either side;
* a child that exits is restarted with kit's backoff (1 s doubling to 30 s), and is `dead` for
  readiness meanwhile; one whose reports stop coming is `stuck`;
* a child dies with its parent (PR_SET_PDEATHSIG, and a parent-pid check for the moment before it
  was set), so a kill -9 of the service leaves no orphan loop behind.

The child's entry is a module-level coroutine function `main(ctx, *args)` (it crosses to the child by
import, with picklable args; the "spawn" start method, so no state of the parent is inherited). It
runs until `ctx.stopping` is set; `run_worker` serves a kit.worker.PollingWorker that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import uvloop

from kit import tracing
from kit.logging import configure_logging
from kit.worker import PollingWorker, WorkerState, backoff_delay

log = structlog.get_logger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
_BOARD_SIZE = 16384  # bytes for one pickled report: a WorkerState and a few counters need < 1 KB
_HEADER = struct.Struct("<I")
STARTUP_GRACE = 60.0  # seconds a new child may take to publish its first report
REPORT_INTERVAL = 0.5
COUNTER_CHECK = 0.02  # how often a child looks whether its counters moved (then it reports at once)
STALE_AFTER = 15.0  # a child that has not reported for this long is stuck (its event loop is blocked)
RESTART_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long resets the restart backoff


@dataclass(frozen=True)
class ChildReport:
    """What a child says about itself: its loop's state, counters since it started, and when."""

    state: WorkerState
    counters: dict[str, float] = field(default_factory=dict)
    at: float = 0.0  # time.monotonic() in the child: CLOCK_MONOTONIC, one clock for every process here


class _Board:
    """One report in shared memory, written by the child and read by the parent without a lock (a
    child killed while holding one would hang its parent): a sequence number, odd while a write is
    under way, lets the reader retry a torn read or keep what it had."""

    def __init__(self) -> None:
        self.data = _SPAWN.RawArray(ctypes.c_char, _BOARD_SIZE)
        self.seq = _SPAWN.RawValue(ctypes.c_uint64, 0)

    def write(self, report: ChildReport) -> None:
        data = pickle.dumps(report)
        if len(data) + _HEADER.size > _BOARD_SIZE:  # a huge last_error: keep the report, shorten it
            report = replace(report, state=replace(report.state, last_error=(report.state.last_error or "")[:500]))
            data = pickle.dumps(report)
        self._store(_HEADER.pack(len(data)) + data)

    def clear(self) -> None:
        self._store(_HEADER.pack(0))

    def _store(self, raw: bytes) -> None:
        self.seq.value += 1  # odd: being written
        memoryview(self.data).cast("B")[: len(raw)] = raw
        self.seq.value += 1

    def read(self) -> ChildReport | None:
        """The newest complete report; None if there is none (or no consistent read after a few tries)."""
        for _ in range(5):
            before = self.seq.value
            if before % 2:
                continue
            view = memoryview(self.data).cast("B")
            (size,) = _HEADER.unpack(view[: _HEADER.size])
            data = bytes(view[_HEADER.size: _HEADER.size + size]) if 0 < size <= _BOARD_SIZE - _HEADER.size else b""
            if self.seq.value != before:
                continue
            if not data:
                return None
            try:
                report = pickle.loads(data)  # noqa: S301 - written by our own child process
            except Exception:  # a torn read the sequence did not catch: skip it
                continue
            return report if isinstance(report, ChildReport) else None
        return None


class ChildContext:
    """The child's side: `publish()` its state; `stopping` is set when the parent asks it to stop."""

    def __init__(self, board: _Board) -> None:
        self._board = board
        self.stopping = asyncio.Event()

    def publish(self, state: WorkerState, counters: Mapping[str, float] | None = None) -> None:
        self._board.write(ChildReport(state=state, counters=dict(counters or {}), at=time.monotonic()))


ChildMain = Callable[..., Awaitable[None]]


async def run_worker(ctx: ChildContext, worker: PollingWorker,
                     counters: Callable[[], Mapping[str, float]] | None = None) -> None:
    """Start `worker` and publish its state until asked to stop, then stop it: every REPORT_INTERVAL,
    and within COUNTER_CHECK of a counter changing (the parent's metrics then trail the child's work by
    that much, not by a report interval)."""
    await worker.start()
    try:
        published: dict[str, float] | None = None
        due = 0.0
        while not ctx.stopping.is_set():
            values = dict(counters()) if counters else {}
            if values != published or time.monotonic() >= due:
                ctx.publish(worker.state(), values)
                published, due = values, time.monotonic() + REPORT_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stopping.wait(), COUNTER_CHECK)
    finally:
        await worker.stop()


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(1)


def _child_entry(main: ChildMain, args: tuple[Any, ...], board: _Board, parent_pid: int,
                 service: str, component: str, log_level: str, log_json: bool) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent stops us
    configure_logging(service, log_level, log_json)
    structlog.contextvars.bind_contextvars(component=component)
    tracing.configure(service)  # on when the parent's environment turns it on
    uvloop.run(_child_main(main, args, board))  # the loop uvicorn runs the service on


async def _child_main(main: ChildMain, args: tuple[Any, ...], board: _Board) -> None:
    # The parent asks a child to stop with SIGTERM: no shared lock or event, which a child killed
    # while holding it would leave locked for the parent.
    ctx = ChildContext(board)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, ctx.stopping.set)
    await main(ctx, *args)


class ChildProcess:
    """The parent's side: start, watch (readiness: `state()`), restart and stop one child loop.

    `on_report(report, previous)` is called from `state()` and the watch with each new report of the
    current child (previous: the one before from the same child, None for its first), e.g. to carry its
    counters into this process's metrics."""

    def __init__(
        self,
        name: str,
        main: ChildMain,
        args: tuple[Any, ...] = (),
        *,
        service: str,
        log_level: str = "INFO",
        log_json: bool = False,
        on_report: Callable[[ChildReport, ChildReport | None], None] | None = None,
        watch_interval: float = 0.5,
    ) -> None:
        self.name = name
        self._main = main
        self._args = args
        self._service = service
        self._log_level = log_level
        self._log_json = log_json
        self._on_report = on_report
        self._watch_interval = watch_interval
        self._board = _Board()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._spawned_at = 0.0
        self._restarts = 0
        self._restart_at: float | None = None
        self._last_exit: int | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._last_report: ChildReport | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Spawn the child and watch it; `wait_ready()` waits for its first report."""
        self._stopping = False
        self._spawn()
        self._watch = asyncio.create_task(self._watch_loop(), name=f"{self.name}-watch")

    async def wait_ready(self, timeout: float = STARTUP_GRACE) -> None:
        """Until the child has published its first report (its loop runs); RuntimeError if it exits
        first or takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self._take_report() is None:
            process = self._process
            if process is None or not process.is_alive():
                code = None if process is None else process.exitcode
                raise RuntimeError(f"{self.name}: the child process exited with code {code} before it ran")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no report from the child process in {timeout:g} s")
            await asyncio.sleep(0.02)

    def _spawn(self) -> None:
        self._board.clear()
        self._last_report = None
        self._process = _SPAWN.Process(
            target=_child_entry, name=f"{self._service}-{self.name}", daemon=True,
            args=(self._main, self._args, self._board, os.getpid(), self._service, self.name,
                  self._log_level, self._log_json),
        )
        self._process.start()
        self._spawned_at = time.monotonic()
        self._restart_at = None
        log.info("child_started", child=self.name, pid=self._process.pid)

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._watch_interval)
            self._take_report()
            process = self._process
            if process is None or self._stopping:
                continue
            if process.is_alive():
                if self._restarts and time.monotonic() - self._spawned_at > STABLE_AFTER:
                    self._restarts = 0
                continue
            if self._restart_at is None:
                self._last_exit = process.exitcode
                self._restarts += 1
                delay = backoff_delay(self._restarts, initial=1.0, maximum=RESTART_MAX)
                self._restart_at = time.monotonic() + delay
                log.error("child_exited", child=self.name, pid=process.pid, exit_code=process.exitcode,
                          restart_in=delay)
            elif time.monotonic() >= self._restart_at:
                process.join(0)
                self._spawn()

    def _take_report(self) -> ChildReport | None:
        report = self._board.read()
        if report is not None and (self._last_report is None or report.at != self._last_report.at):
            if self._on_report is not None:
                self._on_report(report, self._last_report)
            self._last_report = report
        return self._last_report

    def state(self) -> WorkerState:
        """The child loop for readiness: its own state while it reports; dead, stuck or starting else."""
        now = time.monotonic()
        process = self._process
        report = self._take_report()
        off = WorkerState(name=self.name, started=False, running=False, listening=None, consecutive_failures=0,
                          last_success_age=None, last_error=None, problem=None)
        if process is None:
            return off
        if not process.is_alive():
            restart = "" if self._restart_at is None else f", restarting in {max(0.0, self._restart_at - now):.1f} s"
            code = process.exitcode if process.exitcode is not None else self._last_exit
            return replace(off, started=True, problem=f"dead: the child process exited with code {code}{restart}",
                           last_error=None if report is None else report.state.last_error)
        if report is None:
            waited = now - self._spawned_at
            problem = None if waited < STARTUP_GRACE else f"dead: no report from the child for {waited:.0f} s"
            return replace(off, started=True, running=True, problem=problem)
        state = report.state
        silent = now - report.at
        if state.last_success_age is not None:
            state = replace(state, last_success_age=state.last_success_age + max(0.0, silent))
        if silent > STALE_AFTER and state.problem is None:
            state = replace(state, problem=f"stuck: no report from the child process for {silent:.0f} s")
        return state

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.terminate()  # SIGTERM: the child stops its loop and exits
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            log.warning("child_killed", child=self.name, pid=process.pid, after_seconds=timeout)
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self._take_report()  # its last counters
        log.info("child_stopped", child=self.name, exit_code=process.exitcode)
