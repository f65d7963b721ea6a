"""A kill -9 loses nothing: a real daemon-like process is killed twice mid-retry.

A driver script (written into tmp_path) submits invocations whose action POSTs
to a real HTTP server on 127.0.0.1 in this process; the server answers 503 to
the first attempts of every idempotency key. The driver is SIGKILLed while the
retries are going, started again on the same state directory (killed once
more), and finally left to finish. Every invocation must be delivered, counted
by idempotency key: none lost, no new keys, duplicates allowed but visible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reactor.dispatch.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
FAILURES = 3  # 503s per key before a 200
INVOCATIONS = 30

DRIVER = """
import asyncio, sys
from pathlib import Path

import httpx
from pydantic import BaseModel

from reactor.plugins.api import ActionContext, ActionSettings, ActionType
from reactor.dispatch.dispatcher import Dispatcher
from reactor.errors import Location, TransientActionError
from reactor.dispatch.journal import Journal
from reactor.model import ActionSpec, Firing, RetryPolicy, Rule

state, url, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])


class Post(BaseModel):
    url: str


CLIENT = []


async def post(params: Post, ctx: ActionContext) -> None:
    if not CLIENT:
        CLIENT.append(httpx.AsyncClient())
    headers = {"Idempotency-Key": ctx.idempotency_key}
    try:
        response = await CLIENT[0].post(params.url, headers=headers, json={"attempt": ctx.attempt})
    except httpx.HTTPError as err:
        raise TransientActionError(repr(err)) from err
    if response.status_code >= 500:
        raise TransientActionError(f"HTTP {response.status_code}")


async def main() -> None:
    journal = Journal(state / "journal.sqlite3", exclusive=True)  # the lock dies with us
    dispatcher = Dispatcher(
        action_types={"post": ActionType("post", Post, post)},
        settings=ActionSettings(),
        render=lambda inv, atype: Post.model_validate(inv.spec.params),
        journal=journal,
        default_retry=RetryPolicy(attempts=12, initial=0.05, max=0.2, multiplier=2.0, jitter=0.02),
    )
    await dispatcher.start()
    loc = Location("kill9.yaml")
    rule = Rule("kill9", ("GUEST_PANICKED",), (ActionSpec("post", {"url": url}, loc),), loc,
                mode="parallel")
    ids = []
    for seq in range(count):
        envelope = {"event": "GUEST_PANICKED", "vm": f"vm{seq % 3}", "seq": seq, "data": {}}
        ids.extend(inv.id for inv in dispatcher.submit(Firing(rule, envelope, 0.0)))
    if ids:
        (state / "submitted").write_text("\\n".join(ids))
    await dispatcher.drain()
    await dispatcher.shutdown(1.0)
    journal.close()
    if CLIENT:
        await CLIENT[0].aclose()


asyncio.run(main())
"""


class Peer:
    """What the HTTP server saw: attempts and deliveries per idempotency key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()

    def total(self) -> int:
        with self.lock:
            return sum(self.attempts.values())


@pytest.fixture
def peer() -> Iterator[tuple[Peer, str]]:
    seen = Peer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            key = self.headers["Idempotency-Key"]
            with seen.lock:
                seen.attempts[key] += 1
                ok = seen.attempts[key] > FAILURES
                if ok:
                    seen.delivered[key] += 1
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the driver opens many connections at once

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def start(driver: Path, state: Path, url: str, count: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(driver), str(state), url, str(count)], env=env, cwd=ROOT
    )


def wait_for(check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_kill_9_during_retries_loses_nothing(tmp_path: Path, peer: tuple[Peer, str]) -> None:
    seen, url = peer
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    state = tmp_path / "state"

    first = start(driver, state, url, INVOCATIONS)
    # Requests flow only after the one commit that held all the rows.
    wait_for(lambda: seen.total() >= INVOCATIONS + 5, first)
    kill(first)
    submitted = (state / "submitted").read_text().split()
    assert len(submitted) == INVOCATIONS
    before = seen.total()

    second = start(driver, state, url, 0)
    wait_for(lambda: seen.total() >= before + INVOCATIONS // 2, second)
    kill(second)

    third = start(driver, state, url, 0)
    assert third.wait(timeout=30) == 0

    journal = Journal(state / "journal.sqlite3")
    pending, dead = journal.pending(), journal.dead_letters()
    journal.close()
    assert (pending, dead) == ([], [])
    assert set(seen.attempts) == set(submitted)  # the same keys after each restart
    assert all(seen.delivered[key] >= 1 for key in submitted)
