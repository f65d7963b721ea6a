"""Building blocks for action parameter models: strict models and durations."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string like ``"10s"``, ``"250ms"``, ``"5m"``, ``"1h"``.

    Anything else is returned unchanged for pydantic to reject with its own message.
    """
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (like 10s, 250ms, 5m, 1h)")
        return float(match[1]) * _UNITS[match[2] or "s"]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written as a number or with a unit (ms, s, m, h, d)."""


class ActionParams(BaseModel):
    """Base of built-in parameter models: unknown parameters are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
