"""The Postfix harness and the shipped deploy/postfix snippets, with a pass-through filter in filterd's
place: mail goes through the filter hop and re-injection, waits in the queue while the filter is
down, and is delivered exactly once after it comes back."""

from __future__ import annotations

import asyncio
import smtplib
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from testing.postfix import PostfixServer, corpus_messages, message_id, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink

pytestmark = pytest.mark.skipif(not postfix_available(), reason="needs root and /usr/sbin/postfix (make services installs it)")


class PassThrough:
    """What filterd does at its simplest: relay the exact bytes to the re-injection port, and only
    then say 250; a 451 when that fails, so the message stays queued in Postfix."""

    def __init__(self, port: int, next_port: int) -> None:
        self.port, self.next_port = port, next_port
        self.controller: Controller | None = None
        self.relayed = 0

    def start(self) -> "PassThrough":
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, decode_data=False, enable_SMTPUTF8=True)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content
        options = [o for o in envelope.mail_options if o.upper().startswith(("BODY=", "SMTPUTF8"))]
        try:
            await asyncio.to_thread(self._relay, envelope.mail_from, list(envelope.rcpt_tos), data, options)
        except (OSError, smtplib.SMTPException) as e:
            return f"451 4.3.0 next hop failed: {e}"
        self.relayed += 1
        return "250 2.0.0 OK: relayed"

    def _relay(self, mail_from: str, rcpt_tos: list[str], data: bytes, options: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", self.next_port, timeout=30) as c:
            c.sendmail(mail_from, rcpt_tos, data, mail_options=options)


def body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


POSTFIX_DROPS = (b"bcc", b"content-length", b"resent-bcc", b"return-path")  # message_drop_headers


def headers(raw: bytes, drop: tuple[bytes, ...] = ()) -> bytes:
    """The header block, without the named fields (each with its continuation lines)."""
    fields: list[bytes] = []
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return b"\r\n".join(f for f in fields if f.split(b":", 1)[0].strip().lower() not in drop)


@pytest.fixture
def sink():
    s = SmtpSink().start()
    yield s
    s.stop()


def test_postfix_filters_queues_while_filter_down_and_delivers_once(tmp_path, sink, spamassassin_dir):
    messages = corpus_messages(spamassassin_dir, 8)
    filter_port, reinject_port = free_port(), free_port()
    flt = PassThrough(filter_port, reinject_port).start()
    pf = PostfixServer(tmp_path / "postfix", filter_port=filter_port, reinject_port=reinject_port, relay_port=sink.port)
    try:
        pf.start()
        rcpts = lambda i: (f"user{i}@example.com", f"list{i}@example.net")  # noqa: E731
        for i, raw in enumerate(messages[:5]):
            pf.submit(raw, f"sender{i}@example.org", rcpts(i))
        got = sink.wait_for(5, timeout=15)
        deadline = time.monotonic() + 5  # the filter counts a relay after the sink has stored it
        while flt.relayed < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flt.relayed == 5  # every message went through the filter hop, none around it
        by_id = {message_id(r.data): r for r in got}
        for i, raw in enumerate(messages[:5]):
            r = by_id[message_id(raw)]
            assert (r.mail_from, r.rcpt_tos) == (f"sender{i}@example.org", rcpts(i))
            assert body(r.data) == body(raw)  # the body, byte for byte
            # Postfix's Received: headers, one per pass (submission, re-injection), above the original ones
            assert r.data.count(b"by mx.filterd.test (Postfix)") == 2
            assert headers(r.data).endswith(headers(raw, drop=POSTFIX_DROPS))

        flt.stop()  # filter down: Postfix keeps the mail queued and retries
        for i, raw in enumerate(messages[5:], start=5):
            pf.submit(raw, f"sender{i}@example.org", rcpts(i))
        refused = f"127.0.0.1[127.0.0.1]:{filter_port}: Connection refused"
        pf.wait_queue(
            lambda q: (
                len(q) == 3
                # still queued: a message tried once can sit in "incoming" for a moment before "deferred"
                and all(m["queue_name"] in ("incoming", "deferred", "active") for m in q)
                and any(refused in r.get("delay_reason", "") for m in q for r in m["recipients"])
            ),
            timeout=10,
        )
        assert len(sink.messages) == 5 and flt.relayed == 5

        flt.start()
        pf.flush()
        sink.wait_for(8, timeout=15)
        pf.wait_queue(lambda q: not q, timeout=10)  # nothing left to deliver, so nothing more can arrive
        ids = [message_id(r.data) for r in sink.messages]
        assert len(ids) == 8 and set(ids) == {message_id(m) for m in messages}, ids
        assert flt.relayed == 8
    finally:
        pf.stop()
        flt.stop()
    assert pf.master_pid() is None
