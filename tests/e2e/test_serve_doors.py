"""One daemon, four doors: the same message gets the same score and the same [policy] decision
through the SMTP content filter, the milter, the HTTP API and Redis.

Redis carries text, not mail (an SMS gateway's door): it gets the text the other doors extract
from the message (`filterd.mail.text.extract_text`), which is what they score. Levels: tag at the
model's threshold and subject at 0 (so every spam verdict is a "subject", every ham a "pass"): two
levels all four doors can carry out."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
from types import SimpleNamespace

from filterd.config import HostPort
from filterd.doors.milter import protocol as m
from filterd.mail.text import extract_text

from testing.milter_mta import Mta, split_message
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_http import post
from tests.e2e.test_serve_milter import without_mbox_line
from tests.e2e.test_serve_redis import complete, results, wait_for
from tests.e2e.test_serve_smtp import corpus_files


async def through_milter(port: int, raw: bytes, i: int) -> tuple[float, str]:
    mta = await Mta.open(SimpleNamespace(cfg=SimpleNamespace(listen=HostPort("127.0.0.1", port))))  # type: ignore[arg-type]
    try:
        await mta.optneg()
        await mta.envelope(queue_id=f"Q{i}")
        headers, body = split_message(raw)
        replies = await mta.message(headers, body)
    finally:
        await mta.close()
    added = dict(data.rstrip(b"\0").split(b"\0", 1) for c, data in replies if c == m.SMFIR_ADDHEADER)
    subject_changed = any(c == m.SMFIR_CHGHEADER and data[4:].startswith(b"Subject\0") for c, data in replies)
    assert replies[-1][0] == m.SMFIR_ACCEPT
    return float(added[b"X-Spam-Score"]), "subject" if subject_changed else "pass"


def test_same_score_and_decision_through_smtp_milter_http_and_redis(redis_server, tiny_model, spamassassin_dir, tmp_path):
    raws = [without_mbox_line(p.read_bytes()) for p in corpus_files(spamassassin_dir, 3, 3)]
    smtp_port, milter_port, http_port = free_port(), free_port(), free_port()
    r = redis_server.client()
    with SmtpSink() as sink:
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", smtp__enabled="true",
                           smtp__listen=f"127.0.0.1:{smtp_port}", smtp__next_hop=sink.address, milter__enabled="true",
                           milter__listen=f"127.0.0.1:{milter_port}", http__enabled="true",
                           http__listen=f"127.0.0.1:{http_port}", policy__subject_score="0").start()  # fmt: skip
        try:
            doors: dict[str, list[tuple[float, str]]] = {"smtp": [], "milter": [], "http": [], "redis": []}
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as c:
                for i, raw in enumerate(raws):
                    c.sendmail("alice@example.org", [f"user{i}@example.net"], raw)
            delivered = {x.rcpt_tos[0]: x.data for x in sink.wait_for(len(raws), timeout=60)}
            for i in range(len(raws)):
                msg = email.message_from_bytes(delivered[f"user{i}@example.net"], policy=email.policy.compat32)
                doors["smtp"].append((float(msg["X-Spam-Score"]), "subject" if msg["Subject"].startswith("[SPAM] ") else "pass"))
            for i, raw in enumerate(raws):
                doors["milter"].append(asyncio.run(through_milter(milter_port, raw, i)))
                status, body = asyncio.run(post(http_port, "/checkv2", raw, {"From": "<alice@example.org>", "Rcpt": f"<user{i}@example.net>"}))
                assert status == 200, body
                reply = json.loads(body)
                doors["http"].append((reply["filterd"]["p_spam"], reply["filterd"]["action"]))
                r.xadd("filterd:in", {"text": extract_text(raw), "id": str(i)})
            wait_for(complete(r, len(raws)), timeout=60, what="Redis results")
            by_id = {x["id"]: x for x in results(r)}
            doors["redis"] = [(float(by_id[str(i)]["score"]), by_id[str(i)]["action"]) for i in range(len(raws))]
        finally:
            assert d.stop() == 0
    reference = doors["http"]  # full precision; the headers carry 4 decimals
    for door, got in doors.items():
        for (score, action), (ref_score, ref_action) in zip(got, reference):
            assert abs(score - ref_score) <= 5e-5, (door, got, reference)
            assert action == ref_action, (door, got, reference)
    assert {a for _, a in reference} <= {"subject", "pass"}


def test_spamassassin_headers_through_smtp_and_milter_agree_with_the_http_scale(redis_server, tiny_model, spamassassin_dir, tmp_path):
    """[headers] style = "spamassassin" and keep_upstream reach both doors that write headers, and
    their X-Spam-Score is the HTTP door's score on the same scale (required 5 on both)."""
    upstream = b"X-Spam-Status: Yes, score=12.1 required=5.0\r\n\ttests=UPSTREAM_TEST\r\n"
    raws = [upstream + without_mbox_line(p.read_bytes()).replace(b"\n", b"\r\n") for p in corpus_files(spamassassin_dir, 3, 3)]
    smtp_port, milter_port, http_port = free_port(), free_port(), free_port()
    with SmtpSink() as sink:
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", redis__enabled="false",
                           smtp__enabled="true", smtp__listen=f"127.0.0.1:{smtp_port}", smtp__next_hop=sink.address,
                           milter__enabled="true", milter__listen=f"127.0.0.1:{milter_port}", http__enabled="true",
                           http__listen=f"127.0.0.1:{http_port}", http__required_score="5", headers__style="spamassassin",
                           headers__keep_upstream="true").start()  # fmt: skip
        try:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as c:
                for i, raw in enumerate(raws):
                    c.sendmail("alice@example.org", [f"user{i}@example.net"], raw)
            delivered = {x.rcpt_tos[0]: x.data for x in sink.wait_for(len(raws), timeout=60)}
            for i, raw in enumerate(raws):
                status, body = asyncio.run(post(http_port, "/checkv2", raw, {"Rcpt": f"<user{i}@example.net>"}))
                assert status == 200, body
                reply = json.loads(body)
                spam = reply["filterd"]["verdict"] == "spam"
                msg = email.message_from_bytes(delivered[f"user{i}@example.net"], policy=email.policy.default)
                smtp_score = float(msg["X-Spam-Score"])
                assert abs(smtp_score - reply["score"]) <= 0.1 + 1e-6 and (smtp_score >= 5) is spam, (smtp_score, reply)
                assert msg.get_all("X-Spam-Flag") == (["YES"] if spam else None)
                assert msg["X-Spam-Level"] == "*" * int(smtp_score)
                assert str(msg["X-Spam-Status"]).startswith(f"{'Yes' if spam else 'No'}, score={msg['X-Spam-Score']} required=5.0")
                assert msg["X-Upstream-Spam-Status"] == "Yes, score=12.1 required=5.0\ttests=UPSTREAM_TEST"
                mta = asyncio.run(_milter_replies(milter_port, raw, i))
                added = [tuple(data.rstrip(b"\0").split(b"\0", 1)) for c, data in mta if c == m.SMFIR_ADDHEADER]
                assert (b"X-Upstream-Spam-Status", b" Yes, score=12.1 required=5.0\ttests=UPSTREAM_TEST") in added
                assert (b"X-Spam-Score", b" " + msg["X-Spam-Score"].encode()) in added  # the same score as the SMTP door
        finally:
            assert d.stop() == 0


async def _milter_replies(port: int, raw: bytes, i: int) -> list[tuple[bytes, bytes]]:
    mta = await Mta.open(SimpleNamespace(cfg=SimpleNamespace(listen=HostPort("127.0.0.1", port))))  # type: ignore[arg-type]
    try:
        await mta.optneg()
        await mta.envelope(queue_id=f"S{i}")
        headers, body = split_message(raw)
        return await mta.message(headers, body)
    finally:
        await mta.close()
