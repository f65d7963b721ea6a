"""The compiled rule model: frozen, typed objects built once at load.

Everything the hot path touches is here, already validated: no YAML, no
JSONPath parsing, no string durations. ``reactor.rules.compiler`` builds these from rule
files; the engine, the windows and the dispatcher only read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from reactor.errors import Location

Envelope = dict[str, Any]
"""An event as rules see it: QEMU's ``event``, ``data``, ``timestamp`` plus ``vm``,
``host``, ``source``, ``seq``, ``received_at`` and, for self-caused events,
``caused_by: {rule, action}``."""

Predicate = Callable[[Envelope], bool]


@dataclass(frozen=True, slots=True)
class CompiledPath:
    """A JSONPath compiled once; ``find`` returns the selected values (maybe none)."""

    text: str
    find: Callable[[Any], list[Any]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an action is retried: exponential backoff with jitter (seconds)."""

    attempts: int = 3
    initial: float = 1.0
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 1.0


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One action of a rule, as written: ``type``, raw ``with`` params, retry, timeout."""

    type: str
    params: Mapping[str, Any]
    location: Location
    index: int = 0
    retry: RetryPolicy | None = None
    timeout: float | None = None
    param_locations: Mapping[str, Location] = field(default_factory=dict)


ThrottleMode = Literal["once_within", "once_after", "qemu"]


@dataclass(frozen=True, slots=True)
class Throttle:
    """Rule-level throttle applied after the rule matched."""

    mode: ThrottleMode
    window: float
    key: tuple[CompiledPath, ...]


@dataclass(frozen=True, slots=True)
class Threshold:
    """Fire when ``count`` matching events fall within ``window`` for one key."""

    count: int
    window: float
    key: tuple[CompiledPath, ...]


CorrelationKind = Literal["absent", "followed_by"]


@dataclass(frozen=True, slots=True)
class Correlation:
    """A rule's ``absent:`` or ``followed_by:``: which events follow its first, and how soon.

    ``events`` and ``condition`` select followers as ``on``/``when`` select firsts;
    a follower belongs to the pending first with the same ``key``; it counts when
    it comes before the first's time + ``within``.
    """

    kind: CorrelationKind
    events: tuple[str, ...]
    within: float
    key: tuple[CompiledPath, ...]
    condition: Predicate | None = None
    explain: Callable[[Envelope], str | None] | None = None


RuleMode = Literal["queued", "single", "restart", "parallel"]


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule. ``events`` holds exact names and globs as written."""

    name: str
    events: tuple[str, ...]
    actions: tuple[ActionSpec, ...]
    location: Location
    description: str = ""
    condition: Predicate | None = None
    explain: Callable[[Envelope], str | None] | None = None
    when: Any = None
    """The condition as data (``reactor.rules.conditions.Cond``), for matchers that compile it."""
    throttle: Throttle | None = None
    threshold: Threshold | None = None
    correlation: Correlation | None = None
    mode: RuleMode = "queued"
    enabled: bool = True
    event_locations: tuple[Location, ...] = ()
    """Where each of ``events`` is written, for diagnostics about QEMU releases."""
    fields: tuple[tuple[str, Location], ...] = ()
    """The ``$.data.X`` fields the rule reads and where, for diagnostics about QEMU releases."""


@dataclass(slots=True)
class Firing:
    """A rule that fired: the envelope it carries, when, and window context.

    ``context`` holds what windows add, e.g. ``{"count": 5}`` for the number of
    events a throttle or threshold folded into this firing.
    """

    rule: Rule
    envelope: Envelope
    time: float
    context: dict[str, Any] = field(default_factory=dict)
