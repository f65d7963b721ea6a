"""Old import path of the hooks, kept working: use ``from reactor import hookimpl, Register``."""

from reactor.plugins.hookspecs import (
    PROJECT,
    ActionOutcome,
    OutcomeStatus,
    Register,
    hookimpl,
    hookspec,
)

__all__ = ["PROJECT", "ActionOutcome", "OutcomeStatus", "Register", "hookimpl", "hookspec"]
