"""Server mode: QEMUs connect to us, as Proxmox's qmeventd has them do.

Each QEMU is started with a client chardev pointing at our socket
(``-chardev socket,id=r,path=SOCK,reconnect=5 -mon chardev=r,mode=control``).
We accept every connection, speak QMP as the *client* on it (QEMU still greets
and we negotiate), and hand the ready link to ``on_link`` together with what we
know of the peer (``PeerInfo``: a label, ``pid-1234`` for a unix socket or
``host:port`` for TCP, its identity and credentials). Every
accepted connection runs in its own task; one failing never touches the others.

Nobody who connects is trusted. A unix socket is created 0600 (0660 with a
configured group) and the peer's uid/gid (``SO_PEERCRED``) can be limited
further (``ListenPolicy``); a TCP listener lets every local user in, so it is
allowed but logged. Concurrent handshakes and sessions are capped: at a cap we
stop accepting (the kernel's backlog holds the rest), so a flood of idle
connections costs a bounded number of file descriptors and never the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPError

from reactor.errors import ConfigError
from reactor.sources.discovery import is_loopback, parse_address, socket_identity
from reactor.sources.session import MAX_MESSAGE, QmpLink, describe, discard

log = logging.getLogger(__name__)

ACCEPT_ERROR_PAUSE = 0.5
"""Seconds to wait after a failed accept() (e.g. out of file descriptors)."""

BACKLOG = 128

FULL_WARN_EVERY = 60.0
"""Seconds between warnings that a listener's cap is reached (an attack must not flood the log)."""


@dataclass(frozen=True, slots=True)
class ListenPolicy:
    """Who may connect to a listener, and how many at once.

    ``group``: the gid owning a unix socket (mode 0660), else it is 0600.
    ``uids``/``gids``: when either is set, a peer is accepted only if its uid is
    in ``uids`` or its primary gid in ``gids`` (a peer without credentials, over
    TCP, is then refused). ``max_handshakes`` and ``max_sessions`` cap the
    connections still greeting and the announced ones.
    """

    group: int | None = None
    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None
    max_handshakes: int = 64
    max_sessions: int = 1024

    @property
    def restricted(self) -> bool:
        """Whether peers are filtered by credentials."""
        return self.uids is not None or self.gids is not None

    def admits(self, peer: PeerInfo) -> bool:
        """Whether ``peer``'s credentials pass the uid/gid filter."""
        if not self.restricted:
            return True
        if peer.uid is None:
            return False
        return peer.uid in (self.uids or ()) or peer.gid in (self.gids or ())


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """An accepted peer: ``label`` names a VM that does not tell its name;
    ``identity`` is the same only for the same QEMU process (pid and its start
    time), so a reconnect of that process is the same source and anything else is
    a new one; ``uid``/``gid`` are the kernel's (unix sockets only)."""

    label: str
    identity: str
    uid: int | None = None
    gid: int | None = None


OnLink = Callable[[QmpLink, PeerInfo], Awaitable[None]]


def bind(address: str, policy: ListenPolicy | None = None) -> socket.socket:
    """A listening, non-blocking socket on ``address`` (stale unix sockets are replaced).

    A unix socket is 0600, or 0660 owned by ``policy.group``. Raises
    ``ConfigError`` if the address is taken or not usable.
    """
    parsed = parse_address(address)
    group = policy.group if policy is not None else None
    try:
        if isinstance(parsed, tuple):
            sock = _bind_tcp(address, *parsed)
        else:
            sock = _bind_unix(parsed, group)
    except OSError as err:
        raise ConfigError(f"{address}: cannot listen: {err.strerror or err}") from err
    sock.setblocking(False)
    return sock


def _bind_tcp(address: str, host: str, port: int) -> socket.socket:
    host = host or "127.0.0.1"
    if not is_loopback(host):
        log.warning("listening on %s: not loopback, anyone who reaches it can send events", address)
    else:
        log.warning("listening on %s: every local user can connect over TCP; prefer a unix socket",
                    address)  # fmt: skip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def _bind_unix(path: str, group: int | None) -> socket.socket:
    if os.path.lexists(path):
        if socket_identity(path) is None:
            raise ConfigError(f"{path}: exists and is not a socket")
        if _in_use(path):
            raise ConfigError(f"{path}: another process is listening there")
        os.unlink(path)  # left behind by a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Nobody can connect before listen(), so setting the mode here has no race.
        os.chmod(path, 0o600 if group is None else 0o660)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _peer_creds(conn: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket's peer as the kernel recorded it at connect()."""
    if conn.family != socket.AF_UNIX:
        return None
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if unreadable.

    With the pid it names one process for the machine's uptime: a pid reused by
    another process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # the command name may hold spaces
    return fields[19].decode() if len(fields) > 19 else None


def peer_info(conn: socket.socket, serial: int) -> PeerInfo:
    """What we know of an accepted peer; ``serial`` makes an unprovable identity unique."""
    creds = _peer_creds(conn)
    if creds is not None:
        pid, uid, gid = creds
        start = process_start(pid) if pid > 0 else None
        identity = f"pid-{pid}.{start}" if start else f"pid-{pid}.conn-{serial}"
        return PeerInfo(f"pid-{pid}", identity, uid, gid)
    if conn.family == socket.AF_UNIX:
        return PeerInfo("unix-peer", f"conn-{serial}")
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return PeerInfo("unknown-peer", f"conn-{serial}")
    label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return PeerInfo(label, label)  # a TCP reconnect comes from another port: a new source


async def serve(
    address: str,
    on_link: OnLink,
    *,
    greeting_timeout: float = 5.0,
    max_message: int = MAX_MESSAGE,
    policy: ListenPolicy | None = None,
) -> None:
    """Accept QEMU connections on ``address`` until cancelled; each goes to ``on_link``."""
    policy = policy or ListenPolicy()
    listener = bind(address, policy)
    log.info("listening for QEMU on %s", address)
    gate = _Gate(address, policy)
    try:
        async with asyncio.TaskGroup() as group:
            for serial in itertools.count(1):
                conn = await gate.accept(listener)
                peer = peer_info(conn, serial)
                if not policy.admits(peer):
                    log.warning("%s: refused %s (uid %s, gid %s): not in listener.allow",
                                address, peer.label, peer.uid, peer.gid)  # fmt: skip
                    gate.release(handshake=True)
                    conn.close()
                    continue
                group.create_task(_accepted(conn, peer, on_link, gate, greeting_timeout,
                                            max_message))  # fmt: skip
    finally:
        listener.close()
        parsed = parse_address(address)
        if isinstance(parsed, str):
            with contextlib.suppress(OSError):
                os.unlink(parsed)


class _Every:
    """A warning at most once per ``seconds``; the repeats in between go to debug."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = float("-inf")

    def level(self) -> int:
        """The level to log at now."""
        now = time.monotonic()
        if now - self.last < self.seconds:
            return logging.DEBUG
        self.last = now
        return logging.WARNING


class _Gate:
    """The listener's caps: accept only with a handshake slot and a session slot free."""

    def __init__(self, address: str, policy: ListenPolicy) -> None:
        self.address = address
        self.policy = policy
        self.handshakes = asyncio.Semaphore(policy.max_handshakes)
        self.sessions = asyncio.Semaphore(policy.max_sessions)
        self._full = _Every(FULL_WARN_EVERY)
        self._failed = _Every(1.0)

    async def accept(self, listener: socket.socket) -> socket.socket:
        """The next connection, once both a handshake and a session slot are held."""
        await self._slot(self.sessions, "sessions", self.policy.max_sessions)
        await self._slot(self.handshakes, "handshakes", self.policy.max_handshakes)
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as err:
                log.warning("accept on %s failed: %s", self.address, describe(err))
                await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            return conn

    async def _slot(self, sem: asyncio.Semaphore, what: str, cap: int) -> None:
        if sem.locked():
            log.log(self._full.level(), "%s: %d %s at once: not accepting until one ends",
                    self.address, cap, what)  # fmt: skip
        await sem.acquire()

    def handshake_failed(self, peer: PeerInfo, err: BaseException) -> None:
        """Log a failed handshake: a warning at most once a second, the rest at debug."""
        log.log(self._failed.level(), "QMP handshake with %s failed: %s", peer.label,
                describe(err))  # fmt: skip

    def release(self, *, handshake: bool = False, session: bool = True) -> None:
        """Give back the slots a connection held."""
        if handshake:
            self.handshakes.release()
        if session:
            self.sessions.release()


async def _accepted(
    conn: socket.socket,
    peer: PeerInfo,
    on_link: OnLink,
    gate: _Gate,
    greeting_timeout: float,
    max_message: int,
) -> None:
    link = QmpLink(max_message)
    try:
        try:
            async with asyncio.timeout(greeting_timeout):
                await link.connect(conn)
        except (QMPError, OSError, TimeoutError) as err:
            gate.handshake_failed(peer, err)
            return
        finally:
            gate.release(handshake=True, session=False)
        try:
            await on_link(link, peer)
        except Exception:
            log.exception("session with %s failed", peer.label)
    finally:
        await discard(link)
        conn.close()
        gate.release()
