"""`filterd serve` under a systemd watchdog: WATCHDOG=1 from the running event loop."""

from __future__ import annotations

import socket
import time

from testing.daemon import FilterdProcess


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


def test_trainer_serve_pings_the_watchdog(redis_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.e2e.test_trainer import write_config

    config = write_config(tmp_path, redis_server.url, min_per_class=100000)  # refits skip: only the loop matters
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    env = os.environ | {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
    with open(tmp_path / "trainer.log", "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        got = [sock.recv(1024) for _ in range(3)]
        assert got == [b"WATCHDOG=1"] * 3, got
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, (tmp_path / "trainer.log").read_text()
        sock.close()
