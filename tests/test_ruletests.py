"""``qmp-reactor test``: rule unit tests, run as a user runs them (a real subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reactor.service.loader import bundled_rules

REPO = Path(__file__).resolve().parent.parent


def qmp_reactor(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("pack", [REPO / "rules", bundled_rules()], ids=["repository", "bundled"])
def test_the_default_pack_passes_its_tests(pack: Path) -> None:
    done = qmp_reactor("test", pack)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"
    assert all(line.startswith("PASS ") for line in lines[:-1])


def test_a_broken_pack_fails_with_a_readable_diff(tmp_path: Path) -> None:
    pack = tmp_path / "rules"
    shutil.copytree(REPO / "rules", pack)
    health = pack / "guest-health.yaml"
    health.write_text(health.read_text().replace("within: 60s", "within: 10s"))
    junit = tmp_path / "junit.xml"
    done = qmp_reactor("test", pack, "--junit", junit)
    assert done.returncode == 1, done.stdout + done.stderr
    test_file = pack / "pack_test.yaml"
    line = next(
        i
        for i, text in enumerate(test_file.read_text().splitlines(), 1)
        if "a guest agent that restarts" in text
    )
    out = done.stdout
    assert f"FAIL {test_file}:{line}: a guest agent that restarts is not gone" in out
    assert "    expected, not fired:\n    - {rule: guest-agent-gone, seq: 3, at: 90s" in out
    assert "    fired, not expected:\n" in out
    # The port that came back 20 s later now counts as gone at 10 s, and the other at 40 s.
    gone = "+ {rule: guest-agent-gone, action: notify, vm: vm1, event: VSERPORT_CHANGE"
    assert f"{gone}, seq: 1, at: 10s}}" in out
    assert f"{gone}, seq: 3, at: 40s}}" in out
    assert out.splitlines()[-1].endswith(" passed, 1 failed")

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert len(cases) == int(suite.get("tests", "0")) == out.count("PASS ") + 1
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == [
        "a guest agent that restarts is not gone; one that stays away is"
    ]


RULES = """
rules:
  - name: told
    on: GUEST_PANICKED
    actions:
      - type: webhook
        with:
          url: http://127.0.0.1:9/hook
          headers: {Authorization: "Bearer ${env:RT_TOKEN}"}
          body: {vm: "{{ vm }}"}
      - type: log
        with: {message: "panic on {{ vm }}"}
"""


def write(tmp_path: Path, tests: str, rules: str = RULES) -> Path:
    (tmp_path / "rules.yaml").write_text(rules)
    path = tmp_path / "my_test.yaml"
    path.write_text("rule_files: [rules.yaml]\ntests:\n" + tests)
    return path


def test_one_firing_per_action_secrets_masked_and_multisets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
  - name: masked
    vm: web-1
    events: [{event: GUEST_PANICKED, data: {action: pause}}]
    expect:
      - {rule: told, action: webhook, with: {headers: {Authorization: "Bearer ********"}}}
      - {rule: told, action: log, vm: web-1, event: GUEST_PANICKED, seq: 1, at: 0s}
  - name: one firing cannot meet two expectations
    events: [{event: GUEST_PANICKED, data: {action: pause}}]
    expect:
      - {rule: told, action: log}
      - {rule: told, action: log}
      - {rule: told, action: webhook}
""",
    )
    done = qmp_reactor("test", path, env={"RT_TOKEN": "s3cret-token"})
    assert done.returncode == 1
    assert "PASS" in done.stdout and "FAIL" in done.stdout
    assert "    - {rule: told, action: log}" in done.stdout
    assert "fired, not expected" not in done.stdout
    assert "s3cret-token" not in done.stdout + done.stderr


def test_events_from_a_recording(tmp_path: Path) -> None:
    shutil.copy(REPO / "examples/events/guest-panic.jsonl", tmp_path / "panic.jsonl")
    path = write(
        tmp_path,
        """
  - name: recorded
    events_file: panic.jsonl
    expect:
      - {rule: told, action: webhook, vm: vm-panic, at: 0s}
      - {rule: told, action: log, with: {message: panic on vm-panic}}
""",
    )
    done = qmp_reactor("test", path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ("  - name: x\n    events: []\n", "a test needs 'expect:'"),
        ("  - name: x\n    expect: []\n", "a test has either 'events:' or 'events_file:'"),
        (
            "  - name: x\n    events: [{at: soon, event: STOP}]\n    expect: []\n",
            "4:19: error: invalid duration",
        ),
        ("  - name: x\n    events: []\n    expect: [{action: log}]\n", "needs 'rule'"),
        ("  - name: x\n    events: []\n    expect: [{rule: r, when: 1s}]\n", "unknown key 'when'"),
    ],
)
def test_a_malformed_test_file_is_a_located_error(tmp_path: Path, tests: str, message: str) -> None:
    path = write(tmp_path, tests)
    done = qmp_reactor("test", path)
    assert done.returncode == 2
    assert message in done.stderr
    assert f"{path}:" in done.stderr and "Traceback" not in done.stderr


def test_rules_that_do_not_load_are_a_located_error(tmp_path: Path) -> None:
    path = write(
        tmp_path, "  - name: x\n    events: []\n    expect: []\n", rules="rules: [{name: r}]\n"
    )
    done = qmp_reactor("test", path)
    assert done.returncode == 2
    assert f"{tmp_path / 'rules.yaml'}:1:9: error: a rule needs 'on:'" in done.stderr


def test_rule_tests_in_a_rule_directory_are_not_rules(tmp_path: Path) -> None:
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    done = qmp_reactor("check", tmp_path / "rules")
    assert done.returncode == 0, done.stderr
    assert "in 3 files" in done.stdout
