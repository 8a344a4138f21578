"""What happens to one classified mail: the headers it gets, who receives it, the bytes relayed, the SMTP reply.

Pure functions on bytes, so every rule is testable without sockets; `filterd/doors/smtp/` only carries
the `Outcome` out. The message is never parsed and re-serialised with the email package (that
changes bytes): our fields are prepended, incoming fields in our namespaces (`X-Spam-*`,
`X-Filterd-*`) are cut out of the header block so a sender cannot forge them, and every other byte
is relayed as it came.

Two formats ([headers] style): "filterd" (X-Spam-Score is P(spam); the contract of INTERFACES.md)
and "spamassassin" (X-Spam-Score on SpamAssassin's scale, where the spam threshold lands on
`required_score`, X-Spam-Level stars, X-Spam-Status as SpamAssassin writes it), so rules written
for SpamAssassin (`X-Spam-Score >= 5`, `X-Spam-Level` stars) keep working. With
[headers] keep_upstream, incoming X-Spam-* fields (a trusted upstream filter's) are renamed
(`X-Spam-Status` -> `X-Upstream-Spam-Status`, folded lines and all) instead of cut out;
X-Filterd-* are always cut.

Readers disagree on where a header block ends, and a forged field must be gone for all of them, so
the block is read as leniently as the most lenient common reader: Python's email package (a bare CR
ends a line, `From ` lines and nameless `:x` lines do not end the block) and Postfix (blanks allowed
before the colon). Continuation lines with no field above them are dropped as well: once our
fields are prepended they would fold into ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from filterd.config import HeadersConfig
from filterd.mail.spam_fields import DEFAULT_HEADERS, FOLD_AT, MAX_LINE, PLAIN, decision_fields, encoded_words, field_bytes
from filterd.policy.decision import LEVELS, Decision
from filterd.policy.replies import REPLIES, TEMPFAIL_REPLY  # noqa: F401  (TEMPFAIL_REPLY: the reply callers compare with)

if TYPE_CHECKING:
    from filterd.config import SmtpConfig

ACTIONS = LEVELS  # [smtp] action (legacy single level)
ON_ERROR = ("accept", "tempfail")

# Header lines, as regular expressions: the block can be megabytes, and `decide` runs on the event loop,
# so it is cut with a few C-level passes rather than a Python loop over lines.
# A line ends as the email package ends it (a bare CR too); atomic, so no match can split a CRLF; the last line may have no ending.
_EOL = rb"(?>\r\n|\r|\n|\Z)"
_AT_LINE_START = rb"(?<![^\r\n])"
_CONT = rb"[ \t][^\r\n]*+" + _EOL  # a continuation line
_ENVELOPE = rb"From [^\r\n]*+" + _EOL  # an mbox From_ line
_FIELD = rb"[!-9;-~]*+[ \t]*+:[^\r\n]*+" + _EOL  # name (printable ASCII but ':', may be empty), Postfix's blanks, colon
_OURS = rb"(?i:x-spam-|x-filterd-)[^\r\n]*+" + _EOL  # names only filterd may write (in the block, such a line is a field)

_BLOCK = re.compile(rb"(?:%b|%b|%b)*+" % (_CONT, _ENVELOPE, _FIELD))
_TOP = re.compile(rb"(?:%b|%b)*+" % (_CONT, _ENVELOPE))  # what comes before the first field
_ORPHAN = re.compile(_AT_LINE_START + _CONT)  # (used on _TOP only) continues no field
_OUR_FIELD = re.compile(_AT_LINE_START + _OURS + rb"(?:%b)*+(?!From )" % _CONT)
# The email package folds a continuation line into the last field even across a From_ line.
_OUR_FIELD_ACROSS_FROM = re.compile(_AT_LINE_START + _OURS + rb"(?:%b|%b)*+" % (_CONT, _ENVELOPE))
_ENVELOPE_LINE = re.compile(_AT_LINE_START + _ENVELOPE)
_SUBJECT = re.compile(_AT_LINE_START + rb"(?i:subject)[ \t]*+:[ \t]*+(?P<rest>[^\r\n]*+)%b(?:%b)*+" % (_EOL, _CONT))
_FIRST_EOL = re.compile(rb"\r\n|\r|\n")
_LEADING_FWS = re.compile(rb"(?:[ \t]|(?:\r\n|\r|\n)(?=[ \t]))*+")  # blanks and folds before a value
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Policy:
    """How the SMTP door carries out a Decision (quarantine address, Subject prefix) and what it does
    with mail that could not be classified; `action` is the legacy single-level [smtp] action."""

    action: str = "tag"  # tag | subject | quarantine | discard | reject
    quarantine_rcpt: str = ""
    subject_prefix: str = "[SPAM] "
    on_error: str = "accept"  # accept | tempfail
    headers: HeadersConfig = DEFAULT_HEADERS  # [headers]: field format, upstream fields kept or cut

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.action == "quarantine" and not self.quarantine_rcpt:
            raise ValueError('quarantine_rcpt is required when action = "quarantine"')

    @classmethod
    def from_config(cls, smtp_cfg: SmtpConfig, headers: HeadersConfig = DEFAULT_HEADERS) -> Policy:
        return cls(smtp_cfg.action, smtp_cfg.quarantine_rcpt, smtp_cfg.subject_prefix, smtp_cfg.on_error, headers)


@dataclass(frozen=True)
class Outcome:
    relay: bool  # send `data` to the next hop for `recipients`; answer `reply` only once it accepted
    recipients: tuple[str, ...]  # () when nothing is relayed
    data: bytes  # b"" when nothing is relayed
    reply: str  # the SMTP reply line for the client
    action: str  # tag | subject | quarantine | discard | reject | pass | accept-unknown | tempfail


# --- the header block ----------------------------------------------------------------


def header_block_end(raw: bytes) -> int:
    """Where the header block ends: its blank line, or a body's first line, belongs to the rest."""
    return _BLOCK.match(raw).end()


def upstream_name(name: str, headers: HeadersConfig = DEFAULT_HEADERS) -> str | None:
    """What an incoming field in our namespaces becomes: its new name (an upstream filter's X-Spam-*
    with keep_upstream: "X-Spam-Status" -> "X-Upstream-Spam-Status"), or None: deleted. The prefix
    is never one of our namespaces (config.py checks), so a renamed field cannot pass as ours."""
    if headers.keep_upstream and name[:7].lower() == "x-spam-":
        return headers.upstream_prefix + name[2:]
    return None


def _without_ours(block: bytes, headers: HeadersConfig = DEFAULT_HEADERS) -> bytes:
    """The block minus our namespaces' fields (or those kept from upstream, renamed) and continuation
    lines of no field (they would fold into ours)."""
    prefix = headers.upstream_prefix.encode("ascii") if headers.keep_upstream else None

    def out(m: re.Match[bytes], envelope: bool) -> bytes:
        if prefix is not None and m[0][:7].lower() == b"x-spam-":  # renamed in place: its folded lines stay with it
            return prefix + m[0][2:]
        return b"".join(_ENVELOPE_LINE.findall(m[0])) if envelope else b""  # keep From_ lines

    top = _TOP.match(block).end()
    rest = _OUR_FIELD.sub(lambda m: out(m, False), block[top:])
    rest = _OUR_FIELD_ACROSS_FROM.sub(lambda m: out(m, True), rest)
    return _ORPHAN.sub(b"", block[:top]) + rest


def _eol(raw: bytes) -> bytes:
    """The message's own line ending, for the lines we add: CRLF if its first line has one."""
    m = _FIRST_EOL.search(raw)
    return b"\r\n" if m and m[0] == b"\r\n" else b"\n"


def strip_spam_headers(raw: bytes, headers: HeadersConfig = DEFAULT_HEADERS) -> bytes:
    """The message without incoming X-Spam-* (and X-Filterd-*) fields (X-Spam-* renamed with
    keep_upstream); every other byte unchanged."""
    raw = bytes(raw)
    end = header_block_end(raw)
    return _without_ours(raw[:end], headers) + raw[end:]


# --- the edits ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEdits:
    """What a relayed mail gets, whichever door carries it out: the content filter on the bytes (`apply`),
    the milter as protocol actions. Incoming fields in our namespaces go too (`upstream_name` says which
    are renamed instead)."""

    fields: tuple[tuple[str, str], ...]  # our X-Spam-* fields, in order, one line each
    subject_prefix: str = ""  # header-safe text put in front of the Subject ("" leaves it alone)
    quarantine: bool = False


def plan_edits(d: Decision | None, model: str, error: str = "", headers: HeadersConfig = DEFAULT_HEADERS, report: str = "",
               prefix: str = "") -> HeaderEdits:  # fmt: skip
    """The header edits for a decision (None: not classified, `error` says why); `prefix`: [smtp] subject_prefix."""
    action = "accept-unknown" if d is None else d.action
    marked = subject_prefix(prefix) if action == "subject" and subject_prefix(prefix).strip() else ""
    return HeaderEdits(tuple(decision_fields(d, model, error, headers, report)), marked, action == "quarantine")


def subject_prefix(prefix: str) -> str:
    """The Subject prefix as a header-safe string (non-ASCII as encoded words)."""
    return _prefix_bytes(prefix).decode("ascii")


def _folded(name: str, words: list[str], eol: bytes) -> bytes:
    """`name: w1 w2 ...` folded between words (RFC 5322: a line break before the blank)."""
    lines, line = [], f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return eol.join(text.encode("ascii") for text in lines) + eol


def _recipients_field(recipients: Sequence[str], eol: bytes) -> bytes:
    """X-Filterd-Original-Recipients, folded after the commas; non-ASCII addresses as encoded words."""
    words: list[str] = []
    for i, rcpt in enumerate(recipients):
        item = rcpt + ("," if i < len(recipients) - 1 else "")
        words += [item] if PLAIN.fullmatch(item) and "=?" not in item else encoded_words(item)
    return _folded("X-Filterd-Original-Recipients", words, eol)



# --- the Subject ---------------------------------------------------------------------


def _prefix_bytes(prefix: str) -> bytes:
    """The Subject prefix as header bytes: ASCII as is, anything else as encoded words."""
    prefix = _CONTROL.sub("", prefix)
    if prefix.isascii():
        return prefix.encode("ascii")
    return " ".join(encoded_words(prefix)).encode("ascii") + b" "  # the blank keeps the last word apart


def _mark_subjects(block: bytes, prefix: bytes, eol: bytes) -> bytes:
    """Every Subject field with `prefix` in front of its value (readers differ on which one they show)."""
    return _SUBJECT.sub(lambda m: _with_prefix(m, prefix, eol), block)


def _with_prefix(m: re.Match[bytes], prefix: bytes, eol: bytes) -> bytes:
    """The field with the prefix right after "Subject:" and its blanks; folding, encoded words
    and 8-bit bytes of the value stay as they are."""
    field, at = m[0], m.start("rest") - m.start()
    value = _LEADING_FWS.match(field, at).end()
    if field[value : value + len(prefix.rstrip())].lower() == prefix.rstrip().lower():
        return field  # already marked (by us on an earlier pass, or upstream)
    lead = b"" if field[at - 1 : at] in (b" ", b"\t") else b" "  # "Subject:x" still gets "Subject: [SPAM] x"
    if field[at : at + 2] == b"=?" and not prefix.endswith((b" ", b"\t")):
        prefix += b" "  # an encoded word is only one when blanks set it apart
    if m.end("rest") - m.start() + len(lead + prefix) > MAX_LINE:  # fold after the prefix, not an overlong line
        prefix = prefix.rstrip() + eol + b" "
    return field[:at] + lead + prefix + field[at:]


# --- the decision --------------------------------------------------------------------


def _skip(action: str) -> Outcome:
    return Outcome(False, (), b"", REPLIES[action], action)


def apply(raw: bytes, recipients: Sequence[str], d: Decision | None, model: str, policy: Policy, error: str = "",
          report: str = "") -> Outcome:  # fmt: skip
    """The outcome for one message: `d.action` carried out (filterd.policy.decision decided it; `model` names
    the model for the headers). Every relayed message gets our headers; a failed classification (d is
    None, `error` says why) is relayed with an Unknown status or deferred, as `policy.on_error` says.
    `report`: an X-Spam-Report value (`report_value`), written with the other X-Spam-* fields when not empty."""
    if d is None and policy.on_error == "tempfail":
        return _skip("tempfail")
    if d is not None and d.action in ("discard", "reject", "soft-reject"):
        return _skip(d.action)

    raw = bytes(raw)
    eol = _eol(raw)
    end = header_block_end(raw)
    block = _without_ours(raw[:end], policy.headers)
    edits = plan_edits(d, model, error, policy.headers, report, policy.subject_prefix)
    added = field_bytes(list(edits.fields), eol, policy.headers)
    rcpts = tuple(recipients)
    action = "accept-unknown" if d is None else d.action

    if edits.subject_prefix:
        prefix = edits.subject_prefix.encode("ascii")
        if _SUBJECT.search(block):
            block = _mark_subjects(block, prefix, eol)
        else:
            added += b"Subject: " + prefix.rstrip() + eol
    elif edits.quarantine:
        added += _recipients_field(rcpts, eol)
        rcpts = (policy.quarantine_rcpt,)

    data = b"".join((added, block, memoryview(raw)[end:]))  # the body is not copied twice (mail can be large)
    return Outcome(True, rcpts, data, REPLIES[action], action)
