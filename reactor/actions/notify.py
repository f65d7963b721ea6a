"""The ``notify`` action: a human-readable notice through Apprise (mail, chat, push...).

Apprise's asynchronous API is used, never its blocking ``notify()``, so a slow
service does not stall the event loop. Apprise is imported on first use: it
loads many service modules.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache
from typing import Any

from pydantic import Field

from reactor.errors import PermanentActionError, TransientActionError
from reactor.params.templates import is_template
from reactor.plugins.api import (
    ActionContext,
    ActionParams,
    ActionSettings,
    ActionType,
    CheckContext,
)
from reactor.plugins.hookspecs import Register, hookimpl

notice_log = logging.getLogger("reactor.notify")


class NotifyParams(ActionParams):
    """Parameters of ``notify``."""

    urls: list[str] = Field(
        default_factory=list,
        description="Apprise URLs, e.g. mailto://... (templates, secret references); "
        "default: actions.notify.urls of the configuration, else the log",
    )
    title: str | None = Field(None, description='default "qmp-reactor: EVENT on VM" (template)')
    body: str | None = Field(None, description='default "EVENT on VM (rule RULE)" (template)')
    tag: str | None = Field(None, description="only notify URLs carrying this Apprise tag")


@cache
def _apprise() -> Any:
    """The apprise module with its service modules loaded, once.

    Loading them imports the standard library's ``imghdr``, deprecated since
    Python 3.11; that warning is Apprise's business, not our users'.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'imghdr' is deprecated", DeprecationWarning)
        import apprise
        from apprise.plugins import N_MGR

        N_MGR.load_modules()  # type: ignore[no-untyped-call]
    return apprise


def default_body(ctx: ActionContext) -> str:
    """A short readable summary: ``"<event> on <vm> (rule <rule>)"``."""
    env = ctx.envelope
    return f"{env.get('event', '?')} on {env.get('vm', '?')} (rule {ctx.rule})"


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else "?"


async def run_notify(params: NotifyParams, ctx: ActionContext) -> dict[str, Any]:
    """Send the notice to every URL; TransientActionError when Apprise reports a failure."""
    urls = params.urls or configured_urls(ctx.settings)
    env = ctx.envelope
    title = params.title or f"qmp-reactor: {env.get('event', '?')} on {env.get('vm', '?')}"
    body = params.body or default_body(ctx)
    if not urls:
        # Nobody to tell yet: the log is the notice, so a fresh install loses nothing.
        notice_log.warning("%s: %s", title, body, extra={"rule": ctx.rule, "vm": env.get("vm")})
        return {"notified": 0, "logged": True}
    notifier = _apprise().Apprise()
    for url in urls:
        if not notifier.add(url, tag=params.tag):
            raise PermanentActionError(f"notify: not a valid Apprise URL ({_scheme(url)}...)")
    tags = {"tag": params.tag} if params.tag else {}
    ok = await notifier.async_notify(body=body, title=title, **tags)
    if not ok:
        schemes = ", ".join(sorted({_scheme(url) for url in urls}))
        raise TransientActionError(ctx.redact(f"notify via {schemes} failed"))
    return {"notified": len(urls)}


def configured_urls(settings: ActionSettings) -> list[str]:
    """The operator's default URLs (``actions.notify.urls``), if a configuration gave any."""
    return list(settings.extra.get("notify_urls") or [])


def check_notify(params: NotifyParams, ctx: CheckContext) -> list[str]:
    """URLs written out in full must be ones Apprise understands.

    A rule without ``urls`` uses ``actions.notify.urls`` of the configuration; with
    none there either, notices go to the log (logger ``reactor.notify``).
    """
    written = [(i, url) for i, url in enumerate(params.urls) if not is_template(url)]
    if not written:
        return []  # Apprise takes a tenth of a second to load: not for nothing
    apprise = _apprise()
    return [
        f"urls[{i}]: not a valid Apprise URL ({_scheme(url)}...)"
        for i, url in written
        if apprise.Apprise.instantiate(url) is None
    ]


NOTIFY = ActionType(
    name="notify",
    params=NotifyParams,
    run=run_notify,
    check=check_notify,
    description="Send a readable notice through Apprise URLs (mail, chat, push services).",
)


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``notify``."""
    register(NOTIFY)
