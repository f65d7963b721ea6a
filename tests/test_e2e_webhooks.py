"""Webhook formats end to end: a real QEMU's STOP, ``qmp-reactor run``, a real receiver.

Every request the sidecar sends is checked from outside with the public
libraries a receiver would use: ``standardwebhooks`` verifies Standard Webhooks
signatures (over a retry, a kill -9 and a two-key rotation) and the
``cloudevents`` SDK parses CloudEvents in binary and structured content mode.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from reactor.demo.machine import ThrowawayQemu
from tests.support.ops import Receiver, Sidecar, webhook_rule, write_rules

pytestmark = pytest.mark.qemu

OLD_KEY = b"the retiring key, thirty-two byt"
NEW_KEY = b"the incoming key, also 32 bytes!"
OLD = "whsec_" + base64.b64encode(OLD_KEY).decode()
NEW = "whsec_" + base64.b64encode(NEW_KEY).decode()
SECRETS = {"HOOK_OLD": OLD, "HOOK_NEW": NEW}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def qemu() -> Iterator[ThrowawayQemu]:
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        yield q


def sidecar_for(tmp_path: Path, qemu: ThrowawayQemu, *rules: dict[str, Any]) -> Sidecar:
    path = write_rules(tmp_path / "rules.yaml", *rules)
    config = {"rules": [str(path)], "qmp": [str(qemu.qmp_socket("vm1"))]}
    return Sidecar(tmp_path, config, env=SECRETS)


def assert_no_secret_in(text: str) -> None:
    """Neither a secret as written, nor its base64 part, nor the key it decodes to."""
    for secret in SECRETS.values():
        for shown in (secret, secret.removeprefix("whsec_"), base64.b64decode(secret[6:]).hex()):
            assert shown not in text
    for key in (OLD_KEY, NEW_KEY):
        assert key.decode() not in text


def test_standard_webhooks_verify_across_retries_a_kill_9_and_a_key_rotation(
    tmp_path: Path, qemu: ThrowawayQemu, receiver: Receiver
) -> None:
    receiver.fail_first = 2  # the first attempt before the kill, the second after it
    retry = {"attempts": 10, "initial": 1.0, "max": 1.0, "jitter": 0}
    rule = webhook_rule(
        "stopped",
        "STOP",
        receiver.url,
        action={
            "with": {
                "url": receiver.url,
                "format": "standard-webhooks",
                "secret": ["${env:HOOK_OLD}", "${env:HOOK_NEW}"],
            },
            "retry": retry,
        },
    )
    with sidecar_for(tmp_path, qemu, rule) as sidecar:
        sidecar.start().wait_log("vm1: connected")
        qemu.qmp.execute("stop")
        receiver.wait(lambda r: sum(r.attempts.values()) >= 1, 30, "a first attempt")
        sidecar.kill9()
        sidecar.start()
        receiver.wait(lambda r: len(r.delivered) == 1, 60, "the delivery after the restart")
        assert sidecar.stop() == 0
    requests = list(receiver.requests)
    assert len(requests) == 3
    ids = {headers["webhook-id"] for headers, _ in requests}
    assert ids == {headers["Idempotency-Key"] for headers, _ in requests} and len(ids) == 1
    for headers, body in requests:
        assert len(headers["webhook-signature"].split(" ")) == 2
        for secret in (OLD, NEW):  # a receiver on either side of the rotation accepts it
            payload = standardwebhooks.Webhook(secret).verify(body, headers)
            assert payload["rule"] == "stopped" and payload["event"]["event"] == "STOP"
        with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
            standardwebhooks.Webhook(b"some other key").verify(body, headers)
    assert_no_secret_in(sidecar.log_text())


def test_cloudevents_binary_and_structured_parse_with_the_sdk(
    tmp_path: Path, qemu: ThrowawayQemu, receiver: Receiver
) -> None:
    binary = webhook_rule(
        "ce-binary",
        "STOP",
        receiver.url,
        action={
            "with": {"url": receiver.url, "format": "cloudevents", "secret": "${env:HOOK_NEW}"}
        },
    )
    structured = webhook_rule(
        "ce-structured",
        "STOP",
        receiver.url,
        action={"with": {"url": receiver.url, "format": "cloudevents-structured"}},
    )
    before = datetime.now(UTC) - timedelta(seconds=5)
    with sidecar_for(tmp_path, qemu, binary, structured) as sidecar:
        sidecar.start().wait_log("vm1: connected")
        qemu.qmp.execute("stop")
        receiver.wait(lambda r: len(r.delivered) == 2, 30, "both CloudEvents")
        assert sidecar.stop() == 0
    after = datetime.now(UTC) + timedelta(seconds=5)
    events = {}
    for headers, body in receiver.requests:
        event = from_http_event(HTTPMessage(headers, body))
        events[event.get_data()["rule"]] = (event, headers, body)  # type: ignore[index]
    assert set(events) == {"ce-binary", "ce-structured"}
    for event, headers, _ in events.values():
        assert event.get_specversion() == "1.0"
        assert event.get_id() == headers["Idempotency-Key"]
        assert event.get_type() == "org.qemu.qmp.STOP"
        assert event.get_subject() == "vm1"
        assert event.get_source() == f"qmp-reactor://{socket.gethostname()}/vm1"
        time_ = event.get_time()
        assert time_ is not None and before <= time_ <= after  # QEMU's own clock
        data = event.get_data()
        assert isinstance(data, dict) and data["event"]["event"] == "STOP"
        stamp = data["event"]["timestamp"]
        assert time_.timestamp() == pytest.approx(stamp["seconds"] + stamp["microseconds"] / 1e6)
    _, binary_headers, binary_body = events["ce-binary"]
    assert binary_headers["ce-specversion"] == "1.0"
    standardwebhooks.Webhook(NEW).verify(binary_body, binary_headers)
    _, structured_headers, structured_body = events["ce-structured"]
    assert structured_headers["Content-Type"].startswith("application/cloudevents+json")
    assert json.loads(structured_body)["specversion"] == "1.0"
    assert "webhook-signature" not in structured_headers
    assert_no_secret_in(sidecar.log_text())


def test_410_gone_is_dead_lettered_after_one_attempt(
    tmp_path: Path, qemu: ThrowawayQemu, receiver: Receiver
) -> None:
    receiver.answer = lambda path, headers, body: (410, b"endpoint retired")
    rule = webhook_rule("stopped", "STOP", receiver.url, action={"with": {
        "url": receiver.url, "format": "standard-webhooks"}})  # fmt: skip
    with sidecar_for(tmp_path, qemu, rule) as sidecar:
        sidecar.start().wait_log("vm1: connected")
        qemu.qmp.execute("stop")
        sidecar.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1, 30, "a dead letter")
        assert sidecar.stop() == 0
    assert sum(receiver.attempts.values()) == 1  # 200 attempts allowed, one made
    dlq = subprocess.run(
        [sys.executable, "-m", "reactor", "dlq", "list", "--json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    [dead] = json.loads(dlq.stdout)
    assert "HTTP 410 Gone" in json.dumps(dead)


def test_check_locates_a_bad_format_and_secret_without_printing_the_secret(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n"
        "  - name: hook\n"
        "    on: STOP\n"
        "    actions:\n"
        "      - type: webhook\n"
        "        with: {url: 'http://127.0.0.1:9/', format: cloudevent}\n"
        "      - type: webhook\n"
        "        with:\n"
        "          url: http://127.0.0.1:9/\n"
        "          format: standard-webhooks\n"
        "          secret: [whsec_c2VjcmV0LXZhbHVl, 'whsec_s3cr%t!']\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "check", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"{bad}:6:") and "format" in lines[0]
    assert "'reactor', 'standard-webhooks', 'cloudevents' or 'cloudevents-structured'" in lines[0]
    assert (
        lines[1].startswith(f"{bad}:") and "secret[1]: a whsec_ secret must be base64" in lines[1]
    )
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert "s3cr" not in result.stderr and "c2VjcmV0" not in result.stderr
