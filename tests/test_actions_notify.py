"""notify through Apprise's json:// service to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from reactor.actions.notify import NOTIFY, NotifyParams
from reactor.errors import PermanentActionError, TransientActionError
from reactor.plugins.api import ActionSettings, CheckContext
from tests.support.dispatched import dispatch_once

ENVELOPE = {"event": "GUEST_PANICKED", "data": {"action": "pause"}, "vm": "web1", "seq": 2}


class Inbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status = 200


@pytest.fixture
def inbox() -> Iterator[tuple[int, Inbox]]:
    box = Inbox()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            box.messages.append(json.loads(body))
            self.send_response(box.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], box
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def notify(params: dict[str, Any], settings: ActionSettings | None = None) -> Any:
    """Run as the daemon does: a real dispatcher renders ``params`` and runs ``notify`` once."""
    return dispatch_once(NOTIFY, params, ENVELOPE, rule="panic-notify", settings=settings).value()


def test_title_and_body_are_rendered_and_delivered(inbox: tuple[int, Inbox]) -> None:
    port, box = inbox
    result = notify(
        {
            "urls": [f"json://127.0.0.1:{port}/"],
            "title": "{{ vm }} needs help",
            "body": "{{ event }} ({{ data.action }})",
        }
    )
    assert result == {"notified": 1}
    [message] = box.messages
    assert message["title"] == "web1 needs help"
    assert message["message"] == "GUEST_PANICKED (pause)"


def test_default_title_and_body_summarise_the_event(inbox: tuple[int, Inbox]) -> None:
    port, box = inbox
    notify({"urls": [f"json://127.0.0.1:{port}/"]})
    [message] = box.messages
    assert message["title"] == "qmp-reactor: GUEST_PANICKED on web1"
    assert message["message"] == "GUEST_PANICKED on web1 (rule panic-notify)"


def test_a_failing_service_is_transient(inbox: tuple[int, Inbox]) -> None:
    port, box = inbox
    box.status = 500
    with pytest.raises(TransientActionError, match=r"notify via json:// failed"):
        notify({"urls": [f"json://127.0.0.1:{port}/"]})
    assert len(box.messages) >= 1


def test_an_unreachable_service_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientActionError):
        notify({"urls": [f"json://127.0.0.1:{port}/"]})


def test_an_invalid_url_is_permanent_at_run_and_reported_at_check() -> None:
    with pytest.raises(PermanentActionError, match="not a valid Apprise URL"):
        notify({"urls": ["nosuchservice://x"]})
    assert NOTIFY.check is not None
    ctx = CheckContext(settings=ActionSettings(), rule="r")
    params = NotifyParams(urls=["nosuchservice://x", "json://localhost/", "${env:NOTIFY_URL}"])
    assert NOTIFY.check(params, ctx) == ["urls[0]: not a valid Apprise URL (nosuchservice://...)"]


def test_urls_default_to_the_configured_ones(inbox: tuple[int, Inbox]) -> None:
    port, box = inbox
    settings = ActionSettings(extra={"notify_urls": [f"json://127.0.0.1:{port}/"]})
    assert notify({"title": "t"}, settings) == {"notified": 1}
    assert box.messages[0]["title"] == "t"


def test_no_urls_anywhere_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reactor.notify"):
        assert notify({"title": "disk full", "body": "on web-1"}) == {"notified": 0, "logged": True}
    assert [r.getMessage() for r in caplog.records if r.name == "reactor.notify"] == [
        "disk full: on web-1"
    ]
    assert NOTIFY.check is not None
    empty = CheckContext(settings=ActionSettings(extra={"notify_urls": []}), rule="r")
    assert NOTIFY.check(NotifyParams(), empty) == []
