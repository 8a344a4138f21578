"""Real Postfix with filterd as its content filter, configured with the shipped deploy/postfix files:
mail arrives tagged; while filterd is down it waits in Postfix's queue; after filterd is back and the
queue is flushed every message arrives exactly once."""

from __future__ import annotations

import email
import email.policy
from collections import Counter

import pytest

from testing.postfix import PostfixServer, corpus_messages, message_id, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess

pytestmark = pytest.mark.skipif(not postfix_available(), reason="needs root and /usr/sbin/postfix (make services installs it)")


def tagged(data: bytes) -> bool:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return (
        len(msg.get_all("X-Spam-Flag") or []) == 1
        and msg["X-Spam-Flag"] in ("YES", "NO")
        and msg["X-Spam-Status"].startswith(("Yes, score=", "No, score="))
    )


def test_postfix_to_filterd_to_postfix_none_lost_none_duplicated(tmp_path, tiny_model, spamassassin_dir):
    messages = corpus_messages(spamassassin_dir, 100)  # 50 ham and 50 spam, alternately
    filter_port, reinject_port = free_port(), free_port()
    sink = SmtpSink().start()
    d = FilterdProcess(tiny_model.model_dir, "redis://127.0.0.1:1/0", tmp_path / "filterd.log", redis__enabled="false",
                       smtp__enabled="true", smtp__listen=f"127.0.0.1:{filter_port}",
                       smtp__next_hop=f"127.0.0.1:{reinject_port}")  # fmt: skip
    pf = PostfixServer(tmp_path / "postfix", filter_port=filter_port, reinject_port=reinject_port, relay_port=sink.port)
    try:
        d.start()
        pf.start()
        for i, raw in enumerate(messages):
            pf.submit(raw, f"sender{i}@example.org", [f"now{i}@example.com"])
        got = sink.wait_for(100, timeout=60)
        assert all(tagged(r.data) for r in got)
        assert sorted(r.rcpt_tos[0] for r in got) == sorted(f"now{i}@example.com" for i in range(100))
        assert d.metric("filterd_messages_total") == 100

        assert d.stop() == 0  # filterd down: Postfix keeps the mail
        for i, raw in enumerate(messages):
            pf.submit(raw, f"sender{i}@example.org", [f"later{i}@example.com"])
        pf.wait_queue(lambda q: len(q) == 100 and all(m["queue_name"] in ("deferred", "active") for m in q), timeout=30)
        assert len(sink.messages) == 100

        d.start()
        pf.flush()
        sink.wait_for(200, timeout=90)
        pf.wait_queue(lambda q: not q, timeout=30)  # nothing left in Postfix, so nothing more can arrive
    finally:
        pf.stop()
        d.stop()
        sink.stop()
    later = [r for r in sink.messages if r.rcpt_tos[0].startswith("later")]
    assert len(sink.messages) == 200 and len(later) == 100
    assert Counter(r.rcpt_tos[0] for r in later) == Counter(f"later{i}@example.com" for i in range(100))  # none twice
    assert {message_id(r.data) for r in later} == {message_id(m) for m in messages}
    assert all(tagged(r.data) for r in later)
