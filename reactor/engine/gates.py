"""Rate limits in time: QEMU's event throttle, rule thresholds and rule throttles.

This is the room between rule matching and dispatch where time matters. It is
pure and clock-driven: the only time source is a ``Clock`` (``VirtualClock`` in
replay, ``AsyncioClock`` live). A state lives as long as its window: ended
windows are settled lazily (``reactor.engine.windowsets``), before the next event of
their set, by ``len()``, or by the set's one clock timer, so nothing is left
once all windows ended and a clock has been drained.

- ``QemuStage``: QEMU's own per-VM rate limit (monitor/monitor.c) for the event
  types QEMU throttles, keyed as QEMU keys them: each VM by the throttle table
  of its own QEMU release (the catalog's ``throttled_events_by_release``).
- ``RuleGate``: one rule's threshold, then its throttle (``once_within``,
  ``once_after`` or ``qemu``), turning matched events into ``Firing`` objects.

Windows are half-open: a window opened at ``t`` covers ``[t, t + window)``. A
clock runs the timers due at a moment before an event pushed at that moment,
so an event at exactly ``t + window`` belongs to whatever follows the window.
Windows of one set that end at the same instant end in the order they opened;
across sets (the stage, each rule's gate), in the order of the sets' timers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reactor.clock import Clock
from reactor.engine.keys import compiled_keyfunc, freeze
from reactor.engine.windowsets import OnceAfter, OnceWithin, QemuWindows, Threshold, Throttle
from reactor.model import Envelope, Firing, Rule
from reactor.rules.catalog import load_catalog, qemu_version_of

QEMU_RATE = 1.0
"""Seconds between two events of one QEMU throttle key (monitor.c: 1e9 ns, every type)."""


def _fields(table: Mapping[str, str | None]) -> dict[str, str]:
    """A throttle table with "" for "one state per type": one dict lookup on the hot path."""
    return {name: field or "" for name, field in table.items()}


_THROTTLES: dict[str, type[Throttle]] = {
    "once_within": OnceWithin,
    "once_after": OnceAfter,
    "qemu": QemuWindows,
}


class QemuStage:
    """QEMU's rate limit (monitor/monitor.c), per VM, for the event types QEMU throttles.

    The first event of a key goes to ``emit`` at once and opens a window; later
    events in the window replace the held one; at the window's end the held event
    (its envelope untouched) goes out and a new window opens, or the state is
    forgotten. A key is (host, vm, event type, ``data[field]`` or None), the field
    per type from the VM's table: one QEMU is one host's VM, so on a central two
    hosts' ``vm1`` are two QEMUs (a single host's envelopes all carry its name).

    Each VM follows its own QEMU release: ``connected`` (a REACTOR_CONNECTED
    event, which reports QEMU's version) picks that release's throttle table from
    the catalog. Until then a VM uses ``release`` (default: the catalog's newest);
    with ``pinned`` every VM uses it whatever REACTOR_CONNECTED says (``replay
    --qemu``). ``keys`` replaces the catalog: one fixed table for every VM.
    """

    __slots__ = (
        "_default",
        "_emit",
        "_fields",
        "_pinned",
        "_tables",
        "_vms",
        "_why",
        "_windows",
        "changes",
    )

    def __init__(
        self,
        clock: Clock,
        emit: Callable[[Envelope], None],
        *,
        window: float = QEMU_RATE,
        keys: Mapping[str, str | None] | None = None,
        release: str | None = None,
        pinned: bool = False,
    ) -> None:
        self._emit = emit
        catalog = load_catalog()
        releases = catalog.releases
        self._tables: dict[str, dict[str, str]] = {}
        if keys is None:
            for name in releases.names:
                self._tables[name] = _fields(catalog.throttle_keys(name))
            self._default = releases.pick(release) if release is not None else releases.newest
        else:
            self._default = "custom"
            self._tables[self._default] = _fields(keys)
            pinned = True
        self._pinned = pinned
        self._fields = self._tables[self._default]
        self._why = f"--qemu {release}" if pinned and release is not None else "no version known"
        # Per (host, VM): (its table, the release, why); VMs not here use the default.
        self._vms: dict[tuple[str | None, str], tuple[dict[str, str], str, str]] = {}
        self._windows = QemuWindows(clock, window, self._out)
        self.changes = 0
        """Bumped by whatever changes what ``dump`` writes, but for windows ending empty."""

    def connected(self, env: Envelope) -> str:
        """A VM's REACTOR_CONNECTED: use its QEMU's table from now on; says which (--explain)."""
        vm = (env.get("host"), env["vm"])
        if not self._pinned:
            data = env.get("data")
            version = qemu_version_of(data) if isinstance(data, dict) else None
            if version is not None:
                release = load_catalog().releases.pick(version)
                why = f"REACTOR_CONNECTED: QEMU {version}"
                self._vms[vm] = (self._tables[release], release, why)
            else:
                self._vms.pop(vm, None)
            self.changes += 1
        return self.describe(vm[1], vm[0])

    def describe(self, vm: str, host: str | None = None) -> str:
        """Which throttle table ``vm`` (of ``host``) follows and why, as ``--explain`` says it."""
        found = self._vms.get((host, vm))
        release, why = (found[1], found[2]) if found is not None else (self._default, self._why)
        if release == "custom":
            return "QEMU stage: a custom throttle table"
        return f"QEMU stage: QEMU {release}'s rate limits ({why})"

    def push(self, env: Envelope) -> bool:
        """True if ``env`` went to ``emit`` now; False if it is held (and may be replaced)."""
        if self.admit(env):
            self._emit(env)
            return True
        return False

    def admit(self, env: Envelope) -> bool:
        """True if ``env`` passes now, for the caller to send on; False if it is held.

        ``push`` without the sending: what a held event later does still goes to ``emit``.
        """
        event = env["event"]
        vm = (env.get("host"), env["vm"])
        table = self._vms.get(vm) if self._vms else None
        field = (self._fields if table is None else table[0]).get(event)
        if field is None:
            return True
        value = env["data"].get(field) if field else None
        if value is not None and value.__class__ is not str:
            value = freeze([value])
        self.changes += 1
        return self._windows.offer((*vm, event, value), env) is None

    def throttles(self, event: str) -> bool:
        """Whether some VM's table may throttle ``event`` (else ``push`` emits it at once)."""
        return any(event in table for table in self._tables.values())

    def drop_vm(self, vm: str) -> None:
        """Forget every state of ``vm``: its timers are cancelled, its held events dropped.

        By name: a sidecar drops its own VMs, whose envelopes all carry its host.
        """
        self._windows.drop_vm(vm)
        for known in [k for k in self._vms if k[1] == vm]:
            del self._vms[known]
        self.changes += 1

    def __len__(self) -> int:
        return len(self._windows)

    def held(self) -> list[tuple[Envelope, int]]:
        """The events held for their window's end (what a stop now would lose)."""
        return self._windows.held()

    def dump(self, base: float) -> dict[str, Any]:
        """The stage's windows and each VM's release, JSON-able (times relative to ``base``)."""
        return {
            "windows": self._windows.dump(base),
            "vms": [
                [host, vm, release, why] for (host, vm), (_, release, why) in self._vms.items()
            ],
        }

    def restore(self, doc: Mapping[str, Any], base: float) -> None:
        """Take back what ``dump`` wrote; held events whose window ended go out now."""
        for host, vm, release, why in doc.get("vms", ()):
            if release in self._tables and not self._pinned:
                self._vms[(host, vm)] = (self._tables[release], release, why)
        self._windows.restore(doc.get("windows", ()), base)
        self.changes += 1

    @property
    def holds(self) -> int:
        """Events held for later (each one either went out later or was replaced)."""
        return self._windows.holds

    @property
    def replaced(self) -> int:
        """Held events dropped because a newer one of the same key replaced them."""
        return self._windows.replaced

    def _out(self, env: Envelope, count: int) -> None:
        self.changes += 1
        self._emit(env)


class RuleGate:
    """One rule's threshold, then its throttle; what passes both reaches ``fire``.

    ``Firing.context`` holds ``count``, the matching events the firing stands for:
    a threshold's count; for a throttle, the events it folded in (1 for
    ``once_within``, the window's events for ``once_after``, 1 + replaced for
    ``qemu``) times the threshold's count if there is one. With a throttle it also
    holds its ``window`` and ``mode``, plus ``threshold`` and ``threshold_window``
    when both apply; with only a threshold, ``window`` and ``mode="threshold"``.
    """

    __slots__ = (
        "_clock",
        "_context",
        "_fire",
        "_per_pass",
        "_rule",
        "_threshold",
        "_threshold_key",
        "_throttle",
        "_throttle_key",
        "changes",
        "suppressed",
    )

    def __init__(self, rule: Rule, clock: Clock, fire: Callable[[Firing], None]) -> None:
        self._rule = rule
        self._clock = clock
        self._fire = fire
        self.suppressed = {"threshold": 0, "throttle": 0}
        """Matching events that did not fire when they came, by the gate that held them."""
        threshold, throttle = rule.threshold, rule.throttle
        self._per_pass = threshold.count if threshold is not None else 1
        self._threshold: Threshold | None = None
        self._threshold_key = compiled_keyfunc(threshold.key if threshold is not None else ())
        if threshold is not None and threshold.count > 1:
            self._threshold = Threshold(clock, threshold.window, threshold.count)
        self._throttle: Throttle | None = None
        self._throttle_key = compiled_keyfunc(throttle.key if throttle is not None else ())
        if throttle is not None:
            self._throttle = _THROTTLES[throttle.mode](clock, throttle.window, self._out)
        self._context = _context(rule)
        self.changes = 0
        """Bumped by whatever changes what ``dump`` writes, but for windows ending empty."""

    def push(self, env: Envelope) -> str | None:
        """Offer a matched event: None if the rule fired at once, else why not (for --explain)."""
        self.changes += 1
        if self._threshold is not None:
            reason = self._threshold.offer(self._threshold_key(env), env)
            if reason is not None:
                self.suppressed["threshold"] += 1
                return reason
        if self._throttle is not None:
            reason = self._throttle.offer(self._throttle_key(env), env)
            if reason is not None:
                self.suppressed["throttle"] += 1
                return reason
        self._out(env, 1)
        return None

    def drop_vm(self, vm: str) -> None:
        """Forget the states whose latest event came from ``vm``; held firings are dropped."""
        self.changes += 1
        if self._threshold is not None:
            self._threshold.drop_vm(vm)
        if self._throttle is not None:
            self._throttle.drop_vm(vm)

    def held(self) -> list[tuple[Envelope, int]]:
        """The matched events its throttle holds for its windows' ends (once_after, qemu)."""
        return self._throttle.held() if self._throttle is not None else []

    def dump(self, base: float) -> dict[str, Any]:
        """The threshold's and the throttle's windows, JSON-able (times relative to ``base``)."""
        return {
            "threshold": self._threshold.dump(base) if self._threshold is not None else [],
            "throttle": self._throttle.dump(base) if self._throttle is not None else [],
        }

    def restore(self, doc: Mapping[str, Any], base: float) -> None:
        """Take back what ``dump`` wrote (of a rule of the same shape)."""
        self.changes += 1
        if self._threshold is not None:
            self._threshold.restore(doc.get("threshold", ()), base)
        if self._throttle is not None:
            self._throttle.restore(doc.get("throttle", ()), base)

    def close(self) -> None:
        """Cancel the gate's timers: its state lives on elsewhere."""
        if self._threshold is not None:
            self._threshold.close()
        if self._throttle is not None:
            self._throttle.close()

    def __len__(self) -> int:
        live = len(self._threshold) if self._threshold is not None else 0
        return live + (len(self._throttle) if self._throttle is not None else 0)

    def _out(self, env: Envelope, count: int) -> None:
        self.changes += 1
        context = {"count": count * self._per_pass, **self._context}
        self._fire(Firing(rule=self._rule, envelope=env, time=self._clock.now(), context=context))


def _context(rule: Rule) -> dict[str, Any]:
    """The fixed part of a rule's firing context (everything but ``count``)."""
    threshold, throttle = rule.threshold, rule.throttle
    if throttle is not None:
        context: dict[str, Any] = {"window": throttle.window, "mode": throttle.mode}
        if threshold is not None:
            context["threshold"] = threshold.count
            context["threshold_window"] = threshold.window
        return context
    if threshold is not None:
        return {"window": threshold.window, "mode": "threshold"}
    return {}
