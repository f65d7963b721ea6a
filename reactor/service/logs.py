"""Logging set-up: text for people, JSON lines for log shippers, secrets masked."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from reactor.params.secrets import RedactingFilter, Redactor


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
        return orjson.dumps(obj, default=str).decode()


def setup_logging(*, verbose: bool, fmt: str, redactor: Redactor, stream: Any = None) -> None:
    """Configure the root logger once: INFO (DEBUG with ``verbose``), text or JSON.

    Every line is masked by ``redactor`` (the one the reactor's secrets resolve into).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("reactor").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("qemu.qmp", "httpx", "httpcore", "apprise"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
