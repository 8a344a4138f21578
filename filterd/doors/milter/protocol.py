"""The milter protocol (version 6): constants, the replies and edits filterd can send, one collected message, framing.

Postfix (`smtpd_milters = inet:127.0.0.1:11332`) opens one connection per SMTP session and sends
the session's events; at end of message filterd answers with header edits and one verdict, and
Postfix tells the SMTP client *during* the session (a `550 5.7.1` at end of DATA is a refusal, not
a bounce to a forged sender). This module collects one message per transaction into a
`MilterMessage`, calls the injected `on_message(msg) -> MilterReply`, and encodes the reply.
Deciding what to answer is not done here (`filterd/policy/decision.py` and the daemon do that).

Why our own protocol code and not a library (checked 2026-12): `kilter.service` (MPL-2.0, one
maintainer, 0.3.1) is built on anyio with its own session/coroutine model, and `purepythonmilter`
(Apache-2.0) is a 0.0.1 release from 2023; `miltertest` is GPL-3.0 (filterd is MIT) and its MTA
side waits for a reply to every command, which the no-reply steps we negotiate do not send. The
protocol is small (a 4-byte length, a command byte, NUL-terminated strings), and owning it lets us
bound memory (`max_message_bytes`, a frame limit, capped lists), negotiate exactly the steps we
use, and apply Postfix's timing rules in one place.

Wire format: every packet is `uint32 length (big-endian, includes the command byte) | command |
data`. Strings are NUL-terminated bytes. Reference: Sendmail's libmilter `mfdef.h` and Postfix's
`milter8.c` (MILTER_README) for the MTA side's behaviour that this module relies on:
- Postfix matches CHGHEADER names case-insensitively, index 1 = the first instance; deleting a
  header shifts later ones down, so deletions of one name are sent last-instance first.
- REPLYCODE text: Postfix turns `%%` into `%` and drops a lone `%` (sendmail format strings), so a
  `%` in our text is doubled; CR/LF are refused (one reply line).
- With SMFIP_HDR_LEADSPC, header values keep the space after the colon as received, and values we
  add must carry their own leading space; folded values come with bare LF line breaks.
- SMFIR_QUARANTINE puts the message on Postfix's hold queue (`postqueue -j`, queue_name "hold").
- SMFIR_SKIP after a body chunk stops further chunks (used once `max_message_bytes` is reached).

Past `max_message_bytes` (headers and body together, as received) nothing more is kept: the
message is classified on what was collected, `truncated` is set, and Postfix still delivers the
whole message (header edits apply to the whole). Memory per session is therefore bounded by
`max_message_bytes`, the frame limit and the capped header/recipient lists.

Timing (Postfix waits `milter_command_timeout`, 30 s, for each envelope reply and
`milter_content_timeout`, 300 s, for content and end-of-message replies): every reply except the
one at end of message is immediate; `on_message` runs under `reply_timeout`, and when it is late or
raises, `on_error` decides: "accept" (forged X-Spam-*/X-Filterd-* headers are still removed, so a
failure never lets a forged verdict through) or "tempfail" (451, the client retries). A session
silent for `idle_timeout` is closed; a client that goes away frees its session at once.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from filterd.policy.replies import reply_parts

REJECT_REPLY = reply_parts("reject")  # the one reply table's words


# --------------------------------------------------------------------------------------------
# Protocol constants (libmilter mfdef.h)

VERSION = 6

# Commands, MTA -> filter
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, filter -> MTA
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_ADDHEADER = b"h"
SMFIR_CHGHEADER = b"m"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Actions the filter may take at end of message (SMFIF_*)
SMFIF_ADDHDRS = 0x01
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20

# Protocol steps: events not sent, replies not expected (SMFIP_*)
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

# What we ask for: the header edits and quarantine we use.
WANTED_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE
# Events we do not need (HELO, DATA, end of headers, unknown commands), replies we never vary
# (connect, envelope, each header: we decide only at end of message), and exact header values.
# Body chunks keep their reply so that SMFIR_SKIP can stop them past max_message_bytes.
WANTED_STEPS = (
    SMFIP_NOHELO | SMFIP_NODATA | SMFIP_NOEOH | SMFIP_NOUNKNOWN
    | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_HDR
    | SMFIP_NR_DATA | SMFIP_NR_EOH | SMFIP_NR_UNKN
    | SMFIP_SKIP | SMFIP_HDR_LEADSPC
)  # fmt: skip

# The reply each event would need, and the no-reply bit that waives it.
_NO_REPLY_BIT = {
    SMFIC_CONNECT: SMFIP_NR_CONN,
    SMFIC_HELO: SMFIP_NR_HELO,
    SMFIC_MAIL: SMFIP_NR_MAIL,
    SMFIC_RCPT: SMFIP_NR_RCPT,
    SMFIC_DATA: SMFIP_NR_DATA,
    SMFIC_HEADER: SMFIP_NR_HDR,
    SMFIC_EOH: SMFIP_NR_EOH,
    SMFIC_BODY: SMFIP_NR_BODY,
    SMFIC_UNKNOWN: SMFIP_NR_UNKN,
}

MAX_FRAME = 1 << 20  # Postfix sends body chunks of <= 64 KiB and headers of <= header_size_limit (100 KiB)
MAX_HEADERS = 10_000  # header names kept per message (for logs and tests); our namespaces' are kept apart, uncapped
MAX_RECIPIENTS = 10_000
MAX_MACROS = 64
FORGED_PREFIXES = ("x-spam-", "x-filterd-")

# --------------------------------------------------------------------------------------------
# Replies: modifications (in order) and one verdict

_HEADER_NAME = re.compile(r"[!-9;-~]{1,200}")  # printable ASCII, no colon (RFC 5322 field name)
_BAD_TEXT = re.compile(r"[\x00\r\n]")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _check_value(what: str, value: str) -> None:
    if not isinstance(value, str) or _BAD_TEXT.search(value):
        raise ValueError(f"{what} must be a string without NUL, CR or LF: {value!r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"not a header name: {name!r}")


@dataclass(frozen=True)
class AddHeader:
    """Append a header (Postfix adds it after the message's own headers)."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_value("header value", self.value)


@dataclass(frozen=True)
class DeleteHeader:
    """Delete the `index`-th (1-based, counted case-insensitively per name) header called `name`."""

    name: str
    index: int = 1

    def __post_init__(self) -> None:
        _check_name(self.name)
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 1:
            raise ValueError(f"header index must be an integer >= 1, got {self.index!r}")


@dataclass(frozen=True)
class ChangeSubject:
    """Set the Subject to `value` (the first Subject header; added when the message has none)."""

    value: str

    def __post_init__(self) -> None:
        _check_value("subject", self.value)


@dataclass(frozen=True)
class Quarantine:
    """Hold the message (Postfix: hold queue); the reason is for logs (Postfix ignores it)."""

    reason: str = "filterd"

    def __post_init__(self) -> None:
        _check_value("quarantine reason", self.reason)
        if not self.reason:
            raise ValueError("quarantine reason must not be empty")


Modification = Union[AddHeader, DeleteHeader, ChangeSubject, Quarantine]


def _reply_text(code: int, status: str, text: str, first: str) -> None:
    if isinstance(code, bool) or not isinstance(code, int) or not (int(first) * 100 <= code <= int(first) * 100 + 99):
        raise ValueError(f"SMTP code must be {first}xx, got {code!r}")
    if not isinstance(status, str) or not _STATUS.fullmatch(status) or status[0] != first:
        raise ValueError(f"enhanced status must look like {first}.7.1, got {status!r}")
    _check_value("reply text", text)
    if not text.isascii():  # an SMTP reply line is ASCII (RFC 5321)
        raise ValueError(f"reply text must be ASCII: {text!r}")


@dataclass(frozen=True)
class Accept:
    """Let the message through (with the modifications)."""


@dataclass(frozen=True)
class Reject:
    """Refuse the message: the SMTP client sees `code status text` at end of DATA."""

    code: int = REJECT_REPLY[0]
    status: str = REJECT_REPLY[1]
    text: str = REJECT_REPLY[2]

    def __post_init__(self) -> None:
        _reply_text(self.code, self.status, self.text, "5")


@dataclass(frozen=True)
class Tempfail:
    """Refuse for now: the client keeps the message and retries."""

    code: int = 451
    status: str = "4.7.1"
    text: str = "Try again later"

    def __post_init__(self) -> None:
        _reply_text(self.code, self.status, self.text, "4")


@dataclass(frozen=True)
class Discard:
    """Accept and drop the message silently."""


Verdict = Union[Accept, Reject, Tempfail, Discard]


@dataclass(frozen=True)
class MilterReply:
    """What to answer at end of message. Modifications are applied in order, and only when the
    verdict is Accept (a refused or discarded message is not edited)."""

    verdict: Verdict = field(default_factory=Accept)
    modifications: tuple[Modification, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, (Accept, Reject, Tempfail, Discard)):
            raise ValueError(f"not a verdict: {self.verdict!r}")
        object.__setattr__(self, "modifications", tuple(self.modifications))
        for m in self.modifications:
            if not isinstance(m, (AddHeader, DeleteHeader, ChangeSubject, Quarantine)):
                raise ValueError(f"not a modification: {m!r}")


# --------------------------------------------------------------------------------------------
# The message


@dataclass
class MilterMessage:
    """One message as the MTA showed it to us. `header_lines` are `Name:value` exactly as received
    (folded lines joined by CRLF), up to `max_message_bytes`; `header_names` names every header, in
    order, also past that limit (for deletion indexes). `body` is CRLF text, possibly cut short."""

    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    queue_id: str = ""
    client: str = ""  # the SMTP client's IP address ("" when unknown or local)
    client_name: str = ""  # its name as the MTA resolved it
    helo: str = ""
    header_lines: list[bytes] = field(default_factory=list)
    header_names: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)  # names in our namespaces, every one (each must be deleted): no cap
    subject: bytes | None = None  # the first Subject's value as received, kept wherever it lies
    body: bytes = b""
    truncated: bool = False
    headers_cut: bool = False  # the header block passed the scan budget: only the fields text extraction reads were kept
    size: int = 0  # header and body bytes the MTA sent, also past the limit
    kept: int = 0  # header and body bytes kept (at most max_message_bytes)
    macros: dict[str, str] = field(default_factory=dict)

    def raw(self) -> bytes:
        """The collected message as RFC 5322 bytes (headers, blank line, body) for the classifier."""
        return b"".join(line + b"\r\n" for line in self.header_lines) + b"\r\n" + self.body

    def forged_header_deletions(self, prefixes: Sequence[str] = FORGED_PREFIXES) -> list[DeleteHeader]:
        """Deletions of every field in our namespaces, however many headers came before them (`ours` has no cap)."""
        return forged_header_deletions(self.ours, prefixes)


def forged_header_deletions(header_names: Iterable[str], prefixes: Sequence[str] = FORGED_PREFIXES) -> list[DeleteHeader]:
    """DeleteHeader for every header whose name starts with one of `prefixes` (any casing): the
    headers a sender could forge to pass as already filtered. Indexes count per name,
    case-insensitively and 1-based, as Postfix matches them; each name's instances are deleted last
    first, so one deletion never shifts the index of the next."""
    lowered = tuple(p.lower() for p in prefixes)
    seen: Counter[str] = Counter()
    found: list[tuple[str, str, int]] = []  # (key, name as received, index)
    for name in header_names:
        key = name.lower()
        seen[key] += 1
        if key.startswith(lowered):
            found.append((key, name, seen[key]))
    order = {key: i for i, (key, _, _) in enumerate(reversed(found))}  # stable: names in first-seen order
    found.sort(key=lambda f: (-order[f[0]], -f[2]))
    return [DeleteHeader(name, index) for _, name, index in found]


# --------------------------------------------------------------------------------------------
# Wire helpers


class ProtocolError(Exception):
    """The MTA sent something we cannot follow: the session is closed."""


def _frame(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def _cstrings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; a missing final NUL is tolerated (libmilter does too)."""
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0") if data else []


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _wire(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _address(arg: bytes) -> str:
    """'user@example.org' from b'<user@example.org>' (the MTA sends the path with its brackets)."""
    s = _text(arg).strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    return s

