"""What ``StateKeeper`` writes: only the parts that changed, and always enough to go on.

A real SQLite state file and an engine on a virtual clock. The property: whatever
the events, the file read back into a fresh engine holds the live engine's state
and behaves as it does from then on, although a write skips every part whose
holder did not change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reactor.engine import state
from reactor.service.enginestate import StateFile, StateKeeper
from tests.test_engine_state import RULES, T0, Rig, ruleset

STAGE_RULE = "  - {name: rtc, on: RTC_CHANGE, actions: [{type: log, with: {message: x}}]}\n"


def write(keeper: StateKeeper) -> dict[str, str] | None:
    """One write as the keeper's task does it; returns the parts it wrote."""
    changes = keeper._changes()
    if changes is None:
        return None
    keeper.file.write(*changes)
    return changes[0]


def test_a_write_holds_only_the_parts_that_changed(tmp_path: Path) -> None:
    rig = Rig(ruleset(tmp_path), T0)
    keeper = StateKeeper(rig.engine, StateFile(tmp_path / "state.sqlite3"))
    rig.event(T0 + 1, "GUEST_PANICKED")
    rig.event(T0 + 2, "STOP")
    first = write(keeper)
    assert first is not None and sorted(n.split(":")[1] for n in first) == ["panics", "settle"]
    assert write(keeper) is None
    rig.event(T0 + 3, "GUEST_PANICKED")
    again = write(keeper)
    assert again is not None and [n.split(":")[1] for n in again] == ["panics"]
    rig.clock.advance(T0 + 40)  # the once_after window ends: its part goes, none is written
    assert write(keeper) == {}
    names = [n.split(":")[1] for n in keeper.file.parts()]
    assert names == ["panics"]


def written(tmp_path: Path) -> tuple[Path, StateKeeper]:
    """A state file holding a panic counted and a STOP held (the keeper still open)."""
    path = tmp_path / "state.sqlite3"
    rig = Rig(ruleset(tmp_path), T0)
    keeper = StateKeeper(rig.engine, StateFile(path))
    rig.event(T0 + 1, "GUEST_PANICKED")
    rig.event(T0 + 2, "STOP")
    write(keeper)
    return path, keeper


def test_parts_of_changed_rules_leave_the_file_at_the_next_write(tmp_path: Path) -> None:
    path, keeper = written(tmp_path)
    keeper.file.close()
    after = Rig(ruleset(tmp_path, RULES.replace("count: 3", "count: 4")), T0 + 3)
    keeper = StateKeeper(after.engine, StateFile(path))
    assert [n.split(":")[1] for n in keeper.restore()] == ["settle"]
    write(keeper)
    assert [n.split(":")[1] for n in keeper.file.parts()] == ["settle"]


def test_a_part_of_another_shape_is_ignored_and_the_rest_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, keeper = written(tmp_path)
    # The stage's part as an older layout wrote it (its VMs as a mapping), and a gate's
    # part damaged: each is lost alone, with a warning; nothing stops the start.
    [settle] = [n for n in keeper.file.parts() if n.startswith("gate:settle:")]
    damaged = {state.STAGE: '{"windows": [], "vms": {"vm1": ["7.2", "x"]}}', settle: "[1, 2]"}
    keeper.file.write(damaged, [], time.time())
    keeper.file.close()
    after = Rig(ruleset(tmp_path), T0 + 3)
    keeper = StateKeeper(after.engine, StateFile(path))
    with caplog.at_level(logging.WARNING, logger="reactor"):
        taken = keeper.restore()
    assert [n.split(":")[1] for n in taken] == ["panics"]
    ignored = sorted(r.getMessage().split(" part ")[1].split(" ")[0] for r in caplog.records)
    assert ignored == sorted([state.STAGE, settle]), caplog.text
    after.event(T0 + 4, "GUEST_PANICKED")
    after.event(T0 + 5, "GUEST_PANICKED")
    assert [f[0] for f in after.fired] == ["panics"]  # the count went on: 3 panics


def test_the_stage_keeps_each_hosts_release_across_a_restore(tmp_path: Path) -> None:
    text = (
        "rules:\n  - {name: io, on: BLOCK_IO_ERROR, actions: [{type: log, with: {message: x}}]}\n"
    )
    rules = ruleset(tmp_path, text)
    rig = Rig(rules, T0)
    for host, qemu in (("h72", "7.2.0"), ("h92", "9.2.0")):
        rig.clock.advance(T0 + 1)
        rig.engine.feed({"event": "REACTOR_CONNECTED", "data": {"qemu": qemu}, "vm": "vm1",
                         "host": host, "timestamp": None})  # fmt: skip
    path = tmp_path / "state.sqlite3"
    keeper = StateKeeper(rig.engine, StateFile(path))
    write(keeper)
    keeper.file.close()
    after = Rig(rules, T0 + 2)
    StateKeeper(after.engine, StateFile(path)).restore()
    io = {"device": "d0", "node-name": "n0", "qom-path": "/machine/peripheral/d0",
          "operation": "write", "action": "report"}  # fmt: skip
    for host in ("h72", "h72", "h92", "h92"):  # 9.2 throttles per qom-path, 7.2 does not
        after.engine.feed({"event": "BLOCK_IO_ERROR", "data": io, "vm": "vm1", "host": host,
                           "timestamp": None})  # fmt: skip
    assert len(after.fired) == 3


EVENTS = st.sampled_from(
    [
        ("GUEST_PANICKED", {}),
        ("STOP", {}),
        ("RTC_CHANGE", {"offset": 1}),
        ("VSERPORT_CHANGE", {"id": "a", "open": False}),
        ("VSERPORT_CHANGE", {"id": "a", "open": True}),
        ("VSERPORT_CHANGE", {"id": "b", "open": False}),
    ]
)
STEPS = st.lists(
    st.tuples(st.floats(0, 40), EVENTS, st.sampled_from(["vm1", "vm2"]), st.booleans()),
    max_size=30,
)


def rounded(parts: dict[str, Any]) -> Any:
    """Parts with their times to the microsecond (moved by a base and back)."""

    def walk(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(parts)


@settings(max_examples=60, deadline=None)
@given(steps=STEPS)
def test_the_file_read_back_holds_and_does_what_the_live_engine_does(
    tmp_path_factory: Any, steps: list[tuple[float, tuple[str, dict[str, Any]], str, bool]]
) -> None:
    tmp = tmp_path_factory.mktemp("state")
    rules = ruleset(tmp, RULES + STAGE_RULE)
    live = Rig(rules, T0)
    file = StateFile(tmp / "state.sqlite3")
    keeper = StateKeeper(live.engine, file)
    t = T0
    for dt, (name, data), vm, written in steps:
        t += dt
        live.event(t, name, vm=vm, **data)
        if written:
            write(keeper)
    write(keeper)
    now = live.clock.now()
    fresh = Rig(rules, now)
    parts = {name: doc for name, (doc, _) in file.parts().items()}
    state.restore(fresh.engine, parts, keeper._base)
    assert rounded(state.dump(fresh.engine, now)) == rounded(state.dump(live.engine, now))
    seen = len(live.fired)
    for rig in (live, fresh):
        rig.event(now + 1, "GUEST_PANICKED")
        rig.event(now + 2, "VSERPORT_CHANGE", id="a", open=True)
        rig.clock.advance(now + 1000)
    assert live.fired[seen:] == fresh.fired
    file.close()
