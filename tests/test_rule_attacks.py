"""Rules that would hurt the sidecar: a regex a guest can stall, rule-file bombs, SSRF templates.

Each attack is one that used to succeed: ``^(a+)+$`` against a guest's 28
characters blocked the loop for seconds, a YAML billion-laughs of 814 bytes ran
``check`` out of memory, deep nesting raised a RecursionError traceback.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from reactor.rules.compiler import load_rules
from reactor.rules.regex import compile_search, nested_quantifier

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def rule(when: str) -> str:
    return f"rules:\n  - name: r\n    on: STOP\n    when: {when}\n    actions: [{{type: log}}]\n"


# -- 7: a regex that stalls the loop ------------------------------------------------------------


def test_a_catastrophic_pattern_matches_a_long_guest_string_at_once(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(rule("{path: $.vm, matches: '^(a+)+$'}"))
    rules, _ = load_rules([f])
    [compiled] = rules.rules
    assert compiled.condition is not None
    hostile = {"event": "STOP", "vm": "a" * 100_000 + "!", "data": {}}
    started = time.process_time()
    assert compiled.condition(hostile) is False
    assert compiled.condition({**hostile, "vm": "a" * 100_000}) is True
    # Python's re needs about 2**n steps here: 100,000 characters would never end.
    assert time.process_time() - started < 30


def test_check_warns_about_nested_quantifiers_and_strict_fails(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(rule("{path: $.vm, matches: '^(a+)+$'}"))
    result = cli("check", "--strict", str(f))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{f}:4:33: ")
    assert "nests a repeat inside a repeat" in result.stderr
    assert "Traceback" not in result.stderr
    assert cli("check", str(f)).returncode == 0  # a warning only: RE2 matches it in linear time


def test_patterns_re2_cannot_express_are_located_errors(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        "rules:\n"
        "  - name: a\n    on: STOP\n    when: {path: $.vm, matches: '(a)\\1'}\n"
        "    actions: [{type: log}]\n"
        "  - name: b\n    on: STOP\n    when: {path: $.vm, matches: 'x(?=y)'}\n"
        "    actions: [{type: log}]\n"
    )
    result = cli("check", str(f))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{f}:4:33: error: invalid regular expression ")
    assert "RE2 has no backreferences" in lines[0]
    assert lines[1].startswith(f"{f}:8:33: error: invalid regular expression ")
    assert "RE2 has no lookahead" in lines[1]


def test_nested_quantifier_lint() -> None:
    for pattern in ("^(a+)+$", "(a*)*", r"(\w+\s?)+$", "(a|b+)+", "(?:x+x+)+y"):
        assert nested_quantifier(pattern), pattern
    for pattern in ("a+", "(ab)+", r"(\d+\.)+\d+", r"(\d+\.){3}", "(a|b)+", r"\p{L}+"):
        assert not nested_quantifier(pattern), pattern


def test_matches_keeps_search_semantics() -> None:
    search = compile_search("eb")
    assert search("web-1") is not None and search("db") is None
    assert compile_search(r"^\p{L}+$")("héllo") is not None
