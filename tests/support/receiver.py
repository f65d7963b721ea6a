"""A real webhook receiver on loopback that notes when each request arrived.

Used by the end-to-end tests as the far end of the sidecar's ``webhook`` action: every POST body
is parsed as JSON and kept with its path and ``time.time()`` of arrival.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Hook:
    """One request: when it arrived, its path and its JSON body."""

    arrival: float
    path: str
    body: dict[str, Any]


class _Handler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def do_POST(self) -> None:
        arrival = time.time()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()
        self.server.add(Hook(arrival, self.path, body))

    def log_message(self, *args: Any) -> None:
        pass


class WebhookReceiver(ThreadingHTTPServer):
    """An HTTP server on ``127.0.0.1`` (a free port) serving in a thread until :meth:`close`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self._hooks: list[Hook] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, hook: Hook) -> None:
        """Record one request (called by the handler)."""
        with self._cond:
            self._hooks.append(hook)
            self._cond.notify_all()

    def hooks(self, path: str | None = None) -> list[Hook]:
        """Requests so far, in arrival order (only those to ``path`` if given)."""
        with self._cond:
            return [h for h in self._hooks if path is None or h.path == path]

    def wait_for(self, path: str, count: int, timeout: float) -> list[Hook]:
        """Wait until ``count`` requests reached ``path``; return them or raise TimeoutError."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(h.path == path for h in self._hooks) >= count, timeout
            )
        hooks = self.hooks(path)
        if not ok:
            raise TimeoutError(f"{len(hooks)} of {count} requests to {path} within {timeout} s")
        return hooks

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
