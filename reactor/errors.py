"""The exception tree of qmp-reactor.

::

    ReactorError                 root: anything this package raises on purpose
    ├── UserError                the operator's mistake; printed as one line, exit 1
    │   ├── RuleError            a rule file is wrong (carries FILE:LINE:COL)
    │   └── ConfigError          a configuration file or flag is wrong
    ├── PluginError              a plugin failed to load or to register (names it)
    └── ActionError              an action invocation failed
        ├── TransientActionError   worth retrying (connection refused, 5xx, timeout)
        └── PermanentActionError   retrying cannot help (4xx, refused by policy)

A ``UserError`` is never a bug of ours: the CLI prints ``str(err)`` and exits 1.
Anything else keeps its traceback, because it is one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Location:
    """Where a value sits in a file: 1-based line and column."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        if self.col <= 0:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a rule or configuration file."""

    location: Location
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"


class ReactorError(Exception):
    """Root of every exception this package raises on purpose."""


class UserError(ReactorError):
    """A mistake of the operator's, reported without a traceback."""

    def __init__(self, message: str, diagnostics: list[Diagnostic] | None = None) -> None:
        super().__init__(message)
        self.diagnostics = list(diagnostics or [])


class RuleError(UserError):
    """Rule files that do not compile; ``diagnostics`` lists every problem."""


class ConfigError(UserError):
    """A configuration file or command-line setting that is wrong."""


class PluginError(ReactorError):
    """A plugin that failed to import or to register; the message names it."""


class ActionError(ReactorError):
    """An action invocation failed."""


class TransientActionError(ActionError):
    """A failure worth retrying; ``retry_after`` (seconds) is a hint from the peer."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentActionError(ActionError):
    """A failure that retrying cannot mend; the invocation goes to the dead letters."""
