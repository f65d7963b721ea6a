"""A fake QEMU in its own process that connects to a listener, as QEMU's client chardev does.

``python -m tests.support.qmpclient ADDRESS NAME [EVENT ...] [--leave]`` connects
to ADDRESS (a unix socket or ``host:port``), greets, answers ``query-name`` with
NAME and the other commands as the fake peer does, sends each EVENT once the
opening ``query-status`` is answered, and prints every command it receives on
stdout, one per line. With ``--leave`` it hangs up right after the events;
otherwise it serves until the other side hangs up. Being its own process gives
it its own pid, so the listener sees another QEMU than the test's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from reactor.sources.discovery import parse_address
from tests.fakeqmp import Peer


async def client(address: str, name: str, events: list[str], leave: bool) -> None:
    """Connect, then behave as described above."""
    target = parse_address(address)
    if isinstance(target, tuple):
        reader, writer = await asyncio.open_connection(*target)
    else:
        reader, writer = await asyncio.open_unix_connection(target)
    peer = Peer(reader, writer)
    peer.name = name
    with contextlib.suppress(ConnectionError, AssertionError):
        await peer.handshake()
        while (command := await peer.read_command()) is not None:
            print(command.get("execute"), flush=True)
            if not await peer.answer(command):
                break
            if command.get("execute") == "query-status" and events:
                for event in events:
                    await peer.send_event(event, {"action": "pause"})
                events = []
                if leave:
                    break
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("name")
    parser.add_argument("events", nargs="*")
    parser.add_argument("--leave", action="store_true")
    args = parser.parse_args()
    asyncio.run(client(args.address, args.name, args.events, args.leave))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
