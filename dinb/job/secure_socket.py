"""The notebook's direct sockets to its ranks, authenticated wherever they leave loopback.

A rank's predict socket runs whatever model is loaded on whatever it is sent, so on a network
only the notebook that started the job may use it. Off loopback it is a ZeroMQ CURVE server:

* the notebook (the client) makes a key pair per cluster and hands its *public* key to every
  rank through ipyparallel, whose messages are signed with the session's HMAC key;
* each rank makes its own server key pair and admits, through a ZAP handler on its own ZeroMQ
  context, only the client key it was given. Everything on the socket is also encrypted;
* a process that lacks the client's secret key fails the handshake and never reaches the rank:
  its messages are not read, and nothing is answered.

On loopback the socket stays plain: only processes of this host reach it, as with the JAX
coordinator and the ipyparallel channels of a one-host cluster.
"""

from __future__ import annotations

from typing import Any

from dinb.job.addresses import is_loopback

ZAP_DOMAIN = "dinb"
_authenticators: list[Any] = []


class ClientKeys:
    """The notebook's CURVE key pair (Z85 text), made once per cluster."""

    def __init__(self) -> None:
        import zmq

        public, secret = zmq.curve_keypair()
        self.public, self.secret = public.decode(), secret.decode()


class _OnlyKey:
    """ZAP credentials check: one allowed client key."""

    def __init__(self, key: str):
        self.key = key.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        return bool(key == self.key)


def reply_socket(host: str, client_key: str | None, curve: bool | None = None) -> tuple[Any, str | None]:
    """A REP socket bound to ``host`` on a free port; returns it and the server's public key.

    Off loopback (or with ``curve=True``) it is a CURVE server: ``client_key`` is required and
    is the only key admitted."""
    import zmq

    if not (curve if curve is not None else not is_loopback(host)):
        sock = zmq.Context.instance().socket(zmq.REP)
        sock.bind_to_random_port(f"tcp://{host}")
        return sock, None
    if not client_key:
        raise ValueError(f"a socket on {host} leaves loopback: it needs the client's CURVE key")
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()  # its own context: the ZAP handler sees only this socket's handshakes
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, _OnlyKey(client_key))
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.REP)
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.bind_to_random_port(f"tcp://{host}")
    _authenticators.append(auth)  # serves as long as the process (one predict socket per rank)
    return sock, public.decode()


def endpoint_of(sock: Any) -> str:
    import zmq

    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def request_socket(endpoint: str, server_key: str | None, keys: ClientKeys | None) -> Any:
    """The client's REQ socket to a rank's predict socket (CURVE when the rank gave a key)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        if keys is None:
            raise ValueError(f"{endpoint} is a CURVE socket: connecting needs the client's keys")
        sock.curve_serverkey = server_key.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_secretkey = keys.secret.encode()
    sock.connect(endpoint)
    return sock
