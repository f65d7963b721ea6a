"""A fake QMP peer for load tests and malformed input: an asyncio unix server.

It speaks real QMP framing (greeting, ``qmp_capabilities``, JSON lines) and is
scripted per connection: each accepted connection runs the next *behaviour*
given to ``FakeQmp`` (then ``default``). Behaviours are plain coroutines taking
a ``Peer``; the ones here cover a well-behaved mini QEMU (``normal``), a peer
that never greets (``silent``), garbage, an endless line, half a JSON object,
and a flood of pre-encoded events. Real QEMU is used everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fakeqmp"},
        "capabilities": ["oob"],
    }
}

PROVOKED = {
    "stop": ("STOP", None),
    "cont": ("RESUME", None),
    "system_reset": ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
    "system_powerdown": ("POWERDOWN", None),
}


_DECODER = json.JSONDecoder()


def timestamp() -> dict[str, int]:
    """Now, as QEMU stamps its events."""
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


def encode_event(name: str, data: dict[str, Any] | None = None) -> bytes:
    """One event line as QEMU writes it."""
    message: dict[str, Any] = {"timestamp": timestamp(), "event": name}
    if data is not None:
        message["data"] = data
    return json.dumps(message).encode() + b"\n"


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = "running"
        self.name: str | None = None
        self.commands: list[str] = []
        self.sent = 0
        self.closed = asyncio.Event()
        self._inbox = ""

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are and wait until the socket takes them."""
        self.writer.write(data)
        self.sent += len(data)
        await self.writer.drain()

    async def send(self, message: dict[str, Any]) -> None:
        """Write one JSON message line."""
        await self.send_raw(json.dumps(message).encode() + b"\n")

    async def send_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Write one event line."""
        await self.send_raw(encode_event(name, data))

    async def read_command(self) -> dict[str, Any] | None:
        """The next command the client sent, or None at end of file.

        Clients need not end a command with a newline (qemu.qmp does not), so
        the input is decoded as a stream of JSON values, as QEMU does.
        """
        while True:
            text = self._inbox.lstrip()
            try:
                command, end = _DECODER.raw_decode(text)
            except ValueError:
                chunk = await self.reader.read(65536)
                if not chunk:
                    return None
                self._inbox = text + chunk.decode()
                continue
            self._inbox = text[end:]
            self.commands.append(str(command.get("execute")))
            return dict(command)

    async def handshake(self) -> None:
        """Greet and answer ``qmp_capabilities``."""
        await self.send(GREETING)
        command = await self.read_command()
        assert command is not None and command["execute"] == "qmp_capabilities"
        await self.send({"return": {}, "id": command.get("id")})

    async def answer(self, command: dict[str, Any]) -> bool:
        """Reply to one command like QEMU would; False once the peer should hang up."""
        name, msg_id = command.get("execute"), command.get("id")
        if name == "quit":
            await self.send({"return": {}, "id": msg_id})
            await self.send_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            return False
        reply = self.reply(str(name))
        if reply is None:
            error = {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}
            await self.send({"error": error, "id": msg_id})
            return True
        await self.send({"return": reply, "id": msg_id})
        if name in PROVOKED:
            await self.send_event(*PROVOKED[str(name)])
        return True

    def reply(self, name: str) -> Any:
        """The ``return`` value of a command, or None for an unknown command."""
        running = self.status == "running"
        replies: dict[str, Any] = {
            "query-version": GREETING["QMP"]["version"],
            "query-status": {"status": self.status, "singlestep": False, "running": running},
            "query-name": {"name": self.name} if self.name else {},
        }
        if name in replies:
            return replies[name]
        return {} if name in PROVOKED else None

    async def serve_commands(self) -> None:
        """Answer commands until the client hangs up (or sends ``quit``)."""
        while (command := await self.read_command()) is not None:
            if not await self.answer(command):
                return

    async def answer_intro(self) -> None:
        """Answer the client's opening query-version and query-status."""
        for _ in range(2):
            command = await self.read_command()
            assert command is not None
            await self.answer(command)


Behaviour = Callable[[Peer], Awaitable[None]]


def normal(status: str = "running", name: str | None = None) -> Behaviour:
    """A well-behaved mini QEMU in run state ``status``, answering ``query-name`` with ``name``."""

    async def behave(peer: Peer) -> None:
        peer.status, peer.name = status, name
        await peer.handshake()
        await peer.serve_commands()

    return behave


async def silent(peer: Peer) -> None:
    """Accept and never greet; wait for the client to give up."""
    await peer.reader.read()


async def garbage(peer: Peer) -> None:
    """Handshake properly, then send a line that is not JSON."""
    await peer.handshake()
    await peer.answer_intro()
    await peer.send_raw(b"this is not JSON at all\n")
    await peer.reader.read()


async def half_object(peer: Peer) -> None:
    """Handshake, then half a JSON object, then hang up."""
    await peer.handshake()
    await peer.answer_intro()
    await peer.send_raw(b'{"timestamp": {"seconds": 1, "microsec')


def huge_line(total: int = 100 * 1024 * 1024, chunk: int = 1024 * 1024) -> Behaviour:
    """Handshake, then up to ``total`` bytes with no newline, written ``chunk`` at a time."""

    async def behave(peer: Peer) -> None:
        await peer.handshake()
        await peer.answer_intro()
        block = b'{"event": "' + b"x" * (chunk - 11)
        with contextlib.suppress(ConnectionError):
            while peer.sent < total:
                await peer.send_raw(block)

    return behave


def flood(count: int, batch: int = 2000, event: str = "BLOCK_IO_ERROR") -> Behaviour:
    """Handshake, then ``count`` events written as pre-encoded batches of ``batch``."""
    data = {"device": "", "node-name": "disk0", "operation": "write", "action": "report"}
    line = encode_event(event, data)

    async def behave(peer: Peer) -> None:
        await peer.handshake()
        await peer.answer_intro()
        chunk = line * batch
        for _ in range(count // batch):
            await peer.send_raw(chunk)
        await peer.send_raw(line * (count % batch))
        await peer.serve_commands()

    return behave


class FakeQmp:
    """A unix-socket QMP server whose connections follow the scripted behaviours."""

    def __init__(
        self, path: str | Path, *behaviours: Behaviour, default: Behaviour | None = None
    ) -> None:
        self.path = str(path)
        self.behaviours: deque[Behaviour] = deque(behaviours)
        self.default = default or normal()
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        return len(self.peers)

    async def wait_accepted(self, count: int, timeout: float = 10.0) -> Peer:
        """Wait until ``count`` connections were accepted; return the latest peer."""
        async with asyncio.timeout(timeout):
            while self.accepted < count:
                await asyncio.sleep(0.01)
        return self.peers[-1]

    async def start(self) -> FakeQmp:
        """Start listening."""
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def close(self) -> None:
        """Stop listening and hang up on every peer."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()

    async def __aenter__(self) -> FakeQmp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        behaviour = self.behaviours.popleft() if self.behaviours else self.default
        try:
            await behaviour(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # close() hung up on us; asyncio 3.11 logs a handler that ends cancelled
        finally:
            peer.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)
