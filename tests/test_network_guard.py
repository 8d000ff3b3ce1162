import socket

import pytest


def test_non_loopback_connections_are_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
        s.connect(("93.184.216.34", 80))


def test_loopback_connections_are_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket() as client:
            client.connect(server.getsockname())


def test_subprocesses_get_the_guard_too():
    import subprocess
    import sys

    from conftest import subprocess_env

    code = "import socket; s = socket.socket(); s.connect(('93.184.216.34', 80))"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "blocked" in result.stderr
