"""One connection to NATS, with the configured credentials, kept up for as long as it runs.

Credentials (user and password, token, NKey seed, creds file) and the URL may be
``${file:}``/``${env:}`` secrets: each is read when connecting and handed to the
redactor first, so no log line shows it; the URL is shown without its user
part. TLS is used when the URL says ``tls://``. The first connect is retried
until it works (a sidecar starts while NATS is away); after that the client
reconnects forever.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from reactor.errors import ConfigError, PermanentActionError
from reactor.params.secrets import SecretResolver, find_references, reference_problem
from reactor.service.config import NatsConfig

log = logging.getLogger("reactor.fleet")

RETRY_MAX = 5.0


def shown(url: str) -> str:
    """``url`` as a log line may show it: without user, password or token."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else re.sub(r".*@", "", url)


def resolved(text: str, resolver: SecretResolver) -> str:
    """``text`` with its ``${kind:ref}`` references read (each value goes to the redactor)."""
    out, at = [], 0
    for ref in find_references(text):
        problem = reference_problem(ref)
        if problem:
            raise ConfigError(f"nats: {problem}")
        try:
            value = resolver.resolve(ref.kind, ref.ref)
        except PermanentActionError as err:
            raise ConfigError(f"nats: {err}") from None
        out += [text[at : ref.start], value]
        at = ref.end
    return "".join([*out, text[at:]])


def connect_options(cfg: NatsConfig, resolver: SecretResolver) -> dict[str, Any]:
    """``nats.connect``'s keyword arguments for ``cfg`` (secrets read now)."""
    if not cfg.url:
        raise ConfigError("nats: no url")
    cred = cfg.credentials
    options: dict[str, Any] = {"servers": [resolved(cfg.url, resolver)]}
    for name, key in (("user", "user"), ("password", "password"), ("token", "token")):
        value = getattr(cred, name)
        if value is not None:
            options[key] = resolved(value, resolver)
    if cred.nkey_seed is not None:
        options["nkeys_seed_str"] = resolved(cred.nkey_seed, resolver)
    if cred.creds_file is not None:
        options["user_credentials"] = resolved(cred.creds_file, resolver)
    return options


class Link:
    """A NATS connection and its JetStream context, up from ``open`` to ``close``."""

    def __init__(self, cfg: NatsConfig, resolver: SecretResolver, name: str) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.name = name
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.up = asyncio.Event()
        self._told = False
        self.options = connect_options(cfg, resolver)  # a bad reference stops the start

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        return self.nc is not None and self.nc.is_connected

    async def open(self) -> None:
        """Connect, retrying until it works (cancel to give up)."""
        delay = 0.1
        while True:
            try:
                self.nc = await nats.connect(
                    name=self.name,
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    **self.options,
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("nats %s: cannot connect (%s); retrying", self.where, why(err))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self.js = self.nc.jetstream()
        self.up.set()
        log.info("nats %s: connected", self.where)

    @property
    def where(self) -> str:
        return shown(self.cfg.url or "")

    async def _error(self, err: Exception) -> None:
        if not self.up.is_set() and not self._told:
            self._told = True  # the client retries the first connect itself, quietly after this
            log.warning("nats %s: cannot connect (%s); retrying", self.where, why(err))
        else:
            log.debug("nats %s: %s", self.where, why(err))

    async def _disconnected(self) -> None:
        log.warning("nats %s: disconnected; reconnecting", self.where)

    async def _reconnected(self) -> None:
        log.info("nats %s: reconnected", self.where)

    async def close(self) -> None:
        """Hang up (what was sent is sent)."""
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except (TimeoutError, Exception) as err:
                log.debug("nats %s: close: %s", self.where, why(err))


def why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
