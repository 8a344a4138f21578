"""The one message path and the defects the four copies had: forged verdicts past 10,000 headers, header
padding that hid the body, the unbounded HTTP parse, one door's large mail starving another's, the milter's
Subject rewrite past its limit, the reservoir that lost texts when doors were mixed. Real Postfix where the
defect was seen through it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import time
from types import SimpleNamespace

import pytest

from filterd.config import load_config
from filterd.doors.extraction import ExtractionBusy, Extractor
from filterd.doors.milter import MilterDoor
from filterd.doors.path import Inbound, MessagePath
from filterd.mail.budget import HEADERS_CUT, scan_view
from filterd.policy.decision import Policy
from filterd.sources import SOURCES
from filterd.store.reservoir import Reservoir, ReservoirWriter, read_reservoir
from testing.postfix import PostfixServer, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from tests.test_milter import ThreadedMilter, _transaction, by_message_id, cfg, run, smtp_send
from tests.test_smtp_ingress import door_path, send, serve, smtp_cfg


async def spam_word_score(text: str) -> SimpleNamespace:
    """0.94 when the body's word "viagra" reached the model, else 0.06."""
    return SimpleNamespace(score=0.94 if "viagra" in text.lower() else 0.06, model="stub-1", threshold=0.5)


def padded(n_bytes: int, *, forged_after: int = 0) -> bytes:
    """A spam whose body follows `n_bytes` of junk header fields, or with forged verdicts after `forged_after` short
    ones (10,001 of them are 90 KB: under Postfix's header_size_limit, which would cut a longer header block)."""
    filler = ([f"X-J: {i}\r\n".encode() for i in range(forged_after + 1)] if forged_after else
              [f"X-Junk-{i}: {'j' * 90}\r\n".encode() for i in range(n_bytes // 100)])  # fmt: skip
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, forged\r\n" if forged_after else b""
    head = b"".join(filler[:forged_after]) + forged + b"".join(filler[forged_after:])
    return (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: offer\r\nMessage-ID: <pad@filterd.test>\r\n" + head
            + b"\r\ncheap viagra, buy now\r\n")  # fmt: skip


# --- the scan budget ---------------------------------------------------------------------


def test_ordinary_mail_is_scanned_exactly_as_before():
    raw = b"Subject: hi\r\nFrom: a@b\r\n\r\n" + b"body line\r\n" * 20
    assert scan_view(raw, 1 << 20).raw == raw and not scan_view(raw, 1 << 20).headers_cut
    assert scan_view(raw, 60).raw == raw[:60]  # the first scan_bytes, as before, when the headers are within budget


def test_headers_may_take_at_most_half_of_a_small_budget():
    raw = b"Subject: offer\r\n" + b"X-Junk: " + b"j" * 3000 + b"\r\n\r\ncheap viagra\r\n"
    view = scan_view(raw, 4096)  # a 3 KB header block is within 64 KiB but over half of 4 KiB
    assert view.headers_cut and b"cheap viagra" in view.raw and b"Subject: offer" in view.raw


def test_a_padded_spam_keeps_its_body_through_a_milter_with_a_small_limit():
    raw = padded(1_100_000)
    headers, body = raw.split(b"\r\n\r\n", 1)
    fields = [tuple(f.decode().split(":", 1)) for f in headers.split(b"\r\n")]
    door = MilterDoor(cfg(max_message_bytes=4096), MessagePath.of(spam_word_score), "[SPAM] ")
    replies, _ = run(_transaction(door.on_message, cfg(max_message_bytes=4096), headers=fields, body=body))
    added = {r[1].split(b"\0")[0]: r[1].split(b"\0")[1] for r in replies if r[0] == b"h"}
    assert added[b"X-Spam-Flag"].strip() == b"YES"


def test_header_padding_cannot_push_the_body_out_of_the_scan_budget():
    raw = padded(1_100_000)
    view = scan_view(raw, 1 << 20)
    assert view.headers_cut and b"cheap viagra" in view.raw and b"Subject: offer" in view.raw and b"X-Junk" not in view.raw
    assert len(view.raw) < 70_000


@pytest.mark.parametrize("door", ["smtp", "milter"])
def test_a_padded_spam_is_scored_on_its_body_in_both_mail_doors_and_says_so(door):
    raw = padded(1_100_000)
    if door == "smtp":
        with SmtpSink() as sink:
            path = door_path(smtp_cfg(sink), spam_word_score)
            scan = run(path.scan(Inbound("smtp", raw=raw, sender="a@example.org", recipients=("b@example.net",))))

            async def body(ingress):
                return await send(ingress.port, raw)

            code, _ = serve(smtp_cfg(sink), spam_word_score)(body)
            assert code == 250
            (relayed,) = sink.wait_for(1)
            assert email.message_from_bytes(relayed.data, policy=email.policy.compat32)["X-Spam-Flag"] == "YES"
    else:
        seen = []

        class Path(MessagePath):
            async def scan(self, inbound, **kw):
                result = await super().scan(inbound, **kw)
                seen.append(result)
                return result

        door = MilterDoor(cfg(), Path(Policy.default(), lambda text, wait: spam_word_score(text)), "[SPAM] ")
        headers, body = raw.split(b"\r\n\r\n", 1)
        fields = [tuple(f.decode().split(":", 1)) for f in headers.split(b"\r\n")]
        replies, _ = run(_transaction(door.on_message, headers=fields, body=body))
        added = {r[1].split(b"\0")[0]: r[1].split(b"\0")[1] for r in replies if r[0] == b"h"}
        assert added[b"X-Spam-Flag"].strip() == b"YES"
        (scan,) = seen
    assert scan.decision.score == 0.94 and HEADERS_CUT in scan.decision.reasons


# --- the milter's forged fields and Subject ------------------------------------------------


def test_milter_deletes_forged_fields_after_more_than_10000_headers():
    raw = padded(0, forged_after=10_001)
    headers, body = raw.split(b"\r\n\r\n", 1)
    fields = [tuple(f.decode().split(":", 1)) for f in headers.split(b"\r\n")]
    door = MilterDoor(cfg(), MessagePath.of(spam_word_score), "[SPAM] ")
    replies, _ = run(_transaction(door.on_message, headers=fields, body=body))
    deleted = sorted(r[1][4:].split(b"\0")[0] for r in replies if r[0] == b"m")
    assert deleted == [b"X-Spam-Flag", b"X-Spam-Status"]


def test_milter_subject_rewrite_keeps_a_subject_that_lies_past_max_message_bytes():
    policy = Policy.from_config(load_config(None, ["policy.subject_score=0.5", "redis.enabled=false"]))
    door = MilterDoor(cfg(max_message_bytes=1024), MessagePath.of(spam_word_score, policy), "[SPAM] ")
    fields = [("From", " a@example.org")] + [("X-Filler", " " + "f" * 100)] * 20 + [("Subject", " cheap offer")]
    replies, _ = run(_transaction(door.on_message, headers=fields, body=b"viagra\r\n"))
    changed = [r[1] for r in replies if r[0] == b"m" and b"Subject\0" in r[1]]
    assert changed and changed[0].endswith(b"Subject\0 [SPAM] cheap offer\0"), replies


needs_postfix = pytest.mark.skipif(not postfix_available(), reason="needs postfix installed and root")


@needs_postfix
def test_through_a_real_postfix_forged_verdicts_after_10001_headers_are_gone(tmp_path):
    port = free_port()
    door = MilterDoor(cfg(), MessagePath.of(spam_word_score), "[SPAM] ")
    with SmtpSink() as sink, ThreadedMilter(cfg(listen=door.cfg.listen), door.on_message):
        postfix = PostfixServer(tmp_path / "postfix", relay_port=sink.port, content_filter=False, milter_port=door.cfg.listen.port)
        with postfix:
            code, reply = smtp_send(postfix.smtpd_port, padded(0, forged_after=10_001))
            assert code == 250, (code, reply)
            delivered = email.message_from_bytes(by_message_id(sink, "pad", timeout=60).data, policy=email.policy.compat32)
    assert port  # (a free port was reserved for nothing else)
    assert delivered.get_all("X-Spam-Flag") == ["YES"] and "forged" not in str(delivered.get_all("X-Spam-Status"))


# --- extraction: bounded, fair between doors and clients ----------------------------------


def test_a_huge_http_message_is_parsed_only_within_the_scan_budget():
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i} filler filler\r\n" for i in range(20_000))
    raw = (f"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n{parts}"
           f"--b\r\nContent-Type: text/plain\r\n\r\nLASTWORD\r\n--b--\r\n").encode()  # fmt: skip
    assert len(raw) > 1_000_000
    seen = []

    async def score(text):
        seen.append(text)
        return SimpleNamespace(score=0.1, model="m", threshold=0.5)

    path = MessagePath.of(score, scan_bytes={"http": 256 * 1024})
    scan = run(path.scan(Inbound("http", raw=raw)))
    assert scan.decision is not None and "part 0 filler" in seen[0] and "LASTWORD" not in seen[0]
    path.extractor.close()


def test_large_messages_of_one_door_and_client_cannot_starve_another_door():
    big = b"Subject: x\r\n\r\n" + b"word " * 30_000  # over INLINE_BYTES: parser processes
    order: list[str] = []

    async def main():
        ex = Extractor(workers=1, per_client=4)
        await ex.warm()

        async def one(name, door, client):
            try:
                await ex.extract(big, door, client)
                order.append(name)
            except ExtractionBusy:
                order.append(f"{name}:busy")

        jobs = [asyncio.create_task(one(f"http{i}", "http", "10.0.0.9")) for i in range(6)]
        await asyncio.sleep(0)  # every http job is running or waiting (no job can finish within one loop pass)
        jobs.append(asyncio.create_task(one("milter", "milter", "192.0.2.1")))
        await asyncio.gather(*jobs)
        ex.close()

    run(main())
    assert order[:2] == ["http4:busy", "http5:busy"]  # that client's cap: refused at once, not queued
    # doors take turns: the milter's message waits for the running job and the one whose turn it was, not for all
    assert order[2:5] == ["http0", "http1", "milter"], order


# --- the reservoir takes every door's texts -------------------------------------------------


def test_the_reservoir_keeps_texts_from_every_door_when_they_are_mixed(tmp_path):
    from filterd.obs.metrics import FilterdMetrics

    async def main():
        metrics = FilterdMetrics()
        writer = ReservoirWriter(Reservoir(tmp_path / "r.sqlite", size=1000, max_age=3600), metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        path = MessagePath.of(spam_word_score)
        path.reservoir = writer
        for i in range(50):
            for door in SOURCES:
                await path.scan(Inbound(door, text=f"{door} text {i}"))
        stop.set()
        await task
        await writer.close()
        return metrics

    metrics = run(main())
    sources = [s.source for s in read_reservoir(tmp_path / "r.sqlite")]
    assert sorted(set(sources)) == sorted(SOURCES) and len(sources) == 200
    assert not metrics.registry.get_sample_value("filterd_reservoir_dropped_total", {"reason": "write-error"})


def test_one_log_line_format_for_every_door(caplog):
    import logging

    path = MessagePath.of(spam_word_score)
    with caplog.at_level(logging.INFO, logger="filterd"):
        for door in ("smtp", "milter", "http"):
            scan = run(path.scan(Inbound(door, raw=b"Subject: s\r\n\r\nviagra\r\n", sender="x@\nforged", recipients=("r@y",))))
            path.done(scan, "tag", lead=[("queue_id", "Q1")])
    lines = [r.getMessage() for r in caplog.records if "action=tag" in r.getMessage()]
    assert len(lines) == 3
    for door, line in zip(("smtp", "milter", "http"), lines):
        assert re.fullmatch(rf"{door}: queue_id=Q1 from=<x@\?forged> rcpts=1 size=\d+ verdict=spam score=0\.9400 action=tag", line)
    assert json  # (imported for symmetry with the e2e tests)
    assert time


# --- client facts reach the policy from every door ------------------------------------------


@pytest.mark.parametrize("auth, listed", [("boss", True), ("", False)])
def test_milter_passes_the_sasl_login_so_an_allow_listed_sender_must_be_authenticated(auth, listed):
    from testing.milter_mta import Mta
    from filterd.doors.milter import MilterServer

    cfg_ = load_config(None, ['policy.allow_senders=["boss@example.com"]', 'policy.allow_senders_require="authenticated"',
                              "redis.enabled=false"])  # fmt: skip
    door = MilterDoor(cfg(), MessagePath.of(spam_word_score, Policy.from_config(cfg_)), "[SPAM] ")

    async def main():
        async with MilterServer(door.cfg, door.on_message) as server:
            mta = await Mta.open(server)
            await mta.optneg()
            await mta.envelope(sender="boss@example.com", auth=auth)
            replies = await mta.message([("Subject", " cheap viagra")], b"viagra\r\n")
            await mta.close()
            return replies

    status = [r[1] for r in run(main()) if r[0] == b"h" and r[1].startswith(b"X-Spam-Status\0")]
    assert (b"listed=allow_senders" in status[0]) is listed, status


@pytest.mark.parametrize("headers, listed", [({"IP": "10.1.2.3"}, True), ({"IP": "192.0.2.9"}, False), ({}, False)])
def test_http_passes_the_client_address_so_an_allow_listed_sender_must_come_from_a_trusted_network(headers, listed):
    from tests.test_http import Served

    with Served('policy.allow_senders=["boss@example.com"]', 'policy.allow_senders_require="trusted_networks"',
                'policy.trusted_networks=["10.0.0.0/8"]') as s:  # fmt: skip
        status, _, body = s.request("POST", "/checkv2", b"Subject: x\r\n\r\nhi SCORE=0.99\r\n", {"From": "boss@example.com", **headers})
    assert status == 200 and (json.loads(body)["filterd"]["listed"] == "allow_senders") is listed
