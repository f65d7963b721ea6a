"""Every QEMU release as it is: the QEMU stage follows the VM's release.

The expected outputs are computed here from the catalog's raw JSON
(``throttling.throttled_events_by_release``), not from ``Catalog``: a burst of
five events per key within 4 ms reaches the rules as all five when that release
does not throttle the type, else as two per throttle state (the first at once,
the last at the window's end). Replays run in process for every release, and as
``qmp-reactor replay`` subprocesses for the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reactor.engine.replay import ReplayInput, replay
from reactor.plugins.manager import load_plugins
from reactor.rules.catalog import load_catalog, parse_release, qemu_version_of
from reactor.rules.compiler import Compiler, require_rules
from reactor.rules.ruleset import RuleSet
from reactor.rules.yamlload import load_text

REPO = Path(__file__).resolve().parents[1]
RAW = json.loads((REPO / "reactor" / "data" / "qmp-events.json").read_text())
TABLES: dict[str, dict[str, str | None]] = RAW["throttling"]["throttled_events_by_release"]
THROTTLED_EVER = sorted({event for table in TABLES.values() for event in table})
KEY_FIELDS = {"node-name", "id", "qom-path"}


def _event(event: str, vm: str, t_us: int, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": event,
        "data": data,
        "timestamp": {"seconds": 1000 + t_us // 1_000_000, "microseconds": t_us % 1_000_000},
        "vm": vm,
    }


def connected(vm: str, major: int, minor: int, micro: int, t_us: int = 0) -> dict[str, Any]:
    """REACTOR_CONNECTED as ``tail --json`` records it."""
    data = {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""},
        "qemu": f"{major}.{minor}.{micro}",
        "status": "running",
        "running": True,
        "address": f"/run/{vm}.qmp",
    }
    return _event("REACTOR_CONNECTED", vm, t_us, data)


def burst(event: str, vm: str, start_us: int = 10_000) -> list[dict[str, Any]]:
    """Five events for each of two devices (every key field set), 0.4 ms apart."""
    lines = []
    for i in range(5):
        for device in ("dev0", "dev1"):
            data = {field: f"/machine/{device}" for field in KEY_FIELDS}
            lines.append(_event(event, vm, start_us + i * 400 + (device == "dev1") * 200, data))
    return lines


def expected_count(release: str, event: str) -> int:
    """Events of one VM's ``burst`` that reach the rules under ``release``'s table."""
    table = TABLES[release]
    if event not in table:
        return 10
    return 2 if table[event] is None else 4


@pytest.fixture(scope="module")
def every_rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    path = tmp_path_factory.mktemp("rules") / "every.yaml"
    path.write_text(
        "rules:\n  - name: every\n"
        f"    on: {json.dumps(THROTTLED_EVER)}\n    actions:\n      - type: log\n"
    )
    types = load_plugins(plugin_dirs=(), load_entry_points=False).action_types()
    return require_rules([path], action_types=types)[0]


def _fired(lines: list[dict[str, Any]], rules: RuleSet, **kwargs: Any) -> dict[str, int]:
    """Firings per VM of a replay of ``lines``."""
    text = [json.dumps(line) + "\n" for line in lines]
    result = replay([ReplayInput("test", text, "test")], rules, **kwargs)
    assert not result.problems
    counts: dict[str, int] = {}
    for firing in result.firings:
        counts[firing.envelope["vm"]] = counts.get(firing.envelope["vm"], 0) + 1
    return counts


@pytest.mark.parametrize("release", sorted(TABLES, key=lambda r: parse_release(r) or ()))
def test_replay_follows_each_releases_table(release: str, every_rules: RuleSet) -> None:
    # One VM per event type, all in one replay: tables are per release, state per VM.
    lines = [line for event in THROTTLED_EVER for line in burst(event, f"vm-{event}")]
    fired = _fired(lines, every_rules, qemu_version=release)
    assert fired == {f"vm-{e}": expected_count(release, e) for e in THROTTLED_EVER}


def test_block_io_error_unthrottled_on_7_2_throttled_per_qom_path_on_9_2(
    every_rules: RuleSet,
) -> None:
    lines = burst("BLOCK_IO_ERROR", "old") + burst("BLOCK_IO_ERROR", "new")
    lines += burst("BLOCK_IO_ERROR", "unknown")
    head = [connected("old", 7, 2, 22), connected("new", 9, 2, 0)]
    fired = _fired(head + sorted(lines, key=lambda e: e["timestamp"]["microseconds"]), every_rules)
    # 7.2 sends every BLOCK_IO_ERROR; 9.2 one per second per qom-path; a VM whose
    # version the input does not say gets the newest table (per qom-path too).
    assert fired == {"old": 10, "new": 4, "unknown": 4}


def test_old_releases_share_one_state_across_nodes_and_ports(every_rules: RuleSet) -> None:
    lines = [connected("q25", 2, 5, 0), connected("q26", 2, 6, 0), connected("v24", 2, 4, 1)]
    lines += burst("QUORUM_REPORT_BAD", "q25") + burst("QUORUM_REPORT_BAD", "q26")
    lines += burst("VSERPORT_CHANGE", "v24")
    fired = _fired(sorted(lines, key=lambda e: e["timestamp"]["microseconds"]), every_rules)
    assert fired == {"q25": 2, "q26": 4, "v24": 2}


def test_qemu_flag_wins_over_reactor_connected(every_rules: RuleSet) -> None:
    lines = [connected("vm", 7, 2, 0), *burst("BLOCK_IO_ERROR", "vm")]
    assert _fired(lines, every_rules) == {"vm": 10}
    assert _fired(lines, every_rules, qemu_version="10.1") == {"vm": 4}
    assert _fired(lines, every_rules, qemu_version="7.2.0") == {"vm": 10}


def test_a_reconnect_to_another_release_switches_the_table(every_rules: RuleSet) -> None:
    lines = [connected("vm", 9, 2, 0), *burst("BLOCK_IO_ERROR", "vm", 10_000)]
    lines += [connected("vm", 7, 2, 0, 5_000_000), *burst("BLOCK_IO_ERROR", "vm", 6_000_000)]
    assert _fired(lines, every_rules) == {"vm": 4 + 10}


def test_version_picking() -> None:
    releases = load_catalog().releases
    assert releases.pick("7.2.22") == "7.2"
    assert releases.pick("9.1.50") == "9.1"  # a development build between 9.1 and 9.2
    assert releases.pick("99.0.0") == releases.newest
    assert releases.pick("1.7.0") == releases.names[0]
    assert parse_release("seven") is None
    data = connected("vm", 7, 2, 0)["data"]
    assert qemu_version_of(data) == "7.2.0"
    # A peer's nonsense is an unknown version, never an error.
    assert qemu_version_of({"version": {"qemu": {"major": "7"}}, "qemu": [1]}) is None
    assert qemu_version_of({"version": "x", "qemu": "8.0.1"}) == "8.0.1"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_cli_qemu_flag_and_explain(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: io\n    on: BLOCK_IO_ERROR\n    actions: [{type: log}]\n")
    events = tmp_path / "events.jsonl"
    lines = [connected("a", 7, 2, 0), *burst("BLOCK_IO_ERROR", "a"), *burst("BLOCK_IO_ERROR", "b")]
    events.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = cli("replay", str(events), "--rules", str(rules), "--explain")
    assert run.returncode == 0, run.stderr
    fired = [json.loads(line)["vm"] for line in run.stdout.splitlines()]
    assert (fired.count("a"), fired.count("b")) == (10, 4)
    newest = load_catalog().releases.newest
    assert "vm=a: event: QEMU stage: QEMU 7.2's rate limits (REACTOR_CONNECTED: QEMU 7.2.0)" in (
        run.stderr
    )
    assert f"vm=b: event: QEMU stage: QEMU {newest}'s rate limits (no version known)" in run.stderr
    pinned = cli("replay", str(events), "--rules", str(rules), "--qemu", "9.2", "--explain")
    assert pinned.returncode == 0, pinned.stderr
    assert len(pinned.stdout.splitlines()) == 8
    assert "vm=a: event: QEMU stage: QEMU 9.2's rate limits (--qemu 9.2)" in pinned.stderr
    bad = cli("replay", str(events), "--rules", str(rules), "--qemu", "latest")
    assert bad.returncode == 2
    assert "'latest' is not a QEMU version" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- check: events and fields against the releases a site runs ---------------------------

CHECKED = """\
rules:
  - name: unplug
    on: MEM_UNPLUG_ERROR
    when: {path: $.data.device, equals: dimm0}
    actions: [{type: log}]
  - name: pv
    on: [GUEST_PVSHUTDOWN, SHUTDOWN]
    actions: [{type: log}]
  - name: quorum
    on: QUORUM_REPORT_BAD
    when: {path: $.data.type, equals: read}
    actions: [{type: log}]
"""


def _check(tmp_path: Path, *args: str, rules: str = CHECKED) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return cli("check", str(path), *args)


def test_check_without_versions_accepts_removed_events_with_a_warning(tmp_path: Path) -> None:
    run = _check(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        f"{tmp_path / 'rules.yaml'}:3:9: warning: MEM_UNPLUG_ERROR is not sent by current QEMU: "
        "only QEMU 2.4 - 9.0 sent it (removed in 9.1); its replacement is "
        "DEVICE_UNPLUG_GUEST_ERROR (6.2)"
    ]
    assert "did you mean" not in run.stderr


def test_check_qemu_errors_for_events_no_release_sends(tmp_path: Path) -> None:
    where = tmp_path / "rules.yaml"
    run = _check(tmp_path, "--qemu", "7.2")
    assert run.returncode == 1
    assert (
        f"{where}:7:10: error: GUEST_PVSHUTDOWN is not sent by QEMU 7.2: it appeared in QEMU 9.1"
        in (run.stderr)
    )
    assert "MEM_UNPLUG_ERROR" not in run.stderr  # 7.2 sends it
    run = _check(tmp_path, "--qemu", "9.2", "--qemu", "10.0")
    assert run.returncode == 1
    assert (
        f"{where}:3:9: error: MEM_UNPLUG_ERROR is not sent by QEMU 9.2, 10.0: only QEMU 2.4 - 9.0 "
        "sent it (removed in 9.1); its replacement is DEVICE_UNPLUG_GUEST_ERROR (6.2)"
    ) in run.stderr
    assert "GUEST_PVSHUTDOWN" not in run.stderr


def test_check_qemu_warns_for_some_releases_and_late_fields(tmp_path: Path) -> None:
    where = tmp_path / "rules.yaml"
    run = _check(tmp_path, "--qemu", "2.5", "--qemu", "9.2.0")
    assert run.returncode == 0, run.stderr
    assert sorted(run.stderr.splitlines()) == [
        f"{where}:11:18: warning: QUORUM_REPORT_BAD's 'type' since 2.6: not sent by QEMU 2.5",
        f"{where}:3:9: warning: MEM_UNPLUG_ERROR is not sent by QEMU 9.2.0: only QEMU 2.4 - 9.0 "
        "sent it (removed in 9.1); its replacement is DEVICE_UNPLUG_GUEST_ERROR (6.2)",
        f"{where}:7:10: warning: GUEST_PVSHUTDOWN is not sent by QEMU 2.5: it appeared in QEMU 9.1",
    ]
    assert _check(tmp_path, "--qemu", "2.5", "--qemu", "9.2", "--strict").returncode == 1


def test_check_config_qemu_versions(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CHECKED)
    config = tmp_path / "config.yaml"
    config.write_text(f"rules: [{rules}]\nqemu_versions: ['7.2']\n")
    run = cli("check", "--config", str(config))
    assert run.returncode == 1
    assert "GUEST_PVSHUTDOWN is not sent by QEMU 7.2" in run.stderr
    # --qemu replaces the configured releases.
    assert cli("check", "--config", str(config), "--qemu", "9.0", "--qemu", "9.1").returncode == 0
    config.write_text(f"rules: [{rules}]\nqemu_versions: ['7.2', 'next']\n")
    bad = cli("check", "--config", str(config))
    assert bad.returncode == 1
    assert f"{config}:2:16: error: 'qemu_versions': 'next' is not a QEMU version" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "event,path,message",
    [
        (
            "ACPI_DEVICE_OST",
            "$.data.slot-type",
            "'slot-type' is not a top-level field of ACPI_DEVICE_OST: QEMU sends it under "
            "'info', as $.data.info.slot-type (QEMU's old text documentation showed device, "
            "slot, slot-type, source and status at the top of data)",
        ),
        (
            "GUEST_PANICKED",
            "$.data.arg1",
            "'arg1' is not a top-level field of GUEST_PANICKED: QEMU sends it under 'info', "
            "as $.data.info.arg1",
        ),
        (
            "QUORUM_REPORT_BAD",
            "$.data.ret",
            "'ret' is not a field of QUORUM_REPORT_BAD: QEMU replaced it with 'error' before "
            "any release sent it",
        ),
        (
            "QUORUM_FAILURE",
            "$.data.sector-count",
            "'sector-count' is not a field of QUORUM_FAILURE: QEMU's old documentation said "
            "'sector-count', but every released QEMU sends 'sectors-count'",
        ),
    ],
)
def test_documented_but_not_on_the_wire(event: str, path: str, message: str) -> None:
    rules = f"rules:\n  - name: r\n    on: {event}\n    when: {{path: {path}, exists: true}}\n"
    rules += "    actions: [{type: log}]\n"
    compiler = Compiler()
    doc = load_text(rules, "r.yaml")
    compiler.compile_rule(doc["rules"][0], doc["rules"].loc(0))
    assert [str(d) for d in compiler.diagnostics] == [f"r.yaml:4:18: error: {message}"]
    nested = path.replace("$.data.", "$.data.info.")
    if "info" in message:  # and the path the message gives is accepted
        fixed = Compiler()
        doc = load_text(rules.replace(path, nested), "r.yaml")
        assert fixed.compile_rule(doc["rules"][0], doc["rules"].loc(0)) is not None
        assert fixed.diagnostics == []
