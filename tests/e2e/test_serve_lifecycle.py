"""`filterd serve` lifecycle: systemd notify, SIGTERM drain, reload on the model channel, startup failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from testing.daemon import FilterdProcess
from tests.e2e.test_serve_redis import add_all, results, wait_for


def test_notify_socket_gets_ready_and_stopping(redis_server, tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "n.log").start()
    assert sock.recv(1024).startswith(b"READY=1")
    assert d.stop() == 0
    assert sock.recv(1024) == b"STOPPING=1"
    sock.close()


def test_sigterm_finishes_and_acknowledges_in_flight_work(redis_server, tiny_model, tmp_path, sms_file):
    from trainer.data import read_sms

    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "t.log", batching__max_batch_size=8).start()
    add_all(r, [e.text for e in read_sms(sms_file)[:2000]])
    wait_for(lambda: r.xlen("filterd:out") >= 100, what="100 results")
    assert d.stop(signal.SIGTERM) == 0
    # everything it had read is answered and acknowledged; the rest waits in the stream, unread
    assert r.xpending("filterd:in", "filterd")["pending"] == 0
    def key(entry_id: str) -> tuple[int, int]:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)

    answered = [x["entry"] for x in results(r)]
    delivered = key(r.xinfo_groups("filterd:in")[0]["last-delivered-id"].decode())
    assert len(answered) == len(set(answered)) and all(key(e) <= delivered for e in answered)
    assert 100 <= len(answered) < 2000  # it stopped early, and answered exactly what it had read
    assert "stopped" in (tmp_path / "t.log").read_text()


def test_reload_announced_on_model_channel_only_when_the_model_changed(redis_server, tiny_model, tmp_path):
    import json
    import shutil

    versions = tmp_path / "versions"
    shutil.copytree(tiny_model.model_dir, versions / "v1")
    shutil.copytree(tiny_model.model_dir, versions / "v2")
    meta = json.loads((versions / "v2" / "filterd.json").read_text())
    meta["version"] = "announced-v2"
    (versions / "v2" / "filterd.json").write_text(json.dumps(meta))
    current = tmp_path / "current"
    current.symlink_to(versions / "v1")
    d = FilterdProcess(current, redis_server.url, tmp_path / "p.log", model__poll_interval="1h").start()
    try:
        r = redis_server.client()
        wait_for(lambda: r.pubsub_numsub("filterd:model")[0][1] >= 1, what="subscription")
        for _ in range(10):  # anyone may publish: an unchanged model is not reloaded
            r.publish("filterd:model", tiny_model.meta.version)
        tmp = tmp_path / "current.tmp"
        tmp.symlink_to(versions / "v2")
        os.replace(tmp, current)
        r.publish("filterd:model", "announced-v2")
        wait_for(lambda: d.metric('filterd_model_reloads_total{outcome="ok"}') >= 1, what="reload")
        assert 'version="announced-v2"' in d.get("/metrics")[1]
        assert d.metric('filterd_model_reloads_total{outcome="ok"}') == 1  # the ten announcements cost nothing
        assert d.metric('filterd_model_reloads_total{outcome="failed"}') == 0
    finally:
        assert d.stop() == 0


def test_startup_failures_are_one_line(tmp_path, redis_server, tiny_model):
    env = os.environ.copy()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cases = [
        (["--set", f"model.path={tiny_model.model_dir}", "--set", "redis.enabled=false", "--set", "model.device=cpu",
          "--set", f"smtp.listen=127.0.0.1:{busy_port}"], f"cannot listen on 127.0.0.1:{busy_port} for SMTP"),
        (["--set", f"model.path={tmp_path / 'missing'}", "--set", "smtp.enabled=false"], "no such model directory"),
        (["--set", "batching.max_batch_size=0", "--set", "smtp.enabled=false"], "max_batch_size"),
        (["--config", str(tmp_path / "nope.toml")], "nope.toml: cannot read"),
    ]
    for argv, expect in cases:
        r = subprocess.run([sys.executable, "-m", "filterd", "serve", *argv], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1, r.stderr
        # log lines of what did start may come first; the reason is one line, the last
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("filterd: error:") and expect in last and "Traceback" not in r.stderr, r.stderr
    busy.close()
