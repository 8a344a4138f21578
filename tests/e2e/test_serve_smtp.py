"""`filterd serve` with the SMTP ingress as a real process: concurrency and batching, next hop outages,
and the same score as `filterd classify --email` for the same message."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing.services import free_port
from testing.smtp_sink import SmtpSink, send_concurrently
from testing.daemon import FilterdProcess


def corpus_files(root: Path, n_spam: int, n_ham: int) -> list[Path]:
    pick = lambda d, n: sorted(p for p in (root / d).iterdir() if p.is_file() and p.name != "cmds")[:n]
    return pick("spam", n_spam) + pick("easy_ham", n_ham)


def send_all(port: int, raws: list[bytes]) -> list[int]:
    """Every message in its own SMTP session, all at once; the final reply code of each."""
    return asyncio.run(send_concurrently(port, raws))


@pytest.fixture
def sink():
    with SmtpSink() as s:
        yield s


def smtp_daemon(model: Path, sink: SmtpSink, tmp_path: Path, **kw) -> FilterdProcess:
    port = free_port()
    d = FilterdProcess(model, "redis://127.0.0.1:1/0", tmp_path / "filterd.log", redis__enabled="false",
                       smtp__enabled="true", smtp__listen=f"127.0.0.1:{port}", smtp__next_hop=sink.address, **kw)  # fmt: skip
    d.smtp_port = port
    return d


def test_200_concurrent_sessions_relayed_tagged_and_batched(tiny_model, spamassassin_dir, sink, tmp_path):
    files = corpus_files(spamassassin_dir, 100, 100)
    raws = [p.read_bytes() for p in files]
    d = smtp_daemon(tiny_model.model_dir, sink, tmp_path).start()
    try:
        codes = send_all(d.smtp_port, raws)
        mean_batch = d.metric("filterd_batch_size_sum") / d.metric("filterd_batch_size_count")
        replies_250 = d.metric('filterd_smtp_replies_total{code="250"}')
        smtp_msgs = d.metric("filterd_messages_total")
    finally:
        assert d.stop() == 0
    assert codes == [250] * 200
    got = sink.wait_for(200)
    assert len(got) == 200 and len({r.rcpt_tos for r in got}) == 200  # each session's own message, once
    scores = {}
    for r in got:
        msg = email.message_from_bytes(r.data, policy=email.policy.default)
        assert msg["X-Spam-Flag"] in ("YES", "NO") and len(msg.get_all("X-Spam-Flag")) == 1
        scores[r.rcpt_tos[0]] = float(msg["X-Spam-Score"])
    assert mean_batch > 1, mean_batch
    assert replies_250 == 200 and smtp_msgs == 200

    # the same score as `filterd classify --email` on the same files (headers carry 4 decimals)
    cli = subprocess.run([sys.executable, "-m", "filterd", "classify", "--model", str(tiny_model.model_dir), "--email",
                          *map(str, files[:40])], capture_output=True, text=True, check=True)  # fmt: skip
    for i, line in enumerate(cli.stdout.splitlines()):
        assert abs(json.loads(line)["score"] - scores[f"user{i}@example.net"]) <= 5e-5 + 1e-5


def test_next_hop_down_451_for_every_message_then_delivered(tiny_model, spamassassin_dir, sink, tmp_path):
    raws = [p.read_bytes() for p in corpus_files(spamassassin_dir, 10, 10)]
    d = smtp_daemon(tiny_model.model_dir, sink, tmp_path).start()
    try:
        sink.stop()
        assert send_all(d.smtp_port, raws) == [451] * 20
        sink.start()
        assert send_all(d.smtp_port, raws) == [250] * 20
        assert d.metric('filterd_smtp_replies_total{code="451"}') == 20
    finally:
        assert d.stop() == 0
    assert len(sink.wait_for(20)) == 20
