"""kit.worker: one backoff policy, and a polling worker woken by NOTIFY that listens again after
its LISTEN connection is killed (as a PostgreSQL restart does), on real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from kit.worker import PollingWorker, asyncpg_dsn, backoff_delay


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(n, initial=1, maximum=10) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_delay(0, initial=0.2, maximum=5) == 0.2
    assert backoff_delay(40, initial=2, maximum=3600) == 3600


class Counter(PollingWorker):
    name = "counter"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.runs = 0
        self.fail_next = 0

    async def run_once(self) -> int:
        self.runs += 1
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("database down")
        return 0


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_notify_wakes_and_listen_is_restored_after_the_connection_dies(
    database_url_factory: Callable[[str], str],
) -> None:
    url = database_url_factory("kitworker")
    # A long poll interval: a run within a second can only come from a NOTIFY.
    worker = Counter(database_url=url, channel="kit_test", poll_interval=30.0)
    await worker.start()
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await _until(lambda: worker.runs == 1)
        await conn.execute("SELECT pg_notify('kit_test', '')")
        await _until(lambda: worker.runs == 2, timeout=3)
        assert worker.listening
        first = worker._listener

        # Kill the LISTEN connection as a database restart would. Its loss wakes the loop, which
        # listens again at once (too fast to catch it deaf): a new connection replaces the killed one.
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'")
        assert killed == 1
        await _until(lambda: first is not None and first.is_closed(), timeout=3)
        await _until(lambda: worker.listening and worker._listener is not first, timeout=5)
        before = worker.runs
        await conn.execute("SELECT pg_notify('kit_test', '')")
        await _until(lambda: worker.runs > before, timeout=3)
    finally:
        await conn.close()
        await worker.stop()


async def test_failures_back_off_and_recover() -> None:
    worker = Counter(poll_interval=0.05, max_error_backoff=0.2)
    worker.fail_next = 3
    await worker.start()
    try:
        await _until(lambda: worker.runs >= 5)
        assert worker.consecutive_failures == 0 and worker.last_success is not None
    finally:
        await worker.stop()
