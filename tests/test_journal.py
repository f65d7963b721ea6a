"""The SQLite journal on real files, the ``dlq`` command in a real subprocess, and a journal
that cannot be written."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from reactor.dispatch import journal as journal_module
from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import (
    ActionSpecData,
    Invocation,
    Journal,
    JournalBatch,
    default_state_dir,
    new_id,
)
from reactor.errors import ConfigError, Location, UserError
from reactor.model import ActionSpec, Firing, RetryPolicy, Rule
from reactor.plugins.api import ActionContext, ActionSettings, ActionType

ROOT = Path(__file__).resolve().parents[1]
SPEC = ActionSpecData("webhook", {"url": "https://hooks/{{ vm }}"}, RetryPolicy(attempts=4), 9.5)


def make(n: int = 3, **kw: Any) -> list[Invocation]:
    env = {"event": "GUEST_PANICKED", "data": {"action": "pause"}, "vm": "web1", "seq": 7}
    first = new_id()
    return [
        Invocation(
            id=first if i == 0 else new_id(), firing_id=first, rule="panic", action_index=i,
            spec=SPEC, mode="queued", vm="web1", event="GUEST_PANICKED", seq=7, envelope=env,
            context={"count": 2}, created_at=1700000000.0 + i, **kw,
        )
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    j = Journal(tmp_path / "state" / "journal.sqlite3")
    yield j
    j.close()


def test_rows_round_trip_with_everything_needed_to_run(journal: Journal) -> None:
    invs = make()
    journal.add_many(invs)
    back = journal.pending()
    assert [i.id for i in back] == [i.id for i in invs]
    assert back[0].idempotency_key == invs[0].id
    assert back[1].spec == SPEC
    assert (back[1].envelope, back[1].context) == (invs[1].envelope, {"count": 2})
    assert (back[2].rule, back[2].action_index, back[2].firing_id) == ("panic", 2, invs[0].id)
    assert journal.path.parent.is_dir()
    db = sqlite3.connect(journal.path)
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()
    assert mode == "wal"


def test_state_changes_and_finishing(journal: Journal) -> None:
    invs = make()
    journal.add_many(invs)
    invs[0].status, invs[0].attempts, invs[0].last_error = "running", 2, "boom"
    journal.mark([invs[0]])
    journal.finish([invs[1]], "skipped")
    stored = journal.get(invs[0].id)
    assert stored is not None and (stored.status, stored.attempts, stored.last_error) == (
        "running",
        2,
        "boom",
    )
    assert [i.id for i in journal.pending()] == [invs[0].id, invs[2].id]
    assert journal.count() == 2


def test_rows_done_at_once_are_marked_in_runs_the_rest_one_by_one(journal: Journal) -> None:
    invs = make(8)
    journal.add_many(invs)
    for i, inv in enumerate(invs):
        inv.status, inv.attempts, inv.finished_at = "done", 1, 1700000100.0 + i
    invs[3].status, invs[3].finished_at = "pending", None  # a gap between two runs
    invs[5].attempts, invs[5].last_error = 3, None  # done after retries
    invs[7].status = "cancelled"
    journal.mark(invs[:3] + invs[4:])
    stored = [journal.get(i.id) for i in invs]
    assert [(s.status, s.attempts) for s in stored if s] == [
        ("done", 1), ("done", 1), ("done", 1), ("pending", 0),
        ("done", 1), ("done", 3), ("done", 1), ("cancelled", 1),
    ]  # fmt: skip
    assert [i.id for i in journal.pending()] == [invs[3].id]
    assert stored[5] is not None and stored[5].finished_at == 1700000105.0


def test_prune_forgets_old_finished_rows_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", keep_finished=60)
    invs = make()
    journal.add_many(invs)
    journal.finish(invs[:2])
    now = time.time()
    assert journal.prune(now) == 0
    assert journal.prune(now + 61) == 2
    assert [i.id for i in journal.pending()] == [invs[2].id]
    journal.close()


def test_dead_letters_requeue_and_drop(journal: Journal) -> None:
    invs = make()
    journal.add_many(invs)
    for inv in invs:
        inv.attempts, inv.last_error = 4, "503"
    journal.apply(JournalBatch(dead={i.id: i for i in invs}))
    assert journal.pending() == []
    assert [(d.id, d.status, d.attempts) for d in journal.dead_letters()] == [
        (i.id, "dead", 4) for i in invs
    ]
    assert journal.count(dead=True) == 3

    assert journal.requeue([invs[0].id[:12]]) == [invs[0].id]
    [back] = journal.pending()
    assert (back.id, back.status, back.attempts, back.last_error) == (
        invs[0].id,
        "requeued",
        0,
        "503",
    )
    assert [i.id for i in journal.claim_requeued()] == [invs[0].id]
    assert journal.claim_requeued() == []
    assert journal.pending()[0].status == "pending"

    assert journal.drop([invs[1].id]) == [invs[1].id]
    assert [d.id for d in journal.dead_letters()] == [invs[2].id]


def test_unknown_ids_are_an_error_and_change_nothing(journal: Journal) -> None:
    invs = make(1)
    journal.add_many(invs)
    journal.dead(invs)
    with pytest.raises(UserError, match="'feedface' is not a dead letter"):
        journal.requeue([invs[0].id, "feedface"])
    with pytest.raises(UserError, match="not a dead letter"):
        journal.drop(["0000"])
    assert [d.id for d in journal.dead_letters()] == [invs[0].id]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        Journal(path)


def test_a_journal_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"cannot open the journal .*afile/state/journal"):
        Journal(tmp_path / "afile" / "state" / "journal.sqlite3")
    (tmp_path / "garbage.sqlite3").write_text("not SQLite at all " * 100)
    with pytest.raises(ConfigError, match=r"garbage\.sqlite3: file is not a database"):
        Journal(tmp_path / "garbage.sqlite3")


def test_an_exclusive_journal_keeps_a_second_daemon_out(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    daemon = Journal(path, exclusive=True)
    with pytest.raises(ConfigError, match="in use by another qmp-reactor"):
        Journal(path, exclusive=True)
    Journal(path).close()  # the dlq command may still look
    daemon.close()
    Journal(path, exclusive=True).close()


def test_default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "SYSTEM_STATE_DIR", tmp_path / "lib" / "qmp-reactor")
    assert default_state_dir() == Path(".qmp-reactor")  # /lib does not exist
    (tmp_path / "lib").mkdir()
    assert default_state_dir() == tmp_path / "lib" / "qmp-reactor"
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(journal_module, "SYSTEM_STATE_DIR", tmp_path / "file" / "qmp-reactor")
    assert default_state_dir() == Path(".qmp-reactor")


def test_ids_are_uuid4_hex_and_unique() -> None:
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 32 and i[12] == "4" and i[16] in "89ab" for i in ids)


class Params(BaseModel):
    size: int = 0


def dispatcher(journal: Journal, calls: list[ActionContext], **kw: Any) -> Dispatcher:
    async def record(params: Params, ctx: ActionContext) -> None:
        calls.append(ctx)

    return Dispatcher(
        action_types={"record": ActionType("record", Params, record)},
        settings=ActionSettings(),
        render=lambda inv, atype: Params.model_validate(inv.spec.params),
        journal=journal,
        **kw,
    )


def big_firing(seq: int) -> Firing:
    loc = Location("r.yaml")
    rule = Rule("big", ("X",), (ActionSpec("record", {}, loc),), loc)
    return Firing(rule, {"event": "X", "vm": "vm1", "seq": seq, "data": {"blob": "x" * 2000}}, 0.0)


def test_a_full_journal_keeps_the_work_in_memory_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.sqlite3"
    calls: list[ActionContext] = []

    async def main() -> None:
        journal = Journal(path, max_bytes=32 * 1024)  # the empty journal and a row or two
        d = dispatcher(journal, calls)
        await d.start()
        for seq in range(100):
            d.submit(big_firing(seq))
        while d.healthy:
            await asyncio.sleep(0.01)
        assert d.backlog == 100
        assert calls == []  # nothing runs before its row is written
        journal.set_max_bytes(None)  # space again
        async with asyncio.timeout(10):
            await d.drain()
        assert d.healthy and d.backlog == 0
        await d.shutdown(0)
        journal.close()

    with caplog.at_level(logging.WARNING, logger="reactor.dispatch.groupcommit"):
        asyncio.run(main())
    assert sorted(c.envelope["seq"] for c in calls) == list(range(100))
    failed, recovered = (r.getMessage() for r in caplog.records)
    assert "journal write failed, keeping 100 rows in memory" in failed
    assert "database or disk is full" in failed
    assert recovered == f"journal writable again: {path}"


def dlq(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "reactor", "dlq", *args, "--state-dir", str(state)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_dlq_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    empty = dlq(state, "list")
    assert empty.returncode == 0 and "no dead letters" in empty.stdout
    assert not state.exists()  # listing creates nothing

    journal = Journal(state / "journal.sqlite3")
    invs = make(3, attempts=4, last_error="HTTP 503 from hooks")
    journal.add_many(invs)
    journal.dead(invs)
    journal.close()

    table = dlq(state, "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "DIED", "RULE"]
    assert [line.split()[0] for line in lines[1:]] == [i.id for i in invs]
    assert "HTTP 503 from hooks" in lines[1]

    listed = json.loads(dlq(state, "list", "--json").stdout)
    assert [(d["id"], d["action"], d["attempts"]) for d in listed] == [
        (i.id, "webhook", 4) for i in invs
    ]
    assert listed[0]["params"] == {"url": "https://hooks/{{ vm }}"}

    unknown = dlq(state, "retry", invs[0].id, "deadbeef")
    assert unknown.returncode == 1
    assert "'deadbeef' is not a dead letter" in unknown.stderr

    retried = dlq(state, "retry", invs[0].id)
    assert (retried.returncode, retried.stdout) == (0, f"requeued {invs[0].id}\n")
    dropped = dlq(state, "drop", invs[1].id[:10])
    assert (dropped.returncode, dropped.stdout) == (0, f"dropped {invs[1].id}\n")

    journal = Journal(state / "journal.sqlite3")
    assert [d.id for d in journal.dead_letters()] == [invs[2].id]
    assert [(i.id, i.status, i.attempts) for i in journal.pending()] == [
        (invs[0].id, "requeued", 0)
    ]
    journal.close()


def test_a_running_dispatcher_picks_up_requeued_dead_letters(tmp_path: Path) -> None:
    state = tmp_path / "state"
    calls: list[ActionContext] = []
    journal = Journal(state / "journal.sqlite3")
    invs = make(1)
    invs[0].spec = ActionSpecData("record", {}, RetryPolicy(), 5.0)
    journal.add_many(invs)
    journal.dead(invs)

    async def main() -> None:
        d = dispatcher(journal, calls, poll_interval=0.05)
        await d.start()
        assert calls == [] and d.dead_letters == 1
        result = await asyncio.to_thread(dlq, state, "retry", invs[0].id)
        assert result.returncode == 0, result.stderr
        async with asyncio.timeout(10):
            while not calls:
                await asyncio.sleep(0.01)
            await d.drain()
        assert d.dead_letters == 0
        await d.shutdown(0)

    asyncio.run(main())
    journal.close()
    assert [(c.invocation_id, c.idempotency_key, c.attempt) for c in calls] == [
        (invs[0].id, invs[0].id, 1)
    ]
