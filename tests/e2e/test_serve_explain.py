"""[explain] in a running daemon: the same explanation through the SMTP content filter (X-Spam-Report), the
milter (an added X-Spam-Report), the HTTP API (/checkv2 `filterd_explanation`, /classify `explanation`) and
Redis (an `explanation` field in the result), counted in filterd_explanations_total."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import smtplib

from filterd.model.engine import Engine
from filterd.model.explain import explain
from filterd.doors.milter import protocol as m
from filterd.mail.text import extract_text

from testing.milter_mta import split_message
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from testing.daemon import FilterdProcess
from tests.e2e.test_serve_http import post
from tests.e2e.test_serve_milter import without_mbox_line
from tests.e2e.test_serve_redis import complete, results, wait_for
from tests.e2e.test_serve_smtp import corpus_files


async def milter_headers(port: int, raw: bytes) -> dict[bytes, bytes]:
    from types import SimpleNamespace

    from filterd.config import HostPort

    from testing.milter_mta import Mta

    mta = await Mta.open(SimpleNamespace(cfg=SimpleNamespace(listen=HostPort("127.0.0.1", port))))  # type: ignore[arg-type]
    try:
        await mta.optneg()
        await mta.envelope(queue_id="Q1")
        headers, body = split_message(raw)
        replies = await mta.message(headers, body)
    finally:
        await mta.close()
    return dict(data.rstrip(b"\0").split(b"\0", 1) for c, data in replies if c == m.SMFIR_ADDHEADER)


def test_explanations_through_every_door(redis_server, tiny_model, spamassassin_dir, tmp_path):
    raw = without_mbox_line(corpus_files(spamassassin_dir, 1, 0)[0].read_bytes())
    text = extract_text(raw)
    expected = explain(Engine.load(tiny_model.model_dir, device="cpu"), text, top=3).to_json()
    smtp_port, milter_port, http_port = free_port(), free_port(), free_port()
    r = redis_server.client()
    with SmtpSink() as sink:
        d = FilterdProcess(tiny_model.model_dir, redis_server.url, tmp_path / "filterd.log", smtp__enabled="true",
                           smtp__listen=f"127.0.0.1:{smtp_port}", smtp__next_hop=sink.address, milter__enabled="true",
                           milter__listen=f"127.0.0.1:{milter_port}", http__enabled="true", http__listen=f"127.0.0.1:{http_port}",
                           explain__enabled="all", explain__top_words="3", explain__header="true",
                           explain__deadline="120s", explain__max_header_bytes="200").start()  # fmt: skip
        try:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=120) as c:
                c.sendmail("alice@example.org", ["bob@example.net"], raw)
            delivered = sink.wait_for(1, timeout=120)[0].data
            msg = email.message_from_bytes(delivered, policy=email.policy.default)
            report = msg.get_all("X-Spam-Report")
            added = asyncio.run(milter_headers(milter_port, raw))
            status, body = asyncio.run(post(http_port, "/checkv2", raw))
            assert status == 200, body
            checkv2 = json.loads(body)
            status, body = asyncio.run(
                post(http_port, "/classify", json.dumps({"email": base64.b64encode(raw).decode()}).encode())
            )
            assert status == 200, body
            classify = json.loads(body)
            r.xadd("filterd:in", {"text": text, "id": "1"})
            wait_for(complete(r, 1), timeout=120, what="Redis result")
            result = results(r)[0]
            explained = d.metric('filterd_explanations_total{outcome="explained",source="smtp"}')
        finally:
            assert d.stop() == 0
    words = [w["word"] for w in expected["words"]]
    assert words, expected
    # SMTP: one X-Spam-Report, one line of printable ASCII, naming the top word
    assert report is not None and len(report) == 1 and len(str(report[0])) <= 200
    header_line = next(line for line in delivered.split(b"\r\n") if line.startswith(b"X-Spam-Report:"))
    assert all(32 <= b < 127 for b in header_line)
    assert words[0] in str(report[0]) or not words[0].isascii()
    assert added[b"X-Spam-Report"].decode() == str(report[0]) or words[0] in added[b"X-Spam-Report"].decode()
    # HTTP and Redis carry the explanation object; the words are the ones explain() gives in process
    for got in (checkv2["filterd_explanation"], classify["explanation"], json.loads(result["explanation"])):
        assert [w["word"] for w in got["words"]] == words
        for w in got["words"]:
            assert text[w["start"] : w["end"]] == w["word"]
    assert any(o.startswith(words[0]) for o in checkv2["symbols"]["FILTERD_GPT2"]["options"])
    assert classify["reasons"] == checkv2["filterd"]["reasons"]  # the policy's reasons are unchanged beside it
    assert explained == 1
