"""The log action, and rendering parameters into a validated model before a run.

Each action runs as the daemon runs it: a real dispatcher renders its ``with:``
through the reactor's renderer and runs it once (``tests/support/dispatched.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from reactor.actions.log import LOG
from reactor.actions.restart_vm import make_restart_vm
from reactor.errors import PermanentActionError
from reactor.params.secrets import Redactor, SecretResolver
from reactor.plugins.api import ActionType
from tests.support.dispatched import Ran, dispatch_once

ENVELOPE = {"event": "BLOCK_JOB_ERROR", "data": {"device": "drive0"}, "vm": "db1", "seq": 41}


def dispatch(kind: ActionType, params: dict[str, Any], **kw: Any) -> Ran:
    return dispatch_once(kind, params, ENVELOPE, rule="job-error", **kw)


def test_log_writes_one_structured_audit_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        ran = dispatch(
            LOG, {"message": "{{ data.device }} failed x{{ count }}"}, context={"count": 2}
        )
    assert ran.value() == "drive0 failed x2"
    assert ran.ctx is not None
    invocation = ran.ctx.invocation_id
    [record] = [r for r in caplog.records if r.name == "reactor.audit"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f'rule="job-error" vm="db1" event="BLOCK_JOB_ERROR" seq=41 invocation="{invocation}" '
        'message="drive0 failed x2"'
    )
    assert record.reactor["invocation"] == invocation  # type: ignore[attr-defined]


def test_log_level_and_default_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        dispatch(LOG, {"level": "warning"}).value()
    [record] = [r for r in caplog.records if r.name == "reactor.audit"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().endswith('message="BLOCK_JOB_ERROR on db1"')


def test_log_masks_secrets(caplog: pytest.LogCaptureFixture) -> None:
    resolver = SecretResolver(environ={"LOG_TEST_SECRET": "pw-log-123"})
    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        ran = dispatch(LOG, {"message": "token ${env:LOG_TEST_SECRET}"}, resolver=resolver)
    assert ran.value() == "token ***"
    assert "pw-log-123" not in caplog.text


def test_rendered_parameters_that_do_not_validate_are_permanent_and_redacted() -> None:
    redactor = Redactor()
    resolver = SecretResolver(redactor, environ={"BAD_DURATION": "sekrit"})
    params = {"method": "quit", "timeout": "${env:BAD_DURATION}"}
    ran = dispatch(make_restart_vm(), params, resolver=resolver)
    with pytest.raises(PermanentActionError) as info:
        ran.value()
    assert "restart_vm: rendered parameters are invalid: timeout" in str(info.value)
    assert "sekrit" not in str(info.value)
    assert info.value.__cause__ is None
    assert ran.ctx is None  # never run
    [outcome] = ran.outcomes
    assert outcome.status == "failed" and "sekrit" not in str(outcome.error)
