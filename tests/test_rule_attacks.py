"""Rules that would hurt the sidecar: a regex a guest can stall, rule-file bombs, SSRF templates.

Each attack is one that used to succeed: ``^(a+)+$`` against a guest's 28
characters blocked the loop for seconds, a YAML billion-laughs of 814 bytes ran
``check`` out of memory, deep nesting raised a RecursionError traceback.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reactor.errors import PermanentActionError
from reactor.rules.compiler import load_rules
from reactor.rules.lint import guest_chosen_destination
from reactor.rules.regex import compile_search, nested_quantifier, re2_search
from tests.test_actions_webhook import ENVELOPE, Script, dispatch
from tests.test_actions_webhook import server as server  # the HTTP server fixture

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


# -- 8: rule files that explode -----------------------------------------------------------------

LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)
BOMBS = {
    "laughs": (
        LAUGHS + "rules:\n  - name: r\n    on: STOP\n"
        '    actions: [{type: webhook, with: {url: "http://127.0.0.1:9/", body: {k: *i}}}]\n',
        "6:14: error: more than 250000 values with aliases expanded",
    ),
    "brackets": (
        "rules: " + "[" * 50_000 + "]" * 50_000 + "\n",
        "1:107: error: nested deeper than 100",
    ),
    "nots": (
        rule("{not: " * 3_000 + "{path: $.vm, equals: x}" + "}" * 3_000),
        "4:593: error: nested deeper than 100 levels",
    ),
    "recursive": ("rules: &r [*r]\n", "1:12: error: alias *r is inside its own anchor"),
}


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def check_bounded(path: Path) -> subprocess.CompletedProcess[str]:
    """``check`` in a process that may not grow past 2 GiB of address space."""
    return subprocess.run(
        [sys.executable, "-m", "reactor", "check", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, preexec_fn=_limited,
    )  # fmt: skip


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_rule_file_bombs_are_located_errors(tmp_path: Path, bomb: str) -> None:
    text, expected = BOMBS[bomb]
    f = tmp_path / f"{bomb}.yaml"
    f.write_text(text)
    result = check_bounded(f)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"{f}:{expected}"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_huge_rule_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    f = tmp_path / "huge.yaml"
    with f.open("wb") as out:
        out.write(b"rules:\n" + b"  # padding\n" * 300_000)
        out.truncate(100 << 20)  # 100 MB, the rest a hole: reading it all would show
    result = check_bounded(f)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{f}:174764:2: error: file of {100 << 20} bytes is larger than the limit of 2 MiB"
    )


def test_a_configuration_bomb_is_a_located_error_too(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(LAUGHS + "qmp: *i\n")
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "run", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, preexec_fn=_limited,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{config}:6:14: error: more than 250000 values" in result.stderr
    assert "Traceback" not in result.stderr


def test_rules_nested_just_within_the_limit_load(tmp_path: Path) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text(rule("{not: " * 96 + "{path: $.vm, matches: x}" + "}" * 96))
    rules, diags = load_rules([f])
    assert diags == [] and len(rules.rules) == 1
    [compiled] = rules.rules
    assert compiled.condition is not None
    assert compiled.condition({"event": "STOP", "vm": "x", "data": {}}) is True  # 96 nots: even


# -- 9: SSRF through a templated URL, CRLF in a templated header --------------------------------


def test_check_warns_when_a_url_scheme_or_host_comes_from_event_data(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        "rules:\n  - name: r\n    on: STOP\n    actions:\n"
        '      - {type: webhook, with: {url: "{{ data.reason }}"}}\n'
        '      - {type: webhook, with: {url: "http://{{ data.host }}:8080/x"}}\n'
        '      - {type: webhook, with: {url: "https://hooks.example/{{ data.x }}?vm={{ vm }}"}}\n'
        '      - {type: notify, with: {urls: ["json://{{ envelope.data.h }}/"]}}\n'
    )
    result = cli("check", str(f))
    assert result.returncode == 0, result.stderr  # warnings: a templated host may be meant
    lines = result.stderr.splitlines()
    assert [line.split(": warning: ")[0] for line in lines] == [
        f"{f}:5:37", f"{f}:6:37", f"{f}:8:37",
    ]  # fmt: skip
    assert "webhook: url: the scheme or host comes from event data ({{ data.reason }})" in lines[0]
    assert "(SSRF)" in lines[1] and "notify: urls:" in lines[2]
    assert cli("check", "--strict", str(f)).returncode == 1


def test_guest_chosen_destinations() -> None:
    flagged = ("{{ data.reason }}", "http://{{ data.h }}/", "http://a:{{ data.port }}/",
               "http://{{ data.u }}@h/", "{% if data.x %}http://a{% endif %}/")  # fmt: skip
    for url in flagged:
        assert guest_chosen_destination(url) is not None, url
    safe = ("http://h/{{ data.x }}", "https://h/?q={{ data.x }}", "http://{{ vm }}/",
            "http://h#{{ data.x }}", "https://hooks.example/x")  # fmt: skip
    for url in safe:
        assert guest_chosen_destination(url) is None, url


def test_crlf_in_a_templated_header_is_permanent_and_nothing_is_sent(
    server: tuple[str, Script],
) -> None:
    url, script = server
    hostile = {**ENVELOPE, "data": {"reason": "ok\r\nX-Injected: 1"}}
    ran = dispatch({"url": url, "headers": {"X-Reason": "{{ data.reason }}"}}, envelope=hostile)
    with pytest.raises(PermanentActionError, match=r"header 'X-Reason': control character"):
        ran.value()
    assert script.seen == []


_ATOMS = st.sampled_from(["a", "b", "é", ".", "[ab]", "[^a]", "[a-c]", "\\.", "\\n", "-"])
_PLAIN = st.recursive(
    st.lists(_ATOMS, min_size=1, max_size=4).map("".join),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda p: f"{p[0]}|{p[1]}"),
        inner.map(lambda p: f"({p})"),
        inner.map(lambda p: f"(?:{p})x"),
        inner.map(lambda p: f"^{p}"),
    ),
    max_leaves=6,
)


@given(_PLAIN, st.text(alphabet="abcé.\n-x", max_size=12))
def test_plain_patterns_match_the_same_with_re_as_with_re2(pattern: str, text: str) -> None:
    fast, slow = compile_search(pattern), re2_search(pattern)
    assert isinstance(getattr(fast, "__self__", None), re.Pattern)  # the fast path is taken
    assert (fast(text) is None) == (slow(text) is None), (pattern, text)


def test_patterns_with_repeats_flags_or_classes_go_to_re2() -> None:
    for pattern in ("^(a+)+$", "a*", "(?i)abc", r"\d", "a$", r"\bx", "a{2}"):
        assert not isinstance(getattr(compile_search(pattern), "__self__", None), re.Pattern)
