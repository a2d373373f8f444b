"""Keeps the local stack alive: what ``make run`` uses after everything has started.

Every second ``Supervisor.tick()`` looks at each process it watches. One that died (a crash, an
out-of-memory kill, ``kill -9``) is reported at once with its exit code and log, restarted after a
backoff (1 s, 2 s, 4 s ... capped at 30 s; back to 1 s once it has stayed up for a minute), and
reported again when it is healthy. PostgreSQL and Kafka are watched the same way: dead is "not
answering on its port" for PostgreSQL and "its process exited" for Kafka; a restart that keeps
failing says where the log is and what to do. The services recover on their own once their
database or broker is back (readiness turns 503 meanwhile).

A restart runs in the supervisor's thread and blocks it until the process is healthy (or its start
timeout): a crash elsewhere during that time is noticed right after.

    python -m deploy.supervise --name NAME --port PORT -- COMMAND...

supervises one command alone (its output in .run/logs/NAME.log, healthy when GET
http://127.0.0.1:PORT/healthz answers 200); tests/test_supervise.py drives it with a service.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from deploy.infra import RUN_DIR, InfraError, KafkaServer, PostgresServer, ServiceProcess

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # up this long after a restart: the next crash starts the backoff over
STILL_FAILING_HINT_EVERY = 5  # failed restarts between two "here is what to do" hints


def backoff(attempt: int, *, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> float:
    """Seconds before restart number `attempt` (1-based): initial x 2^(attempt-1), capped."""
    return float(min(maximum, initial * 2 ** max(0, attempt - 1)))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Unit:
    """One supervised thing: how to tell it is alive, how to start it again, where its log is."""

    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]  # blocks until healthy; raises (InfraError, OSError) when it is not
    log: Path | None = None
    exit_code: Callable[[], int | None] = lambda: None
    hint: str = ""  # what to do when restarts keep failing
    # state
    down_since: float | None = None
    attempts: int = 0  # restarts tried since it went down (or since it last stayed up STABLE_AFTER)
    next_try: float = 0.0
    up_since: float | None = None
    restarts: int = field(default=0)  # successful restarts, over the whole run


class Supervisor:
    def __init__(self, say: Callable[[str], None] | None = None, *, clock: Callable[[], float] = time.monotonic,
                 initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 stable_after: float = STABLE_AFTER) -> None:
        self.say = say or (lambda message: print(f"[run] {message}", flush=True))
        self.clock = clock
        self.initial, self.maximum, self.stable_after = initial, maximum, stable_after
        self.units: list[Unit] = []
        self.restarts_enabled = True  # False: report a death, leave it down (`make run` --no-restart)

    # what to watch ----------------------------------------------------------------------------
    def watch(self, unit: Unit, *, running: bool = True) -> Unit:
        """`running=False`: it is down already (it failed to start): the first restart comes at once."""
        now = self.clock()
        if running:
            unit.up_since = now
        else:
            unit.down_since, unit.next_try = now, now
        self.units.append(unit)
        return unit

    def watch_service(self, service: ServiceProcess, *, running: bool = True) -> Unit:
        return self.watch(Unit(
            name=service.name, alive=lambda: service.running, restart=service.start, log=service.log_path,
            exit_code=lambda: service.returncode,
            hint=f"read {service.log_path}; fix the cause and it is started again by itself, or stop with Ctrl-C",
        ), running=running)

    def watch_postgres(self, postgres: PostgresServer) -> Unit:
        return self.watch(Unit(
            name="PostgreSQL", alive=lambda: port_answers(postgres.port), restart=postgres.start,
            log=postgres.log_path,
            hint=f"read {postgres.log_path}; another server on 127.0.0.1:{postgres.port}, a full disk or a "
                 f"damaged {postgres.data_dir} are the usual causes (`make clean-run` starts over, losing the "
                 f"local data)",
        ))

    def watch_kafka(self, kafka: KafkaServer) -> Unit:
        log = kafka.log_dir / "server.log"
        return self.watch(Unit(
            name="Kafka", alive=lambda: kafka.running, restart=kafka.start, log=log,
            hint=f"read {log} and {kafka.log_dir / 'broker.log'}; `make clean-run` starts over with empty "
                 f"topics (losing the local data)",
        ))

    # the loop ---------------------------------------------------------------------------------
    def tick(self) -> None:
        for unit in self.units:
            self._tick(unit)

    def _tick(self, unit: Unit) -> None:
        now = self.clock()
        if unit.down_since is None:
            if unit.alive():
                if unit.attempts and unit.up_since is not None and now - unit.up_since >= self.stable_after:
                    unit.attempts = 0  # it stayed up: the next crash is restarted after the shortest wait
                return
            unit.down_since = now
            unit.next_try = now + backoff(unit.attempts + 1, initial=self.initial, maximum=self.maximum)
            where = f"; log {unit.log}" if unit.log else ""
            if not self.restarts_enabled:
                unit.next_try = float("inf")
                self.say(f"WARNING: {unit.name} {describe_exit(unit.exit_code())}{where}; not restarted (--no-restart)")
                return
            self.say(f"{unit.name} {describe_exit(unit.exit_code())}{where}; restarting it in "
                     f"{unit.next_try - now:.0f}s")
            return
        if now < unit.next_try:
            return
        unit.attempts += 1
        self.say(f"{unit.name}: restarting (attempt {unit.attempts})...")
        try:
            unit.restart()
        except (InfraError, OSError) as exc:
            wait = backoff(unit.attempts + 1, initial=self.initial, maximum=self.maximum)
            unit.next_try = self.clock() + wait
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.say(f"{unit.name} did not come back ({first}); next try in {wait:.0f}s")
            if unit.hint and unit.attempts % STILL_FAILING_HINT_EVERY == 0:
                self.say(f"{unit.name} is still down after {unit.attempts} restarts: {unit.hint}")
            return
        unit.restarts += 1
        down = self.clock() - unit.down_since
        unit.down_since, unit.up_since = None, self.clock()
        self.say(f"{unit.name} is back after {down:.1f}s (restart {unit.restarts} this run)")


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.supervise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="what to call it in messages and its log file")
    parser.add_argument("--port", type=int, required=True, help="its HTTP port (GET /healthz)")
    parser.add_argument("--log-dir", type=Path, default=RUN_DIR / "logs")
    parser.add_argument("--initial", type=float, default=BACKOFF_INITIAL, help="first restart delay, seconds")
    parser.add_argument("--maximum", type=float, default=BACKOFF_MAX, help="restart delay cap, seconds")
    parser.add_argument("command", nargs="+", help="the command (after --)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    service = ServiceProcess(args.name, args.command, dict(os.environ), args.port, args.log_dir / f"{args.name}.log")
    supervisor = Supervisor(initial=args.initial, maximum=args.maximum)
    try:
        try:
            service.start()
            supervisor.say(f"{args.name} started (pid {service.pid})")
            supervisor.watch_service(service)
        except InfraError as exc:
            supervisor.say(f"{args.name} did not start ({str(exc).splitlines()[0]})")
            supervisor.watch_service(service, running=False)
        while True:
            time.sleep(0.5)
            before = service.pid
            supervisor.tick()
            if service.pid != before and service.running:
                supervisor.say(f"{args.name} pid {service.pid}")
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
