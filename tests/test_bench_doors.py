"""bench/doors.py's helpers: the bytes every door is sent, and the milter replies read back per message."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import urllib.request

import pytest

from testing.corpus import wire
from bench.doors import agreement, milter_added_headers, PathRun, rspamd_path
from testing.rspamd import INSTALL_HINT, RspamdServer, rspamd_available
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


needs_rspamd = pytest.mark.skipif(not rspamd_available(), reason=f"rspamd/rspamc not installed: {INSTALL_HINT}")
SPAMMY = "cheap pills viagra casino winner prize claim offer free money credit loan guaranteed bonus cash".split()
HAMMY = "meeting agenda kernel patch review build release notes thanks regards tomorrow branch commit merge".split()


def mails(kind: str, n: int, seed: int) -> list[bytes]:
    """n distinct messages of one vocabulary, long enough (40 words) for Rspamd's Bayes to learn."""
    rng, words = random.Random(seed), SPAMMY if kind == "spam" else HAMMY
    return [
        wire(
            f"From: a{i}@{kind}.example\nTo: b@example.net\nSubject: {' '.join(rng.choices(words, k=4))}\n"
            f"Message-ID: <{kind}{seed}.{i}@example.org>\nDate: Mon, 7 Dec 2026 10:00:00 +0000\n\n"
            f"{' '.join(rng.choices(words, k=40))}\n".encode()
        )  # fmt: skip
        for i in range(n)
    ]


@needs_rspamd
@pytest.mark.parametrize("name", ["rspamd", "rspamd+bayes"])
def test_rspamd_path_answers_every_message(name, tmp_path):
    # 5 spam and 5 ham through a private Rspamd over HTTP, then rspamc: a reply and a score for
    # each; with Bayes learned on the same two vocabularies, spam scores above ham.
    raws = mails("spam", 5, seed=1) + mails("ham", 5, seed=2)
    learn = (mails("spam", 12, seed=3), mails("ham", 12, seed=4)) if name == "rspamd+bayes" else None
    run = rspamd_path(name, raws, 4, tmp_path, learn)
    assert len(run.replies) == 10 and all(r.startswith("200 ") for r in run.replies), run.replies
    assert all(s is not None for s in run.scores) and len(run.latency_s) == 10
    assert run.spam_score == run.extra["rspamd_actions"]["add header"]  # greylist is off
    assert run.extra["action_vs_score_differ"] == 0
    assert run.extra["rspamc"]["results"] == 10 and run.extra["rspamc"]["verdicts_differ_from_http_client"] == 0
    assert run.cpu_s["rspamd"] > 0 and run.cpu_s["filterd"] == 0
    if name == "rspamd+bayes":
        lr = run.extra["learn"]
        assert (lr["learned_spam"], lr["learned_ham"]) == (12, 12), lr
        assert min(run.scores[:5]) > max(run.scores[5:]) + 2, run.scores  # BAYES_SPAM / BAYES_HAM voted
    else:
        assert "learn" not in run.extra


class DnsListener:
    """A UDP socket on a loopback port that only records the names asked (it never answers)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.names: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            labels, i = [], 12  # after the header: the question's name, length-prefixed labels
            while i < len(data) and data[i]:
                labels.append(data[i + 1 : i + 1 + data[i]].decode(errors="replace"))
                i += 1 + data[i]
            self.names.append(".".join(labels))

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def ask_rspamd_about_a_phish(rs: RspamdServer) -> dict:
    """A message the stock configuration checks against DNS: the client's IP on RBLs, the sender's
    SPF, DMARC and DKIM records, the HELO name, its URLs and addresses on URIBLs."""
    raw = wire(b"From: Bank <alerts@paypal.example.com>\nTo: you@example.net\nSubject: verify\n"
               b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=x; b=y\n"
               b"Message-ID: <1@example.com>\n\nPlease log in at http://login.example.org/verify and "
               b"http://198.51.100.7/x or mail abuse@example.org\n")  # fmt: skip
    headers = {"IP": "203.0.113.9", "Helo": "mx.example.com", "Hostname": "mx.example.com", "From": "alerts@paypal.example.com",
               "Rcpt": "you@example.net"}  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{rs.normal_port}/checkv2", data=raw, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@needs_rspamd
def test_private_rspamd_looks_nothing_up():
    # Rspamd's resolver is pointed at a listener: with our configuration it hears no query while Rspamd
    # starts and scans. (With testing.rspamd.NETWORK_MODULES emptied, the stock modules send it ~40
    # queries: the listener does see them, so this check can fail.)
    dns = DnsListener()
    try:
        with RspamdServer(nameserver=dns.address) as rs:
            reply = ask_rspamd_about_a_phish(rs)
            log = rs.log.read_text(errors="replace")
    finally:
        dns.close()
    assert reply["action"] and len(re.findall(r"dns req: (\d+)", log)) == 1
    assert dns.names == [] and re.findall(r"dns req: (\d+)", log) == ["0"]
    assert "maps.rspamd.com" not in log and "address resolution" not in log
