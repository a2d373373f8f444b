"""kit.child: a loop in a child process reports to its parent, is restarted when it dies, stops when
asked, and dies with a parent killed by SIGKILL (no orphan)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.infra import pid_alive
from kit.child import ChildContext, ChildProcess, ChildReport
from kit.worker import WorkerState

REPO = Path(__file__).resolve().parents[2]


async def counting_child(ctx: ChildContext, step: int) -> None:
    """Publishes a healthy state and a counter growing by `step` until asked to stop."""
    count = 0
    while not ctx.stopping.is_set():
        count += step
        ctx.publish(WorkerState(name="counter", started=True, running=True, listening=None, consecutive_failures=0,
                                last_success_age=0.0, last_error=None, problem=None, runs=count),
                    {"count": float(count)})
        await asyncio.sleep(0.05)


async def failing_child(ctx: ChildContext) -> None:
    raise RuntimeError("this child fails at once")


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_reports_restarts_and_stops() -> None:
    seen: list[float] = []

    def carry(report: ChildReport, previous: ChildReport | None) -> None:
        seen.append(report.counters["count"] - (previous.counters["count"] if previous else 0.0))

    child = ChildProcess("counter", counting_child, (2,), service="kit-test", on_report=carry, watch_interval=0.1)
    await child.start()
    try:
        await child.wait_ready()
        await _until(lambda: child.state().runs >= 4)
        state = child.state()
        assert state.name == "counter" and state.ok and state.running, state
        first_pid = child.pid
        assert first_pid is not None
        # Every count the child made reached the parent once: the deltas add up to its last count.
        await _until(lambda: len(seen) >= 2)
        runs = child.state().runs  # takes the newest report, and carries it, first
        assert sum(seen) == runs

        os.kill(first_pid, signal.SIGKILL)
        await _until(lambda: not child.state().ok)
        assert child.state().problem is not None and child.state().problem.startswith("dead: the child process")
        await _until(lambda: child.pid != first_pid and child.state().ok and child.state().runs > 0)
    finally:
        await child.stop()
    assert child.pid is not None and not pid_alive(child.pid)


async def test_a_failing_child_is_dead_for_readiness() -> None:
    child = ChildProcess("failing", failing_child, service="kit-test", watch_interval=0.1)
    await child.start()
    try:
        with pytest.raises(RuntimeError, match="exited with code 1 before it ran"):
            await child.wait_ready()
        await _until(lambda: child.state().problem is not None)
        problem = child.state().problem
        assert problem is not None and "exited with code 1" in problem, problem
    finally:
        await child.stop()


_PARENT = """
import asyncio, sys
import pytest

from kit.child import ChildProcess
from kit.tests.test_child import counting_child

async def main():
    child = ChildProcess("counter", counting_child, (1,), service="kit-test")
    await child.start()
    while not child.state().runs:
        await asyncio.sleep(0.05)
    print("CHILD", child.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_child_dies_with_a_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = ""
        while not line.startswith("CHILD "):  # the parent's log lines come first
            line = parent.stdout.readline()
            assert line, "the parent ended before its child reported"
        child_pid = int(line.split()[1])
        assert pid_alive(child_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child_pid), "the child outlived its killed parent"
    finally:
        parent.kill()
