"""The ``webhook`` action: an HTTP request with the event, signed when a secret is set.

Every attempt of one invocation carries the same ``Idempotency-Key``, so a
receiver can drop duplicates a retry produced. With ``secret`` the request is
signed: ``X-Reactor-Signature: sha256=HEX`` where HEX is the HMAC-SHA256 of
``f"{timestamp}.".encode() + body`` and ``X-Reactor-Timestamp`` the Unix time in
seconds (see docs/actions.md for a verifying receiver). Connection errors,
timeouts, 5xx and 429 are retried (``Retry-After`` honoured); redirects are not
followed; any other 4xx is permanent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from pydantic import Field

from reactor import __version__
from reactor.errors import PermanentActionError, TransientActionError
from reactor.params.secrets import redact
from reactor.params.templates import is_template
from reactor.plugins.api import ActionContext, ActionParams, ActionType, CheckContext, Duration

if TYPE_CHECKING:
    import httpx  # imported when the first request is sent: `check` does without it
from reactor.plugins.hookspecs import Register, hookimpl

USER_AGENT = f"qmp-reactor/{__version__}"


class WebhookParams(ActionParams):
    """Parameters of ``webhook``."""

    url: str = Field(description="where to send the request (template)")
    method: str = Field("POST", pattern=r"^[A-Z]+$", description="HTTP method")
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers")
    body: str | dict[str, Any] | None = Field(
        None,
        description='default {"rule": ..., "event": envelope}; a string is sent as written, '
        "a mapping as JSON",
    )
    secret: str | None = Field(None, description="HMAC-SHA256 signing key (use ${env:NAME})")
    timeout: Duration = Field(10.0, gt=0, description="request timeout")
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")


class _SharedClients:
    """One lazily made ``httpx.AsyncClient`` per TLS setting, on the loop that made it."""

    def __init__(self) -> None:
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, verify: bool) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A client cannot outlive its loop; the old loop's ones are unusable.
            self._clients, self._loop = {}, loop
        client = self._clients.get(verify)
        if client is None:
            import httpx

            client = httpx.AsyncClient(verify=verify, follow_redirects=False, trust_env=False)
            self._clients[verify] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients, self._loop = list(self._clients.values()), {}, None
        for client in clients:
            await client.aclose()


_SHARED = _SharedClients()


async def aclose_shared_clients() -> None:
    """Close the process's shared HTTP clients (at shutdown, on the loop that used them)."""
    await _SHARED.aclose()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of ``"{timestamp}." + body``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def _body(params: WebhookParams, ctx: ActionContext) -> bytes:
    if isinstance(params.body, str):
        return params.body.encode()
    payload = params.body if params.body is not None else {"rule": ctx.rule, "event": ctx.envelope}
    return json.dumps(payload, default=str, ensure_ascii=False).encode()


def _headers(params: WebhookParams, ctx: ActionContext, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **params.headers}
    headers["Idempotency-Key"] = ctx.idempotency_key
    if params.secret:
        timestamp = int(time.time())
        headers["X-Reactor-Timestamp"] = str(timestamp)
        headers["X-Reactor-Signature"] = sign(params.secret, timestamp, body)
    return headers


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _judge(response: httpx.Response, where: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise TransientActionError(
            f"{where}: HTTP {status}", retry_after=retry_after(response.headers.get("Retry-After"))
        )
    if status < 400:
        location = response.headers.get("Location", "?")
        raise PermanentActionError(f"{where}: HTTP {status} redirect to {location} not followed")
    # Mask before cutting, so a secret straddling the cut cannot leak its first characters.
    raise PermanentActionError(redact(f"{where}: HTTP {status}: ") + redact(response.text)[:200])


async def run_webhook(params: WebhookParams, ctx: ActionContext) -> dict[str, Any]:
    """Send the request; returns the status code, or raises a transient/permanent error."""
    import httpx

    body = _body(params, ctx)
    where = redact(f"webhook {params.method} {params.url}")
    client = _SHARED.get(params.verify_tls)
    try:
        response = await client.request(
            params.method,
            params.url,
            content=body,
            headers=_headers(params, ctx, body),
            timeout=params.timeout,
        )
    except httpx.TimeoutException as err:
        raise TransientActionError(f"{where}: timed out after {params.timeout:g}s") from err
    except httpx.UnsupportedProtocol as err:
        raise PermanentActionError(redact(f"{where}: {err}")) from err
    except httpx.TransportError as err:
        raise TransientActionError(redact(f"{where}: {type(err).__name__}: {err}")) from err
    except httpx.InvalidURL as err:
        raise PermanentActionError(redact(f"{where}: invalid URL: {err}")) from err
    _judge(response, where)
    return {"status": response.status_code}


def check_webhook(params: WebhookParams, ctx: CheckContext) -> list[str]:
    """A URL written out (not a template) must be http or https."""
    if is_template(params.url) or params.url.startswith(("http://", "https://")):
        return []
    return [f"url {params.url!r} is not an http:// or https:// URL"]


WEBHOOK = ActionType(
    name="webhook",
    params=WebhookParams,
    run=run_webhook,
    check=check_webhook,
    description="Send the event to an HTTP endpoint, signed with HMAC-SHA256 if a secret is set.",
)


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``webhook``."""
    register(WEBHOOK)


@hookimpl
def reactor_shutdown() -> Any:
    """Close the shared HTTP clients."""
    return aclose_shared_clients()
