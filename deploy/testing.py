"""pytest plugin: real local infrastructure for tests, started lazily, once per session.

Enabled by the root conftest.py (``pytest_plugins = ["deploy.testing"]``). Fixtures (session scope
unless noted):

  infra_dir             .run/test-<pid>/ : every server's data and logs for this session
  kafka                 deploy.infra.KafkaServer, started on free ports (``kafka.bootstrap``)
  postgres              deploy.infra.PostgresServer in fast mode (fsync off), free port
  database_url_factory  ``database_url_factory("invoice")`` -> URL of a new, uniquely named database
  stripe_mock           deploy.infra.StripeMock (``stripe_mock.url``)
  stripe_standin        deploy.infra.StripeStandin: the stateful Stripe stand-in in front of stripe_mock
                        (``.url`` for the SDK; ``set_webhook_urls``, ``set_card``, ``configure``, ``flush``)
  stripe_webhook_receiver  deploy.stripe_standin.testing.WebhookReceiver: records and verifies webhooks
  standin_webhooks      (function scope) the receiver, cleared and subscribed to the stand-in
  mail_sink             deploy.infra.MailSink (``messages()``, ``clear()``, ``fail_next(n)``, ...)
  fresh_mail_sink       (function scope) the same sink, cleared before the test
  services_standin      deploy.infra.StripeStandin of its own for the services of infra_endpoints: their
                        STRIPE_API_BASE, delivering to payments' /webhooks/stripe (knobs as above)
  infra_endpoints       deploy.services.InfraEndpoints: a fresh database per service, free service
                        ports, for starting services with deploy.services.make_service_process

Each session has its own servers on free ports, so several sessions can run at once on one machine.
The session directory is removed at the end unless a test failed or BILLING_KEEP_INFRA=1; leftovers
of sessions that died are cleaned up by the next session.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts.envelope import CloudEvent
from deploy.infra import (
    RUN_DIR,
    InfraError,
    KafkaServer,
    MailSink,
    PostgresServer,
    StripeMock,
    StripeStandin,
    ensure_kafka_jars,
    find_postgres_bin,
    free_port,
    free_ports,
    make_traversable,
    pid_alive,
)
from deploy.services import SERVICES, InfraEndpoints
from deploy.stripe_standin.testing import WebhookReceiver

DatabaseUrlFactory = Callable[[str], str]
S = TypeVar("S")

_PORT_TRIES = 3

# A test whose fixture closure includes one of these needs infrastructure and is marked `infra`; every
# other test is marked `unit` (`make test-unit` runs `pytest -m "not infra"`: seconds, no server).
# Add the name of any new fixture that starts a server, a browser or a service process (a fixture that
# depends on one of these is covered already). A test that spawns processes by itself carries an
# explicit @pytest.mark.infra.
INFRA_FIXTURES: set[str] = {
    "infra_dir", "kafka", "postgres", "database_url_factory", "stripe_mock", "mail_sink", "fresh_mail_sink",
    "infra_endpoints", "producer",
    "stack",  # tests/conftest.py: every service as a process
    "browser",  # tests/test_portal_browser.py: headless Chromium
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "infra: needs real infrastructure or spawns processes (see INFRA_FIXTURES)")
    config.addinivalue_line("markers", "unit: needs no infrastructure; set automatically on every non-infra test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("infra") is not None:
            continue  # marked by hand
        needs_infra = not INFRA_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.infra if needs_infra else pytest.mark.unit)


def _start_on_free_ports(make: Callable[[], S], start: Callable[[S], None]) -> S:
    """Build and start a server; on a port clash with a concurrent session, retry with new ports."""
    for attempt in range(1, _PORT_TRIES + 1):
        server = make()
        try:
            start(server)
            return server
        except InfraError as exc:
            if attempt == _PORT_TRIES or "in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def _clean_stale_session_dirs() -> None:
    for path in RUN_DIR.glob("test-*"):
        match = re.fullmatch(r"test-(\d+)", path.name)
        if not match or not path.is_dir() or pid_alive(int(match.group(1))):
            continue
        pg_dir = path / "pg"
        if (pg_dir / "postmaster.pid").exists() and find_postgres_bin() is not None:
            stale = PostgresServer(pg_dir, 0)
            stale.bin_dir = find_postgres_bin()
            stale.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def infra_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This session's directory for server data and logs (postgres can traverse to it)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    _clean_stale_session_dirs()
    path = RUN_DIR / f"test-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    make_traversable(path)
    yield path
    keep = os.environ.get("BILLING_KEEP_INFRA") == "1" or request.session.testsfailed > 0
    if keep:
        print(f"\n[infra] test infrastructure data and logs kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka(infra_dir: Path) -> Iterator[KafkaServer]:
    """A single-node Kafka 4 (KRaft) for the session; ``kafka.bootstrap`` is "127.0.0.1:<port>"."""
    jars = ensure_kafka_jars(RUN_DIR / "kafka-jars")
    counter = itertools.count()

    def make() -> KafkaServer:
        port, controller_port = free_ports(2)
        return KafkaServer(infra_dir / f"kafka{next(counter) or ''}", port, controller_port, jars_dir=jars)

    server = _start_on_free_ports(make, lambda s: s.start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres(infra_dir: Path) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (fsync off); make databases with database_url_factory."""
    counter = itertools.count()

    def make() -> PostgresServer:
        return PostgresServer(infra_dir / f"pg{next(counter) or ''}", free_port(), fast=True)

    def start(server: PostgresServer) -> None:
        server.ensure_installed()
        server.start()

    server = _start_on_free_ports(make, start)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url_factory(postgres: PostgresServer) -> DatabaseUrlFactory:
    """``factory(name)`` creates a new database named after ``name`` and returns its asyncpg URL."""
    counter = itertools.count(1)

    def factory(name: str = "db") -> str:
        base = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:40] or "db"
        if base[0].isdigit():
            base = f"db_{base}"
        return postgres.create_database(f"{base}_{next(counter)}_{uuid.uuid4().hex[:6]}")

    return factory


@pytest.fixture(scope="session")
def stripe_mock(infra_dir: Path) -> Iterator[StripeMock]:
    """stripe-mock for the session; point the SDK at ``stripe_mock.url``."""
    bin_dir = RUN_DIR / "bin"

    def make() -> StripeMock:
        port = free_port()
        return StripeMock(port, bin_dir=bin_dir, log_path=infra_dir / "logs" / f"stripe-mock-{port}.log")

    server = _start_on_free_ports(make, lambda s: s.start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mail_sink(infra_dir: Path) -> Iterator[MailSink]:
    """The SMTP sink for the session (``host``, ``port``); ``clear()`` between tests that count mail."""

    def make() -> MailSink:
        port = free_port()
        return MailSink(infra_dir / "mail", port, log_path=infra_dir / "logs" / f"mailsink-{port}.log")

    sink = _start_on_free_ports(make, lambda s: s.start())
    yield sink
    sink.stop()


@pytest.fixture
def fresh_mail_sink(mail_sink: MailSink) -> MailSink:
    """The session's mail sink, emptied (and failure mode reset) before this test."""
    mail_sink.clear()
    return mail_sink


STANDIN_WEBHOOK_SECRET = "whsec_test"  # the same secret infra_endpoints gives the services


@pytest.fixture(scope="session")
def stripe_standin(infra_dir: Path, stripe_mock: StripeMock) -> Iterator[StripeStandin]:
    """The stateful Stripe stand-in (deploy/stripe_standin) in front of stripe_mock; point the SDK at ``.url``."""

    def make() -> StripeStandin:
        port = free_port()
        return StripeStandin(port, stripe_mock.url, webhook_secret=STANDIN_WEBHOOK_SECRET,
                             log_path=infra_dir / "logs" / f"stripe-standin-{port}.log")

    server = _start_on_free_ports(make, lambda s: s.start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stripe_webhook_receiver() -> Iterator[WebhookReceiver]:
    """A local endpoint recording the webhooks it gets, each verified with stripe.Webhook.construct_event."""
    receiver = WebhookReceiver(STANDIN_WEBHOOK_SECRET)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def standin_webhooks(stripe_standin: StripeStandin, stripe_webhook_receiver: WebhookReceiver) -> WebhookReceiver:
    """The receiver, emptied, as the stand-in's only webhook endpoint (delivery knobs reset)."""
    stripe_standin.configure(webhook_urls=[stripe_webhook_receiver.url], duplicate_deliveries=False, shuffle=False)
    stripe_webhook_receiver.clear()
    return stripe_webhook_receiver


@pytest.fixture(scope="session")
def service_ports() -> dict[str, int]:
    """A free HTTP port per service (infra_endpoints' ports; services_standin delivers to payments')."""
    return dict(zip([s.name for s in SERVICES], free_ports(len(SERVICES)), strict=True))


@pytest.fixture(scope="session")
def services_standin(
    infra_dir: Path, stripe_mock: StripeMock, service_ports: dict[str, int]
) -> Iterator[StripeStandin]:
    """The Stripe stand-in the services of infra_endpoints talk to (STRIPE_API_BASE), delivering its events
    to payments' /webhooks/stripe. Its own process: `standin_webhooks` re-points `stripe_standin`, never it."""
    webhook_url = f"http://127.0.0.1:{service_ports['payments']}/webhooks/stripe"

    def make() -> StripeStandin:
        port = free_port()
        return StripeStandin(port, stripe_mock.url, webhook_urls=[webhook_url], webhook_secret=STANDIN_WEBHOOK_SECRET,
                             log_path=infra_dir / "logs" / f"stripe-standin-services-{port}.log")

    server = _start_on_free_ports(make, lambda s: s.start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def infra_endpoints(
    infra_dir: Path,
    kafka: KafkaServer,
    database_url_factory: DatabaseUrlFactory,
    services_standin: StripeStandin,
    mail_sink: MailSink,
    service_ports: dict[str, int],
) -> InfraEndpoints:
    """Everything a service needs, for deploy.services.build_service_env / make_service_process:
    a fresh database per service, a free HTTP port per service, the Stripe stand-in as STRIPE_API_BASE."""
    infra = InfraEndpoints(
        kafka_bootstrap=kafka.bootstrap,
        database_urls={spec.name: database_url_factory(spec.database_name) for spec in SERVICES},
        stripe_api_base=services_standin.url,
        smtp_host=mail_sink.host,
        smtp_port=mail_sink.port,
        mail_dir=mail_sink.directory,
        stripe_webhook_secret=STANDIN_WEBHOOK_SECRET,
        stripe_secret_key="sk_test_local",
        admin_password="admin-password",
        ports=service_ports,
    )
    assert infra.stripe_webhook_url in services_standin.webhook_urls
    return infra


class KafkaEventLog:
    """Reads topics from the beginning in the background, so a test can assert on what reached Kafka.

    ``records`` holds (event, key, partition); ``matching``/``wait_for`` filter by subject, type and
    any ``data`` fields given as keywords.
    """

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, enable_auto_commit=False
        )
        self.records: list[tuple[CloudEvent, str | None, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for record in self._consumer:
            key = record.key.decode() if record.key else None
            self.records.append((CloudEvent.model_validate_json(record.value), key, record.partition))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()

    @property
    def events(self) -> list[CloudEvent]:
        return [event for event, _, _ in self.records]

    def matching(self, subject: str | None = None, event_type: str | None = None, **data: Any) -> list[CloudEvent]:
        return [
            e for e in self.events
            if (subject is None or e.subject == subject)
            and (event_type is None or e.type == event_type)
            and all(e.data.get(k) == v for k, v in data.items())
        ]

    def keys(self, subject: str) -> list[str | None]:
        return [key for event, key, _ in self.records if event.subject == subject]

    async def wait_for(
        self, subject: str | None = None, event_type: str | None = None, count: int = 1, timeout: float = 30,
        **data: Any,
    ) -> list[CloudEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if len(found := self.matching(subject, event_type, **data)) >= count:
                return found
            await asyncio.sleep(0.05)
        seen = [(e.type, e.subject) for e in self.matching(subject)][-20:]
        raise AssertionError(f"timed out waiting for {count}x {event_type} of {subject} {data or ''}; saw {seen}")

    async def settle(self, seconds: float = 1.5) -> None:
        """Give relays time to publish anything (wrongly) pending before asserting an absence."""
        await asyncio.sleep(seconds)


@pytest.fixture(scope="session")
async def producer(kafka: KafkaServer) -> AsyncIterator[AIOKafkaProducer]:
    """An idempotent producer on the session's Kafka, for tests that play another service's events."""
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True)
    await p.start()
    yield p
    await p.stop()


async def publish_event(producer: AIOKafkaProducer, topic: str, event: CloudEvent, key: str) -> None:
    await producer.send_and_wait(topic, event.to_bytes(), key=key.encode())
