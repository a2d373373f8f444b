"""Install what the local stack needs and is missing (used by ``make install``).

    python -m deploy.install

PostgreSQL (Debian package, via apt-get when absent), the Kafka broker jars (Maven, into
.run/kafka-jars) and stripe-mock (go install, into .run/bin). Each step is a no-op when already done.
"""

from __future__ import annotations

import argparse
import ctypes.util
import shutil
import sys

from deploy.infra import RUN_DIR, InfraError, PostgresServer, StripeMock, apt_install, ensure_kafka_jars


def ensure_tool(command: str, package: str) -> None:
    if shutil.which(command) is None:
        print(f"[infra] {command} missing: apt-get install -y {package}", flush=True)
        apt_install(package)


def ensure_pdf_packages() -> None:
    """Fonts for invoice PDFs (Unicode coverage), pdftoppm and zbarimg for the PDF tests, pango for
    the WeasyPrint comparison in the PDF benchmark."""
    from services.invoice.pdf.system import missing_apt_packages

    missing = missing_apt_packages()
    missing += [pkg for lib, pkg in (("pango-1.0", "libpango-1.0-0"), ("pangoft2-1.0", "libpangoft2-1.0-0"))
                if ctypes.util.find_library(lib) is None]
    if missing:
        print(f"[infra] apt-get install -y {' '.join(missing)}", flush=True)
        apt_install(*missing)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m deploy.install", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    try:
        ensure_tool("java", "openjdk-17-jre-headless")
        ensure_tool("mvn", "maven")
        ensure_pdf_packages()
        ensure_tool("chromium", "chromium")  # the portal's browser tests (Playwright drives it)
        pg_bin = PostgresServer(RUN_DIR / "pg", 0).ensure_installed()
        jars = ensure_kafka_jars(RUN_DIR / "kafka-jars")
        stripe_mock = StripeMock(0).ensure_installed(RUN_DIR / "bin")
    except (InfraError, OSError) as exc:
        print(f"[infra] install failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # e.g. CalledProcessError from apt-get
        print(f"[infra] install failed: {exc!r}", file=sys.stderr, flush=True)
        return 1
    print(f"[infra] ready: postgres {pg_bin}, kafka jars {jars}, stripe-mock {stripe_mock}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
