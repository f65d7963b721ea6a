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
``load_binding`` says how to install it.

Threads (``reactor.sources.lvthreads``): libvirt runs its default event loop on
a thread of its own, and calls the callbacks here on it; they only post what
they got to the asyncio loop (``call_soon_threadsafe``, in order, so a domain's
events keep theirs), tagged with the connection they came from so that a late
one of a closed connection is dropped. Every call to libvirtd (connecting,
reading a domain's state and labels, the domains' commands) runs on the
source's ``Calls`` threads and is awaited (the connection itself:
``reactor.sources.lvlink``), so a slow or hung libvirtd never holds the loop,
and with it the other VMs, back. All the state of the source and its domains is
the loop's; only the name and UUID libvirt hands over with a domain (fields of
the object, no call to libvirtd) are read on the loop. A domain's events that
come while its state and labels are read wait for its announcement.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_random_exponential

from reactor.errors import ConfigError
from reactor.sources.domain import SHUTOFF, LibvirtDomain
from reactor.sources.envelopes import OnEnvelope, OnState
from reactor.sources.lvlink import Callbacks, Link, close_once_open
from reactor.sources.lvthreads import Calls, post, start_events
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
CLOSE_REASON = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}


@dataclass(frozen=True, slots=True)
class Binding:
    """libvirt-python's two modules."""

    api: Any
    qemu: Any


def load_binding() -> Binding:
    """libvirt-python, or a ``ConfigError`` saying how to install it."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as err:
        raise ConfigError(INSTALL) from err
    return Binding(libvirt, libvirt_qemu)


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
        self._own: dict[str, tuple[int, dict[str, Any]]] = {}
        """Each known domain's labels from its ``<metadata>``, after the read that gave them."""
        self._reads = itertools.count(1)
        self.backoff_max = backoff_max
        self._lv = binding if binding is not None else load_binding()
        self._on_envelope = on_envelope
        self._on_state = on_state
        self._domains: dict[str, LibvirtDomain] = {}
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._calls = Calls("libvirt-calls")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Link | None = None
        self._tag: object | None = None
        """The current connection's tag; callbacks of any other are dropped."""
        self._version = 0
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._close_reason = ""
        self._tasks: set[asyncio.Task[None]] = set()
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
        own = self._own.get(domain.name, (0, {}))[1]
        domain.labels = {**own, **given}

    def _own_labels(self, domain: LibvirtDomain, read: int, labels: dict[str, Any]) -> bool:
        """Take ``labels`` of ``domain``'s ``<metadata>`` unless a later read gave some."""
        if read < self._own.get(domain.name, (0, {}))[0]:
            return False
        self._own[domain.name] = (read, labels)
        self._label(domain)
        return True

    # -- the connection ---------------------------------------------------------------

    async def run(self) -> None:
        """Connect, follow the domains, reconnect when libvirt goes away; until cancelled."""
        self._loop = asyncio.get_running_loop()
        start_events(self._lv.api)
        self._lv.api.registerErrorHandler(_quiet, None)
        try:
            while True:
                try:
                    await self._follow()
                except Exception:
                    log.exception("%s: libvirt source failed; starting over", self.uri)
                    self._end("qmp-reactor's libvirt source failed")
                    await asyncio.sleep(RESTART_PAUSE)
        finally:
            self._end("closed by qmp-reactor")
            self._calls.close()

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
        try:
            await self._open()
            await self._closed.wait()
        finally:
            self._end(self._close_reason or "closed by qmp-reactor")
        reason = self._close_reason
        if time.monotonic() - started < STABLE_AFTER:
            self._failed(f"session ended early: {reason}")
        log.warning("%s: %s (reconnecting)", self.uri, reason)

    async def _open(self) -> None:
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._close_reason = ""
        tag = self._tag = object()
        callbacks = Callbacks(self._on_close, self._on_lifecycle, self._on_metadata, self._on_qmp)
        lv = self._lv
        future = self._calls.submit(Link.open, lv.api, lv.qemu, self.uri, callbacks, tag)
        try:
            link, version, domains = await asyncio.wrap_future(future)
        except self._lv.api.libvirtError as err:
            self._refused(err)
        except asyncio.CancelledError:
            future.add_done_callback(close_once_open)
            raise
        self._link, self._version = link, version
        self._opened.set()
        self._failures = 0
        self._read_only_said = False
        log.info("%s: connected to libvirt (%d running domains)", self.uri, len(domains))
        for dom in domains:
            self._see(dom, dom.name())

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

    def _end(self, reason: str) -> None:
        """End every domain's session, forget the connection and close it on a thread."""
        self._drop_all(reason)
        self._tag = None
        for task in self._tasks:
            task.cancel()
        link, self._link = self._link, None
        if link is not None:
            self._calls.submit(link.close)

    def _closed_by_libvirt(self, tag: object, reason: int) -> None:
        if tag is not self._tag:
            return
        self._close_reason = f"libvirt closed the connection ({CLOSE_REASON.get(reason, reason)})"
        self._closed.set()

    # -- libvirt's callbacks (on its event thread: they only post to the loop) --------

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        if self._loop is not None:
            post(self._loop, fn, *args)

    def _on_close(self, conn: Any, reason: int, tag: object) -> None:
        self._post(self._closed_by_libvirt, tag, reason)

    def _on_qmp(
        self,
        conn: Any,
        dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: object,
        tag: object,
    ) -> None:
        received = time.time()
        self._post(self._qmp, tag, dom, event, seconds, micros, details, received)

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, tag: object) -> None:
        self._post(self._lifecycle, tag, dom, event, detail)

    def _on_metadata(self, conn: Any, dom: Any, kind: int, uri: str | None, tag: object) -> None:
        self._post(self._metadata, tag, dom, kind, uri)

    # -- domains ----------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _see(self, dom: Any, name: str) -> LibvirtDomain:
        """The domain of ``dom``; one not known yet is announced once its state is read."""
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
            self._calls,
            on_state=self._on_state,
            seq=self._seqs.pop(name, 0),
        )
        self._domains[name] = domain
        self._spawn(self._announce(domain, dom), f"libvirt:{self.uri}:{name}")
        return domain

    def _lookup(self, dom: Any) -> tuple[dict[str, Any], tuple[int, int]]:
        """A domain's labels and ``(state, reason)`` (on a ``Calls`` thread)."""
        labels = domain_labels(dom, self._lv.api)
        state, reason = dom.state()
        return labels, (state, reason)

    async def _announce(self, domain: LibvirtDomain, dom: Any) -> None:
        """Read the domain's labels and state, then announce it (its events wait meanwhile)."""
        read = next(self._reads)
        labels: dict[str, Any] = {}
        state: tuple[int, int] | None = None
        try:
            labels, state = await self._calls.run(self._lookup, dom)
        except self._lv.api.libvirtError as err:
            log.debug("%s: %s went away while being announced: %s", self.uri, domain.name, err)
        except Exception:
            log.exception("%s: %s not looked up", self.uri, domain.name)
        await self._opened.wait()  # the connection's version is known
        if self._domains.get(domain.name) is not domain:
            return  # dropped meanwhile
        if state is None or state[0] == SHUTOFF:
            self._drop(domain, "gone while being announced")
            return
        try:
            self._own_labels(domain, read, labels)
            domain.begin(dom, state, self._version)
        except Exception:
            log.exception("%s: %s not announced", self.uri, domain.name)
            self._drop(domain, "not announced")

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

    # -- events, on the loop ----------------------------------------------------------

    def _qmp(
        self,
        tag: object,
        dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: object,
        received: float,
    ) -> None:
        if tag is not self._tag:
            return
        try:
            domain = self._see(dom, dom.name())
            if isinstance(event, str):
                domain.qmp_event(event, seconds, micros, details, received)
        except Exception:
            log.exception("%s: QMP event %r not delivered", self.uri, event)

    def _lifecycle(self, tag: object, dom: Any, event: int, detail: int) -> None:
        if tag is not self._tag:
            return
        try:
            name = dom.name()
            if event == EVENT_STOPPED:
                domain = self._domains.get(name)
                if domain is not None:
                    self._drop(domain, f"domain {STOPPED_DETAIL.get(detail, 'stopped')}")
            else:
                self._see(dom, name)  # one that does not run is dropped once its state is read
        except Exception:
            log.exception("%s: lifecycle event %d of a domain not handled", self.uri, event)

    def _metadata(self, tag: object, dom: Any, kind: int, uri: str | None) -> None:
        if tag is not self._tag:
            return
        try:
            domain = self._domains.get(dom.name())
            if (
                domain is None
                or kind != self._lv.api.VIR_DOMAIN_METADATA_ELEMENT
                or uri != NAMESPACE
            ):
                return
            self._spawn(self._reread(domain, dom), f"libvirt:{self.uri}:{domain.name}:labels")
        except Exception:
            log.exception("%s: metadata change of a domain not handled", self.uri)

    async def _reread(self, domain: LibvirtDomain, dom: Any) -> None:
        read = next(self._reads)
        try:
            labels = await self._calls.run(domain_labels, dom, self._lv.api)
        except Exception:
            log.exception("%s: labels in <metadata> of %s not read", self.uri, domain.name)
            return
        if self._domains.get(domain.name) is domain and self._own_labels(domain, read, labels):
            log.info("%s: labels from <metadata> read again", domain.name)
