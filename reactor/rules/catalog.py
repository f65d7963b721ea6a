"""The event catalog: QEMU's QMP events (read from QEMU's schema) plus ours.

QEMU's part ships as ``data/qmp-events.json``; the synthetic ``REACTOR_*``
events the engine raises itself are declared here. ``check`` uses the catalog
for "unknown event" and "unknown field" errors, and the QEMU rate-limit stage
for each event's throttle key.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

_IO_ERRORS = {
    "type": "array",
    "optional": False,
    "doc": "block devices whose io-status is not ok: {device, node-name, io-status}",
}

SYNTHETIC_EVENTS: dict[str, dict[str, Any]] = {
    "REACTOR_CONNECTED": {
        "doc": "The sidecar connected to a VM's QMP socket (also after a reconnect).",
        "data": {
            "version": {"type": "VersionInfo", "optional": False, "doc": "QEMU's query-version"},
            "qemu": {"type": "str", "optional": False, "doc": "QEMU's version as text, e.g. 7.2.0"},
            "status": {"type": "str", "optional": False, "doc": "run state from query-status"},
            "running": {"type": "bool", "optional": False, "doc": "query-status running"},
            "address": {"type": "str", "optional": False, "doc": "socket address"},
        },
    },
    "REACTOR_DISCONNECTED": {
        "doc": "The QMP connection to a VM closed.",
        "data": {
            "shutdown_seen": {
                "type": "bool",
                "optional": False,
                "doc": "false: QEMU went away without SHUTDOWN (crashed or killed)",
            },
            "reason": {"type": "str", "optional": False, "doc": "why the connection ended"},
            "address": {"type": "str", "optional": False, "doc": "socket address"},
        },
    },
    "REACTOR_RESTART_SUPPRESSED": {
        "doc": "restart_vm did nothing: the VM was restarted too often in the window.",
        "data": {
            "rule": {"type": "str", "optional": False, "doc": "rule whose action was suppressed"},
            "restarts": {"type": "int", "optional": False, "doc": "restarts in the window"},
            "window": {"type": "number", "optional": False, "doc": "window in seconds"},
            "limit": {"type": "int", "optional": False, "doc": "restarts allowed per window"},
        },
    },
    "REACTOR_RESUME_GAVE_UP": {
        "doc": "resume_vm tried max_tries times; the VM stays paused for an I/O error.",
        "data": {
            "rule": {"type": "str", "optional": False, "doc": "rule whose action gave up"},
            "tries": {"type": "int", "optional": False, "doc": "tries made"},
            "reason": {"type": "str", "optional": False, "doc": "why the last try failed"},
            "devices": _IO_ERRORS,
        },
    },
    "REACTOR_STATE_CHANGED": {
        "doc": "A probe (query-status, query-block) found a state the events had not implied.",
        "data": {
            "old": {"type": "str", "optional": False, "doc": "run state the events implied"},
            "new": {"type": "str", "optional": False, "doc": "run state QEMU reports"},
            "running": {"type": "bool", "optional": False, "doc": "query-status running"},
            "io_errors": _IO_ERRORS,
            "probe": {"type": "str", "optional": False, "doc": "reconnect or interval"},
        },
    },
    "REACTOR_ACTION_FAILED": {
        "doc": "An action ran out of retries and went to the dead letters.",
        "data": {
            "rule": {"type": "str", "optional": False, "doc": "rule of the failed action"},
            "action": {"type": "str", "optional": False, "doc": "action type"},
            "error": {"type": "str", "optional": False, "doc": "last error (secrets redacted)"},
            "attempts": {"type": "int", "optional": False, "doc": "attempts made"},
        },
    },
}


@dataclass(frozen=True, slots=True)
class EventInfo:
    """One event: its data fields, and QEMU's rate-limit key if it has one."""

    name: str
    fields: dict[str, dict[str, Any]]
    doc: str = ""
    since: str | None = None
    rate_limited: bool = False
    throttle_key: str | None = None
    synthetic: bool = False


@dataclass(frozen=True)
class Catalog:
    """All known events, and the wire-name renames QEMU's docs got wrong."""

    events: dict[str, EventInfo]
    renames: list[dict[str, str]] = field(default_factory=list)

    def __contains__(self, name: object) -> bool:
        return name in self.events

    def expand(self, pattern: str) -> list[str]:
        """The catalog's event names a name or glob stands for."""
        if not any(c in pattern for c in "*?["):
            return [pattern] if pattern in self.events else []
        return [n for n in self.events if fnmatch.fnmatchcase(n, pattern)]

    def suggest(self, name: str) -> str | None:
        """The closest known event name, for "did you mean"."""
        found = difflib.get_close_matches(name.upper(), list(self.events), n=1, cutoff=0.6)
        return found[0] if found else None

    def rename_for(self, event: str, field_name: str) -> str | None:
        """If ``field_name`` is an old or documented-only name of a field, the wire name."""
        for r in self.renames:
            if r.get("event") == event and r.get("old") == field_name:
                return r.get("new")
        return None

    def throttle_keys(self) -> dict[str, str | None]:
        """Events QEMU rate-limits, mapped to their ``data`` key (None: one per type)."""
        return {n: e.throttle_key for n, e in self.events.items() if e.rate_limited}


def _load_qemu() -> dict[str, Any]:
    text = resources.files("reactor").joinpath("data/qmp-events.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def load_catalog() -> Catalog:
    """The catalog, read once per process."""
    raw = _load_qemu()
    keys: dict[str, str | None] = raw.get("throttling", {}).get("keys", {})
    events: dict[str, EventInfo] = {}
    for name, ev in raw["events"].items():
        events[name] = EventInfo(
            name=name,
            fields=dict(ev.get("data") or {}),
            doc=ev.get("doc", ""),
            since=ev.get("since"),
            rate_limited=name in keys,
            throttle_key=keys.get(name),
        )
    for name, ev in SYNTHETIC_EVENTS.items():
        events[name] = EventInfo(name=name, fields=ev["data"], doc=ev["doc"], synthetic=True)
    renames = [r for r in raw.get("renames", []) if isinstance(r, dict)]
    return Catalog(events=events, renames=renames)
