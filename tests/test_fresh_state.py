"""State has an owner: a fresh reactor, plugin manager or link starts fresh.

Two reactors in one process share no restart history and no secrets; the QMP
library's log is quiet without any logger level set at import; and no module
of the package sets a logger level or makes a context variable when imported.
"""

from __future__ import annotations

import ast
import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import reactor
from reactor.clock import AsyncioClock
from reactor.errors import Location
from reactor.model import ActionSpec, Rule
from reactor.plugins.hookspecs import ActionOutcome
from reactor.plugins.manager import load_plugins
from reactor.rules.ruleset import RuleSet
from reactor.service.config import Config
from reactor.service.reactor import Reactor, synthetic_envelope
from reactor.sources.session import WIRE_LOGGER, QmpLink
from tests.test_actions_restart_vm import FakeQemu

PACKAGE = Path(reactor.__file__).resolve().parent
HERE = Location("rules.yaml", 1, 1)


class Rig:
    """One reactor over a fresh plugin manager, with one rule of one action."""

    def __init__(self, action: str, params: dict[str, Any]) -> None:
        rule = Rule("panic", ("GUEST_PANICKED",), (ActionSpec(action, params, HERE),), HERE)
        self.emitted: list[str] = []
        self.outcomes: list[ActionOutcome] = []
        self.vm = FakeQemu("running")
        self.reactor = Reactor(
            config=Config(),
            rules=RuleSet((rule,)),
            action_types=load_plugins(plugin_dirs=(), load_entry_points=False).action_types(),
            clock=AsyncioClock(),
            state_dir=None,
            on_outcome=self.outcomes.append,
            vm_lookup=lambda vm, source=None: self.vm,
            emit=lambda vm, event, data, source=None: self.emitted.append(event),
        )

    async def panics(self, count: int) -> None:
        """Feed ``count`` GUEST_PANICKED events, one at a time, each run to its end."""
        for seq in range(1, count + 1):
            self.reactor.feed(synthetic_envelope("web1", "GUEST_PANICKED", {}, seq))
            await self.reactor.dispatcher.drain()


def test_two_reactors_do_not_share_restart_history() -> None:
    first, second = Rig("restart_vm", {"limit": 1}), Rig("restart_vm", {"limit": 1})

    async def go() -> None:
        for rig in (first, second):
            await rig.reactor.start()
        try:
            await first.panics(2)
            await second.panics(1)
        finally:
            for rig in (first, second):
                await rig.reactor.stop(5.0)

    asyncio.run(go())
    assert [o.status for o in first.outcomes + second.outcomes] == ["ok", "ok", "ok"]
    assert first.emitted == ["REACTOR_RESTART_SUPPRESSED"]  # its second restart was rationed
    assert second.emitted == []  # the other reactor never heard of the first one's restarts
    assert first.vm.calls.count("system_reset") == 1 and second.vm.calls.count("system_reset") == 1


def test_a_reactor_masks_the_secrets_it_resolved_and_no_other_does(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FRESH_STATE_TOKEN", "tok-fresh-8123")
    first = Rig("log", {"message": "token ${env:FRESH_STATE_TOKEN}"})
    second = Rig("log", {})

    async def go() -> None:
        await first.reactor.start()
        try:
            await first.panics(1)
        finally:
            await first.reactor.stop(5.0)

    with caplog.at_level(logging.INFO, logger="reactor.audit"):
        asyncio.run(go())
    assert [o.status for o in first.outcomes] == ["ok"]
    assert "tok-fresh-8123" not in caplog.text and 'message="token ***"' in caplog.text
    assert first.reactor.redactor.redact("tok-fresh-8123") == "***"
    assert second.reactor.redactor.redact("tok-fresh-8123") == "tok-fresh-8123"


@pytest.fixture
def wire_level() -> Iterator[logging.Logger]:
    wire = logging.getLogger(WIRE_LOGGER)
    before = wire.level
    yield wire
    wire.setLevel(before)


def test_the_qmp_librarys_log_is_quiet_until_the_wire_logger_is_turned_up(
    wire_level: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    assert wire_level.level == logging.NOTSET  # nothing set it at import
    link = QmpLink()
    with caplog.at_level(logging.DEBUG):
        link.logger.error("Task.Reader: EOFError")
        assert caplog.records == []
        wire_level.setLevel(logging.DEBUG)
        link.logger.error("Task.Reader: EOFError")
        link.logger.debug("<-- {'return': {}}")
    assert [(r.name, r.levelno) for r in caplog.records] == [
        (WIRE_LOGGER, logging.ERROR),
        (WIRE_LOGGER, logging.DEBUG),
    ]


def module_level_calls(tree: ast.Module) -> Iterator[ast.Call]:
    """Calls made when the module is imported (not inside a function or class body)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        yield from (n for n in ast.walk(node) if isinstance(n, ast.Call))


def test_no_module_sets_a_logger_level_or_makes_a_context_variable_at_import() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in module_level_calls(ast.parse(path.read_text(), str(path))):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("setLevel", "ContextVar"):
                found.append(f"{path.relative_to(PACKAGE)}:{call.lineno}: {name}")
    assert found == [], "state belongs to the object that uses it"
