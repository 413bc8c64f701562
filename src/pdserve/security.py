"""Who may talk to a cluster's internal sockets (workers' control and KV sockets, the frontend's heartbeats).

On loopback, the default, only processes of this host can connect. Anywhere else every internal socket is
encrypted and authenticated with ZMQ's CURVE: `pdserve up` generates the cluster's keys once (a key pair
for the sockets that bind, one for the sockets that connect) and hands them to its processes in the
environment (``PDSERVE_CLUSTER_KEYS``, never on a command line; ``pdserve keys`` prints a fresh set for
processes started by hand). A binding socket's authenticator admits only the cluster's client key: a
process without the keys, or with another cluster's, is refused before any message reaches pdserve. A
socket asked to bind beyond loopback without keys refuses to start.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket as _socket
from dataclasses import dataclass

import zmq

logger = logging.getLogger(__name__)

ENV = "PDSERVE_CLUSTER_KEYS"
_AUTHENTICATORS: dict[int, object] = {}  # per ZMQ context: its ZAP handler


@dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> ClusterKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def to_env(self) -> str:
        return json.dumps({k: getattr(self, k).decode() for k in ("server_public", "server_secret",
                                                                   "client_public", "client_secret")})

    @classmethod
    def from_env(cls) -> ClusterKeys | None:
        text = os.environ.get(ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(*(data[k].encode() for k in ("server_public", "server_secret", "client_public",
                                                    "client_secret")))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{ENV} does not hold a cluster's keys (`pdserve keys` prints a set): {e}") from e


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(sock: zmq.Socket, host: str, port: int = 0) -> str:
    """Bind an internal socket on ``host:port`` (port 0: one the OS picks), as a CURVE server when the
    cluster has keys; return the address peers connect to. ValueError beyond loopback without keys."""
    keys = ClusterKeys.from_env()
    if keys is None and not is_loopback(host):
        raise ValueError(f"internal sockets on {host} need the cluster's keys in {ENV} (pdserve up makes them; "
                         "`pdserve keys` prints a set); loopback needs none")
    if keys is not None:
        _authenticate(sock.context, keys)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys.server_public, keys.server_secret
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    if host in ("0.0.0.0", "*", "::"):
        host = _socket.gethostname()
    return f"tcp://{host}:{port}"


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect an internal socket, as a CURVE client when the cluster has keys."""
    keys = ClusterKeys.from_env()
    if keys is not None:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey, sock.curve_secretkey = keys.client_public, keys.client_secret
    sock.connect(address)


def _authenticate(context: zmq.Context, keys: ClusterKeys) -> None:
    """Start the context's authenticator (once): it admits the cluster's client key only."""
    if id(context) in _AUTHENTICATORS:
        return
    import zmq.asyncio

    class _ClusterOnly:
        def callback(self, domain: str, key: bytes) -> bool:
            allowed = zmq.utils.z85.encode(key) == keys.client_public or key == keys.client_public
            if not allowed:
                logger.warning("refused a connection with a key that is not this cluster's")
            return allowed

    if isinstance(context, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator
        auth = AsyncioAuthenticator(context)
    else:
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_ClusterOnly())
    _AUTHENTICATORS[id(context)] = auth
