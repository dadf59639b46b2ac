"""Start the explorer: check the store and the address, bind the socket, run uvicorn.

Binds 127.0.0.1 unless asked otherwise: the explorer has no authentication, so any address
reachable from other machines needs ``allow_public`` (and the caller prints a warning).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

from pathdb.store.db import open_store
from pathdb.store.errors import StoreError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ServeError(StoreError):
    """The explorer cannot start (bad store, address refused, port in use)."""


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_store(db: Path) -> None:
    """Refuse a missing file or one that is not a (current) pathdb store, with one line."""
    if not db.exists():
        raise ServeError(f"no store at {db}: run `pathdb search` first, or pass --db PATH")
    with open_store(db, read_only=True):
        pass


def bind(host: str, port: int, *, allow_public: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); one-line errors."""
    if not is_loopback(host) and not allow_public:
        raise ServeError(
            f"refusing to bind {host}: the explorer has no login, so anyone who can reach that "
            "address could read the whole store; keep the default 127.0.0.1 (use an SSH tunnel "
            "to reach it from elsewhere) or pass --allow-public to bind it anyway"
        )
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(
            f"cannot bind {host!r}: {e.strerror}; give an IP address or hostname"
        ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use (another `pathdb serve`?); choose "
                "another with --port N, or --port 0 for a free one"
            ) from None
        raise ServeError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """The http URL a bound socket serves."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(
    db: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_public: bool = False,
    announce: Callable[[str], None] = print,
) -> None:
    """Check the store, bind, announce the URL, and serve until interrupted (Ctrl-C)."""
    import uvicorn

    from pathdb.serve.app import create_app

    check_store(db)
    sock = bind(host, port, allow_public=allow_public)
    announce(url_of(sock))
    config = uvicorn.Config(create_app(db, warm=True), log_level="warning", lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
