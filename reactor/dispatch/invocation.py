"""What the dispatcher runs and the journal stores: one action of one firing.

An ``Invocation`` is made when a rule fires (one per action) and lives until it
is done, skipped, cancelled or dead-lettered; its ``id``, a random uuid4, is
also the idempotency key receivers use to spot a repeated delivery.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reactor.model import RetryPolicy

PARK_BYTES = 64 * 1024
"""An unfinished invocation whose envelope is longer than this (as JSON) keeps it only in the
journal while it waits (resumed, or between attempts), and reads it back when an attempt
starts: waiting work costs memory by its count, not by what a guest put in its events."""


@dataclass(frozen=True, slots=True)
class ActionSpecData:
    """An action as it will run: type, raw ``with`` params, effective retry and timeout."""

    type: str
    params: Mapping[str, Any]
    retry: RetryPolicy
    timeout: float


@dataclass(slots=True)
class Invocation:
    """One action of one firing; ``id`` is also the idempotency key."""

    id: str
    firing_id: str
    rule: str
    action_index: int
    spec: ActionSpecData
    mode: str
    vm: str
    event: str
    seq: int | None
    envelope: dict[str, Any]
    context: dict[str, Any]
    created_at: float
    attempts: int = 0
    status: str = "pending"
    last_error: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    died_at: float | None = field(default=None, compare=False)
    row: int | None = field(default=None, compare=False)
    """The row number in ``invocations``, once written."""
    parked: bool = field(default=False, compare=False)
    """True while ``envelope`` is an empty stand-in and the real one waits in the journal
    (a big envelope between attempts, or read back on resume); see ``PARK_BYTES``."""

    @property
    def idempotency_key(self) -> str:
        """The key receivers use to spot a duplicate delivery: the invocation id."""
        return self.id


class _RandomPool:
    """Random bytes fetched 4 KiB at a time: os.urandom is a system call per use."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0
        os.register_at_fork(after_in_child=self.reset)  # a child must not repeat our ids

    def reset(self) -> None:
        self.pool, self.at = b"", 0

    def take(self) -> bytes:
        if self.at >= len(self.pool):
            self.pool, self.at = os.urandom(4096), 0
        self.at += 16
        return self.pool[self.at - 16 : self.at]


_POOL = _RandomPool()
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_id() -> str:
    """A fresh invocation id: a random uuid4 as 32 hex digits."""
    value = int.from_bytes(_POOL.take(), "big") & _UUID4_CLEAR | _UUID4_SET
    return f"{value:032x}"
