"""The event source of the engine: QMP connections to every VM on this host.

``ConnectionManager`` owns one ``VmConnection`` per VM, each in its own task, so
one VM failing (crashed QEMU, garbage on the socket, a peer that never greets)
never touches another. VMs come from three places: addresses given explicitly
(``add``), unix sockets matching globs (``watch_globs``: new sockets are picked
up and vanished ones dropped, polled about once a second), and QEMUs that
connect to us (``listen``). Every QMP event, and the synthetic
``REACTOR_CONNECTED`` / ``REACTOR_DISCONNECTED``, reaches ``on_envelope`` as an
envelope; actions find the connection that raised their event with
``lookup(vm, source)``, never another one that took the same name later.

A VM name belongs to one source at a time: a listener's peer that claims a
name another source holds (a dialled VM, connected or not, or another peer) is
refused and hung up on; only the same QEMU process (same pid and start time)
may replace its own session.

Layers: ``discovery`` (addresses, globs) -> ``session`` (one QMP session on
qemu.qmp) -> ``vm`` (envelopes, reconnects) -> ``server`` (server mode) ->
this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError

from reactor.sources import server as listen_mode
from reactor.sources.discovery import (
    default_vm_name,
    parse_address,
    scan_globs,
    usable_vm_name,
)
from reactor.sources.server import ListenPolicy, PeerInfo
from reactor.sources.session import MAX_MESSAGE, Pace, QmpLink
from reactor.sources.vm import Labels, OnEnvelope, OnState, SessionFailed, VmConnection

__all__ = ["ConnectionManager", "VmConnection"]

log = logging.getLogger(__name__)

SEQ_MEMORY = 4096
"""Sources whose last ``seq`` is remembered after their connection is dropped."""

RESTART_PAUSE = 1.0
"""Seconds before a connection task that hit a bug of ours starts over."""


class ConnectionManager:
    """All QMP connections of the sidecar, each one its own task.

    ``names`` maps addresses to VM names (else a socket's stem, or in server mode
    QEMU's ``-name``); ``on_state(vm, connected)`` hears every (dis)connect;
    ``pace`` is asked before each event (``reactor.sources.session.Pace``; may be
    set later, e.g. once the reactor it protects exists); every ``reconcile``
    seconds (0: never) each VM's run state is probed. ``add`` needs a running
    event loop.
    """

    def __init__(
        self,
        on_envelope: OnEnvelope,
        *,
        names: Mapping[str, str] | None = None,
        greeting_timeout: float = 5.0,
        backoff_max: float = 2.0,
        on_state: OnState | None = None,
        max_message: int = MAX_MESSAGE,
        pace: Pace | None = None,
        reconcile: float = 0.0,
        labels: Labels | None = None,
    ) -> None:
        self._on_envelope = on_envelope
        self._names = dict(names or {})
        self._labels = labels
        self._options: dict[str, Any] = {
            "greeting_timeout": greeting_timeout,
            "backoff_max": backoff_max,
            "max_message": max_message,
            "on_state": on_state,
            "pace": pace,
            "reconcile": reconcile,
        }
        self._conns: dict[str, VmConnection] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._by_name: dict[str, VmConnection] = {}
        self._glob_owned: set[str] = set()
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._seq_keys: dict[str, str] = {}

    @property
    def pace(self) -> Pace | None:
        """What each connection asks before delivering an event (None: never wait)."""
        pace: Pace | None = self._options["pace"]
        return pace

    @pace.setter
    def pace(self, pace: Pace | None) -> None:
        self._options["pace"] = pace
        for vm in self._conns.values():
            vm.pace = pace  # taken by each connection's next session

    # -- lookup -----------------------------------------------------------------------

    def get(self, vm: str) -> VmConnection | None:
        """The connection of the VM called ``vm``, if we have one."""
        return self._by_name.get(vm)

    def lookup(self, vm: str, source: str | None = None) -> VmConnection | None:
        """The connection ``source`` (an envelope's) names, if it is still ``vm``'s.

        An event the sidecar raised itself (``source`` None or ``reactor``) goes by
        name. Any other source gets its own connection or none: a peer that took
        the name later never receives another source's actions.
        """
        if source is None or source == "reactor":
            return self._by_name.get(vm)
        conn = self._conns.get(source)
        return conn if conn is not None and conn.name == vm else None

    def connections(self) -> list[VmConnection]:
        """Every connection, connected or not."""
        return list(self._conns.values())

    def rename(self, names: Mapping[str, str]) -> None:
        """Address → VM name for connections made from now on (existing ones keep theirs)."""
        self._names = dict(names)

    def relabel(self, labels: Labels | None) -> None:
        """Where each VM's labels come from, for every connection from now on."""
        self._labels = labels
        for vm in self._conns.values():
            vm.labels = labels(vm.name, vm.address) if labels is not None else {}

    # -- explicit addresses -----------------------------------------------------------

    def add(self, address: str, name: str | None = None) -> VmConnection:
        """Start connecting to ``address`` (kept up until removed); returns its connection.

        Raises ``ConfigError`` for an address that does not parse.
        """
        existing = self._conns.get(address)
        if existing is not None:
            return existing
        target = parse_address(address)
        vm = self._new(address, name or self._names.get(address) or default_vm_name(address))
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._dial(vm, target), name=f"qmp:{vm.name}"
        )
        return vm

    async def remove(self, address: str, reason: str = "removed") -> None:
        """Stop and forget the connection to ``address`` (a no-op if there is none)."""
        vm = self._conns.get(address)
        task = self._tasks.pop(address, None)
        self._glob_owned.discard(address)
        if vm is None or task is None:
            return
        vm.stop_reason = reason
        task.cancel()
        await asyncio.wait([task])
        self._forget(vm)

    async def _dial(self, vm: VmConnection, target: Any) -> None:
        while True:
            try:
                await vm.dial_forever(target)
            except Exception:
                log.exception("%s: connection task failed; starting over", vm.name)
                await asyncio.sleep(RESTART_PAUSE)

    # -- globs ------------------------------------------------------------------------

    async def watch_globs(self, globs: Sequence[str], interval: float = 1.0) -> None:
        """Follow the unix sockets matching ``globs`` until cancelled.

        Run one watcher at a time with every glob: it drops glob-found sockets
        that no longer match. Connections stay when the watcher is cancelled,
        so a new watcher (after a reload) takes them over without a reconnect.
        """
        while True:
            await self.scan_globs(globs)
            await asyncio.sleep(interval)

    async def scan_globs(self, globs: Sequence[str]) -> None:
        """One pass of ``watch_globs``: add new matching sockets, drop vanished ones."""
        found = scan_globs(globs)
        for path in sorted(found):
            if path not in self._conns:
                self.add(path)
                self._glob_owned.add(path)
        for path in sorted(self._glob_owned - found):
            await self.remove(path, reason="socket file removed")

    # -- server mode ------------------------------------------------------------------

    async def listen(self, address: str, policy: ListenPolicy | None = None) -> None:
        """Accept QEMU connections on ``address`` until cancelled (server mode)."""
        await listen_mode.serve(
            address,
            lambda link, peer: self._adopt(link, peer, address),
            greeting_timeout=self._options["greeting_timeout"],
            max_message=self._options["max_message"],
            policy=policy,
        )

    async def _adopt(self, link: QmpLink, peer: PeerInfo, listen_address: str) -> None:
        name = await self._query_name(link)
        if name is not None and not usable_vm_name(name):
            log.warning("%s: refused %s: query-name gave %d characters that cannot name a VM",
                        listen_address, peer.label, len(name))  # fmt: skip
            return
        name = name or peer.label
        source = f"{listen_address}#{name}@{peer.identity}"
        holder = self._by_name.get(name)
        if holder is not None and holder.address != source:
            log.warning("%s: refused %s: VM name %r belongs to %s", listen_address, peer.label,
                        name, holder.address)  # fmt: skip
            return  # the listener hangs up
        previous = self._tasks.pop(source, None)
        if previous is not None:
            # The same QEMU came back before we noticed its old session died: the new one wins.
            self._conns[source].stop_reason = "replaced by a new connection"
            previous.cancel()
            await asyncio.wait([previous])
        self._seq_keys[source] = f"{listen_address}#{name}"  # seq goes on per name
        vm = self._conns.get(source) or self._new(source, name)
        me = asyncio.current_task()
        assert me is not None
        self._tasks[source] = me
        try:
            await vm.serve(link)
        except SessionFailed as err:
            log.warning("%s: %s: %s", name, source, err)
        finally:
            if self._tasks.get(source) is me:
                del self._tasks[source]
                self._forget(vm)

    async def _query_name(self, link: QmpLink) -> str | None:
        try:
            async with asyncio.timeout(self._options["greeting_timeout"]):
                reply = await link.execute("query-name")
        except (QMPError, OSError, TimeoutError):
            return None
        name = reply.get("name") if isinstance(reply, dict) else None
        return name if isinstance(name, str) and name else None

    # -- bookkeeping ------------------------------------------------------------------

    def _new(self, address: str, name: str) -> VmConnection:
        seq = self._seqs.pop(self._seq_keys.get(address, address), 0)
        vm = VmConnection(address, name, self._on_envelope, seq=seq, **self._options)
        if self._labels is not None:
            vm.labels = self._labels(name, address)
        self._conns[address] = vm
        clash = self._by_name.get(name)
        if clash is not None:
            log.warning("VM name %r used by %s and %s", name, clash.address, address)
        self._by_name[name] = vm
        return vm

    def _forget(self, vm: VmConnection) -> None:
        if self._conns.get(vm.address) is vm:
            del self._conns[vm.address]
        if self._by_name.get(vm.name) is vm:
            del self._by_name[vm.name]
        # Remember where seq stopped, so a socket that comes back continues it.
        key = self._seq_keys.pop(vm.address, vm.address)
        self._seqs[key] = vm.seq
        self._seqs.move_to_end(key)
        while len(self._seqs) > SEQ_MEMORY:
            self._seqs.popitem(last=False)

    async def aclose(self) -> None:
        """Close every connection (each ends with REACTOR_DISCONNECTED if it was up)."""
        tasks = list(self._tasks.values())
        for address, task in list(self._tasks.items()):
            self._conns[address].stop_reason = "qmp-reactor is closing"
            task.cancel()
        self._tasks.clear()
        if tasks:
            await asyncio.wait(tasks)
        for vm in list(self._conns.values()):
            self._forget(vm)
        self._glob_owned.clear()

    async def __aenter__(self) -> ConnectionManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            await self.aclose()
