"""MIME building and SMTP delivery (aiosmtplib), with a small pool of reused connections."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, getaddresses, make_msgid, parseaddr

import aiosmtplib
import structlog

from kit.clock import utcnow
from services.notifications.config import NotificationsSettings
from services.notifications.rendering import RenderedEmail

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    maintype: str = "application"
    subtype: str = "pdf"


def mail_domain(mail_from: str) -> str:
    address = parseaddr(mail_from)[1]
    return address.rpartition("@")[2] or "localhost"


def new_message_id(mail_from: str) -> str:
    return make_msgid(domain=mail_domain(mail_from))


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable bodies in the .eml, safe for any line length


def _header(value: str) -> str | Header:
    return value if value.isascii() else Header(value, "utf-8")


# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: none may be in a header
# (a CR/LF would start a header of its own; the others break or fool mail clients).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class MessageBuildError(ValueError):
    """The message cannot be built from what we have (no retry can fix that; a person must)."""


def check_header_text(what: str, value: str) -> None:
    """Refuse a control character in text that becomes a header, naming what it is in."""
    if match := _CONTROL.search(value):
        raise MessageBuildError(f"the {what} contains a control character (U+{ord(match.group()):04X}), "
                                "which cannot go into an email header")


def build_message(
    *,
    mail_from: str,
    recipient: str,
    recipient_name: str | None,
    content: RenderedEmail,
    message_id: str,
    attachments: tuple[Attachment, ...] = (),
    headers: dict[str, str] | None = None,
    date: datetime | None = None,
) -> Message:
    """multipart/alternative (text + HTML), inside multipart/mixed when there are attachments.

    Built with the email package's compat32 classes: several times faster than EmailMessage with the
    modern policy, which matters at thousands of reminders per scan.
    """
    body = MIMEMultipart("alternative")
    # A Charset object is accepted at runtime (typeshed says str): it is what makes the bodies QP.
    body.attach(MIMEText(content.text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    body.attach(MIMEText(content.html, "html", _UTF8_QP))  # type: ignore[arg-type]
    if attachments:
        msg: Message = MIMEMultipart("mixed")
        msg.attach(body)
        for attachment in attachments:
            part = MIMEApplication(attachment.content, attachment.subtype)
            part.add_header("Content-Disposition", "attachment", filename=attachment.filename)
            msg.attach(part)
    else:
        msg = body
    check_header_text("recipient's name", recipient_name or "")
    check_header_text("recipient's address", recipient)
    check_header_text("subject", content.subject)
    for key, value in (headers or {}).items():
        check_header_text(f"{key} header", value)
    name, address = (recipient_name or "").strip(), recipient.strip()
    from_name, from_address = parseaddr(mail_from)
    msg["From"] = formataddr((from_name, from_address), charset="utf-8") if from_name else from_address
    msg["To"] = formataddr((name, address), charset="utf-8") if name else address
    msg["Subject"] = _header(content.subject)  # type: ignore[assignment]  # compat32 takes a Header
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(date or utcnow())
    for key, value in (headers or {}).items():
        msg[key] = value
    return msg


@dataclass(frozen=True)
class Outgoing:
    """A message ready for SMTP: envelope and the exact bytes sent."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


def prepare(message: Message) -> Outgoing:
    """Serialize a built message as SMTP will carry it (CRLF, compat32 as aiosmtplib does). Anything
    that cannot be written (a header the email package refuses) fails here, before any send, as a
    MessageBuildError."""
    try:
        buffer = io.BytesIO()
        BytesGenerator(buffer, policy=email_policy.compat32.clone(linesep="\r\n")).flatten(message)
    except Exception as exc:
        raise MessageBuildError(f"the message cannot be written: {type(exc).__name__}: {exc}") from exc
    recipients = tuple(addr for _, addr in getaddresses([str(v) for v in message.get_all("To", [])]))
    sender = parseaddr(str(message.get("From", "")))[1]
    if not recipients or not sender:
        raise MessageBuildError("the message has no sender or no recipient address")
    return Outgoing(sender=sender, recipients=recipients, data=buffer.getvalue())


class SmtpSendError(Exception):
    """A send failed; `code` is the SMTP reply code when there was one (None: network/timeout)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _describe(exc: BaseException) -> tuple[str, int | None]:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        first = exc.recipients[0] if exc.recipients else None
        if first is not None:
            return f"recipient refused: {first.code} {first.message}", first.code
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}", exc.code
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None


class _Connection:
    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.last_used = time.monotonic()


class SmtpMailer:
    """Sends messages over up to `size` SMTP connections, reusing an idle one when it is fresh."""

    MAX_IDLE = 10.0

    def __init__(self, settings: NotificationsSettings, size: int | None = None) -> None:
        self._settings = settings
        self._size = max(1, size or settings.delivery_concurrency)
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(self._size)

    def _client(self) -> aiosmtplib.SMTP:
        s = self._settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls,
            start_tls=s.smtp_starttls if not s.smtp_tls else False,
            validate_certs=s.smtp_validate_certs,
            timeout=s.smtp_timeout,
        )

    async def _checkout(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.client.is_connected and time.monotonic() - conn.last_used < self.MAX_IDLE:
                return conn, True
            await self._discard(conn)
        client = self._client()
        await client.connect()
        return _Connection(client), False

    async def _discard(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            if conn.client.is_connected:
                await asyncio.wait_for(conn.client.quit(), 2)
        with contextlib.suppress(Exception):
            conn.client.close()

    async def send(self, mail: Outgoing) -> str:
        """Send one prepared message; returns the server's reply. Raises SmtpSendError on any failure."""
        async with self._slots:
            for fresh_retry in (False, True):
                conn: _Connection | None = None
                reused = False
                try:
                    conn, reused = await self._checkout()
                    errors, reply = await conn.client.sendmail(mail.sender, list(mail.recipients), mail.data)
                    if errors:  # some recipients refused (we only have one, so this means refused)
                        code, text = next(iter(errors.values()))
                        raise SmtpSendError(f"recipient refused: {code} {text}", code)
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
                    return reply
                except SmtpSendError:
                    if conn is not None:
                        await self._reset_or_discard(conn)
                    raise
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    if conn is not None:
                        await self._reset_or_discard(conn, broken=not isinstance(
                            exc, aiosmtplib.SMTPResponseException))
                    # A reused connection the server had silently closed: try once on a new one.
                    if reused and not fresh_retry and isinstance(
                        exc, aiosmtplib.SMTPServerDisconnected | ConnectionError
                    ):
                        continue
                    description, reply_code = _describe(exc)
                    raise SmtpSendError(description, reply_code) from exc
        raise SmtpSendError("unreachable")  # pragma: no cover

    async def _reset_or_discard(self, conn: _Connection, broken: bool = False) -> None:
        """After a refused message the session can go on (RSET); after a network error it cannot."""
        if not broken and conn.client.is_connected:
            try:
                await asyncio.wait_for(conn.client.rset(), 5)
                conn.last_used = time.monotonic()
                self._idle.append(conn)
                return
            except Exception:  # noqa: BLE001
                pass
        await self._discard(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn)
