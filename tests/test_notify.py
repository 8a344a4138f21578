"""sd_notify and the systemd watchdog pings, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from filterd.net.notify import sd_notify, watchdog, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1024))
        except (BlockingIOError, socket.timeout):
            return out


def _run_for(seconds: float) -> None:
    async def main() -> None:
        task = asyncio.create_task(watchdog())
        await asyncio.sleep(seconds)
        assert not task.done() or task.result() is None
        task.cancel()

    asyncio.run(main())


def test_watchdog_pings_every_half_interval(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == pytest.approx(0.1)
    _run_for(0.55)
    got = _received(notify_socket)
    assert set(got) == {b"WATCHDOG=1"} and 3 <= len(got) <= 8, got  # one at once, then about every 0.1 s


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, {"WATCHDOG_USEC": "0"}])
def test_no_pings_without_a_watchdog_for_this_process(notify_socket, monkeypatch, env):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert watchdog_interval() is None
    _run_for(0.2)
    assert _received(notify_socket) == []


def test_sd_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
