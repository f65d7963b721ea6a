"""`qmp-reactor run` end to end: a real QEMU, the real sidecar process, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reactor.demo.machine import ThrowawayQemu

RULES = """\
rules:
  - name: stopped
    on: STOP
    actions:
      - type: webhook
        with: {{url: "http://127.0.0.1:{port}/hook"}}
      - type: qmp
        with: {{command: cont}}
  - name: resumed-by-someone-else
    on: RESUME
    when: {{not: {{path: $.caused_by, exists: true}}}}
    actions:
      - type: webhook
        with: {{url: "http://127.0.0.1:{port}/hook"}}
"""


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.bodies: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.bodies) >= n, timeout)
            return list(self.bodies)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.cond:
            self.server.bodies.append(json.loads(body))
            self.server.cond.notify_all()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _wait_log(path: Path, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in log:\n{path.read_text()}")


@pytest.mark.qemu
def test_run_reacts_reloads_and_stops(tmp_path: Path, receiver: Receiver) -> None:
    port = receiver.server_address[1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(port=port))
    log = tmp_path / "sidecar.log"
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q, log.open("w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reactor", "run", "--qmp", str(q.qmp_socket("vm1")),
             "--rules", str(rules), "--state-dir", str(tmp_path / "state"), "-v",
             "--plugin-dir", str(tmp_path / "no-plugins")],
            stderr=logf,
        )  # fmt: skip
        try:
            _wait_log(log, "REACTOR_CONNECTED")
            q.qmp.execute("stop")
            # STOP -> webhook, then our own `cont`; its RESUME is marked caused_by and
            # so does not fire the rule that excludes self-caused events.
            q.qmp.wait_event("RESUME", timeout=20)
            bodies = receiver.wait_for(1)
            assert [b["rule"] for b in bodies] == ["stopped"]
            assert bodies[0]["event"]["vm"] == "vm1"
            assert bodies[0]["event"]["event"] == "STOP"
            content = _wait_log(log, "RESUME seq=")
            assert "qmp ok rule=stopped" in _wait_log(log, "qmp ok")
            time.sleep(0.5)
            assert len(receiver.bodies) == 1, content

            # An invalid rule set is refused; the old one keeps running.
            rules.write_text("rules:\n  - name: x\n    on: STOPP\n    actions: [{type: log}]\n")
            proc.send_signal(signal.SIGHUP)
            _wait_log(log, "reload refused")
            assert f"{rules}:3:9: error: unknown event 'STOPP'" in log.read_text()
            q.qmp.execute("stop")
            assert [b["rule"] for b in receiver.wait_for(2)] == ["stopped", "stopped"]

            # A valid new set replaces it.
            rules.write_text(
                "rules:\n  - name: reset-seen\n    on: RESET\n    actions:\n"
                f"      - type: webhook\n        with: {{url: 'http://127.0.0.1:{port}/'}}\n"
            )
            proc.send_signal(signal.SIGHUP)
            _wait_log(log, "reloaded: 1 rules")
            q.qmp.execute("system_reset")
            assert [b["rule"] for b in receiver.wait_for(3)][2] == "reset-seen"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert "stopped" in log.read_text().splitlines()[-1]
    assert "Traceback" not in log.read_text()


def test_run_with_bad_config_is_one_clean_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("qmp: [/tmp/x.qmp]\nactions:\n  exec: {enabled: maybe}\n")
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{config}:3:19: error: 'actions.exec.enabled'")
    assert "Traceback" not in result.stderr


@pytest.mark.qemu
def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: stopped\n    on: STOP\n    actions: [{type: log}]\n")
    with ThrowawayQemu(name="vm2", extra_qmp=["vm2"]) as q, log.open("w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reactor", "run", "--qmp", str(q.qmp_socket("vm2")),
             "--rules", str(rules), "--state-dir", str(tmp_path / "state"), "-v",
             "--log-format", "json", "--plugin-dir", str(tmp_path / "none")],
            stderr=logf,
        )  # fmt: skip
        try:
            _wait_log(log, "REACTOR_CONNECTED")
            q.qmp.execute("stop")
            _wait_log(log, '"outcome":"ok"')
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r for r in records if r["logger"] == "reactor.event"]
    assert [r["event"] for r in events][:2] == ["REACTOR_CONNECTED", "STOP"]
    assert {r["vm"] for r in events} == {"vm2"}
    actions = [r for r in records if r["logger"] == "reactor.action"]
    assert actions and actions[0]["rule"] == "stopped" and actions[0]["outcome"] == "ok"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
