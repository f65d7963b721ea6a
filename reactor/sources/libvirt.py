"""libvirt as an event source: every domain of a libvirt connection is a VM.

On hosts where libvirt owns each QEMU's monitor, ``LibvirtSource`` holds one
read-write connection to a libvirt URI and registers for every raw QMP event of
every domain (``virConnectDomainQemuMonitorEventRegister``: QEMU's own event
and timestamp, no second monitor, no taint) and for the domains' lifecycle
events. Each running domain is a ``LibvirtDomain`` named by its domain name;
domains that start later are picked up, and ones that stop are dropped, from
the lifecycle events.

libvirt refuses the QMP event API on a read-only connection; that is said in
one line. When libvirtd goes away the connection's close callback ends every
domain's session (``REACTOR_DISCONNECTED``), and the source reconnects with
the usual capped, jittered backoff, registers again and announces every running
domain afresh with its state (events emitted meanwhile are lost).

libvirt-python is an optional extra (``pip install 'qmp-reactor[libvirt]'``);
``load_binding`` says how to install it. libvirtaio dispatches libvirt's events
on the running asyncio loop; every libvirt call is made on that loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_random_exponential

from reactor.errors import ConfigError
from reactor.sources.domain import LibvirtDomain
from reactor.sources.envelopes import OnEnvelope, OnState
from reactor.sources.metadata import NAMESPACE, domain_labels
from reactor.sources.vm import STABLE_AFTER, Labels, SessionFailed

log = logging.getLogger(__name__)

INSTALL = (
    "--libvirt needs libvirt-python: pip install 'qmp-reactor[libvirt]' "
    "(it builds against libvirt's headers: apt-get install libvirt-dev pkg-config gcc)"
)
READ_ONLY = (
    "%s: libvirt refuses QMP events on a read-only connection; qmp-reactor needs "
    "read-write access (libvirt's read-write socket: root, or the libvirt group)"
)
RESTART_PAUSE = 1.0
"""Seconds before a source that hit a bug of ours starts over."""

SEQ_MEMORY = 4096
"""Domains whose last ``seq`` is remembered after they stopped."""

# virDomainEventType of the lifecycle callback
EVENT_STARTED, EVENT_STOPPED = 2, 5
STOPPED_DETAIL = {
    0: "shut down",
    1: "destroyed",
    2: "crashed",
    3: "migrated",
    4: "saved",
    5: "failed",
    6: "snapshot",
}


@dataclass(frozen=True, slots=True)
class Binding:
    """libvirt-python's three modules."""

    api: Any
    qemu: Any
    aio: Any


def load_binding() -> Binding:
    """libvirt-python, or a ``ConfigError`` saying how to install it."""
    try:
        import libvirt
        import libvirt_qemu
        import libvirtaio
    except ImportError as err:
        raise ConfigError(INSTALL) from err
    return Binding(libvirt, libvirt_qemu, libvirtaio)


def use_asyncio(lv: Binding, loop: asyncio.AbstractEventLoop) -> None:
    """Have libvirt dispatch its events on ``loop`` before any connection, and keep its
    errors off stderr (we log the ones that matter).

    libvirt takes one event implementation per process: a second event loop cannot
    have it (a ``RuntimeError``, our bug; the daemon runs one loop).
    """
    current = lv.aio.getCurrentImpl()
    if current is None:
        lv.aio.virEventRegisterAsyncIOImpl(loop=loop)
    elif current.loop is not loop:
        raise RuntimeError("libvirt's events already go to another event loop of this process")
    lv.api.registerErrorHandler(_quiet, None)


def _quiet(context: object, error: object) -> None:
    """libvirt's error handler: say nothing (the caller gets the error as an exception)."""


class LibvirtSource:
    """The domains of one libvirt URI, as VMs; ``run`` keeps the connection up until cancelled.

    A domain's labels are those of its ``<metadata>`` (``reactor.sources.metadata``,
    read again when libvirt says they changed) with ``labels(name, uri)``, the
    configuration's, laid over them.
    """

    def __init__(
        self,
        uri: str,
        on_envelope: OnEnvelope,
        *,
        on_state: OnState | None = None,
        backoff_max: float = 2.0,
        binding: Binding | None = None,
        labels: Labels | None = None,
    ) -> None:
        self.uri = uri
        self._labels = labels
        self._own: dict[str, dict[str, Any]] = {}
        """Each known domain's labels from its ``<metadata>``."""
        self.backoff_max = backoff_max
        self._lv = binding if binding is not None else load_binding()
        self._on_envelope = on_envelope
        self._on_state = on_state
        self._domains: dict[str, LibvirtDomain] = {}
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._conn: Any = None
        self._closed: asyncio.Event | None = None
        self._close_reason = ""
        self._failures = 0
        self._read_only_said = False

    # -- lookup -----------------------------------------------------------------------

    def get(self, vm: str) -> LibvirtDomain | None:
        """The domain called ``vm``, if it runs on this libvirt."""
        return self._domains.get(vm)

    def connections(self) -> list[LibvirtDomain]:
        """Every domain known now."""
        return list(self._domains.values())

    def relabel(self, labels: Labels | None) -> None:
        """Where the configuration's labels come from, for every domain from now on."""
        self._labels = labels
        for domain in self._domains.values():
            self._label(domain)

    def _label(self, domain: LibvirtDomain) -> None:
        given = self._labels(domain.name, self.uri) if self._labels is not None else {}
        domain.labels = {**self._own.get(domain.name, {}), **given}

    # -- the connection ---------------------------------------------------------------

    async def run(self) -> None:
        """Connect, follow the domains, reconnect when libvirt goes away; until cancelled."""
        use_asyncio(self._lv, asyncio.get_running_loop())
        while True:
            try:
                await self._follow()
            except Exception:
                log.exception("%s: libvirt source failed; starting over", self.uri)
                self._drop_all("qmp-reactor's libvirt source failed")
                self._close()
                await asyncio.sleep(RESTART_PAUSE)

    async def _follow(self) -> None:
        wait = wait_random_exponential(multiplier=0.1, max=self.backoff_max)
        while True:  # a session that lasted starts the backoff afresh
            retrying = AsyncRetrying(
                stop=stop_never, wait=wait, retry=retry_if_exception_type(SessionFailed)
            )
            async for attempt in retrying:
                with attempt:
                    await self._session()

    async def _session(self) -> None:
        started = time.monotonic()
        self._open()
        try:
            assert self._closed is not None
            await self._closed.wait()
        finally:
            self._drop_all(self._close_reason or "closed by qmp-reactor")
            self._close()
        reason = self._close_reason
        if time.monotonic() - started < STABLE_AFTER:
            self._failed(f"session ended early: {reason}")
        log.warning("%s: %s (reconnecting)", self.uri, reason)

    def _open(self) -> None:
        api = self._lv.api
        self._closed = asyncio.Event()
        self._close_reason = ""
        try:
            self._conn = api.open(self.uri)
            self._conn.registerCloseCallback(self._on_close, None)
            self._conn.setKeepAlive(5, 3)
            self._conn.domainEventRegisterAny(
                None, api.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
            self._conn.domainEventRegisterAny(
                None, api.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None
            )
            self._lv.qemu.qemuMonitorEventRegister(self._conn, None, None, self._on_qmp, None, 0)
            version = self._conn.getVersion()
            domains = self._conn.listAllDomains(api.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except api.libvirtError as err:
            self._close()
            self._refused(err)
        self._failures = 0
        self._read_only_said = False
        log.info("%s: connected to libvirt (%d running domains)", self.uri, len(domains))
        for dom in domains:
            self._see(dom, version)

    def _refused(self, err: Any) -> None:
        text = " ".join(str(err).split())
        if err.get_error_code() == self._lv.api.VIR_ERR_OPERATION_DENIED and "read only" in text:
            if not self._read_only_said:
                self._read_only_said = True
                log.error(READ_ONLY, self.uri)
            raise SessionFailed(text)
        self._failed(text)

    def _failed(self, reason: str) -> None:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "%s: %s (retrying)", self.uri, reason)
        raise SessionFailed(reason)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()

    def _on_close(self, conn: Any, reason: int, opaque: object) -> None:
        why = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}
        self._close_reason = f"libvirt closed the connection ({why.get(reason, reason)})"
        if self._closed is not None:
            self._closed.set()

    # -- domains ----------------------------------------------------------------------

    def _see(self, dom: Any, version: int | None = None) -> LibvirtDomain | None:
        """The domain of ``dom``, announced if it was not known."""
        name = dom.name()
        known = self._domains.get(name)
        if known is not None:
            return known
        domain = LibvirtDomain(
            self.uri,
            name,
            dom.UUIDString(),
            self._on_envelope,
            self._lv.api,
            self._lv.qemu,
            on_state=self._on_state,
            seq=self._seqs.pop(name, 0),
        )
        self._domains[name] = domain
        try:
            self._own[name] = domain_labels(dom, self._lv.api)
            self._label(domain)
            if version is None:
                version = self._conn.getVersion() if self._conn is not None else 0
            domain.begin(dom, version or 0)
        except self._lv.api.libvirtError as err:
            log.debug("%s: %s went away while being announced: %s", self.uri, name, err)
            self._drop(domain, "gone while being announced")
            return None
        return domain

    def _drop(self, domain: LibvirtDomain, reason: str) -> None:
        domain.end(reason)
        if self._domains.get(domain.name) is domain:
            del self._domains[domain.name]
            self._own.pop(domain.name, None)
        self._seqs[domain.name] = domain.seq
        self._seqs.move_to_end(domain.name)
        while len(self._seqs) > SEQ_MEMORY:
            self._seqs.popitem(last=False)

    def _drop_all(self, reason: str) -> None:
        for domain in list(self._domains.values()):
            self._drop(domain, reason)

    def _on_qmp(
        self,
        conn: Any,
        dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: object,
        opaque: object,
    ) -> None:
        try:
            domain = self._domains.get(dom.name()) or self._see(dom)
            if domain is not None and isinstance(event, str):
                domain.qmp_event(event, seconds, micros, details)
        except Exception:
            log.exception("%s: QMP event %r not delivered", self.uri, event)

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: object) -> None:
        try:
            name = dom.name()
            if event == EVENT_STOPPED:
                domain = self._domains.get(name)
                if domain is not None:
                    self._drop(domain, f"domain {STOPPED_DETAIL.get(detail, 'stopped')}")
            elif name not in self._domains and dom.isActive():
                self._see(dom)
        except Exception:
            log.exception("%s: lifecycle event %d of a domain not handled", self.uri, event)

    def _on_metadata(self, conn: Any, dom: Any, kind: int, uri: str | None, opaque: object) -> None:
        try:
            domain = self._domains.get(dom.name())
            if (
                domain is None
                or kind != self._lv.api.VIR_DOMAIN_METADATA_ELEMENT
                or uri != NAMESPACE
            ):
                return
            self._own[domain.name] = domain_labels(dom, self._lv.api)
            self._label(domain)
            log.info("%s: labels from <metadata> read again", domain.name)
        except Exception:
            log.exception("%s: metadata change of a domain not handled", self.uri)
