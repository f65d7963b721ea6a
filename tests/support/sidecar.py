"""``qmp-reactor run`` as a real subprocess, with its JSON log read back as records.

The sidecar logs JSON lines (``--log-format json -v``) to a file in the test's directory;
:meth:`Sidecar.records` parses them, :meth:`Sidecar.audit` picks out the ``log`` action's lines
(``rule=... vm=... event=... seq=... message=...``) as dictionaries with their log time.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RULES = REPO / "rules"

Record = dict[str, Any]

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def audit_fields(message: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a ``log`` action line; values are JSON (null when unset)."""
    return {key: json.loads(value) for key, value in _FIELD.findall(message)}


class Sidecar:
    """A running ``python -m reactor run`` against the given QMP sockets and rule paths."""

    def __init__(
        self,
        workdir: Path,
        qmp: Sequence[Path],
        rules: Sequence[Path],
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.log_path = workdir / "sidecar.log"
        argv = [sys.executable, "-m", "reactor", "run", "-v", "--log-format", "json"]
        for path in qmp:
            argv += ["--qmp", str(path)]
        argv += ["--rules", *map(str, rules)]
        argv += ["--state-dir", str(workdir / "state"), "--plugin-dir", str(workdir / "none")]
        argv += list(extra_args)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=workdir)
        self.returncode: int | None = None

    def records(self) -> list[Record]:
        """Every JSON log record so far; a line that is not JSON becomes ``{"raw": line}``."""
        out: list[Record] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"raw": line}
            out.append(record if isinstance(record, dict) else {"raw": line})
        return out

    def audit(self, rule: str | None = None) -> list[Record]:
        """The ``log`` action's lines (of ``rule`` if given): fields plus ``time`` of logging."""
        lines = []
        for record in self.records():
            if record.get("logger") != "reactor.audit":
                continue
            fields = audit_fields(record["message"])
            if rule is None or fields.get("rule") == rule:
                lines.append({**fields, "time": record["time"]})
        return lines

    def wait_for(
        self, predicate: Callable[[list[Record]], bool], timeout: float, what: str
    ) -> list[Record]:
        """Poll the log until ``predicate(records)`` holds; raise AssertionError with the log."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records):
                return records
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sidecar: no {what} within {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)

    def wait_message(self, text: str, timeout: float = 20.0) -> Record:
        """Wait for a record whose message contains ``text``; return the first such record."""
        records = self.wait_for(
            lambda rs: any(text in r.get("message", "") for r in rs), timeout, repr(text)
        )
        return next(r for r in records if text in r.get("message", ""))

    def wait_audit(self, rule: str, count: int, timeout: float = 20.0) -> list[Record]:
        """Wait until ``rule``'s ``log`` action logged ``count`` lines; return them."""
        self.wait_for(lambda _: len(self.audit(rule)) >= count, timeout, f"{count} x {rule}")
        return self.audit(rule)

    def outcomes(self, action: str, status: str) -> list[Record]:
        """Action outcome records such as ``restart_vm ok rule=... vm=...``."""
        return [
            r
            for r in self.records()
            if r.get("logger") == "reactor.action"
            and r.get("action") == action
            and r.get("outcome") == status
        ]

    def log_text(self) -> str:
        """The raw log."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and return the exit status (idempotent; SIGKILL if it hangs)."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.returncode

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
