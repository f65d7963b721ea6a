"""The ``webhook`` action: an HTTP request with the event, signed when a secret is set.

Every attempt of one invocation carries the same ``Idempotency-Key``, so a
receiver can drop duplicates a retry produced. ``format`` frames and signs the
request (``reactor``, ``standard-webhooks``, ``cloudevents``,
``cloudevents-structured``: see ``_webhook_formats``); with the default, a
``secret`` signs it as ``X-Reactor-Signature: sha256=HEX`` where HEX is the
HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` and ``X-Reactor-Timestamp``
the Unix time in seconds (see docs/actions.md for verifying receivers).
Connection errors, timeouts, 5xx and 429 are retried (``Retry-After``
honoured); redirects are not followed; any other 4xx is permanent, and 410 Gone
says the endpoint is gone for good.

The HTTP clients (one per TLS setting, kept alive between requests) belong to
the plugin instance a plugin manager registers (``Plugin``), which closes them
at ``reactor_shutdown``: a fresh manager has fresh clients.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from pydantic import Field

from reactor import __version__
from reactor.actions._webhook_formats import Format, frame, secret_problem
from reactor.actions._webhook_formats import sign as sign  # the reactor format's recipe
from reactor.errors import PermanentActionError, TransientActionError
from reactor.params.display import escape
from reactor.params.templates import is_template
from reactor.plugins.api import ActionContext, ActionParams, ActionType, CheckContext, Duration

if TYPE_CHECKING:
    import httpx  # imported when the first request is sent: `check` does without it
from reactor.plugins.hookspecs import Register, hookimpl

USER_AGENT = f"qmp-reactor/{__version__}"


DESCRIPTION = "Send the event to an HTTP endpoint, signed with HMAC-SHA256 if a secret is set."


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
    secret: str | list[str] | None = Field(
        None,
        description="HMAC-SHA256 signing key (use ${env:NAME}); a list signs with each key "
        "(a rotation); whsec_BASE64 is decoded for Standard Webhooks signatures",
    )
    format: Format = Field(
        "reactor",
        description="reactor, standard-webhooks, cloudevents (binary mode) "
        "or cloudevents-structured",
    )
    timeout: Duration = Field(10.0, gt=0, description="request timeout")
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")


class HttpClients:
    """One lazily made ``httpx.AsyncClient`` per TLS setting, on the loop that made it."""

    def __init__(self) -> None:
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, verify: bool) -> httpx.AsyncClient:
        """The client for ``verify``, made on first use on the running loop."""
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
        """Close every client (on the loop that used them); the next ``get`` makes new ones."""
        clients, self._clients, self._loop = list(self._clients.values()), {}, None
        for client in clients:
            await client.aclose()


def _body(params: WebhookParams, ctx: ActionContext) -> bytes:
    if isinstance(params.body, str):
        return params.body.encode()
    payload = params.body if params.body is not None else {"rule": ctx.rule, "event": ctx.envelope}
    return json.dumps(payload, default=str, ensure_ascii=False).encode()


_BAD_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_problem(params: WebhookParams) -> str | None:
    """Why a (rendered) header cannot be sent: a CR, LF or other control character in it.

    Retrying would send the same text again, so this is a permanent error; the
    value is not shown (it may hold a secret, and whoever wrote it wants it shown).
    """
    for name, value in params.headers.items():
        if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
            return f"header {escape(name)!r}: control character (CR/LF) in the rendered text"
    return None


def _secrets(params: WebhookParams) -> tuple[str, ...]:
    secret = params.secret  # an empty one (an unset-but-empty variable) signs nothing
    return tuple(s for s in ((secret,) if isinstance(secret, str) else secret or ()) if s)


def _request(params: WebhookParams, ctx: ActionContext) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt: the user's headers, then the format's."""
    try:
        body, framed = frame(
            params.format, _body(params, ctx), _secrets(params), ctx, int(time.time())
        )
    except ValueError as err:  # a malformed secret; the message quotes none of it
        raise PermanentActionError(f"webhook: secret: {err}") from None
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **params.headers}
    headers["Idempotency-Key"] = ctx.idempotency_key
    for name, value in framed.items():
        for other in [h for h in headers if h.lower() == name.lower()]:
            del headers[other]
        headers[name] = value
    return body, headers


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


def _judge(response: httpx.Response, where: str, redact: Callable[[str], str]) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 410:
        raise PermanentActionError(f"{where}: HTTP 410 Gone: the endpoint is gone, not retried")
    if status == 429 or status >= 500:
        raise TransientActionError(
            f"{where}: HTTP {status}", retry_after=retry_after(response.headers.get("Retry-After"))
        )
    if status < 400:
        location = response.headers.get("Location", "?")
        raise PermanentActionError(f"{where}: HTTP {status} redirect to {location} not followed")
    # Mask before cutting, so a secret straddling the cut cannot leak its first characters.
    raise PermanentActionError(redact(f"{where}: HTTP {status}: ") + redact(response.text)[:200])


async def run_webhook(
    params: WebhookParams, ctx: ActionContext, clients: HttpClients
) -> dict[str, Any]:
    """Send the request with ``clients``; the status code, or a transient/permanent error."""
    import httpx

    redact = ctx.redact
    body, headers = _request(params, ctx)
    where = redact(f"webhook {params.method} {params.url}")
    problem = _header_problem(params)
    if problem is not None:
        raise PermanentActionError(redact(f"{where}: {problem}"))
    client = clients.get(params.verify_tls)
    try:
        response = await client.request(
            params.method,
            params.url,
            content=body,
            headers=headers,
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
    _judge(response, where, redact)
    return {"status": response.status_code}


def check_webhook(params: WebhookParams, ctx: CheckContext) -> list[str]:
    """A URL written out (not a template) must be http or https; secrets written out must sign."""
    problems = _secret_problems(params)
    if is_template(params.url) or params.url.startswith(("http://", "https://")):
        return problems
    return [f"url {params.url!r} is not an http:// or https:// URL", *problems]


def _secret_problems(params: WebhookParams) -> list[str]:
    """Problems of the secrets written out; references are read at run time, values never shown."""
    secret = params.secret
    if isinstance(secret, list) and not secret:
        return ["secret: an empty list signs nothing; leave secret out instead"]
    if secret is None or (isinstance(secret, str) and params.format == "reactor"):
        return []  # one reactor key is used as written, as it always was
    secrets = (secret,) if isinstance(secret, str) else secret
    found = [
        (i, problem)
        for i, one in enumerate(secrets)
        if not is_template(one) and (problem := secret_problem(one, params.format))
    ]
    name = "secret" if isinstance(secret, str) else "secret[{}]"
    return [f"{name.format(i)}: {problem}" for i, problem in found]


def make_webhook(clients: HttpClients) -> ActionType:
    """A ``webhook`` action type sending its requests with ``clients``."""

    async def run(params: WebhookParams, ctx: ActionContext) -> dict[str, Any]:
        return await run_webhook(params, ctx, clients)

    return ActionType(
        name="webhook",
        params=WebhookParams,
        run=run,
        check=check_webhook,
        description=DESCRIPTION,
    )


class Plugin:
    """The built-in plugin: ``webhook`` with HTTP clients this instance owns and closes."""

    def __init__(self) -> None:
        self.clients = HttpClients()
        self.action_type = make_webhook(self.clients)

    @hookimpl
    def reactor_register_actions(self, register: Register) -> None:
        """Register ``webhook``."""
        register(self.action_type)

    @hookimpl
    def reactor_shutdown(self) -> Any:
        """Close this instance's HTTP clients."""
        return self.clients.aclose()
