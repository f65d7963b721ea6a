"""Upgrades: a new version starts on the old state directory and finishes the old work.

``tests/data/journal-0.1.0.sql`` is a journal as version 0.1.0 left it (written
by that version, then dumped): work pending, an attempt cut off while running,
the second action of a firing whose first one was done, a dead letter, and a
finished row. Whatever version runs these tests must resume it. The handover
test does what a package upgrade does with systemd: the old process gets
SIGTERM while its webhooks are retrying, the new one starts on the same state
directory (not before: the journal's lock refuses a second sidecar), and every
invocation arrives once its receiver is back, under its original key.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.demo.machine import ThrowawayQemu
from reactor.dispatch.journal import Journal
from tests.support.ops import Receiver, Sidecar, webhook_rule, write_rules

FIXTURE = Path(__file__).parent / "data" / "journal-0.1.0.sql"
PENDING = {
    "a0000000000040008000000000000001": {"n": 10, "vm": "vm1"},  # pending
    "b0000000000040008000000000000002": {"n": 20, "vm": "vm1"},  # cut off while running
    "c1000000000040008000000000000004": {"n": 31, "vm": "vm1"},  # after its done sibling
}
DONE = "c0000000000040008000000000000003"
DEAD = "d0000000000040008000000000000005"


def dlq(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", "dlq", *args, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_new_version_resumes_the_journal_an_old_one_left(tmp_path: Path) -> None:
    receiver = Receiver()
    state = tmp_path / "state"
    state.mkdir()
    with contextlib.closing(sqlite3.connect(state / "journal.sqlite3")) as db:
        db.executescript(FIXTURE.read_text().replace("@@PORT@@", str(receiver.port)))
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("other", "RESET", receiver.url))
    try:
        listed = json.loads(dlq(state, "list", "--json").stdout)
        with Sidecar(tmp_path, {"rules": [str(rules)]}) as sidecar:
            sidecar.start().wait_log("resuming 3 unfinished invocations")
            receiver.wait(lambda r: set(r.delivered) == set(PENDING), 20, "the old pending work")
            retried = dlq(state, "retry", DEAD[:8])
            receiver.wait(lambda r: DEAD in r.delivered, 20, "the dead letter, retried")
            samples = sidecar.wait_metric(lambda s: s.value("qmp_reactor_journal_backlog") == 0)
            assert sidecar.stop() == 0
    finally:
        receiver.close()
    bodies = {h["Idempotency-Key"]: json.loads(body) for h, body in receiver.requests}
    assert {key: bodies[key] for key in PENDING} == PENDING  # rendered from the old rows
    assert DONE not in bodies
    assert [d["id"] for d in listed] == [DEAD] and retried.returncode == 0
    assert samples.value("qmp_reactor_dead_letters") == 0
    journal = Journal(state / "journal.sqlite3")
    try:
        assert (journal.pending(), journal.dead_letters()) == ([], [])
    finally:
        journal.close()
    assert "Traceback" not in sidecar.log_text()


@pytest.mark.qemu
def test_handover_on_sigterm_while_retrying_loses_nothing(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.down()
    rules = write_rules(
        tmp_path / "rules.yaml", webhook_rule("stopped", "STOP", receiver.url, mode="parallel")
    )
    try:
        with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
            cfg = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
            old = Sidecar(tmp_path, cfg).start()
            old.wait_log("vm1: connected")
            for _ in range(8):
                q.qmp.execute("stop")
                q.qmp.execute("cont")
            old.wait_metric(lambda s: (s.value("qmp_reactor_action_retries_total",
                                                action="webhook") or 0) >= 8)  # fmt: skip
            (tmp_path / "early").mkdir()
            early = Sidecar(tmp_path / "early", {**cfg, "state_dir": str(tmp_path / "state")})
            assert early.start().proc.wait(30) == 1  # type: ignore[union-attr]
            assert old.stop() == 0  # SIGTERM: retries cut off, the rows stay
            receiver.up()
            new = Sidecar(tmp_path, cfg).start()
            new.wait_log("resuming 8 unfinished invocations")
            receiver.wait(lambda r: len(r.delivered) == 8, 20, "all eight")
            assert new.stop() == 0
    finally:
        receiver.close()
    assert "is in use by another qmp-reactor" in early.log_text()
    assert max(receiver.delivered.values()) == 1
    assert "Traceback" not in old.log_text() + early.log_text()
