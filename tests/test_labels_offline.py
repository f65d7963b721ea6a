"""Per-VM labels where no VM is connected: ``replay --config`` and a rule test's ``config:``.

Real subprocesses, as a user runs them: the configuration's ``vms:`` give each
replayed VM the labels ``run`` would give it, by name or glob, later entries winning.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_ruletests import qmp_reactor

RULES = """rules:
  - name: prod-stop
    on: STOP
    when: {path: $.labels.tier, equals: prod}
    actions: [{type: log, with: {message: "tier {{ labels.tier }} auto {{ labels.auto }}"}}]
"""

CONFIG = """vms:
  - {name: "web-*", labels: {tier: prod}}
  - {address: /run/qemu/web-2.sock, name: web-2, labels: {tier: dev}}
  - {name: web-1, labels: {auto: true}}
"""


def event(vm: str, second: int) -> str:
    ts = {"seconds": 1_800_000_000 + second, "microseconds": 0}
    return json.dumps({"event": "STOP", "data": {}, "timestamp": ts, "vm": vm})


def site(tmp_path: Path) -> tuple[Path, Path]:
    rules, config = tmp_path / "rules.yaml", tmp_path / "config.yaml"
    rules.write_text(RULES)
    config.write_text(CONFIG + f"rules: [{rules}]\n")
    return rules, config


def test_replay_with_a_config_gives_the_vms_their_labels(tmp_path: Path) -> None:
    rules, config = site(tmp_path)
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(event(vm, i) for i, vm in enumerate(["web-1", "web-2", "db"])))
    done = qmp_reactor("replay", events, "--config", config)
    assert done.returncode == 0, done.stderr
    fired = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(f["rule"], f["vm"]) for f in fired] == [("prod-stop", "web-1")]
    # Without the configuration no VM has labels, so nothing fires.
    bare = qmp_reactor("replay", events, "--rules", rules)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout == ""


def test_replay_says_where_a_config_is_wrong(tmp_path: Path) -> None:
    _, config = site(tmp_path)
    config.write_text(config.read_text().replace("{tier: dev}", "{tier: [dev]}"))
    done = qmp_reactor("replay", "-", "--config", config)
    assert done.returncode != 0
    assert f"{config}:3:65: error: " in done.stderr
    assert "Traceback" not in done.stderr


def test_a_rule_test_takes_the_labels_of_its_config(tmp_path: Path) -> None:
    site(tmp_path)
    test_file = tmp_path / "labels_test.yaml"
    test_file.write_text(
        """rule_files: [rules.yaml]
config: config.yaml
tests:
  - name: a prod VM's stop is logged
    vm: web-1
    events: [{event: STOP}]
    expect: [{rule: prod-stop, vm: web-1, with: {message: tier prod auto True}}]
  - name: a dev VM's is not
    vm: web-2
    events: [{event: STOP}]
    expect: []
"""
    )
    done = qmp_reactor("test", test_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "2 passed, 0 failed"
    # The same tests without the configuration: the prod VM has no labels either.
    test_file.write_text(test_file.read_text().replace("config: config.yaml\n", ""))
    done = qmp_reactor("test", test_file)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "1 passed, 1 failed"
