"""The engine's memory as data: windows, held events and pending firsts, out and back in.

``dump`` turns everything the engine remembers between events (QEMU's stage,
each rule's threshold and throttle windows, each correlated rule's pending
firsts) into JSON-able parts; ``restore`` opens them again on another engine,
maybe in another process. Times are written relative to a base moment, so the
reader can move them by the time that passed in between (a restart) or by none
(a reload). A rule's parts are named by the rule and a digest of what shapes
its state (events, condition, threshold, throttle, correlation), so a rule
whose definition changed starts afresh instead of inheriting another's counts.
No I/O here: where the parts are kept is the service's business.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from reactor.model import Rule
from reactor.rules.conditions import Combo, Leaf

if TYPE_CHECKING:
    from reactor.engine.core import Engine

STAGE = "stage"
"""The part name of QEMU's rate-limit stage."""


def _cond_shape(cond: Any) -> Any:
    if isinstance(cond, Leaf):
        return [cond.path.text, cond.op, repr(cond.value)]
    if isinstance(cond, Combo):
        return [cond.kind, [_cond_shape(part) for part in cond.parts]]
    return None


def _paths(paths: Any) -> list[str]:
    return [p.text for p in paths]


def rule_digest(rule: Rule) -> str:
    """A short digest of what shapes a rule's state; another definition, another digest."""
    th, tr, co = rule.threshold, rule.throttle, rule.correlation
    shape = {
        "events": list(rule.events),
        "when": _cond_shape(rule.when),
        "threshold": [th.count, th.window, _paths(th.key)] if th is not None else None,
        "throttle": [tr.mode, tr.window, _paths(tr.key)] if tr is not None else None,
        "correlation": (
            [co.kind, list(co.events), co.within, _paths(co.key), _cond_shape(co.condition)]
            if co is not None
            else None
        ),
    }
    text = json.dumps(shape, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def part_name(kind: str, rule: Rule) -> str:
    """``gate:NAME:DIGEST`` or ``pending:NAME:DIGEST``: where a rule's state is kept."""
    return f"{kind}:{rule.name}:{rule_digest(rule)}"


class Holder(Protocol):
    """What holds a part: QEMU's stage, a rule's gate or its pending firsts."""

    changes: int
    """Bumped by whatever changes what ``dump`` writes (windows that end empty may not bump
    it: a part written before they ended restores them as ended)."""

    def dump(self, base: float) -> Any:
        """The part as JSON-able data, times relative to ``base``."""


def holders(engine: Engine) -> Iterator[tuple[str, Holder]]:
    """Each part's name and what holds it, whether it holds something now or not."""
    if engine.stage is not None:
        yield STAGE, engine.stage
    for rule, gate, pending in engine.stateful():
        if gate is not None:
            yield part_name("gate", rule), gate
        if pending is not None:
            yield part_name("pending", rule), pending


def part(holder: Holder, base: float) -> Any:
    """What ``holder`` holds (times relative to ``base``), or None if it holds nothing."""
    doc = holder.dump(base)
    held = any(doc.values()) if isinstance(doc, dict) else bool(doc)
    return doc if held else None


def dump(engine: Engine, base: float) -> dict[str, Any]:
    """Every part of ``engine``'s state that holds something (times relative to ``base``)."""
    parts = {}
    for name, holder in holders(engine):
        doc = part(holder, base)
        if doc is not None:
            parts[name] = doc
    return parts


def restore(engine: Engine, parts: Mapping[str, Any], base: float) -> list[str]:
    """Open ``parts`` on ``engine``; returns the names of the parts it took.

    Parts of rules that no longer exist, or whose digest changed, are left out.
    """
    taken = []
    if engine.stage is not None and STAGE in parts:
        engine.stage.restore(parts[STAGE], base)
        taken.append(STAGE)
    for rule, gate, pending in engine.stateful():
        name = part_name("gate", rule)
        if gate is not None and name in parts:
            gate.restore(parts[name], base)
            taken.append(name)
        name = part_name("pending", rule)
        if pending is not None and name in parts:
            pending.restore(parts[name], base)
            taken.append(name)
    return taken


def overdue(engine: Engine, name: str, doc: Any, base: float, now: float) -> list[str]:
    """What part ``name`` holds that was due before ``now`` (it happens late, at restore)."""
    if name == STAGE or name.startswith("gate:"):
        rows = doc.get("windows" if name == STAGE else "throttle", ())
        return [f"a held {_what(r[3])}" for r in rows if r[3] is not None and base + r[2] <= now]
    for rule, _, pending in engine.stateful():
        co = rule.correlation
        if pending is not None and co is not None and part_name("pending", rule) == name:
            late = [r for r in doc if base + r[2] + co.within <= now]
            return [f"{co.kind} deadline of {_what(r[1])}" for r in late]
    return []


def _what(env: Any) -> str:
    if not isinstance(env, dict):
        return "event"
    return f"{env.get('event')!r} of VM {env.get('vm')!r}"
