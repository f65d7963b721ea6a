"""NATS credentials against a real ``nats-server`` whose configuration requires them.

User and password, token, and NKey, each read from a ``${file:}`` or ``${env:}``
secret, and a ``.creds`` file (a user JWT and its seed) under an operator whose
JWTs the test signs itself; the sidecar publishes, and neither its log,
``/healthz`` nor ``/metrics`` shows the secret (the seed, the JWT's signature)
in any form. A wrong secret, or a user of an account the server does not know,
is refused by the server, said in the log, and still not shown.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
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


def nkey_pair(prefix: int = nkeys.PREFIX_BYTE_USER) -> tuple[str, str]:
    """(seed, public key) of a new key pair: a user's, or an operator's or account's."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def issue(issuer_seed: str, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A v2 JWT for ``subject``, signed by ``issuer_seed``'s key (as ``nsc`` makes one)."""
    issuer = nkeys.from_seed(bytearray(issuer_seed.encode()))
    claims: dict[str, Any] = {"jti": "", "iat": int(time.time()),
                              "iss": issuer.public_key.decode(), "name": name, "sub": subject,
                              "nats": {**nats, "version": 2}}  # fmt: skip
    digest = hashlib.sha256(json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signed = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return signed + "." + b64url(issuer.sign(signed.encode()))


UNLIMITED: dict[str, Any] = {"wildcards": True} | {
    k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf",
                    "mem_storage", "disk_storage", "streams", "consumer")}  # fmt: skip

CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def operator_mode(tmp_path: Path, known: bool = True) -> tuple[str, Path, str, str]:
    """(server config, a user's ``.creds`` file, its seed, its JWT's signature): an operator
    with a system account (JetStream needs one) and an account with JetStream, preloaded in a
    memory resolver, and a user of that account or, not ``known``, of an account the server
    was never told of."""
    op_seed, op = nkey_pair(nkeys.PREFIX_BYTE_OPERATOR)
    _, system = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    acc_seed, acc = nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = nkey_pair()
    signer = acc_seed if known else nkey_pair(nkeys.PREFIX_BYTE_ACCOUNT)[0]
    accounts = {system: issue(op_seed, system, "SYS", {"type": "account"}),
                acc: issue(op_seed, acc, "REACTOR",
                           {"type": "account", "limits": UNLIMITED})}  # fmt: skip
    user_jwt = issue(signer, user, "reactor", {"type": "user", "pub": {}, "sub": {},
                                               "subs": -1, "data": -1, "payload": -1})  # fmt: skip
    operator = issue(op_seed, op, "OP", {"type": "operator", "system_account": system})
    preload = ", ".join(f'{pub}: "{jwt}"' for pub, jwt in accounts.items())
    conf = (f'operator: "{operator}"\nsystem_account: {system}\nresolver: MEMORY\n'
            f"resolver_preload: {{ {preload} }}\n")  # fmt: skip
    path = tmp_path / "reactor.creds"
    path.write_text(CREDS.format(jwt=user_jwt, seed=user_seed))
    path.chmod(0o600)
    return conf, path, user_seed, user_jwt.rsplit(".", 1)[1]


def secret_file(tmp_path: Path, value: str) -> str:
    path = tmp_path / "nats-secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return f"${{file:{path}}}"


def setup(tmp_path: Path, mode: str) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]:
    """(server config, the sidecar's credentials, a test client's options, env) for ``mode``;
    the env's ``SECRET*`` values are what must never be shown, the rest the sidecar's."""
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
    if mode == "creds":
        conf, path, seed, signature = operator_mode(tmp_path)
        hidden = {"SECRET": seed, "SECRET_SIGNATURE": signature}
        return conf, {"creds_file": str(path)}, {"user_credentials": str(path)}, hidden
    seed, public = nkey_pair()
    conf = f"authorization {{ users: [ {{nkey: {public}}} ] }}"
    cred = {"nkey_seed": secret_file(tmp_path, seed)}
    return conf, cred, {"nkeys_seed_str": seed}, {"SECRET": seed}


def shows(sidecar: Sidecar, secret: str) -> list[str]:
    """Where the sidecar shows ``secret``: its log, /healthz, /metrics."""
    texts = {"log": sidecar.log_text(), "healthz": sidecar.get("/healthz")[1].decode(),
             "metrics": sidecar.get("/metrics")[1].decode()}  # fmt: skip
    return [where for where, text in texts.items() for form in forms(secret) if form in text]


@pytest.mark.parametrize("mode", ["password", "token", "nkey", "creds"])
def test_credentials_from_secrets_connect_and_are_never_shown(tmp_path: Path, mode: str) -> None:
    conf, cred, client, env = setup(tmp_path, mode)
    peer = PeerThread(tmp_path / "h1.qmp")
    with NatsServer(tmp_path, config=conf, client=client) as server, peer as fake:
        sidecar = host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")], credentials=cred)
        hidden = [v for k, v in env.items() if k.startswith("SECRET")]
        sidecar.env.update({k: v for k, v in env.items() if not k.startswith("SECRET")})
        with sidecar.start():
            sidecar.wait_log("nats .*: connected")
            wait(lambda: fake.accepted == 1, 20, "a connection")
            wait(lambda: len(server.messages()) == 1, 30, "REACTOR_CONNECTED published")
            assert sidecar.healthz()[1]["fleet"]["nats_connected"] == 1
            assert [where for secret in hidden for where in shows(sidecar, secret)] == []
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


def test_creds_of_an_unknown_account_are_refused_said_and_not_shown(tmp_path: Path) -> None:
    conf, path, seed, signature = operator_mode(tmp_path, known=False)
    peer = PeerThread(tmp_path / "h1.qmp")
    with NatsServer(tmp_path, config=conf) as server, peer as fake:
        cred = {"creds_file": str(path)}
        sidecar = host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")], credentials=cred)
        with sidecar.start():
            sidecar.wait_log("nats .*: cannot connect .*[Aa]uthorization")
            wait(lambda: fake.accepted == 1, 20, "a connection")  # the VMs are still watched
            assert sidecar.healthz()[1]["fleet"]["nats_connected"] == 0
            assert shows(sidecar, seed) == shows(sidecar, signature) == []
        assert "account missing" in server.log.read_text()  # refused for its account, not a typo
