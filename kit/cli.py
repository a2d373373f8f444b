"""Command line of a service process: `python -m services.<name> [--help]`.

    run_service("invoice", InvoiceSettings, create_app, __doc__)

`--help` prints the description and every setting with the environment variable(s) it is read from
and its default, and exits 0. A bad or missing setting is ONE line on stderr naming the variable,
e.g. ``invoice: INVOICE_PORT: Input should be a valid integer (got 'abc')``, and exit status 2 (the
usual status for a usage error), instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import AliasChoices, AliasPath, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource

from kit.service import serve
from kit.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)

USAGE_ERROR = 2
_SECRET = re.compile(r"secret|password|token|key", re.IGNORECASE)
_MAX_SHOWN = 60


def env_names(settings_cls: type[ServiceSettings], field_name: str) -> list[str]:
    """The environment variables a field is read from, in pydantic-settings' order of precedence.

    Asks pydantic-settings itself (so aliases, `populate_by_name` and the prefix come out exactly as
    it reads them); falls back to the documented rule (the validation alias(es), else env_prefix +
    field name) should that internal API change.
    """
    field = settings_cls.model_fields[field_name]
    names: list[str]
    try:
        source = EnvSettingsSource(settings_cls)
        names = [env for _, env, _ in source._extract_field_info(field, field_name)]
    except (AttributeError, TypeError):  # pragma: no cover - depends on the pydantic-settings version
        names = _documented_env_names(settings_cls, field, field_name)
    unique: list[str] = []
    for name in names:
        upper = name.upper()
        if upper not in unique:
            unique.append(upper)
    return unique


def _documented_env_names(settings_cls: type[ServiceSettings], field: FieldInfo, field_name: str) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice if isinstance(choice, str) else str(choice.path[0]) for choice in alias.choices]
    if isinstance(alias, AliasPath):
        return [str(alias.path[0])]
    return [f"{settings_cls.model_config.get('env_prefix', '')}{field_name}"]


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value: Any = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, list | tuple | set):
        return ",".join(str(v) for v in value) or "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "empty"


def _type_text(field: FieldInfo) -> str:
    annotation = field.annotation
    if annotation is None:
        return ""
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def settings_help(settings_cls: type[ServiceSettings]) -> str:
    """One entry per setting: `NAME (also OTHER)  type, default ...`."""
    lines = ["settings (environment variables; the first one set wins):"]
    for field_name, field in settings_cls.model_fields.items():
        names = env_names(settings_cls, field_name)
        head = names[0] + (f" (also {', '.join(names[1:])})" if len(names) > 1 else "")
        lines.append(f"  {head}")
        lines.append(f"      {_type_text(field)}, default: {_default_text(field)}")
    return "\n".join(lines)


def _field_for(settings_cls: type[ServiceSettings], key: object) -> str | None:
    """The field an error location refers to: its name, or one of its aliases (any case)."""
    if not isinstance(key, str):
        return None
    if key in settings_cls.model_fields:
        return key
    for field_name in settings_cls.model_fields:
        if key.upper() in env_names(settings_cls, field_name):
            return field_name
    return None


def _shown_input(field_name: str, value: object) -> str:
    if not isinstance(value, str | int | float | bool):
        return ""
    if _SECRET.search(field_name):
        return " (got a value that is not shown)"
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 4] + "...'"
    return f" (got {text})"


def describe_error(settings_cls: type[ServiceSettings], exc: ValidationError, environ: dict[str, str]) -> str:
    """All of a settings ValidationError on one line, each problem named by its environment variable."""
    upper_env = {key.upper() for key in environ}
    problems: list[str] = []
    for error in exc.errors():
        message = " ".join(str(error.get("msg", "")).split())
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        loc = error.get("loc") or ()
        field_name = _field_for(settings_cls, loc[0]) if loc else None
        if field_name is None:  # a model-level check: its message names what is wrong
            problems.append(message)
            continue
        names = env_names(settings_cls, field_name)
        variable = next((name for name in names if name in upper_env), names[0])
        got = "" if error.get("type") == "missing" else _shown_input(field_name, error.get("input"))
        text = message if message.startswith(variable) else f"{variable}: {message}"
        problems.append(text + got)
    return "; ".join(problems)


def build_parser(name: str, settings_cls: type[ServiceSettings], description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=textwrap.dedent(description or "").strip() or None,
        epilog=settings_help(settings_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def load_settings(name: str, settings_cls: type[S]) -> S:
    """The settings from the environment, or exit 2 with one line on stderr saying what is wrong."""
    try:
        return settings_cls()
    except ValidationError as exc:
        print(f"{name}: {describe_error(settings_cls, exc, dict(os.environ))}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None


def run_service(
    name: str,
    settings_cls: type[S],
    create_app: Callable[[S], FastAPI],
    description: str | None,
    argv: Sequence[str] | None = None,
) -> None:
    """`python -m services.<name>`: parse the (help-only) command line, load settings, serve."""
    build_parser(name, settings_cls, description).parse_args(argv)
    settings = load_settings(name, settings_cls)
    serve(create_app(settings), settings)
