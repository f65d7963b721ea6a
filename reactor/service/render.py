"""Rendering an invocation's parameters: templates, secrets, then the action's validation.

One ``Renderer`` belongs to one generation (``reactor.service.generation``): its
caches of compiled templates live and die with the rules they were made for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from reactor.dispatch.invocation import Invocation
from reactor.errors import PermanentActionError
from reactor.params.secrets import SecretResolver
from reactor.params.templates import (
    CompiledParams,
    compile_params,
    format_path,
    is_template,
    template_variables,
)
from reactor.plugins.api import ActionType


class Renderer:
    """Renders an invocation's raw ``with:`` parameters: templates, secrets, validation.

    Compiled templates are cached by their source, so a resumed invocation (whose
    rule may have changed since) renders exactly what was journaled. A rule's own
    parameters are also found by identity, without serialising them; parameters
    with no template or secret are rendered without building template variables.
    """

    def __init__(self, resolver: SecretResolver | None = None, limit: int = 4096) -> None:
        self.resolver = resolver or SecretResolver()
        self.limit = limit
        self._cache: dict[bytes, tuple[CompiledParams, bool]] = {}
        # Keyed by id(); each entry keeps its params alive, so an id is never reused meanwhile.
        self._by_id: dict[int, tuple[Mapping[str, Any], CompiledParams, bool]] = {}

    def _compiled(self, params: Mapping[str, Any]) -> tuple[CompiledParams, bool]:
        """The compiled params, and whether they hold any template or secret reference."""
        mine = self._by_id.get(id(params))
        if mine is not None and mine[0] is params:
            return mine[1], mine[2]
        key = orjson.dumps(params, option=orjson.OPT_SORT_KEYS, default=str)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self.limit:
                self._cache.clear()
            found = self._cache[key] = (compile_params(params), _templated(params))
        if len(self._by_id) >= self.limit:
            self._by_id.clear()
        self._by_id[id(params)] = (params, *found)
        return found

    def __call__(self, inv: Invocation, kind: ActionType) -> BaseModel:
        """The validated parameter model for ``inv``; PermanentActionError if invalid."""
        compiled, templated = self._compiled(inv.spec.params)
        variables = (
            template_variables(inv.envelope, rule=inv.rule, context=inv.context, now=time.time())
            if templated
            else {}  # nothing would read them
        )
        rendered = compiled.render(variables, secrets=self.resolver)
        try:
            return kind.params.model_validate(rendered)
        except ValidationError as err:
            details = "; ".join(
                f"{format_path(tuple(e['loc']))}: {e['msg']}"
                for e in err.errors(include_url=False, include_input=False)
            )
            raise PermanentActionError(
                self.resolver.redactor.redact(
                    f"{kind.name}: rendered parameters are invalid: {details}"
                )
            ) from None


def _templated(value: Any) -> bool:
    """Whether ``value`` holds a string that ``compile_params`` compiles."""
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, Mapping):
        return any(_templated(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_templated(v) for v in value)
    return False
