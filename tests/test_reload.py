"""SIGHUP swaps in a whole new generation (or refuses and says why): a real sidecar and QEMU."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from reactor.demo.machine import ThrowawayQemu
from tests.support.ops import Sidecar, write_rules

MARK_PLUGIN = """
from pathlib import Path
from pydantic import BaseModel
from reactor import ActionType, PermanentActionError, hookimpl

class MarkParams(BaseModel):
    path: str

async def mark(params, ctx):
    if {broken}:
        raise PermanentActionError("mark is broken in this version")
    with open(params.path, "a") as out:
        out.write(ctx.envelope["event"] + "\\n")

@hookimpl
def reactor_register_actions(register):
    register(ActionType(name="mark", params=MarkParams, run=mark))

@hookimpl
def reactor_startup(settings):
    with open(r"{lifecycle}", "a") as out:
        out.write("start\\n")

@hookimpl
def reactor_shutdown():
    with open(r"{lifecycle}", "a") as out:
        out.write("stop\\n")
"""


def write_plugin(directory: Path, name: str, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def reconfigure(sidecar: Sidecar, **changes: Any) -> None:
    """Rewrite the sidecar's configuration file with ``changes`` laid over it."""
    settings = yaml.safe_load(sidecar.config_path.read_text())
    settings.update(changes)
    sidecar.config_path.write_text(yaml.safe_dump(settings))


def reload(sidecar: Sidecar, outcome: str, after: int) -> str:
    """SIGHUP; wait for the ``after``+1-th line matching ``outcome``; that line."""
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGHUP)
    found = wait_for(lambda: lines(sidecar, outcome)[after:], f"{outcome!r} #{after + 1}", sidecar)
    return str(found[0])


def lines(sidecar: Sidecar, text: str) -> list[str]:
    return [line for line in sidecar.log_text().splitlines() if text in line]


def wait_for(check: Callable[[], Any], what: str, sidecar: Sidecar, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s; log:\n{sidecar.log_text()}")
        time.sleep(0.05)


def marks(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.qemu
def test_a_new_drop_in_action_type_works_after_sighup(tmp_path: Path) -> None:
    plugins, out, lifecycle = tmp_path / "plugins", tmp_path / "marks", tmp_path / "lifecycle"
    plugins.mkdir()
    rules = write_rules(tmp_path / "rules.yaml", _rule("seen", "STOP", "log", {}))
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        config = {"rules": [str(rules)], "plugin_dirs": [str(plugins)],
                  "qmp": [str(q.qmp_socket("vm1"))]}  # fmt: skip
        with Sidecar(tmp_path, config).start() as sidecar:
            sidecar.wait_log("vm1 REACTOR_CONNECTED")
            # A drop-in type and a rule that uses it, in one reload.
            write_plugin(plugins, "mark", MARK_PLUGIN.format(broken=True, lifecycle=lifecycle))
            write_rules(rules, _rule("marked", "STOP", "mark", {"path": str(out)}))
            assert "1 rules" in reload(sidecar, "reloaded:", 0)
            q.qmp.execute("stop")
            sidecar.wait_log(r"mark failed rule=marked vm=vm1 .*broken in this version")

            # A new version of the plugin: the dead letter sent back runs on it.
            write_plugin(plugins, "mark", MARK_PLUGIN.format(broken=False, lifecycle=lifecycle))
            reload(sidecar, "reloaded:", 1)
            dead = _dlq(tmp_path, "list", "--json")
            assert [d["action"] for d in json.loads(dead)] == ["mark"]
            _dlq(tmp_path, "retry", json.loads(dead)[0]["id"])
            wait_for(lambda: marks(out) == ["STOP"], "the retried mark", sidecar)
            q.qmp.execute("cont")
            q.qmp.execute("stop")
            wait_for(lambda: marks(out) == ["STOP", "STOP"], "a second mark", sidecar)
            assert sidecar.stop() == 0
    # Each copy of the plugin file started and stopped once, the old one before the new one.
    assert marks(lifecycle) == ["start", "stop", "start", "stop"]
    assert "unknown action type" not in sidecar.log_text()
    assert "Traceback" not in sidecar.log_text()


@pytest.mark.qemu
def test_exec_enabled_is_applied_by_sighup_and_unsafe_changes_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "ran"
    rules = write_rules(tmp_path / "rules.yaml", _rule("seen", "STOP", "log", {}))
    exec_rule = _rule("ran", "STOP", "exec", {"argv": ["touch", str(out)]})
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        config = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, config).start() as sidecar:
            sidecar.wait_log("vm1 REACTOR_CONNECTED")
            # Turned on in the configuration, with a rule that runs a program.
            reconfigure(sidecar, actions={"exec": {"enabled": True}})
            write_rules(rules, exec_rule)
            reload(sidecar, "reloaded:", 0)
            q.qmp.execute("stop")
            sidecar.wait_log("exec ok rule=ran vm=vm1")
            assert out.exists()

            # Turned off again while a rule still runs a program: refused, as check would.
            reconfigure(sidecar, actions={"exec": {"enabled": False}})
            assert "exec" in reload(sidecar, "reload refused:", 0)
            # A setting only a restart applies: refused, naming it; the old generation runs on.
            reconfigure(sidecar, actions={"exec": {"enabled": True}}, state_dir=str(tmp_path / "x"))
            refusal = reload(sidecar, "reload refused:", 2)
            assert "state_dir" in refusal and "restart" in refusal
            out.unlink()
            q.qmp.execute("cont")
            q.qmp.execute("stop")
            wait_for(out.exists, "exec after the refused reloads", sidecar)

            # The metrics listener moves to a new address.
            port = _free_port()
            listen = {"listen": f"127.0.0.1:{port}"}
            reconfigure(sidecar, metrics=listen, state_dir=str(tmp_path / "state"))
            reload(sidecar, "reloaded:", 1)
            sidecar.wait_log(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
            assert _get(port, "/healthz") == 200
            assert sidecar.stop() == 0
    assert "Traceback" not in sidecar.log_text()


@pytest.mark.qemu
def test_the_qmp_allowlist_and_permission_warnings_follow_sighup(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml", _rule("paused", "STOP", "qmp", {"command": "cont"})
    )
    asked = _rule("asked", "RESUME", "qmp", {"command": "query-name"})
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        config = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, config).start() as sidecar:
            sidecar.wait_log("vm1 REACTOR_CONNECTED")
            # A command the allowlist does not have: refused as check refuses it.
            write_rules(rules, _rule("paused", "STOP", "qmp", {"command": "cont"}), asked)
            assert "query-name" in reload(sidecar, "reload refused:", 0)
            # Allowed by the new configuration: reloaded, and it runs.
            reconfigure(sidecar, actions={"qmp": {"allow": ["cont", "query-name"]}})
            reload(sidecar, "reloaded:", 0)
            q.qmp.execute("stop")
            sidecar.wait_log("qmp ok rule=asked vm=vm1")
            # Taken away again while a rule still uses it: refused; the old allowlist stays.
            reconfigure(sidecar, actions={"qmp": {"allow": ["cont"]}})
            assert "query-name" in reload(sidecar, "reload refused:", 2)
            # A rule file others can write is warned about again at the reload.
            rules.chmod(0o666)
            reconfigure(sidecar, actions={"qmp": {"allow": ["cont", "query-name"]}})
            reload(sidecar, "reloaded:", 1)
            warned = lines(sidecar, f"{rules}: warning: writable by other users")
            assert warned, sidecar.log_text()
            q.qmp.execute("stop")
            wait_for(lambda: len(lines(sidecar, "qmp ok rule=asked vm=vm1")) == 2, "a second run",
                     sidecar)  # fmt: skip
            assert sidecar.stop() == 0
    assert "Traceback" not in sidecar.log_text()


@pytest.mark.qemu
def test_sockets_added_and_removed_by_sighup(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        _rule("gone", "REACTOR_DISCONNECTED", "log", {"message": "VM GONE"}),
        _rule("stopped", "STOP", "log", {"message": "STOPPED {{ vm }}"}),
    )
    with ThrowawayQemu(name="vm", extra_qmp=["a", "b"]) as q:
        config = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("a"))],
                  "vms": [{"address": str(q.qmp_socket("a")), "name": "first"}]}  # fmt: skip
        with Sidecar(tmp_path, config).start() as sidecar:
            sidecar.wait_log("first REACTOR_CONNECTED")
            # The same QEMU's second monitor replaces the first one, under its own name.
            reconfigure(sidecar, qmp=[str(q.qmp_socket("b"))],
                        vms=[{"address": str(q.qmp_socket("b")), "name": "second"}])  # fmt: skip
            reload(sidecar, "reloaded:", 0)
            sidecar.wait_log("second REACTOR_CONNECTED")
            sidecar.wait_log("first: disconnected from")
            q.qmp.execute("stop")
            sidecar.wait_log("STOPPED second")
            # Renamed: the same address, closed and connected again under the new name.
            reconfigure(sidecar, vms=[{"address": str(q.qmp_socket("b")), "name": "third"}])
            reload(sidecar, "reloaded:", 1)
            sidecar.wait_log("third REACTOR_CONNECTED")
            assert sidecar.stop() == 0
    log = sidecar.log_text()
    assert "first REACTOR_DISCONNECTED" not in log and "second REACTOR_DISCONNECTED" not in log
    assert "VM GONE" not in log and "STOPPED first" not in log


def test_sighup_during_start_up_is_a_reload_not_an_exit(tmp_path: Path) -> None:
    plugins, loading = tmp_path / "plugins", tmp_path / "loading"
    write_plugin(
        plugins,
        "slow",
        f"""
        import time
        from pathlib import Path
        Path({str(loading)!r}).write_text("x")
        time.sleep(1.5)
        """,
    )
    rules = write_rules(tmp_path / "rules.yaml", _rule("seen", "STOP", "log", {}))
    config = {"rules": [str(rules)], "plugin_dirs": [str(plugins)]}
    with Sidecar(tmp_path, config).start() as sidecar:
        wait_for(loading.exists, "the slow plugin loading", sidecar)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        sidecar.wait_log("ready:", timeout=60)
        sidecar.wait_log("reloaded:", timeout=60)
        assert sidecar.proc.poll() is None
        assert sidecar.stop() == 0


def _rule(name: str, on: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "on": on, "actions": [{"type": action, "with": params}]}


def _dlq(workdir: Path, *args: str) -> str:
    command = [sys.executable, "-m", "reactor", "dlq", *args[:1], "--state-dir",
               str(workdir / "state"), *args[1:]]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()
