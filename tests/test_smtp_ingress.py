"""The SMTP ingress in process: real sockets (aiosmtpd server, aiosmtplib client, an SMTP sink as next
hop), a deterministic stand-in for the batcher. The real daemon and real Postfix are in tests/e2e."""

from __future__ import annotations

import asyncio
import email
import email.policy
from dataclasses import replace
from pathlib import Path

import aiosmtplib
import pytest

from filterd.mail.headers import strip_spam_headers
from filterd.model.batcher import QueueFull, Scored
from filterd.config import Config, SmtpConfig, check_config, parse_hostport
from filterd.doors.path import MessagePath
from filterd.policy.decision import Policy
from filterd.doors.smtp import SmtpIngress
from filterd.obs.metrics import FilterdMetrics

from testing.services import free_port
from testing.smtp_sink import SmtpSink

SPAM_WORDS = ("prize", "winner", "free", "click", "offer")


async def word_score(text: str) -> Scored:
    """Spam when the text has a spam word: deterministic and fast, the ingress is under test here."""
    await asyncio.sleep(0.001)
    s = 0.97 if any(w in text.lower() for w in SPAM_WORDS) else 0.02
    return Scored(s, "v-test", len(text.split()), 0.0, 0.0, 0.5)


def smtp_cfg(sink: SmtpSink, **kw) -> SmtpConfig:
    base = SmtpConfig(listen=parse_hostport(f"127.0.0.1:{free_port()}"), next_hop=parse_hostport(sink.address), timeout=10.0)
    return replace(base, **kw)


def message(subject: str, body: str, extra: str = "") -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.net\r\nSubject: {subject}\r\nMessage-ID: <{abs(hash(subject + body))}@t>\r\n"
            f"{extra}\r\n{body}\r\n").encode()  # fmt: skip


async def send(port: int, raw: bytes, rcpts=("b@example.net",), mail_from="a@example.org", **kw) -> tuple[int, str]:
    """(code, text) of the final reply; refusals come back as their code rather than raising."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20, start_tls=False)
    await client.connect()
    try:
        errors, reply = await client.sendmail(mail_from, list(rcpts), raw, **kw)
        return (250 if not errors else 0), reply
    except aiosmtplib.SMTPResponseException as e:
        return e.code, e.message
    except aiosmtplib.SMTPRecipientsRefused as e:
        return e.recipients[0].code, e.recipients[0].message
    finally:
        if client.is_connected:
            client.close()


def door_path(cfg: SmtpConfig, score=word_score, metrics: FilterdMetrics | None = None, policy: Policy | None = None) -> MessagePath:
    """The message path a content filter with this [smtp] alone has (its legacy `action` mapped as the daemon maps it)."""
    return MessagePath.of(score, policy or Policy.from_config(Config(smtp=cfg)), metrics=metrics, scan_bytes={"smtp": cfg.max_scan_bytes})


def serve(cfg: SmtpConfig, score=word_score, metrics: FilterdMetrics | None = None):
    """Decorator-free harness: run `body(ingress)` with the ingress listening, then close it."""

    def runner(body):
        async def main():
            ingress = SmtpIngress(cfg, door_path(cfg, score, metrics), metrics)
            await ingress.start()
            try:
                return await body(ingress)
            finally:
                await ingress.close()

        return asyncio.run(main())

    return runner


def headers_of(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


@pytest.fixture
def sink():
    with SmtpSink() as s:
        yield s


def test_ham_and_spam_relayed_with_headers_rest_byte_exact(sink):
    ham, spam = message("lunch", "see you at noon"), message("you are a winner", "claim your prize")

    async def body(ingress):
        return [await send(ingress.port, ham), await send(ingress.port, spam)]

    replies = serve(smtp_cfg(sink))(body)
    assert [c for c, _ in replies] == [250, 250] and "ham" in replies[0][1] and "spam" in replies[1][1]
    got = sink.wait_for(2)
    for sent, r, flag in ((ham, got[0], "NO"), (spam, got[1], "YES")):
        lines = r.data.split(b"\r\n", 3)
        assert lines[0] == f"X-Spam-Flag: {flag}".encode()
        assert lines[1].startswith(b"X-Spam-Score: 0.")
        assert lines[2].startswith(b"X-Spam-Status: " + (b"Yes" if flag == "YES" else b"No")) and b"model=v-test" in lines[2]
        assert lines[3] == sent  # everything after the added headers, byte for byte
        assert r.rcpt_tos == ("b@example.net",) and r.mail_from == "a@example.org"


def test_forged_spam_headers_removed(sink):
    raw = message("you are a winner", "free prize", extra="X-Spam-Flag: NO\r\nX-Spam-Status: No,\r\n score=0.0\r\n")

    async def body(ingress):
        return await send(ingress.port, raw)

    assert serve(smtp_cfg(sink))(body)[0] == 250
    msg = headers_of(sink.wait_for(1)[0].data)
    assert msg.get_all("X-Spam-Flag") == ["YES"] and len(msg.get_all("X-Spam-Status")) == 1


def test_destination_is_always_the_next_hop(sink):
    """Recipients on any domain go to the configured next hop with the envelope unchanged: no open relay."""
    rcpts = ("x@elsewhere.example", "y@[10.0.0.1]", "z@example.com")

    async def body(ingress):
        return await send(ingress.port, message("hello", "plain note"), rcpts=rcpts)

    assert serve(smtp_cfg(sink))(body)[0] == 250
    assert sink.wait_for(1)[0].rcpt_tos == rcpts


def test_concurrent_sessions_each_get_their_own_verdict(sink):
    texts = [("winner " if i % 3 == 0 else "") + f"message number {i}" for i in range(60)]

    async def body(ingress):
        return await asyncio.gather(*(send(ingress.port, message(f"m{i}", t), rcpts=(f"u{i}@example.net",)) for i, t in enumerate(texts)))

    assert all(c == 250 for c, _ in serve(smtp_cfg(sink))(body))
    by_rcpt = {r.rcpt_tos[0]: headers_of(r.data) for r in sink.wait_for(60)}
    for i in range(60):
        assert by_rcpt[f"u{i}@example.net"]["X-Spam-Flag"] == ("YES" if i % 3 == 0 else "NO")


def test_next_hop_down_is_451_then_delivered_when_back(sink):
    raw = message("status", "the nightly report")

    async def body(ingress):
        sink.stop()
        down = await send(ingress.port, raw)
        sink.start()
        return down, await send(ingress.port, raw)

    down, up = serve(smtp_cfg(sink))(body)
    assert down[0] == 451 and down[1].startswith("4.3.0")
    assert up[0] == 250 and len(sink.wait_for(1)) == 1


def test_next_hop_refusing_is_451_and_nothing_delivered(sink):
    sink.refuse = True
    metrics = FilterdMetrics()

    async def body(ingress):
        return await send(ingress.port, message("x", "y"))

    code, text = serve(smtp_cfg(sink), metrics=metrics)(body)
    assert code == 451 and "4.3.0" in text and sink.messages == []
    assert metrics.smtp_replies.labels(code="451")._value.get() == 1


def test_message_too_big_552_534(sink):
    metrics = FilterdMetrics()

    async def body(ingress):
        big = message("big", "x" * 3000)
        in_data = await send(ingress.port, big)
        announced = await send(ingress.port, message("small", "y"), mail_options=["SIZE=999999"])
        return in_data, announced

    in_data, announced = serve(smtp_cfg(sink, max_message_bytes=2000), metrics=metrics)(body)
    assert in_data[0] == 552 and in_data[1].startswith("5.3.4")
    assert announced[0] == 552 and announced[1].startswith("5.3.4")
    assert sink.messages == [] and metrics.smtp_replies.labels(code="552")._value.get() == 2


def test_too_many_recipients_452(sink):
    async def body(ingress):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingress.port, timeout=10, start_tls=False)
        await client.connect()
        await client.mail("a@example.org")
        codes = []
        for i in range(3):
            codes.append((await client.execute_command(b"RCPT", f"TO:<r{i}@example.net>".encode())).code)
        client.close()
        return codes

    assert serve(smtp_cfg(sink, max_recipients=2))(body) == [250, 250, 452]


async def broken_score(text: str) -> Scored:
    raise RuntimeError("model exploded")


async def busy_score(text: str) -> Scored:
    raise QueueFull("full")


def test_classification_failure_accept_relays_unknown(sink):
    async def body(ingress):
        return await send(ingress.port, message("x", "y", extra="X-Spam-Flag: NO\r\n"))

    assert serve(smtp_cfg(sink, on_error="accept"), score=broken_score)(body)[0] == 250
    msg = headers_of(sink.wait_for(1)[0].data)
    assert msg["X-Spam-Status"].startswith("Unknown") and msg["X-Spam-Flag"] is None


def test_classification_failure_tempfail_451(sink):
    async def body(ingress):
        return await send(ingress.port, message("x", "y"))

    code, _ = serve(smtp_cfg(sink, on_error="tempfail"), score=broken_score)(body)
    assert code == 451 and sink.messages == []


def test_queue_full_is_451_whatever_on_error_says(sink):
    metrics = FilterdMetrics()

    async def body(ingress):
        return await send(ingress.port, message("x", "y"))

    code, text = serve(smtp_cfg(sink, on_error="accept"), score=busy_score, metrics=metrics)(body)
    assert code == 451 and sink.messages == []
    assert metrics.messages.labels("smtp", "error")._value.get() == 1


@pytest.mark.parametrize("action, expect", [("discard", (250, 0)), ("reject", (550, 0)), ("quarantine", (250, 1))])
def test_spam_actions(sink, action, expect):
    async def body(ingress):
        return await send(ingress.port, message("winner", "prize"), rcpts=("b@example.net", "c@example.net"))

    cfg = smtp_cfg(sink, action=action, quarantine_rcpt="spamtrap@example.org")
    code, _ = serve(cfg)(body)
    assert (code, len(sink.messages)) == expect
    if action == "quarantine":
        r = sink.messages[0]
        assert r.rcpt_tos == ("spamtrap@example.org",)
        assert "b@example.net" in headers_of(r.data)["X-Filterd-Original-Recipients"]


def test_smtputf8_and_8bitmime_pass_through(sink):
    raw = "From: José <jose@exämple.org>\r\nTo: b@example.net\r\nSubject: café\r\n\r\nGrüße, ½ price offer\r\n".encode()

    async def body(ingress):
        return await send(ingress.port, raw, mail_from="josé@exämple.org", rcpts=("bö@example.net",),
                          mail_options=["SMTPUTF8", "BODY=8BITMIME"])  # fmt: skip

    assert serve(smtp_cfg(sink))(body)[0] == 250
    r = sink.wait_for(1)[0]
    assert r.mail_from == "josé@exämple.org" and r.rcpt_tos == ("bö@example.net",)
    assert r.data.endswith(raw) and b"X-Spam-Flag: YES" in r.data


def test_shutdown_finishes_messages_in_flight(sink):
    async def slow_score(text: str) -> Scored:
        await asyncio.sleep(0.5)
        return await word_score(text)

    async def main():
        ingress = SmtpIngress(smtp_cfg(sink), door_path(smtp_cfg(sink), slow_score))
        await ingress.start()
        sending = asyncio.create_task(send(ingress.port, message("a", "b")))
        await asyncio.sleep(0.2)  # the message is being classified
        await ingress.close()
        return await sending, ingress.up

    (code, _), up = asyncio.run(main())
    assert code == 250 and len(sink.messages) == 1 and not up


def test_corpus_messages_relay_exactly(sink, spamassassin_dir: Path):
    """Real mail (LF on disk, CRLF on the wire): everything after the added headers arrives unchanged."""
    files = sorted(p for p in (spamassassin_dir / "spam").iterdir() if p.is_file() and p.name != "cmds")[:15]
    raws = [p.read_bytes() for p in files]

    async def body(ingress):
        return [await send(ingress.port, raw) for raw in raws]

    assert all(c == 250 for c, _ in serve(smtp_cfg(sink))(body))
    for raw, r in zip(raws, sink.wait_for(len(raws))):
        wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        wire = wire if wire.endswith(b"\r\n") else wire + b"\r\n"
        assert r.data.split(b"\r\n", 3)[3] == strip_spam_headers(wire)


def test_lines_longer_than_rfc_limit_are_relayed_unchanged(sink):
    """Real mail has lines over 1000 bytes (24 SpamAssassin messages); a 500 would make Postfix bounce them."""
    raw = message("long line", "x" * 5000)

    async def body(ingress):
        return await send(ingress.port, raw)

    assert serve(smtp_cfg(sink))(body)[0] == 250
    assert sink.wait_for(1)[0].data.endswith(raw)


def test_a_listed_sender_is_not_scored_and_a_nan_score_follows_on_error(sink):
    """The door asks filterd.policy.decision: an allow-listed sender skips the model; a NaN score is a failed
    classification (on_error = tempfail: 451), not ham."""
    scored: list[str] = []

    async def nan_score(text: str) -> Scored:
        scored.append(text)
        return Scored(float("nan"), "v-test", 1, 0.0, 0.0, 0.5)

    metrics = FilterdMetrics()
    policy = Policy.from_config(check_config(None, ['policy.allow_senders=["friend.example"]', "redis.enabled=false"]))

    async def main():
        cfg = smtp_cfg(sink, on_error="tempfail")
        ingress = SmtpIngress(cfg, door_path(cfg, nan_score, metrics, policy), metrics)
        await ingress.start()
        try:
            listed = await send(ingress.port, message("you are a winner", "prize"), mail_from="a@Friend.Example")
            return listed, await send(ingress.port, message("you are a winner", "prize"))
        finally:
            await ingress.close()

    listed, nan = asyncio.run(main())
    assert listed[0] == 250 and nan[0] == 451
    assert len(scored) == 1  # only the second message went to the model
    msg = headers_of(sink.wait_for(1)[0].data)
    assert msg["X-Spam-Flag"] == "NO" and msg["X-Spam-Status"] == "No, listed=allow_senders"
    value = lambda a: metrics.registry.get_sample_value("filterd_actions_total", {"source": "smtp", "action": a})
    assert (value("pass"), value("tempfail")) == (1.0, 1.0)
