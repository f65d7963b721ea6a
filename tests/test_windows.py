"""QEMU's rate limit, rule throttles and thresholds, driven by a virtual clock.

Times are binary fractions (multiples of 1/64 s) so that every expected
emission time is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from reactor.clock import AsyncioClock, VirtualClock
from reactor.engine.gates import QemuStage, RuleGate
from reactor.errors import Location
from reactor.model import CompiledPath, Envelope, Firing, Rule, Threshold, Throttle, ThrottleMode
from reactor.rules.catalog import load_catalog
from reactor.rules.lint import unreachable_threshold

T0 = 1000.0
TICK = 1 / 64

VM_PATH = CompiledPath("$.vm", lambda e: [e["vm"]])
EVENT_PATH = CompiledPath("$.event", lambda e: [e["event"]])


def data_path(name: str) -> CompiledPath:
    return CompiledPath(f"$.data.{name}", lambda e: [e["data"][name]] if name in e["data"] else [])


def env(
    event: str,
    t: float,
    vm: str = "vm1",
    seq: int = 0,
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> Envelope:
    return {
        "event": event,
        "data": {**(data or {}), **fields},
        "timestamp": {"seconds": int(t), "microseconds": int((t - int(t)) * 1_000_000)},
        "vm": vm,
        "host": "host1",
        "source": "test",
        "seq": seq,
        "received_at": t,
    }


class Stage:
    """A QemuStage on a virtual clock, recording (time, envelope) of each emission."""

    def __init__(self, window: float = 1.0, keys: dict[str, str | None] | None = None) -> None:
        self.clock = VirtualClock(T0)
        self.out: list[tuple[float, Envelope]] = []
        self.stage = QemuStage(self.clock, self.record, window=window, keys=keys)

    def record(self, e: Envelope) -> None:
        self.out.append((self.clock.now(), e))

    def feed(self, events: Iterable[Envelope]) -> list[bool]:
        pushed = []
        for e in events:
            self.clock.advance(e["received_at"])
            pushed.append(self.stage.push(e))
        return pushed


def rule(
    throttle: Throttle | None = None, threshold: Threshold | None = None, events: Any = ("X",)
) -> Rule:
    return Rule(
        name="r",
        events=tuple(events),
        actions=(),
        location=Location("rules.yaml", 1, 1),
        throttle=throttle,
        threshold=threshold,
    )


class Gate:
    """A RuleGate on a virtual clock, recording every firing."""

    def __init__(self, r: Rule) -> None:
        self.clock = VirtualClock(T0)
        self.fired: list[Firing] = []
        self.gate = RuleGate(r, self.clock, self.fired.append)

    def feed(self, events: Iterable[Envelope]) -> list[str | None]:
        reasons = []
        for e in events:
            self.clock.advance(e["received_at"])
            reasons.append(self.gate.push(e))
        return reasons

    def log(self) -> list[tuple[float, int, dict[str, Any]]]:
        return [(f.time - T0, f.envelope["seq"], f.context) for f in self.fired]


def assert_empty(clock: VirtualClock, holder: Any) -> None:
    assert len(holder) == 0
    assert clock.pending() == 0


# --- QemuStage: QEMU's algorithm -------------------------------------------------------


def test_vserport_open_close_cycles_give_four_events() -> None:
    s = Stage()
    burst = []
    for i in range(12):  # six open/close cycles of portA
        burst.append(env("VSERPORT_CHANGE", T0 + i * TICK, seq=i, id="portA", open=i % 2 == 0))
    burst.append(env("VSERPORT_CHANGE", T0 + 12 * TICK, seq=12, id="portB", open=True))
    burst.append(env("VSERPORT_CHANGE", T0 + 13 * TICK, seq=13, id="portB", open=False))
    pushed = s.feed(burst)
    s.clock.drain()

    assert pushed == [True] + [False] * 11 + [True, False]
    got = [(t - T0, e["data"]["id"], e["data"]["open"], e) for t, e in s.out]
    assert got == [
        (0.0, "portA", True, burst[0]),
        (12 * TICK, "portB", True, burst[12]),
        (1.0, "portA", False, burst[11]),
        (1.0 + 12 * TICK, "portB", False, burst[13]),
    ]
    assert s.stage.holds == 12
    assert s.stage.replaced == 10
    assert_empty(s.clock, s.stage)


def test_quorum_five_bad_reads_give_two_events() -> None:
    s = Stage()
    reads = [
        env("QUORUM_REPORT_BAD", T0 + i * TICK, seq=i, data={"node-name": "r1"}) for i in range(5)
    ]
    s.feed(reads)
    s.clock.drain()
    assert [(t - T0, e) for t, e in s.out] == [(0.0, reads[0]), (1.0, reads[4])]
    assert (s.stage.holds, s.stage.replaced) == (4, 3)
    assert_empty(s.clock, s.stage)


def test_one_name_on_two_hosts_is_two_qemus_to_the_stage() -> None:
    # A central sees every host's vm1: each is its own QEMU, with its own rate limit and
    # its own release (7.2 does not throttle BLOCK_IO_ERROR, 9.2 does, per qom-path).
    s = Stage()
    s.stage = QemuStage(s.clock, s.record)
    io = {"device": "d0", "node-name": "n0", "qom-path": "/machine/peripheral/d0",
          "operation": "write", "action": "report"}  # fmt: skip
    connected = [
        {**env("REACTOR_CONNECTED", T0, qemu="7.2.0"), "host": "h72"},
        {**env("REACTOR_CONNECTED", T0, qemu="9.2.0"), "host": "h92"},
    ]
    for c in connected:
        s.stage.connected(c)
    bad = [{**env("QUORUM_REPORT_BAD", T0 + i * TICK, seq=i, data={"node-name": "r1"}),
            "host": host} for i, host in enumerate(["h72", "h92", "h72", "h92"])]  # fmt: skip
    errors = [{**env("BLOCK_IO_ERROR", T0 + 0.5 + i * TICK, seq=10 + i, data=io), "host": host}
              for i, host in enumerate(["h72", "h72", "h92", "h92"])]  # fmt: skip
    assert s.feed(bad + errors) == [True, True, False, False, True, True, True, False]
    assert "QEMU 7.2's" in s.stage.describe("vm1", "h72")
    assert "QEMU 9.2's" in s.stage.describe("vm1", "h92")
    s.clock.drain()
    assert [(t - T0, e["host"], e["seq"]) for t, e in s.out][-3:] == [
        (1.0, "h72", 2), (1.0 + TICK, "h92", 3), (1.5 + 2 * TICK, "h92", 13),
    ]  # fmt: skip
    assert_empty(s.clock, s.stage)


def test_held_event_keeps_its_original_envelope_and_timestamp() -> None:
    s = Stage()
    first = env("RTC_CHANGE", T0, seq=1, offset=1)
    late = env("RTC_CHANGE", T0 + 0.25, seq=2, offset=2)
    s.feed([first, late])
    s.clock.drain()
    assert s.out[1][0] == T0 + 1.0
    assert s.out[1][1] is late
    assert late["timestamp"] == {"seconds": 1000, "microseconds": 250000}
    assert late["data"] == {"offset": 2}


def test_event_after_state_expired_goes_out_at_once() -> None:
    s = Stage()
    events = [env("WATCHDOG", T0, seq=1), env("WATCHDOG", T0 + 1.5, seq=2)]
    assert s.feed(events) == [True, True]
    assert [t - T0 for t, _ in s.out] == [0.0, 1.5]
    s.clock.drain()
    assert_empty(s.clock, s.stage)


def test_event_at_exact_window_end_starts_afresh() -> None:
    s = Stage()
    assert s.feed([env("WATCHDOG", T0, seq=1), env("WATCHDOG", T0 + 1.0, seq=2)]) == [True, True]
    assert [(t - T0, e["seq"]) for t, e in s.out] == [(0.0, 1), (1.0, 2)]


def test_window_reopens_after_a_held_event_went_out() -> None:
    s = Stage()
    events = [env("WATCHDOG", T0 + t, seq=i) for i, t in enumerate([0.0, 0.5, 1.5, 3.0])]
    # 0.5 is held to 1.0, which opens a window to 2.0 that holds 1.5; 3.0 finds no state.
    assert s.feed(events) == [True, False, False, True]
    s.clock.drain()
    assert [(t - T0, e["seq"]) for t, e in s.out] == [(0.0, 0), (1.0, 1), (2.0, 2), (3.0, 3)]
    assert_empty(s.clock, s.stage)


def test_vms_are_throttled_separately() -> None:
    s = Stage()
    a = [env("RTC_CHANGE", T0, vm="a", seq=1), env("RTC_CHANGE", T0, vm="b", seq=2)]
    b = [env("RTC_CHANGE", T0 + 0.5, vm="a", seq=3), env("RTC_CHANGE", T0 + 0.5, vm="b", seq=4)]
    assert s.feed(a + b) == [True, True, False, False]
    s.clock.drain()
    assert [(t - T0, e["vm"], e["seq"]) for t, e in s.out] == [
        (0.0, "a", 1),
        (0.0, "b", 2),
        (1.0, "a", 3),
        (1.0, "b", 4),
    ]


def test_quorum_failure_is_one_state_whatever_its_data() -> None:
    s = Stage()
    events = [
        env(
            "QUORUM_FAILURE", T0, seq=1, reference="q0", data={"sector-num": 0, "sectors-count": 8}
        ),
        env("QUORUM_FAILURE", T0 + 0.1, seq=2, reference="q1", data={"sector-num": 9}),
        env("QUORUM_FAILURE", T0 + 0.2, seq=3, reference="q2", data={"sector-num": 7}),
    ]
    assert s.feed(events) == [True, False, False]
    s.clock.drain()
    assert [(t - T0, e["seq"]) for t, e in s.out] == [(0.0, 1), (1.0, 3)]


@pytest.mark.parametrize("event,field", sorted(load_catalog().throttle_keys().items()))
def test_every_catalog_key_splits_or_shares_state(event: str, field: str | None) -> None:
    s = Stage()
    one: dict[str, Any] = {field: "/machine/a"} if field else {}
    other: dict[str, Any] = {field: "/machine/b"} if field else {"unrelated": 1}
    pushed = s.feed([env(event, T0, seq=1, data=one), env(event, T0, seq=2, data=other)])
    assert pushed == [True, field is not None]
    assert len(s.stage) == (2 if field else 1)


def test_non_throttled_events_pass_untouched() -> None:
    s = Stage()
    events = [env("SHUTDOWN", T0, seq=i, guest=True, reason="host-qmp-quit") for i in range(3)]
    snapshot = [dict(e) for e in events]
    assert s.feed(events) == [True, True, True]
    assert [(t, e) for t, e in s.out] == [(T0, events[0]), (T0, events[1]), (T0, events[2])]
    assert all(got is sent for (_, got), sent in zip(s.out, events, strict=True))
    assert events == snapshot
    assert_empty(s.clock, s.stage)


def test_explicit_keys_and_window() -> None:
    s = Stage(window=0.5, keys={"X": "dev"})
    events = [env("X", T0, seq=1, dev="d"), env("X", T0 + 0.25, seq=2, dev="d")]
    events.append(env("WATCHDOG", T0 + 0.25, seq=3))
    assert s.feed(events) == [True, False, True]
    s.clock.drain()
    assert [(t - T0, e["seq"]) for t, e in s.out] == [(0.0, 1), (0.25, 3), (0.5, 2)]


def test_unhashable_key_value_falls_back_to_canonical_json() -> None:
    s = Stage(keys={"X": "dev"})
    events = [
        env("X", T0, seq=1, dev={"bus": 1, "slot": 2}),
        env("X", T0, seq=2, dev={"slot": 2, "bus": 1}),
        env("X", T0, seq=3, dev={"bus": 1, "slot": 3}),
    ]
    assert s.feed(events) == [True, False, True]


def test_stage_drop_vm_cancels_its_windows_and_drops_held_events() -> None:
    s = Stage()
    events = [env("WATCHDOG", T0, vm=vm, seq=i) for i, vm in enumerate(["a", "b", "a", "b"])]
    s.feed(events)
    assert len(s.stage) == 2
    s.stage.drop_vm("a")
    assert len(s.stage) == 1
    assert s.clock.pending() == 1
    s.clock.drain()
    assert [(t - T0, e["vm"], e["seq"]) for t, e in s.out] == [
        (0.0, "a", 0),
        (0.0, "b", 1),
        (1.0, "b", 3),
    ]
    assert_empty(s.clock, s.stage)
    # Dropped state is forgotten: the VM's next event goes out at once.
    assert s.stage.push(env("WATCHDOG", s.clock.now(), vm="a", seq=9)) is True


def test_stage_memory_many_distinct_keys() -> None:
    s = Stage()
    peak = 0
    for i in range(50_000):
        t = T0 + i * 0.25
        s.feed([env("VSERPORT_CHANGE", t, seq=i, id=f"port{i}", open=True)])
        peak = max(peak, len(s.stage))
    assert peak == 4  # the windows of the last second: 0.0, 0.25, 0.5, 0.75 ago
    s.clock.drain()
    assert len(s.out) == 50_000
    assert_empty(s.clock, s.stage)


# --- RuleGate: throttles -----------------------------------------------------------------


def throttle(mode: ThrottleMode, window: float, *key: CompiledPath) -> Throttle:
    return Throttle(mode=mode, window=window, key=tuple(key))


def test_once_within_fires_first_and_drops_the_rest_of_the_window() -> None:
    g = Gate(rule(throttle("once_within", 10.0, VM_PATH)))
    times = [0.0, 3.0, 9.75, 10.0, 15.0, 25.0]
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate(times)])
    dropped = "throttled (once_within 10s)"
    assert reasons == [None, dropped, dropped, None, dropped, None]
    ctx = {"count": 1, "window": 10.0, "mode": "once_within"}
    assert g.log() == [(0.0, 0, ctx), (10.0, 3, ctx), (25.0, 5, ctx)]
    g.clock.drain()
    assert_empty(g.clock, g.gate)


def test_once_after_fires_once_at_the_window_end_with_the_last_event() -> None:
    g = Gate(rule(throttle("once_after", 30.0, VM_PATH)))
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate([0.0, 5.0, 12.0])])
    assert reasons == [
        "held (once_after 30s, 1 event)",
        "held (once_after 30s, 2 events)",
        "held (once_after 30s, 3 events)",
    ]
    assert g.fired == []
    g.feed([env("X", T0 + 40.0, seq=3)])
    g.clock.drain()
    ctx = {"window": 30.0, "mode": "once_after"}
    assert g.log() == [(30.0, 2, {"count": 3, **ctx}), (70.0, 3, {"count": 1, **ctx})]
    assert_empty(g.clock, g.gate)


def test_qemu_mode_uses_the_rule_window_and_key() -> None:
    g = Gate(rule(throttle("qemu", 2.0, data_path("node"))))
    events = [env("X", T0 + i * TICK, seq=i, node="r1") for i in range(5)]
    events.append(env("X", T0 + 5 * TICK, seq=5, node="r2"))
    reasons = g.feed(events)
    held = "held (qemu 2s)"
    assert reasons == [None, held, held, held, held, None]
    g.clock.drain()
    ctx = {"window": 2.0, "mode": "qemu"}
    assert g.log() == [
        (0.0, 0, {"count": 1, **ctx}),
        (5 * TICK, 5, {"count": 1, **ctx}),
        (2.0, 4, {"count": 4, **ctx}),
    ]
    assert_empty(g.clock, g.gate)


def test_empty_key_is_one_state_for_the_rule_across_vms() -> None:
    g = Gate(rule(throttle("once_within", 5.0)))
    reasons = g.feed([env("X", T0, vm="a", seq=1), env("X", T0 + 1, vm="b", seq=2)])
    assert reasons == [None, "throttled (once_within 5s)"]
    assert len(g.gate) == 1


def test_multi_path_key_and_dict_values() -> None:
    dev = CompiledPath("$.data.dev", lambda e: [e["data"]["dev"]])
    g = Gate(rule(throttle("once_within", 5.0, VM_PATH, dev)))
    reasons = g.feed(
        [
            env("X", T0, seq=1, dev={"bus": 1, "slot": [2, 3]}),
            env("X", T0, seq=2, dev={"slot": [2, 3], "bus": 1}),
            env("X", T0, seq=3, dev={"bus": 1, "slot": [2, 4]}),
            env("X", T0, vm="vm2", seq=4, dev={"bus": 1, "slot": [2, 3]}),
        ]
    )
    assert reasons == [None, "throttled (once_within 5s)", None, None]
    assert len(g.gate) == 3


def test_single_path_key_with_dict_values() -> None:
    dev = CompiledPath("$.data.dev", lambda e: [e["data"]["dev"]])
    g = Gate(rule(throttle("once_within", 5.0, dev)))
    reasons = g.feed(
        [
            env("X", T0, seq=1, dev={"bus": 1, "slot": 2}),
            env("X", T0, vm="vm2", seq=2, dev={"slot": 2, "bus": 1}),
        ]
    )
    assert reasons == [None, "throttled (once_within 5s)"]


def test_rule_without_windows_fires_every_event_at_once() -> None:
    g = Gate(rule())
    assert g.feed([env("X", T0, seq=1), env("X", T0, seq=2)]) == [None, None]
    assert g.log() == [(0.0, 1, {"count": 1}), (0.0, 2, {"count": 1})]
    assert_empty(g.clock, g.gate)


# --- RuleGate: thresholds ----------------------------------------------------------------


def threshold(count: int, window: float, *key: CompiledPath) -> Threshold:
    return Threshold(count=count, window=window, key=tuple(key))


def test_threshold_slides_and_events_age_out() -> None:
    g = Gate(rule(threshold=threshold(3, 10.0, VM_PATH)))
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate([0.0, 4.0, 11.0, 13.0])])
    assert reasons == [
        "below threshold (1/3 in 10s)",
        "below threshold (2/3 in 10s)",
        "below threshold (2/3 in 10s)",  # the event at 0 aged out at 10
        None,
    ]
    assert g.log() == [(13.0, 3, {"count": 3, "window": 10.0, "mode": "threshold"})]


def test_threshold_window_is_half_open() -> None:
    g = Gate(rule(threshold=threshold(2, 10.0, VM_PATH)))
    reasons = g.feed([env("X", T0, seq=1), env("X", T0 + 10.0, seq=2)])
    assert reasons == ["below threshold (1/2 in 10s)", "below threshold (1/2 in 10s)"]


def test_threshold_counts_afresh_after_firing() -> None:
    g = Gate(rule(threshold=threshold(2, 10.0, VM_PATH)))
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate(times)])
    below = "below threshold (1/2 in 10s)"
    assert reasons == [below, None, below, None, below]
    assert [(t, seq) for t, seq, _ in g.log()] == [(1.0, 1), (3.0, 3)]
    g.clock.drain()
    assert_empty(g.clock, g.gate)


def test_threshold_keys_count_separately() -> None:
    g = Gate(rule(threshold=threshold(2, 10.0, VM_PATH)))
    reasons = g.feed([env("X", T0, vm="a", seq=1), env("X", T0, vm="b", seq=2)])
    assert reasons == ["below threshold (1/2 in 10s)"] * 2
    assert g.feed([env("X", T0 + 1, vm="b", seq=3)]) == [None]
    assert [f.envelope["vm"] for f in g.fired] == ["b"]


def test_threshold_of_one_fires_every_event() -> None:
    g = Gate(rule(threshold=threshold(1, 10.0, VM_PATH)))
    assert g.feed([env("X", T0, seq=1), env("X", T0, seq=2)]) == [None, None]
    assert len(g.fired) == 2
    assert_empty(g.clock, g.gate)


def test_threshold_runs_before_throttle() -> None:
    g = Gate(rule(throttle("once_within", 60.0, VM_PATH), threshold(2, 10.0, VM_PATH)))
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate([0.0, 1.0, 2.0, 3.0, 61.0])])
    below, dropped = "below threshold (1/2 in 10s)", "throttled (once_within 60s)"
    # 0: below, throttle untouched; 1: passes, fires; 2: below again; 3: passes, throttled;
    # 61: below (the threshold restarted at 3 and 3 aged out at 13).
    assert reasons == [below, None, below, dropped, below]
    ctx = {"count": 2, "window": 60.0, "mode": "once_within", "threshold": 2}
    assert g.log() == [(1.0, 1, {**ctx, "threshold_window": 10.0})]


def test_below_threshold_events_do_not_open_a_throttle_window() -> None:
    g = Gate(rule(throttle("once_within", 60.0, VM_PATH), threshold(3, 10.0, VM_PATH)))
    g.feed([env("X", T0, seq=1)])
    assert len(g.gate) == 1  # the threshold's key only
    g.clock.drain()
    assert_empty(g.clock, g.gate)


def test_threshold_then_once_after_counts_all_passing_events() -> None:
    g = Gate(rule(throttle("once_after", 30.0, VM_PATH), threshold(2, 10.0, VM_PATH)))
    reasons = g.feed([env("X", T0 + t, seq=i) for i, t in enumerate([0.0, 1.0, 2.0, 3.0])])
    assert reasons[3] == "held (once_after 30s, 2 events)"
    g.clock.drain()
    ctx = {"window": 30.0, "mode": "once_after", "threshold": 2, "threshold_window": 10.0}
    assert g.log() == [(31.0, 3, {"count": 4, **ctx})]
    assert_empty(g.clock, g.gate)


# --- drop_vm and memory ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["once_within", "once_after", "qemu"])
def test_gate_drop_vm_forgets_only_that_vm(mode: ThrottleMode) -> None:
    g = Gate(rule(throttle(mode, 5.0, VM_PATH), threshold(2, 10.0, VM_PATH)))
    for vm in ("a", "b"):
        g.feed([env("X", T0 + t, vm=vm, seq=i) for i, t in enumerate([0.0, 1.0, 2.0, 3.0])])
    fired_before = len(g.fired)
    g.gate.drop_vm("a")
    assert len(g.gate) == 2  # b's threshold and throttle states
    g.clock.drain()
    assert {f.envelope["vm"] for f in g.fired[fired_before:]} <= {"b"}
    assert_empty(g.clock, g.gate)
    # a counts from nothing again
    assert g.feed([env("X", g.clock.now(), vm="a", seq=9)]) == ["below threshold (1/2 in 10s)"]


def test_gate_drop_vm_drops_a_held_once_after() -> None:
    g = Gate(rule(throttle("once_after", 5.0, VM_PATH)))
    g.feed([env("X", T0, vm="a", seq=1), env("X", T0, vm="b", seq=2)])
    g.gate.drop_vm("a")
    g.clock.drain()
    assert [(t, seq) for t, seq, _ in g.log()] == [(5.0, 2)]


def test_threshold_memory_with_200k_distinct_keys() -> None:
    g = Gate(rule(threshold=threshold(3, 60.0, data_path("id"))))
    peak = 0
    for i in range(200_000):  # one event every 0.5s: more than a virtual day
        g.feed([env("X", T0 + i * 0.5, seq=i, id=i)])
        peak = max(peak, len(g.gate))
    assert peak == 120  # only the keys of the last 60s are alive
    assert g.fired == []
    g.clock.drain()
    assert_empty(g.clock, g.gate)


def test_threshold_state_freed_when_its_last_event_ages_out() -> None:
    g = Gate(rule(threshold=threshold(5, 10.0, VM_PATH)))
    g.feed([env("X", T0 + t, seq=i) for i, t in enumerate([0.0, 4.0, 8.0])])
    g.clock.advance(T0 + 17.75)
    assert len(g.gate) == 1  # the event at 8 counts until 18
    g.clock.advance(T0 + 18.0)
    assert_empty(g.clock, g.gate)


@pytest.mark.parametrize("mode", ["once_within", "once_after", "qemu"])
def test_throttle_memory_with_many_distinct_keys(mode: ThrottleMode) -> None:
    g = Gate(rule(throttle(mode, 2.0, data_path("id"))))
    peak = 0
    for i in range(20_000):
        g.feed([env("X", T0 + i * 0.5, seq=i, id=i)])
        peak = max(peak, len(g.gate))
    assert peak == 4
    g.clock.drain()
    assert len(g.fired) == 20_000
    assert_empty(g.clock, g.gate)


# --- unreachable_threshold -----------------------------------------------------------------

NODE = data_path("node-name")


def th_rule(
    count: int, window: float, *key: CompiledPath, events: Any = ("QUORUM_REPORT_BAD",)
) -> Rule:
    return rule(threshold=threshold(count, window, *key), events=events)


def test_unreachable_threshold_on_a_keyed_event() -> None:
    r = th_rule(10, 5.0, VM_PATH, NODE)
    assert unreachable_threshold(r, load_catalog()) == (
        "threshold count 10 can never be reached within 5s: QEMU rate-limits QUORUM_REPORT_BAD"
        " to one event per second per node-name (at most 6 in 5s)"
    )
    assert unreachable_threshold(th_rule(6, 5.0, VM_PATH, NODE), load_catalog()) is None


def test_unreachable_threshold_on_a_per_type_event_with_the_default_key() -> None:
    r = th_rule(3, 1.0, VM_PATH, events=("WATCHDOG",))
    assert unreachable_threshold(r, load_catalog()) == (
        "threshold count 3 can never be reached within 1s: QEMU rate-limits WATCHDOG"
        " to one event per second per VM (at most 2 in 1s)"
    )


def test_vm_only_key_is_not_enough_for_a_keyed_event() -> None:
    # Several quorum children can each report once a second on one VM.
    assert unreachable_threshold(th_rule(10, 5.0, VM_PATH), load_catalog()) is None


def test_key_without_vm_or_empty_spans_vms() -> None:
    assert unreachable_threshold(th_rule(10, 5.0, NODE), load_catalog()) is None
    assert unreachable_threshold(th_rule(10, 5.0), load_catalog()) is None


def test_bracket_spelling_of_the_key_path() -> None:
    bracket = CompiledPath("$['data']['node-name']", NODE.find)
    assert unreachable_threshold(th_rule(7, 5.0, VM_PATH, bracket), load_catalog()) is not None


def test_glob_over_several_types_adds_them_up_unless_keyed_by_event() -> None:
    cat = load_catalog()
    assert unreachable_threshold(th_rule(12, 5.0, VM_PATH, NODE, events=("QUORUM_*",)), cat) is None
    assert unreachable_threshold(th_rule(13, 5.0, VM_PATH, NODE, events=("QUORUM_*",)), cat) == (
        "threshold count 13 can never be reached within 5s: QEMU rate-limits each of"
        " QUORUM_FAILURE (per VM), QUORUM_REPORT_BAD (per node-name) to one event per second"
        " (at most 12 in 5s)"
    )
    by_event = th_rule(7, 5.0, VM_PATH, NODE, EVENT_PATH, events=("QUORUM_*",))
    assert unreachable_threshold(by_event, cat) is not None


def test_no_warning_when_a_type_is_not_rate_limited_or_unknown() -> None:
    cat = load_catalog()
    assert (
        unreachable_threshold(th_rule(99, 1.0, VM_PATH, events=("WATCHDOG", "RESET")), cat) is None
    )
    assert unreachable_threshold(th_rule(99, 1.0, VM_PATH, events=("NO_SUCH_*",)), cat) is None
    assert unreachable_threshold(rule(events=("WATCHDOG",)), cat) is None


def test_fractional_window_bound_matches_what_qemu_can_deliver() -> None:
    # A held event keeps its creation time: four timestamps fit into 2.5s.
    s = Stage()
    created = [0.0, TICK, 1.0 + TICK, 2.0 + TICK]
    pending = [env("WATCHDOG", T0 + t, seq=i) for i, t in enumerate(created)]
    s.feed(pending)
    s.clock.drain()
    stamps = [e["received_at"] - T0 for _, e in s.out]
    assert stamps == created
    assert stamps[-1] - stamps[0] < 2.5
    cat = load_catalog()
    assert unreachable_threshold(th_rule(4, 2.5, VM_PATH, events=("WATCHDOG",)), cat) is None
    assert unreachable_threshold(th_rule(5, 2.5, VM_PATH, events=("WATCHDOG",)), cat) == (
        "threshold count 5 can never be reached within 2.5s: QEMU rate-limits WATCHDOG"
        " to one event per second per VM (at most 4 in 2.5s)"
    )


# --- live ----------------------------------------------------------------------------------


def test_live_asyncio_clock_emits_held_event_after_the_window() -> None:
    async def main() -> tuple[list[tuple[float, int]], int, int]:
        clock = AsyncioClock()
        out: list[tuple[float, int]] = []
        second = asyncio.Event()

        def emit(e: Envelope) -> None:
            out.append((clock.now(), e["seq"]))
            if e["seq"] == 2:
                second.set()

        stage = QemuStage(clock, emit, window=0.2, keys={"X": None})
        t0 = clock.now()
        stage.push(env("X", t0, seq=1))
        stage.push(env("X", t0, seq=2))
        await asyncio.wait_for(second.wait(), timeout=5)
        await asyncio.sleep(0.35)  # the window after the held event ends empty
        return [(t - t0, seq) for t, seq in out], len(stage), stage.holds

    out, live, holds = asyncio.run(main())
    assert [seq for _, seq in out] == [1, 2]
    assert out[0][0] < 0.05
    assert 0.15 <= out[1][0] < 0.6
    assert (live, holds) == (0, 1)
