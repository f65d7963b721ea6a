"""Plugins keep state across restarts: ``reactor_state(store)`` and the store behind it.

The store is a namespace per plugin in the real SQLite state file; the hook is
called with that namespace, and what a drop-in plugin put there is there again
after a kill -9 of a real ``qmp-reactor run``.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from reactor import PluginState
from reactor.actions._restart_guard import Restart
from reactor.actions.restart_vm import Plugin as RestartPlugin
from reactor.actions.restart_vm import StoredHistory
from reactor.errors import PluginError
from reactor.plugins.hookspecs import hookimpl
from reactor.plugins.manager import PluginOrigin, Plugins, make_plugin_manager
from reactor.service.enginestate import PluginStore, StateFile, state_path
from tests.support.ops import Sidecar, write_rules


@pytest.fixture
def state_file(tmp_path: Path) -> StateFile:
    return StateFile(state_path(tmp_path))


def test_values_round_trip_as_json_and_keys_can_be_deleted(state_file: StateFile) -> None:
    store = PluginStore(state_file, "mine")
    value = {"count": 3, "vms": ["a", "b"], "ratio": 0.5, "none": None, "ok": True}
    store.put("k", value)
    store.put("n", 7)
    assert store.get("k") == value
    assert store.get("missing") is None
    assert store.items() == [("k", value), ("n", 7)]
    store.delete("k")
    store.delete("never there")
    assert store.get("k") is None and store.written("k") is None
    assert store.items() == [("n", 7)]


def test_namespaces_do_not_see_each_other(state_file: StateFile) -> None:
    mine, theirs = PluginStore(state_file, "mine"), PluginStore(state_file, "theirs")
    mine.put("k", "mine")
    theirs.put("k", "theirs")
    theirs.put("only theirs", 1)
    assert mine.items() == [("k", "mine")]
    assert theirs.get("k") == "theirs"
    mine.delete("k")
    assert theirs.get("k") == "theirs"


def test_each_key_remembers_when_it_was_written(state_file: StateFile) -> None:
    store = PluginStore(state_file, "mine")
    before = time.time()
    store.put("k", 1)
    written = store.written("k")
    assert written is not None and before <= written <= time.time()
    assert store.entries() == [("k", 1, written)]


def test_what_is_not_json_is_refused_and_nothing_is_written(state_file: StateFile) -> None:
    store = PluginStore(state_file, "mine")
    with pytest.raises(TypeError):
        store.put("k", object())
    with pytest.raises(ValueError):
        store.put("k", float("nan"))
    assert store.items() == []


def test_what_was_put_is_there_after_the_file_is_closed_and_opened_again(tmp_path: Path) -> None:
    file = StateFile(state_path(tmp_path))
    PluginStore(file, "mine").put("k", [1, 2])
    file.close()
    assert stat.S_IMODE(state_path(tmp_path).stat().st_mode) == 0o600
    again = StateFile(state_path(tmp_path))
    assert PluginStore(again, "mine").items() == [("k", [1, 2])]
    assert PluginStore(again, "theirs").items() == []
    again.close()


def test_a_value_damaged_in_the_file_reads_as_absent(state_file: StateFile) -> None:
    state_file.put_plugin_row("mine", "k", "{not json", time.time())
    store = PluginStore(state_file, "mine")
    assert store.get("k") is None and store.items() == []


class Keeper:
    """A plugin that keeps the store it is given, or fails to take it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.stores: list[PluginState] = []

    @hookimpl
    def reactor_state(self, store: PluginState) -> None:
        if self.fail:
            raise RuntimeError("state is broken")
        self.stores.append(store)


def with_keepers(*keepers: tuple[str, Keeper]) -> Plugins:
    pm = make_plugin_manager(plugin_dirs=(), load_entry_points=False)
    for name, keeper in keepers:
        pm.register_from(keeper, name, PluginOrigin("file", name))
    return Plugins(pm)


def test_each_plugin_gets_its_own_namespace(state_file: StateFile) -> None:
    one, two = Keeper(), Keeper()
    with_keepers(("one", one), ("two", two)).state(lambda name: PluginStore(state_file, name))
    one.stores[0].put("k", "one's")
    assert [type(s) for s in one.stores + two.stores] == [PluginStore, PluginStore]
    assert two.stores[0].get("k") is None
    assert PluginStore(state_file, "one").get("k") == "one's"


def test_a_failing_reactor_state_is_a_plugin_error_naming_the_plugin(
    state_file: StateFile,
) -> None:
    plugins = with_keepers(("broken", Keeper(fail=True)))
    with pytest.raises(PluginError, match=r"plugin 'broken' failed to take its state: state is"):
        plugins.state(lambda name: PluginStore(state_file, name))


def restarts(vm: str, at: float) -> list[dict[str, Any]]:
    return [{"invocation": f"{vm}-1", "at": at, "due": at, "streak": 1, "ran": None,
             "dumped": False, "stopped": False}]  # fmt: skip


def test_restart_vm_keeps_its_guard_history_in_its_namespace(state_file: StateFile) -> None:
    plugins = Plugins(make_plugin_manager(plugin_dirs=(), load_entry_points=False))
    plugins.state(lambda name: PluginStore(state_file, name))
    plugin = plugins.pm.get_plugin("reactor.actions.restart_vm")
    assert isinstance(plugin, RestartPlugin)
    assert plugin.guard.clock is time.time
    assert plugin.guard.admit("vm1", "inv-1", limit=1, window=600) == (True, 1)
    kept = PluginStore(state_file, "reactor.actions.restart_vm").get("restarts:vm1")
    assert [r["invocation"] for r in kept] == ["inv-1"]
    # A fresh plugin (the sidecar started again) reads it back: the cap holds.
    again = RestartPlugin()
    again.reactor_state(PluginStore(state_file, "reactor.actions.restart_vm"))
    assert again.guard.admit("vm1", "inv-2", limit=1, window=600) == (False, 1)


def test_restart_histories_of_vms_idle_for_a_day_are_dropped_when_attached(
    state_file: StateFile,
) -> None:
    now, day = time.time(), StoredHistory.KEEP
    for vm, wall in (("old", now - day - 5), ("recent", now - day + 60)):
        text = json.dumps(restarts(vm, wall))
        state_file.put_plugin_row("reactor.actions.restart_vm", f"restarts:{vm}", text, wall)
    store = PluginStore(state_file, "reactor.actions.restart_vm")
    history = StoredHistory(store)
    assert history.load("old") == ()
    assert history.load("recent") == (Restart("recent-1", now - day + 60, now - day + 60),)
    assert [key for key, _ in store.items()] == ["restarts:recent"]


COUNTER_PLUGIN = """
import json
from reactor import hookimpl

@hookimpl
def reactor_state(store):
    with open({seen!r}, "a") as out:
        out.write(json.dumps(store.items()) + "\\n")
    if store.get("first") is None:  # idempotent: a second call changes nothing
        store.put("first", {{"start": len(open({seen!r}).readlines())}})
"""


def test_a_drop_in_plugin_finds_what_it_put_after_a_kill9_and_a_reload(tmp_path: Path) -> None:
    plugins, seen = tmp_path / "plugins", tmp_path / "seen"
    plugins.mkdir()
    source = COUNTER_PLUGIN.format(seen=str(seen))
    (plugins / "counter.py").write_text(textwrap.dedent(source))
    rules = write_rules(tmp_path / "rules.yaml", {"name": "seen", "on": "STOP",
                        "actions": [{"type": "log", "with": {}}]})  # fmt: skip
    config = {"rules": [str(rules)], "plugin_dirs": [str(plugins)]}
    with Sidecar(tmp_path, config).start() as sidecar:
        sidecar.wait_log("ready:", timeout=60)
        sidecar.kill9()
        sidecar.start()
        sidecar.wait_log("ready:", timeout=60)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        sidecar.wait_log("reloaded:", timeout=60)
        assert sidecar.stop() == 0
    first = ["first", {"start": 1}]
    assert [json.loads(line) for line in seen.read_text().splitlines()] == [[], [first], [first]]
    with sqlite3.connect(state_path(tmp_path / "state")) as db:
        rows = db.execute("SELECT namespace, key, value FROM plugin_state").fetchall()
    assert rows == [("counter", "first", json.dumps({"start": 1}, separators=(",", ":")))]
    assert "Traceback" not in sidecar.log_text()


def test_without_engine_state_reactor_state_is_not_called(tmp_path: Path) -> None:
    plugins, seen = tmp_path / "plugins", tmp_path / "seen"
    plugins.mkdir()
    (plugins / "counter.py").write_text(textwrap.dedent(COUNTER_PLUGIN.format(seen=str(seen))))
    rules = write_rules(tmp_path / "rules.yaml", {"name": "seen", "on": "STOP",
                        "actions": [{"type": "log", "with": {}}]})  # fmt: skip
    config = {"rules": [str(rules)], "plugin_dirs": [str(plugins)], "engine_state": False}
    with Sidecar(tmp_path, config).start() as sidecar:
        sidecar.wait_log("ready:", timeout=60)
        assert sidecar.stop() == 0
    assert not seen.exists()


BROKEN_PLUGIN = """
from reactor import hookimpl

@hookimpl
def reactor_state(store):
    raise RuntimeError("no state for me")
"""


def test_a_reactor_state_that_fails_refuses_the_reload_and_stops_a_start(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    rules = write_rules(tmp_path / "rules.yaml", {"name": "seen", "on": "STOP",
                        "actions": [{"type": "log", "with": {}}]})  # fmt: skip
    config = {"rules": [str(rules)], "plugin_dirs": [str(plugins)]}
    with Sidecar(tmp_path, config).start() as sidecar:
        sidecar.wait_log("ready:", timeout=60)
        (plugins / "broken.py").write_text(textwrap.dedent(BROKEN_PLUGIN))
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        sidecar.wait_log(
            "reload refused: plugin 'broken' failed to take its state: no state for me", 60
        )
        sidecar.wait_log("reload refused: the previous generation", 60)
        assert sidecar.proc.poll() is None
        assert sidecar.stop() == 0
        sidecar.start()
        assert sidecar.proc.wait(60) != 0
    assert "plugin 'broken' failed to take its state" in sidecar.log_text(all_runs=False)
    assert "Traceback" not in sidecar.log_text()
