"""Hostile and unlucky peers against the journal: its write path is total.

* A QMP peer sends strings SQLite cannot encode (lone UTF-16 surrogates: QEMU's
  JSON parser and Python's ``json`` accept ``"\\ud800"``) as an event name, in
  event data and in an error reply. The strings are escaped before they reach
  SQLite; the other VM's actions still run, ``/healthz`` stays 200, SIGTERM
  saves everything.
* A row that still cannot be written (here a number SQLite cannot hold) is
  quarantined as a dead letter with the reason, in the same transaction as the
  rows beside it, which run; it is never retried with them.
* An emptied journal (0 bytes where 200 invocations were) or a damaged page is
  refused with one line that says how to start over on purpose; a row that
  cannot be read is quarantined at start and the others run.
* A secret with quotes and backslashes that a receiver echoes back JSON-escaped
  (and URL-encoded) is masked in the log, ``dlq list`` and the journal.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from reactor.dispatch.journal import ActionSpecData, Invocation, Journal, new_id
from reactor.model import RetryPolicy
from reactor.plugins.api import ActionContext
from tests import fakeqmp
from tests.support.ops import Receiver, Sidecar, webhook_rule, write_rules
from tests.test_faults import PeerThread
from tests.test_journal import big_firing, dispatcher, make


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *argv], capture_output=True, text=True, timeout=60
    )


def dlq(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("dlq", *args, "--state-dir", str(state))


EVIL = "EVIL\ud800"
REFUSAL = "reset refused \udc80"
EVIL_NAME = "vm\ud800"


async def evil_event(peer: fakeqmp.Peer) -> None:
    """A peer whose event name and data hold lone surrogates, then it refuses a reset."""
    await peer.handshake()
    await peer.answer_intro()
    await peer.send_event(EVIL, {"note": "x\udfff", "k\udc00": 1})
    await peer.send_event("SUSPEND")
    while (command := await peer.read_command()) is not None:
        if command.get("execute") == "system_reset":
            error = {"class": "GenericError", "desc": REFUSAL}
            await peer.send({"error": error, "id": command.get("id")})
        elif not await peer.answer(command):
            return


def good_vm(go: threading.Event) -> fakeqmp.Behaviour:
    """A well-behaved peer that sends STOP once the test says so."""

    async def behave(peer: fakeqmp.Peer) -> None:
        await peer.handshake()
        await peer.answer_intro()
        await asyncio.to_thread(go.wait, 60)
        await peer.send_event("STOP")
        await peer.serve_commands()

    return behave


class EvilClient:
    """A QEMU that connects to the sidecar's listener and calls itself ``vm\\ud800``.

    The sidecar refuses that name (it cannot name a VM) and hangs up: the client
    then simply ends.
    """

    def __init__(self, listen: Path) -> None:
        self.listen = listen
        self.thread = threading.Thread(target=asyncio.run, args=(self.main(),), daemon=True)
        self.done = threading.Event()

    async def main(self) -> None:
        while not self.listen.exists() and not self.done.is_set():
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_unix_connection(str(self.listen))
        peer = fakeqmp.Peer(reader, writer)
        peer.name = EVIL_NAME
        try:
            await peer.handshake()
            await peer.answer_intro()
            await peer.send_event("RESUME")
            while not self.done.is_set() and (command := await peer.read_command()):
                await peer.answer(command)
        except (AssertionError, ConnectionError, asyncio.IncompleteReadError):
            pass  # refused: the sidecar hung up
        finally:
            writer.close()

    def __enter__(self) -> EvilClient:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(30)


def rules(url: str) -> dict[str, Any]:
    once = {"attempts": 1}
    status = {"type": "qmp", "with": {"command": "query-status"}, "retry": once}
    return {
        "rules": [
            {"name": "all", "on": "*", "when": {"path": "$.vm", "not_equals": "good"},
             "actions": [status]},
            {"name": "reset", "on": "SUSPEND", "actions": [
                {"type": "qmp", "with": {"command": "system_reset"}, "retry": once}]},
            {"name": "good", "on": "STOP", "actions": [
                {"type": "webhook", "with": {"url": url}, "retry": once}]},
        ]
    }  # fmt: skip


def test_unencodable_strings_from_peers_stop_no_one(tmp_path: Path) -> None:
    receiver = Receiver()
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump(rules(receiver.url)))
    go = threading.Event()
    evil, good, listen = tmp_path / "evil.qmp", tmp_path / "good.qmp", tmp_path / "in.sock"
    config = {"rules": [str(rule_file)], "qmp": [str(evil), str(good)], "listen": str(listen)}
    try:
        with (
            PeerThread(evil, evil_event),
            PeerThread(good, good_vm(go)),
            Sidecar(tmp_path, config) as car,
            EvilClient(listen),
        ):
            car.start()
            car.wait_log("good: connected")
            # The reset's refusal comes after the evil event: its dead letter says both passed.
            car.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1, 30)
            # A peer naming itself with text that cannot name a VM is refused, not fatal.
            car.wait_log(r"refused .*: query-name gave .* cannot name a VM", 30)
            go.set()
            receiver.wait(lambda r: len(r.delivered) == 1, 30, "the good VM's STOP")
            status, health = car.healthz()
            samples = car.wait_metric(lambda s: s.value("qmp_reactor_journal_backlog") == 0, 30)
            assert car.stop() == 0
        listed = dlq(tmp_path / "state", "list", "--json")
    finally:
        receiver.close()
    assert status == 200, health
    log = car.log_text()
    assert "not saved" not in log and "Traceback" not in log
    assert samples.value("qmp_reactor_dead_letters") == 1
    assert samples.value("qmp_reactor_events_total", vm="evil", event="EVIL\\ud800") == 1
    (body,) = [json.loads(body) for _, body in receiver.requests]
    assert (body["event"]["vm"], body["event"]["event"]) == ("good", "STOP")
    (dead,) = json.loads(listed.stdout)
    assert dead["rule"] == "reset" and dead["last_error"].endswith("reset refused \\udc80")


def test_a_row_that_cannot_be_written_is_quarantined_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    calls: list[ActionContext] = []

    async def main() -> None:
        journal = Journal(path)
        d = dispatcher(journal, calls)
        await d.start()
        bad = big_firing(2**70)  # beyond SQLite's 64-bit integers
        for firing in (big_firing(1), bad, big_firing(2)):
            d.submit(firing)
        async with asyncio.timeout(30):
            await d.drain()
        assert d.healthy and d.backlog == 0 and d.dead_letters == 1
        await d.shutdown(0)
        journal.close()

    asyncio.run(main())
    assert sorted(c.envelope["seq"] for c in calls) == [1, 2]
    journal = Journal(path)
    try:
        (dead,) = journal.dead_letters()
        assert journal.pending() == []
    finally:
        journal.close()
    assert dead.last_error is not None and dead.last_error.startswith("quarantined: ")
    assert "OverflowError" in dead.last_error and dead.seq is None
    assert dead.envelope["seq"] == 2**70 and dead.rule == "big"  # the rest kept as it was


def journal_with(state: Path, invs: list[Invocation]) -> Path:
    path = state / "journal.sqlite3"
    journal = Journal(path)
    journal.add_many(invs)
    journal.close()
    return path


def refusal(tmp_path: Path) -> list[str]:
    """The errors of ``run`` and ``dlq list`` on the state directory, each one line."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    state = str(tmp_path / "state")
    run = cli("run", "--rules", str(rules), "--state-dir", state, "--plugin-dir", state)
    listed = cli("dlq", "list", "--state-dir", state)
    assert (run.returncode, listed.returncode) == (1, 1), run.stderr + listed.stderr
    errors = [line for line in (run.stderr + listed.stderr).splitlines() if "error" in line]
    assert "Traceback" not in run.stderr + listed.stderr and len(errors) == 2
    return errors


def test_an_emptied_journal_is_refused_not_started_fresh(tmp_path: Path) -> None:
    path = journal_with(tmp_path / "state", make(200))
    path.write_bytes(b"")
    for line in refusal(tmp_path):
        assert f"the journal {path} is empty" in line
        assert f"to start over on purpose, move it away (mv {path} {path}.broken)" in line
    assert path.stat().st_size == 0  # left for the operator to look at, not made anew
    path.rename(f"{path}.broken")  # the documented way to start over
    journal = Journal(path)
    assert journal.pending() == []
    journal.close()


def test_a_damaged_page_is_refused_with_one_line(tmp_path: Path) -> None:
    path = journal_with(tmp_path / "state", make(200))
    with path.open("r+b") as f:  # a page of the rows, overwritten
        f.seek(4096 * 9 + 8)
        f.write(bytes(range(256)) * 8)
    for line in refusal(tmp_path):
        assert f"the journal {path} is damaged: On tree page 10" in line
        assert f"(mv {path} {path}.broken)" in line


def webhooks(url: str, count: int) -> list[Invocation]:
    spec = ActionSpecData("webhook", {"url": url}, RetryPolicy(attempts=1), 10.0)
    invs = []
    for seq in range(1, count + 1):
        env = {"event": "STOP", "vm": "vm1", "seq": seq, "data": {}}
        inv_id = new_id()
        invs.append(Invocation(id=inv_id, firing_id=inv_id, rule="hook", action_index=0,
                               spec=spec, mode="parallel", vm="vm1", event="STOP", seq=seq,
                               envelope=env, context={}, created_at=1.0))  # fmt: skip
    return invs


def test_unreadable_rows_are_quarantined_and_the_others_run(tmp_path: Path) -> None:
    receiver = Receiver()
    invs = webhooks(receiver.url, 5)
    path = journal_with(tmp_path / "state", invs)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE invocations SET envelope = '{not json' WHERE id = ?", (invs[1].id,))
        db.execute("UPDATE invocations SET retry = '[]' WHERE id = ?", (invs[2].id,))
        db.execute("UPDATE invocations SET vm = CAST(x'ff' AS TEXT) WHERE id = ?", (invs[3].id,))
    db.close()
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("hook", "STOP", receiver.url))
    try:
        with Sidecar(tmp_path, {"rules": [str(rules)]}) as car:
            car.start().wait_log("resuming 3 unfinished invocations")
            receiver.wait(lambda r: len(r.delivered) == 3, 30, "the readable rows")
            status, _ = car.healthz()
            assert car.stop() == 0
        listed = dlq(tmp_path / "state", "list", "--json")
    finally:
        receiver.close()
    assert receiver.keys_delivered() == {invs[0].id, invs[3].id, invs[4].id}
    assert status == 200 and "Traceback" not in car.log_text()
    dead = {d["id"]: d for d in json.loads(listed.stdout)}
    assert set(dead) == {invs[1].id, invs[2].id}
    assert dead[invs[1].id]["last_error"].startswith("quarantined: unreadable row: JSONDecode")
    assert dead[invs[2].id]["last_error"].startswith("quarantined: unreadable row: TypeError")
    assert "cannot be read, moved to the dead letters" in car.log_text()


TOKEN = 'Tk"q8\\Zr2/Vt 5<Wx>1'


def echo_escaped(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """400 with a JSON body that repeats the credentials (JSON-escaped) and the URL as sent."""
    return 400, json.dumps(
        {"error": "refused", "auth": headers["Authorization"], "url": path}
    ).encode()


async def one_stop(peer: fakeqmp.Peer) -> None:
    await peer.handshake()
    await peer.answer_intro()
    await peer.send_event("STOP")
    await peer.serve_commands()


def test_a_secret_echoed_back_escaped_is_masked(tmp_path: Path) -> None:
    receiver = Receiver(answer=echo_escaped)
    url = receiver.url + "?token=${env:TOKEN}"
    hook = webhook_rule("hook", "STOP", url, action={"retry": {"attempts": 1}})
    hook["actions"][0]["with"]["headers"] = {"Authorization": "Bearer ${env:TOKEN}"}
    rules = write_rules(tmp_path / "rules.yaml", hook)
    sock = tmp_path / "vm1.qmp"
    config = {"rules": [str(rules)], "qmp": [str(sock)]}
    try:
        with PeerThread(sock, one_stop), Sidecar(tmp_path, config, env={"TOKEN": TOKEN}) as car:
            car.start()
            car.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1, 30)
            assert car.stop() == 0
    finally:
        receiver.close()
    state = tmp_path / "state"
    outputs = {"log": car.log_text()}
    outputs["dlq list"] = dlq(state, "list").stdout
    outputs["dlq list --json"] = dlq(state, "list", "--json").stdout
    outputs.update({f.name: f.read_bytes().decode("latin-1") for f in state.iterdir()})
    ((headers, _),) = receiver.requests
    assert headers["Authorization"] == f"Bearer {TOKEN}"  # the receiver got the real one
    forms = {TOKEN, json.dumps(TOKEN)[1:-1], urllib.parse.quote(TOKEN, safe="/")}
    assert {name: [f for f in forms if f in text] for name, text in outputs.items()} == {
        name: [] for name in outputs
    }
    (dead,) = json.loads(outputs["dlq list --json"])
    assert (
        dead["last_error"].startswith("webhook POST")
        and '"auth": "Bearer ***"' in dead["last_error"]
    )
