"""A pytest fixture that runs wsgate in front of the service under test.

wsgate binds port 0 and writes where it listens to its ready file (`--ready-file`), with the
path of the CA certificate it made in memory (`ca_out`); `--exit-on-eof` ties it to this
process, so a test run that dies does not leave it behind.
"""

import json
import os
import pathlib
import socket
import subprocess
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WSGATE = os.environ.get("WSGATE_BIN", str(ROOT / "target" / "debug" / "wsgate"))


def tcp_echo():
    """The service under test, in miniature: a TCP echo service on a free port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


@pytest.fixture(scope="session")
def wsgate(tmp_path_factory):
    """wsgate with a wss:// listener on a free port; yields its ready file's contents."""
    echo = tcp_echo()
    workdir = tmp_path_factory.mktemp("wsgate")
    config = workdir / "gateway.toml"
    config.write_text(
        f"""
[[listener]]
bind = "127.0.0.1:0"
tls = {{ self_signed = true, ca_out = "{workdir / 'ca.pem'}" }}

[[route]]
path = "/echo"
upstream = "tcp://127.0.0.1:{echo.getsockname()[1]}"
"""
    )
    ready_file = workdir / "ready.json"
    process = subprocess.Popen(
        [WSGATE, "--config", str(config), "--ready-file", str(ready_file), "--exit-on-eof"],
        stdin=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not ready_file.exists():
        assert process.poll() is None, f"wsgate exited with {process.returncode}"
        assert time.monotonic() < deadline, "wsgate wrote no ready file within 10 s"
        time.sleep(0.02)
    yield json.loads(ready_file.read_text())
    process.stdin.close()  # --exit-on-eof: wsgate drains and exits
    assert process.wait(timeout=15) == 0
    echo.close()
