"""Subscription emails: "your trial ends on <date>" once per subscription and trial end, "update your
card" once per Stripe invoice whose renewal charge failed (never once it is paid, never to a Stripe
customer that is no client of ours), and the invoice email of an invoice already paid when it goes out.

On real Kafka (events published as the subscriptions and payments services publish them), PostgreSQL
and the SMTP sink; the deterministic cases (what is queued, then skipped) through the consumer path.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.notification import NotificationKind
from contracts.stripe import StripeEventType, StripeInvoiceLineV1, StripeInvoiceV1
from contracts.subscription import SubscriptionEventType, SubscriptionSnapshotV1, SubscriptionStatus
from deploy.infra import MailSink
from services.notifications.app import create_app
from services.notifications.config import NotificationsSettings
from services.notifications.invoices import InvoiceServiceClient
from services.notifications.rendering import Renderer
from services.notifications.service import NotificationService
from services.notifications.tests.conftest import (
    ADMIN,
    FakeInvoiceService,
    Mailbox,
    invoice_event,
    publish,
    snapshot,
)
from services.notifications.tests.test_delivery import Harness, make_harness

PORTAL = "http://billing.example.com/portal"
TRIAL_END = datetime(2026, 3, 18, 10, 0, tzinfo=UTC)


def unique_email(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}@client.example.com"


def subscription(client_id: str, email: str | None, **fields: Any) -> SubscriptionSnapshotV1:
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()), "version": 3, "client_id": client_id, "client_name": "Acme <Ltd> & Co",
        "client_email": email, "plan_id": str(uuid.uuid4()), "plan_name": "Retainer <Pro>",
        "price_id": str(uuid.uuid4()), "status": SubscriptionStatus.TRIALING, "quantity": 1, "currency": "EUR",
        "unit_amount": 3_000, "interval": "month", "interval_count": 1, "collection_method": "charge_automatically",
        "current_period_start": TRIAL_END - timedelta(days=14), "current_period_end": TRIAL_END,
        "trial_start": TRIAL_END - timedelta(days=14), "trial_end": TRIAL_END,
        "stripe_subscription_id": f"sub_{uuid.uuid4().hex[:12]}", "stripe_customer_id": "cus_test",
        "occurred_at": datetime.now(UTC),
    }
    values.update(fields)
    return SubscriptionSnapshotV1(**values)


def subscription_event(event_type: SubscriptionEventType, snap: SubscriptionSnapshotV1) -> CloudEvent:
    return CloudEvent.create(source="subscriptions", type=event_type, subject=snap.id, data=snap)


def stripe_invoice_event(event_type: StripeEventType, *, invoice_id: str, subscription_id: str,
                         client_id: str | None, amount: int = 3_000, **fields: Any) -> CloudEvent:
    paid = event_type == StripeEventType.INVOICE_PAID
    values: dict[str, Any] = {
        "stripe_event_id": f"evt_{uuid.uuid4().hex[:16]}", "stripe_event_type": event_type.removeprefix("stripe."),
        "stripe_event_created": datetime.now(UTC), "invoice_id": invoice_id, "subscription_id": subscription_id,
        "customer_id": "cus_test", "client_id": client_id, "status": "paid" if paid else "open",
        "currency": "EUR", "subtotal": amount, "tax": 0, "total": amount, "amount_due": amount,
        "amount_paid": amount if paid else 0, "amount_remaining": 0 if paid else amount,
        "billing_reason": "subscription_cycle", "attempt_count": 1,
        "next_payment_attempt": None if paid else datetime(2026, 3, 21, 10, 0, tzinfo=UTC),
        "paid_at": datetime.now(UTC) if paid else None,
        "lines": [StripeInvoiceLineV1(id="il_1", description="1 × Retainer", amount=amount, currency="EUR")],
    }
    values.update(fields)
    return CloudEvent.create(source="payments", type=event_type, subject=subscription_id,
                             data=StripeInvoiceV1(**values))


def our_invoice(stripe_invoice_id: str, email: str, client_id: str) -> dict[str, Any]:
    """Our invoice of the Stripe invoice, as invoice.* snapshots carry it."""
    snap = snapshot(email_=email, name="Acme <Ltd> & Co", total=3_000, number=f"2026-{uuid.uuid4().int % 9000 + 1000}")
    return {**snap, "clientId": client_id, "stripeInvoiceId": stripe_invoice_id}


def kind_of(messages: list[EmailMessage], kind: NotificationKind) -> list[EmailMessage]:
    return [m for m in messages if m.get("X-Billing-Kind") == kind.value]


def tracked_link(mail: EmailMessage) -> str:
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    found = re.search(r'href="http://billing\.example\.com(/t/l/[A-Za-z0-9_-]+)"', html)
    assert found, html
    return found.group(1)


# -- on Kafka --------------------------------------------------------------------------------------


class KafkaApp:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def link_target(self, mail: EmailMessage) -> str:
        response = await self.http.get(tracked_link(mail), follow_redirects=False)
        assert response.status_code == 302
        return response.headers["location"]


@pytest.fixture(scope="module")
async def kafka_app(
    kafka: Any, database_url_factory: Callable[[str], str], mail_sink: MailSink,
    fake_invoice_service: FakeInvoiceService,
) -> AsyncIterator[KafkaApp]:
    settings = NotificationsSettings(
        database_url=database_url_factory("notifications_subscriptions"), kafka_bootstrap=kafka.bootstrap,
        consumer_group=f"notifications-subs-{uuid.uuid4().hex[:8]}", smtp_host=mail_sink.host,
        smtp_port=mail_sink.port, mail_from="Billing <billing@agency.example.com>",
        invoice_url=fake_invoice_service.url, scan_interval=0, delivery_poll_interval=0.2, retry_base_delay=0.2,
        retry_max_delay=1.0, pdf_retry_base_delay=0.1, pdf_max_attempts=2, recipient_wait_attempts=3,
        outbox_poll_interval=0.3, public_url="http://billing.example.com", portal_url=PORTAL,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifications", headers=ADMIN) as http:
            yield KafkaApp(http)


async def test_trial_will_end_emails_the_client_once_per_trial_end(
    kafka_app: KafkaApp, producer: AIOKafkaProducer, mailbox: Mailbox
) -> None:
    email = unique_email("trial")
    snap = subscription(str(uuid.uuid4()), email)
    notice = subscription_event(SubscriptionEventType.TRIAL_WILL_END, snap)
    await publish(producer, topics.SUBSCRIPTION, notice, snap.id)
    await publish(producer, topics.SUBSCRIPTION, notice, snap.id)  # the same event again
    # ... and the same notice announced again under a new event id (Stripe redelivered it)
    again = subscription_event(SubscriptionEventType.TRIAL_WILL_END, snap)
    await publish(producer, topics.SUBSCRIPTION, again, snap.id)
    await mailbox.wait(lambda _: bool(mailbox.to(email)), "the trial email", timeout=40)
    await asyncio.sleep(2)
    [mail] = mailbox.to(email)
    assert mail["X-Billing-Kind"] == "trial_will_end"
    assert mail["Subject"] == "Your Billing trial of Retainer <Pro> ends on March 18, 2026"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Your trial of Retainer <Pro> ends on March 18, 2026." in text
    assert "continues at €30.00 per month" in text
    assert "Manage your subscription: http://billing.example.com/t/l/" in text
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Retainer &lt;Pro&gt;" in html and "Acme &lt;Ltd&gt; &amp; Co" in html and "<Pro>" not in html
    assert await kafka_app.link_target(mail) == f"{PORTAL}/subscription"

    # The trial is extended: its new end gets its own notice (once), the old one nothing more.
    later = snap.model_copy(update={"trial_end": TRIAL_END + timedelta(days=7), "version": 4})
    await publish(producer, topics.SUBSCRIPTION, subscription_event(SubscriptionEventType.TRIAL_WILL_END, later),
                  snap.id)
    await mailbox.wait(lambda _: len(mailbox.to(email)) == 2, "the second trial email", timeout=40)
    await asyncio.sleep(2)
    assert sorted(m["Subject"][-14:] for m in mailbox.to(email)) == ["March 18, 2026", "March 25, 2026"]


async def test_a_failed_renewal_gives_one_update_your_card_email_and_none_once_paid(
    kafka_app: KafkaApp, producer: AIOKafkaProducer, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    email, client_id = unique_email("card"), str(uuid.uuid4())
    fake_invoice_service.clients[client_id] = {"name": "Acme <Ltd> & Co", "email": email}
    stripe_invoice_id, sub = f"in_{uuid.uuid4().hex[:16]}", subscription(client_id, email,
                                                                         status=SubscriptionStatus.PAST_DUE)
    ours = our_invoice(stripe_invoice_id, email, client_id)
    await publish(producer, topics.INVOICE, invoice_event("invoice.sent", ours), ours["id"])
    # Stripe's first failure, its retry failing again, and the subscription going past_due: one email.
    for attempt in (1, 2):
        await publish(producer, topics.STRIPE, stripe_invoice_event(
            StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stripe_invoice_id,
            subscription_id=sub.stripe_subscription_id, client_id=client_id, attempt_count=attempt),
            sub.stripe_subscription_id)
    # past_due comes on another topic, in no order with Stripe's: whichever is handled first queues
    # the one email, and it has Stripe's amount and retry date either way (past_due's waits for them).
    past_due = sub.model_copy(update={"latest_stripe_invoice_id": stripe_invoice_id})
    await publish(producer, topics.SUBSCRIPTION, subscription_event(SubscriptionEventType.PAST_DUE, past_due), sub.id)
    await mailbox.wait(lambda ms: bool(kind_of(mailbox.to(email), NotificationKind.CARD_UPDATE)),
                       "the update-your-card email", timeout=40)
    await asyncio.sleep(2)
    [mail] = kind_of(mailbox.to(email), NotificationKind.CARD_UPDATE)
    assert mail["Subject"] == "Action needed: update your card for your Billing subscription"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "We could not charge your card for €30.00" in text and "we will try again on March 21, 2026" in text
    assert "Update your card: http://billing.example.com/t/l/" in text and "View and pay" not in text
    assert await kafka_app.link_target(mail) == f"{PORTAL}/subscription"

    # Paid at last: a later failure notice of the same invoice (one that overtook the payment) mails nothing.
    await publish(producer, topics.STRIPE, stripe_invoice_event(
        StripeEventType.INVOICE_PAID, invoice_id=stripe_invoice_id, subscription_id=sub.stripe_subscription_id,
        client_id=client_id), sub.stripe_subscription_id)
    # A second invoice of the same subscription paid before any failure notice of it is handled (one
    # partition of billing.stripe, so in this order; past_due comes on another topic, in no order with
    # these: one queued before the payment is seen is skipped at delivery, see the tests below).
    second = f"in_{uuid.uuid4().hex[:16]}"
    for event_type in (StripeEventType.INVOICE_PAID, StripeEventType.INVOICE_PAYMENT_FAILED):
        await publish(producer, topics.STRIPE, stripe_invoice_event(
            event_type, invoice_id=second, subscription_id=sub.stripe_subscription_id, client_id=client_id),
            sub.stripe_subscription_id)
    # Same partition, in order: once this third invoice's email is out, the events before it were handled.
    third = f"in_{uuid.uuid4().hex[:16]}"
    await publish(producer, topics.STRIPE, stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=third, subscription_id=sub.stripe_subscription_id,
        client_id=client_id, amount=4_500), sub.stripe_subscription_id)
    await mailbox.wait(lambda ms: len(kind_of(mailbox.to(email), NotificationKind.CARD_UPDATE)) == 2,
                       "the third invoice's email", timeout=40)
    await asyncio.sleep(2)
    cards = kind_of(mailbox.to(email), NotificationKind.CARD_UPDATE)
    assert len(cards) == 2 and "€45.00" in cards[-1].get_body(("plain",)).get_content()  # type: ignore[union-attr]


async def test_no_update_your_card_email_to_a_stripe_customer_without_a_client(
    kafka_app: KafkaApp, producer: AIOKafkaProducer, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    email, client_id = unique_email("known"), str(uuid.uuid4())
    fake_invoice_service.clients[client_id] = {"name": "Known", "email": email}
    subscription_id = f"sub_{uuid.uuid4().hex[:12]}"
    stranger = f"in_{uuid.uuid4().hex[:16]}"
    await publish(producer, topics.STRIPE, stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stranger, subscription_id=subscription_id,
        client_id=None), subscription_id)
    known = f"in_{uuid.uuid4().hex[:16]}"
    # No copy of our invoice and no address in the event: asked of the invoice service at delivery.
    await publish(producer, topics.STRIPE, stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=known, subscription_id=subscription_id,
        client_id=client_id), subscription_id)
    await mailbox.wait(lambda _: bool(mailbox.to(email)), "the known client's email", timeout=40)
    response = await kafka_app.http.get("/api/notifications", params={"kind": "card_update", "limit": 100})
    cards = [n for n in response.json()["items"] if n["clientId"] in (None, client_id)]
    assert [n["clientId"] for n in cards] == [client_id]
    assert client_id in fake_invoice_service.client_requests


# -- through the consumer path (no Kafka): what is queued, then skipped ----------------------------


@pytest.fixture
async def harness(
    make_settings: Callable[..., NotificationsSettings], fake_invoice_service: FakeInvoiceService
) -> AsyncIterator[Harness]:
    """Its worker sends only when the test drains it; subscription addresses from the fake invoice service."""
    h = await make_harness(make_settings(invoice_url=fake_invoice_service.url))
    h.worker.clients = InvoiceServiceClient(fake_invoice_service.url, None)
    yield h
    await h.worker.stop()
    await h.db.dispose()


async def test_an_update_your_card_email_still_queued_when_the_invoice_is_paid_is_never_sent(
    harness: Harness, mailbox: Mailbox
) -> None:
    email, client_id = unique_email("late"), str(uuid.uuid4())
    stripe_invoice_id, subscription_id = f"in_{uuid.uuid4().hex[:16]}", f"sub_{uuid.uuid4().hex[:12]}"
    ours = our_invoice(stripe_invoice_id, email, client_id)
    assert await harness.consumer.apply(invoice_event("invoice.sent", ours))
    assert await harness.consumer.apply(stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stripe_invoice_id, subscription_id=subscription_id,
        client_id=client_id))
    queued = await harness.message(kind="card_update", client_id=client_id)
    assert queued.status == "pending" and queued.recipient == email and queued.invoice_id == ours["id"]
    assert await harness.consumer.apply(stripe_invoice_event(
        StripeEventType.INVOICE_PAID, invoice_id=stripe_invoice_id, subscription_id=subscription_id,
        client_id=client_id))
    await harness.worker.drain()
    skipped = await harness.message(kind="card_update", client_id=client_id)
    assert skipped.status == "skipped" and skipped.last_error == "invoice paid"
    assert not kind_of(mailbox.to(email), NotificationKind.CARD_UPDATE)


async def test_an_update_your_card_email_is_skipped_at_delivery_once_our_invoice_is_paid(
    harness: Harness, mailbox: Mailbox
) -> None:
    email, client_id = unique_email("paidcopy"), str(uuid.uuid4())
    stripe_invoice_id = f"in_{uuid.uuid4().hex[:16]}"
    assert await harness.consumer.apply(stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stripe_invoice_id,
        subscription_id=f"sub_{uuid.uuid4().hex[:12]}", client_id=client_id))
    # Our invoice of it arrives PAID (payments recorded the retry's charge) before the email goes out.
    ours = {**our_invoice(stripe_invoice_id, email, client_id), "status": "PAID", "amountPaid": 3_000,
            "amountDue": 0, "version": 4}
    assert await harness.consumer.apply(invoice_event("invoice.paid", ours))
    await harness.worker.drain()
    assert (await harness.message(kind="card_update", client_id=client_id)).status == "skipped"
    assert not mailbox.to(email)


async def sent_card_text(h: Harness, mailbox: Mailbox, email: str, client_id: str) -> str:
    """The plain text of the one update-your-card email to `email`, which must be sent."""
    assert (await h.message(kind="card_update", client_id=client_id)).status == "sent"
    await mailbox.wait(lambda _: bool(mailbox.to(email)), "the card email")
    [mail] = mailbox.to(email)
    return mail.get_body(("plain",)).get_content()  # type: ignore[union-attr,no-any-return]


# Both events' words: the amount and retry date (Stripe's), the plan's name (the subscription's).
COMPLETE_CARD_EMAIL = ("We could not charge your card for €30.00 for your Retainer <Pro> subscription.",
                       "we will try again on March 21, 2026")


async def test_an_update_your_card_email_past_due_asked_for_first_waits_and_gets_stripes_amount(
    harness: Harness, mailbox: Mailbox
) -> None:
    """past_due overtakes Stripe's failure event (another topic): its message waits for it, then goes
    at once with both events' words: the amount and retry date (Stripe's), the plan's name (ours)."""
    email, client_id = unique_email("pastduefirst"), str(uuid.uuid4())
    stripe_invoice_id = f"in_{uuid.uuid4().hex[:16]}"
    sub = subscription(client_id, email, status=SubscriptionStatus.PAST_DUE,
                       latest_stripe_invoice_id=stripe_invoice_id)
    before = datetime.now(UTC)
    assert await harness.consumer.apply(subscription_event(SubscriptionEventType.PAST_DUE, sub))
    await harness.worker.drain()
    waiting = await harness.message(kind="card_update", client_id=client_id)
    assert waiting.status == "pending"
    assert waiting.next_attempt_at >= before + timedelta(seconds=harness.settings.card_update_wait)
    assert not mailbox.to(email)

    assert await harness.consumer.apply(stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stripe_invoice_id,
        subscription_id=sub.stripe_subscription_id, client_id=client_id))
    await harness.worker.drain()
    text = await sent_card_text(harness, mailbox, email, client_id)
    assert all(words in text for words in COMPLETE_CARD_EMAIL), text


async def test_past_due_after_stripes_failure_adds_the_plan_to_the_queued_email_and_no_second(
    harness: Harness, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    email, client_id = unique_email("stripefirst"), str(uuid.uuid4())
    fake_invoice_service.clients[client_id] = {"name": "Acme <Ltd> & Co", "email": email}
    stripe_invoice_id = f"in_{uuid.uuid4().hex[:16]}"
    sub = subscription(client_id, email, status=SubscriptionStatus.PAST_DUE,
                       latest_stripe_invoice_id=stripe_invoice_id)
    assert await harness.consumer.apply(stripe_invoice_event(
        StripeEventType.INVOICE_PAYMENT_FAILED, invoice_id=stripe_invoice_id,
        subscription_id=sub.stripe_subscription_id, client_id=client_id))
    assert await harness.consumer.apply(subscription_event(SubscriptionEventType.PAST_DUE, sub))
    await harness.worker.drain()
    text = await sent_card_text(harness, mailbox, email, client_id)
    assert all(words in text for words in COMPLETE_CARD_EMAIL), text


async def test_an_update_your_card_email_stripe_never_completes_goes_after_the_wait_without_an_amount(
    make_settings: Callable[..., NotificationsSettings], mailbox: Mailbox
) -> None:
    h = await make_harness(make_settings(card_update_wait=1.0))
    try:
        email, client_id = unique_email("pastduealone"), str(uuid.uuid4())
        sub = subscription(client_id, email, status=SubscriptionStatus.PAST_DUE,
                           latest_stripe_invoice_id=f"in_{uuid.uuid4().hex[:16]}")
        assert await h.consumer.apply(subscription_event(SubscriptionEventType.PAST_DUE, sub))
        deadline = time.monotonic() + 20
        while (await h.message(kind="card_update", client_id=client_id)).status == "pending":
            assert time.monotonic() < deadline, "the card email never left its wait"
            await h.worker.drain()
            await asyncio.sleep(0.1)
        text = await sent_card_text(h, mailbox, email, client_id)
        assert "We could not charge your card for your Retainer <Pro> subscription." in text, text
        assert "try again on" not in text
    finally:
        await h.worker.stop()
        await h.db.dispose()


async def test_subscription_emails_without_an_address_ask_the_invoice_service(
    harness: Harness, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    email, client_id, unknown = unique_email("asked"), str(uuid.uuid4()), str(uuid.uuid4())
    fake_invoice_service.clients[client_id] = {"name": "Asked Ltd", "email": email}
    for who in (client_id, unknown):
        assert await harness.consumer.apply(subscription_event(SubscriptionEventType.TRIAL_WILL_END,
                                                               subscription(who, None, client_name=None)))
    await harness.worker.drain()
    [mail] = mailbox.to(email)
    assert "Asked Ltd" in mail["To"] and "ends on March 18, 2026" in mail["Subject"]
    failed = await harness.message(kind="trial_will_end", client_id=unknown)
    assert failed.status == "failed" and failed.last_error == "no recipient address"


async def test_a_trial_notice_of_a_subscription_no_longer_trialing_sends_nothing(harness: Harness) -> None:
    client_id = str(uuid.uuid4())
    late = subscription(client_id, unique_email("late-trial"), status=SubscriptionStatus.ACTIVE)
    assert await harness.consumer.apply(subscription_event(SubscriptionEventType.TRIAL_WILL_END, late))
    with pytest.raises(ValueError):
        await harness.message(kind="trial_will_end", client_id=client_id)


async def test_the_invoice_email_of_an_invoice_paid_before_it_went_out_is_a_receipt(
    harness: Harness, mailbox: Mailbox
) -> None:
    """A subscription invoice charged by Stripe at once: invoice.paid may be here before the email of
    invoice.sent goes out; then it says paid (PDF attached), never "please pay"."""
    email = unique_email("raced")
    sent = {**our_invoice(f"in_{uuid.uuid4().hex[:16]}", email, str(uuid.uuid4())), "version": 2}
    assert await harness.consumer.apply(invoice_event("invoice.sent", sent))
    paid = {**sent, "status": "PAID", "amountPaid": 3_000, "amountDue": 0, "version": 3}
    assert await harness.consumer.apply(invoice_event("invoice.paid", paid))
    await harness.worker.drain()
    [mail] = mailbox.to(email)
    assert mail["Subject"] == f"Invoice {sent['invoiceNumber']} from Billing (paid)"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "It has been paid in full" in text and "View and pay" not in text and "due on" not in text
    assert [a.get_filename() for a in mail.iter_attachments()] == [f"invoice-{sent['invoiceNumber']}.pdf"]


# -- pure ------------------------------------------------------------------------------------------


def test_subscription_emails_link_to_the_portals_subscription_page() -> None:
    class NeverAsked:
        async def mark_overdue(self, as_of: Any) -> frozenset[str]:
            raise AssertionError

    svc = NotificationService(NotificationsSettings(public_url="https://pay.example.com",
                                                    portal_url="https://pay.example.com/portal"),
                              invoices=NeverAsked())
    for kind in (NotificationKind.CARD_UPDATE, NotificationKind.TRIAL_WILL_END, NotificationKind.SUBSCRIPTION):
        assert svc.link_target(None, kind) == "https://pay.example.com/portal/subscription"
    assert svc.link_target("inv-1", NotificationKind.INVOICE_SENT) == "https://pay.example.com/portal/invoices/inv-1"
    context = svc.email_context(
        kind=NotificationKind.CARD_UPDATE, token="T" * 32, invoice_id=None, recipient="a@b.example.com",
        recipient_name="<b>", invoice_snapshot=None,
        context={"card": {"amount": 1_500, "currency": "JPY", "plan_name": "<script>"}},
    )
    rendered = Renderer().render(NotificationKind.CARD_UPDATE, context)
    assert "for ¥1,500" in rendered.text and "&lt;script&gt;" in rendered.html and "<script>" not in rendered.html
    assert 'href="https://pay.example.com/t/l/' + "T" * 32 + '"' in rendered.html
    assert "Update your card" in rendered.html
