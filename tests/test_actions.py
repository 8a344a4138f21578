"""filterd.mail.headers: what is relayed, to whom, with which reply, on real SpamAssassin mail.

The invariant everywhere: the relayed bytes are our prepended fields followed by the original
message minus its X-Spam-* header fields, byte for byte. `expected_rest` states that the simple
way (line by line) so the module is not checked against itself, and the email package, the
reader downstream tools use, must see exactly one of each of our fields.

Corpus examples are fixed file numbers; `test_examples_are_what_they_claim` asserts each premise
first, so a changed corpus fails loudly rather than testing nothing.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from email.message import EmailMessage
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

from filterd import __version__
from filterd.mail.headers import Outcome, Policy, apply, strip_spam_headers, upstream_name
from filterd.mail.spam_fields import DEFAULT_HEADERS, decision_fields, sa_score
from filterd.config import HeadersConfig, SmtpConfig, load_config
from filterd.policy.decision import Decision, scaled_score
from filterd.errors import ConfigError
from filterd.mail.text import extract_text


@dataclass(frozen=True)
class Classification:
    """A single-level verdict, for the rules below: spam gets the policy's one action, ham passes."""

    verdict: str  # "spam" | "ham"
    score: float  # P(spam)
    threshold: float
    model: str


def decide(raw: bytes, recipients: Sequence[str], c: Classification | None, policy: Policy, error: str = "") -> Outcome:
    d = None if c is None else Decision(c.verdict, policy.action if c.verdict == "spam" else "pass", c.score, (), c.threshold)
    return apply(raw, recipients, d, c.model if c else "", policy, error)


def spam_headers(c: Classification | None) -> list[tuple[str, str]]:
    d = None if c is None else Decision(c.verdict, "", c.score, (), c.threshold)
    return decision_fields(d, c.model if c else "", "")


def header_fields(d: Decision | None, model: str, error: str = "", headers: HeadersConfig = DEFAULT_HEADERS,
                  report: str = "") -> list[tuple[str, str]]:  # fmt: skip
    return decision_fields(d, model, error, headers, report)

FOLDERS = ("easy_ham", "easy_ham_2", "hard_ham", "spam", "spam_2")
SPAM = Classification("spam", 0.98712, 0.5, "gpt2-20240101-abc")
HAM = Classification("ham", 0.01234, 0.5, "gpt2-20240101-abc")
RCPTS = ("alice@example.net", "bob@example.org")

EXAMPLES = {  # name: corpus file, checked by test_examples_are_what_they_claim
    "multipart": "spam/00024",  # multipart/alternative, text/plain + text/html
    "html-only": "spam/00001",  # a single text/html part
    "koi8-r": "spam/00089",  # text/plain; charset="koi8-r"
    "korean-8bit-headers": "spam/00035",  # ks_c_5601-1987 HTML, raw 8-bit bytes in From: and Subject:
    "gb2312": "spam/00500",  # 8-bit GB2312 HTML body
    "broken-boundary": "spam/00467",  # boundary="=Multipart Boundary ..." but the parts use "--= Multipart ..."
    "no-close-boundary": "spam/00022",  # multipart/mixed whose closing boundary is missing
    "encoded-subject": "spam/00252",  # Subject: =?big5?Q?...?=
    "own-x-spam-level": "spam_2/00752",  # arrives with an (empty) X-Spam-Level field of its own
    "no-from-line": "easy_ham/01416",  # starts with a header, no mbox From_ line
    "no-subject": "hard_ham/00175",
}


@pytest.fixture(scope="module")
def corpus(spamassassin_dir: Path) -> Path:
    if not all((spamassassin_dir / folder).is_dir() for folder in FOLDERS):
        pytest.skip(f"SpamAssassin corpus not found under {spamassassin_dir}")
    return spamassassin_dir


def message(corpus: Path, name: str, eol: bytes = b"\n") -> bytes:
    """Corpus message "folder/NNNNN" (LF on disk), with CRLF line endings if asked."""
    folder, number = name.split("/")
    (path,) = (corpus / folder).glob(f"{number}.*")
    raw = path.read_bytes()
    return raw.replace(b"\n", b"\r\n") if eol == b"\r\n" else raw


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def header_and_body(raw: bytes) -> tuple[bytes, bytes]:
    eol = b"\r\n" if b"\r\n" in raw[:200] else b"\n"
    head, sep, body = raw.partition(eol + eol)
    return head + eol, eol + body if sep else b""


def expected_rest(raw: bytes) -> bytes:
    """The contract for ordinary mail, line by line: the message minus header fields named X-Spam-*."""
    out, dropping, in_header = [], False, True
    for line in raw.splitlines(keepends=True):
        if in_header and line[:1] in (b" ", b"\t"):
            pass  # a continuation line goes wherever its field goes
        elif in_header and re.match(rb"[!-9;-~]+:", line):
            dropping = line.lower().startswith(b"x-spam-")
        elif in_header and line.startswith(b"From "):
            dropping = False
        else:
            in_header = dropping = False  # the blank line, or the first body line
        if not dropping:
            out.append(line)
    return b"".join(out)


def ours(c: Classification | None, eol: bytes) -> bytes:
    return b"".join(f"{k}: {v}".encode() + eol for k, v in spam_headers(c))


def assert_tagged(out: Outcome, raw: bytes, c: Classification = SPAM) -> EmailMessage:
    """Relayed, byte-exact after our fields, and the email package sees each of ours exactly once."""
    eol = b"\r\n" if raw.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    assert out.relay
    assert out.data == ours(c, eol) + expected_rest(raw)
    msg = parse(out.data)
    flag = "YES" if c.verdict == "spam" else "NO"
    assert msg.get_all("X-Spam-Flag") == [flag]
    assert msg.get_all("X-Spam-Score") == [f"{c.score:.4f}"]
    assert msg.get_all("X-Spam-Status") == [
        f"{flag.capitalize()}, score={c.score:.4f} threshold={c.threshold:.4f} model={c.model}"
    ]
    return msg


def original_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields the email package reads from the original, minus X-Spam-*."""
    return [(k, v) for k, v in parse(raw).raw_items() if not k.lower().startswith("x-spam-")]


# --- the corpus examples ------------------------------------------------------------


def test_examples_are_what_they_claim(corpus: Path) -> None:
    ex = {name: message(corpus, path) for name, path in EXAMPLES.items()}
    compat = {name: email.message_from_bytes(raw) for name, raw in ex.items()}
    assert compat["multipart"].get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in compat["multipart"].get_payload()] == ["text/plain", "text/html"]
    assert compat["html-only"].get_content_type() == "text/html" and not compat["html-only"].is_multipart()
    assert compat["koi8-r"].get_content_charset() == "koi8-r"
    head, _ = header_and_body(ex["korean-8bit-headers"])
    assert compat["korean-8bit-headers"].get_content_charset() == "ks_c_5601-1987"
    assert re.search(rb"^Subject: [^\n]*[\x80-\xff]", head, re.M) and re.search(rb"^From: [^\n]*[\x80-\xff]", head, re.M)
    assert compat["gb2312"].get_content_charset() == "gb2312" and re.search(rb"[\x80-\xff]", ex["gb2312"])
    defects = lambda m: {type(d).__name__ for part in m.walk() for d in part.defects}  # noqa: E731
    assert "StartBoundaryNotFoundDefect" in defects(compat["broken-boundary"])
    assert "CloseBoundaryNotFoundDefect" in defects(compat["no-close-boundary"])
    assert compat["encoded-subject"]["Subject"].startswith("=?big5?Q?")
    assert compat["own-x-spam-level"].get_all("X-Spam-Level") == [""]
    assert not ex["no-from-line"].startswith(b"From ") and all(ex[n].startswith(b"From ") for n in ("multipart", "koi8-r"))
    assert compat["no-subject"]["Subject"] is None


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_real_mail_tagged_byte_exact(corpus: Path, name: str, eol: bytes) -> None:
    raw = message(corpus, EXAMPLES[name], eol)
    out = decide(raw, RCPTS, SPAM, Policy())
    assert (out.recipients, out.reply, out.action) == (RCPTS, "250 2.0.0 Ok: tagged spam", "tag")
    msg = assert_tagged(out, raw)
    assert list(msg.raw_items())[3:] == original_fields(raw)  # every other field as the email package read it
    _, body = header_and_body(raw)
    assert out.data.endswith(body)
    assert extract_text(out.data) == extract_text(raw)  # a downstream re-scan reads the same text


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("name", ["multipart", "html-only", "korean-8bit-headers", "broken-boundary", "no-from-line"])
def test_forged_fields_removed(corpus: Path, name: str, eol: bytes) -> None:
    clean = message(corpus, EXAMPLES[name], eol)
    lines = clean.splitlines(keepends=True)
    top = 1 if clean.startswith(b"From ") else 0
    middle = next(i for i, line in enumerate(lines) if line.startswith(b"Subject:"))
    last = next(i for i, line in enumerate(lines) if line == eol)
    forged = {  # what a sender would add, by line index (inserted from the bottom up)
        last: b"x-spam-score: 0.0001" + eol,
        middle: b"X-Spam-Status: No, score=0.0001" + eol + b"\tthreshold=0.9000 model=FORGED-7f3a" + eol,
        top: b"X-Spam-Flag: NO" + eol,
    }
    for i, text in sorted(forged.items(), reverse=True):
        lines.insert(i, text)
    raw = b"".join(lines)
    out = decide(raw, RCPTS, SPAM, Policy())
    assert out.data == ours(SPAM, eol) + clean
    assert_tagged(out, raw)
    assert b"FORGED-7f3a" not in out.data and b"0.0001" not in header_and_body(out.data)[0]


def test_own_x_spam_level_is_ours_to_write(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["own-x-spam-level"])
    assert b"\nX-Spam-Level:" not in strip_spam_headers(raw)
    assert parse(decide(raw, RCPTS, HAM, Policy()).data)["X-Spam-Level"] is None


def test_body_lines_that_look_like_our_fields_stay(corpus: Path) -> None:
    head, body = header_and_body(message(corpus, EXAMPLES["koi8-r"]))
    raw = head + b"\nX-Spam-Flag: NO\nX-Spam-Status: No, forged in the body\n" + body[1:]
    out = decide(raw, RCPTS, SPAM, Policy())
    assert out.data == ours(SPAM, b"\n") + raw
    assert parse(out.data).get_all("X-Spam-Flag") == ["YES"]
    assert parse(out.data).get_content().startswith("X-Spam-Flag: NO\nX-Spam-Status: No, forged in the body\n")


# --- odd shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("final_eol", [True, False], ids=["ends-with-eol", "ends-mid-line"])
def test_headers_only_no_blank_line(corpus: Path, eol: bytes, final_eol: bool) -> None:
    head, _ = header_and_body(message(corpus, EXAMPLES["multipart"], eol))
    raw = head + b"X-Spam-Flag: NO" + eol + b"X-Trailing: last, unterminated"
    raw = raw + eol if final_eol else raw
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert (
        out.data
        == ours(SPAM, eol) + head.replace(b"Subject: ", b"Subject: [SPAM] ", 1) + raw[len(head + b"X-Spam-Flag: NO" + eol) :]
    )
    msg = parse(out.data)
    assert msg.get_all("X-Spam-Flag") == ["YES"] and msg["X-Trailing"] == "last, unterminated"
    assert msg["Subject"] == "[SPAM] Save 84% on CE Credits"


def test_empty_message() -> None:
    out = decide(b"", RCPTS, SPAM, Policy())
    assert out.data == ours(SPAM, b"\n") and parse(out.data).get_all("X-Spam-Flag") == ["YES"]
    assert strip_spam_headers(b"") == b""
    assert decide(b"", RCPTS, SPAM, Policy(action="subject")).data == ours(SPAM, b"\n") + b"Subject: [SPAM]\n"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_body_without_headers_is_not_stripped(eol: bytes) -> None:
    raw = b"Hello, this is all body." + eol + b"X-Spam-Flag: NO" + eol + eol + b"more" + eol
    out = decide(raw, RCPTS, SPAM, Policy())
    assert out.data == ours(SPAM, eol) + raw
    assert parse(out.data).get_all("X-Spam-Flag") == ["YES"]  # the email package sees a body there too
    assert strip_spam_headers(raw) == raw


def test_blank_first_line_means_no_headers() -> None:
    raw = b"\nX-Spam-Flag: NO\n"
    assert decide(raw, RCPTS, HAM, Policy()).data == ours(HAM, b"\n") + raw


def test_mbox_from_line_kept_as_is(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["multipart"])
    from_line = raw.split(b"\n", 1)[0] + b"\n"
    assert from_line.startswith(b"From iq@insurancemail.net ")
    forged = from_line + b"X-Spam-Flag: NO\n" + raw[len(from_line) :]
    out = decide(forged, RCPTS, SPAM, Policy())
    assert out.data == ours(SPAM, b"\n") + raw  # the From_ line is kept, the field under it is not
    assert out.data.split(b"\n")[3] + b"\n" == from_line


def test_8bit_header_bytes_survive(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["korean-8bit-headers"])
    subject = re.search(rb"^Subject: ([^\n]*)\n", raw, re.M)[1]
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert b"\nSubject: [SPAM] " + subject + b"\n" in out.data
    assert out.data == ours(SPAM, b"\n") + raw.replace(b"\nSubject: ", b"\nSubject: [SPAM] ", 1)


@pytest.mark.parametrize(
    "raw, kept",
    [
        (b" orphan\nX-A: 1\n\nbody", b"X-A: 1\n\nbody"),  # would fold into our last field
        (b"From x  Mon\n orphan\nX-A: 1\n\nb", b"From x  Mon\nX-A: 1\n\nb"),  # the email package folds it past From_
        (b"X-Spam-Flag: NO\nFrom x\n YES\nA: 1\n\nb", b"From x\nA: 1\n\nb"),  # continues the dropped field
        (b"X-Spam-Flag: NO\r\nFrom x\r\n YES\r\nA: 1\r\n\r\nb", b"From x\r\nA: 1\r\n\r\nb"),  # a CRLF is one line end
        (b"A: 1\r\nX-Spam-Flag: NO\r\n\tYES\r\nB: 2\r\n\r\nb", b"A: 1\r\nB: 2\r\n\r\nb"),
        (b"X-Spam-Flag : NO\nA: 1\n\nb", b"A: 1\n\nb"),  # Postfix reads a field with blanks before the colon
        (b"A: 1\rX-Spam-Flag: NO\r\nB: 2\r\n\r\nb", b"A: 1\rB: 2\r\n\r\nb"),  # a bare CR ends a line for the email package
        (b":nameless\nX-Spam-Flag: NO\n\nb", b":nameless\n\nb"),  # the email package reads on past a nameless field
        (b"X-Filterd-Original-Recipients: victim@example.org\nA: 1\n\nb", b"A: 1\n\nb"),  # our other namespace
        (b"A: 1\n\rX-Spam-Flag: NO\n", b"A: 1\n\rX-Spam-Flag: NO\n"),  # "\r" alone is the blank line
    ],
)
def test_lenient_header_block(raw: bytes, kept: bytes) -> None:
    """Where readers disagree on the header block, a forged field must be gone for every reader."""
    assert strip_spam_headers(raw) == kept
    msg = parse(decide(raw, RCPTS, SPAM, Policy()).data)
    assert msg.get_all("X-Spam-Flag") == ["YES"] and msg["X-Spam-Status"].startswith("Yes, score=0.9871 ")


def test_strip_is_idempotent(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["own-x-spam-level"], b"\r\n")
    once = strip_spam_headers(raw)
    assert strip_spam_headers(once) == once == expected_rest(raw)


# --- what we write --------------------------------------------------------------------


def test_spam_headers_format() -> None:
    assert spam_headers(SPAM) == [
        ("X-Spam-Flag", "YES"),
        ("X-Spam-Score", "0.9871"),
        ("X-Spam-Status", "Yes, score=0.9871 threshold=0.5000 model=gpt2-20240101-abc"),
    ]
    assert spam_headers(Classification("ham", 0.0, 0.75, "v1"))[2] == (
        "X-Spam-Status",
        "No, score=0.0000 threshold=0.7500 model=v1",
    )
    assert spam_headers(None) == [("X-Spam-Status", "Unknown, reason=unknown")]


@pytest.mark.parametrize("version", ["v1\r\nX-Spam-Flag: NO", "v1\nX-Spam-Flag: NO", "v1\rX-Spam-Flag: NO", "v 1\x00\x7fé"])
def test_model_version_cannot_inject(corpus: Path, version: str) -> None:
    raw = message(corpus, EXAMPLES["multipart"], b"\r\n")
    out = decide(raw, RCPTS, dataclasses.replace(SPAM, model=version), Policy())
    msg = parse(out.data)
    assert msg.get_all("X-Spam-Flag") == ["YES"]
    assert re.fullmatch(r"Yes, score=0\.9871 threshold=0\.5000 model=v[!-~]+", msg["X-Spam-Status"])
    assert out.data.split(b"\r\n", 3)[3] == expected_rest(raw)
    assert out.data[: out.data.index(b"From ")].isascii()


# --- actions --------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["tag", "subject", "quarantine", "discard", "reject"])
def test_ham_is_always_relayed(corpus: Path, action: str) -> None:
    raw = message(corpus, EXAMPLES["no-from-line"], b"\r\n")
    out = decide(raw, RCPTS, HAM, Policy(action=action, quarantine_rcpt="trap@example.com"))
    assert (out.recipients, out.reply, out.action) == (RCPTS, "250 2.0.0 Ok: queued as ham", "pass")
    assert_tagged(out, raw, HAM)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_subject_prefixed(corpus: Path, eol: bytes) -> None:
    raw = message(corpus, EXAMPLES["html-only"], eol)
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert (out.relay, out.recipients, out.action) == (True, RCPTS, "subject")
    assert out.reply.startswith("250 2.0.0 ")
    assert out.data == ours(SPAM, eol) + raw.replace(eol + b"Subject: ", eol + b"Subject: [SPAM] ", 1)
    assert parse(out.data)["Subject"] == "[SPAM] " + parse(raw)["Subject"]
    again = decide(out.data, RCPTS, SPAM, Policy(action="subject"))  # a second filter pass adds no second prefix
    assert again.data == out.data


def test_subject_already_prefixed_by_sender(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["koi8-r"]).replace(b"\nSubject: ", b"\nSubject: [spam] ", 1)
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert out.data == ours(SPAM, b"\n") + raw


def test_encoded_word_subject(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["encoded-subject"])
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert b"\nSubject: [SPAM] =?big5?Q?=A4=A3=AC=DD=B7|=AB=E1=AE=AC?=\n" in out.data
    assert parse(out.data)["Subject"] == "[SPAM] " + parse(raw)["Subject"] == "[SPAM] 不看會後悔"
    tight = decide(raw, RCPTS, SPAM, Policy(action="subject", subject_prefix="[SPAM]"))
    assert parse(tight.data)["Subject"] == "[SPAM] 不看會後悔"  # a blank keeps the encoded word one


def test_folded_subject_keeps_its_folding(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["koi8-r"], b"\r\n").replace(b"Subject: Email", b"Subject:\r\n  Email", 1)
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert b"\r\nSubject: [SPAM] \r\n  Email Marketing\r\n" in out.data
    assert parse(out.data)["Subject"] == "[SPAM]   Email Marketing"


def test_subject_added_when_missing(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["no-subject"])
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert out.data == ours(SPAM, b"\n") + b"Subject: [SPAM]\n" + raw
    assert parse(out.data)["Subject"] == "[SPAM]"


def test_non_ascii_subject_prefix(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["html-only"])
    out = decide(raw, RCPTS, SPAM, Policy(action="subject", subject_prefix="[ПОДОЗРЕНИЕ] "))
    subject = re.search(rb"^Subject: .*$", out.data, re.M)[0]
    assert subject.isascii() and re.match(rb"Subject: =\?utf-8\?b\?[A-Za-z0-9+/=]+\?= ", subject)  # an encoded word
    assert parse(out.data)["Subject"].startswith("[ПОДОЗРЕНИЕ] ")


def test_long_subject_line_folded_not_overlong() -> None:
    raw = b"Subject: " + b"x" * 985 + b"\nA: 1\n\nbody\n"
    out = decide(raw, RCPTS, SPAM, Policy(action="subject"))
    assert all(len(line) <= 998 for line in out.data.split(b"\n"))
    assert parse(out.data)["Subject"] == "[SPAM] " + "x" * 985


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_quarantine(corpus: Path, eol: bytes) -> None:
    raw = message(corpus, EXAMPLES["gb2312"], eol)
    out = decide(raw, RCPTS, SPAM, Policy(action="quarantine", quarantine_rcpt="spamtrap@example.com"))
    assert (out.relay, out.recipients, out.action) == (True, ("spamtrap@example.com",), "quarantine")
    field = b"X-Filterd-Original-Recipients: alice@example.net, bob@example.org" + eol
    assert out.data == ours(SPAM, eol) + field + expected_rest(raw)
    msg = parse(out.data)
    assert msg.get_all("X-Filterd-Original-Recipients") == ["alice@example.net, bob@example.org"]
    assert msg.get_all("X-Spam-Flag") == ["YES"]


def test_quarantine_folds_long_recipient_lists(corpus: Path) -> None:
    rcpts = [f"user{i:03d}.with.a.longish.name@department{i % 7}.example.org" for i in range(300)] + ["jörg@exämple.de"]
    raw = message(corpus, EXAMPLES["multipart"], b"\r\n")
    out = decide(raw, rcpts, SPAM, Policy(action="quarantine", quarantine_rcpt="q@example.com"))
    head, _ = header_and_body(out.data)
    assert head.isascii() and max(map(len, head.split(b"\r\n"))) <= 998
    field = re.search(rb"^X-Filterd-Original-Recipients:.*?\r\n(?![ \t])", head, re.M | re.S)[0]
    first, *folded = field.split(b"\r\n")[:-1]
    assert len(folded) > 100 and max(map(len, folded)) <= 78  # the first line carries the name and one address
    value = parse(out.data)["X-Filterd-Original-Recipients"]
    assert [r.strip() for r in value.split(",")] == rcpts


def test_quarantine_strips_forged_original_recipients(corpus: Path) -> None:
    raw = message(corpus, EXAMPLES["no-from-line"])
    forged = b"X-Filterd-Original-Recipients: ceo@example.com\n" + raw
    out = decide(forged, RCPTS, SPAM, Policy(action="quarantine", quarantine_rcpt="q@example.com"))
    assert parse(out.data).get_all("X-Filterd-Original-Recipients") == ["alice@example.net, bob@example.org"]


@pytest.mark.parametrize(
    "action, reply",
    [("discard", "250 2.0.0 Ok: discarded as spam"), ("reject", "550 5.7.1 Message rejected as spam")],
)
def test_spam_not_relayed(corpus: Path, action: str, reply: str) -> None:
    out = decide(message(corpus, EXAMPLES["html-only"]), RCPTS, SPAM, Policy(action=action))
    assert out == Outcome(False, (), b"", reply, action)


def test_unclassified_accepted_with_unknown_status(corpus: Path) -> None:
    clean = message(corpus, EXAMPLES["broken-boundary"], b"\r\n")
    raw = clean.replace(b"\r\nSubject: ", b"\r\nX-Spam-Flag: NO\r\nSubject: ", 1)
    out = decide(raw, RCPTS, None, Policy(action="reject"), "RuntimeError: CUDA out of memory\r\nX-Spam-Flag: NO")
    assert (out.relay, out.recipients, out.action) == (True, RCPTS, "accept-unknown")
    assert out.reply.startswith("250 2.0.0 ")
    status = b"X-Spam-Status: Unknown, reason=RuntimeError:_CUDA_out_of_memory__X-Spam-Flag:_NO\r\n"
    assert out.data == status + clean
    msg = parse(out.data)
    assert msg["X-Spam-Flag"] is None and msg["X-Spam-Score"] is None and len(msg.get_all("X-Spam-Status")) == 1


def test_unclassified_tempfail(corpus: Path) -> None:
    out = decide(message(corpus, EXAMPLES["html-only"]), RCPTS, None, Policy(on_error="tempfail"), "busy")
    assert out == Outcome(False, (), b"", "451 4.3.0 Temporary failure classifying message, try again later", "tempfail")


# --- policy ---------------------------------------------------------------------------


def test_policy_from_config() -> None:
    cfg = SmtpConfig(action="quarantine", quarantine_rcpt="q@example.com", subject_prefix="[S] ", on_error="tempfail")
    assert Policy.from_config(cfg) == Policy("quarantine", "q@example.com", "[S] ", "tempfail")
    assert Policy.from_config(SmtpConfig()) == Policy()


@pytest.mark.parametrize("kw", [{"action": "bounce"}, {"on_error": "drop"}, {"action": "quarantine"}])
def test_policy_rejects_nonsense(kw: dict) -> None:
    with pytest.raises(ValueError):
        Policy(**kw)


# --- the corpus as a whole ------------------------------------------------------------


def test_corpus_sample_byte_exact_and_one_flag(corpus: Path) -> None:
    files = sorted(p for folder in FOLDERS for p in (corpus / folder).iterdir() if re.match(r"\d{5}\.", p.name))
    sample = files[::30]
    assert len(sample) > 190
    for path in sample:
        raw = path.read_bytes()
        for c, policy in ((SPAM, Policy()), (HAM, Policy(action="reject"))):
            out = decide(raw, RCPTS, c, policy)
            assert out.data == ours(c, b"\n") + expected_rest(raw), path.name
            msg = parse(out.data)
            assert len(msg.get_all("X-Spam-Flag")) == 1, path.name
            assert list(msg.raw_items())[3:] == original_fields(raw), path.name


# --- [headers]: SpamAssassin style, upstream fields kept ---------------------------------

SA = HeadersConfig(style="spamassassin")
# An SA-style parser as mail clients and scripts read X-Spam-Status (the unfolded value: a fold leaves its tab).
SA_STATUS = re.compile(r"(Yes|No),\s+score=(-?\d+\.\d+)\s+required=(\d+\.\d+)\s+tests=(\S+)\s+autolearn=\S+\s+version=(\S+)\s+model=\S+")
SIEVE = """require ["fileinto", "relational", "comparator-i;ascii-numeric"];
if header :value "ge" :comparator "i;ascii-numeric" "X-Spam-Score" "5" { fileinto "Junk"; }
"""


def sa_mail(p: float, threshold: float, eol: bytes = b"\r\n") -> bytes:
    d = Decision("spam" if p >= threshold else "ham", "tag" if p >= threshold else "pass", p, (), threshold)
    raw = eol.join([b"From: a@example.net", b"X-Spam-Score: 99.0", b"x-spam-level: ***************", b"Subject: hi", b"", b"body", b""])
    return apply(raw, RCPTS, d, "gpt2-20240101-abc-a-rather-long-model-version-name", Policy(headers=SA)).data


# P(spam) around every edge: just under and at the threshold, the ends, a hair either side of 0.5.
GRID = [(p, t) for t in (0.3, 0.5, 0.9) for p in (0.0, 0.01, t * 0.98, t - 1e-9, t, t + 1e-9, (t + 1) / 2, 0.999, 1.0)]


def test_spamassassin_style_score_rule_matches_exactly_the_spam() -> None:
    """`X-Spam-Score >= 5` as a float, as Sieve's ascii-numeric (integer part) and as procmail's stars."""
    for p, t in GRID:
        data = sa_mail(p, t)
        spam = p >= t
        msg = parse(data)
        score = msg.get_all("X-Spam-Score")
        assert score is not None and len(score) == 1, data  # the forged one is gone, ours is there once
        assert (float(score[0]) >= 5.0) is spam, (p, t, score)
        assert (int(score[0].split(".")[0]) >= 5) is spam, (p, t, score)  # i;ascii-numeric reads the digits
        assert bool(re.search(rb"^X-Spam-Level: \*\*\*\*\*", data, re.M)) is spam, (p, t)  # procmail's rule
        assert msg.get_all("X-Spam-Level") == ["*" * int(float(score[0]))]
        assert msg.get_all("X-Spam-Flag") == (["YES"] if spam else None)  # SpamAssassin writes no Flag on ham
        status = SA_STATUS.fullmatch(str(msg["X-Spam-Status"]))
        assert status, msg["X-Spam-Status"]
        assert status.groups()[:4] == ("Yes" if spam else "No", score[0], "5.0", "FILTERD_GPT2")
        assert status[5] == f"filterd-{__version__}"
        assert str(msg["X-Spam-Status"]).endswith("model=gpt2-20240101-abc-a-rather-long-model-version-name")
        head = data.split(b"\r\n\r\n")[0].split(b"\r\n")
        assert all(len(line) <= 78 for line in head), head  # folded like SpamAssassin's own
        assert any(line.startswith(b"\tversion=") or line.startswith(b"\t") for line in head)


def test_spamassassin_score_is_the_http_doors_scale() -> None:
    """One mapping: the header score is the Rspamd scale of the HTTP door with required = 5."""
    from filterd.doors.http import rspamd_score

    assert rspamd_score is scaled_score
    for p, t in GRID:
        d = Decision("spam" if p >= t else "ham", "tag", p, (), t)
        assert abs(float(sa_score(d, 5.0)) - scaled_score(p, t, 5.0)) <= 0.1 + 1e-9
    assert sa_score(Decision("spam", "tag", 0.73, (), 0.5), 5.0) == "7.3"
    assert sa_score(Decision("spam", "reject", None, (), 0.5, "deny_senders"), 5.0) == "10.0"
    assert sa_score(Decision("ham", "pass", None, (), 0.5, "allow_senders"), 5.0) == "0.0"
    listed = header_fields(Decision("spam", "tag", None, (), 0.5, "deny_senders"), "", headers=SA)
    assert ("X-Spam-Flag", "YES") in listed and "tests=FILTERD_DENY_SENDERS" in dict(listed)["X-Spam-Status"]
    # required_score is configurable; a whole required keeps the integer-part rule exact too
    for p, t in GRID:
        d = Decision("spam" if p >= t else "ham", "tag", p, (), t)
        assert (float(sa_score(d, 6.0)) >= 6.0) is (p >= t)
    # unclassified: no score to compare in either style
    assert header_fields(None, "", "QueueFull", SA) == [("X-Spam-Status", "Unknown, reason=QueueFull")]


def test_default_style_is_unchanged() -> None:
    d = Decision("spam", "tag", 0.98712, (), 0.5)
    assert header_fields(d, "m") == header_fields(d, "m", headers=HeadersConfig()) == [
        ("X-Spam-Flag", "YES"), ("X-Spam-Score", "0.9871"), ("X-Spam-Status", "Yes, score=0.9871 threshold=0.5000 model=m")]  # fmt: skip


@pytest.mark.skipif(not shutil.which("sieve-test"), reason="sieve-test not installed (apt-get install dovecot-sieve)")
def test_a_real_sieve_rule_files_exactly_the_spam() -> None:
    """Dovecot's Pigeonhole `sieve-test` runs the rule users have for SpamAssassin on our fields."""
    # As root Dovecot runs as nobody, so not under pytest's tmp_path (0700).
    tmp_path = Path(tempfile.mkdtemp(prefix="filterd-sieve-", dir="/tmp" if os.geteuid() == 0 else None))
    try:
        _sieve_cases(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _sieve_cases(tmp_path: Path) -> None:
    conf = tmp_path / "dovecot.conf"
    user = ""
    if os.geteuid() == 0:  # Dovecot never opens mail as root
        nobody = pwd.getpwnam("nobody")
        user = f"mail_uid = {nobody.pw_uid}\nmail_gid = {nobody.pw_gid}\n"
    conf.write_text(f"base_dir = {tmp_path}/run\nstate_dir = {tmp_path}/run\nlog_path = /dev/stderr\nssl = no\n"
                    f"first_valid_uid = 1\nfirst_valid_gid = 1\n{user}mail_location = maildir:{tmp_path}/Maildir\n"
                    "plugin {\n  sieve_extensions = +comparator-i;ascii-numeric\n}\n")  # fmt: skip
    (tmp_path / "rule.sieve").write_text(SIEVE)
    cases = [(p, t) for p, t in GRID if t == 0.5 and 0.0 < p < 1.0]
    for i, (p, t) in enumerate(cases):
        (tmp_path / f"{i}.eml").write_bytes(sa_mail(p, t))
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    filed = []
    for i in range(len(cases)):
        out = subprocess.run(["sieve-test", "-c", str(conf), str(tmp_path / "rule.sieve"), str(tmp_path / f"{i}.eml")],
                             capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        filed.append("store message in folder: Junk" in out.stdout)
    assert filed == [p >= t for p, t in cases]
    assert any(filed) and not all(filed)


FOLDED_UPSTREAM = [
    b"Received: from gw.example.net",
    b"X-Spam-Status: Yes, score=12.1 required=5.0 tests=BAYES_99,",
    b"\tHTML_MESSAGE,URIBL_BLACK autolearn=no",
    b"\tversion=3.4.6",
    b"x-spam-FLAG: YES",
    b"X-Filterd-Original-Recipients: forged@example.org",
    b"X-Spam-Level :  ************",  # Postfix's blanks before the colon (the email package reads no field here)
    b"Subject: hi",
    b"",
    b"X-Spam-Status: a body line, not a field",
    b"",
]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_keep_upstream_renames_with_folded_lines_and_drops_x_filterd(eol: bytes) -> None:
    raw = eol.join(FOLDED_UPSTREAM)
    keep = HeadersConfig(keep_upstream=True)
    out = apply(raw, RCPTS, Decision("ham", "pass", 0.1, (), 0.5), "m", Policy(headers=keep)).data
    msg = parse(out)
    ours_ = b"".join(f"{k}: {v}".encode() + eol for k, v in header_fields(Decision("ham", "pass", 0.1, (), 0.5), "m"))
    expected = raw.replace(b"X-Spam-Status: Yes", b"X-Upstream-Spam-Status: Yes").replace(b"x-spam-FLAG", b"X-Upstream-spam-FLAG")
    expected = expected.replace(b"X-Spam-Level :", b"X-Upstream-Spam-Level :").replace(b"X-Filterd-Original-Recipients: forged@example.org" + eol, b"")
    assert out == ours_ + expected  # every other byte as it came; folded lines stay under the renamed field
    assert msg["X-Upstream-Spam-Status"] == "Yes, score=12.1 required=5.0 tests=BAYES_99,\tHTML_MESSAGE,URIBL_BLACK autolearn=no\tversion=3.4.6"
    assert msg.get_all("X-Upstream-spam-flag") == ["YES"]
    assert msg.get_all("X-Spam-Flag") == ["NO"] and msg.get_all("X-Spam-Status") == ["No, score=0.1000 threshold=0.5000 model=m"]
    assert not [k for k in msg.keys() if k.lower().startswith("x-filterd-")]
    # the renamed fields are no longer in our namespace: another pass keeps them as they are
    assert strip_spam_headers(out) == out[len(ours_):]
    # without keep_upstream (the default) they are cut, as before
    assert b"Upstream" not in apply(raw, RCPTS, Decision("ham", "pass", 0.1, (), 0.5), "m", Policy()).data


def test_keep_upstream_across_a_from_line_and_on_unclassified_mail() -> None:
    keep = HeadersConfig(keep_upstream=True, upstream_prefix="X-GW-")
    raw = b"X-Spam-Status: Yes,\n\tscore=9\nFrom someone\n\tmore\nSubject: s\n\nbody\n"
    out = apply(raw, RCPTS, None, "", Policy(headers=keep), "busy")
    assert out.data == b"X-Spam-Status: Unknown, reason=busy\nX-GW-Spam-Status: Yes,\n\tscore=9\nFrom someone\n\tmore\nSubject: s\n\nbody\n"
    assert strip_spam_headers(raw, keep) == out.data.split(b"\n", 1)[1]


@pytest.mark.parametrize("prefix", ["X-Spam-Old-", "x-filterd-", "X-", "x-", "X Up-", ""])
def test_upstream_prefix_can_never_be_ours(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"\[headers\] upstream_prefix"):
        load_config(None, [f'headers.upstream_prefix="{prefix}"'])
    assert upstream_name("X-Spam-Status", HeadersConfig(keep_upstream=True)) == "X-Upstream-Spam-Status"
    assert upstream_name("X-Filterd-Original-Recipients", HeadersConfig(keep_upstream=True)) is None
    assert upstream_name("X-Spam-Status") is None


def test_keep_upstream_warns_in_check_config() -> None:
    assert not [w for w in load_config(None, []).warnings() if "keep_upstream" in w]
    warnings = load_config(None, ["headers.keep_upstream=true"]).warnings()
    assert any(w.startswith("[headers] keep_upstream = true: incoming X-Spam-* fields are kept as X-Upstream-Spam-*") for w in warnings)


# --- X-Spam-Report ([explain] header) ---------------------------------------------------------

HOSTILE_WORDS = [
    "viagra", "FREE!!!", "x\r\nBcc: victim@example.org", "\r\n\r\nbody-injection", "nul\x00byte", "tab\there",
    "=?utf-8?b?Zm9yZ2Vk?=", "日本語", "😀", "\u2028sep", "é" * 64, "a" * 64, "\x1b[31mred", "del\x7f", "trailing\\",
]


def _explanation(words: list[str]):
    from filterd.model.explain import Contribution, Explanation

    return Explanation(0.99, "screened-occlusion",
                       tuple(Contribution(w, 0, len(w), (1.5 - i / 10) if i % 2 == 0 else -(0.5 + i / 10)) for i, w in enumerate(words)))  # fmt: skip


@pytest.mark.parametrize("max_bytes", [64, 256, 900])
def test_spam_report_is_header_safe_and_bounded_with_hostile_words(max_bytes: int) -> None:
    """No CR, LF or control character can get through; non-ASCII as encoded words that decode back."""
    from filterd.mail.spam_fields import report_value
    from filterd.policy.decision import Decision

    value = report_value(_explanation(HOSTILE_WORDS), max_bytes)
    assert value and len(value.encode()) <= max_bytes
    assert re.fullmatch(r"[ -~]+", value), value  # printable ASCII and spaces only
    fields = header_fields(Decision("spam", "tag", 0.99, (), 0.5), "m1", "", report=value)
    assert fields[-1] == ("X-Spam-Report", value)
    block = "".join(f"{n}: {v}\r\n" for n, v in fields).encode() + b"\r\nbody\r\n"
    msg = email.message_from_bytes(block, policy=email.policy.default)
    assert msg.get_all("Bcc") is None and list(msg.keys()) == [n for n, _ in fields]
    decoded = str(msg["X-Spam-Report"])
    assert "viagra" in decoded and not any(c in decoded for c in "\r\n\x00\x1b\x7f\u2028")
    if max_bytes == 900:  # room for every word: the non-ASCII ones come back decoded
        assert "日本語" in decoded and "😀" in decoded and "é" * 64 in decoded
        assert "=?utf-8?b?Zm9yZ2Vk?=" not in value  # a word that looks like an encoded word is encoded itself


def test_spam_report_written_with_the_other_fields_and_forged_one_removed(corpus: Path) -> None:
    from filterd.mail.spam_fields import report_value
    from filterd.policy.decision import Decision

    raw = b"X-Spam-Report: forged\r\nSubject: hi\r\n\r\nbody\r\n"
    value = report_value(_explanation(["cheap", "meds"]), 256)
    out = apply(raw, ["u@example.net"], Decision("spam", "tag", 0.99, (), 0.5), "m1", Policy(), "", value)
    msg = email.message_from_bytes(out.data, policy=email.policy.default)
    assert msg.get_all("X-Spam-Report") == [value]
    assert out.data.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    # a caller's unsafe string is still cleaned where the field is written
    out = apply(raw, ["u@example.net"], Decision("spam", "tag", 0.99, (), 0.5), "m1", Policy(), "", "a\r\nBcc: x")
    assert email.message_from_bytes(out.data, policy=email.policy.default).get_all("Bcc") is None
