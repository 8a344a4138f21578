"""`filterd serve` with `[trainer] reservoir`: the texts it classified (SMTP and Redis) end up in the reservoir;
without the key nothing is kept."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys

from filterd.config import load_config
from filterd.store.reservoir import read_reservoir

from testing.services import free_port
from testing.smtp_sink import SmtpSink, send_concurrently
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_redis import wait_for

MAIL = (
    "From: Alice Sender <alice.sender@example.org>\r\nTo: bob.rcpt@example.net\r\nSubject: quarterly figures\r\n"
    "Message-ID: <{i}@example.org>\r\n\r\nHello Bob, the quarterly figures number {i} are attached below.\r\n"
)


def test_classified_texts_go_to_the_reservoir(redis_server, tiny_model, tmp_path):
    r = redis_server.client()
    path = tmp_path / "state" / "reservoir.sqlite"
    port = free_port()
    with SmtpSink() as sink:
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", smtp__enabled="true",
                           smtp__listen=f"127.0.0.1:{port}", smtp__next_hop=sink.address,
                           trainer__reservoir=str(path), trainer__reservoir_size="100").start()  # fmt: skip
        try:
            codes = asyncio.run(send_concurrently(port, [MAIL.format(i=i).encode() for i in range(5)]))
            for i in range(7):
                r.xadd("filterd:in", {"text": f"sms number {i}: call me back when you can", "id": str(i)})
            wait_for(lambda: r.xlen("filterd:out") == 7, timeout=60, what="7 Redis results")
            wait_for(lambda: d.metric("filterd_reservoir_written_total") == 12, timeout=30, what="12 texts written")
            dropped = d.metric("filterd_reservoir_dropped_total")
        finally:
            assert d.stop() == 0
    assert codes == [250] * 5 and dropped == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = list(read_reservoir(path))
    by_source = {s: sorted(k.text for k in kept if k.source == s) for s in ("smtp", "redis")}
    assert by_source["redis"] == sorted(f"sms number {i}: call me back when you can" for i in range(7))
    assert len(by_source["smtp"]) == 5
    for i in range(5):  # the text the model read: subject and body, never raw bytes, headers or addresses
        assert any(f"quarterly figures number {i} are attached" in t for t in by_source["smtp"])
    for t in by_source["smtp"]:
        assert "example.org" not in t and "example.net" not in t and "Message-ID" not in t


def test_off_by_default(redis_server, tiny_model, tmp_path):
    assert load_config(None).trainer.reservoir is None
    r = redis_server.client()
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log").start()
    try:
        r.xadd("filterd:in", {"text": "nothing is kept of this", "id": "1"})
        wait_for(lambda: r.xlen("filterd:out") == 1, timeout=60, what="the result")
        written = d.metric("filterd_reservoir_written_total")
    finally:
        assert d.stop() == 0
    assert written == 0
    assert "reservoir" not in (tmp_path / "filterd.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filterd.log", "redis"]


def test_an_unusable_reservoir_is_a_one_line_failed_start(tmp_path):
    junk = tmp_path / "labels.sqlite"
    junk.write_bytes(b"this is not an SQLite file " * 100)
    argv = [sys.executable, "-m", "filterd", "serve", "--set", f"model.path={tmp_path / 'no-model'}", "--set", "smtp.enabled=false",
            "--set", "redis.url=redis://127.0.0.1:1/0", "--set", f"metrics.listen=127.0.0.1:{free_port()}", "--set", f"trainer.reservoir={junk}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # before the model is even looked at
    assert last == f"filterd: error: [trainer] reservoir: {junk}: not a usable reservoir: file is not a database", r.stderr
    assert junk.read_bytes() == b"this is not an SQLite file " * 100
