"""Network facts every part of the tool needs and none owns: is an address this machine, a
free loopback port for a child server, and a listening socket taken before a slow start."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_url(host: str, port: int | None = None) -> str:
    """http://HOST[:PORT], an IPv6 address in brackets (RFC 3986), so `urlsplit` reads it back."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}" + (f":{port}" if port is not None else "")


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds it (SO_REUSEADDR, so a port in TIME_WAIT is
    not taken for busy). Raises OSError when the port is in use or the address is not this
    machine's. Bound before a model loads, a busy port costs a second, not a minute."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
