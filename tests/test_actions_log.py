"""The log action, and rendering parameters into a validated model before a run."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from reactor.actions.log import LOG
from reactor.actions.prepare import prepare_action
from reactor.actions.restart_vm import RESTART_VM
from reactor.errors import PermanentActionError
from reactor.params.secrets import Redactor, SecretResolver
from reactor.plugins.api import ActionContext, ActionSettings

ENVELOPE = {"event": "BLOCK_JOB_ERROR", "data": {"device": "drive0"}, "vm": "db1", "seq": 41}


def make_ctx(context: dict[str, Any] | None = None) -> ActionContext:
    return ActionContext(
        invocation_id="inv-42",
        idempotency_key="key-42",
        rule="job-error",
        action_index=0,
        envelope=ENVELOPE,
        context=context or {},
        attempt=1,
        settings=ActionSettings(),
    )


def test_log_writes_one_structured_audit_line(caplog: pytest.LogCaptureFixture) -> None:
    prepared = prepare_action(LOG, {"message": "{{ data.device }} failed x{{ count }}"})
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        result = asyncio.run(prepared.run(make_ctx({"count": 2})))
    assert result == "drive0 failed x2"
    [record] = caplog.records
    assert record.name == "reactor.audit" and record.levelno == logging.INFO
    assert record.getMessage() == (
        'rule="job-error" vm="db1" event="BLOCK_JOB_ERROR" seq=41 invocation="inv-42" '
        'message="drive0 failed x2"'
    )
    assert record.reactor["invocation"] == "inv-42"  # type: ignore[attr-defined]


def test_log_level_and_default_message(caplog: pytest.LogCaptureFixture) -> None:
    prepared = prepare_action(LOG, {"level": "warning"})
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        asyncio.run(prepared.run(make_ctx()))
    assert caplog.records[0].levelno == logging.WARNING
    assert caplog.records[0].getMessage().endswith('message="BLOCK_JOB_ERROR on db1"')


def test_log_masks_secrets(caplog: pytest.LogCaptureFixture) -> None:
    resolver = SecretResolver(environ={"LOG_TEST_SECRET": "pw-log-123"})
    prepared = prepare_action(LOG, {"message": "token ${env:LOG_TEST_SECRET}"})
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        assert asyncio.run(prepared.run(make_ctx(), secrets=resolver)) == "token ***"
    assert "pw-log-123" not in caplog.text


def test_rendered_parameters_that_do_not_validate_are_permanent_and_redacted() -> None:
    redactor = Redactor()
    resolver = SecretResolver(redactor, environ={"BAD_DURATION": "sekrit"})
    prepared = prepare_action(RESTART_VM, {"method": "quit", "timeout": "${env:BAD_DURATION}"})
    with pytest.raises(PermanentActionError) as info:
        asyncio.run(prepared.run(make_ctx(), secrets=resolver))
    assert "restart_vm: rendered parameters are invalid: timeout" in str(info.value)
    assert "sekrit" not in str(info.value)
    assert info.value.__cause__ is None
