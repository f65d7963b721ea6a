"""A unix-socket relay in front of a real QEMU monitor that can lose QEMU's events.

``LossyRelay(qemu_socket, path)`` listens on ``path``; each client gets its own
connection to ``qemu_socket``. What the client sends reaches QEMU unchanged.
QEMU ends every QMP message with a newline, so its output is relayed message by
message; while ``dropping`` is set, messages that are events are swallowed
(replies still pass). This is how a test makes a VM change state without an
event the sidecar sees, as a lost connection or a sidecar restart would.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from pathlib import Path


class LossyRelay:
    """Relay ``path`` -> ``qemu_socket``; set ``dropping`` to lose QEMU's events."""

    def __init__(self, qemu_socket: Path, path: Path) -> None:
        self.qemu_socket = qemu_socket
        self.dropping = False
        self.dropped: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            client, _ = self._listener.accept()
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.qemu_socket))
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pending = b""
        with client, upstream:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    upstream.sendall(data)
                if upstream in ready:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    pending += data
                    *messages, pending = pending.split(b"\n")
                    for message in messages:
                        if not self._lost(message):
                            client.sendall(message + b"\n")

    def _lost(self, message: bytes) -> bool:
        if not self.dropping:
            return False
        try:
            event = json.loads(message).get("event")
        except ValueError:
            return False
        if event is not None:
            self.dropped.append(str(event))
        return event is not None

    def close(self) -> None:
        """Stop relaying and close every socket."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def __enter__(self) -> LossyRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
