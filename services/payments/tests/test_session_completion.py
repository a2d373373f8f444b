"""A Checkout Session completed by Stripe's events: one UPDATE ... RETURNING (Repository.complete_session)
keeps the rules the attribute writes had, on a real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import insert, select

from kit.clock import utcnow
from services.payments.models import CheckoutSession
from services.payments.repository import CheckoutTerms, Repository
from services.payments.tests.conftest import completed_event, payments_of, post_webhook, wait_processed


async def _open_session(db: Any, invoice_id: str, client_id: str, amount: int = 12_000) -> str:
    session_id = f"cs_test_{uuid.uuid4().hex}"
    async with db.transaction() as uow:
        await uow.session.execute(insert(CheckoutSession).values(
            id=session_id, invoice_id=invoice_id, client_id=client_id, amount=amount, currency="EUR",
            status="open", payment_status="unpaid", url="https://stripe.test/c", success_url="https://p.test/ok",
            cancel_url="https://p.test/no", idempotency_key=f"k-{session_id}", invoice_version=2,
            expires_at=utcnow() + timedelta(days=1), last_event_created=0,
        ))
    return session_id


async def _row(db: Any, session_id: str) -> CheckoutSession:
    async with db.sessionmaker() as s:
        row = (await s.scalars(select(CheckoutSession).where(CheckoutSession.id == session_id))).one()
    return row


async def _complete(db: Any, session_id: str, **kw: Any) -> CheckoutTerms | None:
    async with db.transaction() as uow:
        return await Repository(uow.session).complete_session(session_id, **kw)


async def test_completion_sets_intent_once_keeps_paid_and_the_newest_time(db: Any) -> None:
    session_id = await _open_session(db, str(uuid.uuid4()), "client-1", amount=9_900)

    terms = await _complete(db, session_id, payment_intent="pi_first", payment_status="unpaid", created=100)
    assert terms == CheckoutTerms(client_id="client-1", amount=9_900, currency="EUR")
    row = await _row(db, session_id)
    assert (row.status, row.payment_status, row.stripe_payment_intent_id, row.last_event_created) == (
        "complete", "unpaid", "pi_first", 100)

    await _complete(db, session_id, payment_intent="pi_other", payment_status="paid", created=90)
    row = await _row(db, session_id)
    # The first intent stays; paid is taken; an older event never moves the time back.
    assert (row.payment_status, row.stripe_payment_intent_id, row.last_event_created) == ("paid", "pi_first", 100)
    paid_at_update = row.updated_at

    # Paid stays paid; an event that changes nothing leaves updated_at alone (as the ORM's onupdate did).
    await _complete(db, session_id, payment_intent=None, payment_status="unpaid", created=50)
    row = await _row(db, session_id)
    assert (row.payment_status, row.stripe_payment_intent_id, row.last_event_created) == ("paid", "pi_first", 100)
    assert row.updated_at == paid_at_update

    await _complete(db, session_id, payment_intent=None, payment_status=None, created=200)
    row = await _row(db, session_id)
    assert (row.payment_status, row.last_event_created) == ("paid", 200) and row.updated_at > paid_at_update


async def test_completion_without_intent_and_of_an_unknown_session(db: Any) -> None:
    session_id = await _open_session(db, str(uuid.uuid4()), "client-2")
    await _complete(db, session_id, payment_intent="", payment_status="", created=5)
    row = await _row(db, session_id)
    assert (row.status, row.payment_status, row.stripe_payment_intent_id) == ("complete", "unpaid", None)
    assert await _complete(db, "cs_test_not_ours", payment_intent="pi_x", payment_status="paid", created=5) is None


async def test_expired_after_completed_is_stale_and_the_payment_judged_against_the_session(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any
) -> None:
    """The session's amount is what the payment is compared with: a Stripe amount other than the
    session's is flagged; an expiry after the completion leaves the session complete."""
    session_id = await _open_session(db, sent_invoice.id, sent_invoice.client_id, amount=11_000)
    completed = completed_event(sent_invoice, session_id=session_id)  # pays the invoice's 12,000
    expired = completed_event(sent_invoice, session_id=session_id, event_type="checkout.session.expired",
                              payment_status="unpaid")
    assert (await post_webhook(api, completed)).status_code == 200
    await wait_processed(db, [completed["id"]])
    assert (await post_webhook(api, expired)).status_code == 200
    rows = {r.id: r for r in await wait_processed(db, [expired["id"]])}
    assert rows[expired["id"]].status == "ignored" and "already complete" in (rows[expired["id"]].outcome or "")
    row = await _row(db, session_id)
    assert (row.status, row.payment_status) == ("complete", "paid")
    assert row.stripe_payment_intent_id == completed["data"]["object"]["payment_intent"]
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.flags == ["amount_differs_from_checkout"]
    assert payment.client_id == sent_invoice.client_id
