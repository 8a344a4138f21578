"""The SMTP ingress against hostile or unlucky conditions (issue 12): envelope addresses passed on
byte for byte, the next hop's permanent refusals passed on per recipient, a slow next hop, limits
on sessions, time and memory, XFORWARD. Real sockets; the next hop is testing/smtp_sink.py."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time

import aiosmtplib
import pytest

from filterd.doors.smtp import parse_path

from testing.smtp_sink import SmtpSink
from tests.test_smtp_ingress import message, send, serve, smtp_cfg


@pytest.fixture
def sink():
    with SmtpSink() as s:
        yield s


class Raw:
    """A line-at-a-time SMTP client: exactly the bytes we write, every reply as (code, text)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> tuple["Raw", tuple[int, str]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        c = cls(reader, writer)
        return c, await c.reply()

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 20)).decode()
            if not line:
                return 0, "connection closed"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return int(lines[-1][:3]), "\n".join(x[4:] for x in lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def data(self, raw: bytes) -> tuple[int, str]:
        code, _ = await self.cmd("DATA")
        assert code == 354
        stuffed = b"".join(b"." + ln if ln.startswith(b".") else ln for ln in raw.splitlines(keepends=True))
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


# --- 1. envelope addresses are passed on as sent --------------------------------------------------


def test_parse_path_keeps_the_address_as_sent():
    assert parse_path("<=?utf-8?b?YWRtaW4=?=@example.org>") == ("=?utf-8?b?YWRtaW4=?=@example.org", "")
    assert parse_path("<=?utf-8?q?ceo?=@example.com> BODY=8BITMIME") == ("=?utf-8?q?ceo?=@example.com", "BODY=8BITMIME")
    assert parse_path("<>") == ("", "")
    assert parse_path('<"a>b c"@example.org> SIZE=10') == ('"a>b c"@example.org', "SIZE=10")
    assert parse_path("<@relay.example,@b.example:user@example.org>") == ("user@example.org", "")
    assert parse_path("bare@example.org") == ("bare@example.org", "")
    for bad in ("<a@example.org", "<a b@example.org>", "<a\x01@example.org>", "<a@@example.org>"):
        assert parse_path(bad)[0] is None, bad


def test_encoded_word_addresses_reach_the_next_hop_byte_for_byte(sink):
    """aiosmtpd decodes RFC 2047 words in MAIL/RCPT; the next hop must get what Postfix sent."""
    sender, rcpt = "=?utf-8?q?ceo?=@example.com", "=?utf-8?b?YWRtaW4=?=@example.org"

    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await c.cmd("RCPT TO:<plain@example.org>"))[0] == 250
        got = await c.data(message("hello", "plain note"))
        c.close()
        return got

    assert serve(smtp_cfg(sink))(body)[0] == 250
    r = sink.wait_for(1)[0]
    assert r.raw_from == sender and r.raw_rcpts == (rcpt, "plain@example.org")


def test_quarantine_lists_original_recipients_as_sent(sink):
    rcpt = "=?utf-8?b?YWRtaW4=?=@example.org"

    async def body(ingress):
        return await send(ingress.port, message("winner", "prize"), rcpts=(rcpt,))

    assert serve(smtp_cfg(sink, action="quarantine", quarantine_rcpt="trap@example.org"))(body)[0] == 250
    r = sink.wait_for(1)[0]
    assert r.raw_rcpts == ("trap@example.org",)
    msg = email.message_from_bytes(r.data, policy=email.policy.default)
    assert str(msg["X-Filterd-Original-Recipients"]) == rcpt  # an encoded word of the raw text, decoded


# --- 2. the next hop's permanent refusals are passed on -------------------------------------------


def test_refused_recipient_gets_the_5xx_and_the_others_are_delivered_once(sink):
    sink.refuse_rcpts["gone@example.net"] = "550 5.1.1 <gone@example.net>: Recipient address rejected"

    async def body(ingress):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingress.port, timeout=20, start_tls=False)
        await client.connect()
        errors, reply = await client.sendmail("a@example.org", ["ok1@example.net", "gone@example.net", "ok2@example.net"],
                                              message("hello", "plain note"))  # fmt: skip
        client.close()
        return errors, reply

    errors, reply = serve(smtp_cfg(sink))(body)
    assert {k: v.code for k, v in errors.items()} == {"gone@example.net": 550}
    assert "5.1.1" in errors["gone@example.net"].message and "Recipient address rejected" in errors["gone@example.net"].message
    assert reply.startswith("2.0.0")
    got = sink.wait_for(1)
    time.sleep(0.2)
    assert len(sink.messages) == 1 and got[0].rcpt_tos == ("ok1@example.net", "ok2@example.net")


def test_temporary_recipient_refusal_stays_temporary(sink):
    sink.refuse_rcpts["later@example.net"] = "450 4.2.0 <later@example.net>: mailbox busy"

    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        return await c.cmd("RCPT TO:<later@example.net>")

    code, text = serve(smtp_cfg(sink))(body)
    assert code == 450 and text.startswith("4.2.0")


@pytest.mark.parametrize("reply, code", [("554 5.7.1 Message content rejected", 554), ("552 5.3.4 Message too big for me", 552),
                                         ("451 4.3.0 try later", 451)])  # fmt: skip
def test_final_refusal_keeps_its_class(sink, reply, code):
    sink.refuse, sink.refuse_reply = True, reply

    async def body(ingress):
        return await send(ingress.port, message("x", "y"))

    got = serve(smtp_cfg(sink))(body)
    assert got[0] == code and got[1].startswith(reply[4:9]) and sink.messages == []


def test_smtputf8_mail_to_a_next_hop_without_it_is_5_6_7():
    with SmtpSink(smtputf8=False) as sink:

        async def body(ingress):
            return await send(ingress.port, "Subject: café\r\n\r\nGrüße\r\n".encode(), mail_from="josé@exämple.org",
                              mail_options=["SMTPUTF8", "BODY=8BITMIME"])  # fmt: skip

        code, text = serve(smtp_cfg(sink))(body)
    assert code == 550 and text.startswith("5.6.7") and sink.messages == []


# --- 3. a slow next hop: one copy -----------------------------------------------------------------


def test_slow_next_hop_gets_exactly_one_copy_and_the_client_250(sink):
    """The next hop stores the message and answers 2 s later; the idle timeout is 1 s. aiosmtpd's
    timer (started at DATA) used to hang up first: the client retried, the next hop got it twice."""
    sink.data_delay = 2.0

    async def body(ingress):
        replies = []
        for _ in range(2):  # like Postfix: a message not answered 250 is sent again
            try:
                replies.append(await send(ingress.port, message("slow", "next hop")))
            except aiosmtplib.SMTPException as e:
                replies.append((0, repr(e)))
            if replies[-1][0] == 250:
                break
        return replies

    replies = serve(smtp_cfg(sink, timeout=1.0))(body)
    assert replies[0][0] == 250, replies
    assert "queued as SINK0001" in replies[0][1]
    assert len(sink.messages) == 1


def test_data_done_timeout_bounds_classify_and_relay(sink):
    sink.data_delay = 3.0

    async def body(ingress):
        t0 = time.monotonic()
        return await send(ingress.port, message("slow", "next hop")), time.monotonic() - t0

    (code, text), took = serve(smtp_cfg(sink, data_done_timeout=0.5))(body)
    assert code == 451 and text.startswith("4.4.2") and took < 2.9


# --- 4. limits ------------------------------------------------------------------------------------


def test_session_deadline_ends_a_session_kept_alive_with_noop(sink):
    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            code, text = await c.cmd("NOOP")
            if code != 250:
                return code, text, time.monotonic() - t0, ingress.sessions
            await asyncio.sleep(0.2)
        return 250, "still open", 5.0, ingress.sessions

    code, text, took, left = serve(smtp_cfg(sink, timeout=1.0, session_timeout=1.0))(body)
    assert code == 421 and text.startswith("4.4.2") and took < 3
    assert left == 0


def test_idle_session_is_closed(sink):
    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        return await c.reply()  # says nothing; the server speaks first

    code, text = serve(smtp_cfg(sink, timeout=0.5))(body)
    assert code == 421 and text.startswith("4.4.2")


def test_connection_caps_total_and_per_client(sink):
    async def body(ingress):
        out, keep = [], []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.3"):
            c, (code, _) = await Raw.connect(ingress.port, source)
            keep.append(c)  # a dropped StreamWriter closes its connection
            out.append(code)
        await asyncio.sleep(0.1)
        return out, ingress.sessions

    codes, sessions = serve(smtp_cfg(sink, max_connections=3, max_connections_per_client=2))(body)
    assert codes == [220, 220, 421, 220, 421] and sessions == 3


def test_inflight_byte_budget_defers_and_is_given_back(sink):
    async def body(ingress):
        big = await send(ingress.port, message("big", "x" * 5000))
        announced = await send(ingress.port, message("small", "y"), mail_options=["SIZE=5000"])
        small = await send(ingress.port, message("small", "fits"))
        return big, announced, small, ingress.budget.held

    big, announced, small, held = serve(smtp_cfg(sink, max_inflight_bytes=2000))(body)
    assert big[0] == 452 and big[1].startswith("4.3.1")
    assert announced[0] == 452
    assert small[0] == 250 and held == 0
    assert len(sink.wait_for(1)) == 1


def test_dot_stuffing_and_chunk_edges_survive(sink):
    """DATA is read in megabyte chunks: leading dots, a lone-dot line and lines across chunk ends."""
    lines = [b".leading dot", b"..two dots", b".", b"x" * 70] * 40000  # ~3.4 MB
    raw = b"Subject: dots\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"

    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<b@example.net>")
        got = [await c.data(raw), await c.cmd("MAIL FROM:<a@example.org>")]
        await c.cmd("RCPT TO:<b@example.net>")
        got.append(await c.data(b""))  # no lines at all
        return got

    (c1, _), (c2, _), (c3, _) = serve(smtp_cfg(sink))(body)
    assert (c1, c2, c3) == (250, 250, 250)
    got = sink.wait_for(2)
    assert got[0].data.split(b"\r\n", 3)[3] == raw
    assert got[1].data.count(b"\r\n") == 3 and got[1].data.startswith(b"X-Spam-")


# --- 5. XFORWARD ----------------------------------------------------------------------------------


def test_xforward_is_offered_kept_and_passed_on(caplog):
    attrs = "NAME=mail.client.example ADDR=192.0.2.7 PORT=40000 HELO=client.example PROTO=ESMTP IDENT=4ZqXyT1bQ2z9 SOURCE=REMOTE"
    with SmtpSink(xforward=True) as sink:

        async def body(ingress):
            c, _ = await Raw.connect(ingress.port)
            ehlo = await c.cmd("EHLO postfix.test")
            x = await c.cmd("XFORWARD " + attrs)
            await c.cmd("MAIL FROM:<a@example.org>")
            await c.cmd("RCPT TO:<b@example.net>")
            return ehlo, x, await c.data(message("hello", "with xforward"))

        with caplog.at_level(logging.INFO, logger="filterd"):
            ehlo, x, done = serve(smtp_cfg(sink))(body)
        r = sink.wait_for(1)[0]
    assert "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in ehlo[1]
    assert x[0] == 250 and done[0] == 250
    assert r.xforward == dict(a.split("=", 1) for a in attrs.split())
    line = next(rec.getMessage() for rec in caplog.records if "queued_as=" in rec.getMessage())
    assert "queue_id=4ZqXyT1bQ2z9" in line and "client=mail.client.example[192.0.2.7]" in line
    assert "message_id=<" in line and "queued_as=SINK0001" in line


def test_xforward_not_sent_to_a_next_hop_without_it(sink):
    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO postfix.test")
        bad = await c.cmd("XFORWARD COLOR=blue")
        await c.cmd("XFORWARD NAME=x.example ADDR=192.0.2.7")
        await c.cmd("MAIL FROM:<a@example.org>")
        in_txn = await c.cmd("XFORWARD NAME=y.example")
        await c.cmd("RCPT TO:<b@example.net>")
        return bad, in_txn, await c.data(message("hello", "no xforward at the next hop"))

    bad, in_txn, done = serve(smtp_cfg(sink))(body)
    assert bad[0] == 501 and in_txn[0] == 503 and done[0] == 250
    assert sink.xforward_commands == [] and len(sink.wait_for(1)) == 1


def test_rset_and_client_loss_close_the_next_hop_transaction(sink):
    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<b@example.net>")
        rset = await c.cmd("RSET")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<c@example.net>")
        c.close()  # gone before DATA
        await asyncio.sleep(0.3)
        return rset, ingress.sessions

    rset, sessions = serve(smtp_cfg(sink))(body)
    assert rset[0] == 250 and sessions == 0 and sink.messages == []


def test_next_hop_connection_lost_before_data_is_replayed_once(sink):
    """The next hop hangs up while the client is still uploading (its own idle timeout): nothing was
    delivered on that connection, so filterd opens a new one with the same envelope."""

    async def body(ingress):
        c, _ = await Raw.connect(ingress.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<b@example.net>")
        await c.cmd("RCPT TO:<c@example.net>")
        await asyncio.to_thread(sink.restart)  # cuts filterd's connection to it
        return await c.data(message("hello", "after a reconnect"))

    code, text = serve(smtp_cfg(sink))(body)
    assert code == 250, text
    got = sink.wait_for(1)
    assert len(sink.messages) == 1 and got[0].rcpt_tos == ("b@example.net", "c@example.net")


def test_inflight_budget_below_message_size_is_a_config_error(tmp_path):
    from filterd.config import check_config
    from filterd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_inflight_bytes: must be >= max_message_bytes"):
        check_config(None, ["smtp.max_message_bytes=1000000", "smtp.max_inflight_bytes=999999"])
    assert check_config(None, []).smtp.max_inflight_bytes >= check_config(None, []).smtp.max_message_bytes


def test_unit_gives_room_for_connections():
    from tests.conftest import REPO

    unit = (REPO / "systemd" / "filterd.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit


def test_a_dead_parser_process_costs_one_message_its_verdict_not_the_ingress(sink):
    """A large message's text is extracted in worker processes; if they die (OOM killer), that message
    follows on_error and the next one gets new workers."""
    import os
    import signal

    pad = "\r\n" + "filler text for a large mail\r\n" * 4000  # over the extractor's INLINE_BYTES: parsed in a process

    async def body(ingress):
        first = await send(ingress.port, message("winner", "prize" + pad))
        for pid in list(ingress.handler.path.extractor.pool()._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        second = await send(ingress.port, message("winner", "prize again" + pad))
        third = await send(ingress.port, message("winner", "prize once more" + pad))
        return first, second, third

    replies = serve(smtp_cfg(sink))(body)
    assert [c for c, _ in replies] == [250, 250, 250]
    flags = [email.message_from_bytes(r.data, policy=email.policy.default)["X-Spam-Status"] for r in sink.wait_for(3)]
    assert flags[0].startswith("Yes") and flags[1].startswith("Unknown, reason=parser-died") and flags[2].startswith("Yes")


def test_only_max_scan_bytes_are_parsed_but_everything_is_relayed(sink):
    filler = ("quiet line of ordinary text\r\n" * 200).encode()  # ~5.8 kB before the spam words
    raw = message("notes", "") + filler + b"winner prize free offer click\r\n"

    async def body(ingress):
        return await send(ingress.port, raw)

    assert serve(smtp_cfg(sink, max_scan_bytes=4096))(body)[0] == 250
    r = sink.wait_for(1)[0]
    assert email.message_from_bytes(r.data, policy=email.policy.default)["X-Spam-Flag"] == "NO"  # the words were not read
    assert r.data.endswith(raw)
