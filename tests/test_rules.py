"""Rule files: what compiles, and every error kind with its exact line and column."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reactor.plugins.api import ActionSettings
from reactor.plugins.manager import load_plugins
from reactor.rules.compiler import load_rules


def problems(tmp_path: Path, text: str, *, raw: bytes | None = None) -> list[str]:
    f = tmp_path / "r.yaml"
    if raw is not None:
        f.write_bytes(raw)
    else:
        f.write_text(textwrap.dedent(text))
    types = load_plugins(plugin_dirs=(), load_entry_points=False).action_types()
    _, diags = load_rules([f], action_types=types, settings=ActionSettings())
    return [f"{d.location.line}:{d.location.col}: {d.severity}: {d.message}" for d in diags]


def test_a_valid_rule_compiles(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text(
        textwrap.dedent(
            """\
            rules:
              - name: restart-on-panic
                description: optional text
                on: GUEST_PANICKED
                when:
                  - path: $.data.action
                    equals: pause
                  - any:
                      - {path: $.vm, matches: "^web-"}
                      - not: {path: $.data.info, exists: true}
                actions:
                  - type: restart_vm
                    with: {method: reset}
                    retry: {attempts: 5, initial: 1s, max: 30s}
                    timeout: 20s
            """
        )
    )
    rules, diags = load_rules([f])
    assert diags == []
    (rule,) = rules.rules
    assert rule.name == "restart-on-panic"
    assert rule.events == ("GUEST_PANICKED",)
    assert rule.actions[0].retry is not None
    assert rule.actions[0].retry.attempts == 5
    assert rule.actions[0].retry.initial == 1.0
    assert rule.actions[0].retry.max == 30.0
    assert rule.actions[0].timeout == 20.0
    assert (rule.location.line, rule.location.col) == (2, 5)
    env = {"event": "GUEST_PANICKED", "vm": "web-1", "data": {"action": "pause"}}
    assert rule.condition is not None and rule.condition(env)
    env["data"] = {"action": "poweroff"}
    assert not rule.condition(env)


def test_unquoted_on_key_is_accepted(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `on` as the boolean True; the rule must still work.
    for spelling in ("on", "On", "ON", "'on'", '"on"'):
        f = tmp_path / "on.yaml"
        f.write_text(f"rules:\n  - name: x\n    {spelling}: STOP\n    actions: [{{type: log}}]\n")
        rules, diags = load_rules([f])
        assert diags == [], spelling
        assert rules.rules[0].events == ("STOP",)


RULE = """\
rules:
  - name: r
    on: STOP
    actions:
      - type: log
        with: {{message: hi}}
{extra}"""

ERROR_CASES = [
    (  # YAML syntax
        "rules:\n  - name: r\n    on: [STOP\n",
        "4:1: error: YAML syntax",
    ),
    ("- a\n- b\n", "1:1: error: a rule file is a mapping with a top-level 'rules:' list"),
    ("rules: {}\n", "1:8: error: 'rules:' must be a list of rules"),
    ("rulez: []\n", "1:1: error: unknown key 'rulez' in the rule file (did you mean rules?)"),
    (RULE.format(extra="    descripton: x\n"), "7:5: error: unknown key 'descripton' in a rule"),
    (
        RULE.format(extra="    when: {path: $.vm, equal: x}\n"),
        "7:24: error: unknown operator 'equal' (did you mean equals?)",
    ),
    (RULE.format(extra="    when: {path: $.vm}\n"), "7:11: error: missing operator"),
    (
        RULE.format(extra="    when: {path: $.vm, equals: a, matches: b}\n"),
        "7:35: error: two operators in one condition ('equals' and 'matches')",
    ),
    (
        RULE.format(extra="    when: {path: '$.data[', equals: a}\n"),
        "7:18: error: invalid JSONPath '$.data['",
    ),
    (
        RULE.format(extra="    when: {path: data.id, equals: a}\n"),
        "7:18: error: a JSONPath starts with '$'",
    ),
    (
        RULE.format(extra="    when: {path: $.vm, matches: '(web'}\n"),
        "7:33: error: invalid regular expression '(web'",
    ),
    (RULE.format(extra="    when: {path: $.vm, in: web}\n"), "7:28: error: 'in' takes a list"),
    (
        RULE.format(extra="    when: {path: $.vm, exists: yes please}\n"),
        "7:32: error: 'exists' takes true or false",
    ),
    (
        RULE.format(extra="    when: {all: [], path: $.vm}\n"),
        "7:21: error: 'all' stands alone in its mapping",
    ),
    (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: lgo\n",
        "5:15: error: unknown action type 'lgo' (did you mean log?)",
    ),
    (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: webhook\n"
        "        with: {method: POST}\n",
        "6:15: error: webhook: missing required parameter 'url'",
    ),
    (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: log\n"
        "        with: {message: hi, colour: red}\n",
        "6:29: error: log: unknown parameter 'colour'",
    ),
    (
        RULE.format(extra="") + "  - name: r\n    on: RESET\n    actions: [{type: log}]\n",
        "7:11: error: duplicate rule name 'r' (first defined at ",
    ),
    (
        "rules:\n  - name: r\n    on: GUEST_PANIKED\n    actions: [{type: log}]\n",
        "3:9: error: unknown event 'GUEST_PANIKED' (did you mean GUEST_PANICKED?)",
    ),
    (
        "rules:\n  - name: r\n    on: [STOP, guest_panicked]\n    actions: [{type: log}]\n",
        "3:16: error: unknown event 'guest_panicked' (did you mean GUEST_PANICKED?)",
    ),
    (
        "rules:\n  - name: r\n    on: QUORUM_*\n"
        "    when: {path: $.data.sector-count, gt: 8}\n    actions: [{type: log}]\n",
        "4:18: error: 'sector-count' is not a field of QUORUM_FAILURE: QEMU's old documentation"
        " said 'sector-count', but every released QEMU sends 'sectors-count'",
    ),
    (
        "rules:\n  - name: r\n    on: VSERPORT_CHANGE\n"
        "    when: {path: $.data.opened, equals: true}\n    actions: [{type: log}]\n",
        "4:18: error: no event of this rule (VSERPORT_CHANGE) has the data field 'opened'"
        " (did you mean open?)",
    ),
    (
        RULE.format(extra="    throttle: {mode: once, window: 10s}\n"),
        "7:22: error: throttle mode must be one of once_within, once_after, qemu",
    ),
    (
        RULE.format(extra="    throttle: {mode: once_within, window: 10 seconds}\n"),
        "7:43: error: invalid duration '10 seconds'",
    ),
    (
        RULE.format(extra="    threshold: {count: 0, window: 1m}\n"),
        "7:24: error: threshold needs 'count', a whole number, at least 1",
    ),
    (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: log\n"
        "        retry: {attempts: 0}\n",
        "6:27: error: attempts must be a whole number, at least 1",
    ),
    (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: log\n"
        "        timeout: soon\n",
        "6:18: error: invalid duration 'soon'",
    ),
    ("rules:\n  - name: r\n    on: STOP\n", "2:5: error: a rule needs 'actions:'"),
    ("rules:\n  - on: STOP\n    actions: [{type: log}]\n", "2:5: error: a rule needs a 'name'"),
    ("rules:\n  - name: r\n    actions: [{type: log}]\n", "2:5: error: a rule needs 'on:'"),
    (
        RULE.format(extra="    mode: sometimes\n"),
        "7:11: error: mode must be one of queued, single, restart, parallel",
    ),
    ("rules:\n  - name: a\n    name: b\n", "3:5: error: duplicate key 'name'"),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_error_is_located(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_binary_file_is_a_clean_error(tmp_path: Path) -> None:
    found = problems(tmp_path, "", raw=b"rules:\n  - name: \x00\x01\x02")
    assert found == ["2:11: error: not a text file (binary data or not UTF-8)"]
    found = problems(tmp_path, "", raw=b"rules: []\n# caf\xe9\n")
    assert found == ["2:6: error: not a text file (binary data or not UTF-8)"]


def test_glob_matching_nothing_is_a_warning(tmp_path: Path) -> None:
    found = problems(tmp_path, "rules:\n  - name: r\n    on: NOPE_*\n    actions: [{type: log}]\n")
    assert found == ["3:9: warning: 'NOPE_*' matches no known event"]


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    text = (
        "rules:\n"
        "  - name: a\n    on: STOPP\n    actions: [{type: log}]\n"
        "  - name: b\n    on: STOP\n    actions: [{type: nope}]\n"
    )
    found = problems(tmp_path, text)
    assert [p.split(":")[0] for p in found] == ["3", "7"]


def test_template_and_secret_problems_are_located(tmp_path: Path) -> None:
    text = (
        "rules:\n  - name: r\n    on: STOP\n    actions:\n      - type: webhook\n"
        "        with:\n          url: 'http://127.0.0.1/{{ vm'\n"
        "          secret: ${env:QMP_REACTOR_TEST_UNSET_SECRET}\n"
    )
    found = problems(tmp_path, text)
    assert any(p.startswith("7:16: error: webhook: ") for p in found), found
    assert (
        "8:19: warning: webhook: environment variable QMP_REACTOR_TEST_UNSET_SECRET of "
        "${env:QMP_REACTOR_TEST_UNSET_SECRET} is not set"
    ) in found
