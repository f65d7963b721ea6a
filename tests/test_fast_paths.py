"""Fast paths and their slow twins: each generated or hand-inlined hot path equals its reference.

Hypothesis draws the inputs; every pair must agree exactly (values and types), so a
fast path may only be faster, never different.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reactor.clock import VirtualClock
from reactor.engine.keys import compiled_keyfunc, keyfunc
from reactor.engine.replay import ReplayInput, _feed_one, parse_event, time_text
from reactor.errors import Diagnostic, Location
from reactor.model import Envelope
from reactor.rules.paths import compile_path

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
def test_time_text_is_the_repr_of_the_rounded_time(t: float) -> None:
    assert time_text(t) == repr(round(t, 6))
