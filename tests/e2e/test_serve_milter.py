"""The milter door through the real daemon (`filterd serve`, [milter] enabled) and a real Postfix
loading the shipped snippet: refused at end of DATA, tagged without forged headers, held, and many
sessions batched together. The levels are forced with [policy] (a score of 0 reaches them), so the
tests show what each decision does at the door, whatever the tiny test model thinks of the mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path
from types import SimpleNamespace

import pytest

from filterd.config import HostPort
from filterd.doors.milter import protocol as m

from testing.milter_mta import Mta, split_message
from testing.postfix import PostfixServer, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from tests.test_milter import FORGED_MAIL, by_message_id, smtp_send, wait_log
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_smtp import corpus_files

def without_mbox_line(raw: bytes) -> bytes:
    return raw.split(b"\n", 1)[1] if raw.startswith(b"From ") else raw


needs_postfix = pytest.mark.skipif(not postfix_available(), reason="needs postfix installed and root")


def milter_daemon(model: Path, tmp_path: Path, port: int, name: str, **kw: object) -> FilterdProcess:
    return FilterdProcess(model, "redis://127.0.0.1:1/0", tmp_path / f"filterd-{name}.log", redis__enabled="false",
                          milter__enabled="true", milter__listen=f"127.0.0.1:{port}", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def postfix_milter(tmp_path_factory):
    """A real Postfix whose smtpd_milters (the shipped snippet) point at a port filterd will listen on."""
    if not postfix_available():
        pytest.skip("needs postfix installed and root")
    port = free_port()
    with SmtpSink() as sink:
        postfix = PostfixServer(tmp_path_factory.mktemp("pf") / "postfix", relay_port=sink.port, content_filter=False, milter_port=port)
        with postfix:
            yield postfix, sink, port


@needs_postfix
def test_spam_refused_at_end_of_data_ham_tagged_without_forged_headers(postfix_milter, tiny_model, spamassassin_dir, tmp_path):
    postfix, sink, port = postfix_milter
    spam, ham = (without_mbox_line(p.read_bytes()) for p in corpus_files(spamassassin_dir, 1, 1))
    # reject_score 0: everything the model scores is refused; the allow-listed sender's mail is not scored.
    d = milter_daemon(tiny_model.model_dir, tmp_path, port, "reject", policy__reject_score="0").start()
    try:
        code, reply = smtp_send(postfix.smtpd_port, spam)
        assert code == 550 and reply.startswith(b"5.7.1 Message rejected as spam"), (code, reply)
        wait_log(postfix, "milter-reject: END-OF-MESSAGE")
        assert postfix.queue() == []  # nothing queued, so nothing can bounce
        assert d.metric('filterd_actions_total{action="reject",source="milter"}') == 1
        assert d.metric('filterd_messages_total{source="milter",verdict="spam"}') == 1
    finally:
        assert d.stop() == 0
    # tag at 0, subject at 0: scored, tagged, Subject marked; forged X-Spam-*/X-Filterd-* (any casing, folded) gone.
    d = milter_daemon(tiny_model.model_dir, tmp_path, port, "tag", policy__tag_score="0", policy__subject_score="0").start()
    try:
        code, reply = smtp_send(postfix.smtpd_port, FORGED_MAIL.format(mid="e2e-tag", marker="hello").encode())
        assert code == 250, (code, reply)
        code, _ = smtp_send(postfix.smtpd_port, ham)
        assert code == 250
        raw = by_message_id(sink, "e2e-tag").data
        got = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert got.get_all("X-Spam-Flag") == ["YES"]  # ours only
        (status,) = got.get_all("X-Spam-Status")
        assert status.startswith("Yes, score=") and "threshold=0.0000" in status and "forged" not in status
        assert float(got["X-Spam-Score"]) >= 0
        assert got.get_all("X-Filterd-Original-Recipients") is None
        assert got["Subject"] == "[SPAM] hello"
        assert got.get_payload() == "Hello Bob, hello\r\nsecond line\r\n"
        ham_id = email.message_from_bytes(ham, policy=email.policy.compat32)["Message-ID"].encode()
        delivered_ham = next(r.data for r in sink.wait_for(2) if ham_id in r.data)
        _, body = split_message(delivered_ham)
        unix = lambda b: b.replace(b"\r\n", b"\n").rstrip(b"\n")  # smtplib sends CRLF and ends the data with one
        assert unix(body) == unix(split_message(ham)[1])  # the body passes unchanged
        assert d.metric('filterd_actions_total{action="subject",source="milter"}') == 2
    finally:
        assert d.stop() == 0
    # quarantine at 0: Postfix's hold queue.
    d = milter_daemon(tiny_model.model_dir, tmp_path, port, "hold", policy__quarantine_score="0").start()
    try:
        code, reply = smtp_send(postfix.smtpd_port, spam)
        assert code == 250, (code, reply)
        qid = reply.decode().rsplit(" ", 1)[-1]
        queue = postfix.wait_queue(lambda q: any(e["queue_id"] == qid for e in q))
        assert [e["queue_name"] for e in queue if e["queue_id"] == qid] == ["hold"]
        postfix._cmd("postsuper", "-d", qid, "hold")
    finally:
        assert d.stop() == 0


def test_200_concurrent_milter_sessions_are_batched(tiny_model, spamassassin_dir, tmp_path):
    """200 MTA connections at once through the daemon's milter: each gets its own reply, the model
    saw them in batches (the batch-size metric's mean is over 1)."""
    port = free_port()
    files = corpus_files(spamassassin_dir, 100, 100)
    d = milter_daemon(tiny_model.model_dir, tmp_path, port, "many", batching__max_wait_ms="50").start()
    server = SimpleNamespace(cfg=SimpleNamespace(listen=HostPort("127.0.0.1", port)))

    async def one(i: int, raw: bytes) -> list[tuple[bytes, bytes]]:
        mta = await Mta.open(server)  # type: ignore[arg-type]
        try:
            await mta.optneg()
            await mta.envelope(queue_id=f"Q{i:04d}")
            headers, body = split_message(raw)
            return await mta.message(headers, body)
        finally:
            await mta.close()

    async def all_at_once() -> list[list[tuple[bytes, bytes]]]:
        return await asyncio.gather(*(one(i, without_mbox_line(p.read_bytes())) for i, p in enumerate(files)))

    try:
        replies = asyncio.run(all_at_once())
        batches, messages = d.metric("filterd_batch_size_count"), d.metric("filterd_batch_size_sum")
        tagged = [any(c == m.SMFIR_ADDHEADER and data.startswith(b"X-Spam-Status\0") for c, data in r) for r in replies]
        verdicts = [r[-1][0] for r in replies]
    finally:
        assert d.stop() == 0
    assert len(replies) == 200 and all(tagged)
    assert set(verdicts) == {m.SMFIR_ACCEPT}
    assert messages >= 200 and messages / batches > 1, (batches, messages)
