"""What an action type is, and what it gets when it runs.

An action type is registered by a plugin (built-ins included) through the
``reactor_register_actions(register)`` hook. It declares its parameters as a
pydantic model, checked at ``check`` time against the rule's ``with:`` mapping,
and an async ``run`` that raises ``TransientActionError`` for failures worth a
retry and ``PermanentActionError`` for the rest. The dispatcher owns retries,
timeouts, the journal and concurrency; an action only does its one thing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict

from reactor.durations import parse_duration
from reactor.model import Envelope


class VmControl(Protocol):
    """The QMP connection of the VM that sent the event, for actions that act on it."""

    name: str

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        """Run one QMP command; ``cause`` (rule, action) marks the events it provokes."""
        ...


@dataclass(slots=True)
class ActionSettings:
    """Operator settings actions obey; from the configuration file."""

    exec_enabled: bool = False
    qmp_allowlist: frozenset[str] = frozenset(
        {"cont", "stop", "system_reset", "system_powerdown", "query-status"}
    )
    restart_limit: int = 3
    restart_window: float = 600.0
    restart_backoff: Mapping[str, Any] | None = None
    """The configuration's ``actions.restart.backoff`` (``{initial, max, reset_after}``, in
    seconds): the crash-loop backoff of a ``restart_vm`` whose ``with:`` sets none."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ActionContext:
    """Everything one attempt of one action invocation may use."""

    invocation_id: str
    idempotency_key: str
    rule: str
    action_index: int
    envelope: Envelope
    context: Mapping[str, Any]
    attempt: int
    settings: ActionSettings
    vm: VmControl | None = None
    emit: Callable[[str, dict[str, Any]], None] | None = None
    """Raise a synthetic event (e.g. REACTOR_RESTART_SUPPRESSED) for the event's VM."""
    dry_run: bool = False
    redact: Callable[[str], str] = str
    """Mask the secrets resolved so far (the reactor's redactor): use it on any text an
    action shows (errors, logs, results) that may quote a rendered parameter."""


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What ``check`` knows when it validates an action's parameters."""

    settings: ActionSettings
    rule: str


RunFn = Callable[[Any, ActionContext], Awaitable[Any]]
CheckFn = Callable[[Any, CheckContext], list[str]]


@dataclass(frozen=True, slots=True)
class ActionType:
    """A registered action type.

    ``params`` validates ``with:``; ``run(params, ctx)`` gets the validated model
    after templates and secrets were rendered; ``check(params, ctx)`` returns
    extra problems found at load time (e.g. a command not on the allowlist).
    """

    name: str
    params: type[BaseModel]
    run: RunFn
    description: str = ""
    check: CheckFn | None = None
    plugin: str = ""


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written as a number or with a unit (ms, s, m, h, d)."""


class ActionParams(BaseModel):
    """Base of built-in parameter models: unknown parameters are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginState(Protocol):
    """A plugin's own durable state: JSON values under string keys (``reactor_state``'s store).

    One namespace per plugin (its registered name) in the engine's state file;
    no plugin sees another's keys. ``put`` and ``delete`` are committed before
    they return, so what they wrote survives a kill -9. Each key remembers when
    it was last written (wall clock, ``time.time``), for pruning what went stale.
    """

    def get(self, key: str) -> Any | None:
        """The value kept under ``key``, or None."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Keep ``value`` (anything ``json.dumps`` takes) under ``key``, durably, now."""
        ...

    def delete(self, key: str) -> None:
        """Forget ``key`` (nothing if it is not there)."""
        ...

    def items(self) -> list[tuple[str, Any]]:
        """Every (key, value), by key."""
        ...

    def written(self, key: str) -> float | None:
        """When ``key`` was last written (``time.time``), or None if it is not there."""
        ...

    def entries(self) -> list[tuple[str, Any, float]]:
        """Every (key, value, when it was last written), by key."""
        ...
