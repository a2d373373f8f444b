"""The supervised local stack (deploy/supervise.py, used by `make run`): a process that dies is
reported and restarted with a capped backoff; PostgreSQL too.

The first tests drive the Supervisor with a fake clock (the backoff, the messages, giving up never);
the last two kill -9 real processes: a gateway under `python -m deploy.supervise`, and a PostgreSQL
server of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.infra import InfraError, PostgresServer, free_port
from deploy.supervise import Supervisor, Unit, backoff, describe_exit, port_answers

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A process stand-in: dies when told, and its restart fails `failures` times first."""

    def __init__(self, failures: int = 0) -> None:
        self.up = True
        self.failures = failures
        self.restarts = 0

    def alive(self) -> bool:
        return self.up

    def restart(self) -> None:
        self.restarts += 1
        if self.failures:
            self.failures -= 1
            raise InfraError("port 8001 still busy\nmore detail")
        self.up = True


def supervised(flaky: Flaky) -> tuple[Supervisor, Clock, list[str]]:
    clock, said = Clock(), []
    supervisor = Supervisor(said.append, clock=clock)
    supervisor.watch(Unit("invoice", flaky.alive, flaky.restart, Path("/logs/invoice.log"), exit_code=lambda: -9,
                          hint="read the log"))
    return supervisor, clock, said


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_a_dead_process_is_reported_then_restarted_after_the_backoff() -> None:
    flaky = Flaky()
    supervisor, clock, said = supervised(flaky)
    supervisor.tick()
    assert said == [] and flaky.restarts == 0
    flaky.up = False
    supervisor.tick()
    assert said == ["invoice was killed by SIGKILL; log /logs/invoice.log; restarting it in 1s"]
    supervisor.tick()
    assert flaky.restarts == 0  # not before its time
    clock.now += 1
    supervisor.tick()
    assert flaky.restarts == 1 and flaky.up
    assert said[-1] == "invoice is back after 1.0s (restart 1 this run)"


def test_failed_restarts_back_off_up_to_the_cap_and_say_what_to_do() -> None:
    flaky = Flaky(failures=7)
    supervisor, clock, said = supervised(flaky)
    flaky.up = False
    supervisor.tick()
    waits = []
    for _ in range(8):
        unit = supervisor.units[0]
        clock.now = unit.next_try
        supervisor.tick()
        waits.append(unit.next_try - clock.now)
    assert flaky.restarts == 8 and flaky.up
    assert waits[:7] == [2, 4, 8, 16, 30, 30, 30]
    assert "invoice did not come back (port 8001 still busy); next try in 2s" in said
    assert "invoice is still down after 5 restarts: read the log" in said
    assert said[-1].startswith("invoice is back after")


def test_the_backoff_starts_over_once_it_stayed_up() -> None:
    flaky = Flaky()
    supervisor, clock, said = supervised(flaky)
    for _ in range(2):  # crash, restart at once: the second crash waits longer
        flaky.up = False
        supervisor.tick()
        clock.now = supervisor.units[0].next_try
        supervisor.tick()
    assert "restarting it in 2s" in said[-3]
    clock.now += 61
    supervisor.tick()
    flaky.up = False
    supervisor.tick()
    assert said[-1].endswith("restarting it in 1s")


def test_no_restart_reports_and_leaves_it_down() -> None:
    flaky = Flaky()
    supervisor, clock, said = supervised(flaky)
    supervisor.restarts_enabled = False
    flaky.up = False
    supervisor.tick()
    clock.now += 3600
    supervisor.tick()
    assert flaky.restarts == 0 and said == [
        "WARNING: invoice was killed by SIGKILL; log /logs/invoice.log; not restarted (--no-restart)"]


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_a_killed_service_comes_back_by_itself(database_url_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "GATEWAY_DATABASE_URL": database_url_factory("supervise"), "GATEWAY_PORT": str(port),
           "GATEWAY_HOST": "127.0.0.1", "GATEWAY_JWT_SECRET": "supervise-test-secret-long-enough-for-hs256"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.supervise", "--name", "gateway", "--port", str(port), "--log-dir",
         str(tmp_path), "--", sys.executable, "-m", "services.gateway"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()

    def said(fragment: str) -> str | None:
        return next((line for line in list(lines) if fragment in line), None)

    try:
        started = _wait(lambda: said("gateway started (pid "), 90, "the first start")
        first_pid = int(started.split("pid ")[1].rstrip(")\n"))
        assert _healthy(port)
        os.kill(first_pid, signal.SIGKILL)
        _wait(lambda: said("gateway was killed by SIGKILL"), 15, "the death to be reported")
        back = _wait(lambda: said("gateway is back after"), 90, "the restart")
        assert "restart 1 this run" in back
        new_pid = int(_wait(lambda: said("gateway pid "), 10, "the new pid").split("pid ")[1])
        assert new_pid != first_pid and _healthy(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "[run] gateway was killed by SIGKILL" in "".join(lines)
    _wait(lambda: not _healthy(port), 10, "the supervisor to stop the service it started")


@pytest.mark.infra
def test_a_killed_postgres_is_reported_and_restarted(tmp_path: Path) -> None:
    postgres = PostgresServer(tmp_path / "pg", free_port(), fast=True)
    postgres.start()
    said: list[str] = []
    supervisor = Supervisor(said.append, initial=0.5, maximum=2.0)
    supervisor.watch_postgres(postgres)
    try:
        postmaster = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        _wait(lambda: not port_answers(postgres.port), 10, "postgres to go")

        def back() -> bool:
            supervisor.tick()
            return any("PostgreSQL is back" in line for line in said)

        _wait(back, 90, "postgres to be restarted")
        assert said[0].startswith("PostgreSQL stopped answering; log ")
        assert port_answers(postgres.port)
        assert postgres.create_database("after_restart").endswith("/after_restart")
    finally:
        postgres.stop()
