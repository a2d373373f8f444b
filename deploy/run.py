"""Run the whole billing platform locally: ``make run`` (or ``python -m deploy.run``).

Starts, as local processes listening on 127.0.0.1 only:
  PostgreSQL      127.0.0.1:55432   data in .run/pg (kept between runs), one database per service
  Kafka 4         127.0.0.1:9092    (controller 9093) KRaft single node, data in .run/kafka
  stripe-mock     127.0.0.1:12111   Stripe API mock (stateless)
  Stripe stand-in 127.0.0.1:12113   stateful Stripe in front of stripe-mock (deploy/stripe_standin): the
                                    SDK's STRIPE_API_BASE for every service, hosts the checkout, invoice
                                    and portal pages, delivers signed events to payments' /webhooks/stripe;
                                    state in .run/stripe-standin/state.json (kept with .run/pg)
  mail sink       127.0.0.1:1025    SMTP; every message lands as an .eml file in .run/mail/
then every service in deploy/services.py that has a __main__.py (invoice 8001, payments 8002,
subscriptions 8003, notifications 8004, reporting 8005, gateway 8000), runs ``python -m deploy.seed``
if it exists, prints the URLs and the demo login, and supervises (deploy/supervise.py): a service
that dies is reported and restarted with a capped backoff (1 s doubling to 30 s), and so are
PostgreSQL, Kafka, the Stripe stand-ins and the mail sink. Ctrl-C (or SIGTERM) stops the services,
then the infrastructure, in reverse order, and exits 0. Logs: .run/logs/.

Ports: the ones above; BILLING_PORT_OFFSET=N moves every one of them by N (e.g. 100: gateway 8100,
PostgreSQL 55532, Kafka 9192), for a second checkout beside the first or a port another program
holds. One already taken stops the run with a message naming it. (Kafka's data is kept per
controller port: a new offset starts it empty.)

Environment: BILLING_ADMIN_PASSWORD (default admin-password), STRIPE_WEBHOOK_SECRET (default
whsec_local), STRIPE_SECRET_KEY (default sk_test_local). A fresh BILLING_INTERNAL_TOKEN is made per run.
With a key Stripe issued (STRIPE_SECRET_KEY=sk_test_...) neither stripe-mock nor the stand-in is
started and the services talk to Stripe's test mode (forward its webhooks yourself, e.g. ``stripe
listen --forward-to http://127.0.0.1:8000/webhooks/stripe``, with STRIPE_WEBHOOK_SECRET set to its secret).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from deploy.infra import (
    REPO_ROOT,
    RUN_DIR,
    InfraError,
    KafkaServer,
    MailSink,
    PostgresServer,
    ServiceProcess,
    StripeMock,
    StripeStandin,
    ensure_kafka_jars,
    port_is_free,
)
from deploy.services import GATEWAY, SERVICES, InfraEndpoints, build_service_env, make_service_process
from deploy.supervise import Supervisor, Unit

POSTGRES_PORT = 55432
KAFKA_PORT = 9092
KAFKA_CONTROLLER_PORT = 9093
STRIPE_MOCK_PORT = 12111
STRIPE_STANDIN_PORT = 12113
SMTP_PORT = 1025
PORT_OFFSET_VARIABLE = "BILLING_PORT_OFFSET"
STANDIN_STATE = RUN_DIR / "stripe-standin" / "state.json"


@dataclass
class _Running:
    name: str
    stop: Callable[[], None]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _port_offset() -> int:
    text = os.environ.get(PORT_OFFSET_VARIABLE, "0").strip() or "0"
    try:
        offset = int(text)
    except ValueError:
        raise InfraError(f"{PORT_OFFSET_VARIABLE} must be a whole number of ports (got {text!r})") from None
    if not 0 <= offset <= 10000:
        raise InfraError(f"{PORT_OFFSET_VARIABLE} must be between 0 and 10000 (got {offset})")
    return offset


def _check_ports(ports: dict[str, int]) -> None:
    busy = [f"{name} 127.0.0.1:{port}" for name, port in ports.items() if not port_is_free(port)]
    if busy:
        raise InfraError("ports already in use (is another `make run` up?): " + ", ".join(busy))


def _seed(env: dict[str, str], log_dir: Path) -> None:
    if importlib.util.find_spec("deploy.seed") is None:
        print("[run] no deploy/seed.py yet: skipping demo data", flush=True)
        return
    print("[run] seeding demo data (python -m deploy.seed)...", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.seed"],
        env=env,
        cwd=REPO_ROOT,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    if proc.returncode != 0:
        print(f"[run] WARNING: deploy.seed exited with {proc.returncode}; the stack stays up", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--infra-only", action="store_true", help="start Postgres, Kafka, stripe-mock and the mail sink, but no service"
    )
    parser.add_argument("--no-seed", action="store_true", help="do not run deploy.seed")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop everything if a service fails to become healthy (default: go on without it and retry)",
    )
    parser.add_argument(
        "--no-restart", action="store_true", help="report a process that dies, but do not restart it"
    )
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    log_dir = RUN_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[_Running] = []
    services: list[ServiceProcess] = []
    supervisor = Supervisor()
    exit_code = 0
    try:
        specs = [] if args.infra_only else list(SERVICES)
        offset = _port_offset()
        service_ports = {spec.name: spec.port + offset for spec in SERVICES}
        # (Postgres checks its own port: a server left behind by a killed run on .run/pg is restarted.)
        _check_ports(
            {
                "kafka": KAFKA_PORT + offset,
                "kafka controller": KAFKA_CONTROLLER_PORT + offset,
                "stripe-mock": STRIPE_MOCK_PORT + offset,
                "stripe stand-in": STRIPE_STANDIN_PORT + offset,
                "smtp": SMTP_PORT + offset,
            }
            | {spec.name: service_ports[spec.name] for spec in specs if spec.runnable}
        )

        postgres = PostgresServer(RUN_DIR / "pg", POSTGRES_PORT + offset)
        fresh_databases = not (postgres.data_dir / "PG_VERSION").exists()
        postgres.ensure_installed()
        postgres.start()
        running.append(_Running("postgres", postgres.stop))
        supervisor.watch_postgres(postgres)
        database_urls = {spec.name: postgres.create_database(spec.database_name) for spec in SERVICES}

        kafka = KafkaServer(
            RUN_DIR / "kafka",
            KAFKA_PORT + offset,
            KAFKA_CONTROLLER_PORT + offset,
            jars_dir=ensure_kafka_jars(RUN_DIR / "kafka-jars"),
        )
        kafka.start()
        running.append(_Running("kafka", kafka.stop))
        supervisor.watch_kafka(kafka)

        mail = MailSink(RUN_DIR / "mail", SMTP_PORT + offset, log_path=log_dir / "mailsink.log")
        mail.start()
        running.append(_Running("mail sink", mail.stop))
        supervisor.watch(Unit("mail sink", lambda: mail.running, mail.start, log_dir / "mailsink.log"))

        standin_url = f"http://127.0.0.1:{STRIPE_STANDIN_PORT + offset}"
        infra = InfraEndpoints(
            kafka_bootstrap=kafka.bootstrap,
            database_urls=database_urls,
            stripe_api_base=standin_url,
            smtp_host=mail.host,
            smtp_port=mail.port,
            mail_dir=mail.directory,
            ports=service_ports,
        )
        stripe_mock_url: str | None = None
        if not infra.uses_real_stripe:
            stripe_mock = StripeMock(
                STRIPE_MOCK_PORT + offset, bin_dir=RUN_DIR / "bin", log_path=log_dir / "stripe-mock.log"
            )
            stripe_mock.start()
            running.append(_Running("stripe-mock", stripe_mock.stop))
            supervisor.watch(Unit("stripe-mock", lambda: stripe_mock.running, stripe_mock.start,
                                  log_dir / "stripe-mock.log"))
            stripe_mock_url = stripe_mock.url
            if fresh_databases and STANDIN_STATE.exists():
                # New databases know none of the Stripe objects a previous run left in the stand-in.
                STANDIN_STATE.unlink()
            STANDIN_STATE.parent.mkdir(parents=True, exist_ok=True)
            standin = StripeStandin(
                STRIPE_STANDIN_PORT + offset,
                stripe_mock.url,
                webhook_urls=[infra.stripe_webhook_url],
                webhook_secret=infra.stripe_webhook_secret,
                public_url=standin_url,
                state_file=STANDIN_STATE,
                log_path=log_dir / "stripe-standin.log",
            )
            standin.start()
            running.append(_Running("stripe stand-in", standin.stop))
            supervisor.watch(Unit("stripe stand-in", lambda: standin.running, standin.start,
                                  log_dir / "stripe-standin.log"))
        failed: list[str] = []
        skipped: list[str] = []
        for spec in specs:
            if not spec.runnable:
                print(f"[run] {spec.name}: {spec.module} has no __main__.py yet, skipped", flush=True)
                skipped.append(spec.name)
                continue
            service = make_service_process(spec, infra, log_dir)
            running.append(_Running(spec.name, service.stop))
            try:
                service.start()
            except InfraError as exc:
                if args.strict:
                    raise
                print(f"[run] WARNING: {exc}\n[run] going on without {spec.name} (retried with backoff)",
                      flush=True)
                failed.append(spec.name)
                supervisor.watch_service(service, running=False)
                continue
            services.append(service)
            supervisor.watch_service(service)

        if services and not args.no_seed:
            seed_env = dict(os.environ)
            for spec in SERVICES:
                seed_env.update(build_service_env(spec, infra))
            _seed(seed_env, log_dir)

        _banner(infra, stripe_mock_url, mail.directory, log_dir, postgres, [s.name for s in services], skipped,
                failed, args)
        supervisor.restarts_enabled = not args.no_restart
        while True:
            time.sleep(1)
            supervisor.tick()
    except KeyboardInterrupt:
        print("\n[run] stopping...", flush=True)
    except InfraError as exc:
        print(f"[run] ERROR: {exc}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for item in reversed(running):
            try:
                item.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"[run] could not stop {item.name} cleanly: {exc!r}", file=sys.stderr, flush=True)
    if exit_code == 0:
        print("[run] all stopped", flush=True)
    return exit_code


def _banner(
    infra: InfraEndpoints,
    stripe_mock_url: str | None,
    mail_dir: Path,
    log_dir: Path,
    postgres: PostgresServer,
    started: list[str],
    skipped: list[str],
    failed: list[str],
    args: argparse.Namespace,
) -> None:
    gateway = infra.url_of(GATEWAY)
    lines = ["", "=" * 72, "Billing platform is running (Ctrl-C stops everything)", ""]
    if GATEWAY in started:
        lines += [
            f"  Gateway        {gateway}",
            f"  API docs       {gateway}/docs",
            f"  Admin UI       {gateway}/admin",
            f"  Client portal  {gateway}/portal",
            "",
        ]
    for spec in SERVICES:
        if spec.name in started and spec.name != GATEWAY:
            lines.append(f"  {spec.name:<14} {infra.url_of(spec.name)}")
    if skipped:
        lines.append(f"  not built yet: {', '.join(skipped)}")
    if failed:
        lines.append(f"  FAILED to start: {', '.join(failed)} (see {log_dir})")
    lines += [
        "",
        f"  Kafka          {infra.kafka_bootstrap}",
        f"  PostgreSQL     {postgres.dsn('<service>')}  (databases: {', '.join(infra.database_urls)})",
        *(
            [f"  Stripe         test mode: forward its webhooks to {infra.url_of(GATEWAY)}/webhooks/stripe"]
            if stripe_mock_url is None
            else [
                f"  Stripe         {infra.stripe_api_base}  (the stand-in: STRIPE_API_BASE; checkout, invoice and"
                f" portal pages; signed events -> {infra.stripe_webhook_url})",
                f"  stripe-mock    {stripe_mock_url}",
            ]
        ),
        f"  SMTP sink      smtp://{infra.smtp_host}:{infra.smtp_port}  ->  {mail_dir}/*.eml",
        f"  Logs           {log_dir}",
        "",
        f"  Demo admin     admin@example.com / {infra.admin_password}",
        "  Demo client    client@example.com / client-password  (portal: invoices of Acme Studio)",
        "  Watch events   .venv/bin/python -m deploy.watch --from-beginning",
        f"  Stripe webhook secret  {infra.stripe_webhook_secret}",
    ]
    if not started and not args.infra_only:
        lines.append("  (no service could be started yet)")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
