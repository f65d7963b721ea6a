"""The exception tree of qmp-reactor.

::

    ReactorError                 root: anything this package raises on purpose
    ├── UserError                the operator's mistake; printed as one line, exit 1
    │   ├── RuleError            a rule file is wrong (carries FILE:LINE:COL)
    │   ├── ConfigError          a configuration file or flag is wrong
    │   └── PluginError          a plugin failed to load or to register (names it;
    │                            FILE:LINE of a broken plugin file)
    ├── JournalError             a journal read or write failed (reactor.dispatch.journal)
    └── ActionError              an action invocation failed
        ├── TransientActionError   worth retrying (connection refused, 5xx, timeout)
        │   └── ActionNotDue       not a failure: run it again after ``retry_after``, no slot
        │                          held and no attempt spent meanwhile (a restart's backoff)
        └── PermanentActionError   retrying cannot help (4xx, refused by policy)

Outside the root, errors a layer raises and handles itself (or that extend
what the library beneath it raises)::

    ValueError
    ├── TemplateSyntaxProblem    a template that does not compile (reactor.params.templates;
    │                            ``check`` reports it located)
    ├── PathSyntaxError          a JSONPath that does not parse (reactor.rules.paths; same)
    └── RegexError               a ``matches`` pattern RE2 cannot run in linear time
                                 (reactor.rules.regex; same)
    qemu.qmp.error.ProtocolError
    └── WireError                a QMP line that is not a JSON object, or too long
                                 (reactor.sources.session; ends that session only)
    Exception
    ├── SessionFailed            a session that could not start or ended too soon; worth a
    │                            backoff (reactor.sources.vm)
    └── QmpError                 the demo's own QMP client failed (reactor.demo.machine)
        └── QmpCommandError      QEMU answered a command with an error
    RuntimeError
    └── QemuStartError           the demo's QEMU did not start (reactor.demo.machine)

A ``UserError`` is never a bug of ours: the CLI prints each of its
``diagnostics`` (or ``str(err)``) as one line and exits 1. Anything else keeps
its traceback, because it is one. Every exception class in the package is in
one of these trees or private (``_Name``); ``tests/test_errors.py`` holds it so.
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


class PluginError(UserError):
    """A plugin that failed to import or to register; the message names it.

    With ``location`` (a broken plugin file) the error is one located line,
    ``FILE:LINE: error: MESSAGE``, both as ``str`` and as its one diagnostic.
    """

    def __init__(self, message: str, location: Location | None = None) -> None:
        diagnostics = [Diagnostic(location, message)] if location is not None else []
        super().__init__(str(diagnostics[0]) if diagnostics else message, diagnostics)
        self.location = location


class ActionError(ReactorError):
    """An action invocation failed."""


class TransientActionError(ActionError):
    """A failure worth retrying; ``retry_after`` (seconds) is a hint from the peer."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ActionNotDue(TransientActionError):
    """The action may not act before ``retry_after`` seconds from now (a backoff it keeps).

    Not a failure: the dispatcher runs the invocation again then, holds no concurrency
    slot while it waits and does not count the attempt against the rule's ``retry:``.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)


class PermanentActionError(ActionError):
    """A failure that retrying cannot mend; the invocation goes to the dead letters."""
