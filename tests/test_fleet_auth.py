"""NATS credentials against a real ``nats-server`` whose configuration requires them.

User and password, token, and NKey, each read from a ``${file:}`` or ``${env:}``
secret; the sidecar publishes, and neither its log, ``/healthz`` nor
``/metrics`` shows the secret in any form. A wrong secret is refused by the
server, said in the log, and still not shown.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import nkeys
import pytest

from tests.support.natsserver import NatsServer
from tests.support.ops import Sidecar
from tests.test_faults import PeerThread
from tests.test_fleet import host, wait


def forms(secret: str) -> list[str]:
    """``secret`` as it could leak: plain, JSON-escaped, URL-quoted, base64, hex."""
    raw = secret.encode()
    return [secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret),
            base64.b64encode(raw).decode(), raw.hex()]  # fmt: skip


def nkey_pair() -> tuple[str, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def secret_file(tmp_path: Path, value: str) -> str:
    path = tmp_path / "nats-secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return f"${{file:{path}}}"


def setup(tmp_path: Path, mode: str) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]:
    """(server config, the sidecar's credentials, a test client's options, env) for ``mode``."""
    if mode == "password":
        secret = "pw-" + secrets.token_hex(12)
        conf = f'authorization {{ users: [ {{user: reactor, password: "{secret}"}} ] }}'
        cred = {"user": "reactor", "password": secret_file(tmp_path, secret)}
        return conf, cred, {"user": "reactor", "password": secret}, {"SECRET": secret}
    if mode == "token":
        secret = "tok-" + secrets.token_hex(12)
        conf = f'authorization {{ token: "{secret}" }}'
        cred = {"token": "${env:NATS_TOKEN}"}
        return conf, cred, {"token": secret}, {"NATS_TOKEN": secret, "SECRET": secret}
    seed, public = nkey_pair()
    conf = f"authorization {{ users: [ {{nkey: {public}}} ] }}"
    cred = {"nkey_seed": secret_file(tmp_path, seed)}
    return conf, cred, {"nkeys_seed_str": seed}, {"SECRET": seed}


def shows(sidecar: Sidecar, secret: str) -> list[str]:
    """Where the sidecar shows ``secret``: its log, /healthz, /metrics."""
    texts = {"log": sidecar.log_text(), "healthz": sidecar.get("/healthz")[1].decode(),
             "metrics": sidecar.get("/metrics")[1].decode()}  # fmt: skip
    return [where for where, text in texts.items() for form in forms(secret) if form in text]


@pytest.mark.parametrize("mode", ["password", "token", "nkey"])
def test_credentials_from_secrets_connect_and_are_never_shown(tmp_path: Path, mode: str) -> None:
    conf, cred, client, env = setup(tmp_path, mode)
    peer = PeerThread(tmp_path / "h1.qmp")
    with NatsServer(tmp_path, config=conf, client=client) as server, peer as fake:
        sidecar = host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")], credentials=cred)
        sidecar.env.update({k: v for k, v in env.items() if k != "SECRET"})
        with sidecar.start():
            sidecar.wait_log("nats .*: connected")
            wait(lambda: fake.accepted == 1, 20, "a connection")
            wait(lambda: len(server.messages()) == 1, 30, "REACTOR_CONNECTED published")
            assert sidecar.healthz()[1]["fleet"]["nats_connected"] == 1
            assert shows(sidecar, env["SECRET"]) == []
        assert "Traceback" not in sidecar.log_text()


def test_a_wrong_password_is_refused_said_and_not_shown(tmp_path: Path) -> None:
    conf, _, client, _ = setup(tmp_path, "password")
    wrong = "wrong-" + secrets.token_hex(12)
    cred = {"user": "reactor", "password": "${env:NATS_PASSWORD}"}
    peer = PeerThread(tmp_path / "h1.qmp")
    with NatsServer(tmp_path, config=conf, client=client) as server, peer as fake:
        sidecar = host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")], credentials=cred)
        sidecar.env["NATS_PASSWORD"] = wrong
        with sidecar.start():
            sidecar.wait_log("nats .*: cannot connect .*[Aa]uthorization")
            wait(lambda: fake.accepted == 1, 20, "a connection")  # the VMs are still watched
            assert sidecar.healthz()[1]["fleet"]["nats_connected"] == 0
            assert shows(sidecar, wrong) == []
        assert server.messages() == []
