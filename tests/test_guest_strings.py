"""Strings a guest controls cannot forge a log line or drive a terminal, wherever they are shown.

The attack: a newline followed by a fake record, and ANSI/OSC escapes (clear
the screen, set the window title), in a VM name QEMU reports, an event's data,
an event name from a hostile peer and a dead letter's fields. Each text output
must show them escaped: the text log (the default pack's notify-to-log and
``log`` lines, the ``-v`` lines), ``dlq list``, ``tail`` and ``replay``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reactor.cli.tail import text_line
from reactor.demo.machine import ThrowawayQemu
from reactor.dispatch.journal import Journal
from reactor.params.display import UNSAFE, escape
from reactor.params.secrets import Redactor
from reactor.service.logs import JsonFormatter, TextFormatter, setup_logging
from tests.support.ops import Sidecar
from tests.test_journal import dlq, make

ROOT = Path(__file__).resolve().parents[1]
FORGED = "2026-01-01 00:00:00,000 CRITICAL reactor: forged"
HOSTILE = f"evil\n{FORGED}\r\x1b]0;pwned\x07\x1b[2J\x9b31m\u2028\u202e"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def assert_safe_lines(text: str) -> None:
    """Every line is a record of its own or an indented traceback line; nothing unsafe."""
    assert UNSAFE.search(text.replace("\n", "")) is None, repr(text)
    for line in text.splitlines():
        assert RECORD_START.match(line) or line.startswith("  "), repr(line)
        assert not line.startswith(FORGED)


@given(st.text())
def test_escape_leaves_nothing_a_terminal_or_line_reader_acts_on(text: str) -> None:
    shown = escape(text)
    assert UNSAFE.search(shown) is None
    assert "\n" not in shown and "\r" not in shown
    if UNSAFE.search(text) is None:
        assert shown == text


def test_escape_spells_each_character() -> None:
    assert escape("a\nb\rc\td\x1b[2J\x7f\x9b\u2028\u202e") == (
        "a\\nb\\rc\\td\\x1b[2J\\x7f\\x9b\\u2028\\u202e"
    )


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("reactor.notify", logging.WARNING, "x", 1, msg, args, exc_info)


def test_text_log_escapes_the_message_and_indents_the_traceback() -> None:
    line = TextFormatter().format(_record("%s: %s", "STOP on vm", HOSTILE, exc=True))
    assert_safe_lines(line)
    first = line.splitlines()[0]
    assert "evil\\n2026-01-01 00:00:00,000 CRITICAL reactor: forged\\r\\x1b]0;pwned" in first
    assert f"ValueError: evil\n  {FORGED}\\r\\x1b]0;pwned" in line  # indented: no record


def test_json_log_escapes_c1_del_and_separators_and_still_parses() -> None:
    text = JsonFormatter().format(_record("%s", HOSTILE + "\x7f\x85"))
    assert UNSAFE.search(text) is None and "\n" not in text
    assert "\\u009b" in text and "\\u2028" in text and "\\u007f" in text
    assert json.loads(text)["message"] == HOSTILE + "\x7f\x85"


def test_setup_logging_text_is_escaped_for_every_logger() -> None:
    out = io.StringIO()
    setup_logging(verbose=True, fmt="text", redactor=Redactor(), stream=out)
    try:
        logging.getLogger("reactor.engine").debug("seq 1 %s vm=%s", HOSTILE, "x")
        logging.getLogger("elsewhere").warning(HOSTILE)
    finally:
        logging.getLogger().handlers.clear()
    assert out.getvalue().count("\n") == 2
    assert_safe_lines(out.getvalue())


def test_dlq_list_shows_hostile_fields_escaped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = Journal(state / "journal.sqlite3")
    invs = make(1, attempts=3, last_error=f"HTTP 400: {HOSTILE}")
    hostile = [dataclasses.replace(inv, vm=HOSTILE, event=HOSTILE) for inv in invs]
    journal.add_many(hostile)
    journal.dead(hostile)
    journal.close()
    table = dlq(state, "list")
    assert table.returncode == 0, table.stderr
    assert UNSAFE.search(table.stdout.replace("\n", "")) is None
    lines = table.stdout.splitlines()
    assert len(lines) == 2 and "evil\\n2026-01-01" in lines[1]
    listed = json.loads(dlq(state, "list", "--json").stdout)
    assert listed[0]["vm"] == HOSTILE  # the JSON keeps the exact value


def test_tail_text_line_escapes_vm_and_event() -> None:
    env = {"timestamp": None, "vm": HOSTILE, "event": "STOP\x1b[2J", "data": {"id": HOSTILE}}
    line = text_line(env)
    assert UNSAFE.search(line) is None and "\n" not in line


def test_replay_explain_lines_escape_event_data(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: r\n    on: STOP\n    when: {path: $.vm, equals: x}\n"
        "    actions: [{type: log}]\n"
    )
    recording = tmp_path / "events.jsonl"
    event = {"timestamp": {"seconds": 1, "microseconds": 0}, "event": "STOP", "data": {}}
    recording.write_text(json.dumps({**event, "vm": HOSTILE}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "replay", str(recording), "--explain",
         "--rules", str(rules)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert "evil\\n2026" in result.stderr, result.stderr
    assert UNSAFE.search(result.stderr.replace("\n", "")) is None
    assert not any(line.startswith(FORGED) for line in result.stderr.splitlines())


@pytest.mark.qemu
def test_a_vm_name_from_a_real_qemu_cannot_forge_log_lines(tmp_path: Path) -> None:
    """Server mode takes the VM's name from QEMU's ``-name``: whoever starts the QEMU writes it.

    A name with control characters cannot name a VM: the sidecar refuses the QEMU and
    says so by the name's length, so neither the log nor a terminal sees the name.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="qr-guest-"))
    listen = sockdir / "reactor.sock"
    config = {"listen": str(listen), "rules": [str(ROOT / "rules")]}
    name = HOSTILE.replace("\u2028", "").replace("\u202e", "")
    chardev = ["-chardev", f"socket,id=r,path={listen},reconnect=1"]
    chardev += ["-mon", "chardev=r,mode=control"]
    with Sidecar(tmp_path, config).start() as sidecar:
        sidecar.wait_log("listening|metrics on")
        qemu = ThrowawayQemu(
            name=name.replace(",", ",,"), extra_args=["-machine", "none", *chardev], memory_mb=16
        )
        try:
            sidecar.wait_log(r"refused .*: query-name gave \d+ characters", timeout=60)
        finally:
            qemu.close()
        sidecar.stop()
    shutil.rmtree(sockdir, ignore_errors=True)
    log = sidecar.log_text()
    assert_safe_lines(log)
    assert "pwned" not in log and "forged" not in log


def test_check_prints_a_key_quoted_from_the_file_escaped(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        "rules:\n  - name: r\n    on: STOP\n    actions: [{type: log}]\n"
        '    "a\\x1b[2J\\nb": 1\n    "a\\x1b[2J\\nb": 2\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "check", str(f)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert UNSAFE.search(result.stderr.replace("\n", "")) is None
    assert f"{f}:6:5: error: duplicate key 'a\\x1b[2J\\nb'" in result.stderr.splitlines()
