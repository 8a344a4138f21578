"""The milter door (filterd/doors/milter/): the protocol against our own MTA side on a raw
socket, then a real Postfix (testing/postfix.py, with deploy/postfix/milter.main.cf as shipped)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import smtplib
import struct
import threading
import time
from pathlib import Path

import pytest

from filterd.doors.path import MessagePath
from filterd.config import ConfigError, HostPort, MilterConfig, UnixSocket, check_config, load_config, parse_listen
from filterd.doors.milter import protocol as m
from filterd.doors.milter import (
    Accept,
    AddHeader,
    ChangeSubject,
    DeleteHeader,
    Discard,
    MilterMessage,
    MilterReply,
    MilterServer,
    Quarantine,
    Reject,
    Tempfail,
    forged_header_deletions,
)
from filterd.mail.text import extract_text

from testing.milter_mta import ALL_ACTIONS, ALL_STEPS, Mta, split_message
from testing.postfix import PostfixServer, corpus_messages, postfix_available
from testing.services import free_port
from testing.smtp_sink import SmtpSink


def cfg(**kw) -> MilterConfig:
    kw.setdefault("listen", HostPort("127.0.0.1", free_port()))
    return dataclasses.replace(MilterConfig(enabled=True), **kw)


HEADERS = [
    ("From", " Alice <alice@example.org>"),
    ("To", " bob@example.net"),
    ("Subject", " hello there"),
    ("X-Long", " first line\n\tsecond line"),  # folded: milter8 sends bare LF between the lines
]
BODY = b"Hi Bob,\r\nthis is the body.\r\n"


class Recorder:
    """An on_message that records what it was given and answers with a preset reply."""

    def __init__(self, reply: MilterReply | None = None) -> None:
        self.reply = reply or MilterReply()
        self.messages: list[MilterMessage] = []

    async def __call__(self, msg: MilterMessage) -> MilterReply:
        self.messages.append(msg)
        return self.reply


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _transaction(on_message, config: MilterConfig | None = None, *, headers=HEADERS, body=BODY,
                       actions=ALL_ACTIONS, steps=ALL_STEPS):  # fmt: skip
    async with MilterServer(config or cfg(), on_message) as server:
        mta = await Mta.open(server)
        await mta.optneg(actions, steps)
        await mta.envelope()
        replies = await mta.message(headers, body)
        mta.send(m.SMFIC_QUIT)
        await mta.close()
        return replies, server


# --------------------------------------------------------------------------------------------
# Negotiation and collection


def test_negotiates_only_the_steps_and_actions_it_uses():
    async def main():
        async with MilterServer(cfg(), Recorder()) as server:
            mta = await Mta.open(server)
            version, actions, steps = await mta.optneg()
            assert version == 6
            assert actions == m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS | m.SMFIF_QUARANTINE  # no body, recipient or sender edits
            for skipped in (m.SMFIP_NOHELO, m.SMFIP_NODATA, m.SMFIP_NOEOH, m.SMFIP_NOUNKNOWN):
                assert steps & skipped
            for needed in (m.SMFIP_NOCONNECT, m.SMFIP_NOMAIL, m.SMFIP_NORCPT, m.SMFIP_NOHDRS, m.SMFIP_NOBODY):
                assert not steps & needed  # envelope, headers and body are what we classify
            for waived in (m.SMFIP_NR_CONN, m.SMFIP_NR_MAIL, m.SMFIP_NR_RCPT, m.SMFIP_NR_HDR):
                assert steps & waived  # never answered differently, so Postfix need not wait
            assert not steps & m.SMFIP_NR_BODY and steps & m.SMFIP_SKIP  # body replies can say SKIP
            await mta.close()
            # An MTA that offers less gets no more than it offered.
            mta = await Mta.open(server)
            _, actions, steps = await mta.optneg(actions=m.SMFIF_ADDHDRS, steps=m.SMFIP_NOHELO | m.SMFIP_NR_HDR)
            assert (actions, steps) == (m.SMFIF_ADDHDRS, m.SMFIP_NOHELO | m.SMFIP_NR_HDR)
            await mta.close()

    run(main())


@pytest.mark.parametrize("leadspc", [True, False])
def test_collects_envelope_headers_and_body(leadspc):
    rec = Recorder()
    steps = ALL_STEPS if leadspc else ALL_STEPS & ~m.SMFIP_HDR_LEADSPC
    replies, server = run(_transaction(rec, steps=steps))
    assert replies == [(m.SMFIR_ACCEPT, b"")]
    (msg,) = rec.messages
    assert (msg.sender, msg.recipients, msg.queue_id) == ("alice@example.org", ["bob@example.net"], "4ABCDEF")
    assert (msg.client, msg.client_name, msg.macros["j"]) == ("192.0.2.7", "client.example", "mx.test")
    assert msg.header_names == ["From", "To", "Subject", "X-Long"]
    assert msg.header_lines[2] == b"Subject: hello there"
    assert msg.header_lines[3] == b"X-Long: first line\r\n\tsecond line"
    assert msg.body == BODY and not msg.truncated
    parsed = email.message_from_bytes(msg.raw(), policy=email.policy.default)
    assert parsed["Subject"] == "hello there" and parsed["X-Long"] == "first line\tsecond line"
    text = extract_text(msg.raw())  # what the classifier will read
    assert "hello there" in text and "this is the body." in text
    assert server.stats.messages == 1 and server.stats.verdicts["accept"] == 1


def test_real_messages_come_out_byte_for_byte(spamassassin_dir):
    """20 SpamAssassin messages (folded headers, MIME, 8-bit): raw() is the message as sent."""
    raws = corpus_messages(spamassassin_dir, 20)
    rec = Recorder()

    async def main():
        async with MilterServer(cfg(), rec) as server:
            mta = await Mta.open(server)
            await mta.optneg()
            for raw in raws:
                await mta.envelope()
                headers, body = split_message(raw)
                assert await mta.message(headers, body) == [(m.SMFIR_ACCEPT, b"")]
            await mta.close()

    run(main())
    assert [x.raw() for x in rec.messages] == raws


def test_two_messages_on_one_connection_do_not_mix():
    rec = Recorder()

    async def main():
        async with MilterServer(cfg(), rec) as server:
            mta = await Mta.open(server)
            await mta.optneg()
            await mta.envelope(sender="a@x.org", rcpts=("r1@y.org", "r2@y.org"), queue_id="Q1")
            await mta.message([("Subject", " one"), ("X-Spam-Flag", " YES")], b"first\r\n")
            mta.send(m.SMFIC_MACRO, b"M" + b"i\0Q2\0")
            await mta.event(m.SMFIC_MAIL, b"<b@x.org>\0")
            await mta.event(m.SMFIC_RCPT, b"<r3@y.org>\0")
            await mta.message([("Subject", " two")], b"second\r\n")
            mta.send(m.SMFIC_ABORT)  # RSET between messages: nothing to answer
            mta.send(m.SMFIC_QUIT)
            await mta.close()

    run(main())
    first, second = rec.messages
    assert (first.queue_id, first.recipients, first.header_names) == ("Q1", ["r1@y.org", "r2@y.org"], ["Subject", "X-Spam-Flag"])
    assert (second.queue_id, second.sender, second.recipients) == ("Q2", "b@x.org", ["r3@y.org"])
    assert second.header_names == ["Subject"] and second.body == b"second\r\n"
    assert second.client == "192.0.2.7"  # the connection's facts carry over to the next message


# --------------------------------------------------------------------------------------------
# Replies: every action on the wire


def _cstr(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


@pytest.mark.parametrize(
    "reply, expected",
    [
        (MilterReply(Accept()), [(m.SMFIR_ACCEPT, b"")]),
        (
            MilterReply(Accept(), (AddHeader("X-Spam-Flag", "NO"), AddHeader("X-Spam-Score", "0.0123"))),
            [(m.SMFIR_ADDHEADER, _cstr("X-Spam-Flag", " NO")), (m.SMFIR_ADDHEADER, _cstr("X-Spam-Score", " 0.0123")),
             (m.SMFIR_ACCEPT, b"")],
        ),  # fmt: skip
        (
            MilterReply(Accept(), (DeleteHeader("x-spam-flag", 2),)),
            [(m.SMFIR_CHGHEADER, struct.pack("!I", 2) + _cstr("x-spam-flag", "")), (m.SMFIR_ACCEPT, b"")],
        ),
        (
            MilterReply(Accept(), (ChangeSubject("[SPAM] hello there"),)),
            [(m.SMFIR_CHGHEADER, struct.pack("!I", 1) + _cstr("Subject", " [SPAM] hello there")), (m.SMFIR_ACCEPT, b"")],
        ),
        (
            MilterReply(Accept(), (Quarantine("filterd: spam 0.99"), AddHeader("X-Spam-Flag", "YES"))),
            [(m.SMFIR_QUARANTINE, _cstr("filterd: spam 0.99")), (m.SMFIR_ADDHEADER, _cstr("X-Spam-Flag", " YES")),
             (m.SMFIR_ACCEPT, b"")],
        ),  # fmt: skip
        (MilterReply(Reject()), [(m.SMFIR_REPLYCODE, _cstr("550 5.7.1 Message rejected as spam"))]),
        (
            MilterReply(Reject(554, "5.7.0", "100% spam"), (AddHeader("X-Ignored", "yes"),)),
            [(m.SMFIR_REPLYCODE, _cstr("554 5.7.0 100%% spam"))],  # '%' doubled: Postfix undoes sendmail's escaping
        ),
        (MilterReply(Tempfail(451, "4.7.1", "busy")), [(m.SMFIR_REPLYCODE, _cstr("451 4.7.1 busy"))]),
        (MilterReply(Discard()), [(m.SMFIR_DISCARD, b"")]),
    ],
    ids=["accept", "add-headers", "delete-header", "change-subject", "quarantine", "reject", "reject-percent", "tempfail", "discard"],
)
def test_every_reply_on_the_wire(reply, expected):
    replies, server = run(_transaction(Recorder(reply)))
    assert replies == expected
    assert sum(server.stats.verdicts.values()) == 1


def test_subject_is_added_when_missing_and_values_follow_leadspc():
    headers = [h for h in HEADERS if h[0] != "Subject"]
    reply = MilterReply(Accept(), (ChangeSubject("[SPAM]"), AddHeader("X-A", "b")))
    replies, _ = run(_transaction(Recorder(reply), headers=headers, steps=ALL_STEPS & ~m.SMFIP_HDR_LEADSPC))
    # Without HDR_LEADSPC the MTA itself puts the space after the colon.
    assert replies == [(m.SMFIR_ADDHEADER, _cstr("Subject", "[SPAM]")), (m.SMFIR_ADDHEADER, _cstr("X-A", "b")), (m.SMFIR_ACCEPT, b"")]


def test_edits_the_mta_did_not_allow_are_skipped():
    reply = MilterReply(Accept(), (AddHeader("X-A", "1"), DeleteHeader("X-B"), Quarantine()))
    replies, _ = run(_transaction(Recorder(reply), actions=m.SMFIF_ADDHDRS))
    assert replies == [(m.SMFIR_ADDHEADER, _cstr("X-A", " 1")), (m.SMFIR_ACCEPT, b"")]


@pytest.mark.parametrize(
    "make",
    [
        lambda: AddHeader("X Bad", "v"),
        lambda: AddHeader("X-A:", "v"),
        lambda: AddHeader("X-A", "line\r\nInjected: yes"),
        lambda: DeleteHeader("X-A", 0),
        lambda: ChangeSubject("a\nb"),
        lambda: Quarantine(""),
        lambda: Reject(451, "4.7.1", "x"),
        lambda: Reject(550, "4.7.1", "x"),
        lambda: Reject(550, "5.7.1", "two\r\nlines"),
        lambda: Tempfail(550, "5.7.1", "x"),
        lambda: Reject(550, "5.7.1", "spam détecté"),
        lambda: MilterReply("accept"),
    ],
)
def test_bad_replies_are_refused_when_built(make):
    with pytest.raises(ValueError):
        make()


def test_forged_header_deletions_every_casing_last_first():
    names = ["Received", "X-Spam-Flag", "Subject", "x-spam-flag", "X-SPAM-Score", "X-Filterd-Original-Recipients",
             "X-Spam-Flag", "X-Spamish", "X-Mailer"]  # fmt: skip
    got = forged_header_deletions(names)
    # Postfix counts instances per name case-insensitively; the last instance goes first so that
    # deleting it never renumbers one still to be deleted.
    assert got == [
        DeleteHeader("X-Spam-Flag", 3), DeleteHeader("x-spam-flag", 2), DeleteHeader("X-Spam-Flag", 1),
        DeleteHeader("X-SPAM-Score", 1), DeleteHeader("X-Filterd-Original-Recipients", 1),
    ]  # fmt: skip
    assert forged_header_deletions(["X-Spamish", "Subject"]) == []  # a prefix, not a substring: X-Spam- needs the dash


# --------------------------------------------------------------------------------------------
# Limits, failures, load


@pytest.mark.parametrize("skip", [True, False])
def test_message_over_the_size_limit_is_cut_and_the_rest_skipped(skip):
    rec = Recorder()
    limit = 4096
    body = b"".join(b"line %05d of a long body\r\n" % i for i in range(2000))  # ~52 KB, chunks of 1000
    steps = ALL_STEPS if skip else ALL_STEPS & ~m.SMFIP_SKIP

    async def main():
        async with MilterServer(cfg(max_message_bytes=limit), rec) as server:
            mta = await Mta.open(server)
            await mta.optneg(steps=steps)
            await mta.envelope()
            for name, value in HEADERS:
                await mta.event(m.SMFIC_HEADER, name.encode() + b"\0" + value.encode() + b"\0")
            chunk_replies = []
            for i in range(0, len(body), 1000):
                chunk_replies.append((await mta.event(m.SMFIC_BODY, body[i : i + 1000]))[0])
                if chunk_replies[-1] == m.SMFIR_SKIP:
                    break
            final = await mta.end()
            await mta.close()
            return chunk_replies, final

    chunk_replies, final = run(main())
    (msg,) = rec.messages
    header_bytes = sum(len(line) + 2 for line in msg.header_lines)
    assert msg.truncated and header_bytes + len(msg.body) == limit and body.startswith(msg.body)
    assert final == [(m.SMFIR_ACCEPT, b"")]  # classified on what was kept
    if skip:  # the MTA is told to stop sending body once the limit is reached
        assert chunk_replies[-1] == m.SMFIR_SKIP and len(chunk_replies) == 4
    else:
        assert set(chunk_replies) == {m.SMFIR_CONTINUE} and len(chunk_replies) == -(-len(body) // 1000)
        assert msg.size == header_bytes + len(body)  # all of it was read, and dropped past the limit


def test_client_that_disappears_mid_message_frees_its_session():
    rec = Recorder()

    async def main():
        async with MilterServer(cfg(), rec) as server:
            for cut in ("after-body", "mid-packet"):
                mta = await Mta.open(server)
                await mta.optneg()
                await mta.envelope()
                await mta.event(m.SMFIC_HEADER, b"Subject\0 x\0")
                await mta.event(m.SMFIC_BODY, b"x" * 50000)
                if cut == "mid-packet":
                    mta.writer.write(struct.pack("!I", 60000) + m.SMFIC_BODY + b"y" * 100)
                await mta.writer.drain()
                mta.writer.transport.abort()
            deadline = time.monotonic() + 10
            while server.stats.sessions_open and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert server.stats.sessions_open == 0 and not server._sessions
            assert server.stats.errors["disconnect"] == 2 and server.stats.messages == 0
            # and the server still serves
            mta = await Mta.open(server)
            await mta.optneg()
            await mta.envelope()
            assert await mta.message(HEADERS, BODY) == [(m.SMFIR_ACCEPT, b"")]
            await mta.close()

    run(main())
    assert len(rec.messages) == 1


def test_headers_past_the_limit_are_not_kept_but_forged_ones_still_deleted():
    limit = 1024
    headers = [("Subject", " hi")] + [("X-Filler", " " + "f" * 100)] * 20 + [("X-Spam-Flag", " NO"), ("x-spam-FLAG", " NO")]

    async def tag(msg: MilterMessage) -> MilterReply:
        return MilterReply(Accept(), tuple(msg.forged_header_deletions()))

    rec = Recorder()

    async def recording_tag(msg):
        await rec(msg)
        return await tag(msg)

    replies, _ = run(_transaction(recording_tag, cfg(max_message_bytes=limit), headers=headers, body=b"body\r\n"))
    (msg,) = rec.messages
    # the body gets the room the headers that were not kept left (header padding cannot push it out)
    assert msg.truncated and len(msg.header_names) == 23 and len(msg.header_lines) < 23 and b"body\r\n".startswith(msg.body)
    assert sum(len(line) + 2 for line in msg.header_lines) + len(msg.body) <= limit
    assert replies == [
        (m.SMFIR_CHGHEADER, struct.pack("!I", 2) + _cstr("x-spam-FLAG", "")),
        (m.SMFIR_CHGHEADER, struct.pack("!I", 1) + _cstr("X-Spam-Flag", "")),
        (m.SMFIR_ACCEPT, b""),
    ]


def test_idle_session_is_closed_and_stop_ends_open_sessions():
    async def main():
        server = MilterServer(cfg(idle_timeout=0.2), Recorder())
        await server.start()
        idle = await Mta.open(server)
        await idle.optneg()
        assert await asyncio.wait_for(idle.reader.read(), 10) == b""  # closed by the server
        await server.stop()
        server = MilterServer(cfg(), Recorder())  # the default idle timeout (10m): only stop() can end it
        await server.start()
        busy = await Mta.open(server)
        await busy.optneg()
        await busy.envelope()
        await busy.event(m.SMFIC_BODY, b"x" * 1000)
        await asyncio.wait_for(server.stop(), 10)
        assert server.stats.sessions_open == 0
        assert await asyncio.wait_for(busy.reader.read(), 10) == b""

    run(main())


def test_stop_ends_sessions_that_are_busy_exchanging_messages():
    """stop() while 16 MTA connections keep sending: every session must end (a cancellation lost in
    a race with a completing read once left stop() waiting for ever while clients kept talking)."""
    done = 0

    async def counting(msg: MilterMessage) -> MilterReply:
        nonlocal done
        done += 1
        return MilterReply()

    async def client(server: MilterServer) -> None:
        mta = await Mta.open(server)
        await mta.optneg()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await mta.envelope()
                await mta.message([("Subject", " x")], b"body\r\n")

    async def main():
        server = MilterServer(cfg(), counting)
        await server.start()
        clients = [asyncio.create_task(client(server)) for _ in range(16)]
        while done < 500:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.stop(), 20)
        assert server.stats.sessions_open == 0 and not server._sessions
        await asyncio.wait_for(asyncio.gather(*clients), 20)  # and every client saw its connection end

    run(main())


def test_quit_nc_starts_a_new_connection_on_the_same_socket():
    rec = Recorder()

    async def main():
        async with MilterServer(cfg(), rec) as server:
            mta = await Mta.open(server)
            await mta.optneg()
            await mta.envelope(client="192.0.2.1")
            await mta.message(HEADERS, BODY)
            mta.send(m.SMFIC_QUIT_NC)
            await mta.envelope(client="198.51.100.2", queue_id="NEXT")
            await mta.message(HEADERS, BODY)
            await mta.close()

    run(main())
    assert [(x.client, x.queue_id) for x in rec.messages] == [("192.0.2.1", "4ABCDEF"), ("198.51.100.2", "NEXT")]


async def _slow(msg: MilterMessage) -> MilterReply:
    await asyncio.sleep(30)
    return MilterReply(Reject())


async def _failing(msg: MilterMessage) -> MilterReply:
    raise RuntimeError("classifier exploded")


async def _wrong_type(msg: MilterMessage):
    return "reject"


FORGED = [("Subject", " hi"), ("X-Spam-Flag", " NO"), ("x-spam-flag", " NO"), ("X-Filterd-Checked", " yes")]


@pytest.mark.parametrize("on_message", [_slow, _failing, _wrong_type], ids=["slow", "raises", "wrong-type"])
def test_on_error_accept_still_removes_forged_headers(on_message):
    t0 = time.monotonic()
    replies, server = run(_transaction(on_message, cfg(reply_timeout=0.3, on_error="accept"), headers=FORGED))
    assert time.monotonic() - t0 < 20  # did not wait for the slow decision (30 s)
    assert replies == [
        (m.SMFIR_CHGHEADER, struct.pack("!I", 2) + _cstr("x-spam-flag", "")),
        (m.SMFIR_CHGHEADER, struct.pack("!I", 1) + _cstr("X-Spam-Flag", "")),
        (m.SMFIR_CHGHEADER, struct.pack("!I", 1) + _cstr("X-Filterd-Checked", "")),
        (m.SMFIR_ACCEPT, b""),
    ]
    assert server.stats.errors["timeout" if on_message is _slow else "exception"] == 1


@pytest.mark.parametrize("on_message", [_slow, _failing], ids=["slow", "raises"])
def test_on_error_tempfail(on_message):
    replies, server = run(_transaction(on_message, cfg(reply_timeout=0.3, on_error="tempfail"), headers=FORGED))
    assert replies == [(m.SMFIR_REPLYCODE, _cstr("451 4.3.0 Temporary failure classifying message, try again later"))]
    assert server.stats.verdicts["tempfail"] == 1


def test_protocol_errors_close_only_that_session():
    async def main():
        async with MilterServer(cfg(), Recorder()) as server:
            bad = await Mta.open(server)
            bad.writer.write(struct.pack("!I", 0x7FFFFFFF) + b"B")  # a 2 GiB packet: never buffered
            assert await bad.reader.read() == b""  # closed by the server
            early = await Mta.open(server)
            early.send(m.SMFIC_MAIL, b"<a@b>\0")  # before option negotiation
            assert await early.reader.read() == b""
            good = await Mta.open(server)
            await good.optneg()
            await good.envelope()
            assert await good.message(HEADERS, BODY) == [(m.SMFIR_ACCEPT, b"")]
            await good.close()
            assert server.stats.errors["protocol"] == 2

    run(main())


def test_200_concurrent_sessions_are_answered_each_with_its_own_reply():
    n = 200
    arrived = 0
    all_in = asyncio.Event()

    async def on_message(msg: MilterMessage) -> MilterReply:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_in.set()
        await all_in.wait()  # every session is mid-message at the same time
        return MilterReply(Accept(), (AddHeader("X-Echo", msg.queue_id),))

    async def one(server: MilterServer, i: int) -> list:
        mta = await Mta.open(server)
        await mta.optneg()
        await mta.envelope(queue_id=f"Q{i:04d}")
        replies = await mta.message([("Subject", f" message {i}")], b"body %d\r\n" % i)
        await mta.close()
        return replies

    async def main():
        nonlocal all_in
        all_in = asyncio.Event()
        async with MilterServer(cfg(), on_message) as server:
            results = await asyncio.gather(*(one(server, i) for i in range(n)))
            return results, server.stats

    results, stats = run(main())
    for i, replies in enumerate(results):
        assert replies == [(m.SMFIR_ADDHEADER, _cstr("X-Echo", f" Q{i:04d}")), (m.SMFIR_ACCEPT, b"")]
    assert stats.sessions_total == n and stats.messages == n and stats.sessions_open == 0


def test_unix_socket_listener(tmp_path):
    path = tmp_path / "milter.sock"
    path.touch()  # a stale non-socket file is not removed
    with pytest.raises(OSError, match="not a socket"):
        run(MilterServer(cfg(listen=UnixSocket(path)), Recorder()).start())
    path.unlink()

    async def main():
        server = MilterServer(cfg(listen=UnixSocket(path), socket_mode="0600"), Recorder())
        await server.start()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        mta = await Mta.open(server)
        await mta.optneg()
        await mta.envelope()
        assert await mta.message(HEADERS, BODY) == [(m.SMFIR_ACCEPT, b"")]
        await mta.close()
        await server.stop()
        assert not path.exists()

    run(main())


def test_listen_address_in_use_is_a_one_line_error():
    async def main():
        config = cfg()
        async with MilterServer(config, Recorder()):
            with pytest.raises(OSError, match=rf"milter: cannot listen on {config.listen}"):
                await MilterServer(config, Recorder()).start()

    run(main())


# --------------------------------------------------------------------------------------------
# Configuration


def test_milter_config_defaults_and_forms():
    c = load_config(None).milter
    assert (c.enabled, c.listen, c.on_error, c.max_message_bytes) == (False, HostPort("127.0.0.1", 11332), "accept", 1048576)
    assert parse_listen("unix:/run/filterd/milter.sock") == UnixSocket(Path("/run/filterd/milter.sock"))
    assert parse_listen("inet:127.0.0.1:11332") == HostPort("127.0.0.1", 11332)  # Postfix's spelling works too
    c = load_config(None, ["milter.listen=unix:/run/filterd/m.sock", "milter.reply_timeout=20s"]).milter
    assert str(c.listen) == "unix:/run/filterd/m.sock" and c.reply_timeout == 20.0
    assert 'listen = "unix:/run/filterd/m.sock"' in load_config(None, ["milter.listen=unix:/run/filterd/m.sock"]).to_toml()


@pytest.mark.parametrize(
    "override, message",
    [
        ("milter.listen=unix:relative.sock", "[milter] listen: must be host:port or unix:/path (a unix socket needs an absolute path"),
        ("milter.listen=11332", "[milter] listen: must be host:port or unix:/path (missing :port)"),
        ("milter.on_error=reject", "[milter] on_error: must be one of accept, tempfail"),
        ("milter.max_message_bytes=10", "[milter] max_message_bytes: must be an integer >= 1024"),
        ("milter.socket_mode=rw", "[milter] socket_mode: must be an octal file mode"),
        ("milter.reply_timeout=0", "[milter] reply_timeout: must be a duration > 0"),
    ],
)
def test_milter_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_milter_listen_clash_and_warning():
    with pytest.raises(ConfigError, match=r"\[milter\] listen: 127.0.0.1:9464 is also \[metrics\] listen"):
        check_config(None, ["milter.enabled=true", "milter.listen=127.0.0.1:9464"])
    check_config(None, ["milter.listen=127.0.0.1:9464"])  # disabled: no clash
    warnings = load_config(None, ["milter.enabled=true", "milter.listen=0.0.0.0:11332"]).warnings()
    assert any(w.startswith('[milter] listen = "0.0.0.0:11332" is not a loopback address') for w in warnings)
    assert not load_config(None, ["milter.enabled=true"]).warnings()
    warnings = load_config(None, ["milter.enabled=true", "milter.reply_timeout=5m"]).warnings()
    assert any(w.startswith("[milter] reply_timeout = 5m is not below Postfix's milter_content_timeout") for w in warnings)


# --------------------------------------------------------------------------------------------
# A real Postfix with deploy/postfix/milter.main.cf


class ThreadedMilter:
    """MilterServer on its own event loop in a thread, for tests that drive a blocking MTA."""

    def __init__(self, config: MilterConfig, on_message) -> None:
        self.server = MilterServer(config, on_message)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ThreadedMilter":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


SEEN: list[MilterMessage] = []


async def marker_policy(msg: MilterMessage) -> MilterReply:
    """Reject / tempfail / discard / quarantine / subject on a body marker; tag everything."""
    SEEN.append(msg)
    body = msg.body
    if b"REJECTME" in body:
        return MilterReply(Reject(550, "5.7.1", "Spam refused by filterd (test)"))
    if b"TEMPFAILME" in body:
        return MilterReply(Tempfail(451, "4.7.1", "Try again later (test)"))
    if b"DISCARDME" in body:
        return MilterReply(Discard())
    mods: list = [*msg.forged_header_deletions(), AddHeader("X-Spam-Flag", "NO"), AddHeader("X-Spam-Score", "0.0100")]
    if b"QUARANTINEME" in body:
        mods.append(Quarantine("filterd test"))
    if b"SUBJECTME" in body:
        mods.append(ChangeSubject("[SPAM] hello"))
    return MilterReply(Accept(), tuple(mods))


FORGED_MAIL = (
    "From: Alice <alice@example.org>\r\n"
    "To: bob@example.net\r\n"
    "Subject: hello\r\n"
    "Message-ID: <{mid}@filterd.test>\r\n"
    "X-Spam-Flag: YES\r\n"
    "x-spam-flag: YES\r\n"
    "X-Spam-Status: Yes,\r\n"
    "\tscore=9.9 forged\r\n"
    "X-FILTERD-Original-Recipients: mallory@example.com\r\n"
    "\r\n"
    "Hello Bob, {marker}\r\n"
    "second line\r\n"
)


def smtp_send(port: int, raw: bytes, rcpt: str = "bob@example.net") -> tuple[int, bytes]:
    """The first refusal, or the final reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("client.filterd.test")
        code, reply = c.mail("alice@example.org")
        if code != 250:
            return code, reply
        code, reply = c.rcpt(rcpt)
        if code not in (250, 251):
            return code, reply
        try:
            return c.data(raw)
        except smtplib.SMTPDataError as e:  # refused at DATA itself (before the content)
            return e.smtp_code, e.smtp_error


def wait_log(postfix, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (log := postfix.maillog.read_text(errors="replace") if postfix.maillog.exists() else ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the Postfix log within {timeout}s:\n{postfix.log_tail()}")
        time.sleep(0.05)
    return log


def by_message_id(sink, mid: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        for r in sink.messages:
            if f"<{mid}@filterd.test>".encode() in r.data:
                return r
        if time.monotonic() > deadline:
            raise AssertionError(f"message {mid} not delivered within {timeout}s")
        time.sleep(0.05)


needs_postfix = pytest.mark.skipif(not postfix_available(), reason="needs postfix installed and root")


@pytest.fixture(scope="module")
def milter_postfix(tmp_path_factory):
    """Postfix (milter mode, the shipped snippet) -> filterd's milter with marker_policy; deliveries to a sink."""
    if not postfix_available():
        pytest.skip("needs postfix installed and root")
    port = free_port()
    with SmtpSink() as sink, ThreadedMilter(cfg(listen=HostPort("127.0.0.1", port)), marker_policy) as milter:
        postfix = PostfixServer(tmp_path_factory.mktemp("pf") / "postfix", relay_port=sink.port, content_filter=False, milter_port=port)
        with postfix:
            yield postfix, sink, milter


def _mail(mid: str, marker: str) -> bytes:
    return FORGED_MAIL.format(mid=mid, marker=marker).encode()


@needs_postfix
def test_postfix_loads_the_shipped_snippet(milter_postfix):
    postfix, _, milter = milter_postfix
    value = postfix._cmd("postconf", "-h", "smtpd_milters").stdout
    assert f"inet:127.0.0.1:{milter.server.cfg.listen.port}" in value and "default_action=accept" in value
    assert "content_timeout=300s" in postfix._cmd("postconf", "-h", "non_smtpd_milters").stdout


@needs_postfix
def test_postfix_reject_is_a_550_at_end_of_data_and_nothing_is_queued(milter_postfix):
    postfix, sink, _ = milter_postfix
    code, reply = smtp_send(postfix.smtpd_port, _mail("reject1", "REJECTME"))
    assert code == 550 and reply.startswith(b"5.7.1 Spam refused by filterd (test)"), (code, reply)
    log = wait_log(postfix, "milter-reject: END-OF-MESSAGE")
    assert "5.7.1 Spam refused by filterd (test)" in log
    assert postfix.queue() == []
    assert not any(b"reject1@" in r.data for r in sink.messages)


@needs_postfix
def test_postfix_tagged_message_is_delivered_without_forged_headers(milter_postfix):
    postfix, sink, milter = milter_postfix
    code, reply = smtp_send(postfix.smtpd_port, _mail("tag1", "SUBJECTME"))
    assert code == 250, (code, reply)
    raw = by_message_id(sink, "tag1").data
    assert b"\r\nX-Spam-Flag: NO\r\n" in raw and b"\r\nSubject: [SPAM] hello\r\n" in raw  # one space after the colon
    delivered = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert delivered.get_all("X-Spam-Flag") == ["NO"]  # ours; both forged YES (any casing) are gone
    assert delivered.get_all("X-Spam-Score") == ["0.0100"]
    assert delivered.get_all("X-Spam-Status") is None  # the folded forged one too
    assert delivered.get_all("X-Filterd-Original-Recipients") is None
    assert delivered.get_all("Subject") == ["[SPAM] hello"]
    assert delivered.get_payload() == "Hello Bob, SUBJECTME\r\nsecond line\r\n"  # the body is untouched
    (seen,) = [s for s in SEEN if b"tag1@" in s.raw()]
    assert seen.queue_id == reply.decode().rsplit(" ", 1)[-1]  # Postfix's queue id, from the "i" macro
    assert (seen.sender, seen.recipients, seen.client) == ("alice@example.org", ["bob@example.net"], "127.0.0.1")
    assert seen.header_names[:3] == ["From", "To", "Subject"]  # Postfix's own Received: is not shown to milters


@needs_postfix
def test_postfix_quarantine_puts_the_message_on_hold(milter_postfix):
    postfix, sink, _ = milter_postfix
    code, reply = smtp_send(postfix.smtpd_port, _mail("hold1", "QUARANTINEME"))
    assert code == 250, (code, reply)
    qid = reply.decode().rsplit(" ", 1)[-1]
    queue = postfix.wait_queue(lambda q: any(e["queue_id"] == qid for e in q))
    (held,) = [e for e in queue if e["queue_id"] == qid]
    assert held["queue_name"] == "hold"
    postfix._cmd("postsuper", "-d", qid, "hold")  # leave the queue empty for the other tests


@needs_postfix
def test_postfix_discard_and_tempfail(milter_postfix):
    postfix, sink, _ = milter_postfix
    code, reply = smtp_send(postfix.smtpd_port, _mail("discard1", "DISCARDME"))
    assert code == 250, (code, reply)  # the client is told it was taken
    wait_log(postfix, "milter-discard: END-OF-MESSAGE")
    code, reply = smtp_send(postfix.smtpd_port, _mail("tempfail1", "TEMPFAILME"))
    assert code == 451 and reply.startswith(b"4.7.1 Try again later (test)"), (code, reply)
    code, _ = smtp_send(postfix.smtpd_port, _mail("after1", "plain"))  # a later message still flows
    assert code == 250
    by_message_id(sink, "after1")
    assert not any(b"discard1@" in r.data or b"tempfail1@" in r.data for r in sink.messages)
    assert postfix.queue() == []


@needs_postfix
@pytest.mark.parametrize("default_action", [None, "tempfail"], ids=["shipped-accept", "tempfail"])
def test_postfix_with_the_milter_down(tmp_path, default_action):
    """No milter listening: the shipped snippet fails open; default_action = tempfail defers instead."""
    with SmtpSink() as sink:
        postfix = PostfixServer(tmp_path / "postfix", relay_port=sink.port, content_filter=False,
                                milter_port=free_port(), milter_default_action=default_action)  # fmt: skip
        with postfix:
            code, reply = smtp_send(postfix.smtpd_port, _mail("down1", "plain"))
            if default_action is None:
                assert code == 250, (code, reply)
                delivered = by_message_id(sink, "down1")
                assert b"X-Spam-Score" not in delivered.data  # delivered untagged: nobody classified it
            else:
                assert 400 <= code < 500 and b"4.7.1" in reply, (code, reply)
                assert postfix.queue() == [] and sink.messages == []


# --------------------------------------------------------------------------------------------
# The door's headers ([headers]), request latency, and the session cap


def test_door_writes_spamassassin_fields_renames_upstream_ones_and_times_the_request():
    from types import SimpleNamespace

    from filterd import __version__
    from filterd.config import HeadersConfig
    from filterd.doors.milter import MilterDoor
    from filterd.obs.metrics import FilterdMetrics

    async def score(text: str) -> SimpleNamespace:
        return SimpleNamespace(score=0.73, model="stub-1", threshold=0.5)

    metrics = FilterdMetrics()
    headers = HeadersConfig(style="spamassassin", keep_upstream=True)
    door = MilterDoor(cfg(), MessagePath.of(score, metrics=metrics), "[SPAM] ", metrics, headers=headers)
    incoming = [("Subject", " hi"), ("X-Spam-Status", " Yes, score=12.1 required=5.0\n\ttests=BAYES_99"),
                ("x-spam-flag", " YES"), ("X-Filterd-Checked", " yes")]  # fmt: skip
    replies, _ = run(_transaction(door.on_message, headers=incoming))
    deletions = [(m.SMFIR_CHGHEADER, struct.pack("!I", d.index) + _cstr(d.name, ""))
                 for d in forged_header_deletions([n for n, _ in incoming])]  # fmt: skip
    assert len(deletions) == 3
    assert replies == deletions + [
        (m.SMFIR_ADDHEADER, _cstr("X-Upstream-Spam-Status", " Yes, score=12.1 required=5.0\ttests=BAYES_99")),  # unfolded
        (m.SMFIR_ADDHEADER, _cstr("X-Upstream-spam-flag", " YES")),
        (m.SMFIR_ADDHEADER, _cstr("X-Spam-Flag", " YES")),
        (m.SMFIR_ADDHEADER, _cstr("X-Spam-Score", " 7.3")),
        (m.SMFIR_ADDHEADER, _cstr("X-Spam-Level", " *******")),
        (m.SMFIR_ADDHEADER, _cstr("X-Spam-Status", f" Yes, score=7.3 required=5.0 tests=FILTERD_GPT2 autolearn=no "
                                                   f"version=filterd-{__version__} model=stub-1")),  # fmt: skip
        (m.SMFIR_ACCEPT, b""),
    ]
    # end of message to reply, once per message
    assert metrics.registry.get_sample_value("filterd_request_seconds_count", {"source": "milter"}) == 1
    # the default: forged ones deleted, nothing renamed, filterd's own format
    door = MilterDoor(cfg(), MessagePath.of(score, metrics=metrics), "[SPAM] ", metrics)
    replies, _ = run(_transaction(door.on_message, headers=incoming))
    assert replies[:3] == deletions and [r[1].split(b"\0")[0] for r in replies[3:-1]] == [b"X-Spam-Flag", b"X-Spam-Score", b"X-Spam-Status"]
    assert metrics.registry.get_sample_value("filterd_request_seconds_count", {"source": "milter"}) == 2


async def _closed(mta: Mta) -> bool:
    """The server hung up (a reset counts: it closed without reading what we sent)."""
    try:
        return await asyncio.wait_for(mta.reader.read(), 10) == b""
    except ConnectionResetError:
        return True


def test_sessions_over_max_sessions_are_closed_at_once_and_the_others_are_served():
    async def main():
        async with MilterServer(cfg(max_sessions=2), Recorder()) as server:
            a, b = await Mta.open(server), await Mta.open(server)
            await a.optneg()
            await b.optneg()
            over = await Mta.open(server)
            over.send(m.SMFIC_OPTNEG, struct.pack("!III", 6, ALL_ACTIONS, ALL_STEPS))
            assert await _closed(over)  # no negotiation: Postfix applies default_action at once
            assert server.stats.errors["over-capacity"] == 1
            await a.envelope()
            assert await a.message(HEADERS, BODY) == [(m.SMFIR_ACCEPT, b"")]  # the sessions in are untouched
            b.send(m.SMFIC_QUIT)
            await b.close()
            deadline = time.monotonic() + 10
            while server.stats.sessions_open > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            again = await Mta.open(server)  # a freed place is taken again
            await again.optneg()
            await again.envelope()
            assert await again.message(HEADERS, BODY) == [(m.SMFIR_ACCEPT, b"")]
            await again.close()
            await a.close()
            assert server.stats.errors["over-capacity"] == 1 and server.stats.sessions_total == 3

    run(main())


def test_max_sessions_config():
    assert load_config(None, []).milter.max_sessions == 256
    assert load_config(None, ["milter.max_sessions=2"]).milter.max_sessions == 2
    with pytest.raises(ConfigError, match=r"\[milter\] max_sessions"):
        load_config(None, ["milter.max_sessions=0"])


@needs_postfix
def test_postfix_over_max_sessions_does_not_hang_and_applies_default_action(tmp_path):
    """One milter session allowed and held by a slow decision: a second SMTP session through Postfix
    is delivered at once, untagged (the shipped default_action = accept), not left waiting."""
    release = threading.Event()

    async def holding(msg: MilterMessage) -> MilterReply:
        if b"HOLDME" in msg.body:
            await asyncio.to_thread(release.wait, 60)
        return MilterReply(Accept(), (AddHeader("X-Spam-Score", "0.0100"),))

    port = free_port()
    with SmtpSink() as sink, ThreadedMilter(cfg(listen=HostPort("127.0.0.1", port), max_sessions=1), holding) as milter:
        postfix = PostfixServer(tmp_path / "postfix", relay_port=sink.port, content_filter=False, milter_port=port)
        with postfix:
            held: list = []
            first = threading.Thread(target=lambda: held.append(smtp_send(postfix.smtpd_port, _mail("cap1", "HOLDME"))))
            first.start()
            try:
                deadline = time.monotonic() + 30
                while milter.server.stats.sessions_open < 1 or not milter.server._sessions or not any(
                        s.msg.body for s in milter.server._sessions.values()):  # fmt: skip
                    assert time.monotonic() < deadline, postfix.log_tail()
                    time.sleep(0.05)
                t0 = time.monotonic()
                code, reply = smtp_send(postfix.smtpd_port, _mail("cap2", "plain"))
                assert code == 250, (code, reply)
                assert time.monotonic() - t0 < 20  # not Postfix's 30 s command timeout: refused at once
                assert b"X-Spam-Score" not in by_message_id(sink, "cap2").data  # nobody classified it
                assert milter.server.stats.errors["over-capacity"] >= 1
            finally:
                release.set()
                first.join(60)
            assert held and held[0][0] == 250
            assert b"X-Spam-Score: 0.0100" in by_message_id(sink, "cap1").data
