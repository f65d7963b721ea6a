"""How a webhook request is framed and signed: the ``format`` parameter of ``webhook``.

* ``reactor``: the body as is; with a secret, ``X-Reactor-Timestamp`` and
  ``X-Reactor-Signature: sha256=HEX`` (HMAC-SHA256 of ``"{timestamp}." + body``).
* ``standard-webhooks``: the body as is; with a secret, Standard Webhooks'
  ``webhook-id`` (the idempotency key), ``webhook-timestamp`` (send time) and
  ``webhook-signature: v1,BASE64`` (HMAC-SHA256 of ``"{id}.{timestamp}." + body``).
* ``cloudevents``: CloudEvents 1.0 in HTTP binary content mode, the ``ce-*``
  attributes as headers and the body as is.
* ``cloudevents-structured``: the whole CloudEvent as ``application/cloudevents+json``.

Both CloudEvents formats carry the Standard Webhooks signature when a secret is
set. Several secrets (a key rotation) give one signature each. Nothing here
does I/O: ``frame`` turns a body and a context into what to send.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

from reactor.plugins.api import ActionContext

Format = Literal["reactor", "standard-webhooks", "cloudevents", "cloudevents-structured"]
WHSEC = "whsec_"
SPECVERSION = "1.0"
STRUCTURED_TYPE = "application/cloudevents+json; charset=utf-8"
# CloudEvents' HTTP binding: printable ASCII is sent as is, except space, '"' and '%'.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' "%')


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of ``"{timestamp}." + body``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` + base64 decoded, else the bytes.

    ValueError (quoting no part of the secret) if a ``whsec_`` secret is not base64 or empty.
    """
    if not secret.startswith(WHSEC):
        return secret.encode()
    text = secret.removeprefix(WHSEC)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    if not key:
        raise ValueError("a whsec_ secret must hold a key after the prefix")
    return key


def secret_problem(secret: str, fmt: Format) -> str | None:
    """Why ``secret`` cannot sign in ``fmt`` (empty, a malformed key), or None; never quotes it."""
    if not secret:
        return "is empty"
    try:
        if fmt != "reactor":  # the reactor recipe uses any secret's bytes as they are
            signing_key(secret)
    except ValueError as err:
        return str(err)
    return None


def sign_standard(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,BASE64`` per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    macs = (hmac.new(key, signed, hashlib.sha256).digest() for key in keys)
    return " ".join(f"v1,{base64.b64encode(mac).decode()}" for mac in macs)


def _signature_headers(
    fmt: Format, secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    if fmt == "reactor":
        signature = " ".join(sign(secret, timestamp, body) for secret in secrets)
        return {"X-Reactor-Timestamp": str(timestamp), "X-Reactor-Signature": signature}
    keys = [signing_key(secret) for secret in secrets]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_standard(keys, msg_id, timestamp, body),
    }


def event_time(envelope: Mapping[str, Any]) -> str:
    """The event's QEMU timestamp in RFC 3339 (UTC); ``received_at`` if QEMU gave none usable."""
    stamp = envelope.get("timestamp")
    try:
        seconds, micros = stamp["seconds"], stamp["microseconds"]  # type: ignore[index]
        if seconds < 0 or not 0 <= micros < 1_000_000:
            raise ValueError("no clock")  # QEMU sends -1 when it could not read one
        when = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
    except (TypeError, KeyError, ValueError, OverflowError, OSError):
        received = envelope.get("received_at")
        when = datetime.fromtimestamp(received if isinstance(received, int | float) else 0, UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def attributes(ctx: ActionContext) -> dict[str, str]:
    """The CloudEvents 1.0 context attributes of ``ctx``'s event."""
    envelope = ctx.envelope
    host = str(envelope.get("host") or socket.gethostname())
    vm = str(envelope.get("vm") or "")
    return {
        "specversion": SPECVERSION,
        "id": ctx.idempotency_key,
        "source": f"qmp-reactor://{quote(host, safe='')}/{quote(vm, safe='')}",
        "type": f"org.qemu.qmp.{envelope.get('event')}",
        "subject": vm,
        "time": event_time(envelope),
    }


def _structured(attrs: Mapping[str, str], body: bytes) -> bytes:
    event: dict[str, Any] = dict(attrs)
    try:
        event["data"] = json.loads(body)
        event["datacontenttype"] = "application/json"
    except ValueError:  # a ``body`` string that is not JSON travels as text
        event["data"] = body.decode(errors="replace")
        event["datacontenttype"] = "text/plain; charset=utf-8"
    return json.dumps(event, ensure_ascii=False).encode()


def frame(
    fmt: Format, body: bytes, secrets: Sequence[str], ctx: ActionContext, timestamp: int
) -> tuple[bytes, dict[str, str]]:
    """The body to send and the headers ``fmt`` sets (over the user's), signed with ``secrets``.

    ``timestamp`` is the send time (Unix seconds). ValueError if a secret is malformed.
    """
    headers: dict[str, str] = {}
    if fmt == "cloudevents":
        attrs = attributes(ctx)
        headers = {f"ce-{k}": quote(v, safe=_HEADER_SAFE) for k, v in attrs.items()}
    elif fmt == "cloudevents-structured":
        body = _structured(attributes(ctx), body)
        headers = {"Content-Type": STRUCTURED_TYPE}
    if secrets:
        headers |= _signature_headers(fmt, secrets, ctx.idempotency_key, timestamp, body)
    return body, headers
