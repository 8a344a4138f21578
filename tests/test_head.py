"""filterd.mail.head reads Subject and Message-ID as the compat32 header parser does, on any input."""

from __future__ import annotations

import email.parser
import email.policy
import random

import pytest

from filterd.mail.head import _PLAIN_BLOCK, first_fields, head_of
from testing.corpus import CORPUS, wire

NAMES = ("subject", "message-id")
LINES = [
    b"Subject: hello world", b"SUBJECT:  spaced\t out ", b"subject:", b"Subject : not the subject field", b"Message-ID: <a@b>",
    b"message-id:<c@d>", b"Received: from x by y", b" folded continuation", b"\tanother fold", b"X-Long: " + b"v" * 300,
    b"From someone@example Mon Jan  1", b": empty name", b"not a header line", b"Subject: caf\xc3\xa9", b"Subject: lone\rcr",
    b"", b"X-\x01: control", b"Subject: =?utf-8?q?encoded?=", b"Message-ID: <e@f>\x00",
]


def parser_fields(raw: bytes, limit: int) -> dict[str, str]:
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:limit])
    return {n: " ".join(v.split()) for n in NAMES if isinstance(v := msg.get(n), str)}


def test_generated_header_blocks_read_as_the_parser_reads_them() -> None:
    rng = random.Random(11)
    plain = 0
    for _ in range(4000):
        lines = [rng.choice(LINES) for _ in range(rng.randint(0, 12))]
        raw = rng.choice([b"\r\n", b"\n"]).join(lines) + rng.choice([b"", b"\r\n", b"\r\n\r\nbody\r\nSubject: no\r\n"])
        limit = rng.choice([65536, 40])
        plain += bool(_PLAIN_BLOCK.match(head_of(raw, limit)))
        assert first_fields(raw, NAMES, limit) == parser_fields(raw, limit), raw
    assert plain > 400  # the fast path itself was exercised, not only the fallback


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the SpamAssassin corpus is not here")
def test_corpus_mail_reads_as_the_parser_reads_it() -> None:
    files = sorted(p for p in (CORPUS / "spam_2").iterdir() if p.is_file())[:400] + sorted((CORPUS / "easy_ham").iterdir())[:400]
    for path in files:
        raw = wire(path.read_bytes())
        assert first_fields(raw, NAMES, 65536) == parser_fields(raw, 65536), path


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: a\r\nMessage-ID: <x@y>\r\n\r\nbody\r\nSubject: no\r\n",
        b"Subject: a\n folded\nX: 1\n\nbody: not a field\n",
        b"Subject: a\rX: b\r\rSubject: c\r",  # lone CRs: nothing cut
        b"Subject: a\r\nnot a header line\r\nX: 1\r\n\r\n",
        b"From someone\r\nSubject: mbox\r\n\r\n",
        b"Subject: only headers",
        b"\r\nSubject: body only\r\n",
        b"",
    ],
)
def test_head_of_is_all_a_header_parser_reads(raw: bytes) -> None:
    def fields(data: bytes) -> list[tuple[str, str]]:
        return [(k, str(v)) for k, v in email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data).items()]

    assert fields(head_of(raw, 65536)) == fields(raw)
    assert len(head_of(raw * 100, 40)) <= 40
