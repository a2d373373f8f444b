"""`rebuild` replays the log into fresh tables and swaps them in: the figures after equal those before,
also when events arrive while it runs, and the live feed carries on in the swapped-in tables."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from kit.db import Database
from services.reporting.rebuild import rebuild
from services.reporting.tests.conftest import Reporting
from services.reporting.tests.scenario import InvoiceScript, at, stray_payment
from services.reporting.tests.test_mrr import subscriptions
from services.reporting.tests.test_reports import all_reports, scenario


async def schemas(url: str) -> list[str]:
    db = Database(url, pool_size=1)
    try:
        async with db.transaction() as uow:
            rows = await uow.session.execute(text(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'reporting%' ORDER BY 1"))
            return [row[0] for row in rows]
    finally:
        await db.dispose()


async def test_rebuild_gives_the_same_figures(reporting: Reporting) -> None:
    story = scenario().events + subscriptions() + [stray_payment("inv-unknown", 500, "EUR", at("2026-10-03T10:00"))]
    await reporting.publish(story)
    await reporting.producer.send_and_wait(reporting.topic("payment"), b"not an event", key=b"x")
    await reporting.caught_up()
    before = await all_reports(reporting)
    assert before["reconciliation"]["rejectedEvents"] == 1

    said: list[str] = []
    result = await rebuild(reporting.settings, say=said.append)
    assert result.records == len(story) + 1 and result.events == len(story)
    assert any("events/s" in line and "lag" in line for line in said), said
    assert said[-1].startswith("rebuild: done")
    await reporting.caught_up()
    assert await all_reports(reporting) == before
    assert await schemas(reporting.settings.database_url) == ["reporting"]

    # the live feed goes on, into the rebuilt tables
    late = InvoiceScript("client-late", "Late Ltd", "EUR", 4_000, at("2026-10-30T00:00").date(),
                         at("2026-11-29T00:00").date())
    await reporting.publish(late.created(at("2026-10-30T09:00")) + late.sent(at("2026-10-30T09:00"), "2026-0099"))
    await reporting.caught_up()
    summary = {r["currency"]: r for r in (await reporting.get("/summary", asOf="2026-10-31"))["currencies"]}
    assert summary["EUR"]["invoicedThisMonth"] == 30_000 + 4_000


async def test_events_arriving_during_the_swap_are_not_lost(reporting: Reporting) -> None:
    first, second = scenario(), scenario()
    await reporting.publish(first.events)
    await reporting.caught_up()

    async def meanwhile() -> None:
        # After the rebuild's last catch-up and before its swap, the live feed applies these to the old
        # tables only: the rebuild must still have them once its tables are live.
        await reporting.publish(second.events)
        await reporting.caught_up()

    await rebuild(reporting.settings, say=lambda _: None, before_swap=meanwhile)
    await reporting.caught_up()
    await asyncio.sleep(0.5)
    everything: Any = await all_reports(reporting)
    eur = {r["currency"]: r for r in everything["summary 2026-10-31"]["currencies"]}["EUR"]
    assert eur["outstanding"] == 2 * 97_345 and eur["collectedYearToDate"] == 2 * 95_000
    assert everything["reconciliation"]["mismatches"] == [] and everything["reconciliation"]["invoicesChecked"] == 16

    # and a rebuild from scratch agrees
    await rebuild(reporting.settings, say=lambda _: None)
    await reporting.caught_up()
    assert await all_reports(reporting) == everything


async def test_a_second_rebuild_at_the_same_time_is_refused(reporting: Reporting) -> None:
    from services.reporting.rebuild import RebuildRunning

    await reporting.publish(scenario().events)
    started = asyncio.Event()

    async def hold() -> None:
        started.set()
        await asyncio.sleep(1.0)

    first = asyncio.create_task(rebuild(reporting.settings, say=lambda _: None, before_swap=hold))
    await started.wait()
    try:
        await rebuild(reporting.settings, say=lambda _: None)
    except RebuildRunning:
        pass
    else:
        raise AssertionError("a second rebuild ran beside the first")
    await first


