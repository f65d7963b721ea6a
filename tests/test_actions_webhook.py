"""The webhook action against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from pydantic import ValidationError

from reactor import __version__
from reactor.actions.webhook import (
    HttpClients,
    Plugin,
    WebhookParams,
    check_webhook,
    retry_after,
    run_webhook,
)
from reactor.errors import PermanentActionError, TransientActionError
from reactor.params.secrets import Redactor, SecretResolver
from reactor.plugins.api import ActionContext, ActionSettings, CheckContext
from tests.support.dispatched import Ran, dispatch_once

ENVELOPE = {
    "event": "GUEST_PANICKED",
    "data": {"action": "pause"},
    "timestamp": {"seconds": 1700000000, "microseconds": 0},
    "vm": "web1",
    "seq": 4,
    "received_at": 1700000000.0,
}


def make_ctx(attempt: int = 1) -> ActionContext:
    return ActionContext(
        invocation_id="inv-7",
        idempotency_key="idem-7f3a",
        rule="panic-hook",
        action_index=0,
        envelope=ENVELOPE,
        context={},
        attempt=attempt,
        settings=ActionSettings(),
    )


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    """Responses to hand out in order (the last one repeats), and requests seen."""

    responses: list[tuple[int, dict[str, str], float]]
    seen: list[Recorded] = field(default_factory=list)

    def next(self) -> tuple[int, dict[str, str], float]:
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]


def handler_for(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_any(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            script.seen.append(Recorded(self.command, self.path, dict(self.headers), body))
            status, headers, delay = script.next()
            time.sleep(delay)
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        do_POST = do_PUT = do_any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script([(200, {}, 0.0)])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(script))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def hmac_sha256(key: bytes, message: bytes) -> str:
    """RFC 2104 by hand, so the test does not share the code under test's hmac module."""
    block = 64
    key = key.ljust(block, b"\0") if len(key) <= block else hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key) + message).digest()
    return hashlib.sha256(bytes(k ^ 0x5C for k in key) + inner).hexdigest()


def attempt(params: WebhookParams, n: int) -> Any:
    async def go() -> Any:
        clients = HttpClients()
        try:
            return await run_webhook(params, make_ctx(n), clients)
        finally:
            await clients.aclose()

    return asyncio.run(go())


def dispatch(
    params: dict[str, Any],
    resolver: SecretResolver | None = None,
    envelope: dict[str, Any] | None = None,
) -> Ran:
    """Run as the daemon does: a real dispatcher renders ``params``, the plugin's webhook runs."""
    plugin = Plugin()
    return dispatch_once(
        plugin.action_type,
        params,
        ENVELOPE if envelope is None else envelope,
        rule="panic-hook",
        resolver=resolver,
        closing=plugin.reactor_shutdown,
    )


def test_retries_on_503_and_429_with_same_key_and_valid_signatures(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.responses[:] = [(503, {}, 0.0), (429, {"Retry-After": "7"}, 0.0), (200, {}, 0.0)]
    params = WebhookParams(url=f"{url}/hook", secret="s3cret")
    with pytest.raises(TransientActionError) as first:
        attempt(params, 1)
    assert "HTTP 503" in str(first.value) and first.value.retry_after is None
    with pytest.raises(TransientActionError) as second:
        attempt(params, 2)
    assert second.value.retry_after == 7.0
    assert attempt(params, 3) == {"status": 200}

    assert len(script.seen) == 3
    assert {r.headers["Idempotency-Key"] for r in script.seen} == {"idem-7f3a"}
    for request in script.seen:
        assert request.method == "POST" and request.path == "/hook"
        timestamp = request.headers["X-Reactor-Timestamp"]
        assert abs(int(timestamp) - time.time()) < 300
        expected = hmac_sha256(b"s3cret", f"{timestamp}.".encode() + request.body)
        assert request.headers["X-Reactor-Signature"] == f"sha256={expected}"
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["User-Agent"] == f"qmp-reactor/{__version__}"
        assert json.loads(request.body) == {"rule": "panic-hook", "event": ENVELOPE}


def test_no_secret_no_signature(server: tuple[str, Script]) -> None:
    url, script = server
    attempt(WebhookParams(url=url, headers={"X-Extra": "1"}), 1)
    headers = script.seen[0].headers
    assert "X-Reactor-Signature" not in headers and "X-Reactor-Timestamp" not in headers
    assert headers["X-Extra"] == "1"


def test_client_errors_are_permanent(server: tuple[str, Script]) -> None:
    url, script = server
    script.responses[:] = [(404, {}, 0.0)]
    with pytest.raises(PermanentActionError, match="HTTP 404"):
        attempt(WebhookParams(url=url), 1)


def test_redirects_are_not_followed(server: tuple[str, Script]) -> None:
    url, script = server
    script.responses[:] = [(302, {"Location": f"{url}/elsewhere"}, 0.0)]
    with pytest.raises(PermanentActionError, match=r"302 redirect .* not followed"):
        attempt(WebhookParams(url=url), 1)
    assert [r.path for r in script.seen] == ["/"]


def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientActionError, match="ConnectError"):
        attempt(WebhookParams(url=f"http://127.0.0.1:{port}/"), 1)


def test_timeout_is_transient(server: tuple[str, Script]) -> None:
    url, script = server
    script.responses[:] = [(200, {}, 0.5)]
    with pytest.raises(TransientActionError, match=r"timed out after 0\.1s"):
        attempt(WebhookParams.model_validate({"url": url, "timeout": "100ms"}), 1)


def test_rendered_mapping_body_is_json_and_string_body_is_sent_as_is(
    server: tuple[str, Script],
) -> None:
    url, script = server
    mapping = {"url": url, "body": {"text": "{{ vm }}: {{ event }}", "n": 2}, "method": "PUT"}
    assert dispatch(mapping).value() == {"status": 200}
    assert dispatch({"url": url, "body": '{"vm": "{{ vm }}"} '}).value() == {"status": 200}
    assert script.seen[0].method == "PUT"
    assert json.loads(script.seen[0].body) == {"text": "web1: GUEST_PANICKED", "n": 2}
    assert script.seen[1].body == b'{"vm": "web1"} '


def test_secret_from_environment_signs_and_is_redacted(server: tuple[str, Script]) -> None:
    url, script = server
    script.responses[:] = [(400, {}, 0.0)]
    redactor = Redactor()
    resolver = SecretResolver(redactor, environ={"HOOK_KEY": "k-99", "TOKEN": "tok-55"})
    ran = dispatch({"url": url + "/?token=${env:TOKEN}", "secret": "${env:HOOK_KEY}"}, resolver)
    with pytest.raises(PermanentActionError) as info:
        ran.value()
    request = script.seen[0]
    assert ran.ctx is not None and request.headers["Idempotency-Key"] == ran.ctx.invocation_id
    assert request.path == "/?token=tok-55"
    timestamp = request.headers["X-Reactor-Timestamp"]
    expected = hmac_sha256(b"k-99", f"{timestamp}.".encode() + request.body)
    assert request.headers["X-Reactor-Signature"] == f"sha256={expected}"
    assert "tok-55" not in str(info.value) and "/?token=***" in str(info.value)
    assert ran.outcomes[0].error is not None and "tok-55" not in ran.outcomes[0].error


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert retry_after("120") == 120.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 20.0 <= (retry_after(later) or 0.0) <= 30.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_check_refuses_non_http_urls() -> None:
    assert Plugin().action_type.check is check_webhook
    ctx = CheckContext(settings=ActionSettings(), rule="r")
    assert check_webhook(WebhookParams(url="ftp://x/"), ctx)
    assert check_webhook(WebhookParams(url="{{ data.url }}"), ctx) == []
    assert check_webhook(WebhookParams(url="https://hooks.example/x"), ctx) == []


def documented(function: str) -> dict[str, Any]:
    """The namespace of the Python block in docs/actions.md that defines ``function``."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "actions.md").read_text()
    blocks = [block.split("```", 1)[0] for block in docs.split("```python\n")[1:]]
    [source] = [block for block in blocks if f"def {function}(" in block]
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return namespace


def test_the_documented_receiver_verifies_our_requests(server: tuple[str, Script]) -> None:
    url, script = server
    namespace = documented("verify")
    attempt(WebhookParams(url=url, secret="shared-key"), 1)
    request = script.seen[0]
    assert namespace["verify"](b"shared-key", request.headers, request.body) is True
    assert namespace["verify"](b"other-key", request.headers, request.body) is False
    assert namespace["verify"](b"shared-key", request.headers, request.body + b" ") is False
    old = int(time.time()) - 301
    stale = {
        "X-Reactor-Timestamp": str(old),
        "X-Reactor-Signature": "sha256=" + hmac_sha256(b"shared-key", f"{old}.".encode() + b"{}"),
    }
    assert namespace["verify"](b"shared-key", stale, b"{}") is False  # signed, but too old


# -- formats: Standard Webhooks and CloudEvents, verified with their public libraries ------

WHSEC = "whsec_" + base64.b64encode(b"a key of thirty-two random bytes").decode()
OLD_WHSEC = "whsec_" + base64.b64encode(b"the key being retired this week").decode()


def with_envelope(envelope: dict[str, Any]) -> ActionContext:
    ctx = make_ctx()
    ctx.envelope = envelope
    return ctx


def send(params: WebhookParams, ctx: ActionContext) -> None:
    async def go() -> None:
        clients = HttpClients()
        try:
            await run_webhook(params, ctx, clients)
        finally:
            await clients.aclose()

    asyncio.run(go())


def test_standard_webhooks_signature_verifies_and_keeps_its_id_across_retries(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.responses[:] = [(503, {}, 0.0), (200, {}, 0.0)]
    params = WebhookParams(url=url, secret=WHSEC, format="standard-webhooks")
    with pytest.raises(TransientActionError):
        attempt(params, 1)
    attempt(params, 2)
    verifier = standardwebhooks.Webhook(WHSEC)
    for request in script.seen:
        assert verifier.verify(request.body, request.headers) == {
            "rule": "panic-hook",
            "event": ENVELOPE,
        }
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 300
        assert "X-Reactor-Signature" not in request.headers
    assert {r.headers["webhook-id"] for r in script.seen} == {"idem-7f3a"}
    assert {r.headers["Idempotency-Key"] for r in script.seen} == {"idem-7f3a"}
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(OLD_WHSEC).verify(script.seen[0].body, script.seen[0].headers)
    tampered = dict(script.seen[0].headers, **{"webhook-id": "idem-other"})
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(script.seen[0].body, tampered)  # the id is signed too


def test_key_rotation_signs_with_each_key(server: tuple[str, Script]) -> None:
    url, script = server
    attempt(WebhookParams(url=url, secret=[OLD_WHSEC, "plain-new"], format="standard-webhooks"), 1)
    request = script.seen[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    standardwebhooks.Webhook(OLD_WHSEC).verify(request.body, request.headers)
    standardwebhooks.Webhook(b"plain-new").verify(request.body, request.headers)  # as bytes
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(b"plain-other").verify(request.body, request.headers)


def test_reactor_format_with_two_keys_sends_one_signature_each(server: tuple[str, Script]) -> None:
    url, script = server
    attempt(WebhookParams(url=url, secret=["k-old", "k-new"]), 1)
    request = script.seen[0]
    signed = f"{request.headers['X-Reactor-Timestamp']}.".encode() + request.body
    assert request.headers["X-Reactor-Signature"] == " ".join(
        f"sha256={hmac_sha256(key, signed)}" for key in (b"k-old", b"k-new")
    )


def test_cloudevents_binary_mode_parses_with_the_sdk(server: tuple[str, Script]) -> None:
    url, script = server
    envelope = {**ENVELOPE, "host": "hv-1", "vm": 'web 1 "é" 100%/x'}
    envelope["timestamp"] = {"seconds": 1700000000, "microseconds": 250}
    send(WebhookParams(url=url, format="cloudevents"), with_envelope(envelope))
    request = script.seen[0]
    assert all(v.isascii() and " " not in v for k, v in request.headers.items() if k[:3] == "ce-")
    event = from_http_event(HTTPMessage(request.headers, request.body))
    assert event.get_specversion() == "1.0"
    assert event.get_id() == "idem-7f3a"
    assert event.get_type() == "org.qemu.qmp.GUEST_PANICKED"
    assert event.get_subject() == envelope["vm"]
    assert event.get_source() == "qmp-reactor://hv-1/web%201%20%22%C3%A9%22%20100%25%2Fx"
    assert event.get_time() == datetime(2023, 11, 14, 22, 13, 20, 250, tzinfo=UTC)
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == {"rule": "panic-hook", "event": envelope}
    assert "webhook-signature" not in request.headers  # no secret, no signature


def test_cloudevents_structured_mode_parses_with_the_sdk_and_is_signed(
    server: tuple[str, Script],
) -> None:
    url, script = server
    params = WebhookParams(url=url, format="cloudevents-structured", secret=WHSEC)
    send(params, make_ctx())
    send(WebhookParams(url=url, format="cloudevents-structured", body="vm w"), make_ctx())
    request = script.seen[0]
    assert request.headers["Content-Type"].startswith("application/cloudevents+json")
    standardwebhooks.Webhook(WHSEC).verify(request.body, request.headers)
    event = from_http_event(HTTPMessage(request.headers, request.body))
    assert (event.get_id(), event.get_subject()) == ("idem-7f3a", "web1")
    assert event.get_source() == f"qmp-reactor://{socket.gethostname()}/web1"
    assert event.get_time() == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert event.get_data() == {"rule": "panic-hook", "event": ENVELOPE}
    plain = json.loads(script.seen[1].body)
    assert (plain["data"], plain["datacontenttype"]) == ("vm w", "text/plain; charset=utf-8")


def test_cloudevents_time_falls_back_to_arrival_when_qemu_had_no_clock(
    server: tuple[str, Script],
) -> None:
    url, script = server
    envelope = {**ENVELOPE, "timestamp": {"seconds": -1, "microseconds": -1}}
    send(WebhookParams(url=url, format="cloudevents"), with_envelope(envelope))
    assert script.seen[0].headers["ce-time"] == "2023-11-14T22:13:20.000000Z"


def test_410_gone_is_permanent_whatever_retry_after_says(server: tuple[str, Script]) -> None:
    url, script = server
    script.responses[:] = [(410, {"Retry-After": "1"}, 0.0)]
    with pytest.raises(PermanentActionError, match="HTTP 410 Gone"):
        attempt(WebhookParams(url=url, format="standard-webhooks"), 1)


def test_a_malformed_whsec_secret_fails_permanently_without_showing_it(
    server: tuple[str, Script],
) -> None:
    url, script = server
    with pytest.raises(PermanentActionError, match="base64") as info:
        attempt(WebhookParams(url=url, secret="whsec_not*base64", format="cloudevents"), 1)
    assert "not*base64" not in str(info.value) and not script.seen


def test_check_validates_format_and_secrets_without_printing_them() -> None:
    ctx = CheckContext(settings=ActionSettings(), rule="r")
    with pytest.raises(ValidationError, match="standard-webhooks"):
        WebhookParams.model_validate({"url": "http://x/", "format": "standard-webhook"})
    bad = WebhookParams(url="http://x/", secret=["${env:K}", "whsec_%%%"], format="cloudevents")
    assert check_webhook(bad, ctx) == ["secret[1]: a whsec_ secret must be base64 after the prefix"]
    empty = WebhookParams(url="http://x/", secret="whsec_", format="standard-webhooks")
    assert check_webhook(empty, ctx) == ["secret: a whsec_ secret must hold a key after the prefix"]
    assert check_webhook(WebhookParams(url="http://x/", secret=[]), ctx)
    assert check_webhook(WebhookParams(url="http://x/", secret="whsec_%%%"), ctx) == []  # reactor
    assert (
        check_webhook(WebhookParams(url="http://x/", secret=WHSEC, format="cloudevents"), ctx) == []
    )


def test_the_documented_receivers_accept_every_format(server: tuple[str, Script]) -> None:
    url, script = server
    attempt(WebhookParams(url=url, secret=["old-key", "new-key"]), 1)
    attempt(WebhookParams(url=url, secret=[OLD_WHSEC, WHSEC], format="standard-webhooks"), 1)
    attempt(WebhookParams(url=url, format="cloudevents"), 1)
    attempt(WebhookParams(url=url, format="cloudevents-structured"), 1)
    reactor, standard, binary, structured = script.seen
    verify = documented("verify")["verify"]
    assert verify(b"old-key", reactor.headers, reactor.body)
    assert verify(b"new-key", reactor.headers, reactor.body)
    assert not verify(b"new-key", reactor.headers, reactor.body + b" ")
    verify_standard = documented("verify_standard")["verify_standard"]
    assert verify_standard(WHSEC, standard.headers, standard.body)["rule"] == "panic-hook"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verify_standard(WHSEC, standard.headers, standard.body + b" ")
    parse = documented("parse_cloudevent")["parse_cloudevent"]
    expected = ("org.qemu.qmp.GUEST_PANICKED", "web1", {"rule": "panic-hook", "event": ENVELOPE})
    assert parse(binary.headers, binary.body) == expected
    assert parse(structured.headers, structured.body) == expected
