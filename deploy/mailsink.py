"""A local SMTP sink: accepts every message and stores it as an ``.eml`` file.

    python -m deploy.mailsink --dir .run/mail --port 1025

Listens on 127.0.0.1 only. Each accepted message is written to ``<dir>/<UTC timestamp>-<counter>.eml``
(written to a hidden temp file first, then renamed, so a reader never sees half a message). Two
headers are prepended: ``X-Mailsink-Mail-From`` and ``X-Mailsink-Rcpt-To`` (the SMTP envelope,
which shows Bcc recipients too). Any AUTH credentials are accepted, without TLS.

Failure mode, for tests of retries: if ``<dir>/.fail`` exists when a client sends MAIL FROM, the
message is refused with ``451 4.3.0 try later``:
  * ``.fail`` containing a number N: refuse the next N messages (N goes down by one per refusal and
    the file is removed at zero);
  * ``.fail`` empty or containing ``always``: refuse every message until the file is removed.
deploy.infra.MailSink.fail_next(n) / fail_always() / recover() manage that file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

FAIL_REPLY = "451 4.3.0 try later"


class SinkHandler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._counter = itertools.count(1)

    def _should_fail(self) -> bool:
        control = self.directory / ".fail"
        try:
            content = control.read_text().strip()
        except FileNotFoundError:
            return False
        if content in ("", "always"):
            return True
        try:
            remaining = int(content)
        except ValueError:
            return True
        if remaining <= 0:
            control.unlink(missing_ok=True)
            return False
        if remaining == 1:
            control.unlink(missing_ok=True)
        else:
            tmp = self.directory / ".fail.sink.tmp"
            tmp.write_text(f"{remaining - 1}\n")
            os.replace(tmp, control)
        return True

    async def handle_MAIL(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._should_fail():
            print(f"refused MAIL FROM:<{address}> with {FAIL_REPLY}", flush=True)
            return FAIL_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        content = envelope.original_content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", errors="surrogateescape")
        header = (
            f"X-Mailsink-Mail-From: {envelope.mail_from or ''}\r\n"
            f"X-Mailsink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode("utf-8", errors="replace")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        name = f"{stamp}-{os.getpid()}-{next(self._counter):06d}.eml"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(header + content)
        os.replace(tmp, self.directory / name)
        print(f"stored {name} from <{envelope.mail_from}> to {envelope.rcpt_tos}", flush=True)
        return "250 2.0.0 OK stored"


def _accept_any_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    return AuthResult(success=True)


async def serve(directory: Path, port: int, host: str = "127.0.0.1") -> None:
    handler = SinkHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="mailsink.local",
            enable_SMTPUTF8=True,
            auth_require_tls=False,
            authenticator=_accept_any_login,
        ),
        host=host,
        port=port,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mail sink listening on smtp://{host}:{port}, storing into {directory}", flush=True)
    async with server:
        await stop.wait()
    print("mail sink stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.mailsink", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, required=True, help="directory for the .eml files")
    parser.add_argument("--port", type=int, default=1025, help="SMTP port (default 1025)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 only inside a container)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.dir.resolve(), args.port, args.host))


if __name__ == "__main__":
    main()
