"""Pure unit tests: settings, formatting, templates, MIME building, backoff, tokens, scan window."""

from __future__ import annotations

import email
import email.policy
import uuid
from datetime import date
from email.message import EmailMessage, Message

import pytest

from contracts.notification import NotificationKind, NotificationOpenedV1
from kit.worker import backoff_delay
from services.notifications.config import NotificationsSettings
from services.notifications.mailer import Attachment, build_message, mail_domain, new_message_id
from services.notifications.rendering import Renderer, long_date, money
from services.notifications.repository import ReminderWindow
from services.notifications.service import PIXEL_GIF, NotificationService, new_token, valid_token
from services.notifications.tests.conftest import FAKE_PDF, snapshot


class NeverAsked:
    """No scan runs here: the invoice service is never asked."""

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        raise AssertionError(f"mark_overdue({as_of}) called in a unit test")


def settings(**kw: object) -> NotificationsSettings:
    return NotificationsSettings(
        public_url="https://pay.example.com", portal_url="https://pay.example.com/portal", **kw  # type: ignore[arg-type]
    )


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFICATIONS_REMINDER_DAYS_BEFORE", "1, 7,3")
    monkeypatch.setenv("NOTIFICATIONS_OVERDUE_MAX_NOTICES", "2")
    monkeypatch.setenv("NOTIFICATIONS_INVOICE_URL", "http://invoice:8001")
    monkeypatch.setenv("SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("SMTP_PORT", "587")
    monkeypatch.setenv("SMTP_USERNAME", "apikey")
    monkeypatch.setenv("SMTP_PASSWORD", "secret")
    monkeypatch.setenv("SMTP_STARTTLS", "true")
    monkeypatch.setenv("MAIL_FROM", "Agency <billing@agency.example>")
    monkeypatch.setenv("BILLING_INTERNAL_TOKEN", "tok")
    s = NotificationsSettings()
    assert s.reminder_days_before == [7, 3, 1]
    assert s.overdue_max_notices == 2
    assert s.invoice_url == "http://invoice:8001"
    assert (s.smtp_host, s.smtp_port, s.smtp_username, s.smtp_password) == ("smtp.example.com", 587, "apikey", "secret")
    assert s.smtp_starttls is True and s.smtp_tls is False
    assert s.mail_from == "Agency <billing@agency.example>"
    assert s.internal_token == "tok"
    assert s.port == 8004


def test_settings_reject_non_positive_days() -> None:
    with pytest.raises(ValueError):
        NotificationsSettings(reminder_days_before="7,0")


def test_money_and_dates() -> None:
    assert money(123456, "EUR") == "€1,234.56"
    assert money(1500, "JPY") == "¥1,500"
    assert money(5, "usd") == "$0.05"
    assert money(None, "EUR") == ""
    assert long_date("2026-03-31") == "March 31, 2026"
    assert long_date(date(2026, 1, 2)) == "January 2, 2026"


def test_tokens_are_unguessable_and_validated() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(valid_token(t) and len(t) >= 32 for t in tokens)
    for bad in ("", "short", "../../etc/passwd", "a" * 65, "x" * 30 + "'; drop"):
        assert not valid_token(bad)
    assert PIXEL_GIF.startswith(b"GIF89a") and len(PIXEL_GIF) == 43


def test_message_ids_use_the_sender_domain() -> None:
    assert mail_domain("Billing <billing@agency.example>") == "agency.example"
    mid = new_message_id("billing@agency.example")
    assert mid.startswith("<") and mid.endswith("@agency.example>")
    assert new_message_id("billing@agency.example") != mid


def _context(kind: str, snap: dict, **context: object) -> dict:
    svc = NotificationService(settings(), invoices=NeverAsked())
    return svc.email_context(
        kind=kind, token="T" * 32, invoice_id=snap["id"], recipient=snap["clientEmail"],
        recipient_name=snap["clientName"], context=dict(context), invoice_snapshot=snap,
    )


@pytest.mark.parametrize(
    ("kind", "context", "subject_part", "body_part"),
    [
        (NotificationKind.INVOICE_SENT, {}, "Invoice 2026-0042 from Billing", "Please find attached invoice 2026-0042"),
        (
            NotificationKind.PAYMENT_RECEIPT,
            {"payment": {"amount": 5000, "currency": "EUR", "method": "bank_transfer", "paidAt": "2026-03-20"}},
            "Payment received for invoice 2026-0042",
            "We received your payment of €50.00 on March 20, 2026 (bank transfer)",
        ),
        (
            NotificationKind.PAYMENT_FAILED,
            {"payment": {"amount": 12000, "currency": "EUR", "failureReason": "card declined"}},
            "Payment failed for invoice 2026-0042: please try again",
            "did not go through: card declined",
        ),
        (NotificationKind.INVOICE_CANCELLED, {}, "Invoice 2026-0042 has been cancelled", "You do not need to pay it"),
        (
            NotificationKind.REMINDER_BEFORE_DUE,
            {"reminder": {"kind": "before_due", "sequence": 7, "asOf": "2026-03-24"}},
            "Reminder: invoice 2026-0042 is due in 7 days",
            "is due in 7 days, on March 31, 2026",
        ),
        (
            NotificationKind.REMINDER_BEFORE_DUE,
            {"reminder": {"kind": "before_due", "sequence": 1, "asOf": "2026-03-30"}},
            "is due tomorrow",
            "is due tomorrow",
        ),
        (
            NotificationKind.REMINDER_OVERDUE,
            {"reminder": {"kind": "overdue", "sequence": 2, "asOf": "2026-04-08"}},
            "Overdue: invoice 2026-0042 was due on March 31, 2026 (notice 2)",
            "is now 8 days overdue",
        ),
    ],
)
def test_every_kind_renders_subject_text_and_html(kind: str, context: dict, subject_part: str, body_part: str) -> None:
    snap = snapshot(number="2026-0042", due=date(2026, 3, 31), total=120_00, name="Acme <Ltd> & Co")
    rendered = Renderer().render(kind, _context(kind, snap, **context))
    assert subject_part in rendered.subject
    assert "\n" not in rendered.subject
    assert body_part in rendered.text
    assert "Hello Acme <Ltd> & Co," in rendered.text
    # HTML: escaped names, the tracking pixel, the tracked link (never the raw portal URL).
    assert "Acme &lt;Ltd&gt; &amp; Co" in rendered.html
    assert 'src="https://pay.example.com/t/o/' + "T" * 32 + '.gif"' in rendered.html
    assert "https://pay.example.com/t/l/" + "T" * 32 in rendered.html
    assert "https://pay.example.com/t/l/" + "T" * 32 in rendered.text
    assert "€120.00" in rendered.text


def test_view_and_pay_only_while_money_is_due() -> None:
    unpaid = snapshot(total=100_00)
    paid = snapshot(total=100_00, paid=100_00, status="PAID")
    renderer = Renderer()
    assert "View and pay" in renderer.render("invoice_sent", _context("invoice_sent", unpaid)).html
    receipt = renderer.render(
        "payment_receipt",
        _context("payment_receipt", paid, payment={"amount": 100_00, "currency": "EUR", "method": "card"}),
    )
    assert "View and pay" not in receipt.html and "paid in full" in receipt.text


def test_subject_cannot_inject_headers() -> None:
    snap = snapshot(number="X\r\nBcc: victim@example.com")
    subject = Renderer().subject("invoice_sent", _context("invoice_sent", snap))
    assert "\r" not in subject and "\n" not in subject


def _as_received(msg: Message) -> EmailMessage:
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_build_message_has_both_parts_the_pdf_and_our_message_id() -> None:
    content = Renderer().render("invoice_sent", _context("invoice_sent", snapshot(number="2026-0001")))
    msg = _as_received(build_message(
        mail_from="Billing <billing@agency.example>",
        recipient="client@acme.example.com",
        recipient_name="Acme, Ltd",
        content=content,
        message_id="<fixed@agency.example>",
        attachments=(Attachment("invoice-2026-0001.pdf", FAKE_PDF),),
        headers={"X-Billing-Kind": "invoice_sent"},
    ))
    assert msg["Message-ID"] == "<fixed@agency.example>"
    assert msg["To"].addresses[0].addr_spec == "client@acme.example.com"
    assert msg["To"].addresses[0].display_name == "Acme, Ltd"
    assert msg["X-Billing-Kind"] == "invoice_sent"
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_body(("plain",)).get_content() == content.text
    assert msg.get_body(("html",)).get_content() == content.html
    [pdf] = list(msg.iter_attachments())
    assert pdf.get_filename() == "invoice-2026-0001.pdf"
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_content() == FAKE_PDF


def test_build_message_without_attachment_and_with_non_ascii() -> None:
    snap = snapshot(number="2026-0002", name="Zoë Ünal — Café Ω")
    content = Renderer().render("invoice_cancelled", _context("invoice_cancelled", snap))
    msg = _as_received(build_message(
        mail_from="Fakturering Åsa <billing@agency.example>", recipient="zoe@cafe.example",
        recipient_name="Zoë Ünal — Café Ω", content=content, message_id="<x@agency.example>",
    ))
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["To"].addresses[0].display_name == "Zoë Ünal — Café Ω"
    assert msg["From"].addresses[0].display_name == "Fakturering Åsa"
    assert msg["Subject"] == content.subject
    assert "Hello Zoë Ünal — Café Ω," in msg.get_body(("plain",)).get_content()
    assert list(msg.iter_attachments()) == []


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(n, initial=5.0, maximum=600.0) for n in range(1, 12)]  # delivery's retry policy
    assert 4.0 <= delays[0] <= 6.0
    assert 8.0 <= delays[1] <= 12.0
    assert all(d <= 720.0 for d in delays)
    assert delays[-1] >= 480.0


def test_reminder_window_bounds() -> None:
    w = ReminderWindow(as_of=date(2026, 4, 1), days_before=(7, 1), repeat=7, max_notices=4)
    assert w.hi == date(2026, 4, 8)
    assert w.lo == date(2026, 3, 4)
    none = ReminderWindow(as_of=date(2026, 4, 1), days_before=(), repeat=7, max_notices=0)
    assert none.lo == none.hi == date(2026, 4, 1)


def test_opened_event_contract_is_camel_case() -> None:
    data = NotificationOpenedV1(
        message_id=str(uuid.uuid4()), invoice_id="inv", kind="invoice_sent",
        opened_at="2026-03-01T10:00:00Z", recipient="a@b.c",
    ).model_dump(mode="json", by_alias=True)
    assert set(data) >= {"messageId", "invoiceId", "kind", "openedAt", "recipient"}
