"""A throwaway room for running a real QEMU next to qmp-reactor.

This module is the test and demo harness, not part of the event pipeline. It gives two tools:

* :class:`QmpDriver`, a tiny synchronous QMP client over a unix socket, used to *drive* QEMU
  (``stop``, ``cont``, ``system_reset``, ``human-monitor-command`` ...) and to wait for the events
  that follow. The product reads events with its own asynchronous reader; this driver is only
  here so tests and the demo can provoke real events.
* :class:`ThrowawayQemu`, which starts ``qemu-system-x86_64`` in a private temporary directory
  with a QMP socket for the driver, any number of extra QMP sockets for the sidecar under test
  (QEMU sends every event to every monitor), an optional three-way quorum disk that can be
  corrupted on purpose, an optional kernel/initrd guest with a serial console on a unix socket,
  and removes everything again on :meth:`ThrowawayQemu.close`.

Only the standard library is used, so the module can ship inside the package and be used by the
demo without extra dependencies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal as signal_mod
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "QUORUM_CHILDREN",
    "QUORUM_CHILD_SIZE",
    "QemuStartError",
    "QmpCommandError",
    "QmpDriver",
    "QmpError",
    "SerialConsole",
    "ThrowawayQemu",
    "qemu_binary",
]

QUORUM_CHILDREN = ("r0", "r1", "r2")
"""Node names of the quorum children (also the base names of their image files)."""

QUORUM_CHILD_SIZE = 1024 * 1024
"""Size in bytes of each raw quorum child image."""

_SECTOR = 512


def qemu_binary() -> str | None:
    """Return the path of ``qemu-system-x86_64`` on ``PATH``, or ``None`` if it is not installed."""
    return shutil.which("qemu-system-x86_64")


class QmpError(Exception):
    """A QMP protocol or transport failure (bad greeting, closed socket, timeout)."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an ``error`` reply."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QemuStartError(RuntimeError):
    """QEMU exited early or its sockets did not appear in time."""


def _matches(event: Mapping[str, Any], name: str, data: Mapping[str, Any] | None) -> bool:
    if event.get("event") != name:
        return False
    if data is None:
        return True
    event_data = event.get("data", {})
    return all(event_data.get(key) == value for key, value in data.items())


class QmpDriver:
    """A tiny synchronous QMP client over a unix socket.

    Events that arrive while waiting for a command reply are kept, in arrival order, in the
    bounded deque :attr:`events` (the oldest are dropped once ``max_events`` is reached).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_events: int = 1000) -> None:
        self.path = Path(path)
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self._eof = False

    # -- connection -----------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> dict[str, Any]:
        """Connect, read the greeting and negotiate capabilities; return the greeting.

        Retries the connection until ``timeout`` so it can be called right after QEMU starts.
        A connection already open is closed first.
        """
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
                time.sleep(0.05)
                continue
            break
        self._sock = sock
        self._buf = b""
        self._eof = False
        try:
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting: {greeting!r}")
            self.greeting = greeting
            self.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        return greeting

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        """True while the socket is open and QEMU has not closed its end."""
        return self._sock is not None and not self._eof

    def __enter__(self) -> QmpDriver:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- low level ------------------------------------------------------------------------

    def _read_message(self, deadline: float | None) -> dict[str, Any]:
        """Read one JSON message; ``deadline`` is a monotonic time or None to block."""
        if self._sock is None:
            raise QmpError("not connected")
        while b"\n" not in self._buf:
            if self._eof:
                raise QmpError("QMP connection closed by QEMU")
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out waiting for a QMP message")
                self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("timed out waiting for a QMP message") from None
            except OSError as exc:
                self._eof = True
                raise QmpError(f"QMP connection error: {exc}") from exc
            if not chunk:
                self._eof = True
                continue
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.strip()
        if not line:
            return self._read_message(deadline)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"unexpected QMP message: {message!r}")
        return message

    def _send(self, message: Mapping[str, Any]) -> None:
        if self._sock is None:
            raise QmpError("not connected")
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    # -- commands -------------------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises :class:`QmpCommandError` if QEMU replies with ``error`` and ``TimeoutError`` if
        no reply arrives within ``timeout`` seconds. Events read meanwhile go to :attr:`events`.
        """
        self._next_id += 1
        msg_id = f"drv-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = dict(arguments)
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpCommandError(command, str(err.get("class")), str(err.get("desc")))
            return reply.get("return")

    def hmp(self, cmdline: str, timeout: float = 10.0) -> str:
        """Run a human monitor command through ``human-monitor-command``; return its output."""
        result = self.execute("human-monitor-command", {"command-line": cmdline}, timeout)
        return str(result)

    # -- events ---------------------------------------------------------------------------

    def wait_event(
        self,
        name: str,
        timeout: float = 10.0,
        data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return (and remove) the first event called ``name`` whose data contains ``data``.

        Looks first at the events already collected, then reads from the socket until
        ``timeout`` seconds have passed (then raises ``TimeoutError``). Other events read
        meanwhile are kept in :attr:`events`.
        """
        for event in list(self.events):
            if _matches(event, name, data):
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._read_message(deadline)
            except TimeoutError:
                raise TimeoutError(f"no {name} event within {timeout} s") from None
            if "event" not in message:
                continue
            if _matches(message, name, data):
                return message
            self.events.append(message)

    def next_event(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Return (and remove) the oldest collected event, or read the next one from the socket.

        ``timeout=None`` blocks. Raises ``TimeoutError`` when nothing arrives in time and
        :class:`QmpError` once QEMU has closed the connection.
        """
        if self.events:
            return self.events.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if "event" in message:
                return message

    def read_events(self, duration: float) -> list[dict[str, Any]]:
        """Collect events for ``duration`` seconds (or until QEMU closes the socket).

        Returns the events already held in :attr:`events` followed by the new ones, and
        empties :attr:`events`.
        """
        collected = list(self.events)
        self.events.clear()
        deadline = time.monotonic() + duration
        while True:
            try:
                message = self._read_message(deadline)
            except (TimeoutError, QmpError):
                return collected
            if "event" in message:
                collected.append(message)


class SerialConsole:
    """The client end of a serial port exported by QEMU as a unix socket server.

    A background thread keeps reading the socket into :attr:`output`: QEMU's serial port
    stalls the guest (and drops console characters) once an unread socket fills up.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._output = bytearray()
        self._eof = False
        self._pos = 0

    @property
    def output(self) -> bytes:
        """Everything received so far."""
        with self._cond:
            return bytes(self._output)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the socket (retrying until ``timeout``) and start the reader thread."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to serial socket {self.path}: {exc}") from exc
                time.sleep(0.05)
                continue
            break
        self._sock = sock
        self._eof = False
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock,), name="serial-reader", daemon=True
        )
        self._reader.start()

    def _read_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._output += chunk
                self._cond.notify_all()

    def close(self) -> None:
        """Close the socket and stop the reader thread (idempotent)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._reader is not None:
                self._reader.join(5)
                self._reader = None
            self._sock.close()
            self._sock = None

    def send_line(self, line: str) -> None:
        """Type ``line`` followed by a newline."""
        if self._sock is None:
            raise QmpError("serial console not connected")
        self._sock.sendall(line.encode() + b"\n")

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until the output not consumed yet matches ``pattern``; consume up to the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._output[self._pos :].decode("utf-8", "replace")
                match = regex.search(text)
                if match is not None:
                    self._pos += len(text[: match.end()].encode("utf-8", "replace"))
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    why = "closed by QEMU" if self._eof else "timed out"
                    raise TimeoutError(
                        f"serial output did not match {regex.pattern!r} ({why}); tail:\n"
                        f"{text[-2000:]}"
                    )
                self._cond.wait(remaining)

    def run_in_guest(self, command: str, timeout: float = 30.0) -> str:
        """Run a shell command in the guest and return its output (needs a shell on it)."""
        marker = f"DONE-{time.monotonic_ns()}"
        typed_marker = f"{marker[:5]}''{marker[5:]}"
        self.send_line(f"{command}; echo {typed_marker}")
        match = self.expect(re.compile(rf"([\s\S]*?)(?<!'){re.escape(marker[5:])}"), timeout)
        # drop the echo of the typed command line and carriage returns
        text = match.group(1)
        _, _, output = text[text.find(typed_marker) :].partition("\n")
        return output.replace("\r", "")[: -len(marker[:5])]


class ThrowawayQemu:
    """A ``qemu-system-x86_64`` in its own temporary directory, removed again on close.

    The machine is ``q35`` under TCG with 256 MiB and no default devices. Sockets live in
    :attr:`dir`: ``driver.qmp`` (used by :attr:`qmp`), one ``NAME.qmp`` per entry of
    ``extra_qmp`` and ``serial.sock`` for the first serial port when ``serial`` is true (the
    default when a kernel is given). ``quorum=True`` adds a quorum node ``quorum0`` with
    ``vote-threshold=2`` over three raw 1 MiB children ``r0``, ``r1`` and ``r2``.

    Use as a context manager, or call :meth:`start` (done by the constructor unless
    ``start=False``) and :meth:`close`.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        extra_qmp: Sequence[str] = (),
        quorum: bool = False,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        append: str | None = None,
        serial: bool | None = None,
        devices: Sequence[str] = (),
        panic_pause: bool = False,
        extra_args: Sequence[str] = (),
        memory_mb: int = 256,
        start: bool = True,
        start_timeout: float = 15.0,
    ) -> None:
        binary = qemu_binary()
        if binary is None:
            raise QemuStartError("qemu-system-x86_64 is not installed")
        for extra in extra_qmp:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", extra) or extra == "driver":
                raise ValueError(f"bad extra QMP socket name: {extra!r}")
        self.binary = binary
        self.name = name
        self.extra_qmp = tuple(extra_qmp)
        self.quorum = quorum
        self.kernel = None if kernel is None else Path(kernel)
        self.initrd = None if initrd is None else Path(initrd)
        self.append = append
        self.serial = (kernel is not None) if serial is None else serial
        self.devices = tuple(devices)
        self.panic_pause = panic_pause
        self.extra_args = tuple(extra_args)
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="qmp-reactor-qemu-"))
        self.qmp = QmpDriver(self.dir / "driver.qmp")
        self.console: SerialConsole | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        if quorum:
            for child in QUORUM_CHILDREN:
                self.child_path(child).write_bytes(bytes(QUORUM_CHILD_SIZE))
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- paths and command line -----------------------------------------------------------

    @property
    def driver_socket(self) -> Path:
        """Path of the QMP socket used by :attr:`qmp`."""
        return self.dir / "driver.qmp"

    def qmp_socket(self, name: str) -> Path:
        """Path of the extra QMP socket called ``name``."""
        if name not in self.extra_qmp:
            raise KeyError(name)
        return self.dir / f"{name}.qmp"

    @property
    def serial_socket(self) -> Path:
        """Path of the serial console socket."""
        return self.dir / "serial.sock"

    @property
    def log_path(self) -> Path:
        """File receiving QEMU's stdout and stderr."""
        return self.dir / "qemu.log"

    def child_path(self, child: str) -> Path:
        """Path of the raw image file of quorum child ``child`` (``r0``, ``r1`` or ``r2``)."""
        if child not in QUORUM_CHILDREN:
            raise KeyError(child)
        return self.dir / f"{child}.raw"

    def quorum_blockdev(self) -> dict[str, Any]:
        """The ``-blockdev`` JSON object of the quorum node."""
        return {
            "driver": "quorum",
            "node-name": "quorum0",
            "vote-threshold": 2,
            "children": [
                {
                    "driver": "raw",
                    "node-name": child,
                    "file": {"driver": "file", "filename": str(self.child_path(child))},
                }
                for child in QUORUM_CHILDREN
            ],
        }

    def command_line(self) -> list[str]:
        """The full QEMU command line this instance starts."""
        args = [
            self.binary,
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            str(self.memory_mb),
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-qmp",
            f"unix:{self.driver_socket},server=on,wait=off",
        ]
        if self.name is not None:
            args += ["-name", self.name]
        for extra in self.extra_qmp:
            args += ["-qmp", f"unix:{self.dir / (extra + '.qmp')},server=on,wait=off"]
        if self.quorum:
            args += ["-blockdev", json.dumps(self.quorum_blockdev(), separators=(",", ":"))]
        if self.serial:
            args += [
                "-chardev",
                f"socket,id=serial0,path={self.serial_socket},server=on,wait=off",
                "-serial",
                "chardev:serial0",
            ]
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                args += ["-initrd", str(self.initrd)]
            if self.append is not None:
                args += ["-append", self.append]
        if self.panic_pause:
            args += ["-action", "panic=pause", "-device", "pvpanic-pci"]
        for device in self.devices:
            args += ["-device", device]
        args += list(self.extra_args)
        return args

    # -- process --------------------------------------------------------------------------

    def _sockets(self) -> list[Path]:
        paths = [self.driver_socket] + [self.dir / f"{n}.qmp" for n in self.extra_qmp]
        if self.serial:
            paths.append(self.serial_socket)
        return paths

    def start(self) -> None:
        """Start QEMU, wait for its sockets, connect :attr:`qmp` (and the serial console)."""
        if self._closed:
            raise QemuStartError("this ThrowawayQemu is closed")
        if self.alive:
            raise QemuStartError("QEMU is already running")
        self._reap()
        for path in self._sockets():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + self.start_timeout
        pending = self._sockets()
        while pending:
            if self._proc.poll() is not None:
                raise QemuStartError(
                    f"QEMU exited early with status {self._proc.returncode}:\n{self.log_text()}"
                )
            pending = [p for p in pending if not p.exists()]
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise QemuStartError(
                    f"QEMU sockets did not appear within {self.start_timeout} s: "
                    f"{[str(p) for p in pending]}\n{self.log_text()}"
                )
            time.sleep(0.02)
        try:
            if self.serial:
                self.console = SerialConsole(self.serial_socket)
                self.console.connect(timeout=max(1.0, deadline - time.monotonic()))
            self.qmp = QmpDriver(self.driver_socket)
            self.qmp.connect(timeout=max(1.0, deadline - time.monotonic()))
        except (OSError, QmpError) as exc:
            # QEMU creates its sockets before it builds the devices, so a bad -device
            # shows up here: give it a moment to exit and report what it said
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)
            status = self._proc.poll()
            state = "still running" if status is None else f"exited with status {status}"
            raise QemuStartError(f"QEMU {state}; {exc}:\n{self.log_text()}") from exc

    def log_text(self) -> str:
        """QEMU's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        """Process id of the running (or last) QEMU."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """True while the QEMU process is running."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self, sig: int = signal_mod.SIGKILL) -> None:
        """Send ``sig`` (default ``SIGKILL``) to QEMU if it is running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float | None = 30.0) -> int:
        """Wait for QEMU to exit and return its exit status."""
        if self._proc is None:
            raise QemuStartError("QEMU was never started")
        return self._proc.wait(timeout)

    def _reap(self) -> None:
        self.qmp.close()
        if self.console is not None:
            self.console.close()
            self.console = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def stop_process(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and close the driver; keep the directory."""
        self._reap()

    def restart(self) -> None:
        """Stop QEMU if it is running and start it again with the same sockets and disks."""
        self._reap()
        self.start()

    def close(self) -> None:
        """Stop QEMU if it is still alive and remove the temporary directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._reap()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayQemu:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- quorum ---------------------------------------------------------------------------

    def corrupt_child(self, child: str, data: bytes = b"\xde\xad\xbe\xef" * 128) -> None:
        """Overwrite the first sector of quorum child ``child`` with ``data`` (512 bytes)."""
        if not self.quorum:
            raise QemuStartError("this QEMU has no quorum disk")
        payload = (data * (_SECTOR // max(1, len(data)) + 1))[:_SECTOR]
        with open(self.child_path(child), "r+b") as image:
            image.write(payload)
            image.flush()
            os.fsync(image.fileno())

    def read_quorum(self, times: int = 1, offset: int = 0, length: int = _SECTOR) -> list[str]:
        """Read from ``quorum0`` through HMP ``qemu-io`` ``times`` times; return the outputs."""
        if not self.quorum:
            raise QemuStartError("this QEMU has no quorum disk")
        return [self.qmp.hmp(f'qemu-io quorum0 "read {offset} {length}"') for _ in range(times)]

    # -- guest console --------------------------------------------------------------------

    def _console(self) -> SerialConsole:
        if self.console is None:
            raise QemuStartError("this QEMU has no serial console")
        return self.console

    def send_line(self, line: str) -> None:
        """Type ``line`` and a newline on the serial console."""
        self._console().send_line(line)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for ``pattern`` on the serial console (see :meth:`SerialConsole.expect`)."""
        return self._console().expect(pattern, timeout)

    def run_in_guest(self, command: str, timeout: float = 30.0) -> str:
        """Run a shell command in the guest and return its output (needs a shell on ttyS0)."""
        return self._console().run_in_guest(command, timeout)
