"""The sidecar as an operator sees it, for the fault, security and metrics tests.

* ``Receiver``: a real webhook receiver on 127.0.0.1 that counts attempts and
  deliveries by ``Idempotency-Key``, can fail the first attempts of each key,
  can go down (its port refuses connections) and come back on the same port,
  and checks every signature with its own implementation of the documented
  recipe (HMAC-SHA256 over ``f"{timestamp}."`` + body).
* ``Sidecar``: ``qmp-reactor run`` as a subprocess with a configuration file,
  metrics on a free loopback port, its log in a file, ``/metrics`` and
  ``/healthz`` read over HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
REPLAY_WINDOW = 300


def signature_ok(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> bool:
    """The receiver's side of the documented signature recipe, written independently."""
    try:
        stamp = int(headers["X-Reactor-Timestamp"])
        scheme, _, given = headers["X-Reactor-Signature"].partition("=")
    except (KeyError, ValueError):
        return False
    expected = hmac.new(secret.encode(), str(stamp).encode() + b"." + body, hashlib.sha256)
    fresh = abs(now - stamp) <= REPLAY_WINDOW
    return scheme == "sha256" and fresh and hmac.compare_digest(expected.hexdigest(), given)


Answer = Callable[[str, dict[str, str], bytes], tuple[int, bytes] | None]
"""``answer(path, headers, body)``: a scripted (status, body), or None for the usual reply."""


class Receiver:
    """A webhook receiver on a fixed loopback port that can go down and come back."""

    def __init__(
        self, *, fail_first: int = 0, secret: str | None = None, answer: Answer | None = None
    ) -> None:
        self.fail_first = fail_first
        self.secret = secret
        self.answer = answer
        self.lock = threading.Condition()
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.bad_signatures = 0
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.up()

    @property
    def url(self) -> str:
        """Where the rules send their webhooks."""
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        """Start serving (again, on the same port after ``down``)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = dict(self.headers.items())
                status = receiver.record(headers, body)
                reply = b""
                scripted = receiver.answer and receiver.answer(self.path, headers, body)
                if scripted:
                    status, reply = scripted
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop serving: connections to the port are refused until ``up``."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    close = down

    def record(self, headers: dict[str, str], body: bytes) -> int:
        """Note one request; its HTTP status (503 for a key's first ``fail_first`` attempts)."""
        key = headers.get("Idempotency-Key", "")
        with self.lock:
            self.requests.append((headers, body))
            if self.secret is not None and not signature_ok(
                self.secret, headers, body, time.time()
            ):
                self.bad_signatures += 1
                self.lock.notify_all()
                return 401
            self.attempts[key] += 1
            ok = self.attempts[key] > self.fail_first
            if ok:
                self.delivered[key] += 1
            self.lock.notify_all()
        return 200 if ok else 503

    def wait(self, check: Callable[[Receiver], bool], timeout: float, what: str) -> None:
        """Wait until ``check(self)`` holds (under the lock) or fail saying ``what``."""
        with self.lock:
            if not self.lock.wait_for(lambda: check(self), timeout):
                raise AssertionError(
                    f"receiver: no {what} within {timeout} s "
                    f"({len(self.delivered)} keys delivered, {sum(self.attempts.values())} tries)"
                )

    def keys_delivered(self) -> set[str]:
        """The idempotency keys delivered at least once."""
        with self.lock:
            return set(self.delivered)


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """Prometheus samples by (name, labels)."""

    def value(self, name: str, **labels: str) -> float | None:
        """The sample's value, or None if there is no such series."""
        return self.get((name, frozenset(labels.items())))

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of ``name``: labels → value."""
        return {labels: v for (n, labels), v in self.items() if n == name}


def parse_metrics(text: str) -> Samples:
    """The exposition text as ``Samples``."""
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


class Sidecar:
    """``qmp-reactor run`` with a configuration file written from ``config``."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("-v",),
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        settings: dict[str, Any] = {
            "plugin_dirs": [str(workdir / "no-plugins")],
            "state_dir": str(workdir / "state"),
            "metrics": {"listen": "127.0.0.1:0"},
            "shutdown_grace": 2,
            "reconnect_max": 0.5,
        }
        settings.update(config)
        self.config_path.write_text(yaml.safe_dump(settings))
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.log_path = workdir / "sidecar.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._offset = 0

    def start(self) -> Sidecar:
        """Start the process (again); its log goes on in the same file."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, "-m", "reactor", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, *self.args], stdout=log, stderr=log, cwd=self.workdir, env=self.env
            )
        self.starts += 1
        return self

    def log_text(self, *, all_runs: bool = True) -> str:
        """The log (of every run, or of the current one)."""
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[0 if all_runs else self._offset :].decode(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in this run's log; fail with the log if it never comes."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text(all_runs=False))
            if found:
                return found
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the sidecar log:\n{self.log_text()}")
            time.sleep(0.02)

    @property
    def metrics_port(self) -> int:
        """The port the metrics listener bound (read from this run's log)."""
        return int(self.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[1])

    def get(self, path: str) -> tuple[int, bytes]:
        """``GET path`` from the metrics listener: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def scrape(self) -> Samples:
        """``/metrics``, parsed."""
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body.decode())

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: (status, document)."""
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def wait_metric(
        self, check: Callable[[Samples], bool], timeout: float = 20.0, what: str = "metric"
    ) -> Samples:
        """Scrape until ``check`` holds; the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if check(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; last scrape: {samples}")
            time.sleep(0.05)

    def rss_kib(self, field: str = "VmRSS") -> int:
        """The process' resident memory in KiB (``VmHWM``: its peak so far)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", status)[1])  # type: ignore[index]

    def kill9(self) -> None:
        """SIGKILL, and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status (SIGKILL if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def webhook_rule(name: str, on: str, url: str, **extra: Any) -> dict[str, Any]:
    """A rule sending a webhook to ``url`` on ``on``, with quick retries."""
    action: dict[str, Any] = {
        "type": "webhook",
        "with": {"url": url},
        "retry": {"attempts": 200, "initial": 0.05, "max": 0.5, "jitter": 0.05},
    }
    action.update(extra.pop("action", {}))
    return {"name": name, "on": on, "actions": [action], **extra}


def write_rules(path: Path, *rules: dict[str, Any]) -> Path:
    """A rule file with ``rules``."""
    path.write_text(yaml.safe_dump({"rules": list(rules)}, sort_keys=False))
    return path
