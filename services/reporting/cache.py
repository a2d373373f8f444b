"""A dashboard under load: identical report requests within a second share one computation.

The read models only change when the feed applies events, so a report is kept for
`REPORTING_REPORT_CACHE_SECONDS` (1 s; 0 turns it off) or until this process's feed applies the next
batch, whichever comes first; concurrent identical requests wait for the one computation in flight
instead of each running it. A replica without the feed (or a rebuild in another process) is at most
that long behind. `Cache-Control: no-cache` on a request computes it afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class ReportCache:
    def __init__(self, seconds: float, generation: Callable[[], int], *, size: int = 256) -> None:
        self.seconds = seconds
        self.generation = generation
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[float, int, Any]] = OrderedDict()
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]], *, fresh: bool = False) -> T:
        if self.seconds <= 0 or fresh:
            return await compute()
        now, generation = time.monotonic(), self.generation()
        held = self._entries.get(key)
        if held is not None and held[0] > now and held[1] == generation:
            self._entries.move_to_end(key)
            return held[2]  # type: ignore[no-any-return]
        running = self._running.get(key)
        if running is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request was cancelled
                return await compute()  # the one computing went away: compute it here

        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            value = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as unhandled
            raise
        finally:
            self._running.pop(key, None)
        future.set_result(value)
        self._entries[key] = (now + self.seconds, generation, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value
