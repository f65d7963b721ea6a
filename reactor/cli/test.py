"""``qmp-reactor test FILE|DIR...``: unit tests for rule files, on the replay's virtual clock.

One line per test (``PASS``/``FAIL``); a failure shows the expected firings not
found and the firings not expected. Exit 0 when every test passes, 1 when one
fails, 2 when a test file (or the rules it names) is malformed, with located
errors as ``check`` prints them. ``--junit FILE`` writes JUnit XML for CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.cli._common import add_plugin_args, print_diagnostics
from reactor.errors import UserError
from reactor.params.display import escape

if TYPE_CHECKING:
    from reactor.service.ruletests import Outcome


def register(sub: Any) -> None:
    """Add the ``test`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "test",
        help="run unit tests for rule files",
        description="Run rule unit tests (*_test.yaml) on the replay's virtual clock.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="test files, or directories of *_test.yaml",
    )
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write JUnit XML to FILE")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the tests; 0 all passed, 1 a test failed, 2 a test file is malformed."""
    from reactor.service.ruletests import find_test_files, parse_test_file, run_file

    files = find_test_files(args.paths)
    if not files:
        print(f"qmp-reactor: error: no test files (*_test.yaml) in {_names(args.paths)}")
        return 2
    from reactor.plugins.manager import load_plugins

    plugins = load_plugins(
        plugin_dirs=[Path(d) for d in (args.plugin_dir or ["plugins"])],
        blocked=args.block_plugin or (),
    )
    action_types = plugins.action_types()
    results: list[tuple[Path, list[Outcome], float]] = []
    malformed = 0
    for path in files:
        started = time.perf_counter()
        try:
            outcomes = run_file(parse_test_file(path), action_types)
        except UserError as err:
            malformed += 1
            print_diagnostics(err.diagnostics)
            if not err.diagnostics:
                print(f"{path}: error: {err}", file=sys.stderr)
            continue
        results.append((path, outcomes, time.perf_counter() - started))
        for outcome in outcomes:
            _report(outcome)
    passed = sum(o.passed for _, outs, _ in results for o in outs)
    failed = sum(not o.passed for _, outs, _ in results for o in outs)
    print(f"{passed} passed, {failed} failed" + (f", {malformed} malformed" if malformed else ""))
    if args.junit is not None:
        args.junit.write_text(junit_xml(results), "utf-8")
    if malformed:
        return 2
    return 1 if failed else 0


def _names(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _report(outcome: Outcome) -> None:
    test = outcome.test
    if outcome.passed:
        print(f"PASS {test.location.file}: {test.name}")
        return
    print(f"FAIL {test.location.file}:{test.location.line}: {test.name}")
    for line in diff_lines(outcome):
        print(line)


def diff_lines(outcome: Outcome) -> list[str]:
    """The difference, readable: ``-`` expected and not fired, ``+`` fired and not expected."""
    lines = []
    for problem in outcome.problems:
        lines.append(f"    {problem}")
    if outcome.missing:
        lines.append("    expected, not fired:")
        lines += [f"    - {escape(e.show())}  ({e.location})" for e in outcome.missing]
    if outcome.unexpected:
        lines.append("    fired, not expected:")
        lines += [f"    + {escape(f.show())}" for f in outcome.unexpected]
    return lines


def junit_xml(results: list[tuple[Path, list[Outcome], float]]) -> str:
    """JUnit XML: one testsuite per file, one testcase per test."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="qmp-reactor test")
    for path, outcomes, seconds in results:
        failures = sum(not o.passed for o in outcomes)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=str(path),
            tests=str(len(outcomes)),
            failures=str(failures),
            errors="0",
            time=f"{seconds:.3f}",
        )
        for outcome in outcomes:
            case = ET.SubElement(
                suite, "testcase", classname=str(path), name=outcome.test.name, time="0"
            )
            if not outcome.passed:
                failure = ET.SubElement(case, "failure", message="firings differ")
                failure.text = "\n".join(diff_lines(outcome))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
