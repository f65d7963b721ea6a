"""Faults at the level of the whole sidecar: ``qmp-reactor run`` as a process, real QEMU.

Each test starts the real sidecar (``tests/support/ops.py``) against a real
QEMU or the fake QMP peer, sends its webhooks to a real receiver on loopback
that counts by ``Idempotency-Key``, reads ``/metrics`` and ``/healthz`` over
HTTP, and breaks something: the sidecar (kill -9), the receiver (down for a
while), the state directory (full, read-only), QEMU (killed, its socket
deleted), or the QMP stream (garbage, a 100 MB line, absurd timestamps).

``QMP_REACTOR_OUTAGE`` sets the receiver outage in seconds (8 by default, for
CI; ``QMP_REACTOR_OUTAGE=60`` is the documented minute-long run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor.demo.machine import ThrowawayQemu
from tests import fakeqmp
from tests.support.ops import Receiver, Sidecar, webhook_rule, write_rules

OUTAGE = float(os.environ.get("QMP_REACTOR_OUTAGE", "8"))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def stop_cont(q: ThrowawayQemu, times: int) -> None:
    """``times`` STOP events (each followed by a RESUME)."""
    for _ in range(times):
        q.qmp.execute("stop")
        q.qmp.execute("cont")


def config(rules: Path, **extra: object) -> dict[str, object]:
    return {"rules": [str(rules)], **extra}


# -- kill -9 ----------------------------------------------------------------------------


@pytest.mark.qemu
def test_kill_9_of_the_sidecar_while_its_webhooks_retry_loses_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    stops = 12
    receiver.fail_first = 6  # every key is still retrying when the sidecar dies
    rules = write_rules(
        tmp_path / "rules.yaml", webhook_rule("stopped", "STOP", receiver.url, mode="parallel")
    )
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = config(rules, qmp=[str(q.qmp_socket("vm1"))])
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            stop_cont(q, stops)
            receiver.wait(lambda r: len(r.attempts) == stops, 20, "first attempt of every key")
            with receiver.lock:
                assert not receiver.delivered
            sidecar.kill9()
            keys = set(receiver.attempts)

            sidecar.start()
            sidecar.wait_log("resuming 12 unfinished invocations")
            receiver.wait(lambda r: set(r.delivered) == keys, 30, "every key delivered")
            samples = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_journal_backlog") == 0, what="an empty backlog"
            )
            assert sidecar.stop() == 0
    assert set(receiver.attempts) == keys  # the same keys after the restart, none new
    assert samples.value("qmp_reactor_actions_total", action="webhook", outcome="ok") == stops
    assert (samples.value("qmp_reactor_action_retries_total", action="webhook") or 0) > 0
    assert samples.value("qmp_reactor_dead_letters") == 0
    assert "Traceback" not in sidecar.log_text()


# -- the receiver down ------------------------------------------------------------------


@pytest.mark.qemu
def test_receiver_down_while_events_keep_coming(tmp_path: Path, receiver: Receiver) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        webhook_rule("stopped", "STOP", receiver.url, action={"retry": {
            "attempts": 1000, "initial": 0.1, "max": 1.0, "jitter": 0.1}}),
    )  # fmt: skip
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = config(rules, qmp=[str(q.qmp_socket("vm1"))])
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            stop_cont(q, 1)
            receiver.wait(lambda r: len(r.delivered) == 1, 10, "the first delivery")
            rss_before = sidecar.rss_kib()

            receiver.down()
            stops, backlogs, end = 0, [], time.monotonic() + OUTAGE
            while time.monotonic() < end:
                stop_cont(q, 10)
                stops += 10
                backlogs.append(sidecar.scrape().value("qmp_reactor_journal_backlog"))
                time.sleep(0.04)
            during = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_journal_backlog") == stops, what="full backlog"
            )
            status, health = sidecar.healthz()
            rss_during = sidecar.rss_kib()

            receiver.up()
            receiver.wait(lambda r: len(r.delivered) == stops + 1, 60, "every event delivered")
            after = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_journal_backlog") == 0, what="an empty backlog"
            )
            assert sidecar.stop() == 0
    assert stops >= 100
    assert backlogs == sorted(backlogs) and backlogs[-1] > 0  # visible and growing
    assert (during.value("qmp_reactor_action_retries_total", action="webhook") or 0) > 0
    assert status == 200 and health["backlog"] == stops  # the journal is fine: healthy
    assert rss_during - rss_before < 64 * 1024, (rss_before, rss_during)
    assert after.value("qmp_reactor_actions_total", action="webhook", outcome="ok") == stops + 1
    assert after.value("qmp_reactor_events_total", vm="vm1", event="STOP") == stops + 1
    assert max(receiver.delivered.values()) == 1  # no duplicates either, this time


# -- the state directory full or read-only ---------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (the tests run as root, as CI does)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only onto itself: even root cannot write there."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until the file system is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.qemu
def test_disk_full_makes_health_fail_and_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("stopped", "STOP", receiver.url))
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q, tmpfs(tmp_path / "state", "2m") as st:
        cfg = config(rules, qmp=[str(q.qmp_socket("vm1"))], state_dir=str(st))
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            stop_cont(q, 1)
            receiver.wait(lambda r: len(r.delivered) == 1, 10, "the first delivery")
            assert sidecar.healthz()[0] == 200

            filler = fill(st)
            stop_cont(q, 30)
            sidecar.wait_log(r"journal write failed, keeping \d+ rows in memory")
            failing = sidecar.wait_metric(
                lambda s: s.value("qmp_reactor_journal_healthy") == 0, what="an unhealthy journal"
            )
            status, health = sidecar.healthz()
            time.sleep(1.0)  # the journal keeps failing; the sidecar keeps running
            assert sidecar.proc is not None and sidecar.proc.poll() is None
            assert len(receiver.keys_delivered()) == 1  # nothing runs before it is on disk

            filler.unlink()
            receiver.wait(lambda r: len(r.delivered) == 31, 30, "every event delivered")
            sidecar.wait_log("journal writable again")
            sidecar.wait_metric(lambda s: s.value("qmp_reactor_journal_backlog") == 0)
            healthy = sidecar.healthz()
            assert sidecar.stop() == 0
    assert (status, health["journal_healthy"], health["status"]) == (503, False, "unhealthy")
    assert "the journal cannot be written" in health["problems"][0]
    assert failing.value("qmp_reactor_journal_backlog") == 30
    assert healthy[0] == 200 and healthy[1]["backlog"] == 0
    log = sidecar.log_text()
    assert "database or disk is full" in log and "Traceback" not in log


def test_no_room_for_the_journal_at_start_is_one_clear_error(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("s", "STOP", "http://127.0.0.1:9/"))
    with tmpfs(tmp_path / "state", "64k") as st:
        fill(st)
        with Sidecar(tmp_path, config(rules, state_dir=str(st))) as sidecar:
            status = sidecar.start().proc.wait(20)  # type: ignore[union-attr]
    last = sidecar.log_text().strip().splitlines()[-1]
    assert status == 1
    assert last.startswith(f"qmp-reactor: error: cannot open the journal {st}/journal.sqlite3")
    assert "Traceback" not in sidecar.log_text()


def test_read_only_or_impossible_state_dir_is_one_clear_error(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("s", "STOP", "http://127.0.0.1:9/"))
    (tmp_path / "a-file").write_text("")
    state = tmp_path / "ro"
    state.mkdir()
    results = []
    for n, where in enumerate((state, tmp_path / "a-file" / "state")):
        work = tmp_path / f"run{n}"
        work.mkdir()
        with contextlib.ExitStack() as stack:
            if where == state:
                stack.enter_context(read_only(state))
            sidecar = stack.enter_context(Sidecar(work, config(rules, state_dir=str(where))))
            status = sidecar.start().proc.wait(20)  # type: ignore[union-attr]
        results.append((status, sidecar.log_text().strip().splitlines()[-1]))
        assert "Traceback" not in sidecar.log_text()
    assert results[0][0] == results[1][0] == 1
    assert results[0][1].startswith(f"qmp-reactor: error: cannot open the journal {state}/")
    assert "Read-only file system" in results[0][1]
    assert results[1][1].startswith("qmp-reactor: error: state directory")
    assert "Not a directory" in results[1][1]


@pytest.mark.qemu
def test_a_journal_that_turned_read_only_keeps_its_work_until_it_is_writable(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A restart loop on a read-only state directory fails cleanly and loses nothing."""
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("stopped", "STOP", receiver.url))
    receiver.down()
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = config(rules, qmp=[str(q.qmp_socket("vm1"))])
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            stop_cont(q, 5)
            sidecar.wait_metric(lambda s: s.value("qmp_reactor_journal_backlog") == 5)
            assert sidecar.stop() == 0  # the five stay in the journal, unfinished
            with read_only(tmp_path / "state"):
                for _ in range(3):  # what Restart=on-failure would do
                    assert sidecar.start().proc.wait(20) == 1  # type: ignore[union-attr]
                    assert "Read-only file system" in sidecar.log_text(all_runs=False)
            receiver.up()
            sidecar.start().wait_log("resuming 5 unfinished invocations")
            receiver.wait(lambda r: len(r.delivered) == 5, 20, "the five delivered")
            assert sidecar.stop() == 0
    assert "Traceback" not in sidecar.log_text()


# -- QEMU killed, its socket deleted and re-created -------------------------------------


@pytest.mark.qemu
def test_qemu_killed_and_its_socket_deleted_and_recreated(
    tmp_path: Path, receiver: Receiver
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("stopped", "STOP", receiver.url))
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = config(rules, qmp_glob=[str(q.dir / "vm*.qmp")])
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start()

            def connected(value: float | None) -> bool:
                got = sidecar.scrape().value("qmp_reactor_vm_connected", vm="vm1")
                return got == value

            sidecar.wait_metric(lambda s: s.value("qmp_reactor_vm_connected", vm="vm1") == 1)
            q.kill()
            q.wait()
            down = sidecar.wait_metric(lambda s: s.value("qmp_reactor_vm_connected", vm="vm1") == 0)
            status, health = sidecar.healthz()
            q.qmp_socket("vm1").unlink()
            gone = sidecar.wait_metric(lambda s: not s.series("qmp_reactor_vm_connected"))
            q.restart()
            sidecar.wait_metric(lambda s: s.value("qmp_reactor_vm_connected", vm="vm1") == 1)
            stop_cont(q, 1)
            receiver.wait(lambda r: len(r.delivered) == 1, 20, "a webhook after the restart")
            assert connected(1.0)
            assert sidecar.healthz()[1]["vms_connected"] == 1
            assert sidecar.stop() == 0
    key = ("qmp_reactor_events_total", frozenset({("vm", "vm1"), ("event", "REACTOR_CONNECTED")}))
    assert down[key] == 1 and gone[key] == 1  # counts outlive the connection
    assert (status, health["vms"], health["vms_connected"]) == (200, 1, 0)
    assert "Traceback" not in sidecar.log_text()


# -- a hostile QMP peer -----------------------------------------------------------------


class PeerThread:
    """``tests/fakeqmp.FakeQmp`` served from its own event loop in a thread."""

    def __init__(self, path: Path, *behaviours: fakeqmp.Behaviour) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake = fakeqmp.FakeQmp(path, *behaviours)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> fakeqmp.FakeQmp:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


STAMPS: list[object] = [
    {"seconds": 0, "microseconds": 0},
    {"seconds": 253402300799, "microseconds": 999999},  # 9999-12-31
    {"seconds": 2**62, "microseconds": 0},
    {"seconds": -1, "microseconds": -1},
    "yesterday",
    None,
]


async def absurd_clock(peer: fakeqmp.Peer) -> None:
    """A peer whose event timestamps are far in the future, the past, or nonsense."""
    await peer.handshake()
    await peer.answer_intro()
    for stamp in STAMPS:
        await peer.send({"event": "RESET", "data": {"guest": True}, "timestamp": stamp})
    rtc = {"offset": 1, "qom-path": "/machine/unattached/device[0]"}
    for _ in range(5):  # QEMU rate-limits RTC_CHANGE: one now, the last a second later
        await peer.send_event("RTC_CHANGE", rtc)
    await peer.serve_commands()


def test_garbage_a_100_mb_line_and_absurd_timestamps_from_a_peer(
    tmp_path: Path, receiver: Receiver
) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        webhook_rule("resets", "RESET", receiver.url, threshold={"count": 3, "window": "30s"}),
        webhook_rule("rtc", "RTC_CHANGE", receiver.url),
    )
    sock = tmp_path / "peer.qmp"
    behaviours = (fakeqmp.garbage, fakeqmp.huge_line(), absurd_clock)
    with (
        PeerThread(sock, *behaviours) as fake,
        Sidecar(tmp_path, config(rules, qmp=[str(sock)])) as sidecar,
    ):
        sidecar.start()
        receiver.wait(lambda r: len(r.delivered) == 4, 30, "2 resets and 2 RTC changes")
        samples = sidecar.wait_metric(
            lambda s: s.value("qmp_reactor_qemu_stage_holds_total") == 4, what="4 holds"
        )
        peak = sidecar.rss_kib("VmHWM")
        alive = sidecar.proc is not None and sidecar.proc.poll() is None
        assert sidecar.stop() == 0
    assert alive and fake.accepted == 3  # disconnected after each bad line, then back
    assert samples.value("qmp_reactor_qemu_stage_replaced_total") == 3
    assert samples.value("qmp_reactor_vm_connected", vm="peer") == 1
    assert samples.value("qmp_reactor_events_total", vm="peer", event="RESET") == 6
    assert samples.value("qmp_reactor_events_total", vm="peer", event="REACTOR_CONNECTED") == 3
    bodies = [json.loads(body) for _, body in receiver.requests]
    resets = [b for b in bodies if b["rule"] == "resets"]
    assert [b["event"]["timestamp"] for b in resets] == [STAMPS[2], STAMPS[5]]  # untouched
    assert peak < 128 * 1024, peak  # ~60 MiB: the 100 MiB line was never held
    log = sidecar.log_text()
    assert "not JSON" in log and "longer than 1048576 bytes" in log
    assert "Traceback" not in log


# -- time: timestamps far off, the wall clock jumping -------------------------------------

TIME_RULES = """\
rules:
  - name: twice
    on: RESET
    threshold: {count: 2, window: 0.4s}
    actions: [{type: log}]
  - name: once
    on: STOP
    throttle: {mode: once_within, window: 0.4s}
    actions: [{type: log}]
"""


def test_windows_live_on_the_monotonic_clock_while_the_wall_clock_jumps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reactor.clock import AsyncioClock
    from reactor.engine.core import Engine
    from reactor.rules.compiler import require_rules

    (tmp_path / "rules.yaml").write_text(TIME_RULES)
    rules, _ = require_rules([tmp_path / "rules.yaml"])
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    fired: list[tuple[str, int]] = []

    def env(event: str, seq: int) -> dict[str, object]:
        return {"event": event, "data": {}, "vm": "vm1", "seq": seq, "received_at": wall[0]}

    async def scenario() -> None:
        engine = Engine(
            rules, AsyncioClock(), lambda f: fired.append((f.rule.name, f.envelope["seq"]))
        )
        engine.feed(env("RESET", 1))
        wall[0] -= 86400  # a day back
        await asyncio.sleep(0.05)
        engine.feed(env("RESET", 2))  # 0.05 s after the first: the threshold is reached
        engine.feed(env("STOP", 3))
        wall[0] += 2 * 86400  # a day ahead
        await asyncio.sleep(0.05)
        engine.feed(env("STOP", 4))  # still inside the throttle's 0.4 s
        wall[0] -= 3 * 86400
        await asyncio.sleep(0.45)
        engine.feed(env("STOP", 5))  # the window ended 0.4 s after seq 3, whatever the wall says
        await asyncio.sleep(0.45)  # let every window end

    asyncio.run(scenario())
    assert fired == [("twice", 2), ("once", 3), ("once", 5)]


def test_replay_with_timestamps_far_in_the_future_and_the_past(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reactor.cli import main

    (tmp_path / "rules.yaml").write_text(TIME_RULES.replace("0.4s", "30s"))
    base = 1_700_000_000
    stamps = [base, base + 1, 253402300799, base + 2, 0, 2**62, 2**63 - 1, -5]
    lines = [
        json.dumps({"event": "RESET", "timestamp": {"seconds": s, "microseconds": 0}})
        for s in stamps
    ]
    (tmp_path / "vm1.jsonl").write_text("\n".join(lines) + "\n")
    status = main(["replay", str(tmp_path / "vm1.jsonl"), "--rules", str(tmp_path / "rules.yaml"),
                   "--plugin-dir", str(tmp_path / "none")])  # fmt: skip
    out, err = capsys.readouterr()
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    # 1+2 fire. 3 (year 9999) opens a window that 4 completes: stamped earlier, it counts
    # as 9999 too (the virtual clock never goes back). 5 (epoch) opens one; the jumps to
    # 2**62 and 2**63-1 end it and each other's, so 6 and 7 fire nothing.
    assert seqs == [2, 4]
    assert status == 1  # the negative timestamp, reported with its line
    problem = "error: missing or invalid 'timestamp' {seconds, microseconds}"
    assert err.strip().splitlines() == [f"{tmp_path / 'vm1.jsonl'}:8: {problem}"]
