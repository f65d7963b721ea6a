"""Where QMP sockets are: address parsing, VM names from addresses, and glob scans.

An address is a unix socket path or ``host:port``. Everything here is a plain
function on strings and the file system (no asyncio, no QMP), so the connection
layers above can share it and tests can call it directly.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from reactor.errors import ConfigError

TcpAddress = tuple[str, int]

_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:/\[\]]*):(?P<port>\d+)$")

PROXMOX_SUFFIX = ".reactor"
"""A socket stem ending in this (``101.reactor.qmp``) names the VM before it (``101``)."""


def parse_address(address: str) -> str | TcpAddress:
    """A unix socket path, or ``(host, port)`` for ``host:port`` (``[v6]:port`` too).

    Anything with a ``/`` in it, or without a ``:PORT`` ending, is a path.
    Raises ``ConfigError`` for an empty address or a port out of range.
    """
    if not address:
        raise ConfigError("empty QMP address")
    match = None if "/" in address else _HOST_PORT.match(address)
    if match is None:
        return address
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ConfigError(f"{address}: port {port} is out of range 1-65535")
    return match["host"].strip("[]"), port


def default_vm_name(address: str) -> str:
    """The VM name an address implies: a socket file's stem, or the address itself.

    ``/run/qemu/web-1.qmp`` is ``web-1``; Proxmox-style ``101.reactor.qmp`` is ``101``.
    """
    parsed = parse_address(address)
    if isinstance(parsed, tuple):
        return address
    stem = Path(parsed).stem or parsed
    if stem.endswith(PROXMOX_SUFFIX) and len(stem) > len(PROXMOX_SUFFIX):
        stem = stem[: -len(PROXMOX_SUFFIX)]
    return stem


MAX_VM_NAME = 256
"""Longest VM name a listener's peer may claim with ``query-name``."""


def usable_vm_name(name: str) -> bool:
    """Whether a name a peer claimed can name a VM: printable (no control characters, no
    line breaks to forge log lines with) and at most ``MAX_VM_NAME`` characters."""
    return 0 < len(name) <= MAX_VM_NAME and name.isprintable()


def is_loopback(host: str) -> bool:
    """Whether a listening host is loopback-only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_identity(path: str) -> tuple[int, int, int] | None:
    """Identity of the socket file at ``path`` (device, inode, ctime), or None if absent.

    A QEMU that restarts unlinks and re-creates its socket, so the identity
    changes even when the file system hands out the same inode number again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def scan_globs(patterns: Iterable[str]) -> set[str]:
    """The unix sockets matching any of ``patterns`` right now (other files are skipped)."""
    found: set[str] = set()
    for pattern in patterns:
        for path in glob.glob(pattern):
            if socket_identity(path) is not None:
                found.add(path)
    return found


def check_dial_address(address: str) -> None:
    """Raise ``ConfigError`` unless ``address`` parses and, if a path, is a socket now."""
    parsed = parse_address(address)
    if isinstance(parsed, tuple):
        return
    if not os.path.exists(parsed):
        raise ConfigError(f"{address}: no such socket")
    if socket_identity(parsed) is None:
        raise ConfigError(f"{address}: not a unix socket")
