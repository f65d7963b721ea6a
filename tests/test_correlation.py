"""Correlation (``absent``/``followed_by``): the compiler, the engine, and a reference model.

The reference (``reference_firings``) is written from the semantics as the README
states them, independently of ``reactor.engine``: random scenarios mixing
correlation, throttles and thresholds must give the same firings in replay.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reactor.engine.replay import ReplayInput, replay
from reactor.model import Firing
from reactor.rules.compiler import load_rules

T0 = 1_800_000_000


def event_line(t: float, name: str, vm: str = "vm1", **data: Any) -> str:
    seconds = int(t)
    micro = round((t - seconds) * 1e6)
    doc = {"timestamp": {"seconds": seconds, "microseconds": micro}, "event": name, "data": data}
    return json.dumps({**doc, "vm": vm})


def run(tmp_path: Path, rules: str, lines: list[str], **kw: Any) -> list[Firing]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    ruleset, diags = load_rules([path])
    assert not [d for d in diags if d.severity == "error"], diags
    return replay([ReplayInput("events", lines, "vm1")], ruleset, **kw).firings


def diagnostics(tmp_path: Path, rules: str) -> list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return [str(d).replace(str(path), "F") for d in load_rules([path])[1]]


AGENT_GONE = """
rules:
  - name: agent-gone
    on: VSERPORT_CHANGE
    when: {path: $.data.open, equals: false}
    absent:
      on: VSERPORT_CHANGE
      when: {path: $.data.open, equals: true}
      within: 60s
      key: [$.vm, $.data.id]
    actions: [{type: log, with: {message: "{{ data.id }} gone"}}]
"""


def test_absent_fires_at_the_deadline_with_the_first_event(tmp_path: Path) -> None:
    lines = [
        event_line(T0, "VSERPORT_CHANGE", id="a", open=False),
        event_line(T0 + 10, "VSERPORT_CHANGE", id="a", open=True),  # back in time: cancelled
        event_line(T0 + 20, "VSERPORT_CHANGE", id="b", open=False),
        event_line(T0 + 30, "VSERPORT_CHANGE", id="a", open=True),  # another key: no effect on b
    ]
    [firing] = run(tmp_path, AGENT_GONE, lines)
    assert (firing.time, firing.envelope["seq"], firing.envelope["data"]["id"]) == (T0 + 80, 3, "b")
    assert firing.context["correlation"] == "absent"


@pytest.mark.parametrize(
    ("second_at", "second_open"),
    [(60, True), (30, False)],
    ids=["a follower at the deadline is too late", "a first while one is pending is ignored"],
)
def test_one_pending_first_until_its_deadline(
    tmp_path: Path, second_at: int, second_open: bool
) -> None:
    lines = [
        event_line(T0, "VSERPORT_CHANGE", id="a", open=False),
        event_line(T0 + second_at, "VSERPORT_CHANGE", id="a", open=second_open),
    ]
    [firing] = run(tmp_path, AGENT_GONE, lines)
    assert firing.time == T0 + 60 and firing.envelope["seq"] == 1


PANIC_RESET = """
rules:
  - name: panic-then-reset
    on: GUEST_PANICKED
    followed_by: {on: [RESET, RESUME], within: 10s}
    actions: [{type: log, with: {message: "{{ event }} after {{ first.event }} on {{ vm }}"}}]
"""


def test_followed_by_fires_with_the_follower_and_keeps_the_first(tmp_path: Path) -> None:
    lines = [
        event_line(T0, "GUEST_PANICKED", action="pause"),
        event_line(T0 + 3, "RESET", guest=False, reason="host-qmp-system-reset"),
        event_line(T0 + 4, "RESET", guest=True, reason="guest-reset"),  # nothing pending now
        event_line(T0 + 20, "GUEST_PANICKED", action="pause"),  # no follower: nothing
    ]
    [firing] = run(tmp_path, PANIC_RESET, lines)
    assert (firing.time, firing.envelope["event"], firing.envelope["seq"]) == (T0 + 3, "RESET", 2)
    assert firing.envelope["first"]["event"] == "GUEST_PANICKED"
    assert firing.envelope["first"]["seq"] == 1


def test_followers_are_per_key(tmp_path: Path) -> None:
    lines = [
        event_line(T0, "GUEST_PANICKED", vm="a", action="pause"),
        event_line(T0 + 1, "RESET", vm="b", guest=False, reason="host-qmp-system-reset"),
    ]
    assert run(tmp_path, PANIC_RESET, lines) == []


def test_the_follower_is_offered_before_the_first(tmp_path: Path) -> None:
    rules = """
rules:
  - name: two-panics
    on: GUEST_PANICKED
    followed_by: {on: GUEST_PANICKED, within: 10s}
    actions: [{type: log}]
"""
    lines = [event_line(T0 + i, "GUEST_PANICKED", action="pause") for i in range(3)]
    # 1 pends; 2 follows (fires) and then pends as a new first; 3 follows it.
    assert [f.envelope["seq"] for f in run(tmp_path, rules, lines)] == [2, 3]


def test_throttle_applies_after_correlation(tmp_path: Path) -> None:
    rules = PANIC_RESET.replace(
        "    actions:", "    throttle: {mode: once_within, window: 1h}\n    actions:"
    )
    lines = []
    for i in range(3):
        lines.append(event_line(T0 + 100 * i, "GUEST_PANICKED", action="pause"))
        lines.append(event_line(T0 + 100 * i + 1, "RESUME"))
    assert [f.envelope["seq"] for f in run(tmp_path, rules, lines)] == [2]


def test_explain_says_when_a_first_started_and_why_it_ended(tmp_path: Path) -> None:
    said: list[str] = []
    lines = [
        event_line(T0, "VSERPORT_CHANGE", id="a", open=False),
        event_line(T0 + 10, "VSERPORT_CHANGE", id="a", open=True),
        event_line(T0 + 20, "VSERPORT_CHANGE", id="a", open=False),
    ]
    run(tmp_path, AGENT_GONE, lines, explain=lambda env, rule, msg: said.append(msg))
    text = "\n".join(said)
    assert f"pending since {T0:.6f}: waiting until {T0 + 60:.6f}" in text
    assert f"follower: cancels the first at {T0:.6f} (absent)" in text
    assert "no follower within 60s: fires" in text


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            "    absent: {on: RESUME, within: 1m}\n    followed_by: {on: RESUME, within: 1m}\n",
            "5:5: error: a rule has 'absent' or 'followed_by', not both",
        ),
        (
            "    absent: {on: RESUME, within: 1m}\n    threshold: {count: 2, window: 1m}\n",
            "4:5: error: 'absent' cannot be used with 'threshold'",
        ),
        ("    absent: {on: RESUME}\n", "4:13: error: 'absent' needs 'within'"),
        ("    absent: {within: 5s}\n", "4:13: error: absent needs 'on:'"),
        ("    absent: {on: RESUM, within: 5s}\n", "4:18: error: unknown event 'RESUM'"),
        (
            "    followed_by: {on: RESET, within: 5s, when: {path: $.data.gest, equals: true}}\n",
            "no event of this rule (RESET) has the data field 'gest' (did you mean guest?)",
        ),
        ("    absent: {on: RESUME, within: 0s}\n", "within must be longer than zero"),
        ("    absent: {on: RESUME, within: 5s, keys: [$.vm]}\n", "unknown key 'keys' in absent"),
        ("    absent: [RESUME]\n", "4:13: error: 'absent:' is a mapping"),
    ],
)
def test_check_locates_correlation_mistakes(tmp_path: Path, snippet: str, message: str) -> None:
    rules = f"rules:\n  - name: r\n    on: STOP\n{snippet}    actions: [{{type: log}}]\n"
    found = diagnostics(tmp_path, rules)
    assert any(message in d for d in found), found


# -- the reference model --------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    name: str
    first: str
    kind: str | None  # "absent", "followed_by" or None
    follower: str = "RESUME"
    follower_guest: bool | None = None  # a condition on a RESET follower's data.guest
    within: int = 5
    key_event: bool = False  # key [$.vm, $.event] instead of [$.vm]
    throttle: int | None = None  # once_within window
    threshold: tuple[int, int] | None = None  # (count, window)

    def yaml(self) -> str:
        out = [f"  - name: {self.name}", f"    on: {self.first}"]
        if self.kind is not None:
            when = ""
            if self.follower_guest is not None:
                when = f", when: {{path: $.data.guest, equals: {str(self.follower_guest).lower()}}}"
            key = ", key: [$.vm, $.event]" if self.key_event else ""
            spec = f"on: {self.follower}, within: {self.within}s{when}{key}"
            out.append(f"    {self.kind}: {{{spec}}}")
        if self.throttle is not None:
            out.append(f"    throttle: {{mode: once_within, window: {self.throttle}s}}")
        if self.threshold is not None:
            count, window = self.threshold
            out.append(f"    threshold: {{count: {count}, window: {window}s}}")
        out.append("    actions: [{type: log}]")
        return "\n".join(out)


@dataclass(frozen=True)
class Ev:
    t: int
    name: str
    vm: str
    guest: bool
    seq: int

    def data(self) -> dict[str, Any]:
        return {"guest": self.guest, "reason": "guest-reset"} if self.name == "RESET" else {}


def reference_firings(rules: list[RuleSpec], events: list[Ev]) -> Counter[tuple[str, int, int]]:
    """(rule, time, seq) of every firing, by the README's semantics, without the engine."""
    fired: Counter[tuple[str, int, int]] = Counter()
    pending: dict[str, dict[Any, tuple[int, Ev]]] = {r.name: {} for r in rules}
    opened: dict[str, dict[Any, int]] = {r.name: {} for r in rules}
    counts: dict[str, dict[Any, list[int]]] = {r.name: {} for r in rules}

    def out(rule: RuleSpec, ev: Ev, now: int) -> None:
        if rule.throttle is not None:
            start = opened[rule.name].get(ev.vm)
            if start is not None and now < start + rule.throttle:
                return
            opened[rule.name][ev.vm] = now
        fired[(rule.name, now, ev.seq)] += 1

    def deadlines(until: float) -> None:
        due = [
            (t + rule.within, rule, key)
            for rule in rules
            for key, (t, _) in pending[rule.name].items()
            if t + rule.within <= until
        ]
        for when, rule, key in sorted(due, key=lambda d: d[0]):
            _, first = pending[rule.name].pop(key)
            if rule.kind == "absent":
                out(rule, first, when)

    def key_of(rule: RuleSpec, ev: Ev) -> Any:
        return (ev.vm, ev.name) if rule.key_event else ev.vm

    for ev in events:
        deadlines(ev.t)
        for rule in rules:  # followers first
            if rule.kind is None or ev.name != rule.follower:
                continue
            if rule.follower_guest is not None and ev.guest != rule.follower_guest:
                continue
            found = pending[rule.name].pop(key_of(rule, ev), None)
            if found is not None and rule.kind == "followed_by":
                out(rule, ev, ev.t)
        for rule in rules:  # then firsts
            if ev.name != rule.first:
                continue
            if rule.kind is not None:
                pending[rule.name].setdefault(key_of(rule, ev), (ev.t, ev))
            elif rule.threshold is not None:
                count, window = rule.threshold
                times = [t for t in counts[rule.name].get(ev.vm, []) if t + window > ev.t]
                times.append(ev.t)
                counts[rule.name][ev.vm] = [] if len(times) >= count else times
                if len(times) >= count:
                    out(rule, ev, ev.t)
            else:
                out(rule, ev, ev.t)
    deadlines(float("inf"))
    return fired


NAMES = ("STOP", "RESUME", "RESET", "GUEST_PANICKED")

rule_specs = st.builds(
    RuleSpec,
    name=st.just(""),
    first=st.sampled_from(NAMES),
    kind=st.sampled_from(["absent", "followed_by", "absent", "followed_by", None]),
    follower=st.sampled_from(NAMES),
    follower_guest=st.sampled_from([None, True, False]),
    within=st.integers(1, 8),
    key_event=st.booleans(),
    throttle=st.one_of(st.none(), st.integers(1, 10)),
    threshold=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 6))),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[RuleSpec], list[Ev]]:
    specs = draw(st.lists(rule_specs, min_size=1, max_size=4))
    rules = []
    for i, spec in enumerate(specs):
        threshold = spec.threshold if spec.kind is None else None
        guest = spec.follower_guest if spec.follower == "RESET" else None
        rules.append(
            RuleSpec(
                f"r{i}",
                spec.first,
                spec.kind,
                spec.follower,
                guest,
                spec.within,
                spec.key_event,
                spec.throttle,
                threshold,
            )
        )
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3), st.sampled_from(NAMES), st.sampled_from("ab"), st.booleans()
            ),
            max_size=30,
        )
    )
    events, t = [], 0
    for seq, (gap, name, vm, guest) in enumerate(steps, 1):
        t += gap
        events.append(Ev(t, name, vm, guest, seq))
    return rules, events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_replay_agrees_with_the_reference(scenario: tuple[list[RuleSpec], list[Ev]]) -> None:
    import tempfile

    rules, events = scenario
    text = "rules:\n" + "\n".join(r.yaml() for r in rules) + "\n"
    lines = [event_line(T0 + e.t, e.name, e.vm, **e.data()) for e in events]
    with tempfile.TemporaryDirectory() as tmp:
        got = run(Path(tmp), text, lines, qemu_stage=False)
    actual = Counter((f.rule.name, round(f.time) - T0, f.envelope["seq"]) for f in got)
    assert actual == reference_firings(rules, events), text
