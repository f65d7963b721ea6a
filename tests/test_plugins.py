"""Plugin discovery and the hooks: built-ins, drop-in files, installed distributions."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest
from pydantic import BaseModel

from reactor.cli import main
from reactor.errors import PluginError
from reactor.plugins import hookspecs
from reactor.plugins.api import ActionType
from reactor.plugins.hookspecs import ActionOutcome, hookimpl
from reactor.plugins.manager import (
    BUILTIN_PLUGINS,
    PluginOrigin,
    Plugins,
    load_plugins,
    make_plugin_manager,
)

REPO = Path(__file__).resolve().parent.parent
BUILTIN_ACTIONS = {"log", "webhook", "exec", "qmp", "restart_vm", "resume_vm", "notify"}

TOUCH_PLUGIN = """
from pathlib import Path
from pydantic import BaseModel
from reactor.plugins.api import ActionType
from reactor.plugins.hookspecs import hookimpl

class TouchParams(BaseModel):
    path: str

async def touch(params, ctx):
    Path(params.path).touch()

@hookimpl
def reactor_register_actions(register):
    register(ActionType(name="touch", params=TouchParams, run=touch, description="Touch a file."))
"""


def write_plugin(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def plugins_from(*dirs: Path, **kw: object) -> Plugins:
    return load_plugins(plugin_dirs=dirs, load_entry_points=False, **kw)  # type: ignore[arg-type]


class NoParams(BaseModel):
    pass


async def nothing(params: BaseModel, ctx: object) -> None:
    return None


def test_builtins_register_every_builtin_action_type(tmp_path: Path) -> None:
    plugins = plugins_from(tmp_path / "absent")
    assert plugins.plugin_names() == list(BUILTIN_PLUGINS)
    types = plugins.action_types()
    assert set(types) == BUILTIN_ACTIONS
    assert types["webhook"].plugin == "reactor.actions.webhook"
    assert plugins.origin("reactor.actions.qmp") == PluginOrigin("builtin", "reactor.actions.qmp")
    assert plugins.action_types() is types  # collected once


def test_each_manager_is_fresh(tmp_path: Path) -> None:
    write_plugin(tmp_path, "touch_plugin", TOUCH_PLUGIN)
    assert "touch" in plugins_from(tmp_path).action_types()
    assert "touch" not in plugins_from(tmp_path / "other").action_types()


def test_drop_in_file_registers_an_action(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "touch_plugin", TOUCH_PLUGIN)
    plugins = plugins_from(tmp_path)
    assert plugins.origin("touch_plugin") == PluginOrigin("file", str(path))
    touch = plugins.action_types()["touch"]
    assert touch.plugin == "touch_plugin"
    target = tmp_path / "touched"
    asyncio.run(touch.run(touch.params(path=str(target)), None))  # type: ignore[arg-type]
    assert target.exists()


def test_the_shipped_drop_in_example_loads_and_runs(tmp_path: Path) -> None:
    types = plugins_from(REPO / "plugins").action_types()
    append = types["append_line"]
    out = tmp_path / "lines"
    params = append.params.model_validate({"path": str(out), "line": "hello"})
    asyncio.run(append.run(params, None))  # type: ignore[arg-type]
    assert out.read_text() == "hello\n"


def test_broken_plugin_file_raises_plugin_error_naming_it(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "broken", "import json\nvalue = 1 / 0\n")
    with pytest.raises(PluginError) as info:
        plugins_from(tmp_path)
    assert str(path) in str(info.value)
    assert "ZeroDivisionError" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_syntax_error_in_plugin_file_names_it(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "typo", "def oops(:\n")
    with pytest.raises(PluginError, match=f"{re.escape(str(path))}.*SyntaxError"):
        plugins_from(tmp_path)


def test_misspelt_hook_is_an_error_at_its_def(tmp_path: Path) -> None:
    source = """
        from reactor import hookimpl

        @hookimpl
        def reactor_register_action(register):
            pass
    """
    path = write_plugin(tmp_path, "misspelt", source)
    with pytest.raises(PluginError) as info:
        plugins_from(tmp_path)
    assert str(info.value) == (
        f"{path}:5: error: plugin 'misspelt' implements unknown hook 'reactor_register_action' "
        "(did you mean reactor_register_actions?)"
    )
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


BROKEN_FILES = {
    "syntax": ("import json\ndef oops(:\n", ":2:10: error: plugin failed to import: SyntaxError: "),
    "at import": (
        "import json\n\ndef half(x):\n    return x / 0\n\nHALF = half(1)\n",
        ":4: error: plugin failed to import: ZeroDivisionError: division by zero",
    ),
    "missing module": (
        '"""Needs a module that is not installed."""\nimport qmp_reactor_no_such_module\n',
        ":2: error: plugin failed to import: ModuleNotFoundError: No module named "
        "'qmp_reactor_no_such_module'",
    ),
    "misspelt hook": (
        "from reactor import hookimpl\n\n@hookimpl\ndef reactor_startupp(settings):\n    pass\n",
        ":4: error: plugin 'broken' implements unknown hook 'reactor_startupp' "
        "(did you mean reactor_startup?)",
    ),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("kind", BROKEN_FILES)
def test_broken_plugin_file_is_one_located_line(tmp_path: Path, command: str, kind: str) -> None:
    source, expected = BROKEN_FILES[kind]
    path = write_plugin(tmp_path / "plugins", "broken", source)
    args = {
        "check": ["check", str(REPO / "rules")],
        "run": ["run", "--rules", str(REPO / "rules"), "--state-dir", str(tmp_path / "state")],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "reactor", *args, "--plugin-dir", str(path.parent)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(str(path) + expected), line
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_duplicate_action_name_names_both_plugins(tmp_path: Path) -> None:
    write_plugin(tmp_path, "my_logger", TOUCH_PLUGIN.replace('name="touch"', 'name="log"'))
    plugins = plugins_from(tmp_path)
    with pytest.raises(PluginError) as info:
        plugins.action_types()
    message = str(info.value)
    assert "'log'" in message and "'my_logger'" in message and "'reactor.actions.log'" in message


@pytest.mark.parametrize("name", ["Bad", "1st", "has space", "a..b", ""])
def test_malformed_action_names_are_refused(tmp_path: Path, name: str) -> None:
    write_plugin(tmp_path, "badname", TOUCH_PLUGIN.replace('name="touch"', f'name="{name}"'))
    expected = re.escape(f"'badname' registered action type '{name}'")
    with pytest.raises(PluginError, match=expected):
        plugins_from(tmp_path).action_types()


def test_register_refuses_what_is_not_an_action_type(tmp_path: Path) -> None:
    source = """
        from reactor.plugins.hookspecs import hookimpl

        @hookimpl
        def reactor_register_actions(register):
            register({"name": "dict"})
    """
    write_plugin(tmp_path, "notatype", source)
    with pytest.raises(PluginError, match=r"'notatype' registered .* not an ActionType"):
        plugins_from(tmp_path).action_types()


def test_blocked_names_are_not_registered_nor_imported(tmp_path: Path) -> None:
    write_plugin(tmp_path, "broken", "raise RuntimeError('must not be imported')\n")
    write_plugin(tmp_path, "touch_plugin", TOUCH_PLUGIN)
    plugins = plugins_from(tmp_path, blocked=("broken", "touch_plugin", "reactor.actions.exec"))
    assert set(plugins.action_types()) == BUILTIN_ACTIONS - {"exec"}
    assert "broken" not in plugins.plugin_names()


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[dict[str, object]] = []
        self.outcomes: list[ActionOutcome] = []
        self.fail = fail
        self.lifecycle: list[str] = []

    @hookimpl
    def reactor_event(self, envelope: dict[str, object]) -> None:
        if self.fail:
            raise RuntimeError("observer bug")
        self.events.append(envelope)

    @hookimpl
    def reactor_action_outcome(self, outcome: ActionOutcome) -> None:
        if self.fail:
            raise RuntimeError("observer bug")
        self.outcomes.append(outcome)

    @hookimpl
    def reactor_startup(self, settings: object) -> object:
        async def started() -> None:
            self.lifecycle.append(f"startup {settings}")

        return started()

    @hookimpl
    def reactor_shutdown(self) -> None:
        if self.fail:
            raise RuntimeError("cannot stop")
        self.lifecycle.append("shutdown")


def with_recorders(tmp_path: Path) -> tuple[Plugins, Recorder, Recorder]:
    pm = make_plugin_manager(plugin_dirs=(), load_entry_points=False)
    bad, good = Recorder(fail=True), Recorder()
    pm.register_from(bad, "bad", PluginOrigin("file", "bad"))
    pm.register_from(good, "good", PluginOrigin("file", "good"))
    return Plugins(pm), bad, good


def test_reactor_event_observer_failure_is_logged_and_isolated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins, _, good = with_recorders(tmp_path)
    envelope = {"event": "STOP", "vm": "a", "data": {}}
    with caplog.at_level(logging.ERROR, logger="reactor.plugins.manager"):
        plugins.event(envelope)
    assert good.events == [envelope]
    assert "plugin 'bad' failed in reactor_event" in caplog.text


def test_reactor_action_outcome_reaches_observers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins, _, good = with_recorders(tmp_path)
    outcome = ActionOutcome("inv-1", "r", "webhook", "vm1", "STOP", "retry", 1, "HTTP 503", 0.2)
    with caplog.at_level(logging.ERROR, logger="reactor.plugins.manager"):
        plugins.action_outcome(outcome)
    assert good.outcomes == [outcome]
    assert "failed in reactor_action_outcome" in caplog.text


def test_reactor_startup_and_reactor_shutdown_are_awaited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins, bad, good = with_recorders(tmp_path)
    with caplog.at_level(logging.ERROR, logger="reactor.plugins.manager"):
        asyncio.run(plugins.startup("cfg"))
        asyncio.run(plugins.shutdown())
    assert good.lifecycle == ["startup cfg", "shutdown"]
    assert bad.lifecycle == ["startup cfg"]
    assert "plugin 'bad' failed to shut down" in caplog.text


def test_failing_startup_is_a_plugin_error_naming_it(tmp_path: Path) -> None:
    write_plugin(
        tmp_path,
        "nostart",
        """
        from reactor.plugins.hookspecs import hookimpl

        @hookimpl
        def reactor_startup(settings):
            raise OSError("no database")
        """,
    )
    with pytest.raises(PluginError, match="'nostart' failed to start: no database"):
        asyncio.run(plugins_from(tmp_path).startup(None))


def test_broken_entry_point_names_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    info = site / "broken_dist-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dist\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[qmp_reactor]\nbroken = qmp_reactor_broken_mod\n")
    (site / "qmp_reactor_broken_mod.py").write_text("raise ImportError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match=r"'broken' of distribution broken-dist 2\.0"):
        make_plugin_manager(plugin_dirs=())


def test_installed_distribution_loads_through_entry_points(tmp_path: Path) -> None:
    # Installed into a private target and loaded in a child process, so this
    # process never sees the distribution. The build runs isolated: the local
    # setuptools may be too old to build wheels without the wheel package.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(REPO / "plugins" / "example-dist")],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    script = textwrap.dedent(
        """
        import asyncio, json
        from reactor.plugins.manager import load_plugins
        plugins = load_plugins(plugin_dirs=())
        kind = plugins.action_types()["stdout"]
        asyncio.run(kind.run(kind.params(line="hello from a distribution"), None))
        name = kind.plugin
        print(json.dumps({"plugin": name, "origin": plugins.origin(name).kind,
                          "source": plugins.origin(name).source}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.splitlines()
    assert first == "hello from a distribution"
    assert json.loads(last) == {
        "plugin": "example",
        "origin": "entry point",
        "source": "qmp-reactor-example 0.1.0",
    }


def test_plugins_command_lists_plugins_and_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plugin(tmp_path, "touch_plugin", TOUCH_PLUGIN)
    assert main(["plugins", "--plugin-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    origins = {p["name"]: p["origin"] for p in report["plugins"]}
    assert origins["touch_plugin"] == "file"
    assert origins["reactor.actions.webhook"] == "builtin"
    touch = report["actions"]["touch"]
    assert touch["parameters"] == [
        {"name": "path", "type": "str", "required": True, "default": None, "description": ""}
    ]
    timeout = {p["name"]: p for p in report["actions"]["webhook"]["parameters"]}["timeout"]
    assert timeout["default"] == 10.0 and timeout["required"] is False


def test_plugins_command_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--plugin-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reactor.actions.notify" in out
    assert "restart_vm  (reactor.actions.restart_vm)" in out
    assert "'reset' | 'powerdown' | 'quit' | 'command'" in out


def test_registering_an_action_type_object_directly(tmp_path: Path) -> None:
    class Direct:
        @hookimpl
        def reactor_register_actions(self, register: hookspecs.Register) -> None:
            register(ActionType(name="org.direct", params=NoParams, run=nothing))

    pm = make_plugin_manager(plugin_dirs=(), load_entry_points=False)
    pm.register_from(Direct(), "direct", PluginOrigin("file", "inline"))
    assert Plugins(pm).action_types()["org.direct"].plugin == "direct"


def hook_names() -> list[str]:
    return sorted(
        name
        for name in dir(hookspecs)
        if name.startswith("reactor_") and hasattr(getattr(hookspecs, name), "qmp_reactor_spec")
    )


def test_every_hook_is_documented_and_tested() -> None:
    names = hook_names()
    assert names == [
        "reactor_action_outcome",
        "reactor_event",
        "reactor_register_actions",
        "reactor_shutdown",
        "reactor_startup",
        "reactor_state",
    ]
    docs = (REPO / "docs" / "plugins.md").read_text()
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for name in names:
        assert f"`{name}" in docs, f"{name} is not documented in docs/plugins.md"
        assert f"def {name}(" in tests, f"no test implements {name}"


def test_each_manager_has_its_own_restart_history_and_http_clients() -> None:
    """Two reactors in one process (two managers) share no state through the built-ins."""
    first, second = make_plugin_manager(plugin_dirs=()), make_plugin_manager(plugin_dirs=())
    restarts = [pm.get_plugin("reactor.actions.restart_vm") for pm in (first, second)]
    hooks = [pm.get_plugin("reactor.actions.webhook") for pm in (first, second)]
    assert restarts[0].guard is not restarts[1].guard
    assert hooks[0].clients is not hooks[1].clients
    # A VM restarted to its limit under the first manager may still restart under the second.
    assert restarts[0].guard.admit("web1", "inv-1", limit=1, window=600) == (True, 1)
    assert restarts[0].guard.admit("web1", "inv-2", limit=1, window=600) == (False, 1)
    assert restarts[1].guard.admit("web1", "inv-3", limit=1, window=600) == (True, 1)
    kinds = [Plugins(pm).action_types()["restart_vm"] for pm in (first, second)]
    assert kinds[0] is not kinds[1] and kinds[0].run is not kinds[1].run


def test_a_managers_shutdown_closes_only_its_own_http_clients() -> None:
    first, second = load_plugins(plugin_dirs=()), load_plugins(plugin_dirs=())
    clients = [p.pm.get_plugin("reactor.actions.webhook").clients for p in (first, second)]

    async def go() -> tuple[bool, bool]:
        made = [c.get(verify=True) for c in clients]
        await first.shutdown()
        try:
            return made[0].is_closed, made[1].is_closed
        finally:
            await second.shutdown()

    assert asyncio.run(go()) == (True, False)
