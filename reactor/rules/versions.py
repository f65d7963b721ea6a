"""Rules judged against the QEMU releases a site runs: events and fields they cannot see.

``release_problems(rule, targets)`` is used three ways: by ``check --qemu
VERSION`` (and a configuration's ``qemu_versions:``), where an event none of the
releases sends is an error; by ``check`` without versions, where an event QEMU
removed is a warning saying which releases send it; and at connect, where a VM's
own QEMU version turns every problem into a warning in the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reactor.errors import Diagnostic, Location
from reactor.model import Rule
from reactor.rules.catalog import Catalog, release_order


@dataclass(frozen=True)
class Target:
    """A QEMU version as the user wrote it, and the catalog release that judges it."""

    label: str
    release: str


def targets(versions: Sequence[str], catalog: Catalog) -> list[Target]:
    """The releases that judge ``versions`` (each as written: ``7.2``, ``7.2.0``)."""
    return [Target(v, catalog.releases.pick(v)) for v in dict.fromkeys(versions)]


def release_problems(
    rule: Rule, wanted: Sequence[Target], catalog: Catalog, *, severity: str | None = None
) -> list[Diagnostic]:
    """What ``rule`` names that the ``wanted`` releases (none: any release) cannot send.

    ``severity`` forces every problem to one severity (at connect: warnings).
    """
    found: list[Diagnostic] = []
    locations = rule.event_locations or (rule.location,) * len(rule.events)
    for event, where in zip(rule.events, locations, strict=False):
        found.extend(_event_problems(event, where, wanted, catalog))
    names = sorted({n for pattern in rule.events for n in catalog.expand(pattern)})
    for field_name, where in rule.fields:
        found.extend(_field_problems(names, field_name, where, wanted, catalog))
    if severity is not None:
        found = [Diagnostic(d.location, d.message, severity) for d in found]
    return found


def _labels(wanted: Sequence[Target]) -> str:
    return "QEMU " + ", ".join(t.label for t in wanted)


def history(event: str, catalog: Catalog) -> str:
    """When QEMU sent ``event``: ``it appeared in QEMU 9.1``, or its removal and replacement."""
    info = catalog.events.get(event)
    span = catalog.releases.span(event)
    if info is not None and info.removed is not None:
        removed = info.removed
        text = (
            f"only QEMU {removed.get('present')} sent it (removed in {removed.get('removed_in')})"
        )
        replacement = removed.get("replacement")
        return f"{text}; its replacement is {replacement}" if replacement else text
    if span is None:
        return "no release in the catalog sends it"
    return f"it appeared in QEMU {span[0]}"


def _event_problems(
    event: str, where: Location, wanted: Sequence[Target], catalog: Catalog
) -> list[Diagnostic]:
    info = catalog.events.get(event)
    if info is None or info.synthetic:
        return []  # globs and unknown names are the compiler's business
    if not wanted:
        if info.removed is None:
            return []
        text = f"{event} is not sent by current QEMU: {history(event, catalog)}"
        return [Diagnostic(where, text, "warning")]
    missing = [t for t in wanted if not catalog.sends(event, t.release)]
    if not missing:
        return []
    text = f"{event} is not sent by {_labels(missing)}: {history(event, catalog)}"
    return [Diagnostic(where, text, "error" if len(missing) == len(wanted) else "warning")]


def _field_problems(
    events: Sequence[str],
    field_name: str,
    where: Location,
    wanted: Sequence[Target],
    catalog: Catalog,
) -> list[Diagnostic]:
    found = []
    for event in events:
        since = catalog.field_since(event, field_name)
        if since is None:
            continue
        older = [
            t
            for t in wanted
            if catalog.sends(event, t.release) and release_order(t.release) < release_order(since)
        ]
        if older:
            text = f"{event}'s '{field_name}' since {since}: not sent by {_labels(older)}"
            found.append(Diagnostic(where, text, "warning"))
    return found
