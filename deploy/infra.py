"""Local infrastructure as plain processes: Kafka (KRaft), PostgreSQL, stripe-mock, a mail sink, services.

No Docker needed. Each server class has ``start()`` / ``stop()`` and keeps its files and logs under the
directory it is given. The same classes back ``make run`` (deploy/run.py) and the pytest fixtures
(deploy/testing.py).

Everything here is synchronous; the few async checks (aiokafka, asyncpg) run on a private event loop
in a helper thread, so the API can be called from plain code, sync fixtures or (blocking) from inside
a running event loop alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import email
import email.policy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "REPO_ROOT",
    "RUN_DIR",
    "KAFKA_VERSION",
    "STRIPE_MOCK_VERSION",
    "InfraError",
    "free_port",
    "free_ports",
    "find_postgres_bin",
    "apt_install",
    "port_is_free",
    "make_traversable",
    "ensure_kafka_jars",
    "KafkaServer",
    "PostgresServer",
    "StripeMock",
    "StripeStandin",
    "MailSink",
    "ServiceProcess",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = REPO_ROOT / ".run"
KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
KAFKA_POM = KAFKA_DIR / "pom.xml"
KAFKA_LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
KAFKA_VERSION = "4.1.1"  # keep in step with deploy/kafka/pom.xml
STRIPE_MOCK_MODULE = "github.com/stripe/stripe-mock"
STRIPE_MOCK_VERSION = "v0.203.0"

T = TypeVar("T")


class InfraError(RuntimeError):
    """A piece of local infrastructure could not be installed, started or reached."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _say(message: str) -> None:
    print(f"[infra] {message}", flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets are held open together while picking)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a listening socket could be bound to host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    """True while the process runs: a zombie (exited, not yet reaped by its parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # /proc/<pid>/stat is "pid (comm) state ..."; comm may itself hold ") "
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _require_free(port: int, what: str) -> None:
    if not port_is_free(port):
        raise InfraError(f"{what}: port 127.0.0.1:{port} is already in use (another run still up?)")


def _tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def make_traversable(path: Path) -> None:
    """Add o+x to ``path`` and each parent that lacks it, so another user (postgres) can reach it."""
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            os.chmod(part, mode | 0o001)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log {path})"


_ASYNC_THREAD = "infra-async"


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """Silence aiokafka's retry warnings (topic not found yet, not leader yet) while a broker boots."""
    logger = logging.getLogger("aiokafka")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a helper thread and return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=_ASYNC_THREAD, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent test sessions don't install the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_PR_SET_PDEATHSIG = 1


def _child_setup_with_pdeathsig() -> None:  # runs in the child between fork and exec
    # If the launcher dies without cleaning up (kill -9, crashed pytest), the child gets SIGTERM.
    # (Linux sends it when the launching *thread* ends, hence only used from the main thread.)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# Loopback HTTP checks never go through a proxy, whatever the environment says.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Process:
    """A child process in its own session with output appended to a log file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        if self.running:
            raise InfraError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"\n===== {stamp} start: {' '.join(argv)}\n".encode())
        self._log.flush()
        try:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=str(cwd) if cwd else None,
                # Own session: a Ctrl-C in the terminal reaches only the launcher, which then stops
                # the children in order (and a signal to the session reaches grandchildren too).
                start_new_session=True,
                preexec_fn=(
                    _child_setup_with_pdeathsig if threading.current_thread() is threading.main_thread() else None
                ),
            )
        except OSError as exc:
            self._reap()
            raise InfraError(f"{self.name}: cannot start {argv[0]}: {exc}") from exc

    def check_alive(self, what: str = "") -> None:
        if self.popen is not None and self.popen.poll() is not None:
            code = self.popen.returncode
            raise InfraError(
                f"{self.name} exited with code {code} {what}\n--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
            )

    def _signal(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)  # the whole session: children of the child too
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(10)
        self._signal(signal.SIGKILL)  # stray grandchildren, if any
        self._reap()

    def kill(self) -> None:
        """SIGKILL at once (crash simulation)."""
        if self.popen is None:
            return
        self._signal(signal.SIGKILL)
        self.popen.wait(10)
        self._reap()

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------------------------------
# Kafka


def ensure_kafka_jars(cache_dir: Path) -> Path:
    """Resolve the Kafka broker jars with Maven into ``cache_dir`` once; return that directory.

    Idempotent: a stamp file holds a hash of deploy/kafka/pom.xml, and a matching stamp means done.
    Safe to call from concurrent processes (file lock).
    """
    cache_dir = cache_dir.resolve()
    stamp = cache_dir / ".resolved"
    digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return cache_dir
    with _file_lock(cache_dir.parent / f".{cache_dir.name}.lock"):
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return cache_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError("Maven (mvn) is not installed: apt-get install -y maven")
        _say(f"resolving Kafka {KAFKA_VERSION} jars with Maven into {cache_dir} (first run only)...")
        started = time.monotonic()
        staging = cache_dir.with_name(cache_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            raise InfraError(f"mvn could not resolve the Kafka jars:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        staging.rename(cache_dir)
        stamp.write_text(digest + "\n")
        _say(f"Kafka jars ready ({len(list(cache_dir.glob('*.jar')))} jars, {time.monotonic() - started:.0f}s)")
    return cache_dir


class KafkaServer:
    """A single-node Apache Kafka 4 (KRaft, combined broker+controller) on 127.0.0.1.

    ``data_dir`` holds server.properties, the log dirs (``data/``) and ``logs/`` (broker.log for the
    JVM's stdout/stderr, server.log from log4j). A data dir formatted before is reused as is.
    """

    READY_TOPIC = "_infra-ready"

    def __init__(
        self,
        data_dir: Path,
        port: int,
        controller_port: int,
        *,
        jars_dir: Path | None = None,
        heap: str = "512m",
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.jars_dir = jars_dir
        self.heap = heap
        self.extra_properties = dict(extra_properties or {})
        self.log_dir = self.data_dir / "logs"
        self.properties_path = self.data_dir / "server.properties"
        self._proc = _Process("kafka", self.log_dir / "broker.log")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.network.threads": "3",
            "num.io.threads": "4",
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
            "log.retention.hours": "168",
        }
        props.update(self.extra_properties)
        return props

    def _write_properties(self) -> None:
        lines = ["# written by deploy/infra.py KafkaServer; rewritten on every start"]
        lines += [f"{key}={value}" for key, value in self.properties().items()]
        self.properties_path.write_text("\n".join(lines) + "\n")

    def _java(self, main_class: str, *args: str, heap: str = "256m", short_lived: bool = False) -> list[str]:
        assert self.jars_dir is not None
        java = shutil.which("java")
        if java is None:
            raise InfraError("java is not installed (Kafka needs Java 17+): apt-get install -y openjdk-17-jre-headless")
        return [
            java,
            f"-Xmx{heap}",
            *(
                ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
                if short_lived
                else ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
            ),
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            f"{self.jars_dir}/*",
            main_class,
            *args,
        ]

    def _format_storage(self) -> None:
        stamp = self.data_dir / ".formatted"
        wanted = f"controller=127.0.0.1:{self.controller_port}\n"
        meta = self.data_dir / "data" / "meta.properties"
        if meta.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return
        if meta.is_file():
            # The controller's address is recorded in the metadata log at format time: a different
            # controller port means a fresh cluster.
            _say(f"kafka: controller port changed, wiping {self.data_dir / 'data'}")
            shutil.rmtree(self.data_dir / "data")
        tool = "kafka.tools.StorageTool"
        # Same format as `StorageTool random-uuid` (Kafka's Uuid: url-safe base64 of 16 random bytes),
        # made here to save a JVM start.
        cluster_id = ""
        while not cluster_id or cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            self._java(
                tool, "format", "-t", cluster_id, "-c", str(self.properties_path), "--standalone", short_lived=True
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise InfraError(f"kafka StorageTool format failed:\n{fmt.stdout}{fmt.stderr}")
        stamp.write_text(wanted)

    def start(self, timeout: float = 120.0) -> None:
        """Format storage if needed, launch the broker, and wait for a real produce/consume round trip."""
        started = time.monotonic()
        if self.jars_dir is None:
            self.jars_dir = ensure_kafka_jars(RUN_DIR / "kafka-jars")
        _require_free(self.port, "kafka")
        _require_free(self.controller_port, "kafka controller")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_properties()
        self._format_storage()
        self._proc.spawn(self._java("kafka.Kafka", str(self.properties_path), heap=self.heap))
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self._proc.terminate(timeout=5)
            raise
        _say(
            f"kafka {KAFKA_VERSION} ready on {self.bootstrap} in {time.monotonic() - started:.1f}s "
            f"(logs {self.log_dir})"
        )

    def _wait_ready(self, deadline: float) -> None:
        while not _tcp_open(self.port):
            self._proc.check_alive("while starting")
            if time.monotonic() > deadline:
                self._timeout("the broker port never opened")
            time.sleep(0.2)
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            self._proc.check_alive("while starting")
            try:
                with _quiet_aiokafka():
                    _run_async(lambda: self._round_trip(max(5.0, deadline - time.monotonic())))
                return
            except Exception as exc:  # retried until the deadline
                last_error = exc
                time.sleep(0.5)
        self._timeout(f"no produce/consume round trip ({last_error!r})")

    def _timeout(self, why: str) -> None:
        raise InfraError(
            f"kafka on {self.bootstrap} not ready: {why}\n"
            f"--- {self._proc.log_path} (tail) ---\n{_tail(self._proc.log_path)}\n"
            f"--- {self.log_dir / 'server.log'} (tail) ---\n{_tail(self.log_dir / 'server.log')}"
        )

    async def _round_trip(self, budget: float) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            if self.READY_TOPIC not in set(await admin.list_topics()):
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(self.READY_TOPIC, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()

        marker = uuid.uuid4().hex.encode()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, request_timeout_ms=10_000
        )
        await producer.start()
        try:
            meta = await asyncio.wait_for(producer.send_and_wait(self.READY_TOPIC, marker, partition=0), budget)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(self.READY_TOPIC, 0)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            record = await asyncio.wait_for(consumer.getone(), budget)
            if record.value != marker:
                raise InfraError("kafka readiness round trip read back a different record")
        finally:
            await consumer.stop()

    def create_topics(self, names: Sequence[str], partitions: int = 3) -> None:
        """Create topics (replication factor 1); existing ones are left alone."""

        async def create() -> None:
            from aiokafka.admin import AIOKafkaAdminClient, NewTopic

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                new = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in existing]
                if new:
                    await admin.create_topics(new)
            finally:
                await admin.close()

        _run_async(create)

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after ``timeout`` seconds."""
        if self._proc.running:
            self._proc.terminate(timeout)
            _say("kafka stopped")

    def kill9(self) -> None:
        """SIGKILL the broker now, no controlled shutdown (crash simulation); ``start()`` brings it back
        on the same data dir (the broker recovers its logs as after a power cut)."""
        self._proc.kill()
        _say("kafka killed (SIGKILL)")


# --------------------------------------------------------------------------------------------------
# PostgreSQL

_apt_updated = False
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin that has initdb, or None."""
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        with contextlib.suppress(ValueError):
            candidates.append((int(initdb.parent.parent.name), initdb.parent))
    return max(candidates)[1] if candidates else None


def apt_install(*packages: str) -> None:
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True, env=env, stdout=subprocess.DEVNULL)


class PostgresServer:
    """A PostgreSQL cluster in ``data_dir`` run as the ``postgres`` user, on 127.0.0.1:``port``.

    Trust authentication, but only for 127.0.0.1 and the unix socket (which lives in the data dir, or
    a short private dir when that path is too long for a socket). ``fast=True`` (tests) turns off
    fsync, synchronous_commit and full_page_writes. An existing cluster in ``data_dir`` is reused.
    """

    USER = "postgres"

    def __init__(self, data_dir: Path, port: int, *, fast: bool = False, max_connections: int = 300) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.fast = fast
        self.max_connections = max_connections
        self.log_path = self.data_dir / "postgres.log"
        self.bin_dir: Path | None = None
        self._started = False
        if len(str(self.data_dir / f".s.PGSQL.{port}")) < 100:
            self.socket_dir = self.data_dir
        else:
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
            self.socket_dir = Path("/tmp") / f"pg-sock-{digest}"

    # installation -----------------------------------------------------------------------------
    def ensure_installed(self) -> Path:
        """Make sure the server binaries exist (apt-get install postgresql if not); return their dir."""
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            with _file_lock(RUN_DIR / ".apt.lock"):
                bin_dir = find_postgres_bin()
                if bin_dir is None:
                    _say("installing PostgreSQL (apt-get install postgresql)...")
                    apt_install("postgresql")
                    bin_dir = find_postgres_bin()
            if bin_dir is None:
                raise InfraError("apt-get install postgresql did not provide /usr/lib/postgresql/*/bin/initdb")
        self.bin_dir = bin_dir
        return bin_dir

    # helpers ----------------------------------------------------------------------------------
    def _as_postgres(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None
        cmd = ["runuser", "-u", self.USER, "--", str(self.bin_dir / argv[0]), *argv[1:]]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/"
        )
        if check and proc.returncode != 0:
            raise InfraError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def _chown(self, path: Path) -> None:
        shutil.chown(path, user=self.USER, group=self.USER)

    def _init_cluster(self) -> None:
        if (self.data_dir / "PG_VERSION").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise InfraError(f"{self.data_dir} is neither empty nor a PostgreSQL data dir")
        make_traversable(self.data_dir.parent)
        self._chown(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        args = [
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            self.USER,
            "-E",
            "UTF8",
            "--no-locale",
            "--auth-local=trust",
            "--auth-host=trust",
        ]
        if self.fast:
            args.append("--no-sync")
        self._as_postgres(*args)
        (self.data_dir / "pg_hba.conf").write_text(
            "# written by deploy/infra.py: trust, loopback IPv4 and the private unix socket only\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n"
        )
        self._chown(self.data_dir / "pg_hba.conf")
        conf = self.data_dir / "postgresql.conf"
        conf.write_text(conf.read_text() + "\ninclude_if_exists = 'billing-local.conf'\n")

    def _write_local_conf(self) -> None:
        durable = "off" if self.fast else "on"
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            "fsync": durable,
            "synchronous_commit": durable,
            "full_page_writes": durable,
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        path = self.data_dir / "billing-local.conf"
        path.write_text(
            "# rewritten by deploy/infra.py on every start\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        self._chown(path)

    # lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        started = time.monotonic()
        if self.bin_dir is None:
            self.ensure_installed()
        self._init_cluster()
        make_traversable(self.data_dir.parent)
        if self._as_postgres("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0:
            _say(f"postgres: a server from an earlier run is still up on {self.data_dir}; restarting it")
            self._as_postgres("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w")
        _require_free(self.port, "postgres")
        self._write_local_conf()
        if self.socket_dir != self.data_dir:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            self._chown(self.socket_dir)
        if not self.log_path.exists():
            self.log_path.touch()
            self._chown(self.log_path)
        proc = self._as_postgres(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(timeout)),
            check=False,
            timeout=timeout + 10,
        )
        if proc.returncode != 0:
            raise InfraError(
                f"postgres did not start:\n{proc.stdout}{proc.stderr}\n"
                f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
            )
        self._started = True
        mode = " (fast: fsync off)" if self.fast else ""
        _say(
            f"postgres ready on 127.0.0.1:{self.port}{mode} in {time.monotonic() - started:.1f}s (data {self.data_dir})"
        )

    def postmaster_pid(self) -> int | None:
        """The running server's pid (first line of postmaster.pid), None when it is not running."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.bin_dir is None or not (self.data_dir / "postmaster.pid").exists():
            return
        self._as_postgres("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", check=False)
        self._started = False
        _say("postgres stopped")

    def crash_and_restart(self, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """``pg_ctl stop -m immediate`` (no checkpoint, every backend dropped: a crash), stay down
        ``down_seconds``, then ``start()`` again; the server replays its WAL on the way up."""
        self._as_postgres("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "60")
        _say("postgres stopped with -m immediate (crash)")
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start(timeout)

    # databases --------------------------------------------------------------------------------
    def url(self, name: str) -> str:
        """SQLAlchemy URL (asyncpg driver) for database ``name``."""
        return f"postgresql+asyncpg://{self.USER}@127.0.0.1:{self.port}/{name}"

    def dsn(self, name: str = "postgres") -> str:
        """Plain libpq/asyncpg DSN for database ``name``."""
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; return its SQLAlchemy asyncpg URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*")

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn())
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        _run_async(create)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists (disconnecting its sessions)."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")

        async def drop() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn())
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        _run_async(drop)


# --------------------------------------------------------------------------------------------------
# stripe-mock


class StripeMock:
    """stripe-mock (Stripe's official API mock, stateless) on 127.0.0.1:``port``, HTTP only."""

    def __init__(self, port: int, *, bin_dir: Path | None = None, log_path: Path | None = None) -> None:
        self.port = port
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else None
        self.log_path = Path(log_path) if log_path else RUN_DIR / "logs" / f"stripe-mock-{port}.log"
        self._proc = _Process("stripe-mock", self.log_path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc.running

    def ensure_installed(self, bin_dir: Path | None = None) -> Path:
        """``go install`` stripe-mock at STRIPE_MOCK_VERSION into ``bin_dir`` unless there; return the binary."""
        bin_dir = Path(bin_dir).resolve() if bin_dir else (self.bin_dir or RUN_DIR / "bin")
        self.bin_dir = bin_dir
        binary = bin_dir / "stripe-mock"
        stamp = bin_dir / ".stripe-mock.version"
        if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == STRIPE_MOCK_VERSION:
            return binary
        with _file_lock(bin_dir / ".stripe-mock.lock"):
            if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == STRIPE_MOCK_VERSION:
                return binary
            go = shutil.which("go")
            if go is None:
                raise InfraError("Go is not installed (needed to build stripe-mock): apt-get install -y golang")
            _say(f"installing stripe-mock {STRIPE_MOCK_VERSION} with go install into {bin_dir} (first run only)...")
            started = time.monotonic()
            env = {**os.environ, "GOBIN": str(bin_dir), "GOFLAGS": "-mod=mod"}
            proc = subprocess.run(
                [go, "install", f"{STRIPE_MOCK_MODULE}@{STRIPE_MOCK_VERSION}"],
                capture_output=True,
                text=True,
                env=env,
                check=False,
                cwd="/",
            )
            if proc.returncode != 0 or not binary.is_file():
                raise InfraError(f"go install stripe-mock failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
            stamp.write_text(STRIPE_MOCK_VERSION + "\n")
            _say(f"stripe-mock installed ({time.monotonic() - started:.0f}s)")
        return binary

    def start(self, timeout: float = 30.0) -> None:
        started = time.monotonic()
        binary = self.ensure_installed()
        _require_free(self.port, "stripe-mock")
        # stripe-mock also opens HTTPS on :12112 (all interfaces) unless told otherwise, even with
        # -http-addr: give HTTPS a loopback port chosen by the OS so it never clashes or leaves loopback.
        self._proc.spawn([str(binary), "-http-addr", f"127.0.0.1:{self.port}", "-https-addr", "127.0.0.1:0"])
        deadline = started + timeout
        while True:
            self._proc.check_alive("while starting")
            if self._http_ok():
                break
            if time.monotonic() > deadline:
                self._proc.terminate(5)
                raise InfraError(f"stripe-mock on {self.url} not ready after {timeout}s\n{_tail(self.log_path)}")
            time.sleep(0.1)
        _say(f"stripe-mock {STRIPE_MOCK_VERSION} ready on {self.url} in {time.monotonic() - started:.1f}s")

    def _http_ok(self) -> bool:
        request = urllib.request.Request(
            f"{self.url}/v1/customers?limit=1", headers={"Authorization": "Bearer sk_test_readiness"}
        )
        try:
            with _http.open(request, timeout=2) as response:  # loopback only
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._proc.running:
            self._proc.terminate(10)
            _say("stripe-mock stopped")


class StripeStandin:
    """The stateful Stripe stand-in (deploy/stripe_standin, ``python -m deploy.stripe_standin``) on
    127.0.0.1:``port``, in front of stripe-mock at ``stripe_mock_url``.

    Point the SDK at ``url`` (``StripeClient(key, base_addresses={"api": url})``). Events go to
    ``webhook_urls`` (changeable at runtime with ``set_webhook_urls``), signed with ``webhook_secret``.
    The JSON helpers below drive the stand-in's test knobs (``/_standin/...``).
    """

    def __init__(
        self,
        port: int,
        stripe_mock_url: str,
        *,
        webhook_urls: Sequence[str] = (),
        webhook_secret: str = "whsec_local",
        public_url: str | None = None,
        state_file: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = port
        self.stripe_mock_url = stripe_mock_url
        self.webhook_urls = list(webhook_urls)
        self.webhook_secret = webhook_secret
        self.public_url = public_url
        self.state_file = Path(state_file) if state_file else None
        self.log_path = Path(log_path) if log_path else RUN_DIR / "logs" / f"stripe-standin-{port}.log"
        self._proc = _Process("stripe-standin", self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc.running

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "deploy.stripe_standin", "--port", str(self.port),
                "--stripe-mock-url", self.stripe_mock_url, "--webhook-secret", self.webhook_secret]
        for url in self.webhook_urls:
            argv += ["--webhook-url", url]
        if self.public_url:
            argv += ["--public-url", self.public_url]
        if self.state_file:
            argv += ["--state-file", str(self.state_file)]
        return argv

    def start(self, timeout: float = 30.0) -> None:
        started = time.monotonic()
        _require_free(self.port, "stripe stand-in")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
        self._proc.spawn(self.argv(), env=env, cwd=REPO_ROOT)
        deadline = started + timeout
        while not self.healthy():
            self._proc.check_alive("while starting")
            if time.monotonic() > deadline:
                self._proc.terminate(5)
                raise InfraError(f"stripe stand-in on {self.url} not ready after {timeout}s\n{_tail(self.log_path)}")
            time.sleep(0.1)
        _say(f"stripe stand-in ready on {self.url} in {time.monotonic() - started:.1f}s (log {self.log_path})")

    def healthy(self) -> bool:
        try:
            with _http.open(f"{self.url}/_standin/health", timeout=2) as response:  # loopback only
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._proc.running:
            self._proc.terminate(10)
            _say("stripe stand-in stopped")

    # test knobs ---------------------------------------------------------------------------------
    def _json(self, method: str, path: str, body: Mapping[str, Any] | None = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with _http.open(request, timeout=timeout) as response:
            return json.loads(response.read())

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """``duplicate_deliveries``, ``shuffle``, ``webhook_urls``, ``enabled_events``, ``retry_for_seconds``."""
        result: dict[str, Any] = self._json("POST", "/_standin/config", knobs)
        return result

    def set_webhook_urls(self, urls: Sequence[str]) -> None:
        self.configure(webhook_urls=list(urls))

    def set_card(self, customer_id: str, outcome: str) -> None:
        """The customer's simulated card: ``succeed``, ``decline`` or ``none``."""
        self._json("POST", f"/_standin/customers/{customer_id}/card", {"outcome": outcome})

    def events(self, event_type: str | None = None, object_id: str | None = None) -> list[dict[str, Any]]:
        """What was emitted (oldest first) with each delivery's status."""
        query = urllib.parse.urlencode({k: v for k, v in {"type": event_type, "object": object_id}.items() if v})
        result: list[dict[str, Any]] = self._json("GET", f"/_standin/events?{query}")["data"]
        return result

    def pending_deliveries(self) -> int:
        return int(self._json("GET", "/_standin/deliveries/pending")["pending"])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued delivery was delivered (or given up); False on timeout."""
        return bool(self._json("POST", f"/_standin/flush?timeout={timeout}", {}, timeout=timeout + 5)["drained"])


# --------------------------------------------------------------------------------------------------
# mail sink


class MailSink:
    """The SMTP sink of deploy/mailsink.py on 127.0.0.1:``port``, storing each message as ``.eml``.

    Failure mode for tests (a control file in the mail directory, read on every MAIL FROM):
      * ``fail_next(n)`` writes ``n`` into ``<dir>/.fail``: the next ``n`` messages are refused with
        ``451 4.3.0 try later`` (the count goes down by one each time; the file goes away at zero);
      * ``fail_always()`` makes ``.fail`` contain ``always``: every message is refused until
        ``recover()`` removes the file. An empty ``.fail`` also means always.
    """

    FAIL_FILE = ".fail"

    def __init__(self, directory: Path, port: int, *, log_path: Path | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.port = port
        self.log_path = Path(log_path) if log_path else self.directory.parent / f"mailsink-{port}.log"
        self._proc = _Process("mailsink", self.log_path)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self, timeout: float = 20.0) -> None:
        started = time.monotonic()
        _require_free(self.port, "mail sink")
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
        self._proc.spawn(
            [sys.executable, "-m", "deploy.mailsink", "--dir", str(self.directory), "--port", str(self.port)],
            env=env,
            cwd=REPO_ROOT,
        )
        deadline = started + timeout
        while not self._banner_ok():
            self._proc.check_alive("while starting")
            if time.monotonic() > deadline:
                self._proc.terminate(5)
                raise InfraError(f"mail sink on port {self.port} not ready\n{_tail(self.log_path)}")
            time.sleep(0.1)
        _say(
            f"mail sink ready on smtp://127.0.0.1:{self.port} in {time.monotonic() - started:.1f}s "
            f"(messages in {self.directory})"
        )

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.settimeout(2)
                ok = sock.recv(512).startswith(b"220")
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc.running:
            self._proc.terminate(5)
            _say("mail sink stopped")

    # failure control ----------------------------------------------------------------------------
    def fail_next(self, n: int = 1) -> None:
        """Refuse the next ``n`` messages with 451 (temporary failure)."""
        self._write_fail(str(int(n)))

    def fail_always(self) -> None:
        """Refuse every message with 451 until ``recover()``."""
        self._write_fail("always")

    def recover(self) -> None:
        """Accept messages again."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / self.FAIL_FILE).unlink()

    def _write_fail(self, content: str) -> None:
        tmp = self.directory / f".fail.{os.getpid()}.tmp"
        tmp.write_text(content + "\n")
        os.replace(tmp, self.directory / self.FAIL_FILE)

    # messages -----------------------------------------------------------------------------------
    def paths(self) -> list[Path]:
        return sorted(self.directory.glob("*.eml"))

    def messages(self) -> list[EmailMessage]:
        """Every stored message, oldest first, parsed with the modern email policy."""
        return [_read_eml(path) for path in self.paths()]

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait until at least ``count`` messages are stored; return all of them."""
        deadline = time.monotonic() + timeout
        while len(self.paths()) < count:
            if time.monotonic() > deadline:
                raise InfraError(f"expected {count} message(s) in {self.directory}, found {len(self.paths())}")
            time.sleep(0.05)
        return self.messages()

    def clear(self) -> None:
        """Delete stored messages and any failure mode."""
        for path in self.paths():
            path.unlink(missing_ok=True)
        self.recover()


def _read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# --------------------------------------------------------------------------------------------------
# services


class ServiceProcess:
    """A Python service subprocess that is healthy when GET http://127.0.0.1:<port>/healthz answers 200."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        port: int,
        log_path: Path,
        *,
        cwd: Path | None = None,
        health_path: str = "/healthz",
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.log_path = Path(log_path)
        self.cwd = cwd or REPO_ROOT
        self.health_path = health_path
        self.start_timeout = start_timeout
        self._proc = _Process(name, self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def healthy(self) -> bool:
        try:
            with _http.open(f"{self.url}{self.health_path}", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float | None = None) -> None:
        started = time.monotonic()
        timeout = self.start_timeout if timeout is None else timeout
        _require_free(self.port, self.name)
        self._proc.spawn(self.argv, env=self.env, cwd=self.cwd)
        deadline = started + timeout
        while not self.healthy():
            self._proc.check_alive("before becoming healthy")
            if time.monotonic() > deadline:
                self._proc.terminate(5)
                raise InfraError(
                    f"{self.name}: GET {self.url}{self.health_path} not 200 after {timeout:.0f}s\n"
                    f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)
        _say(f"{self.name} healthy on {self.url} in {time.monotonic() - started:.1f}s (log {self.log_path})")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self._proc.running:
            self._proc.terminate(timeout)
            _say(f"{self.name} stopped")

    def kill(self) -> None:
        """SIGKILL now, no cleanup (crash simulation)."""
        self._proc.kill()

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self._wait_port_released()
        self.start(timeout)

    def _wait_port_released(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
