"""Durations as operators write them: ``250ms``, ``10s``, ``5m``, ``1h`` or plain seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds for ``"250ms"``/``"10s"``/``"5m"``/``"1h"``/``"1d"`` or a non-negative number.

    Raises ValueError with a message fit for the user otherwise.
    """
    if type(value) in (int, float) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"invalid duration {value!r}: write e.g. 250ms, 10s, 5m or 1h")


def secs(seconds: float) -> str:
    """A duration as said in messages: ``10s``, ``0.5s``."""
    return f"{seconds:g}s"
