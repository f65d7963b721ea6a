"""Checking an action's ``with:`` parameters against its type, at load time.

The action type's pydantic model validates the parameters as written; its
errors are mapped back to the YAML node of the parameter. The type's own
``check`` adds policy problems (an ``exec`` that is disabled, a ``qmp`` command
not on the allowlist). Template syntax is checked when templates are available.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from reactor.errors import Diagnostic, Location
from reactor.model import ActionSpec
from reactor.params.secrets import secret_warnings
from reactor.params.templates import template_problems
from reactor.plugins.api import ActionSettings, ActionType, CheckContext


def _where(spec: ActionSpec, loc: tuple[Any, ...], *, key: bool = False) -> Location:
    if key and loc and hasattr(spec.params, "key_loc"):
        where: Location = spec.params.key_loc(loc[0])
        return where
    if loc and isinstance(loc[0], str) and loc[0] in spec.param_locations:
        return spec.param_locations[loc[0]]
    return getattr(spec.params, "location", spec.location)


def _pydantic_problems(kind: ActionType, spec: ActionSpec) -> tuple[Any, list[Diagnostic]]:
    try:
        return kind.params.model_validate(dict(spec.params)), []
    except ValidationError as err:
        diags = []
        for e in err.errors():
            loc = tuple(e.get("loc", ()))
            name = ".".join(str(p) for p in loc) or "with"
            if e.get("type") == "missing":
                msg = f"{spec.type}: missing required parameter '{name}'"
            elif e.get("type") == "extra_forbidden":
                known = ", ".join(kind.params.model_fields)
                msg = f"{spec.type}: unknown parameter '{name}' (known: {known})"
            else:
                msg = f"{spec.type}: parameter '{name}': {e.get('msg', 'invalid')}"
            extra = e.get("type") == "extra_forbidden"
            diags.append(Diagnostic(_where(spec, loc, key=extra), msg))
        return None, diags


def _template_problems(spec: ActionSpec) -> list[Diagnostic]:
    errors = [
        Diagnostic(_where(spec, path), f"{spec.type}: {message}")
        for path, message in template_problems(spec.params)
    ]
    warnings = [
        Diagnostic(_where(spec, path), f"{spec.type}: {message}", "warning")
        for path, message in secret_warnings(spec.params)
    ]
    return errors + warnings


def validate_action(
    kind: ActionType, spec: ActionSpec, rule: str, settings: ActionSettings
) -> list[Diagnostic]:
    """Every problem with ``spec``'s parameters, located at their YAML nodes."""
    model, diags = _pydantic_problems(kind, spec)
    diags.extend(_template_problems(spec))
    if model is not None and kind.check is not None:
        where = getattr(spec.params, "location", spec.location)
        for message in kind.check(model, CheckContext(settings=settings, rule=rule)):
            diags.append(Diagnostic(where, f"{spec.type}: {message}"))
    return diags
