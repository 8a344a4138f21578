"""Real services for tests: a redis-server on a loopback port, in its own directory, stopped after."""

from __future__ import annotations

import shutil
import os
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server with AOF on (fsync always), so a restart keeps streams and groups as production would."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server not found: apt-get install -y redis-server (make test does it)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.dir / 'redis.log'}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=False, socket_timeout=5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, downtime_s: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime_s)
        self.start()


def thread_cpu_s(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) per thread of one process, keyed "thread:<tid>": for where a daemon's CPU
    goes (filterd's main thread runs the event loop, one worker the model)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*") if pid else ():
        try:
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[f"thread:{task.name}"] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process and its live descendants have used so far, their reaped
    children included (Postfix's master reaps its smtpd/cleanup/smtp processes; filterd its parsers)."""
    if pid is None:
        return 0.0
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            f = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(f[1]), []).append(int(p.name))
        ticks[int(p.name)] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        total += ticks.get(q, 0)
        todo += children.get(q, [])
    return total / os.sysconf("SC_CLK_TCK")
