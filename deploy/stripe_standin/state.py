"""The stand-in's in-memory state, JSON-serialisable so it can be kept in a file across restarts."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = (
    "product", "price", "customer", "test_clock", "checkout_session", "subscription", "invoice",
    "invoiceitem", "payment_intent", "portal_session", "portal_configuration",
)
_ALPHABET = string.ascii_letters + string.digits
STATE_VERSION = 1
MAX_EVENTS = 5000


def new_id(prefix: str, length: int = 24) -> str:
    """A Stripe-looking id, random so that every create gives a new one (stripe-mock reuses fixtures)."""
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(length))}"


@dataclass
class State:
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    internal: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> fields Stripe doesn't show
    events: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def bucket(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.objects.setdefault(kind, {})

    def meta(self, object_id: str) -> dict[str, Any]:
        return self.internal.setdefault(object_id, {})

    def next_counter(self, name: str) -> int:
        self.counters[name] = self.counters.get(name, 0) + 1
        return self.counters[name]

    def add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if len(self.events) > MAX_EVENTS:
            del self.events[: len(self.events) - MAX_EVENTS]

    def to_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"version": STATE_VERSION, "objects": self.objects, "internal": self.internal,
                "events": self.events, "counters": self.counters, **(extra or {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        state = cls()
        for kind, objects in data.get("objects", {}).items():
            state.objects[kind] = dict(objects)
        state.internal = dict(data.get("internal", {}))
        state.events = list(data.get("events", []))
        state.counters = {k: int(v) for k, v in data.get("counters", {}).items()}
        return state


def save_json(path: Path, document: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename), so a crash never leaves half a state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, separators=(",", ":")))
    os.replace(tmp, path)


def load_json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == STATE_VERSION:
            return data
    return None
