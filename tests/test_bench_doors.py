"""bench/doors.py's helpers: the bytes every door is sent, and the milter replies read back per message."""

from __future__ import annotations

import asyncio

from testing.corpus import wire
from bench.doors import agreement, milter_added_headers, PathRun
from bench.milter_protocol import run_sessions
from filterd.config import HostPort, MilterConfig
from filterd.doors.milter import Accept, AddHeader, MilterMessage, MilterReply, MilterServer
from testing.milter_mta import Mta
from testing.services import free_port


def test_wire_drops_only_a_leading_from_line_and_makes_crlf():
    raw = b"From someone@example.org  Mon Jan  1 00:00:00 2002\nSubject: hi\n\nFrom here on\r\nbody\n"
    assert wire(raw) == b"Subject: hi\r\n\r\nFrom here on\r\nbody\r\n"
    assert wire(wire(raw)) == wire(raw)  # CRLF stays CRLF, never CRCRLF


def test_run_sessions_returns_each_messages_replies_in_input_order():
    # Each message's reply names the message (from its body): with 3 connections taking messages
    # as they free up, replies must still come back at the index of the message they answer.
    async def answer(msg: MilterMessage) -> MilterReply:
        i = int(msg.body.split()[1])
        await asyncio.sleep(0.002 * (i % 3))  # finish out of order
        return MilterReply(Accept(), (AddHeader("X-Spam-Score", f"0.{i:04d}"),))

    async def go() -> tuple[list, list[float]]:
        cfg = MilterConfig(enabled=True, listen=HostPort("127.0.0.1", free_port()))
        async with MilterServer(cfg, answer) as server:
            raws = [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(20)]
            replies, lat, _ = await run_sessions(lambda: Mta.open(server), raws, 3)
            return replies, lat

    replies, lat = asyncio.run(go())
    assert [milter_added_headers(r) for r in replies] == [[("X-Spam-Score", f"0.{i:04d}")] for i in range(20)]
    assert all(r[-1][0] == b"a" for r in replies) and all(x > 0 for x in lat)


def test_agreement_counts_verdict_flips_and_skips_missing():
    a = PathRun("a", [0.1, 0.49, 0.9, None], [], [], 1.0)
    b = PathRun("b", [0.1, 0.51, 0.9, 0.2], [], [], 1.0)
    none = PathRun("postfix-only", [None] * 4, [], [], 1.0)
    out = agreement([a, b, none], 0.5)
    assert list(out) == ["a vs b"]  # a path without scores is left out
    assert out["a vs b"]["messages"] == 3 and out["a vs b"]["verdicts_differ"] == 1
    assert abs(out["a vs b"]["max_abs_diff"] - 0.02) < 1e-12
