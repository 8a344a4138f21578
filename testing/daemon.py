"""Run `filterd serve` as a real process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from testing.services import free_port


class FilterdProcess:
    def __init__(self, model: Path, redis_url: str, log: Path, *, preexec_fn=None, **overrides: object) -> None:
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. to lower RLIMIT_NOFILE)
        self.metrics_port = free_port()
        self.sets = {
            "model.path": str(model), "model.device": "cpu", "redis.url": redis_url, "smtp.enabled": "false",
            "metrics.listen": f"127.0.0.1:{self.metrics_port}", "redis.block_ms": "200", "model.poll_interval": "200ms",
        } | {k.replace("__", "."): str(v) for k, v in overrides.items()}  # fmt: skip
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "FilterdProcess":
        argv = [sys.executable, "-m", "filterd", "serve"]
        for k, v in self.sets.items():
            argv += ["--set", f"{k}={v}"]
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                     preexec_fn=self.preexec_fn)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"filterd exited: {self.log.read_text()[-2000:]}"
            try:
                if self.get("/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"filterd not healthy: {self.log.read_text()[-2000:]}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        """Sum of every series of one metric name (filterd_batch_size_sum), or one series (name{label="v"})."""
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc
