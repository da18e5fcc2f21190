"""The servable's key: what lets agents of other hosts talk to the worker, and no one else.

An agent runs whatever the worker sends it, and the worker trusts what the agents answer, so
off loopback the worker <-> agent sockets are ZeroMQ CURVE (authenticated and encrypted), as the
notebook ranks' predict sockets are (:mod:`dinb.job.secure_socket`). The difference: agents are
started by hand on other hosts, not handed a key by the process that starts them. So one
secret per servable, a *key file* of 32 random bytes (``python -m dinb serve-key FILE``, or made
by ``start_servable`` beside ``servable_config.py`` the first time it listens off loopback),
is given to the worker and to every agent, the way an SSH key or MPI's munge key is. Both key
pairs are derived from it::

    worker secret = BLAKE2b(secret, person="dinb-worker"),  agent secret = BLAKE2b(secret, "dinb-agent")
    public        = Curve25519(secret)   (zmq.curve_public)

The worker is the CURVE server with its pair and admits, through a ZAP handler on its own
ZeroMQ context, only the agents' public key. A process without the file fails the handshake:
its messages never reach the worker. On loopback nothing changes (plain TCP on this host).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinb.errors import DinbError

ZAP_DOMAIN = "dinb-serving"
SECRET_BYTES = 32


class ServableKeyError(DinbError):
    """The servable's key file is missing, unreadable or not one."""


def make_key_file(path: str | Path) -> Path:
    """Write a new servable key to ``path`` (owner read/write only); an existing file is kept."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")
    return path


@dataclass(frozen=True)
class ServableKeys:
    """The worker's and the agents' CURVE key pairs (Z85 bytes), from one key file."""

    worker_public: bytes
    worker_secret: bytes
    agent_public: bytes
    agent_secret: bytes

    @classmethod
    def load(cls, path: str | Path) -> ServableKeys:
        import zmq
        from zmq.utils import z85

        try:
            text = Path(path).read_text().strip()
            secret = bytes.fromhex(text)
        except OSError as e:
            raise ServableKeyError(
                f"servable key file {path} cannot be read ({e.strerror or e}); make one with python -m "
                "dinb serve-key FILE and give the same file to the worker and the agents") from None
        except ValueError:
            raise ServableKeyError(f"{path} is not a servable key file (64 hex digits); make one with "
                            "python -m dinb serve-key FILE") from None
        if len(secret) != SECRET_BYTES:
            raise ServableKeyError(f"{path} holds {len(secret)} bytes, a servable key {SECRET_BYTES}")

        def pair(person: bytes) -> tuple[bytes, bytes]:
            sec = z85.encode(hashlib.blake2b(secret, digest_size=32, person=person).digest())
            return zmq.curve_public(sec), sec

        (wp, ws), (ap, as_) = pair(b"dinb-worker"), pair(b"dinb-agent")
        return cls(wp, ws, ap, as_)

    def as_agent(self, sock: Any) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the worker."""
        sock.curve_secretkey = self.agent_secret
        sock.curve_publickey = self.agent_public
        sock.curve_serverkey = self.worker_public

    def worker_context(self) -> tuple[Any, Any]:
        """A ZeroMQ context of its own and its ZAP handler, which admits only the agents' key
        (:func:`close_worker_context` ends both)."""
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        ctx = zmq.Context()
        auth = ThreadAuthenticator(ctx)
        auth.start()
        agent = self.agent_public

        class OnlyAgents:
            def callback(self, domain: str, key: bytes) -> bool:
                return bool(key == agent)

        auth.configure_curve_callback(ZAP_DOMAIN, OnlyAgents())
        return ctx, auth

    def as_worker(self, sock: Any) -> None:
        """Make ``sock`` (of :meth:`worker_context`, not yet bound) the CURVE server."""
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_server = True
        sock.curve_secretkey = self.worker_secret
        sock.curve_publickey = self.worker_public


def close_worker_context(ctx: Any, auth: Any) -> None:
    auth.stop()
    ctx.term()


def keys_for(address: str, key_file: str | Path | None, who: str) -> ServableKeys | None:
    """The keys a socket to or at ``address`` needs: None on loopback; off loopback the key
    file's, which must be given (``who`` says to whom, for the error)."""
    from dinb.job.addresses import is_loopback

    host = address.rpartition(":")[0].strip("[]")
    if is_loopback(host):
        return None
    if key_file is None:
        raise ServableKeyError(
            f"{who}: the distributed address {address} is off loopback, so the worker and its agents "
            "authenticate each other with the servable's key file; give it (key_file= / --key-file; "
            "python -m dinb serve-key FILE makes one, and start_servable makes "
            "<servable_dir>/<name>/servable.key)"
        )
    return ServableKeys.load(key_file)
