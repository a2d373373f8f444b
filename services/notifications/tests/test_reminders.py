"""The reminder scan (R1-R4) on a real PostgreSQL: right dates, once per invoice and kind, concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from contracts.invoice import InvoiceSnapshotV1
from kit.db import Database
from kit.errors import ServiceUnavailable
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.consumers import NotificationConsumer
from services.notifications.models import Notification, Reminder
from services.notifications.service import CONSUMER_NAME, NotificationService
from services.notifications.tests.conftest import OverdueMarker, invoice_event, migrated_db, snapshot

DUE = date(2026, 3, 31)


async def put_invoices(db: Database, snaps: list[dict[str, Any]]) -> None:
    """Store invoice copies directly (bulk); the event path is covered in test_delivery/test_e2e."""
    async with db.unit_of_work() as uow:
        for snap in snaps:
            await repo.upsert_invoice(uow.session, InvoiceSnapshotV1.model_validate(snap), snap)
        await uow.commit()


async def reminders_of(db: Database, invoice_id: str | None = None) -> list[tuple[str, str, int, date]]:
    async with db.unit_of_work() as uow:
        stmt = select(Reminder.invoice_id, Reminder.kind, Reminder.sequence, Reminder.as_of).order_by(Reminder.id)
        if invoice_id:
            stmt = stmt.where(Reminder.invoice_id == invoice_id)
        return [tuple(r) for r in (await uow.session.execute(stmt)).all()]  # type: ignore[misc]


@pytest.fixture
async def setup(make_settings: Callable[..., NotificationsSettings]) -> Any:
    settings = make_settings()
    db = await migrated_db(settings)
    yield settings, db, NotificationService(settings, invoices=OverdueMarker(db))
    await db.dispose()


async def test_schedule_day_by_day(setup: Any) -> None:
    """7 days before, 1 day before, the day after the due date, then weekly up to 4 notices."""
    _, db, svc = setup
    snap = snapshot(due=DUE, issue=date(2026, 3, 1))
    await put_invoices(db, [snap])
    created: list[tuple[str, str, int, date]] = []
    day = date(2026, 3, 15)
    while day <= date(2026, 6, 1):
        result = await svc.scan_reminders(db, day)
        created += [(r["invoiceId"], r["kind"], r["sequence"], day) for r in result.created]
        day += timedelta(days=1)
    assert [(kind, seq, when) for _, kind, seq, when in created] == [
        ("reminder_before_due", 7, date(2026, 3, 24)),
        ("reminder_before_due", 1, date(2026, 3, 30)),
        ("reminder_overdue", 1, date(2026, 4, 1)),
        ("reminder_overdue", 2, date(2026, 4, 8)),
        ("reminder_overdue", 3, date(2026, 4, 15)),
        ("reminder_overdue", 4, date(2026, 4, 22)),
    ]
    assert [(k, s) for _, k, s, _ in await reminders_of(db)] == [
        ("before_due", 7), ("before_due", 1), ("overdue", 1), ("overdue", 2), ("overdue", 3), ("overdue", 4)
    ]
    # Each reminder queued one message, with its sequence, the invoice's address and a subject.
    async with db.unit_of_work() as uow:
        messages = (await uow.session.scalars(select(Notification).order_by(Notification.created_at))).all()
        uow.session.expunge_all()
    assert [m.reminder_sequence for m in messages] == [7, 1, 1, 2, 3, 4]
    assert {m.recipient for m in messages} == {"client@acme.example.com"}
    assert messages[0].subject is not None and "is due in 7 days" in messages[0].subject
    assert "Overdue" in (messages[2].subject or "")


async def test_only_open_invoices_with_money_due_get_reminders(setup: Any) -> None:
    _, db, svc = setup
    as_of = DUE - timedelta(days=7)
    cases = {
        "SENT": snapshot(status="SENT", due=DUE),
        "VIEWED": snapshot(status="VIEWED", due=DUE),
        "PARTIAL": snapshot(status="PARTIAL", due=DUE, paid=50_00),
        "OVERDUE": snapshot(status="OVERDUE", due=DUE),
        "PAID": snapshot(status="PAID", due=DUE, paid=120_00),
        "CANCELLED": snapshot(status="CANCELLED", due=DUE),
        "DRAFT": snapshot(status="DRAFT", due=DUE),
        "SENT-nothing-due": snapshot(status="SENT", due=DUE, total=0),
    }
    await put_invoices(db, list(cases.values()))
    result = await svc.scan_reminders(db, as_of)
    reminded = {r["invoiceId"] for r in result.created}
    assert reminded == {cases[s]["id"] for s in ("SENT", "VIEWED", "PARTIAL", "OVERDUE")}


async def test_scan_is_idempotent_and_late_scans_send_only_the_latest(setup: Any) -> None:
    _, db, svc = setup
    snap = snapshot(due=DUE, issue=date(2026, 3, 1))
    await put_invoices(db, [snap])
    # Nobody scanned for weeks: 20 days overdue -> notice 3 only (no backlog of old notices).
    first = await svc.scan_reminders(db, DUE + timedelta(days=20))
    assert [(r["kind"], r["sequence"]) for r in first.created] == [("reminder_overdue", 3)]
    assert (await svc.scan_reminders(db, DUE + timedelta(days=20))).created == []
    assert (await svc.scan_reminders(db, DUE + timedelta(days=21))).created == []
    # Far past the last notice: nothing, ever.
    assert (await svc.scan_reminders(db, DUE + timedelta(days=200))).created == []
    # A late before-due reminder: first scan 3 days before -> the 7-day one (text says "in 3 days").
    other = snapshot(due=DUE + timedelta(days=30), issue=date(2026, 3, 1))
    await put_invoices(db, [other])
    late = await svc.scan_reminders(db, DUE + timedelta(days=27))
    assert sorted((r["invoiceId"] == other["id"], r["kind"], r["sequence"]) for r in late.created) == [
        (False, "reminder_overdue", 4),  # the first invoice, 27 days overdue: its 4th and last notice
        (True, "reminder_before_due", 7),
    ]
    [mine] = [r for r in late.created if r["invoiceId"] == other["id"]]
    async with db.unit_of_work() as uow:
        message = await uow.session.get(Notification, uuid.UUID(mine["notificationId"]))
        assert message is not None and "is due in 3 days" in (message.subject or "")


async def test_no_before_due_reminder_for_an_invoice_issued_inside_the_window(setup: Any) -> None:
    _, db, svc = setup
    short = snapshot(due=DUE, issue=DUE - timedelta(days=3))  # net 3 days: no 7-day reminder
    await put_invoices(db, [short])
    assert (await svc.scan_reminders(db, DUE - timedelta(days=7))).created == []
    assert (await svc.scan_reminders(db, DUE - timedelta(days=3))).created == []
    one = await svc.scan_reminders(db, DUE - timedelta(days=1))
    assert [(r["kind"], r["sequence"]) for r in one.created] == [("reminder_before_due", 1)]


async def test_schedule_is_configurable(make_settings: Callable[..., NotificationsSettings]) -> None:
    settings = make_settings(reminder_days_before="14,3", overdue_repeat_days=3, overdue_max_notices=2)
    db = await migrated_db(settings)
    try:
        svc = NotificationService(settings, invoices=OverdueMarker(db))
        await put_invoices(db, [snapshot(due=DUE, issue=date(2026, 2, 1))])
        seen = []
        day = DUE - timedelta(days=20)
        while day <= DUE + timedelta(days=20):
            seen += [(r["sequence"], r["kind"], (day - DUE).days) for r in (await svc.scan_reminders(db, day)).created]
            day += timedelta(days=1)
        assert seen == [
            (14, "reminder_before_due", -14),
            (3, "reminder_before_due", -3),
            (1, "reminder_overdue", 1),
            (2, "reminder_overdue", 4),
        ]
    finally:
        await db.dispose()


async def test_newer_snapshot_wins_and_paid_stops_reminders(setup: Any) -> None:
    """Copies come from invoice.* events through the real consumer path (inbox, versions)."""
    settings, db, svc = setup
    consumer = NotificationConsumer(db, CONSUMER_NAME, svc.handlers())
    sent = snapshot(due=DUE, version=2)
    paid = {**sent, "status": "PAID", "amountPaid": sent["total"], "amountDue": 0, "version": 4}
    assert await consumer.apply(invoice_event("invoice.sent", sent))
    assert await consumer.apply(invoice_event("invoice.paid", paid))
    # An older snapshot arriving late (replay) does not move the copy backwards.
    viewed_old = {**sent, "status": "VIEWED", "version": 3}
    assert await consumer.apply(invoice_event("invoice.viewed", viewed_old))
    async with db.unit_of_work() as uow:
        copy = await repo.get_invoice(uow.session, sent["id"])
        assert copy is not None and (copy.status, copy.version, copy.amount_due) == ("PAID", 4, 0)
    for offset in (-7, -1, 1, 8):
        assert (await svc.scan_reminders(db, DUE + timedelta(days=offset))).created == []


async def test_concurrent_scans_claim_each_reminder_once(make_settings: Callable[..., NotificationsSettings]) -> None:
    """Three scans at once, each on its own connection pool (as three replicas would be)."""
    settings = make_settings()
    dbs = [await migrated_db(settings, pool_size=2) for _ in range(3)]
    try:
        as_of = date(2026, 5, 1)
        snaps = [snapshot(due=as_of + timedelta(days=7), issue=date(2026, 4, 1)) for _ in range(700)]
        snaps += [snapshot(due=as_of - timedelta(days=1), issue=date(2026, 3, 1)) for _ in range(700)]
        snaps += [snapshot(due=as_of + timedelta(days=1), issue=date(2026, 4, 1)) for _ in range(600)]
        await put_invoices(dbs[0], snaps)
        svc = NotificationService(settings, invoices=OverdueMarker(dbs[0]))
        results = await asyncio.gather(*(svc.scan_reminders(db, as_of, batch_size=250) for db in dbs))
        created = [r for result in results for r in result.created]
        assert len(created) == 2000
        assert len({(r["invoiceId"], r["kind"], r["sequence"]) for r in created}) == 2000
        async with dbs[0].unit_of_work() as uow:
            assert await uow.session.scalar(select(func.count()).select_from(Reminder)) == 2000
            assert await uow.session.scalar(select(func.count()).select_from(Notification)) == 2000
        again = await asyncio.gather(*(svc.scan_reminders(db, as_of) for db in dbs))
        assert [len(r.created) for r in again] == [0, 0, 0]
    finally:
        for db in dbs:
            await db.dispose()


async def test_a_scan_that_dies_mid_batch_claims_nothing(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, db, svc = setup
    await put_invoices(db, [snapshot(due=DUE, issue=date(2026, 3, 1)) for _ in range(5)])

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed between claiming and queueing")

    monkeypatch.setattr(repo, "insert_notifications", crash)
    with pytest.raises(RuntimeError):
        await svc.scan_reminders(db, DUE - timedelta(days=7))
    assert await reminders_of(db) == []  # the claim rolled back with the batch
    monkeypatch.undo()
    result = await svc.scan_reminders(db, DUE - timedelta(days=7))
    assert len(result.created) == 5


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_indexed_sql_matches_the_reference_schedule(
    make_settings: Callable[..., NotificationsSettings], seed: int
) -> None:
    """Random invoices, schedules and days: the SQL scan finds exactly what reminder_due() says."""
    import random

    from services.notifications.schedule import reminder_due

    rng = random.Random(seed)
    settings = make_settings()
    db = await migrated_db(settings)
    try:
        base = date(2026, 7, 1)
        snaps = []
        for _ in range(400):
            due = base + timedelta(days=rng.randint(-60, 60))
            total = rng.choice([0, 100, 50_00, 120_00])
            paid = rng.choice([0, 0, 0, total // 2, total])
            status = rng.choice(["DRAFT", "SENT", "SENT", "VIEWED", "PARTIAL", "OVERDUE", "PAID", "CANCELLED"])
            issue = due - timedelta(days=rng.choice([0, 1, 3, 7, 8, 14, 30]))
            snaps.append(snapshot(due=due, issue=issue, total=total, paid=paid, status=status))
        await put_invoices(db, snaps)
        for _ in range(12):
            days = tuple(sorted(rng.sample([1, 2, 3, 5, 7, 10, 14], rng.randint(0, 3)), reverse=True))
            window = repo.ReminderWindow(
                as_of=base + timedelta(days=rng.randint(-40, 40)), days_before=days,
                repeat=rng.choice([1, 3, 7]), max_notices=rng.choice([0, 1, 4]),
            )
            async with db.unit_of_work() as uow:
                found = await repo.find_due_reminders(uow.session, window, limit=10_000)
            got = {(r.invoice_id, r.kind, r.sequence) for r in found}
            expected = set()
            for s in snaps:
                due = reminder_due(
                    window.as_of, status=s["status"], amount_due=s["amountDue"],
                    due_date=date.fromisoformat(s["dueDate"]), issue_date=date.fromisoformat(s["issueDate"]),
                    days_before=days, repeat=window.repeat, max_notices=window.max_notices,
                )
                if due:
                    expected.add((s["id"], *due))
            assert got == expected, window
    finally:
        await db.dispose()


async def test_an_overdue_notice_only_for_an_invoice_the_invoice_service_says_is_overdue(setup: Any) -> None:
    """Past its due date is not enough: the invoice service decides OVERDUE (its answer, or the copy)."""
    _, db, svc = setup
    marked = snapshot(due=DUE, issue=date(2026, 3, 1))
    kept_open = snapshot(due=DUE, issue=date(2026, 3, 1))  # e.g. a payment arrived there meanwhile
    await put_invoices(db, [marked, kept_open])
    svc.invoices.marked.add(kept_open["id"])  # the invoice service does not mark this one
    result = await svc.scan_reminders(db, DUE + timedelta(days=1))
    assert svc.invoices.calls == [DUE + timedelta(days=1)]  # asked first, for the scan's day
    assert [(r["invoiceId"], r["kind"]) for r in result.created] == [(marked["id"], "reminder_overdue")]
    assert await reminders_of(db, kept_open["id"]) == []
    # Once its copy says OVERDUE (its invoice.overdue arrived), the notice goes out.
    await put_invoices(db, [{**kept_open, "status": "OVERDUE", "version": 3}])
    later = await svc.scan_reminders(db, DUE + timedelta(days=2))
    assert [(r["invoiceId"], r["kind"], r["sequence"]) for r in later.created] == [
        (kept_open["id"], "reminder_overdue", 1)]


async def test_no_reminder_at_all_while_the_invoice_service_is_unreachable(setup: Any) -> None:
    _, db, svc = setup
    late = snapshot(due=DUE, issue=date(2026, 3, 1))
    soon = snapshot(due=DUE + timedelta(days=8), issue=date(2026, 3, 1))
    await put_invoices(db, [late, soon])
    svc.invoices.down = True
    with pytest.raises(ServiceUnavailable):
        await svc.scan_reminders(db, DUE + timedelta(days=1))
    assert await reminders_of(db) == []
    async with db.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(Notification)) == 0
    svc.invoices.down = False  # back: the same run now does everything, once
    result = await svc.scan_reminders(db, DUE + timedelta(days=1))
    assert sorted((r["invoiceId"], r["kind"]) for r in result.created) == sorted(
        [(late["id"], "reminder_overdue"), (soon["id"], "reminder_before_due")])


async def test_an_equal_or_older_snapshot_changes_nothing_but_a_resend_still_mails(setup: Any) -> None:
    """The copy takes strictly newer versions only (kit.replica); the email decision is not the copy's."""
    _, db, svc = setup
    consumer = NotificationConsumer(db, CONSUMER_NAME, svc.handlers())
    sent = snapshot(due=DUE, version=2, total=120_00)
    assert await consumer.apply(invoice_event("invoice.sent", sent))

    async def copy() -> tuple[str, int, int]:
        async with db.unit_of_work() as uow:
            c = await repo.get_invoice(uow.session, sent["id"])
            assert c is not None
            return c.status, c.version, c.amount_due

    # The same version with other content (a replay of a divergent snapshot), then an older one.
    assert await consumer.apply(invoice_event("invoice.viewed", {**sent, "status": "VIEWED", "amountDue": 1}))
    assert await copy() == ("SENT", 2, 120_00)
    assert await consumer.apply(invoice_event("invoice.updated", {**sent, "status": "DRAFT", "version": 1}))
    assert await copy() == ("SENT", 2, 120_00)
    # The invoice service re-sends without a new version: the copy is unchanged, the client gets the email.
    assert await consumer.apply(invoice_event("invoice.sent", {**sent, "reason": "resent"}))
    # A stale invoice.sent (older version) sends nothing.
    assert await consumer.apply(invoice_event("invoice.sent", {**sent, "version": 1}))
    async with db.unit_of_work() as uow:
        kinds = (await uow.session.scalars(
            select(Notification.kind).where(Notification.invoice_id == sent["id"]))).all()
    assert sorted(kinds) == ["invoice_sent", "invoice_sent"]
    assert await copy() == ("SENT", 2, 120_00)
