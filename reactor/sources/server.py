"""Server mode: QEMUs connect to us, as Proxmox's qmeventd has them do.

Each QEMU is started with a client chardev pointing at our socket
(``-chardev socket,id=r,path=SOCK,reconnect=5 -mon chardev=r,mode=control``).
We accept every connection, speak QMP as the *client* on it (QEMU still greets
and we negotiate), and hand the ready link to ``on_link`` together with a label
for the peer (``pid-1234`` for a unix socket, ``host:port`` for TCP). Every
accepted connection runs in its own task; one failing never touches the others.

We bind to unix sockets or loopback unless told otherwise: anyone who can
connect can feed us events, so a non-loopback host is allowed but logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from qemu.qmp import QMPError

from reactor.errors import ConfigError
from reactor.sources.discovery import is_loopback, parse_address, socket_identity
from reactor.sources.session import MAX_MESSAGE, QmpLink, describe, discard

log = logging.getLogger(__name__)

OnLink = Callable[[QmpLink, str], Awaitable[None]]

ACCEPT_ERROR_PAUSE = 0.5
"""Seconds to wait after a failed accept() (e.g. out of file descriptors)."""


def bind(address: str) -> socket.socket:
    """A listening, non-blocking socket on ``address`` (stale unix sockets are replaced).

    Raises ``ConfigError`` if the address is taken or not usable.
    """
    parsed = parse_address(address)
    try:
        sock = _bind_tcp(address, *parsed) if isinstance(parsed, tuple) else _bind_unix(parsed)
    except OSError as err:
        raise ConfigError(f"{address}: cannot listen: {err.strerror or err}") from err
    sock.setblocking(False)
    return sock


def _bind_tcp(address: str, host: str, port: int) -> socket.socket:
    host = host or "127.0.0.1"
    if not is_loopback(host):
        log.warning("listening on %s: not loopback, anyone who reaches it can send events", address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def _bind_unix(path: str) -> socket.socket:
    if os.path.lexists(path):
        if socket_identity(path) is None:
            raise ConfigError(f"{path}: exists and is not a socket")
        if _in_use(path):
            raise ConfigError(f"{path}: another process is listening there")
        os.unlink(path)  # left behind by a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
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


def peer_label(conn: socket.socket) -> str:
    """How to call an accepted peer that does not tell its name: its pid or address."""
    if conn.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, _, _ = struct.unpack("3i", creds)
            return f"pid-{pid}"
        return "unix-peer"
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return "unknown-peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    address: str,
    on_link: OnLink,
    *,
    greeting_timeout: float = 5.0,
    max_message: int = MAX_MESSAGE,
) -> None:
    """Accept QEMU connections on ``address`` until cancelled; each goes to ``on_link``."""
    listener = bind(address)
    loop = asyncio.get_running_loop()
    log.info("listening for QEMU on %s", address)
    try:
        async with asyncio.TaskGroup() as group:
            while True:
                try:
                    conn, _ = await loop.sock_accept(listener)
                except OSError as err:
                    log.warning("accept on %s failed: %s", address, describe(err))
                    await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                    continue
                group.create_task(_accepted(conn, on_link, greeting_timeout, max_message))
    finally:
        listener.close()
        parsed = parse_address(address)
        if isinstance(parsed, str):
            with contextlib.suppress(OSError):
                os.unlink(parsed)


async def _accepted(
    conn: socket.socket, on_link: OnLink, greeting_timeout: float, max_message: int
) -> None:
    label = peer_label(conn)
    link = QmpLink(max_message)
    try:
        async with asyncio.timeout(greeting_timeout):
            await link.connect(conn)
    except (QMPError, OSError, TimeoutError) as err:
        log.warning("QMP handshake with %s failed: %s", label, describe(err))
        await discard(link)
        conn.close()
        return
    try:
        await on_link(link, label)
    except Exception:
        log.exception("session with %s failed", label)
    finally:
        await discard(link)
        conn.close()
