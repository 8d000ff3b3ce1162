"""Blocks every connection to a non-loopback address in this Python process.

Loaded by pytest (conftest.py) and, through PYTHONPATH, by every `edgedistill` subprocess a
test starts, so "offline" is enforced rather than assumed.
"""

import ipaddress
import socket


def is_loopback(address) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"
    return isinstance(address, (str, bytes))  # AF_UNIX paths stay on this machine


def _guarded(real):
    def connect(self, address):
        if not is_loopback(address):
            raise ConnectionRefusedError(f"blocked: a test tried to reach the network ({address!r})")
        return real(self, address)
    connect.edgedistill_guard = True
    return connect


if not getattr(socket.socket.connect, "edgedistill_guard", False):
    socket.socket.connect = _guarded(socket.socket.connect)
    socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
