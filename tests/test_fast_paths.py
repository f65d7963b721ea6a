"""Fast paths and their slow twins: each generated or hand-inlined hot path equals its reference.

Hypothesis draws the inputs; every pair must agree exactly (values and types), so a
fast path may only be faster, never different.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from reactor.clock import VirtualClock
from reactor.engine.keys import compiled_keyfunc, keyfunc
from reactor.engine.replay import ReplayInput, _feed_one, parse_event, replay, time_text
from reactor.errors import Diagnostic, Location
from reactor.model import Envelope
from reactor.rules.compiler import load_rules
from reactor.rules.paths import compile_path
from reactor.rules.ruleset import RuleSet
from reactor.service.loader import bundled_rules

ATOMS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
JSON = st.recursive(
    ATOMS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
FIELDS = st.sampled_from(["node-name", "device", "id", "a"])
ENVELOPES = st.fixed_dictionaries(
    {"event": st.text(max_size=4) | JSON, "vm": st.sampled_from(["vm1", "vm2"]) | JSON},
    optional={"data": st.dictionaries(FIELDS, JSON, max_size=4) | JSON},
)
PATHS = st.sampled_from(
    ["$.vm", "$.event", "$.data", "$.data.node-name", "$.data.device", "$['data']['id']",
     "$.data.id.a", "$.data.a.a.a", "$", "$.data.*", "$.data[*]"]
)  # fmt: skip


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (``1``, ``1.0`` and ``True`` apart)."""
    return type(a) is type(b) and repr(a) == repr(b) and (a == b or a != a)


@settings(max_examples=400, deadline=None)
@given(paths=st.lists(PATHS, max_size=4), env=ENVELOPES)
def test_generated_keys_equal_the_reference(paths: list[str], env: dict[str, Any]) -> None:
    compiled = [compile_path(p) for p in paths]
    fast, slow = compiled_keyfunc(compiled)(env), keyfunc(compiled)(env)
    assert same(fast, slow), (paths, env)
    hash(fast)


# -- replay's single-input loop against parse_event, line by line ----------------------------

STAMPS = st.fixed_dictionaries(
    {"seconds": st.integers(-2, 2**40) | JSON, "microseconds": st.integers(-2, 10**6 + 1) | JSON}
) | JSON  # fmt: skip
FOUR_KEYS = st.fixed_dictionaries(
    {"event": st.sampled_from(["STOP", "RESET", ""]) | JSON, "data": st.just({}) | JSON,
     "timestamp": STAMPS, "vm": st.sampled_from(["vm1", ""]) | JSON}
)  # fmt: skip
OTHER_KEYS = st.dictionaries(
    st.sampled_from(["event", "data", "timestamp", "vm", "host", "caused_by", "x"]), JSON
)
LINES = (
    FOUR_KEYS.map(json.dumps)
    | OTHER_KEYS.map(lambda d: json.dumps({**d, "timestamp": {"seconds": 5, "microseconds": 1}}))
    | OTHER_KEYS.map(json.dumps)
    | st.text(max_size=12)
)


def reference_loop(inp: ReplayInput) -> tuple[list[Envelope], list[str]]:
    """What ``_feed_one`` feeds, line by line through ``parse_event``."""
    envs: list[Envelope] = []
    problems: list[str] = []
    for lineno, line in enumerate(inp.lines, 1):
        try:
            env = parse_event(line, inp.vm)
        except ValueError as err:
            if line.strip():
                problems.append(str(Diagnostic(Location(inp.name, lineno), str(err))))
            continue
        env["source"], env["seq"] = inp.name, len(envs) + 1
        envs.append(env)
    return envs, problems


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(LINES.map(lambda s: s.replace("\n", " ") + "\n"), max_size=8))
def test_the_replay_loop_makes_the_envelopes_parse_event_makes(lines: list[str]) -> None:
    fed: list[Envelope] = []
    problems: list[Diagnostic] = []
    clock = VirtualClock()
    count = _feed_one(ReplayInput("in.jsonl", lines, "in"), fed.append, clock, problems)
    envs, said = reference_loop(ReplayInput("in.jsonl", lines, "in"))
    assert count == len(envs)
    assert [list(e.items()) for e in fed] == [list(e.items()) for e in envs]  # keys in order
    assert [str(p) for p in problems] == said
    assert clock.now() == max([0.0, *(e["received_at"] for e in envs)])


# -- the dry run's time text --------------------------------------------------------------

TIMES = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(0.5, 2.0**33)
    | st.builds(lambda s, us: s + us / 1e6, st.integers(0, 2**33), st.integers(0, 999_999))
)


@settings(max_examples=2000, deadline=None)
@given(t=TIMES)
@example(t=1.0078125)  # exactly halfway between two 6-decimal values: to even
@example(t=1.0078135)
@example(t=2.0**32 - 2.0**-20)
@example(t=1795238424.0)
def test_time_text_is_the_repr_of_the_rounded_time(t: float) -> None:
    assert time_text(t) == repr(round(t, 6))


# -- the engine's compiled routes against its explained path ----------------------------------

F = st.fixed_dictionaries
DATA = {
    "VSERPORT_CHANGE": F({"id": st.sampled_from(["p0", "p1"]), "open": st.booleans()}),
    "STOP": st.just({}),
    "RESUME": st.just({}),
    "SHUTDOWN": F({"guest": st.booleans()}),
    "BALLOON_CHANGE": F({"actual": st.integers(0, 9)}),
    "RTC_CHANGE": F({"offset": st.integers(0, 9)}),
    "WATCHDOG": st.just({"action": "reset"}),
    "GUEST_PANICKED": st.just({"action": "pause"}),
    "QUORUM_REPORT_BAD": F({"node-name": st.sampled_from(["r0", "r1"]), "type": st.just("read")}),
    "QUORUM_FAILURE": st.just({"reference": "q0"}),
    "BLOCK_IO_ERROR": F({"device": st.just(""), "node-name": st.sampled_from(["d0", "d1"]),
                         "operation": st.just("write"), "nospace": st.booleans()}),
    "REACTOR_DISCONNECTED": F({"shutdown_seen": st.booleans(), "reason": st.just("EOF")}),
}  # fmt: skip
STEPS = st.lists(
    st.tuples(
        st.integers(0, 1_500_000) | st.integers(0, 400_000_000),  # microseconds since the last
        st.sampled_from(["vm1", "vm2"]),
        st.sampled_from(sorted(DATA)).flatmap(lambda name: st.tuples(st.just(name), DATA[name])),
    ),
    max_size=40,
)


def default_pack() -> RuleSet:
    files = [p for p in sorted(bundled_rules().glob("*.yaml")) if not p.name.endswith("_test.yaml")]
    rules, problems = load_rules(files)
    assert not [d for d in problems if d.severity == "error"], problems
    return rules


def firings(rules: RuleSet, lines: list[str], **kw: Any) -> list[tuple[Any, ...]]:
    got = replay([ReplayInput("in", lines, "in")], rules, **kw).firings
    return [(f.rule.name, f.time, f.envelope["seq"], f.context) for f in got]


@settings(max_examples=150, deadline=None)
@given(steps=STEPS)
def test_compiled_routes_fire_as_the_explained_path_does(steps: list[Any]) -> None:
    rules, t, lines = default_pack(), 1_700_000_000_000_000, []
    for gap, vm, (event, data) in steps:
        t += gap
        stamp = {"seconds": t // 1_000_000, "microseconds": t % 1_000_000}
        lines.append(json.dumps({"event": event, "data": data, "timestamp": stamp, "vm": vm}))
    told: list[str] = []
    explained = firings(rules, lines, explain=lambda env, rule, why: told.append(why))
    assert firings(rules, lines) == explained
