"""The engine's memory as data: dump on one engine, restore on another, on virtual clocks.

A restore with no time between must behave exactly as the engine that was never
interrupted; with time between, what ended in the meantime happens at once.
A rule swap keeps the state of rules whose shape did not change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reactor.clock import VirtualClock
from reactor.engine import state
from reactor.engine.core import Engine
from reactor.model import Firing
from reactor.rules.compiler import load_rules
from reactor.rules.ruleset import RuleSet
from tests.test_correlation import AGENT_GONE

T0 = 1_800_000_000.0

RULES = """
rules:
  - name: panics
    on: GUEST_PANICKED
    threshold: {count: 3, window: 10m, key: [$.vm]}
    actions: [{type: log, with: {message: x}}]
  - name: settle
    on: STOP
    throttle: {mode: once_after, window: 30s, key: [$.vm]}
    actions: [{type: log, with: {message: x}}]
""" + AGENT_GONE.split("rules:\n", 1)[1]


def ruleset(tmp_path: Path, text: str = RULES) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    rules, diags = load_rules([path])
    assert not [d for d in diags if d.severity == "error"], diags
    return rules


class Rig:
    """An engine on a virtual clock collecting (rule, vm, count, time)."""

    def __init__(self, rules: RuleSet, start: float) -> None:
        self.clock = VirtualClock(start)
        self.fired: list[tuple[str, str, int, float]] = []
        self.engine = Engine(rules, self.clock, self._sink)

    def _sink(self, firing: Firing) -> None:
        env = firing.envelope
        self.fired.append((firing.rule.name, env["vm"], firing.context["count"], firing.time))

    def event(self, t: float, name: str, vm: str = "vm1", **data: Any) -> None:
        self.clock.advance(t)
        self.engine.feed({"event": name, "data": data, "vm": vm, "timestamp": None})


def moved(rig: Rig, rules: RuleSet, down: float) -> Rig:
    """A new engine ``down`` seconds later holding ``rig``'s state, read back from JSON."""
    now = rig.clock.now()
    parts = json.loads(json.dumps(state.dump(rig.engine, now)))
    other = Rig(rules, now + down)
    state.restore(other.engine, parts, now)
    return other


@pytest.mark.parametrize(("down", "fires"), [(5, True), (700, False)])
def test_a_threshold_counts_on_across_a_restore_within_its_window(
    tmp_path: Path, down: float, fires: bool
) -> None:
    rules = ruleset(tmp_path)
    rig = Rig(rules, T0)
    rig.event(T0 + 1, "GUEST_PANICKED")
    rig.event(T0 + 2, "GUEST_PANICKED")
    rig.event(T0 + 2, "GUEST_PANICKED", vm="vm2")
    after = moved(rig, rules, down=down)
    after.event(T0 + 3 + down, "GUEST_PANICKED", vm="vm2")
    assert after.fired == []
    after.event(T0 + 4 + down, "GUEST_PANICKED")
    assert after.fired == ([("panics", "vm1", 3, T0 + 4 + down)] if fires else [])


def test_a_held_once_after_fires_at_its_end_or_at_once_if_it_passed(tmp_path: Path) -> None:
    rules = ruleset(tmp_path)
    rig = Rig(rules, T0)
    rig.event(T0 + 1, "STOP")
    rig.event(T0 + 2, "STOP")
    on_time = moved(rig, rules, down=3)
    on_time.clock.advance(T0 + 30)
    assert on_time.fired == []
    on_time.clock.advance(T0 + 31)
    assert on_time.fired == [("settle", "vm1", 2, T0 + 31)]
    late = moved(rig, rules, down=100)
    late.clock.advance(T0 + 102)
    assert late.fired == [("settle", "vm1", 2, T0 + 102)]


def test_an_absent_whose_deadline_passed_fires_and_a_follower_still_cancels(
    tmp_path: Path,
) -> None:
    rules = ruleset(tmp_path)
    rig = Rig(rules, T0)
    rig.event(T0 + 1, "VSERPORT_CHANGE", id="a", open=False)
    rig.event(T0 + 2, "VSERPORT_CHANGE", id="b", open=False)
    after = moved(rig, rules, down=10)
    after.event(T0 + 20, "VSERPORT_CHANGE", id="b", open=True)
    after.clock.advance(T0 + 100)
    assert after.fired == [("agent-gone", "vm1", 1, T0 + 61)]
    late = moved(rig, rules, down=200)
    late.clock.advance(T0 + 203)
    assert sorted(r[0] for r in late.fired) == ["agent-gone", "agent-gone"]


def test_parts_of_a_changed_rule_are_not_taken(tmp_path: Path) -> None:
    rig = Rig(ruleset(tmp_path), T0)
    rig.event(T0 + 1, "GUEST_PANICKED")
    rig.event(T0 + 2, "GUEST_PANICKED")
    changed = ruleset(tmp_path, RULES.replace("count: 3", "count: 4"))
    after = moved(rig, changed, down=1)
    after.event(T0 + 4, "GUEST_PANICKED")
    after.event(T0 + 5, "GUEST_PANICKED")
    assert after.fired == []
    digests = {state.rule_digest(r) for r in changed.rules}
    assert len(digests) == 3
    assert {state.rule_digest(r) for r in ruleset(tmp_path).rules} != digests


def test_a_rule_swap_keeps_the_windows_of_unchanged_rules(tmp_path: Path) -> None:
    rules = ruleset(tmp_path)
    rig = Rig(rules, T0)
    rig.event(T0 + 1, "GUEST_PANICKED")
    rig.event(T0 + 2, "GUEST_PANICKED")
    rig.event(T0 + 3, "STOP")
    extra = RULES + "  - {name: new, on: RESET, actions: [{type: log, with: {message: x}}]}\n"
    rig.engine.swap_rules(ruleset(tmp_path, extra))
    rig.event(T0 + 4, "GUEST_PANICKED")
    rig.clock.advance(T0 + 100)
    # Fired once each: the old gate's timer was cancelled when its state moved.
    assert rig.fired == [("panics", "vm1", 3, T0 + 4), ("settle", "vm1", 1, T0 + 33)]


def test_the_qemu_stage_keeps_its_held_event(tmp_path: Path) -> None:
    text = "rules:\n  - {name: rtc, on: RTC_CHANGE, actions: [{type: log, with: {message: x}}]}\n"
    rules = ruleset(tmp_path, text)
    rig = Rig(rules, T0)
    rig.event(T0 + 1, "RTC_CHANGE", offset=1)
    rig.event(T0 + 1.2, "RTC_CHANGE", offset=2)
    after = moved(rig, rules, down=0.1)
    after.clock.advance(T0 + 5)
    assert after.fired == [("rtc", "vm1", 1, T0 + 2)]
