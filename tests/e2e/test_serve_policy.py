"""[policy] through the real daemon, one test per door: SMTP (into an SMTP sink) and Redis."""

from __future__ import annotations

import email
import email.policy
import smtplib

from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_redis import results, wait_for
from tests.e2e.test_serve_smtp import corpus_files, smtp_daemon


def test_smtp_allow_listed_spam_is_delivered_untagged_deny_listed_is_discarded(tiny_model, spamassassin_dir, tmp_path):
    spam = corpus_files(spamassassin_dir, 1, 0)[0].read_bytes()
    with SmtpSink() as sink:
        # Every scored message is spam at 0 and gets the Subject mark: only a list can save one.
        d = smtp_daemon(tiny_model.model_dir, sink, tmp_path, policy__tag_score="0", policy__subject_score="0",
                        policy__allow_senders='["Friends.Example"]', policy__deny_recipients='["trap@example.net"]',
                        policy__smtp__discard_score="1.0").start()  # fmt: skip
        try:
            with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=60) as s:
                assert s.sendmail("news@lists.friends.example", ["user1@example.net"], spam) == {}
                assert s.sendmail("someone@else.example", ["user2@example.net"], spam) == {}
                assert s.sendmail("someone@else.example", ["trap@example.net"], spam) == {}  # 250: discarded
            got = {r.rcpt_tos[0]: r for r in sink.wait_for(2)}
            actions = {
                a: d.metric(f'filterd_actions_total{{action="{a}",source="smtp"}}') for a in ("pass", "subject", "discard")
            }
        finally:
            assert d.stop() == 0
    assert set(got) == {"user1@example.net", "user2@example.net"}  # nothing reached the trap
    original = email.message_from_bytes(spam, policy=email.policy.default)
    allowed = email.message_from_bytes(got["user1@example.net"].data, policy=email.policy.default)
    assert allowed["X-Spam-Flag"] == "NO" and allowed["X-Spam-Status"] == "No, listed=allow_senders"
    assert allowed["X-Spam-Score"] is None  # not scored at all
    assert allowed["Subject"] == original["Subject"]
    relayed = got["user1@example.net"].data.replace(b"\r\n", b"\n")  # smtplib sends CRLF
    assert relayed.startswith(b"X-Spam-Flag: NO\nX-Spam-Status: No, listed=allow_senders\n" + spam.rstrip(b"\n"))
    scored = email.message_from_bytes(got["user2@example.net"].data, policy=email.policy.default)
    assert scored["X-Spam-Flag"] == "YES" and scored["Subject"].startswith("[SPAM] ")
    assert actions == {"pass": 1, "subject": 1, "discard": 1}
    log = (tmp_path / "filterd.log").read_text()
    assert "verdict=ham listed=allow_senders action=pass" in log and "verdict=spam listed=deny_recipients action=discard" in log


def test_redis_door_override_changes_the_results_action(redis_server, tiny_model, tmp_path):
    r = redis_server.client()
    n = 20
    # [policy] says: everything is spam with a Subject mark; [policy.redis] discards it instead.
    d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", policy__tag_score="0",
                       policy__subject_score="0", policy__redis__discard_score="0").start()  # fmt: skip
    try:
        for i in range(n):
            r.xadd("filterd:in", {"text": f"message number {i}", "id": str(i)})
        wait_for(lambda: r.xlen("filterd:out") >= n, timeout=60, what=f"{n} results")
        count = lambda: d.metric('filterd_actions_total{action="discard",source="redis"}')
        wait_for(lambda: count() >= n, timeout=10, what="counted")  # counted right after the results are written
        discarded = count()
        subject = d.metric('filterd_actions_total{action="subject",source="redis"}')
    finally:
        assert d.stop() == 0
    out = results(r)
    assert len(out) == n
    assert {(x["verdict"], x["action"]) for x in out} == {("spam", "discard")}
    assert all(0.0 <= float(x["score"]) <= 1.0 and x["model"] for x in out)
    assert (discarded, subject) == (n, 0)
