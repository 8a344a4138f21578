"""`filterd serve` hardened SMTP ingress as a real process, with a real Postfix where it matters
(issue 12): envelope addresses byte for byte through the shipped Postfix chain, XFORWARD reaching
re-injection, one refused recipient bounced by Postfix while the other is delivered once, and
1,100 idle connections under a 1,024 open-files limit not starving /healthz or real mail."""

from __future__ import annotations

import email
import email.policy
import re
import resource
import smtplib
import socket
import time
from pathlib import Path

import pytest

from testing.postfix import PostfixServer, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess

needs_postfix = pytest.mark.skipif(not postfix_available(), reason="needs root and /usr/sbin/postfix (make services installs it)")

MESSAGE = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: quarterly numbers\r\n"
           b"Message-ID: <hardening-1@example.org>\r\n\r\nSee the attached figures.\r\n")  # fmt: skip


def daemon(model: Path, tmp_path: Path, listen_port: int, next_hop: str, **kw) -> FilterdProcess:
    return FilterdProcess(model, "redis://127.0.0.1:1/0", tmp_path / "filterd.log", redis__enabled="false",
                          smtp__enabled="true", smtp__listen=f"127.0.0.1:{listen_port}", smtp__next_hop=next_hop, **kw)  # fmt: skip


@needs_postfix
def test_postfix_chain_keeps_envelope_bytes_and_passes_xforward(tmp_path, tiny_model):
    """Postfix -> filterd -> Postfix re-injection -> sink: `=?utf-8?...?=` addresses arrive as sent
    (they used to arrive decoded, i.e. as another mailbox), and the re-injection listener learns
    the original queue id through XFORWARD."""
    sender, rcpt = "=?utf-8?q?ceo?=@example.com", "=?utf-8?b?YWRtaW4=?=@example.org"
    filter_port, reinject_port = free_port(), free_port()
    sink = SmtpSink().start()
    d = daemon(tiny_model.model_dir, tmp_path, filter_port, f"127.0.0.1:{reinject_port}")
    pf = PostfixServer(tmp_path / "postfix", filter_port=filter_port, reinject_port=reinject_port, relay_port=sink.port)
    try:
        d.start()
        pf.start()
        qid = pf.submit(MESSAGE, sender, [rcpt, "plain@example.org"])
        got = sink.wait_for(1, timeout=30)
        pf.wait_queue(lambda q: not q, timeout=30)
        maillog = pf.maillog.read_text(errors="replace")
    finally:
        pf.stop()
        d.stop()
        sink.stop()
    r = got[0]
    assert r.raw_from == sender and sorted(r.raw_rcpts) == sorted([rcpt, "plain@example.org"])
    assert email.message_from_bytes(r.data, policy=email.policy.default)["X-Spam-Flag"] in ("YES", "NO")
    assert f"orig_queue_id={qid}" in maillog, maillog[-3000:]  # Postfix's re-injection smtpd got XFORWARD IDENT
    log = d.log.read_text()
    line = next(ln for ln in log.splitlines() if "queued_as=" in ln)
    assert f"queue_id={qid}" in line and "message_id=<hardening-1@example.org>" in line
    assert re.search(r"queued_as=[0-9A-Za-z]{6,}", line), line


@needs_postfix
def test_postfix_bounces_only_the_refused_recipient_and_delivers_the_other_once(tmp_path, tiny_model):
    """filterd's next hop refuses one of two recipients with 550: filterd answers that RCPT 550, so
    Postfix bounces just that one and the other recipient gets the message exactly once (it used to
    be 451 for both, retried for days)."""
    filter_port = free_port()
    final = SmtpSink().start()  # where Postfix delivers (the bounce goes there too)
    hop = SmtpSink().start()  # filterd's next hop
    hop.refuse_rcpts["gone@example.com"] = "550 5.1.1 <gone@example.com>: Recipient address rejected: no such user"
    d = daemon(tiny_model.model_dir, tmp_path, filter_port, hop.address)
    pf = PostfixServer(tmp_path / "postfix", filter_port=filter_port, relay_port=final.port)
    try:
        d.start()
        pf.start()
        pf.submit(MESSAGE, "sender@example.org", ["ok@example.com", "gone@example.com"])
        delivered = hop.wait_for(1, timeout=30)
        bounce = final.wait_for(1, timeout=30)
        pf.wait_queue(lambda q: not q, timeout=30)  # nothing deferred: nothing left to retry
        time.sleep(1.5)  # a retry (there must be none) would come within Postfix's 1-2 s backoff here
    finally:
        pf.stop()
        d.stop()
        final.stop()
        hop.stop()
    assert len(hop.messages) == 1 and delivered[0].rcpt_tos == ("ok@example.com",)
    assert len(final.messages) == 1 and bounce[0].raw_from == "" and bounce[0].rcpt_tos == ("sender@example.org",)
    text = bounce[0].data.decode(errors="replace")
    assert "gone@example.com" in text and "550 5.1.1" in text and "ok@example.com" not in text.split("Content-Description: Undelivered Message")[0]


@needs_postfix
def test_slow_next_hop_through_postfix_gets_exactly_one_copy(tmp_path, tiny_model):
    """The next hop stores the message and answers 4 s later, twice filterd's idle timeout. The
    idle timer (aiosmtpd's, started at DATA) used to close Postfix's connection first: Postfix
    deferred the message and delivered it again on retry."""
    filter_port = free_port()
    final = SmtpSink().start()
    hop = SmtpSink().start()
    hop.data_delay = 4.0
    d = daemon(tiny_model.model_dir, tmp_path, filter_port, hop.address, smtp__timeout="2s")
    pf = PostfixServer(tmp_path / "postfix", filter_port=filter_port, relay_port=final.port)
    try:
        d.start()
        pf.start()
        pf.submit(MESSAGE, "sender@example.org", ["ok@example.com"])
        hop.wait_for(1, timeout=30)
        pf.wait_queue(lambda q: not q, timeout=30)
        time.sleep(3)  # Postfix retries deferred mail within 1-2 s here: a second copy would be in by now
        maillog = pf.maillog.read_text(errors="replace")
    finally:
        pf.stop()
        d.stop()
        final.stop()
        hop.stop()
    assert len(hop.messages) == 1 and final.messages == []
    assert "status=sent" in maillog and "status=deferred" not in maillog


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_1100_idle_connections_leave_healthz_and_mail_working(tmp_path, tiny_model):
    """Under a 1,024 open-files limit, 1,100 idle connections from one address used to exhaust the
    descriptors: /healthz and SMTP stopped answering. Now that client gets its 200 sessions and
    421 beyond; /healthz answers and mail from another address goes through."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port = free_port()
    sink = SmtpSink().start()
    d = daemon(tiny_model.model_dir, tmp_path, port, sink.address, preexec_fn=_lower_nofile)
    idle: list[socket.socket] = []
    try:
        d.start()
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)))
        greetings = []
        for s in idle:
            s.settimeout(10)
            greetings.append(s.recv(200)[:3])
        health = d.get("/healthz")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        got = sink.wait_for(1, timeout=20)
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    finally:
        for s in idle:
            s.close()
        d.stop()
        sink.stop()
    assert health[0] == 200, health
    assert greetings.count(b"220") == 200 and greetings.count(b"421") == 900, set(greetings)
    assert got[0].rcpt_tos == ("b@example.net",)
    assert re.search(r"Max open files\s+1024\s+1024", limits)
    log = d.log.read_text()
    assert "Too many open files" not in log and "refused" in log  # 421s are logged (at most a line a second)


def test_daemon_raises_its_soft_open_files_limit(tmp_path, tiny_model):
    sink = SmtpSink().start()
    d = daemon(tiny_model.model_dir, tmp_path, free_port(), sink.address,
               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048)))  # fmt: skip
    try:
        d.start()
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    finally:
        d.stop()
        sink.stop()
    assert re.search(r"Max open files\s+2048\s+2048", limits), limits
