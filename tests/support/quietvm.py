"""A quiet VM in its own process: a fake QEMU whose STOPs a rule answers with ``cont``.

``python -m tests.support.quietvm SOCKET COUNT INTERVAL`` serves a fake QMP
socket at SOCKET (the sidecar dials it). Once the sidecar has connected it sends
STOP COUNT times, INTERVAL seconds apart, each time waiting (up to a minute)
for the sidecar's ``cont``; it prints how long each took, in milliseconds, one
per line, or ``lost`` for a STOP that got none, and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time

from tests.fakeqmp import FakeQmp

CONT_DEADLINE = 60.0


async def quiet_vm(path: str, count: int, interval: float) -> None:
    """Serve ``path``; send the STOPs and print each one's time to ``cont``."""
    async with FakeQmp(path) as qemu:
        peer = await qemu.wait_accepted(1, timeout=120)
        while peer.commands[-1:] != ["query-status"]:  # announced
            await asyncio.sleep(0.01)
        for _ in range(count):
            await asyncio.sleep(interval)
            conts = peer.commands.count("cont")
            sent = time.monotonic()
            await peer.send_event("STOP")
            end = sent + CONT_DEADLINE
            while peer.commands.count("cont") == conts and time.monotonic() < end:
                await asyncio.sleep(0.001)
            got = peer.commands.count("cont") > conts
            print(f"{(time.monotonic() - sent) * 1000:.2f}" if got else "lost", flush=True)


if __name__ == "__main__":
    asyncio.run(quiet_vm(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
