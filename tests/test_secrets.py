"""Secret references: syntax at check, values at render only, and always redacted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reactor.errors import PermanentActionError
from reactor.params.secrets import (
    RedactingFilter,
    Redactor,
    SecretResolver,
    find_references,
    reference_problem,
    secret_warnings,
)
from reactor.params.templates import compile_params, find_problems, template_variables

ENVELOPE = {"event": "GUEST_PANICKED", "data": {}, "vm": "db1", "seq": 1, "received_at": 0.0}


def render(params: dict, resolver: SecretResolver) -> dict:
    variables = template_variables(ENVELOPE, rule="r")
    return compile_params(params).render(variables, secrets=resolver)


def test_env_and_file_references_resolve_at_render(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-file\n")
    resolver = SecretResolver(Redactor(), environ={"API_KEY": "k-123"})
    out = render(
        {"h": {"Authorization": "Bearer ${env:API_KEY}"}, "t": f"${{file:{token}}}/{{{{ vm }}}}"},
        resolver,
    )
    assert out == {"h": {"Authorization": "Bearer k-123"}, "t": "s3cr3t-file/db1"}


def test_file_reference_strips_exactly_one_trailing_newline(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n\n")
    out = render({"t": f"${{file:{token}}}"}, SecretResolver(Redactor(), environ={}))
    assert out == {"t": "abc\n"}


def test_resolved_values_are_redacted() -> None:
    redactor = Redactor()
    render({"u": "https://x/?k=${env:TOKEN}"}, SecretResolver(redactor, environ={"TOKEN": "tok42"}))
    assert redactor.redact("GET https://x/?k=tok42 failed") == "GET https://x/?k=*** failed"


def test_missing_env_var_names_the_reference_not_a_value() -> None:
    resolver = SecretResolver(Redactor(), environ={"OTHER": "hunter2"})
    with pytest.raises(PermanentActionError) as info:
        render({"k": "${env:MISSING_KEY}"}, resolver)
    assert "${env:MISSING_KEY}" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_unreadable_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentActionError, match=r"\$\{file:.*nope\}: cannot read file"):
        render({"k": f"${{file:{tmp_path / 'nope'}}}"}, SecretResolver(Redactor(), environ={}))


def test_check_validates_syntax_without_reading_values(tmp_path: Path) -> None:
    problems = find_problems(
        {"a": "${vault:x}", "b": "${env:1BAD}", "c": "${file: }", "ok": "${env:GOOD}"}
    )
    assert [p.path for p in problems] == [("a",), ("b",), ("c",)]
    assert reference_problem(find_references(f"${{file:{tmp_path}/absent}}")[0]) is None


def test_secret_warnings_say_unset_without_printing_values() -> None:
    params = {"h": {"A": "${env:SET_ONE}"}, "l": ["${env:UNSET_ONE}"]}
    warnings = secret_warnings(params, environ={"SET_ONE": "value-xyz"})
    assert warnings == [(("l", 0), "environment variable UNSET_ONE of ${env:UNSET_ONE} is not set")]


def test_guest_data_with_a_reference_is_never_resolved() -> None:
    redactor = Redactor()
    resolver = SecretResolver(redactor, environ={"SECRET": "top"})
    envelope = {**ENVELOPE, "data": {"msg": "${env:SECRET}"}}
    out = compile_params({"m": "{{ data.msg }}"}).render(
        template_variables(envelope, rule="r"), secrets=resolver
    )
    assert out == {"m": "${env:SECRET}"}
    assert redactor.redact("top") == "top"  # nothing was resolved


def test_longest_secret_is_masked_whole() -> None:
    redactor = Redactor()
    redactor.add("abc")
    redactor.add("abcdef")
    redactor.add("")
    assert redactor.redact("x abcdef y abc") == "x *** y ***"


def test_redacting_filter_masks_formatted_records(caplog: pytest.LogCaptureFixture) -> None:
    redactor = Redactor()
    redactor.add("pa55")
    logger = logging.getLogger("tests.secrets.filter")
    logger.addFilter(RedactingFilter(redactor))
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("login with %s failed", "pa55")
    finally:
        logger.filters.clear()
    assert caplog.messages == ["login with *** failed"]
