"""One connection to libvirtd and the callbacks registered on it.

``Link.open`` opens a URI, registers the close callback, keepalive, the
lifecycle and metadata events and every raw QMP event of every domain, and
reads the version and running domains; ``Link.close`` takes all of that back
and closes. Both block (they talk to libvirtd) and run on a ``Calls`` thread
(``reactor.sources.lvthreads``); libvirt calls the callbacks on its event thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KEEPALIVE = (5, 3)
"""Seconds between keepalive probes, and probes unanswered before libvirt closes."""


@dataclass(frozen=True, slots=True)
class Callbacks:
    """What libvirt calls on its event thread; each gets ``tag`` (of ``Link.open``) last."""

    close: Callable[[Any, int, object], None]
    lifecycle: Callable[[Any, Any, int, int, object], None]
    metadata: Callable[[Any, Any, int, str | None, object], None]
    qmp: Callable[[Any, Any, str, int, int, object, object], None]


@dataclass(slots=True)
class Link:
    """An open connection (``conn``) and what was registered on it, to take back."""

    conn: Any
    qemu: Any
    """The ``libvirt_qemu`` module."""
    events: list[int] = field(default_factory=list)
    qmp: int | None = None
    close_callback: bool = False

    @classmethod
    def open(
        cls, api: Any, qemu: Any, uri: str, callbacks: Callbacks, tag: object
    ) -> tuple[Link, int, list[Any]]:
        """The link to ``uri``, libvirt's hypervisor version and the running domains
        (``virDomain``); raises ``libvirtError``, with nothing left open."""
        link = cls(api.open(uri), qemu)
        try:
            conn = link.conn
            conn.registerCloseCallback(callbacks.close, tag)
            link.close_callback = True
            conn.setKeepAlive(*KEEPALIVE)
            for event, callback in (
                (api.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callbacks.lifecycle),
                (api.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, callbacks.metadata),
            ):
                link.events.append(conn.domainEventRegisterAny(None, event, callback, tag))
            link.qmp = qemu.qemuMonitorEventRegister(conn, None, None, callbacks.qmp, tag, 0)
            return link, conn.getVersion(), conn.listAllDomains(api.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except BaseException:
            link.close()
            raise

    def close(self) -> None:
        """Deregister everything, then close; quietly (libvirtd may be gone)."""
        conn = self.conn
        for callback in self.events:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(callback)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qemu.qemuMonitorEventDeregister(conn, self.qmp)
        if self.close_callback:
            with contextlib.suppress(Exception):
                conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()


def close_once_open(future: concurrent.futures.Future[tuple[Link, int, list[Any]]]) -> None:
    """Close, on a thread of its own, the link a ``Link.open`` that nobody waits for any
    more gives (a done callback of its future)."""
    if not future.cancelled() and future.exception() is None:
        link = future.result()[0]
        threading.Thread(target=link.close, name="libvirt-close", daemon=True).start()
