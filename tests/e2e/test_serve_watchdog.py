"""`filterd serve` under a systemd watchdog: WATCHDOG=1 from the running event loop."""

from __future__ import annotations

import socket
import time

from .daemon import FilterdProcess


def test_daemon_pings_the_watchdog_while_serving(redis_server, tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # no WATCHDOG_PID: the variable is for whoever reads it
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "w.log").start()
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while got.count(b"WATCHDOG=1") < 5 and time.monotonic() < deadline:
            got.append(sock.recv(1024))
        assert any(x.startswith(b"READY=1") for x in got) and got.count(b"WATCHDOG=1") >= 5, got
    finally:
        assert d.stop() == 0
        sock.close()
