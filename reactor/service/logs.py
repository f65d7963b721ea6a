"""Logging set-up: text for people, JSON lines for log shippers, secrets masked.

Both formats escape control characters (``reactor.params.display``), whatever
the logger and whoever wrote the message: one record is one line, and nothing
a guest sends can forge another line or reach the reader's terminal raw.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from reactor.engine.core import Held
from reactor.params.display import escape, escape_json
from reactor.params.secrets import RedactingFilter, Redactor

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``fmt`` (``TEXT_FORMAT``) with the message escaped to one line; a traceback follows indented.

    Every traceback line starts with two spaces, so a message inside it cannot
    pass for a record of its own either.
    """

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = escape(self.formatMessage(record))
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in extra:
            line += "".join(f"\n  {escape(part)}" for part in text.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and extra fields."""

    FIELDS = ("vm", "event", "seq", "rule", "action", "outcome", "invocation")

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                obj[name] = getattr(record, name)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return escape_json(orjson.dumps(obj, default=str).decode())


def setup_logging(*, verbose: bool, fmt: str, redactor: Redactor, stream: Any = None) -> None:
    """Configure the root logger once: INFO (DEBUG with ``verbose``), text or JSON.

    Every line is masked by ``redactor`` (the one the reactor's secrets resolve into).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("reactor").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("qemu.qmp", "httpx", "httpcore", "apprise"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


DROPPED_SHOWN = 20
"""Held events named one by one when dropped; the rest are counted."""


def log_kept(held: Sequence[Held], why: str, where: object) -> None:
    """Say how many held events ``why`` (a stop) leaves in the engine's state at ``where``:
    they fire at their window's end after the next start (late if it ended meanwhile)."""
    if held:
        logging.getLogger("reactor.engine").info(
            "%s: %d held event(s) kept in %s; they fire when their window ends after the start",
            why,
            len(held),
            where,
        )


def log_dropped(held: Sequence[Held], why: str, log: logging.Logger | None = None) -> None:
    """Say, as warnings, which held events ``why`` (a stop, a reload) drops unfired.

    An event held by QEMU's stage or a rule's ``once_after``/``qemu`` window waits
    for the window's end; a stop or a reload before it loses the firing, and
    that must not be silent. The first ``DROPPED_SHOWN`` are named, the rest counted.
    """
    if not held:
        return
    log = log or logging.getLogger("reactor.engine")
    log.warning(
        "%s: %d held event(s) dropped before their window ended; they will not fire",
        why,
        len(held),
    )
    for item in held[:DROPPED_SHOWN]:
        env = item.envelope
        holder = f"rule {item.rule}'s throttle" if item.rule is not None else "QEMU's rate limit"
        log.warning(
            "%s: dropped %s on %s (seq %s, %d event(s)) held by %s",
            why,
            env.get("event"),
            env.get("vm"),
            env.get("seq"),
            item.events,
            holder,
            extra={"vm": env.get("vm"), "event": env.get("event"), "seq": env.get("seq"),
                   "rule": item.rule, "outcome": "dropped"},
        )  # fmt: skip
    if len(held) > DROPPED_SHOWN:
        log.warning("%s: and %d more held events dropped", why, len(held) - DROPPED_SHOWN)
