"""A hostile local user for the benchmarks, as its own process.

``python benchmarks/hostile.py MODE ADDRESS [COUNT] [CPU]`` against a listener
(``--listen``) at ADDRESS, a unix socket:

- ``hold``: connect, greet and negotiate as QEMU does, then never answer the
  sidecar's first command while streaming 930 KB events; when hung up on (the
  greeting timeout), connect again;
- ``idle``: keep COUNT connections open that never greet; the ones the
  listener's backlog refuses, and the ones it hangs up on, are tried again.

It prints ``started`` once its first connection is made and ``tried N BYTES``
(the connections it opened, the bytes of events it sent) when its standard
input closes, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakeqmp import GREETING, Peer, encode_event

BIG = 930 * 1024


class Attack:
    """One attack's state: connections made, and whether the first one was announced."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.tried = 0
        self.sent = 0
        self.started = asyncio.Event()

    async def hold(self) -> None:
        """Withhold the reply to the first command while streaming huge events, forever."""
        line = encode_event("BLOCK_IO_ERROR", {"device": "d" * BIG, "operation": "write"})
        while True:
            reader, writer = await asyncio.open_unix_connection(self.address)
            self.tried += 1
            peer = Peer(reader, writer)
            with contextlib.suppress(ConnectionError, AssertionError):
                await peer.send(GREETING)
                command = await peer.read_command()
                assert command is not None
                await peer.send({"return": {}, "id": command.get("id")})
                self.started.set()
                while True:
                    await peer.send_raw(line)
                    self.sent += len(line)
            writer.close()

    async def idle(self, count: int) -> None:
        """Keep up to ``count`` silent connections open."""
        held: list[socket.socket] = []
        while True:
            held = [s for s in held if _open(s)]
            for _ in range(count - len(held)):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                self.tried += 1
                if sock.connect_ex(self.address) == 0:
                    held.append(sock)
                    self.started.set()
                else:  # the backlog is full
                    sock.close()
            await asyncio.sleep(0.5)


def _open(sock: socket.socket) -> bool:
    """False (and closed) once the other side has hung up."""
    try:
        if sock.recv(1, socket.MSG_PEEK) == b"":
            sock.close()
            return False
    except BlockingIOError:
        pass
    except OSError:
        sock.close()
        return False
    return True


async def main(mode: str, address: str, count: int) -> None:
    attack = Attack(address)
    work = asyncio.create_task(attack.hold() if mode == "hold" else attack.idle(count))
    await attack.started.wait()
    print("started", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()
    work.cancel()
    print(f"tried {attack.tried} {attack.sent}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        os.sched_setaffinity(0, {int(sys.argv[4])})
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0))
