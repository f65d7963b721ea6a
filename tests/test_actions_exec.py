"""The exec action with real programs: no shell, exit codes, timeouts, policy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from reactor.actions.exec import DISABLED, EXEC, ExecParams, run_exec
from reactor.errors import PermanentActionError, TransientActionError
from reactor.params.secrets import SecretResolver
from reactor.plugins.api import ActionContext, ActionSettings, CheckContext
from tests.support.dispatched import dispatch_once

ENVELOPE = {"event": "WATCHDOG", "data": {"action": "reset"}, "vm": "web1", "seq": 9}
ENABLED = ActionSettings(exec_enabled=True)


def make_ctx(settings: ActionSettings = ENABLED) -> ActionContext:
    return ActionContext(
        invocation_id="inv-1",
        idempotency_key="key-1",
        rule="watchdog",
        action_index=0,
        envelope=ENVELOPE,
        context={},
        attempt=1,
        settings=settings,
    )


def run(
    params: dict[str, Any],
    settings: ActionSettings = ENABLED,
    secrets: SecretResolver | None = None,
) -> Any:
    """Run as the daemon does: a real dispatcher renders ``params`` and runs ``exec`` once."""
    return dispatch_once(
        EXEC, params, ENVELOPE, rule="watchdog", settings=settings, resolver=secrets
    ).value()


def test_check_refuses_exec_unless_enabled() -> None:
    params = ExecParams(argv=["true"])
    assert EXEC.check is not None
    assert EXEC.check(params, CheckContext(settings=ActionSettings(), rule="r")) == [DISABLED]
    assert EXEC.check(params, CheckContext(settings=ENABLED, rule="r")) == []
    assert DISABLED == "exec is disabled; set actions.exec.enabled: true in the configuration"


def test_run_refuses_exec_unless_enabled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(PermanentActionError, match="exec is disabled"):
        run({"argv": ["touch", str(marker)]}, ActionSettings())
    assert not marker.exists()


def test_argv_is_templated_without_a_shell_and_gets_env_and_stdin(tmp_path: Path) -> None:
    script = 'printf "%s|%s|%s\\n" "$1" "$GREETING" "$2"; cat'
    injected = f"$(touch {tmp_path}/injected); {{{{ event }}}}"
    result = run(
        {
            "argv": ["/bin/sh", "-c", script, "sh", "{{ vm }}", injected],
            "env": {"GREETING": "hello {{ vm }}"},
        }
    )
    first, stdin = result["stdout"].split("\n", 1)
    assert first == f"web1|hello web1|$(touch {tmp_path}/injected); WATCHDOG"
    assert not (tmp_path / "injected").exists()
    assert json.loads(stdin) == ENVELOPE
    assert result["exit_code"] == 0


def test_cwd(tmp_path: Path) -> None:
    assert run({"argv": ["pwd"], "cwd": str(tmp_path)})["stdout"].strip() == str(tmp_path)


def test_non_zero_exit_is_transient_with_status_and_last_stderr_line() -> None:
    with pytest.raises(TransientActionError, match=r"'false' exited with status 1$"):
        run({"argv": ["false"]})
    script = "echo first >&2; echo 'disk full' >&2; exit 3"
    with pytest.raises(TransientActionError, match=r"exited with status 3: disk full$"):
        run({"argv": ["/bin/sh", "-c", script]})


def test_stderr_in_errors_is_redacted() -> None:
    resolver = SecretResolver(environ={"EXEC_TEST_TOKEN": "tok-exec-4711"})
    argv = ["/bin/sh", "-c", 'echo "auth $1 rejected" >&2; exit 2', "sh", "${env:EXEC_TEST_TOKEN}"]
    with pytest.raises(TransientActionError) as info:
        run({"argv": argv}, secrets=resolver)
    assert str(info.value).endswith("auth *** rejected")


def test_missing_program_is_permanent() -> None:
    with pytest.raises(PermanentActionError, match="cannot start '/no/such/program'"):
        run({"argv": ["/no/such/program"]})


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_timeout_kills_the_program_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    params = ExecParams.model_validate({"argv": ["/bin/sh", "-c", script], "timeout": "300ms"})
    with pytest.raises(TransientActionError, match=r"timed out after 0\.3s"):
        asyncio.run(run_exec(params, make_ctx()))
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child)


def test_unknown_parameters_are_rejected_by_the_model() -> None:
    with pytest.raises(ValueError, match="shell"):
        ExecParams.model_validate({"argv": ["true"], "shell": True})
