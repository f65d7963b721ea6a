"""Checking an action's ``with:`` parameters at load, and rendering them per attempt.

``check_action`` is what ``check`` calls for each action of each rule: template
and secret-reference syntax, unknown or ill-typed parameters (validated on the
text as written, before rendering), then the type's own policy check.
``prepare_action`` compiles once at load; ``PreparedAction.run`` is what the
dispatcher awaits for each attempt.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from reactor.actions.base import ActionContext, ActionType, CheckContext
from reactor.errors import PermanentActionError
from reactor.secrets import SecretResolver, find_references, redact, reference_warning
from reactor.templates import (
    CompiledParams,
    ParamPath,
    compile_params,
    find_problems,
    format_path,
    template_variables,
)


@dataclass(frozen=True, slots=True)
class ParamProblem:
    """A problem in one parameter: ``path`` inside ``with:``, ``lineno`` inside the string."""

    path: ParamPath
    message: str
    lineno: int = 0
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{format_path(self.path)}: {self.message}"


def check_action(
    action_type: ActionType,
    params: Mapping[str, Any],
    ctx: CheckContext,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[ParamProblem]:
    """Every problem ``check`` should report for one action; empty when it is fine.

    Secrets are never read: an unset ``${env:NAME}`` is only a warning.
    """
    problems = [ParamProblem(p.path, p.message, p.lineno) for p in find_problems(params)]
    problems += _secret_warnings(params, (), environ)
    try:
        model = action_type.params.model_validate(dict(params))
    except ValidationError as err:
        return problems + _validation_problems(action_type, err)
    if action_type.check is not None:
        problems += [ParamProblem((), message) for message in action_type.check(model, ctx)]
    return problems


def _secret_warnings(
    value: Any, path: ParamPath, environ: Mapping[str, str] | None
) -> list[ParamProblem]:
    if isinstance(value, str):
        warnings = (reference_warning(ref, environ) for ref in find_references(value))
        return [ParamProblem(path, w, severity="warning") for w in warnings if w]
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    return [p for key, item in items for p in _secret_warnings(item, (*path, key), environ)]


def _validation_problems(action_type: ActionType, err: ValidationError) -> list[ParamProblem]:
    known = sorted(action_type.params.model_fields)
    problems = []
    for error in err.errors(include_url=False, include_input=False):
        path: ParamPath = tuple(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden" and len(path) == 1:
            message = _unknown_parameter(action_type.name, str(path[0]), known)
        elif error["type"] == "missing":
            message = f"missing required parameter of {action_type.name}"
        problems.append(ParamProblem(path, message))
    return problems


def _unknown_parameter(action: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown parameter {name!r} for {action}; {hint}known: {', '.join(known)}"


def prepare_action(action_type: ActionType, params: Mapping[str, Any]) -> PreparedAction:
    """Compile ``params``' templates once; raises TemplateSyntaxProblem (``check`` reports it)."""
    return PreparedAction(action_type, compile_params(params))


@dataclass(frozen=True, slots=True)
class PreparedAction:
    """An action type with its compiled parameters: render and run, once per attempt."""

    action_type: ActionType
    params: CompiledParams

    def render(
        self, variables: Mapping[str, Any], *, secrets: SecretResolver | None = None
    ) -> BaseModel:
        """The validated parameter model for ``variables``; PermanentActionError if invalid."""
        rendered = self.params.render(variables, secrets=secrets)
        try:
            return self.action_type.params.model_validate(rendered)
        except ValidationError as err:
            details = "; ".join(
                f"{format_path(tuple(e['loc']))}: {e['msg']}"
                for e in err.errors(include_url=False, include_input=False)
            )
            raise PermanentActionError(
                redact(f"{self.action_type.name}: rendered parameters are invalid: {details}")
            ) from None  # the cause quotes rendered values, which may hold secrets

    async def run(
        self, ctx: ActionContext, *, now: float | None = None, secrets: SecretResolver | None = None
    ) -> Any:
        """Render for ``ctx``'s envelope and firing context, then run the action once."""
        variables = template_variables(ctx.envelope, rule=ctx.rule, context=ctx.context, now=now)
        model = self.render(variables, secrets=secrets)
        return await self.action_type.run(model, ctx)
