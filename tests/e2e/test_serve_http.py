"""The HTTP scan door through the real daemon (`filterd serve`, [http] enabled) and the tiny model:
Rspamd's /checkv2, Exim's RSPAMC exchange and /classify answered with the [policy] decision, the
per-door metrics, /healthz, 100 concurrent requests batched, and an off-loopback listen without
a password refused at start. Levels are forced with [policy] scores of 0, as in test_serve_milter."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys

import pytest

from testing.services import free_port
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_milter import without_mbox_line
from tests.e2e.test_serve_smtp import corpus_files


def http_daemon(model, tmp_path, port: int, name: str, **kw: object) -> FilterdProcess:
    return FilterdProcess(model, "redis://127.0.0.1:1/0", tmp_path / f"filterd-{name}.log", redis__enabled="false",
                          http__enabled="true", http__listen=f"127.0.0.1:{port}", **kw)  # fmt: skip


async def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    writer.write(head.encode() + body)
    data = await reader.read()
    writer.close()
    top, _, payload = data.partition(b"\r\n\r\n")
    return int(top.split()[1]), payload


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = await reader.read()
    writer.close()
    return out


def test_checkv2_exim_and_classify_through_serve(tiny_model, spamassassin_dir, tmp_path):
    port = free_port()
    spam = without_mbox_line(corpus_files(spamassassin_dir, 1, 0)[0].read_bytes())
    d = http_daemon(tiny_model.model_dir, tmp_path, port, "levels", policy__reject_score="0",
                    policy__allow_senders='["friend@example.org"]').start()  # fmt: skip
    try:
        status, body = asyncio.run(post(port, "/checkv2", spam, {"From": "<x@example.net>", "Rcpt": "<b@example.com>",
                                                                 "IP": "192.0.2.1", "Queue-Id": "Q1"}))  # fmt: skip
        r = json.loads(body)
        assert status == 200 and r["action"] == "reject" and r["filterd"]["action"] == "reject"
        assert r["symbols"]["FILTERD_GPT2"]["score"] == r["score"] and r["required_score"] == 15.0
        assert 0.0 <= r["filterd"]["p_spam"] <= 1.0 and r["filterd"]["model"]
        # Exim's variant=rspamd: the legacy line protocol; same message, same score
        legacy = asyncio.run(raw(port, b"CHECK RSPAMC/1.3\r\nContent-length: %d\r\nQueue-Id: Q2\r\nFrom: <x@example.net>\r\n"
                                       b"Recipient-Number: 1\r\nRcpt: <b@example.com>\r\n\r\n%s" % (len(spam), spam)))  # fmt: skip
        got = re.match(rb"RSPAMD/1.3 0 EX_OK\r\nMetric: default; \S+ ([0-9.]+) / 15.00 / [0-9.]+\r\nAction: reject\r\n", legacy)
        assert got, legacy
        assert float(got.group(1)) == round(r["score"], 2)
        status, body = asyncio.run(post(port, "/classify", json.dumps({"text": "hi", "sender": "friend@example.org"}).encode()))
        assert status == 200 and json.loads(body)["action"] == "pass" and json.loads(body)["listed"] == "allow_senders"
        status, body = asyncio.run(post(port, "/classify", b"{oops"))
        assert status == 400 and "error" in json.loads(body)
        assert d.metric('filterd_messages_total{source="http",verdict="spam"}') == 2
        assert d.metric('filterd_messages_total{source="http",verdict="ham"}') == 1
        assert d.metric('filterd_actions_total{action="reject",source="http"}') == 2
        assert d.metric('filterd_ingress_up{ingress="http"}') == 1
        assert d.get("/healthz")[0] == 200
    finally:
        assert d.stop() == 0


def test_100_concurrent_requests_are_batched(tiny_model, spamassassin_dir, tmp_path):
    port = free_port()
    files = corpus_files(spamassassin_dir, 50, 50)
    d = http_daemon(tiny_model.model_dir, tmp_path, port, "many", batching__max_wait_ms="50").start()

    async def all_at_once() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(post(port, "/checkv2", without_mbox_line(p.read_bytes())) for p in files))

    try:
        replies = asyncio.run(all_at_once())
        batches, messages = d.metric("filterd_batch_size_count"), d.metric("filterd_batch_size_sum")
    finally:
        assert d.stop() == 0
    assert [s for s, _ in replies] == [200] * 100
    assert all(json.loads(b)["action"] in ("no action", "add header") for _, b in replies)
    assert messages >= 100 and messages / batches > 1, (batches, messages)


def test_off_loopback_without_password_fails_to_start_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "filterd", "serve", "--set", "http.enabled=true", "--set",
                           f"http.listen=0.0.0.0:{free_port()}", "--set", "smtp.enabled=false", "--set", "redis.enabled=false",
                           "--set", f"model.path={tmp_path}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[http] password: required" in lines[0], proc.stderr


def test_rspamc_compressed_scores_as_the_plain_message(tiny_model, spamassassin_dir, tmp_path):
    """Rspamd's own client: `rspamc --compressed` sends the message zstd-compressed (`Compression: zstd`); the
    score is that of the same file sent as it is."""
    if shutil.which("rspamc") is None:
        pytest.skip("rspamc not installed (Debian package rspamd: make services)")
    port = free_port()
    files = [tmp_path / "spam.eml", tmp_path / "ham.eml"]
    for path, src in zip(files, corpus_files(spamassassin_dir, 1, 1)):
        path.write_bytes(without_mbox_line(src.read_bytes()))
    d = http_daemon(tiny_model.model_dir, tmp_path, port, "rspamc").start()
    try:
        for path in files:
            got = {}
            for flags in ([], ["--compressed"]):
                out = subprocess.run(["rspamc", "-j", *flags, "-h", f"127.0.0.1:{port}", "-t", "30", "symbols", str(path)],
                                     capture_output=True, text=True, timeout=60)  # fmt: skip
                assert out.returncode == 0, out.stderr
                r = json.loads(out.stdout)
                assert "error" not in r, r
                got[bool(flags)] = (r["score"], r["action"], r["filterd"]["p_spam"], r.get("message-id"))
            assert got[True] == got[False], got
        assert d.metric('filterd_messages_total{source="http",verdict="error"}') == 0
        assert d.metric("filterd_messages_total") == 4  # each file scanned twice, each scan a verdict
    finally:
        assert d.stop() == 0
