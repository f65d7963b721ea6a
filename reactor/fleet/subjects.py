"""Subjects and message ids: every name is escaped into one NATS subject token.

A token may hold neither ``.``, ``*``, ``>`` nor white space; names (hosts with
dots, VM names a guest's operator chose) are written with every byte outside
``[A-Za-z0-9_-]`` as ``%XX``, so two names never share a token and a name never
becomes a wildcard. Events go to ``<prefix>.<host>.<vm>.<EVENT>``; commands to a
host to ``<prefix>.<host>.cmd``, which has one token fewer, so the stream
(``<prefix>.*.*.*``) never captures a command.
"""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """``name`` as one subject token (``%`` alone for the empty name)."""
    if not name:
        return "%"
    if not _UNSAFE.search(name):
        return name
    return "".join(
        chr(b) if _SAFE.fullmatch(bytes([b])) else f"%{b:02X}"
        for b in name.encode("utf-8", "surrogateescape")
    )


def untoken(text: str) -> str:
    """The name ``token`` escaped into ``text``."""
    if text == "%":
        return ""
    return re.sub(
        r"(%[0-9A-F]{2})+",
        lambda m: bytes.fromhex(m[0].replace("%", "")).decode("utf-8", "replace"),
        text,
    )


def event_subject(prefix: str, host: str, vm: str, event: str) -> str:
    """Where one event of ``vm`` on ``host`` is published."""
    return f"{prefix}.{token(host)}.{token(vm)}.{token(event)}"


def stream_subjects(prefix: str) -> list[str]:
    """What the stream holds: every event, no command."""
    return [f"{prefix}.*.*.*"]


def command_subject(prefix: str, host: str) -> str:
    """Where ``host``'s sidecar answers commands."""
    return f"{prefix}.{token(host)}.cmd"


def derived_id(*parts: str) -> str:
    """A 32-hex-digit id that the same ``parts`` always give (idempotency keys, invocations)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]
