"""An open-loop load generator: requests fired at their due times by the clock, not when a worker is free.

httpx is not used here: its connection pool scans every waiting request on every change
(httpcore `_assign_requests_to_connections`), so once a few thousand requests were due at once the
sender spent all its time there and stopped sending (seen in the first steady run). `RawHttp` keeps
idle keep-alive connections on a stack and waiting senders behind a semaphore: O(1) per request.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class StaleConnection(Exception):
    """A reused keep-alive connection the server had closed before answering (safe to send again)."""


class RawHttp:
    """Minimal HTTP/1.1 client for one origin (loopback, no TLS), keep-alive, at most `max_connections`."""

    def __init__(self, base_url: str, max_connections: int) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self.opened = 0

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        return await self.request("POST", path, body, headers)

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        return await self.request("GET", path, b"", headers)

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        length = f"Content-Length: {len(body)}\r\n" if body or method != "GET" else ""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{length}"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")
        async with self._slots:
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._open()
                try:
                    status, answer, keep = await self._exchange(conn, head + body, reused)
                except StaleConnection:
                    conn[1].close()
                    continue
                except BaseException:
                    conn[1].close()
                    raise
                if keep:
                    self._idle.append(conn)
                else:
                    conn[1].close()
                return status, answer

    async def _open(self) -> Connection:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    @staticmethod
    async def _exchange(conn: Connection, request: bytes, reused: bool) -> tuple[int, bytes, bool]:
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
        except (ConnectionResetError, BrokenPipeError):
            # The server closed an idle keep-alive connection (uvicorn after 5 s) as we reused it: it
            # read nothing, so sending again on a new connection is safe. A new connection that is
            # reset is a real error.
            if reused:
                raise StaleConnection from None
            raise
        if not status_line:
            if reused:
                raise StaleConnection
            raise ConnectionError("the server closed the connection without an answer")
        status = int(status_line.split(b" ", 2)[1])
        raw_headers = await reader.readuntil(b"\r\n\r\n")
        headers: dict[bytes, bytes] = {}
        for line in raw_headers.split(b"\r\n"):
            if b":" in line:
                key, _, value = line.partition(b":")
                headers[key.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")  # no trailers from the services
            answer = b"".join(chunks)
        else:
            answer = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        return status, answer, headers.get(b"connection", b"").lower() != b"close"

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


@dataclass
class SteadyResult:
    sent: int
    acks: list[float]  # due time -> answer 200, seconds
    lateness: list[float]  # due time -> the sender starting the request, seconds
    errors: int
    send_span: float  # first due -> last request started
    ack_span: float  # first due -> last answer
    max_in_flight: int


async def steady_load(label: str, items: Sequence[Any], send: Callable[[Any, float], Awaitable[None]],
                      rate: float) -> SteadyResult:
    """Item k is fired at start + k / rate by the clock, whether or not earlier ones were answered.

    `send(item, due)` gets its due time on the time.time() scale. A sender that cannot keep up shows
    as lateness (due -> started), not as a lower rate hidden behind the answers' latency."""
    loop = asyncio.get_running_loop()
    to_wall = time.time() - loop.time()
    start = loop.time() + 0.2
    acks: list[float] = []
    lateness: list[float] = []
    errors = 0
    in_flight = max_in_flight = 0
    last_fired = last_answer = start
    tasks: set[asyncio.Task[None]] = set()

    async def fire(item: Any, due: float) -> None:
        nonlocal errors, in_flight, max_in_flight, last_fired, last_answer
        last_fired = loop.time()
        lateness.append(last_fired - due)
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await send(item, due + to_wall)
        except Exception as exc:
            errors += 1
            if errors <= 3:
                print(f"  [{label}] error: {exc!r}", file=sys.stderr)
        else:
            last_answer = loop.time()
            acks.append(last_answer - due)
        finally:
            in_flight -= 1

    for k, item in enumerate(items):
        due = start + k / rate
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        task = loop.create_task(fire(item, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return SteadyResult(len(items), acks, lateness, errors, last_fired - start, last_answer - start, max_in_flight)
