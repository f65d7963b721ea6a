"""The command line as a user runs it: real subprocesses, exit codes, exact output."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_check_default_pack_is_clean() -> None:
    result = cli("check", "--strict", "rules")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
    assert "Traceback" not in result.stderr


def test_bundled_pack_is_the_repository_pack() -> None:
    bundled = ROOT / "reactor" / "data" / "rules"
    mine = sorted(p.name for p in (ROOT / "rules").glob("*.yaml"))
    assert mine == sorted(p.name for p in bundled.glob("*.yaml"))
    for name in mine:
        assert (ROOT / "rules" / name).read_text() == (bundled / name).read_text(), name


def test_check_reports_located_errors_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    on: GUEST_PANIKED\n    actions: [{type: log}]\n")
    result = cli("check", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{bad}:3:9: error: unknown event 'GUEST_PANIKED' (did you mean GUEST_PANICKED?)"
    )
    assert result.stdout == ""


def test_check_binary_file_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_bytes(bytes(range(256)))
    result = cli("check", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: not a text file" in result.stderr


def test_check_strict_turns_warnings_into_errors(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text("rules:\n  - name: x\n    on: NOPE_*\n    actions: [{type: log}]\n")
    assert cli("check", str(f)).returncode == 0
    strict = cli("check", "--strict", str(f))
    assert strict.returncode == 1
    assert f"{f}:3:9: error: 'NOPE_*' matches no known event" in strict.stderr


def test_replay_reads_stdin_and_reports_bad_lines(tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: stopped\n    on: STOP\n    actions: [{type: log}]\n")
    events = (
        '{"event": "STOP", "timestamp": {"seconds": 100, "microseconds": 5}}\n'
        "\n"
        "{not json\n"
        '{"event": "STOP", "vm": "web-2", "timestamp": {"seconds": 101, "microseconds": 0}}\n'
        '{"data": {}, "timestamp": {"seconds": 102, "microseconds": 0}}\n'
    )
    result = cli("replay", "-", "--rules", str(rules), stdin=events)
    assert result.returncode == 1
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines == [
        {"time": 100.000005, "rule": "stopped", "action": "log", "vm": "stdin", "event": "STOP",
         "seq": 1},
        {"time": 101.0, "rule": "stopped", "action": "log", "vm": "web-2", "event": "STOP",
         "seq": 2},
    ]  # fmt: skip
    assert "-:3: error: invalid JSON" in result.stderr
    assert "-:5: error: missing 'event'" in result.stderr
    assert "Traceback" not in result.stderr


def test_replay_explain_says_why(tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "rules:\n  - name: only-web\n    on: STOP\n"
        "    when: {path: $.vm, matches: '^web'}\n    actions: [{type: log}]\n"
    )
    events = '{"event": "STOP", "vm": "db-1", "timestamp": {"seconds": 1, "microseconds": 0}}\n'
    result = cli("replay", "-", "--rules", str(rules), "--explain", stdin=events)
    assert result.returncode == 0
    assert result.stdout == ""
    assert 'rule only-web: condition failed: $.vm matches "^web" is false' in result.stderr


def test_invalid_rules_stop_replay_with_located_error(tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: x\n    on: STOP\n    actions: [{type: log, with: 3}]\n")
    result = cli("replay", "-", "--rules", str(rules), stdin="")
    assert result.returncode == 1
    assert f"{rules}:4:33: error: 'with:' must be a mapping" in result.stderr


def test_replay_execute_runs_actions_for_real(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rules = tmp_path / "r.yaml"
        rules.write_text(
            "rules:\n  - name: bad-child\n    on: QUORUM_REPORT_BAD\n    actions:\n"
            f"      - type: webhook\n        with: {{url: 'http://127.0.0.1:{server.server_port}/'}}\n"
        )
        recording = ROOT / "examples" / "events" / "quorum-bad.jsonl"
        result = cli("replay", str(recording), "--rules", str(rules), "--execute")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # the dry-run lines are printed too
    assert [b["rule"] for b in got] == ["bad-child", "bad-child"]
    assert [b["event"]["seq"] for b in got] == [1, 2]  # type: ignore[index]
    assert result.stderr.count("webhook ok rule=bad-child") == 2


def test_replay_rules_before_or_after_the_events_mean_the_same(tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - name: stopped\n    on: STOP\n    actions: [{type: log}]\n")
    events = tmp_path / "vm7.jsonl"
    events.write_text('{"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 0}}\n')
    after = cli("replay", str(events), "--rules", str(rules))
    before = cli("replay", "--rules", str(rules), str(events))
    assert after.returncode == 0, after.stderr
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == {
        "time": 5.0, "rule": "stopped", "action": "log", "vm": "vm7", "event": "STOP", "seq": 1,
    }  # fmt: skip
    assert before.stdout == after.stdout


def test_rules_is_repeatable_and_still_takes_several_paths(tmp_path: Path) -> None:
    paths = []
    for name, event in (("a", "STOP"), ("b", "RESUME"), ("c", "RESET")):
        paths.append(tmp_path / f"{name}.yaml")
        rule = f"  - name: {name}\n    on: {event}\n    actions: [{{type: log}}]\n"
        paths[-1].write_text("rules:\n" + rule)
    events = "".join(
        f'{{"event": "{e}", "vm": "v", "timestamp": {{"seconds": {i}, "microseconds": 0}}}}\n'
        for i, e in enumerate(("STOP", "RESUME", "RESET"), 1)
    )
    a, b, c = map(str, paths)
    for argv in (
        ["replay", "-", "--rules", a, "--rules", b, c],  # the documented order, repeated
        ["replay", "--rules", a, b, "--rules", c, "-"],  # the last use gives back the input
        ["replay", "--rules", a, "--rules", b, "--rules", c, "--explain", "-"],
    ):
        result = cli(*argv, stdin=events)
        assert result.returncode == 0, (argv, result.stderr)
        assert [json.loads(x)["rule"] for x in result.stdout.splitlines()] == ["a", "b", "c"]


def test_replay_without_events_is_a_usage_error() -> None:
    for argv in (["replay"], ["replay", "--rules", "rules"], ["replay", "--explain"]):
        result = cli(*argv)
        assert result.returncode == 2, argv
        assert "error: the following arguments are required: EVENTS" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_rules_accumulates_over_uses() -> None:
    from reactor.cli import build_parser

    args = build_parser().parse_args(["run", "--rules", "a", "b", "--qmp", "x", "--rules", "c"])
    assert args.rules == ["a", "b", "c"]
    assert args.qmp == ["x"]
    assert build_parser().parse_args(["run"]).rules is None


def _command_rows() -> dict[tuple[str, ...], str]:
    """The README's command table: the words naming each command, and its synopsis."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, ...], str] = {}
    for line in section.splitlines():
        if line.startswith("| `qmp-reactor"):
            synopsis = line.split("`")[1]
            words = synopsis.split()[1:]
            name = tuple(w for w in words[:2] if w.isalpha() and w.islower())
            if len(name) == 2 and name[0] not in ("dlq", "silence"):
                name = name[:1]
            rows[name] = synopsis
    return rows


def _leaves(parser: Any, path: tuple[str, ...], inherited: list[str]) -> Iterator[tuple]:
    import argparse

    own: list[str] = []
    children = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children = list(action.choices.items())
        elif isinstance(action, argparse._HelpAction):
            continue
        else:
            own += action.option_strings or [action.metavar or action.dest.upper()]
    if not children:
        yield path, [*inherited, *own]
    for name, child in children:
        yield from _leaves(child, (*path, name), [*inherited, *own])


def test_readme_command_table_lists_every_flag() -> None:
    import re

    from reactor.cli import build_parser

    rows = _command_rows()
    top = build_parser()
    leaves = list(_leaves(top, (), []))
    assert {path for path, _ in leaves} - {()} <= set(rows), sorted(rows)
    assert "--version" in rows[()]
    for path, flags in leaves:
        if not path:
            continue
        for flag in flags:
            if flag == "--version":
                continue
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", rows[path]), (path, flag)
