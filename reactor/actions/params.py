"""Building blocks for action parameter models: strict models and durations."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from reactor.durations import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written as a number or with a unit (ms, s, m, h, d)."""


class ActionParams(BaseModel):
    """Base of built-in parameter models: unknown parameters are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
