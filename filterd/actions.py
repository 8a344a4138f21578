"""What happens to one classified mail: headers to add, recipients, bytes to relay, the SMTP reply.

Pure functions on bytes, so every rule is testable without sockets. The message is never parsed
and re-serialised (that would change bytes): incoming `X-Spam-*` header fields are cut out of the
header block, our fields are prepended, and everything else is relayed as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

ACTIONS = ("tag", "subject", "quarantine", "discard", "reject")

_FIELD = re.compile(rb"^[!-9;-~]+:")  # a header field name (printable ASCII except ':') and its colon
_SPAM_FIELD = re.compile(rb"^x-spam-[!-9;-~]*:", re.IGNORECASE)
_SUBJECT = re.compile(rb"^subject:[ \t]*", re.IGNORECASE)
_UNSAFE = re.compile(r"[^\x21-\x7e]")  # anything that could break a header line: controls, spaces, non-ASCII


@dataclass(frozen=True)
class Policy:
    action: str = "tag"
    quarantine_rcpt: str = ""
    subject_prefix: str = "[SPAM] "
    on_error: str = "accept"

    @classmethod
    def from_config(cls, smtp_cfg: Any) -> "Policy":
        return cls(smtp_cfg.action, smtp_cfg.quarantine_rcpt, smtp_cfg.subject_prefix, smtp_cfg.on_error)


@dataclass(frozen=True)
class Classification:
    verdict: str  # "spam" | "ham"
    score: float  # P(spam)
    threshold: float
    model: str  # version of the model that scored it


@dataclass(frozen=True)
class Outcome:
    relay: bool  # send `data` to the next hop for `recipients`; answer `reply` only once it accepted
    recipients: tuple[str, ...]
    data: bytes
    reply: str
    action: str  # tag | subject | quarantine | discard | reject | pass | accept-unknown | tempfail


def _header_end(raw: bytes) -> int:
    """Offset where the header block ends (its blank line excluded); 0 when the message has no headers."""
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        line = raw[pos:] if nl < 0 else raw[pos : nl + 1]
        bare = line.rstrip(b"\r\n")
        if not bare:  # the blank line between header and body
            return pos
        if not (_FIELD.match(bare) or (pos and line[:1] in (b" ", b"\t"))):
            return pos  # not a header line (a body without a blank line, an mbox From_ line): stop here
        if nl < 0:
            return len(raw)
        pos = nl + 1
    return pos


def _split_fields(block: bytes) -> list[bytes]:
    """Header fields, each with its continuation lines and line endings, exactly as in the block."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _eol(raw: bytes) -> bytes:
    nl = raw.find(b"\n")
    return b"\r\n" if nl > 0 and raw[nl - 1 : nl] == b"\r" else b"\n"


def strip_spam_headers(raw: bytes) -> bytes:
    """The message without any X-Spam-* header field (so a sender cannot forge ours); the rest unchanged."""
    end = _header_end(raw)
    kept = [f for f in _split_fields(raw[:end]) if not _SPAM_FIELD.match(f)]
    return b"".join(kept) + raw[end:]


def safe_value(text: str, limit: int = 200) -> str:
    """A token fit for a header value: no spaces, controls or line breaks (a version or error cannot inject a field)."""
    return _UNSAFE.sub("_", text)[:limit] or "unknown"


def spam_headers(c: Classification | None, error: str = "") -> list[tuple[str, str]]:
    """Our X-Spam-* fields, in the order they are prepended."""
    if c is None:
        return [("X-Spam-Status", f"Unknown, reason={safe_value(error or 'classification-failed')}")]
    spam = c.verdict == "spam"
    return [
        ("X-Spam-Flag", "YES" if spam else "NO"),
        ("X-Spam-Score", f"{c.score:.4f}"),
        ("X-Spam-Status", f"{'Yes' if spam else 'No'}, score={c.score:.4f} threshold={c.threshold:.4f} model={safe_value(c.model)}"),
    ]


def _fold_list(name: str, items: Sequence[str], eol: bytes, width: int = 78) -> bytes:
    """`name: a, b, c` folded at the commas so no line gets near the 998-byte limit."""
    lines, line = [], f"{name}:"
    for i, item in enumerate(items):
        piece = f" {item}" + ("," if i < len(items) - 1 else "")
        if len(line) + len(piece) > width and line != f"{name}:":
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return eol.join(x.encode("utf-8") for x in lines) + eol


def _with_subject_prefix(raw: bytes, prefix: str) -> tuple[bytes, bool]:
    """Prefix the Subject's value (raw bytes, folding and encoded-words kept); (message, found a Subject)."""
    end = _header_end(raw)
    fields = _split_fields(raw[:end])
    pre = prefix.encode("utf-8")
    for i, f in enumerate(fields):
        m = _SUBJECT.match(f)
        if m:
            if not f[m.end() :].startswith(pre.rstrip()):
                fields[i] = f[: m.end()] + pre + f[m.end() :]
            return b"".join(fields) + raw[end:], True
    return raw, False


def decide(raw: bytes, recipients: Sequence[str], c: Classification | None, policy: Policy, error: str = "") -> Outcome:
    """The outcome for one message. Ham is always relayed; spam gets the configured action;
    a failed classification (c None) is relayed untagged or deferred, as `on_error` says."""
    rcpts = tuple(recipients)
    eol = _eol(raw)
    body = strip_spam_headers(raw)
    if c is None:
        if policy.on_error == "tempfail":
            return Outcome(False, rcpts, b"", "451 4.3.0 Temporary failure classifying message, try again later", "tempfail")
        added = b"".join(f"{k}: {v}".encode() + eol for k, v in spam_headers(None, error))
        return Outcome(True, rcpts, added + body, "250 2.0.0 Ok: relayed unclassified", "accept-unknown")
    added = b"".join(f"{k}: {v}".encode() + eol for k, v in spam_headers(c))
    if c.verdict != "spam":
        return Outcome(True, rcpts, added + body, "250 2.0.0 Ok: relayed as ham", "pass")
    action = policy.action
    if action == "discard":
        return Outcome(False, (), b"", "250 2.0.0 Ok: discarded as spam", action)
    if action == "reject":
        return Outcome(False, (), b"", "550 5.7.1 Message rejected as spam", action)
    if action == "subject":
        body, found = _with_subject_prefix(body, policy.subject_prefix)
        if not found:
            added += b"Subject: " + policy.subject_prefix.strip().encode("utf-8") + eol
        return Outcome(True, rcpts, added + body, "250 2.0.0 Ok: relayed as spam, subject marked", action)
    if action == "quarantine":
        added += _fold_list("X-Filterd-Original-Recipients", rcpts, eol)
        return Outcome(True, (policy.quarantine_rcpt,), added + body, "250 2.0.0 Ok: spam quarantined", action)
    return Outcome(True, rcpts, added + body, "250 2.0.0 Ok: relayed as spam, tagged", "tag")
