"""Install what the local stack and the tests need and is missing (used by ``make install``).

    python -m deploy.install

Each step says what it installs and from which kind of registry, shows its progress (the packages
apt fetches, the modules Go downloads) and, while it runs, how long it has been running; a step
with nothing to do is silent. Steps: Java 17 and Maven (apt), the PDF fonts and tools (apt),
Chromium for the browser tests (apt), PostgreSQL (apt), the Kafka broker jars (Maven, into
.run/kafka-jars), stripe-mock (Go, into .run/bin), kustomize (Go, into .run/bin, renders
deploy/k8s in the tests) and kubernetes-validate (pip, the Kubernetes schemas the tests check the
rendered manifests against). The first run takes a few minutes; later runs take a second.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from deploy.infra import (
    KAFKA_VERSION,
    RUN_DIR,
    STRIPE_MOCK_VERSION,
    InfraError,
    PostgresServer,
    StripeMock,
    ensure_kafka_jars,
    find_postgres_bin,
)

BIN_DIR = RUN_DIR / "bin"
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.7.1"  # builds with this machine's Go (1.26); newer ones want Go 1.27
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"  # bundles the Kubernetes JSON schemas (offline)
HEARTBEAT_SECONDS = 15.0

_apt_updated = False


def _say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _heartbeat(label: str, started: float) -> Iterator[None]:
    """Every HEARTBEAT_SECONDS, `label: still working (Ns)`, so a long download never looks hung."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            _say(f"{label}: still working ({time.monotonic() - started:.0f}s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _stream(argv: Sequence[str], *, env: dict[str, str] | None = None, show: Callable[[str], str | None],
            cwd: str | None = None) -> None:
    """Run `argv`, printing what `show` makes of each output line (None: nothing); raise on failure."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=cwd, stdin=subprocess.DEVNULL)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-40:], line]
        shown = show(line)
        if shown:
            _say(f"    {shown}")
    if proc.wait() != 0:
        raise InfraError(f"{' '.join(argv)} failed ({proc.returncode}):\n" + "\n".join(tail))


_APT_GET = re.compile(r"^Get:\d+ \S+ \S+ \S+ (\S+) \S+ (\S+) \[([^\]]+)\]")


def _apt_line(line: str) -> str | None:
    if match := _APT_GET.match(line):
        return f"downloading {match.group(1)} {match.group(2)} ({match.group(3)})"
    if line.startswith("Setting up "):
        return line.split(" (", 1)[0].replace("Setting up", "setting up")
    if line.startswith(("E:", "W:")):
        return line
    return None


def apt_install(*packages: str) -> None:
    """apt-get install (after one apt-get update per run), showing each package fetched and set up."""
    global _apt_updated
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        raise InfraError(f"apt-get install {' '.join(packages)} needs root (or sudo); install them and re-run")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        _say("    apt-get update (the Debian/Ubuntu package lists)")
        _stream([*sudo, "apt-get", "update", "-q"], env=env, show=lambda line: line if line.startswith("E:") else None)
        _apt_updated = True
    _stream([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env, show=_apt_line)


def _go_line(line: str) -> str | None:
    return line.removeprefix("go: ") if line.startswith("go: downloading") else line if "error" in line else None


def ensure_kustomize(bin_dir: Path = BIN_DIR, *, say: Callable[[str], None] | None = None) -> Path:
    """`go install` kustomize at KUSTOMIZE_VERSION into `bin_dir` unless there; return the binary."""
    bin_dir = bin_dir.resolve()
    binary = bin_dir / "kustomize"
    stamp = bin_dir / ".kustomize.version"
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == KUSTOMIZE_VERSION:
        return binary
    go = shutil.which("go")
    if go is None:
        raise InfraError("Go is not installed (needed to build kustomize): apt-get install -y golang")
    bin_dir.mkdir(parents=True, exist_ok=True)
    (say or _say)(f"    go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION} (modules from the Go module proxy)")
    # GOTOOLCHAIN=local: build with the Go that is here rather than fetch another toolchain.
    env = {**os.environ, "GOBIN": str(bin_dir), "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    _stream([go, "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"], env=env, show=_go_line, cwd="/")
    if not binary.is_file():
        raise InfraError(f"go install left no {binary}")
    stamp.write_text(KUSTOMIZE_VERSION + "\n")
    return binary


def _kubernetes_validate_missing() -> bool:
    return importlib.util.find_spec("kubernetes_validate") is None


def _pip_install_kubernetes_validate() -> None:
    _stream([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
             KUBERNETES_VALIDATE], show=lambda line: line if line.startswith(("Collecting", "Successfully", "ERROR"))
            else None)


def ensure_kubernetes_validate() -> ModuleType:
    """The kubernetes_validate module, pip-installed into this interpreter first when it is missing."""
    if _kubernetes_validate_missing():
        _say(f"    pip install {KUBERNETES_VALIDATE} (PyPI)")
        _pip_install_kubernetes_validate()
        importlib.invalidate_caches()
    return importlib.import_module("kubernetes_validate")


def _missing_pdf_packages() -> list[str]:
    from services.invoice.pdf.system import missing_apt_packages

    missing = missing_apt_packages()
    missing += [pkg for lib, pkg in (("pango-1.0", "libpango-1.0-0"), ("pangoft2-1.0", "libpangoft2-1.0-0"))
                if ctypes.util.find_library(lib) is None]
    return missing


def _stripe_mock_missing() -> bool:
    stamp = BIN_DIR / ".stripe-mock.version"
    return not ((BIN_DIR / "stripe-mock").is_file() and stamp.is_file()
                and stamp.read_text().strip() == STRIPE_MOCK_VERSION)


def _kafka_jars_missing() -> bool:
    return not (RUN_DIR / "kafka-jars" / ".resolved").is_file()


@dataclass
class Step:
    title: str  # what, and from which kind of registry
    needed: Callable[[], bool]
    run: Callable[[], object]


def steps() -> list[Step]:
    def apt_step(title: str, command: str, package: str) -> Step:
        return Step(f"{title} (apt: {package})", lambda: shutil.which(command) is None, lambda: apt_install(package))

    pdf = _missing_pdf_packages
    return [
        apt_step("Java 17, runs Kafka", "java", "openjdk-17-jre-headless"),
        apt_step("Maven, resolves the Kafka jars", "mvn", "maven"),
        Step("fonts and tools for invoice PDFs and their tests (apt: " + (" ".join(pdf()) or "-") + ")",
             lambda: bool(pdf()), lambda: apt_install(*pdf())),
        apt_step("Chromium, for the portal and admin browser tests", "chromium", "chromium"),
        Step("PostgreSQL server (apt: postgresql)", lambda: find_postgres_bin() is None,
             lambda: apt_install("postgresql")),
        Step(f"Kafka {KAFKA_VERSION} broker jars (Maven, into .run/kafka-jars; about 60 MB)", _kafka_jars_missing,
             lambda: ensure_kafka_jars(RUN_DIR / "kafka-jars")),
        Step(f"stripe-mock {STRIPE_MOCK_VERSION} (Go modules, built into .run/bin)", _stripe_mock_missing,
             lambda: StripeMock(0).ensure_installed(BIN_DIR)),
        Step(f"kustomize {KUSTOMIZE_VERSION}, renders deploy/k8s for the tests (Go modules, into .run/bin)",
             lambda: not (BIN_DIR / ".kustomize.version").is_file()
             or (BIN_DIR / ".kustomize.version").read_text().strip() != KUSTOMIZE_VERSION,
             ensure_kustomize),
        Step(f"{KUBERNETES_VALIDATE}, the Kubernetes schemas for the manifest tests (pip)",
             _kubernetes_validate_missing, _pip_install_kubernetes_validate),
    ]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m deploy.install", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    started = time.monotonic()
    plan = steps()
    done = 0
    try:
        for number, step in enumerate(plan, 1):
            if not step.needed():
                continue
            label = f"[install {number}/{len(plan)}] {step.title}"
            _say(f"{label} ...")
            step_started = time.monotonic()
            with _heartbeat(label, step_started):
                step.run()
            done += 1
            _say(f"[install {number}/{len(plan)}] done in {time.monotonic() - step_started:.0f}s "
                 f"(total {time.monotonic() - started:.0f}s)")
        pg_bin = PostgresServer(RUN_DIR / "pg", 0).ensure_installed()
    except (InfraError, OSError, subprocess.SubprocessError) as exc:
        print(f"[install] failed: {exc}", file=sys.stderr, flush=True)
        print("[install] see README.md, Troubleshooting; re-running `make install` resumes where it stopped",
              file=sys.stderr, flush=True)
        return 1
    what = f"{done} of {len(plan)} steps installed something" if done else f"all {len(plan)} present"
    _say(f"[install] ready in {time.monotonic() - started:.1f}s ({what}; postgres {pg_bin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
