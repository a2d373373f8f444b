"""Each infrastructure fixture works for real (one round trip per server)."""

from __future__ import annotations

import os
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy.infra import InfraError, KafkaServer, MailSink, PostgresServer, ServiceProcess, StripeMock, free_port
from deploy.services import SERVICES, InfraEndpoints, build_service_env, service_by_name
from deploy.testing import DatabaseUrlFactory


async def test_kafka_idempotent_round_trip(kafka: KafkaServer) -> None:
    topic = f"test-infra-{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"value-{i}".encode(), key=b"same-key")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received: list[bytes] = []
        while len(received) < 5:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, "no records within 10s"
            for records in batch.values():
                received += [r.value for r in records if r.value is not None]
        await consumer.commit()
    finally:
        await consumer.stop()
    # one key -> one partition -> order kept
    assert received == [f"value-{i}".encode() for i in range(5)]


async def test_postgres_database(postgres: PostgresServer, database_url_factory: DatabaseUrlFactory) -> None:
    url = database_url_factory("infra check")
    assert url.startswith(f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/infra_check_")
    name = url.rsplit("/", 1)[1]
    assert postgres.create_database(name) == url  # idempotent
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == name
        assert await conn.fetchval("show server_encoding") == "UTF8"
    finally:
        await conn.close()


async def test_stripe_mock_lists_customers(stripe_mock: StripeMock) -> None:
    async with httpx.AsyncClient(base_url=stripe_mock.url) as client:
        response = await client.get("/v1/customers", headers={"Authorization": "Bearer sk_test_123"})
    assert response.status_code == 200
    assert response.json()["object"] == "list"


def _message(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "billing@example.com"
    message["To"] = "client@example.com"
    message["Subject"] = subject
    message.set_content("Invoice 2026-0001 is due.")
    return message


async def test_mail_sink_stores_eml(fresh_mail_sink: MailSink) -> None:
    sink = fresh_mail_sink
    await aiosmtplib.send(
        _message("Your invoice"),
        hostname=sink.host,
        port=sink.port,
        recipients=["client@example.com", "bcc@example.com"],
    )
    [stored] = sink.wait_for_messages(1)
    assert stored["Subject"] == "Your invoice"
    assert stored["X-Mailsink-Rcpt-To"] == "client@example.com, bcc@example.com"
    assert "2026-0001" in stored.get_body().get_content()  # type: ignore[union-attr]
    assert [p.suffix for p in sink.paths()] == [".eml"]


async def test_mail_sink_temporary_failure(fresh_mail_sink: MailSink) -> None:
    sink = fresh_mail_sink
    sink.fail_next(2)
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPResponseException) as excinfo:
            await aiosmtplib.send(_message("retry me"), hostname=sink.host, port=sink.port)
        assert excinfo.value.code == 451
    await aiosmtplib.send(_message("third time lucky"), hostname=sink.host, port=sink.port)
    assert [m["Subject"] for m in sink.wait_for_messages(1)] == ["third time lucky"]

    sink.fail_always()
    with pytest.raises(aiosmtplib.SMTPResponseException):
        await aiosmtplib.send(_message("down"), hostname=sink.host, port=sink.port)
    sink.recover()
    await aiosmtplib.send(_message("up again"), hostname=sink.host, port=sink.port)
    assert len(sink.wait_for_messages(2)) == 2


@pytest.mark.infra  # spawns processes itself (no infrastructure fixture)
def test_service_process_lifecycle(tmp_path: Path) -> None:
    (tmp_path / "healthz").write_text("ok")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    service = ServiceProcess("static", argv, dict(os.environ), port, tmp_path / "static.log")
    service.start(timeout=20)
    try:
        assert service.healthy()
        first_pid = service.pid
        service.kill()  # crash
        assert not service.running and not service.healthy()
        service.restart(timeout=20)
        assert service.healthy() and service.pid != first_pid
    finally:
        service.stop()
    assert not service.running
    assert "start:" in (tmp_path / "static.log").read_text()


@pytest.mark.infra  # spawns processes itself (no infrastructure fixture)
def test_service_process_reports_early_exit(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom: bad config'); sys.exit(3)"]
    service = ServiceProcess("broken", argv, dict(os.environ), free_port(), tmp_path / "broken.log")
    with pytest.raises(InfraError, match="boom: bad config"):
        service.start(timeout=20)


def test_build_service_env() -> None:
    infra = InfraEndpoints(
        kafka_bootstrap="127.0.0.1:1",
        database_urls={s.name: f"postgresql+asyncpg://postgres@127.0.0.1:2/{s.name}" for s in SERVICES},
        stripe_api_base="http://127.0.0.1:3",
        smtp_host="127.0.0.1",
        smtp_port=4,
        ports={"invoice": 9001},
    )
    env = build_service_env(service_by_name("gateway"), infra, base_env={})
    assert env["GATEWAY_PORT"] == "8000" and env["GATEWAY_HOST"] == "127.0.0.1"
    assert env["GATEWAY_DATABASE_URL"].endswith("/gateway")
    assert env["GATEWAY_INVOICE_URL"] == "http://127.0.0.1:9001"
    assert env["GATEWAY_REPORTING_URL"] == "http://127.0.0.1:8005"
    assert "GATEWAY_GATEWAY_URL" not in env
    assert env["STRIPE_API_BASE"] == "http://127.0.0.1:3" and env["SMTP_PORT"] == "4"
    assert env["BILLING_INTERNAL_TOKEN"] == infra.internal_token
    invoice = build_service_env(service_by_name("invoice"), infra, base_env={})
    assert invoice["INVOICE_PORT"] == "9001" and invoice["INVOICE_KAFKA_BOOTSTRAP"] == "127.0.0.1:1"
    assert not any(key.startswith("GATEWAY_") and key.endswith("_URL") for key in invoice)
