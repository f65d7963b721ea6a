"""Old import path of the action-type API, kept working: use ``from reactor import ActionType``."""

from reactor.plugins.api import (
    ActionContext,
    ActionSettings,
    ActionType,
    CheckContext,
    CheckFn,
    RunFn,
    VmControl,
)

__all__ = [
    "ActionContext",
    "ActionSettings",
    "ActionType",
    "CheckContext",
    "CheckFn",
    "RunFn",
    "VmControl",
]
