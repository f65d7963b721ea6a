"""Action parameters as Jinja2 templates: compiled once at load, rendered per invocation.

Templates run in Jinja's ``ImmutableSandboxedEnvironment`` with ``StrictUndefined``
and no loader: no file access, no ``_``-prefixed attributes, no mutation of the
event, and a misspelt variable fails loudly instead of rendering empty. Every
template renders to a string (``"{{ data.offset }}"`` gives ``"42"``, not ``42``);
``tojson`` turns a value into JSON text. Only the rule author's text is compiled:
event data is passed as values, so a guest writing ``{{ 7*7 }}`` into an event
field gets those characters back, never 49.

Secret references (``reactor.params.secrets``) are rewritten in the source, before
compiling, into calls of a ``__secret__`` function bound at render time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from reactor.errors import ActionError, PermanentActionError
from reactor.model import Envelope
from reactor.params.secrets import SecretRef, SecretResolver, find_references, reference_problem

ParamPath = tuple[str | int, ...]
SECRET_FUNCTION = "__secret__"


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; we never produce HTML.
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    env.filters["tojson"] = _tojson
    return env


ENVIRONMENT = _make_environment()


class TemplateSyntaxProblem(ValueError):
    """A parameter whose template or secret reference does not compile.

    ``path`` locates the parameter inside ``with:`` (keys and list indexes);
    ``lineno`` is the 1-based line inside the string (0 when unknown).
    """

    def __init__(self, path: ParamPath, message: str, lineno: int = 0) -> None:
        super().__init__(f"{format_path(path)}: {message}")
        self.path = path
        self.message = message
        self.lineno = lineno


def format_path(path: ParamPath) -> str:
    """``("headers", "X-Token")`` as ``headers.X-Token``; list indexes as ``argv[1]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "<params>"


def is_template(text: str) -> bool:
    """Whether ``text`` is compiled: it has Jinja markup or a secret reference."""
    return "{{" in text or "{%" in text or bool(find_references(text))


@dataclass(frozen=True, slots=True)
class _Template:
    path: ParamPath
    template: jinja2.Template
    secrets: tuple[SecretRef, ...]


def _rewrite_secrets(text: str, refs: list[SecretRef]) -> str:
    out, last = [], 0
    for index, ref in enumerate(refs):
        out += [text[last : ref.start], f"{{{{ {SECRET_FUNCTION}({index}) }}}}"]
        last = ref.end
    return "".join([*out, text[last:]])


def _compile_string(path: ParamPath, text: str) -> _Template:
    refs = find_references(text)
    for ref in refs:
        problem = reference_problem(ref)
        if problem:
            raise TemplateSyntaxProblem(path, problem, text.count("\n", 0, ref.start) + 1)
    try:
        template = ENVIRONMENT.from_string(_rewrite_secrets(text, refs))
    except jinja2.TemplateSyntaxError as err:
        message = f"template syntax error: {err.message}"
        raise TemplateSyntaxProblem(path, message, err.lineno) from err
    return _Template(path, template, tuple(refs))


def _compile(value: Any, path: ParamPath, problems: list[TemplateSyntaxProblem]) -> Any:
    if isinstance(value, str):
        if not is_template(value):
            return value
        try:
            return _compile_string(path, value)
        except TemplateSyntaxProblem as problem:
            problems.append(problem)
            return value
    if isinstance(value, Mapping):
        return {key: _compile(item, (*path, key), problems) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_compile(item, (*path, i), problems) for i, item in enumerate(value)]
    return value


def find_problems(params: Mapping[str, Any]) -> list[TemplateSyntaxProblem]:
    """Every template or secret-reference syntax problem in ``params`` (for ``check``)."""
    problems: list[TemplateSyntaxProblem] = []
    _compile(params, (), problems)
    return problems


def template_problems(params: Mapping[str, Any]) -> list[tuple[ParamPath, str]]:
    """``(path, message)`` for every problem ``find_problems`` finds, the line folded in."""
    return [
        (p.path, f"{p.message} (line {p.lineno} of the string)" if p.lineno > 1 else p.message)
        for p in find_problems(params)
    ]


def compile_params(params: Mapping[str, Any]) -> CompiledParams:
    """Compile every templated string of ``params`` once; raises the first TemplateSyntaxProblem."""
    problems: list[TemplateSyntaxProblem] = []
    tree = _compile(params, (), problems)
    if problems:
        raise problems[0]
    return CompiledParams(tree)


class CompiledParams:
    """A ``with:`` mapping whose templated strings are compiled, ready to render."""

    def __init__(self, tree: dict[str, Any]) -> None:
        self._tree = tree

    def render(
        self, variables: Mapping[str, Any], *, secrets: SecretResolver | None = None
    ) -> dict[str, Any]:
        """A new mapping with every template rendered to a string.

        An undefined variable, a sandbox violation, any other render failure or a
        missing secret raises PermanentActionError naming the parameter.
        """
        resolver = secrets or SecretResolver()
        rendered: dict[str, Any] = self._render(self._tree, dict(variables), resolver)
        return rendered

    def _render(self, node: Any, variables: dict[str, Any], resolver: SecretResolver) -> Any:
        if isinstance(node, _Template):
            return _render_one(node, variables, resolver)
        if isinstance(node, dict):
            return {k: self._render(v, variables, resolver) for k, v in node.items()}
        if isinstance(node, list):
            return [self._render(v, variables, resolver) for v in node]
        return node


def _render_one(node: _Template, variables: dict[str, Any], resolver: SecretResolver) -> str:
    if node.secrets:
        variables = {**variables, SECRET_FUNCTION: _secret_function(node.secrets, resolver)}
    try:
        return node.template.render(variables)
    except ActionError:
        raise
    except jinja2.exceptions.SecurityError as err:
        raise PermanentActionError(
            f"parameter {format_path(node.path)}: blocked by the template sandbox: {err}"
        ) from err
    except jinja2.UndefinedError as err:
        raise PermanentActionError(
            f"parameter {format_path(node.path)}: undefined in template: {err.message}"
        ) from err
    except Exception as err:
        raise PermanentActionError(
            f"parameter {format_path(node.path)}: template failed: {type(err).__name__}: {err}"
        ) from err


def _secret_function(refs: tuple[SecretRef, ...], resolver: SecretResolver) -> Callable[[int], str]:
    def secret(index: int) -> str:
        ref = refs[index]
        return resolver.resolve(ref.kind, ref.ref)

    return secret


def template_variables(
    envelope: Envelope,
    *,
    rule: str,
    context: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """What templates see: the envelope's fields, ``rule``, ``count``, ``envelope``, ``now``.

    ``context`` is the firing's window context (``count`` defaults to 1); ``now``
    (epoch seconds, default the envelope's ``received_at``) becomes an aware UTC
    datetime.
    """
    ctx = dict(context or {})
    moment = now if now is not None else float(envelope.get("received_at") or 0.0)
    return {
        **envelope,
        "rule": rule,
        "count": ctx.get("count", 1),
        "context": ctx,
        "envelope": envelope,
        "now": datetime.fromtimestamp(moment, UTC),
    }
