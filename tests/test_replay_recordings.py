"""`qmp-reactor replay` over the real QEMU recordings in examples/events/.

* Golden files: the dry-run output of ``replay FILE --rules rules`` (the default pack) for every
  recording is compared byte for byte with ``tests/golden/replay/FILE``. Regenerate them with
  ``UPDATE_GOLDEN=1 pytest tests/test_replay_recordings.py`` and read the diff before committing.
* The goldens mean what QEMU did: checked against the recordings themselves (a quorum child
  reported once within the throttle, a flapping port's final closes at the ends of QEMU's
  windows, a panic restarting the VM).
* Determinism: the same replay twice gives the same output, ``--explain`` trace included.
* The QEMU stage leaves a real QEMU's recording alone: QEMU has already rate-limited those
  events, so with and without ``--no-qemu-stage`` the same rules fire for the same events; only
  the events the stage holds fire later, at the end of their window.

The replays run as real subprocesses, in parallel, once per module.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from reactor.engine.replay import open_inputs, replay
from reactor.model import Firing, Rule
from reactor.plugins.api import ActionSettings
from reactor.plugins.manager import load_plugins
from reactor.rules.compiler import load_rules
from reactor.rules.ruleset import RuleSet

REPO = Path(__file__).resolve().parents[1]
EVENTS_DIR = REPO / "examples" / "events"
GOLDEN_DIR = REPO / "tests" / "golden" / "replay"
RECORDINGS = sorted(p.name for p in EVENTS_DIR.glob("*.jsonl"))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

QEMU_KEYS: dict[str, str | None] = {
    "QUORUM_REPORT_BAD": "node-name",
    "VSERPORT_CHANGE": "id",
    "BALLOON_CHANGE": None,
}
"""QEMU 7.2's throttle key per rate-limited event type in the recordings (monitor/monitor.c)."""

Run = subprocess.CompletedProcess[str]


def _replay(args: Sequence[str]) -> Run:
    return subprocess.run(
        [sys.executable, "-m", "reactor", "replay", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _recorded(name: str) -> list[dict[str, Any]]:
    """The recording's events; position i holds the event with seq i + 1."""
    lines = (EVENTS_DIR / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _ts(event: dict[str, Any]) -> float:
    """The event's timestamp in seconds, computed as replay computes it."""
    return float(event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6)


def _t(seconds: float) -> float:
    """A time as the dry-run output prints it."""
    return round(seconds, 6)


def _lines(run: Run) -> list[dict[str, Any]]:
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str], Run]:
    """The replay subprocesses this module looks at, run in parallel: (kind, name) -> result."""
    files = [f"examples/events/{name}" for name in RECORDINGS]
    jobs = {
        ("golden", name): [f"examples/events/{name}", "--rules", "rules"] for name in RECORDINGS
    }
    for kind in ("all-1", "all-2"):
        jobs[kind, "*"] = [*files, "--rules", "rules", "--explain"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(jobs, pool.map(_replay, jobs.values()), strict=True))


def test_recordings_and_goldens_pair_up() -> None:
    assert RECORDINGS, "no recordings in examples/events"
    if not UPDATE:
        assert sorted(p.name for p in GOLDEN_DIR.glob("*.jsonl")) == RECORDINGS


@pytest.mark.parametrize("name", RECORDINGS)
def test_replay_matches_golden(name: str, runs: dict[tuple[str, str], Run]) -> None:
    run = runs["golden", name]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    golden = GOLDEN_DIR / name
    if UPDATE:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        golden.write_text(run.stdout)
    expected = golden.read_text()
    if run.stdout != expected:
        diff = difflib.unified_diff(
            expected.splitlines(), run.stdout.splitlines(), str(golden), "replay", lineterm=""
        )
        pytest.fail("replay output differs from the golden file:\n" + "\n".join(diff))


def _golden(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (GOLDEN_DIR / name).read_text().splitlines()]


def _fired(golden: list[dict[str, Any]], rule: str) -> list[tuple[int, float]]:
    return [(line["seq"], line["time"]) for line in golden if line["rule"] == rule]


def test_golden_quorum_child_reported_once_at_first_event() -> None:
    events = _recorded("quorum-bad.jsonl")
    assert [e["event"] for e in events] == ["QUORUM_REPORT_BAD"] * 2
    golden = _golden("quorum-bad.jsonl")
    # quorum-child-corrupt has a 10 minute once_within throttle per (vm, node-name).
    assert golden == [
        {
            "time": _t(_ts(events[0])),
            "rule": "quorum-child-corrupt",
            "action": "notify",
            "vm": "vm-quorum",
            "event": "QUORUM_REPORT_BAD",
            "seq": 1,
        }
    ]


def test_golden_flapping_ports_fire_final_closes_at_window_ends() -> None:
    events = _recorded("vserport-flap.jsonl")
    states = [(e["data"]["id"], e["data"]["open"]) for e in events]
    assert states == [("portA", True), ("portB", True), ("portA", False), ("portB", False)]
    # Each close is held until one second after its port's open, QEMU's window; the
    # port is never opened again, so guest-agent-gone fires a minute after that.
    assert _fired(_golden("vserport-flap.jsonl"), "guest-agent-gone") == [
        (3, _t(_ts(events[0]) + 1.0 + 60.0)),
        (4, _t(_ts(events[1]) + 1.0 + 60.0)),
    ]


def test_golden_guest_panic_restarts_and_notifies() -> None:
    events = _recorded("guest-panic.jsonl")
    golden = _golden("guest-panic.jsonl")
    assert [(g["rule"], g["action"], g["seq"]) for g in golden] == [
        ("guest-panic-restart", "restart_vm", 1),
        ("guest-panic-notify", "notify", 1),
        ("audit-lifecycle", "log", 2),
        # Nothing follows in the recording: no RESET or RESUME within 2 minutes, no RESUME,
        # SHUTDOWN or disconnection within 5.
        ("guest-panic-not-recovered", "notify", 1),
        ("vm-stopped-not-resumed", "notify", 2),
    ]
    assert golden[0]["time"] == _t(_ts(events[0]))
    assert golden[3]["time"] == _t(_ts(events[0]) + 120.0)
    assert golden[4]["time"] == _t(_ts(events[1]) + 300.0)


def test_golden_combined_recording() -> None:
    events = _recorded("recording.jsonl")
    golden = _golden("recording.jsonl")
    lifecycle = {"STOP", "RESUME", "RESET", "SHUTDOWN"}
    assert [s for s, _ in _fired(golden, "audit-lifecycle")] == [
        i + 1 for i, e in enumerate(events) if e["event"] in lifecycle
    ]
    bad = [i + 1 for i, e in enumerate(events) if e["event"] == "QUORUM_REPORT_BAD"]
    assert len(bad) == 2
    assert _fired(golden, "quorum-child-corrupt") == [(bad[0], _t(_ts(events[bad[0] - 1])))]
    closes = [
        i + 1
        for i, e in enumerate(events)
        if e["event"] == "VSERPORT_CHANGE" and not e["data"]["open"]
    ]
    assert [s for s, _ in _fired(golden, "guest-agent-gone")] == closes
    panic = [i + 1 for i, e in enumerate(events) if e["event"] == "GUEST_PANICKED"]
    assert [s for s, _ in _fired(golden, "guest-panic-restart")] == panic
    # The recording ends with a quit: its last STOP is followed by SHUTDOWN, the first by
    # RESUME; the panic is followed by neither RESET nor RESUME.
    assert _fired(golden, "vm-stopped-not-resumed") == []
    assert [s for s, _ in _fired(golden, "guest-panic-not-recovered")] == panic


def test_golden_other_recordings() -> None:
    assert _golden("balloon.jsonl") == []  # the default pack has no BALLOON_CHANGE rule
    blockerr = _golden("block-io-error.jsonl")
    # Two BLOCK_IO_ERRORs (seq 1 and 4); disk-full's 5 minute throttle lets the first through.
    assert _fired(blockerr, "disk-full") == [(1, _t(_ts(_recorded("block-io-error.jsonl")[0])))]
    assert [s for s, _ in _fired(_golden("lifecycle.jsonl"), "audit-lifecycle")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_replay_is_deterministic(runs: dict[tuple[str, str], Run]) -> None:
    first, second = runs["all-1", "*"], runs["all-2", "*"]
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stderr == second.stderr
    total = sum(len(_golden(name)) for name in RECORDINGS)
    assert len(first.stdout.splitlines()) == total
    assert "held by QEMU's rate limit" in first.stderr


@pytest.fixture(scope="module")
def stage_rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    """The default pack plus ``every-event``: no condition or throttle, on every recorded type."""
    names = sorted({e["event"] for name in RECORDINGS for e in _recorded(name)})
    every = tmp_path_factory.mktemp("rules") / "every.yaml"
    every.write_text(
        "rules:\n  - name: every-event\n"
        f"    on: {json.dumps(names)}\n    actions:\n      - type: log\n"
    )
    plugins = load_plugins(plugin_dirs=(), load_entry_points=False)
    ruleset, diags = load_rules(
        [REPO / "rules", every], action_types=plugins.action_types(), settings=ActionSettings()
    )
    assert not [d for d in diags if d.severity == "error"], diags
    return ruleset


def _key(event: dict[str, Any]) -> tuple[str, str, Any]:
    field = QEMU_KEYS[event["event"]]
    return event["vm"], event["event"], None if field is None else event["data"][field]


def _expected_held(events: list[dict[str, Any]]) -> dict[int, float]:
    """Seq -> window end for the events QEMU's rule holds: one of its key went out < 1 s ago.

    Real recordings need no more than that: QEMU already let at most one event per window of
    a key through, so a held event is never replaced and every window holds at most one.
    """
    opened: dict[tuple[str, str, Any], float] = {}
    now = 0.0
    held = {}
    for seq, event in enumerate(events, 1):
        now = max(now, _ts(event))
        if event["event"] not in QEMU_KEYS:
            continue
        key = _key(event)
        start = opened.get(key)
        if start is not None and now < start + 1.0:
            held[seq] = _t(start + 1.0)
            opened[key] = start + 1.0
        else:
            opened[key] = now
    return held


def _firings(name: str, rules: RuleSet, *, qemu_stage: bool) -> tuple[list[Firing], set[int]]:
    """Replay one recording as ``replay`` does (``--no-qemu-stage`` when not ``qemu_stage``)."""
    held: set[int] = set()

    def explain(env: dict[str, Any], rule: Rule | None, message: str) -> None:
        if rule is None and message.startswith("held by QEMU"):
            held.add(env["seq"])

    result = replay(
        open_inputs([str(EVENTS_DIR / name)]), rules, qemu_stage=qemu_stage, explain=explain
    )
    assert not result.problems
    return result.firings, held


@pytest.mark.parametrize("name", RECORDINGS)
def test_qemu_stage_keeps_a_real_recordings_firings(name: str, stage_rules: RuleSet) -> None:
    events = _recorded(name)
    staged, held = _firings(name, stage_rules, qemu_stage=True)
    unstaged, not_held = _firings(name, stage_rules, qemu_stage=False)
    assert not_held == set()
    expected_held = _expected_held(events)
    assert held == set(expected_held)
    if any(e["event"] in QEMU_KEYS for e in events):
        assert held, "a recording of rate-limited events has events the stage holds"

    def fired(firings: list[Firing]) -> list[tuple[str, int]]:
        return sorted((f.rule.name, f.envelope["seq"]) for f in firings)

    assert fired(staged) == fired(unstaged)
    # every-event fires for every event: the stage dropped none of QEMU's events.
    assert [s for r, s in fired(staged) if r == "every-event"] == list(range(1, len(events) + 1))
    unstaged_time = {(f.rule.name, f.envelope["seq"]): _t(f.time) for f in unstaged}
    for firing in staged:
        seq = firing.envelope["seq"]
        if seq in held:
            # An absent rule fires its (held) first a `within` after the stage let it out.
            corr = firing.rule.correlation
            late = corr.within if corr is not None and corr.kind == "absent" else 0.0
            assert _t(firing.time - late) == expected_held[seq] > _t(_ts(events[seq - 1]))
        else:
            assert _t(firing.time) == unstaged_time[firing.rule.name, seq]
