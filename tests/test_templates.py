"""Templates: compiled once, rendered in a sandbox, strict about undefined names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reactor.errors import PermanentActionError
from reactor.params.secrets import Redactor, SecretResolver
from reactor.params.templates import (
    TemplateSyntaxProblem,
    compile_params,
    find_problems,
    format_path,
    template_problems,
    template_variables,
)

ENVELOPE = {
    "event": "BLOCK_IMAGE_CORRUPTED",
    "data": {"node-name": "disk0", "fatal": True, "msg": "bad L2 table"},
    "timestamp": {"seconds": 1700000000, "microseconds": 5},
    "vm": "web1",
    "host": "hv1",
    "source": "/run/qmp/web1.sock",
    "seq": 17,
    "received_at": 1700000000.25,
}


def render(params: dict, envelope: dict | None = None, **kw: object) -> dict:
    variables = template_variables(envelope or ENVELOPE, rule="corrupt", context={"count": 3})
    return compile_params(params).render(variables, **kw)  # type: ignore[arg-type]


def test_envelope_fields_and_firing_context_render() -> None:
    out = render(
        {
            "a": "{{ vm }}/{{ data['node-name'] }}",
            "b": "{{ rule }} x{{ count }} seq={{ seq }} {{ envelope.host }}",
            "c": "{{ now.year }}",
        }
    )
    assert out == {"a": "web1/disk0", "b": "corrupt x3 seq=17 hv1", "c": "2023"}


def test_nested_structures_keep_shape_and_non_strings() -> None:
    out = render({"h": {"X-Vm": "{{ vm }}", "n": 5}, "argv": ["echo", "{{ event }}"], "t": True})
    assert out == {
        "h": {"X-Vm": "web1", "n": 5},
        "argv": ["echo", "BLOCK_IMAGE_CORRUPTED"],
        "t": True,
    }


def test_templates_render_to_strings_and_tojson_gives_json() -> None:
    out = render({"fatal": "{{ data.fatal }}", "json": "{{ data | tojson }}"})
    assert out["fatal"] == "True"
    assert out["json"] == '{"node-name": "disk0", "fatal": true, "msg": "bad L2 table"}'


def test_now_is_an_aware_utc_datetime() -> None:
    variables = template_variables(ENVELOPE, rule="r", now=0.0)
    assert variables["now"] == datetime(1970, 1, 1, tzinfo=UTC)
    assert variables["count"] == 1


def test_undefined_variable_fails_loudly_naming_the_parameter() -> None:
    with pytest.raises(PermanentActionError, match=r"headers\.X-Id: undefined.*'vmname'"):
        render({"headers": {"X-Id": "{{ vmname }}"}})
    with pytest.raises(PermanentActionError, match="undefined"):
        render({"m": "{{ data.no_such_field }}"})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ now.__class__ }}",
        "{{ data.__class__.__base__.__subclasses__() }}",
        "{{ data.clear() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(PermanentActionError, match="sandbox"):
        render({"m": source})
    assert ENVELOPE["data"]["node-name"] == "disk0"  # nothing was mutated


def test_underscore_data_keys_are_data_not_attributes() -> None:
    out = render({"m": "{{ data._x }}"}, {**ENVELOPE, "data": {"_x": "ok"}})
    assert out == {"m": "ok"}


def test_event_data_cannot_inject_templates_or_secret_references() -> None:
    hostile = {**ENVELOPE, "data": {"msg": "{{ 7*7 }} {% if 1 %}x{% endif %} ${env:HOME}"}}
    resolver = SecretResolver(Redactor(), environ={"HOME": "/root"})
    out = render({"m": "got: {{ data.msg }}"}, hostile, secrets=resolver)
    assert out == {"m": "got: {{ 7*7 }} {% if 1 %}x{% endif %} ${env:HOME}"}


def test_syntax_errors_are_found_at_compile_with_path_and_line() -> None:
    with pytest.raises(TemplateSyntaxProblem) as info:
        compile_params({"body": {"text": "ok\n{{ vm "}})
    assert info.value.path == ("body", "text")
    assert info.value.lineno == 2
    problems = find_problems({"a": "{% if %}", "b": ["fine", "{{ }}"], "c": "plain"})
    assert [p.path for p in problems] == [("a",), ("b", 1)]


def test_template_problems_pairs_paths_and_messages() -> None:
    problems = template_problems({"a": "${vault:x}", "b": "one\n{{ x"})
    assert problems[0] == (("a",), problems[0][1])
    assert "unknown secret reference ${vault:x}" in problems[0][1]
    assert problems[1][0] == ("b",) and "line 2" in problems[1][1]


def test_strings_without_markup_are_left_alone() -> None:
    out = render({"m": "costs $5 {not a template}", "shell": "echo ${HOME}"})
    assert out == {"m": "costs $5 {not a template}", "shell": "echo ${HOME}"}


def test_format_path() -> None:
    assert format_path(("argv", 2)) == "argv[2]"
    assert format_path(("headers", "X-A")) == "headers.X-A"
    assert format_path(()) == "<params>"
