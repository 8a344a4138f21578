"""The milter door: Sendmail/Postfix milter protocol (version 6) over asyncio, before the queue.

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

import asyncio
import contextlib
import logging
import math
import os
import re
import stat
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Sequence, Union

from filterd.config import HeadersConfig, MilterConfig, UnixSocket
from filterd.doors.path import Inbound, MessagePath
from filterd.mail.budget import FIELD_BYTES, HEADER_BYTES, NEEDED_FIELD
from filterd.mail.headers import DEFAULT_HEADERS, plan_edits, upstream_name
from filterd.policy.decision import Decision
from filterd.policy.replies import reply_parts

REJECT_REPLY = reply_parts("reject")  # the one reply table's words

if TYPE_CHECKING:
    from filterd.obs.metrics import FilterdMetrics

log = logging.getLogger(__name__)

__all__ = [
    "FORGED_PREFIXES",
    "Accept",
    "AddHeader",
    "ChangeSubject",
    "DeleteHeader",
    "Discard",
    "MilterDoor",
    "MilterMessage",
    "MilterReply",
    "MilterServer",
    "MilterStats",
    "Quarantine",
    "Reject",
    "Tempfail",
    "forged_header_deletions",
]

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


# --------------------------------------------------------------------------------------------
# Server


OnMessage = Callable[[MilterMessage], Awaitable[MilterReply]]


@dataclass
class MilterStats:
    """Counters the daemon can export (it owns the Prometheus registry and the `source` label)."""

    sessions_open: int = 0
    sessions_total: int = 0
    messages: int = 0
    truncated: int = 0
    verdicts: Counter = field(default_factory=Counter)  # accept | reject | tempfail | discard
    errors: Counter = field(default_factory=Counter)  # timeout | exception | protocol | disconnect


class MilterServer:
    """Serves the milter protocol on `cfg.listen` ("host:port" or "unix:/path"). `start()` binds
    (OSError with the address on failure), `stop()` closes the listener and every session."""

    def __init__(self, cfg: MilterConfig, on_message: OnMessage) -> None:
        self.cfg = cfg
        self.on_message = on_message
        self.stats = MilterStats()
        self._server: asyncio.AbstractServer | None = None
        self._sessions: dict[asyncio.Task, _Session] = {}
        self._refusal_logged = -math.inf

    @property
    def address(self) -> str:
        return str(self.cfg.listen)

    async def start(self) -> None:
        listen = self.cfg.listen
        try:
            if isinstance(listen, UnixSocket):
                _remove_stale_socket(listen.path)
                self._server = await asyncio.start_unix_server(self._accept, path=str(listen.path))
                os.chmod(listen.path, int(self.cfg.socket_mode, 8))
            else:
                self._server = await asyncio.start_server(self._accept, host=listen.host, port=listen.port)
        except OSError as e:
            raise OSError(e.errno, f"milter: cannot listen on {listen}: {e.strerror or e}") from None
        log.info("milter: listening on %s", listen)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Abort the connections as well as cancelling: a session then ends even if a
            # cancellation is lost in a race with a read that completes at the same moment.
            for task, session in list(self._sessions.items()):
                session.writer.transport.abort()
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
            if isinstance(self.cfg.listen, UnixSocket):
                with contextlib.suppress(FileNotFoundError):
                    self.cfg.listen.path.unlink()

    async def __aenter__(self) -> "MilterServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._sessions) >= self.cfg.max_sessions:
            # Over the cap: close at once, before negotiation. Postfix then applies the milter's
            # default_action (deploy/postfix: accept) for this SMTP session without waiting; answering
            # the protocol instead would hold a connection, which is what the cap is there to bound.
            self.stats.errors["over-capacity"] += 1
            if time.monotonic() - self._refusal_logged >= 10:  # one line per 10 s, not one per connection of a flood
                self._refusal_logged = time.monotonic()
                log.warning("milter: %d sessions open ([milter] max_sessions); closing new connections (%d so far)",
                            len(self._sessions), self.stats.errors["over-capacity"])  # fmt: skip
            writer.transport.abort()
            return
        session = _Session(self, reader, writer)
        self._sessions[task] = session
        self.stats.sessions_open += 1
        self.stats.sessions_total += 1
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            if session.in_message:
                self.stats.errors["disconnect"] += 1
                log.info("milter: %s went away mid-message (queue id %s)", session.peer, session.msg.queue_id or "-")
        except ProtocolError as e:
            self.stats.errors["protocol"] += 1
            log.warning("milter: %s: protocol error: %s; closing", session.peer, e)
        except TimeoutError:
            log.info("milter: %s idle for %gs; closing", session.peer, self.cfg.idle_timeout)
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's stream callback logs a traceback for a cancelled handler)
            pass
        finally:
            self.stats.sessions_open -= 1
            self._sessions.pop(task, None)
            session.msg = MilterMessage()  # free the message now, not when the transport is collected
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a previous run would make bind fail; anything else there is kept."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, f"{path} exists and is not a socket")
    path.unlink()


class _Session:
    """One MTA connection: negotiated options, connection facts, the message being collected."""

    def __init__(self, server: MilterServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.cfg = server.cfg
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.actions = 0  # negotiated SMFIF_*
        self.steps = 0  # negotiated SMFIP_*
        self.negotiated = False
        self.conn: dict[str, str] = {}  # client, client_name, helo: kept across messages
        self.conn_macros: dict[str, str] = {}
        self.msg = MilterMessage()
        self.in_message = False
        self.started_by_macros = False

    # -- reading -------------------------------------------------------------------------------

    async def _read_frame(self) -> tuple[bytes, bytes] | None:
        """(command, data), or None on a clean end of stream between packets."""
        try:
            async with asyncio.timeout(self.cfg.idle_timeout):  # cheaper than wait_for: no task per read
                head = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise
        (length,) = struct.unpack("!I", head)
        if not 1 <= length <= MAX_FRAME:
            raise ProtocolError(f"packet length {length} out of range 1..{MAX_FRAME}")
        async with asyncio.timeout(self.cfg.idle_timeout):
            payload = await self.reader.readexactly(length)
        return payload[:1], payload[1:]

    async def run(self) -> None:
        while True:
            frame = await self._read_frame()
            if frame is None:
                if self.in_message:  # a clean close, but with a message half sent
                    raise ConnectionResetError("end of stream mid-message")
                return
            cmd, data = frame
            if cmd == SMFIC_QUIT:
                return
            out = await self._handle(cmd, data)
            if out:
                self.writer.write(out)
                # an MTA that stops reading must not hold the session (and its message) forever
                async with asyncio.timeout(self.cfg.idle_timeout):
                    await self.writer.drain()

    # -- events --------------------------------------------------------------------------------

    def _reply(self, cmd: bytes, reply: bytes = SMFIR_CONTINUE) -> bytes:
        """The reply to an event, or nothing when the MTA agreed not to wait for one."""
        bit = _NO_REPLY_BIT.get(cmd, 0)
        return b"" if bit and self.steps & bit else _frame(reply)

    async def _handle(self, cmd: bytes, data: bytes) -> bytes:
        if cmd == SMFIC_OPTNEG:
            return self._optneg(data)
        if not self.negotiated:
            raise ProtocolError(f"command {cmd!r} before option negotiation")
        if cmd == SMFIC_MACRO:
            self._macros(data)
            return b""  # macros are never answered
        if cmd == SMFIC_CONNECT:
            self._connect(data)
        elif cmd == SMFIC_HELO:
            args = _cstrings(data)
            self.conn["helo"] = _text(args[0]) if args else ""
        elif cmd == SMFIC_MAIL:
            if not self.started_by_macros:
                self._new_message()
            self.started_by_macros = False
            args = _cstrings(data)
            self.msg.sender = _address(args[0]) if args else ""
        elif cmd == SMFIC_RCPT:
            args = _cstrings(data)
            if args and len(self.msg.recipients) < MAX_RECIPIENTS:
                self.msg.recipients.append(_address(args[0]))
        elif cmd == SMFIC_HEADER:
            self._header(data)
        elif cmd == SMFIC_BODY:
            full = self._body(data)
            if full and self.steps & SMFIP_SKIP:
                return self._reply(cmd, SMFIR_SKIP)
        elif cmd == SMFIC_BODYEOB:
            self._body(data)  # the end packet may carry a last chunk
            return await self._end_of_message()
        elif cmd == SMFIC_ABORT:
            self._new_message()
            self.in_message = False
            return b""
        elif cmd == SMFIC_QUIT_NC:  # a new SMTP connection on this milter connection
            self.conn.clear()
            self.conn_macros.clear()
            self._new_message()
            self.in_message = False
            return b""
        elif cmd not in (SMFIC_DATA, SMFIC_EOH, SMFIC_UNKNOWN):
            raise ProtocolError(f"unknown command {cmd!r}")
        return self._reply(cmd)

    def _optneg(self, data: bytes) -> bytes:
        if len(data) < 12:
            raise ProtocolError(f"option negotiation of {len(data)} bytes, need 12")
        version, actions, steps = struct.unpack("!III", data[:12])
        if version < 2:
            raise ProtocolError(f"milter protocol version {version} is too old")
        self.actions = actions & WANTED_ACTIONS
        self.steps = steps & WANTED_STEPS
        if version < VERSION:  # before version 6 there are no no-reply steps to agree on
            self.steps &= SMFIP_NOHELO | SMFIP_NOEOH | SMFIP_NOUNKNOWN | SMFIP_NODATA
        self.negotiated = True
        missing = WANTED_ACTIONS & ~self.actions
        if missing:
            log.warning("milter: %s: the MTA does not offer actions 0x%x; those edits will be skipped", self.peer, missing)
        return _frame(SMFIC_OPTNEG, struct.pack("!III", min(version, VERSION), self.actions, self.steps))

    def _macros(self, data: bytes) -> None:
        if not data:
            return
        args = _cstrings(data[1:])
        stage = data[:1]
        if stage == SMFIC_MAIL:  # MAIL's macros (queue id "i") come just before MAIL itself
            self._new_message()
            self.started_by_macros = True
        target = self.conn_macros if stage in (SMFIC_CONNECT, SMFIC_HELO) else self.msg.macros
        for name, value in zip(args[0::2], args[1::2]):
            key = _text(name).strip("{}")
            if len(target) < MAX_MACROS or key in target:
                target[key] = _text(value)
        if self.msg.macros.get("i"):
            self.msg.queue_id = self.msg.macros["i"]

    def _connect(self, data: bytes) -> None:
        # hostname NUL, family byte, then (not for 'U') port uint16 and address NUL
        name, _, rest = data.partition(b"\0")
        self.conn = {"client_name": _text(name)}
        if rest[:1] in (b"4", b"6") and len(rest) >= 3:
            self.conn["client"] = _text(_cstrings(rest[3:])[0]) if rest[3:] else ""
            if self.conn["client"].lower().startswith("ipv6:"):
                self.conn["client"] = self.conn["client"][5:]

    def _new_message(self) -> None:
        self.msg = MilterMessage(
            client=self.conn.get("client", ""),
            client_name=self.conn.get("client_name", ""),
            helo=self.conn.get("helo", ""),
            macros=dict(self.conn_macros),
        )
        self.in_message = True

    def _header(self, data: bytes) -> None:
        args = _cstrings(data)
        if not args:
            raise ProtocolError("header without a name")
        name = args[0]
        value = args[1] if len(args) > 1 else b""
        msg = self.msg
        text_name = _text(name)
        key = text_name.lower()
        if len(msg.header_names) < MAX_HEADERS:
            msg.header_names.append(text_name)
        if key.startswith(FORGED_PREFIXES):
            msg.ours.append(text_name)
        if not self.steps & SMFIP_HDR_LEADSPC and value:
            value = b" " + value  # the MTA ate the one space after the colon: put it back
        value = re.sub(rb"\r?\n", b"\r\n", value)
        if key == "subject" and msg.subject is None:
            msg.subject = value
        line = name + b":" + value
        msg.size += len(line) + 2
        if msg.size > HEADER_BYTES and not msg.headers_cut:
            msg.headers_cut = True  # padding: from here on only what text extraction reads is kept
        if msg.headers_cut and not NEEDED_FIELD.fullmatch(key):
            msg.truncated = True
            return
        line = line[:FIELD_BYTES] if msg.headers_cut else line
        if msg.kept + len(line) + 2 <= self.cfg.max_message_bytes:
            msg.header_lines.append(line)
            msg.kept += len(line) + 2
        else:
            msg.truncated = True

    def _body(self, data: bytes) -> bool:
        """Keep what fits; True when the limit is reached (more body is not wanted)."""
        msg = self.msg
        room = self.cfg.max_message_bytes - msg.kept
        msg.size += len(data)
        msg.kept += max(min(room, len(data)), 0)
        if room > 0:
            msg.body += data[:room]
        if len(data) > max(room, 0):
            msg.truncated = True
        return msg.truncated

    # -- end of message ------------------------------------------------------------------------

    async def _end_of_message(self) -> bytes:
        msg, self.in_message = self.msg, False
        stats = self.server.stats
        stats.messages += 1
        stats.truncated += msg.truncated
        try:
            async with asyncio.timeout(self.cfg.reply_timeout):
                reply = await self.server.on_message(msg)
            if not isinstance(reply, MilterReply):
                raise TypeError(f"on_message returned {type(reply).__name__}, not MilterReply")
        except TimeoutError:
            stats.errors["timeout"] += 1
            log.warning("milter: no decision for %s within %gs; on_error = %s", msg.queue_id or "-", self.cfg.reply_timeout, self.cfg.on_error)
            reply = self._error_reply(msg)
        except Exception as e:  # noqa: BLE001 -- any failure of the decision follows on_error, loudly
            stats.errors["exception"] += 1
            log.warning("milter: decision for %s failed (%s: %s); on_error = %s", msg.queue_id or "-", type(e).__name__, e, self.cfg.on_error)
            reply = self._error_reply(msg)
        out = self._encode(reply, msg)
        stats.verdicts[type(reply.verdict).__name__.lower()] += 1
        self.msg = MilterMessage()  # the next message starts with MAIL; free this one now
        return out

    def _error_reply(self, msg: MilterMessage) -> MilterReply:
        if self.cfg.on_error == "tempfail":
            return MilterReply(Tempfail(*reply_parts("tempfail")))
        return MilterReply(Accept(), tuple(msg.forged_header_deletions()))

    def _encode(self, reply: MilterReply, msg: MilterMessage) -> bytes:
        verdict = reply.verdict
        if isinstance(verdict, Reject | Tempfail):
            text = f"{verdict.code} {verdict.status} {verdict.text}".replace("%", "%%")
            return _frame(SMFIR_REPLYCODE, _wire(text) + b"\0")
        if isinstance(verdict, Discard):
            return _frame(SMFIR_DISCARD)
        out = [self._modification(m, msg) for m in reply.modifications]
        out.append(_frame(SMFIR_ACCEPT))
        return b"".join(out)

    def _value(self, value: str) -> bytes:
        # With HDR_LEADSPC the MTA writes "Name:" + value verbatim, so the space is ours to add.
        return _wire(" " + value if self.steps & SMFIP_HDR_LEADSPC else value) + b"\0"

    def _modification(self, m: Modification, msg: MilterMessage) -> bytes:
        need = SMFIF_QUARANTINE if isinstance(m, Quarantine) else SMFIF_ADDHDRS if isinstance(m, AddHeader) else SMFIF_CHGHDRS
        if isinstance(m, ChangeSubject) and msg.subject is None:
            need = SMFIF_ADDHDRS
        if not self.actions & need:
            log.warning("milter: %s: the MTA did not allow %s; skipped", msg.queue_id or "-", type(m).__name__)
            return b""
        if isinstance(m, AddHeader):
            return _frame(SMFIR_ADDHEADER, _wire(m.name) + b"\0" + self._value(m.value))
        if isinstance(m, DeleteHeader):
            return _frame(SMFIR_CHGHEADER, struct.pack("!I", m.index) + _wire(m.name) + b"\0\0")
        if isinstance(m, ChangeSubject):
            if need == SMFIF_ADDHDRS:
                return _frame(SMFIR_ADDHEADER, b"Subject\0" + self._value(m.value))
            return _frame(SMFIR_CHGHEADER, struct.pack("!I", 1) + b"Subject\0" + self._value(m.value))
        return _frame(SMFIR_QUARANTINE, _wire(m.reason) + b"\0")


# --------------------------------------------------------------------------------------------
# The door: a Decision (filterd/policy/decision.py) turned into a milter reply


class MilterDoor:
    """`on_message` for the daemon: the message path's decision answered with milter actions. Every
    accepted message loses its forged X-Spam-*/X-Filterd-* headers and gets ours. A failed or busy
    classification follows `[milter] on_error` (accept with an Unknown status, or 451), like the SMTP door's."""

    def __init__(self, cfg: MilterConfig, path: MessagePath, subject_prefix: str, metrics: FilterdMetrics | None = None,
                 headers: HeadersConfig = DEFAULT_HEADERS) -> None:  # fmt: skip
        self.cfg = cfg
        self.path = path
        self.headers = headers
        self.prefix = subject_prefix
        self.metrics = metrics
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def on_message(self, msg: MilterMessage) -> MilterReply:
        self.in_flight += 1
        self._idle.clear()
        t0 = time.perf_counter()
        try:
            return await self._decide(msg)
        finally:  # end of message to reply, also when reply_timeout cuts it short (cancelled here)
            if self.metrics is not None:
                self.metrics.observe_request("milter", time.perf_counter() - t0)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def _decide(self, msg: MilterMessage) -> MilterReply:
        inbound = Inbound("milter", raw=msg.raw(), sender=msg.sender, recipients=tuple(msg.recipients), client_address=msg.client,
                          authenticated=msg.macros.get("auth_authen", ""), ref=msg.queue_id, size=msg.size,
                          headers_cut=msg.headers_cut)  # fmt: skip
        scan = await self.path.scan(inbound)
        if scan.error:
            log.warning("milter: %s: classification failed (%s); on_error = %s", msg.queue_id or "-", scan.error, self.cfg.on_error)
        reply, action = self._reply(msg, scan.decision, scan.model, scan.error, scan.report)
        self.path.done(scan, action, lead=[("queue_id", msg.queue_id or "-")])
        return reply

    def _reply(self, msg: MilterMessage, d: Decision | None, model: str, error: str, report: str = "") -> tuple[MilterReply, str]:
        if d is None and self.cfg.on_error == "tempfail":
            return MilterReply(Tempfail(*reply_parts("tempfail"))), "tempfail"
        action = "accept-unknown" if d is None else d.action
        if action == "reject":
            return MilterReply(Reject(*reply_parts("reject"))), action
        if action == "soft-reject":
            return MilterReply(Tempfail(*reply_parts("soft-reject"))), action
        if action == "discard":
            return MilterReply(Discard()), action
        edits = plan_edits(d, model, error, self.headers, report, self.prefix)
        mods: list[Modification] = list(msg.forged_header_deletions())
        mods += _upstream_renamed(msg, self.headers)
        mods += [AddHeader(name, value) for name, value in edits.fields]
        if edits.subject_prefix:
            mods.append(ChangeSubject(edits.subject_prefix + _subject_of(msg)))
        elif edits.quarantine:
            mods.append(Quarantine(f"filterd: spam score {d.score:.4f}" if d is not None and d.score is not None else "filterd: spam"))
        return MilterReply(Accept(), tuple(mods)), action


def _upstream_renamed(msg: MilterMessage, headers: HeadersConfig) -> list[AddHeader]:
    """With [headers] keep_upstream: the incoming X-Spam-* fields added back under their new names
    (their originals are deleted with the forged ones). A milter cannot rename a field, and its
    ADDHEADER value is one line, so a folded value is unfolded (the same value, RFC 5322 2.2.3).
    Fields past max_message_bytes were not kept, so they are only deleted."""
    out = []
    for line in msg.header_lines:
        name, _, value = line.partition(b":")
        new = upstream_name(_text(name).strip(), headers)
        if new is not None and _HEADER_NAME.fullmatch(new):  # a name too long to rename is only deleted
            out.append(AddHeader(new, re.sub(r"[\r\n\0]", "", _text(value)).strip()))
    return out


def _subject_of(msg: MilterMessage) -> str:
    """The first Subject's value as received, wherever it lay, unfolded (a folded value cannot go back in one field)."""
    return "" if msg.subject is None else re.sub(r"[\r\n\x00]", "", _text(msg.subject)).strip()
