"""The event catalog: QEMU's QMP events (read from QEMU's schema) plus ours.

QEMU's part ships as ``data/qmp-events.json``; the synthetic ``REACTOR_*``
events the engine raises itself are declared here. ``check`` uses the catalog
for "unknown event" and "unknown field" errors, and the QEMU rate-limit stage
for each event's throttle key.

The catalog knows every release (``Releases``): which events each one sends,
which of them it throttles and by which key, and since when each field is sent.
A QEMU version is judged by the newest catalog release not newer than it
(``Releases.pick``): 7.2.22 by 7.2, a 9.1.50 development build by 9.1, a QEMU
newer than the catalog by the newest release.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any


def _member(type_name: str, doc: str) -> dict[str, Any]:
    return {"type": type_name, "optional": False, "doc": doc}


_IO_ERRORS = _member(
    "array", "block devices whose io-status is not ok: {device, node-name, io-status}"
)


SYNTHETIC_EVENTS: dict[str, dict[str, Any]] = {
    "REACTOR_CONNECTED": {
        "doc": "The sidecar connected to a VM's QMP socket (also after a reconnect).",
        "data": {
            "version": _member("VersionInfo", "QEMU's query-version"),
            "qemu": _member("str", "QEMU's version as text, e.g. 7.2.0"),
            "status": _member("str", "run state from query-status"),
            "running": _member("bool", "query-status running"),
            "address": _member("str", "socket address"),
        },
    },
    "REACTOR_DISCONNECTED": {
        "doc": "The QMP connection to a VM closed.",
        "data": {
            "shutdown_seen": _member(
                "bool", "false: QEMU went away without SHUTDOWN (crashed or killed)"
            ),
            "reason": _member("str", "why the connection ended"),
            "address": _member("str", "socket address"),
        },
    },
    "REACTOR_RESTART_SUPPRESSED": {
        "doc": "restart_vm did nothing: the VM was restarted too often in the window.",
        "data": {
            "rule": _member("str", "rule whose action was suppressed"),
            "restarts": _member("int", "restarts in the window"),
            "window": _member("number", "window in seconds"),
            "limit": _member("int", "restarts allowed per window"),
        },
    },
    "REACTOR_RESUME_GAVE_UP": {
        "doc": "resume_vm tried max_tries times; the VM stays paused for an I/O error.",
        "data": {
            "rule": _member("str", "rule whose action gave up"),
            "tries": _member("int", "tries made"),
            "reason": _member("str", "why the last try failed"),
            "devices": _IO_ERRORS,
        },
    },
    "REACTOR_STATE_CHANGED": {
        "doc": "A probe (query-status, query-block) found a state the events had not implied.",
        "data": {
            "old": _member("str", "run state the events implied"),
            "new": _member("str", "run state QEMU reports"),
            "running": _member("bool", "query-status running"),
            "io_errors": _IO_ERRORS,
            "probe": _member("str", "reconnect or interval"),
        },
    },
    "REACTOR_ACTION_FAILED": {
        "doc": "An action ran out of retries and went to the dead letters.",
        "data": {
            "rule": _member("str", "rule of the failed action"),
            "action": _member("str", "action type"),
            "error": _member("str", "last error (secrets redacted)"),
            "attempts": _member("int", "attempts made"),
        },
    },
}


REMOVED_EVENT_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    # The catalog keeps removed events' history but not their members; these are
    # the members of QEMU's schema in the last release that sent each one.
    "MEM_UNPLUG_ERROR": {"device": _member("str", "device name"), "msg": _member("str", "why")},
    "RDMA_GID_STATUS_CHANGED": {
        name: _member(kind, name.replace("-", " "))
        for name, kind in (
            ("netdev", "str"),
            ("gid-status", "bool"),
            ("subnet-prefix", "uint64"),
            ("interface-id", "uint64"),
        )
    },
    "COMMAND_DROPPED": {
        "id": _member("any", "the dropped command's id"),
        "reason": _member("CommandDropReason", "why it was dropped"),
    },
}

Release = tuple[int, ...]

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_release(text: str) -> Release | None:
    """``7.2``, ``7.2.0`` or ``v7.2.22`` as a tuple of numbers; None if it is no version."""
    found = _VERSION.fullmatch(text.strip())
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def qemu_version_of(data: Mapping[str, Any]) -> str | None:
    """The QEMU version a ``REACTOR_CONNECTED`` event's data reports, or None.

    ``data.version.qemu`` (query-version's numbers) first, else the ``data.qemu``
    text; anything malformed (a peer wrote it) counts as unknown.
    """
    version = data.get("version")
    numbers = version.get("qemu") if isinstance(version, dict) else None
    if isinstance(numbers, dict):
        parts = [numbers.get(k) for k in ("major", "minor", "micro")]
        if all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 10**6 for p in parts):
            return ".".join(str(p) for p in parts)
    text = data.get("qemu")
    if isinstance(text, str) and len(text) < 40 and parse_release(text) is not None:
        return text.strip()
    return None


@dataclass(frozen=True)
class Releases:
    """QEMU's releases in the catalog, oldest first: what each one sends and throttles."""

    names: tuple[str, ...]
    sends: dict[str, frozenset[str]]
    throttles: dict[str, dict[str, str | None]]

    @property
    def newest(self) -> str:
        """The newest release the catalog knows."""
        return self.names[-1]

    def pick(self, version: str) -> str:
        """The release whose tables a QEMU ``version`` follows (see the module docstring).

        Older than the catalog: its oldest release. Not a version: the newest.
        """
        wanted = parse_release(version)
        if wanted is None:
            return self.newest
        found = self.names[0]
        for name in self.names:
            if _release(name) <= wanted:
                found = name
        return found

    def span(self, event: str) -> tuple[str, str] | None:
        """The first and the last release that send ``event``, if any does."""
        having = [name for name in self.names if event in self.sends.get(name, ())]
        return (having[0], having[-1]) if having else None


def _release(name: str) -> Release:
    parsed = parse_release(name)
    assert parsed is not None, name
    return parsed


def release_order(name: str) -> Release:
    """A release or version as a tuple to sort or compare by (non-versions first)."""
    return parse_release(name) or ()


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
    removed: Mapping[str, str] | None = None
    """For an event QEMU no longer sends: ``present``, ``removed_in``, ``replacement``."""


@dataclass(frozen=True)
class Catalog:
    """All known events, and the wire-name renames QEMU's docs got wrong."""

    events: dict[str, EventInfo]
    renames: list[dict[str, str]] = field(default_factory=list)
    releases: Releases = field(default_factory=lambda: Releases(("0.0",), {}, {"0.0": {}}))
    types: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        rename = self.rename_of(event, field_name)
        return rename["new"] if rename is not None else None

    def rename_of(self, event: str, field_name: str) -> dict[str, str] | None:
        """The catalog's record of ``field_name`` as a name QEMU's docs or code once had."""
        for r in self.renames:
            if r.get("event") != event or r.get("kind") not in _WIRE_KINDS:
                continue
            if _first_word(r.get("old")) == field_name:
                return {**r, "new": _first_word(r.get("new")) or ""}
        return None

    def nested_in(self, event: str, field_name: str) -> str | None:
        """The member of ``event``'s data whose structure holds ``field_name``, if one does.

        QEMU's old text documentation showed some of these at the top of ``data``
        (ACPI_DEVICE_OST's ``slot-type``); QEMU sends them one level down.
        """
        info = self.events.get(event)
        for member, spec in (info.fields if info is not None else {}).items():
            if field_name in self._members(str(spec.get("type")), set()):
                return member
        return None

    def _members(self, type_name: str, seen: set[str]) -> set[str]:
        """The member names of a struct or union type, with every union branch's."""
        spec = self.types.get(type_name)
        if spec is None or type_name in seen:
            return set()
        seen.add(type_name)
        names = set(spec.get("members") or {})
        for branch in (spec.get("branches") or {}).values():
            names |= self._members(str(branch), seen)
        return names

    def throttle_keys(self, release: str | None = None) -> dict[str, str | None]:
        """Events QEMU rate-limits, mapped to their ``data`` key (None: one per type).

        ``release``: as that catalog release does (default: the newest).
        """
        if release is None:
            return {n: e.throttle_key for n, e in self.events.items() if e.rate_limited}
        return dict(self.releases.throttles[release])

    def sends(self, event: str, release: str) -> bool:
        """Whether QEMU ``release`` sends ``event`` (ours: always)."""
        info = self.events.get(event)
        if info is not None and info.synthetic:
            return True
        return event in self.releases.sends.get(release, ())

    def field_since(self, event: str, field_name: str) -> str | None:
        """The release ``event`` first sent ``field_name`` in, when the catalog records one."""
        info = self.events.get(event)
        spec = info.fields.get(field_name) if info is not None else None
        since = spec.get("since") if spec is not None else None
        return since if isinstance(since, str) else None


_WIRE_KINDS = ("doc/wire name mismatch", "member replaced")
"""Renames about the name on the wire (the others are type renames or added members)."""


def _first_word(text: Any) -> str | None:
    """``ret (int)`` -> ``ret``: the catalog's ``old``/``new`` texts start with the name."""
    if not isinstance(text, str):
        return None
    return text.split(" ", 1)[0].strip() or None


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
    for name, removed in (raw.get("removed_events") or {}).items():
        events[name] = EventInfo(
            name=name,
            fields=REMOVED_EVENT_FIELDS.get(name, {}),
            doc=f"removed in QEMU {removed.get('removed_in')}",
            removed={k: str(v) for k, v in removed.items()},
        )
    for name, ev in SYNTHETIC_EVENTS.items():
        events[name] = EventInfo(name=name, fields=ev["data"], doc=ev["doc"], synthetic=True)
    renames = [r for r in raw.get("renames", []) if isinstance(r, dict)]
    return Catalog(
        events=events, renames=renames, releases=_releases(raw), types=raw.get("types") or {}
    )


def _releases(raw: dict[str, Any]) -> Releases:
    """Every release of ``events_by_release`` and ``throttled_events_by_release``."""
    sends = {k: frozenset(v) for k, v in (raw.get("events_by_release") or {}).items()}
    throttles = dict(raw.get("throttling", {}).get("throttled_events_by_release") or {})
    names = sorted(set(sends) | set(throttles), key=_release)
    for name in names:
        throttles.setdefault(name, {})
    return Releases(tuple(names), sends, throttles)
