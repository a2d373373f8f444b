"""Entry points behave like tools: `--help` exits 0 with usage text, a bad setting is one line and exit 2.

The subprocess tests run every `services/*/__main__.py` (found by globbing, so a new service is covered)
and the repository's other commands; they spawn processes, hence `infra`. The in-process tests of
kit.cli are unit tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from kit.cli import describe_error, env_names, settings_help
from kit.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(path.parent.name for path in REPO_ROOT.glob("services/*/__main__.py"))
# Every other command of the repository (a module run with `python -m`).
COMMANDS = [
    "deploy.run",
    "deploy.watch",
    "deploy.seed",
    "deploy.install",
    "deploy.mailsink",
    "bench",
    "bench.invoice_bench",
    "bench.webhook_bench",
    "bench.pdf_bench",
    "bench.reminder_bench",
    "bench.bare_app",
    "bench.reporting_bench",
    "bench.subscriptions_bench",
    "bench.profile",
    "bench.compare",
    "bench.invoice_cpu",
    "bench.payments_cpu",
    "bench.startup_bench",
    "deploy.supervise",
    "deploy.k8s.settings",
    "deploy.k8s.migrate",
    "services.payments.stripe_setup",
    "services.subscriptions.stripe_setup",
    "kit.deadletter",
]
# Settings from the caller's environment must not leak into what a test expects.
_FOREIGN_PREFIXES = ("BILLING_", "STRIPE_", "SMTP_", "MAIL_FROM", *(f"{name.upper()}_" for name in SERVICES))


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith(_FOREIGN_PREFIXES)}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return {**env, **extra}


def _run(module: str, *args: str, env: Mapping[str, str] = {}) -> Run:
    argv = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=_clean_env(env), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:  # it started serving (or installing) instead of answering
        raise AssertionError(f"{' '.join(argv)} still running after 60 s: {exc.stderr!r}") from None
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def help_runs() -> dict[str, Run]:
    """`--help` of every entry point, two at a time (each mostly waits on imports)."""
    modules = [f"services.{name}" for name in SERVICES] + COMMANDS
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(modules, pool.map(lambda m: _run(m, "--help"), modules), strict=True))


@pytest.mark.infra
@pytest.mark.parametrize("name", SERVICES)
def test_service_help_lists_settings_and_exits_0(help_runs: dict[str, Run], name: str) -> None:
    run = help_runs[f"services.{name}"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python -m services.{name}"), run.stdout
    prefix = f"{name.upper()}_"
    for setting in ("PORT", "DATABASE_URL", "KAFKA_BOOTSTRAP", "LOG_LEVEL"):
        assert f"{prefix}{setting}\n" in run.stdout, f"{prefix}{setting} missing from --help:\n{run.stdout}"
    assert "BILLING_INTERNAL_TOKEN" in run.stdout
    assert "default: " in run.stdout


@pytest.mark.infra
@pytest.mark.parametrize("module", COMMANDS)
def test_command_help_exits_0(help_runs: dict[str, Run], module: str) -> None:
    run = help_runs[module]
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout or module in run.stdout, run.stdout


@pytest.mark.infra
@pytest.mark.parametrize("name", SERVICES)
def test_bad_setting_is_one_line_naming_the_variable(name: str) -> None:
    variable = f"{name.upper()}_PORT"
    run = _run(f"services.{name}", env={variable: "abc"})
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"{name}: {variable}: "), lines[0]
    assert "'abc'" in lines[0]


@pytest.mark.infra
def test_live_stripe_key_refused_in_one_line() -> None:
    run = _run("services.payments", env={"STRIPE_SECRET_KEY": "sk_live_" + "x" * 30})
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("payments: STRIPE_SECRET_KEY is a live-mode key")
    assert "x" * 30 not in run.stderr


# ------------------------------------------------------------------------------------------------
# in process


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", extra="ignore", populate_by_name=True)

    port: int = 8009
    api_secret: str = Field(default="s", validation_alias=AliasChoices("DEMO_API_SECRET", "SHARED_SECRET"))
    names: list[str] = Field(default_factory=lambda: ["a", "b"])
    required_thing: int


def _error(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        DemoSettings()
    return describe_error(DemoSettings, info.value, env)


def test_env_names_follow_prefix_and_aliases() -> None:
    assert env_names(DemoSettings, "port") == ["DEMO_PORT"]
    assert env_names(DemoSettings, "api_secret")[:2] == ["DEMO_API_SECRET", "SHARED_SECRET"]
    assert env_names(DemoSettings, "internal_token")[0] == "BILLING_INTERNAL_TOKEN"


def test_help_shows_variables_and_defaults() -> None:
    text = settings_help(DemoSettings)
    assert "  DEMO_PORT\n      int, default: 8009" in text
    assert "DEMO_NAMES\n      list[str], default: a,b" in text
    assert "DEMO_REQUIRED_THING\n      int, default: required" in text


def test_errors_name_the_variable_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    line = _error({"DEMO_PORT": "abc", "DEMO_REQUIRED_THING": "1"}, monkeypatch)
    assert line == "DEMO_PORT: Input should be a valid integer, unable to parse string as an integer (got 'abc')"


def test_missing_and_several_errors_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    line = _error({"DEMO_PORT": "x" * 200}, monkeypatch)
    assert "\n" not in line
    assert line.startswith("DEMO_PORT: Input should be a valid integer")
    assert "; DEMO_REQUIRED_THING: Field required" in line
    assert len(line) < 200


def test_secret_values_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Strict(DemoSettings):
        api_secret: str = Field(default="s", min_length=10,
                                validation_alias=AliasChoices("DEMO_API_SECRET", "SHARED_SECRET"))

    monkeypatch.setenv("SHARED_SECRET", "hunter2")
    monkeypatch.setenv("DEMO_REQUIRED_THING", "1")
    with pytest.raises(ValidationError) as info:
        Strict()
    line = describe_error(Strict, info.value, {"SHARED_SECRET": "hunter2"})
    assert line.startswith("SHARED_SECRET: String should have at least 10 characters"), line
    assert "hunter2" not in line
