"""A stop says what becomes of held events; nothing a window holds vanishes silently.

An event held by QEMU's stage (a burst of a throttled type) or by a rule's
``once_after``/``qemu`` window fires only at the window's end. With the engine's
state kept (the default) a SIGTERM before that keeps it for the next start, and
the log says so; with ``engine_state: false`` the firing is lost, and the log
must name it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reactor.clock import VirtualClock
from reactor.demo.machine import ThrowawayQemu
from reactor.engine.core import Engine, Held
from reactor.model import Firing
from reactor.rules.compiler import load_rules
from reactor.service.logs import DROPPED_SHOWN, log_dropped
from tests.support.sidecar import Sidecar
from tests.test_windows import T0, env

ONCE_AFTER = """\
rules:
  - name: settle
    on: [STOP, BLOCK_IO_ERROR]
    throttle: {mode: once_after, window: 1h}
    actions: [{type: log, with: {message: "settled {{ event }}"}}]
"""


def engine(tmp_path: Path, text: str = ONCE_AFTER) -> tuple[Engine, VirtualClock, list[Firing]]:
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    rules, diags = load_rules([f])
    assert [d for d in diags if d.severity == "error"] == []
    clock = VirtualClock(T0)
    fired: list[Firing] = []
    return Engine(rules, clock, fired.append), clock, fired


def test_engine_lists_what_the_stage_and_the_throttles_hold(tmp_path: Path) -> None:
    eng, clock, fired = engine(tmp_path)
    io = {"device": "d0", "node-name": "n0", "operation": "write", "action": "stop"}
    for e in (
        env("STOP", T0, seq=1, vm="vm1"),
        env("BLOCK_IO_ERROR", T0, seq=3, vm="vm2", **io),
        env("STOP", T0 + 0.1, seq=2, vm="vm1"),
        env("BLOCK_IO_ERROR", T0 + 0.2, seq=4, vm="vm2", **io),  # QEMU's stage holds this one
    ):
        clock.advance(e["received_at"])
        eng.feed(e)
    held = eng.held()
    assert fired == []
    assert [(h.rule, h.envelope["seq"], h.events) for h in held] == [
        (None, 4, 1),
        ("settle", 2, 2),
        ("settle", 3, 1),
    ]


def test_log_dropped_names_the_first_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    held = [Held("r", env("STOP", T0, seq=i, vm=f"vm{i}"), 1) for i in range(DROPPED_SHOWN + 5)]
    with caplog.at_level(logging.WARNING, logger="reactor.engine"):
        log_dropped(held, "stopping")
        log_dropped([], "stopping")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        f"stopping: {DROPPED_SHOWN + 5} held event(s) dropped before their window ended;"
        " they will not fire"
    )
    assert lines[1] == "stopping: dropped STOP on vm0 (seq 0, 1 event(s)) held by rule r's throttle"
    assert len(lines) == DROPPED_SHOWN + 2
    assert lines[-1] == "stopping: and 5 more held events dropped"


@pytest.mark.qemu
@pytest.mark.parametrize("keep", [True, False], ids=["engine-state", "in-memory"])
def test_sigterm_inside_a_once_after_window_says_what_becomes_of_the_held_event(
    tmp_path: Path, keep: bool
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONCE_AFTER)
    config = tmp_path / "config.yaml"
    config.write_text(f"engine_state: {str(keep).lower()}\n")
    qemu = ThrowawayQemu(name="vm1", extra_qmp=["vm1"], extra_args=["-machine", "none"])
    sidecar = Sidecar(
        tmp_path, [qemu.qmp_socket("vm1")], [rules], extra_args=["--config", str(config)]
    )
    with qemu, sidecar:
        sidecar.wait_message("vm1: connected to")
        qemu.qmp.execute("stop")
        sidecar.wait_message("vm1 STOP seq=")
        assert sidecar.stop() == 0
    messages = [r.get("message", "") for r in sidecar.records()]
    assert sidecar.audit("settle") == []
    if keep:  # it fires after the next start (tests/test_durable_state.py)
        state = tmp_path / "state" / "engine-state.sqlite3"
        said = f"stopping: 1 held event(s) kept in {state}; they fire when their window ends"
        assert any(m.startswith(said) for m in messages), sidecar.log_text()
        assert not [m for m in messages if "dropped" in m]
        return
    assert "stopping: 1 held event(s) dropped before their window ended; they will not fire" in (
        messages
    ), sidecar.log_text()
    [line] = [m for m in messages if m.startswith("stopping: dropped STOP on vm1")]
    assert line.endswith("held by rule settle's throttle")
