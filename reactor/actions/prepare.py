"""An action ready to run: its type and its compiled parameters.

``prepare_action`` compiles the ``with:`` templates once, at load;
``PreparedAction.run`` is what the dispatcher awaits for each attempt: render
the parameters for the event, validate them, run the action once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from reactor.errors import PermanentActionError
from reactor.params.secrets import SecretResolver
from reactor.params.templates import CompiledParams, compile_params, format_path, template_variables
from reactor.plugins.api import ActionContext, ActionType


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
        resolver = secrets or SecretResolver()
        rendered = self.params.render(variables, secrets=resolver)
        try:
            return self.action_type.params.model_validate(rendered)
        except ValidationError as err:
            details = "; ".join(
                f"{format_path(tuple(e['loc']))}: {e['msg']}"
                for e in err.errors(include_url=False, include_input=False)
            )
            raise PermanentActionError(
                resolver.redactor.redact(
                    f"{self.action_type.name}: rendered parameters are invalid: {details}"
                )
            ) from None  # the cause quotes rendered values, which may hold secrets

    async def run(
        self, ctx: ActionContext, *, now: float | None = None, secrets: SecretResolver | None = None
    ) -> Any:
        """Render for ``ctx``'s envelope and firing context, then run the action once."""
        variables = template_variables(ctx.envelope, rule=ctx.rule, context=ctx.context, now=now)
        model = self.render(variables, secrets=secrets)
        return await self.action_type.run(model, ctx)
