"""SMTP ingress: filterd as a Postfix after-queue content filter (aiosmtpd server, our own next-hop client).

Postfix hands each queued message to `[smtp] listen`. filterd proxies the envelope to `[smtp]
next_hop` as it arrives, like Postfix's smtpd_proxy_filter: the next-hop transaction is opened at
MAIL FROM, each RCPT TO is passed on and answered with the next hop's verdict on that recipient
(a 5xx there is a 5xx here, so Postfix bounces only that recipient and delivers the others).
At the end of DATA filterd classifies through the shared batcher, asks `filterd/policy/decision.py` what
to do ([policy]), carries it out (`filterd/mail/headers.py`: headers, Subject, recipients), sends the message, and answers with the next
hop's final reply: 250 only once the next hop took the message, 5xx when it refused it for good,
451 for anything that may work later (timeouts, lost connections, 4xx), so the message stays in
Postfix's queue and nothing is lost or half-delivered. The destination is always the configured
next hop, never derived from the recipients: filterd cannot be used as an open relay.

Envelope addresses and the body travel byte for byte: addresses are cut from the command line as
sent (aiosmtpd would decode RFC 2047 encoded words in them), the body is only prepended to.
XFORWARD (Postfix's original client, HELO and queue id) is accepted and passed on.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec
from email.errors import HeaderParseError
from typing import Any, Awaitable, Iterator

from aiosmtpd.smtp import SMTP, Envelope, Session

from filterd.config import HeadersConfig, HostPort, SmtpConfig
from filterd.doors.path import Inbound, MessagePath
from filterd.mail.headers import Outcome, Policy, apply
from filterd.policy.decision import Decision
from filterd.obs.metrics import FilterdMetrics

log = logging.getLogger("filterd")

TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
BUSY = "451 4.3.2 filterd is busy, try again later"
NO_MEMORY = "452 4.3.1 Insufficient system storage, try again later"
NEXT_HOP_DOWN = "451 4.3.0 Next hop unavailable, try again later"
NO_SMTPUTF8 = "550 5.6.7 SMTPUTF8 is required, but was not offered by the next hop"
TIMED_OUT = "451 4.4.2 filterd timed out processing the message, try again later"
SHUTTING_DOWN = "421 4.3.2 filterd shutting down"
TOO_MANY_CONNECTIONS = "421 4.7.0 filterd: too many connections, try again later"
SESSION_EXPIRED = "421 4.4.2 filterd: session too long, closing"
IDLE_TIMEOUT = "421 4.4.2 filterd: idle timeout, closing"
LONGEST_LINE = 1 << 20  # a command line; also about the size of the chunks DATA is read in
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XFORWARD_LINE = 500  # Postfix refuses XFORWARD lines over 512 bytes
_DATA_END = b"\r\n.\r\n"
_SEND_CHUNK = 1 << 20  # bytes written to the next hop at a time (split at a line end)
_FD_RESERVE = 64  # descriptors kept for the metrics server, Redis, the model files, logs
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}\s")
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
_UNPRINTABLE = re.compile(r"[^ -~]")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
# The header edits (`apply`: a few C-level regex passes, ~1 ms for real mail) run on the loop for
# small mail and in a thread for large: a few ms of regex on the loop stall every other session.
THREAD_DECIDE_BYTES = 256 * 1024
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:[ \t]*([^\r\n]{0,250})")


# --- the next hop ----------------------------------------------------------------------------


class NextHopError(Exception):
    """The next hop could not be reached or the connection broke; the client is told 451."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the reply's lines joined by a space, printable ASCII only

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def passed_on(r: Reply) -> str:
    """The next hop's refusal as our reply: 5xx stays permanent (Postfix bounces), anything else
    is 4xx (a 421 from the next hop is its connection closing, not ours: 451)."""
    code = r.code if 500 <= r.code < 600 or r.code in (450, 451, 452) else 451
    text = r.text
    m = _ENHANCED.match(text + " ")
    if m and m[1] == str(code)[0]:
        enhanced, text = m[0].strip(), text[m.end() :]
    else:
        enhanced = f"{code // 100}.0.0"
    return f"{code} {enhanced} next hop said: {text.strip()[:300]}"


class NextHopConnection:
    """A minimal SMTP client on one connection (no TLS: loopback): replies as `Reply`, every step
    bounded by `timeout`, the message written in chunks with dot-stuffing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.extensions: dict[str, str] = {}  # EHLO keyword -> its line ("SIZE 1000", "XFORWARD NAME ADDR")
        self.last_lines: list[str] = []

    @classmethod
    async def open(cls, hop: HostPort, timeout: float, local_hostname: str) -> NextHopConnection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(hop.host, hop.port, limit=LONGEST_LINE), timeout)
        except (OSError, TimeoutError) as e:
            raise NextHopError(f"cannot connect to {hop}: {e or type(e).__name__}") from None
        conn = cls(reader, writer, timeout)
        try:
            greeting = await conn.reply()
            if greeting.code != 220:
                raise NextHopError(f"{hop} greeted with {greeting.code} {greeting.text}")
            ehlo = await conn.command(b"EHLO " + local_hostname.encode())
            if not ehlo.ok:
                raise NextHopError(f"{hop} refused EHLO: {ehlo.code} {ehlo.text}")
        except BaseException:
            conn.close()
            raise
        conn.extensions = {ln[4:].split(" ", 1)[0].upper(): ln[4:] for ln in conn.last_lines[1:]}
        return conn

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def reply(self, final: bool = False) -> Reply:
        """One (possibly multi-line) reply within `timeout`; the `final` reply to a message is awaited
        for as long as the caller's deadline allows (giving up early would risk a duplicate)."""
        lines: list[str] = []
        try:
            async with asyncio.timeout(None if final else self.timeout):
                while True:
                    line = (await self.reader.readuntil(b"\n")).rstrip(b"\r\n").decode("utf-8", "replace")
                    if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                        raise NextHopError(f"malformed reply from the next hop: {line[:100]!r}")
                    lines.append(line)
                    if line[3:4] != "-":
                        break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            raise NextHopError(f"next hop: {type(e).__name__} {e}".strip()) from None
        self.last_lines = lines
        return Reply(int(lines[-1][:3]), _UNPRINTABLE.sub("?", " ".join(ln[4:] for ln in lines)))

    async def write(self, data: bytes | memoryview) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (OSError, TimeoutError) as e:
            raise NextHopError(f"next hop: {type(e).__name__} {e}".strip()) from None

    async def command(self, line: bytes) -> Reply:
        await self.write(line + b"\r\n")
        return await self.reply()

    async def send_message(self, data: bytes) -> Reply:
        """The message after a 354 to DATA, the final dot, and the final reply."""
        for chunk in _wire_chunks(data):
            await self.write(chunk)
        await self.write(b".\r\n")
        return await self.reply(final=True)

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command(b"QUIT"), min(self.timeout, 5.0))
        except (NextHopError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


def _wire_chunks(data: bytes) -> Iterator[bytes]:
    """`data` as DATA needs it: every line ending CRLF (a stray CR or LF too, as Postfix does), a
    leading dot doubled; in chunks of about `_SEND_CHUNK` that end at a line end, so no copy of
    the whole message is ever made."""
    view, start, n = memoryview(data), 0, len(data)
    while start < n:
        end = data.find(b"\n", start + _SEND_CHUNK)
        end = n if end < 0 else end + 1
        chunk = _LINE_ENDS.sub(b"\r\n", view[start:end])
        if not chunk.endswith(b"\r\n"):
            chunk += b"\r\n"
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        yield b"." + chunk if chunk.startswith(b".") else chunk
        start = end


_UTF8_NOT_OFFERED = Reply(550, "5.6.7 SMTPUTF8 not offered")  # what begin() returns, never sent


@dataclass(frozen=True)
class Relay:
    """Where and how filterd connects to the next hop (one connection per mail transaction)."""

    next_hop: HostPort
    timeout: float
    local_hostname: str = "filterd"

    async def open(self) -> NextHopConnection:
        return await NextHopConnection.open(self.next_hop, self.timeout, self.local_hostname)


# --- one mail transaction ----------------------------------------------------------------------


@dataclass
class Transaction:
    """A client's mail transaction and its twin at the next hop. Addresses are the exact text the
    client sent (str with surrogate escapes for stray 8-bit bytes, so they encode back unchanged)."""

    mail_from: str  # "" for the null sender <>
    params: list[str]  # MAIL parameters as sent (BODY=, SMTPUTF8, SIZE=)
    smtputf8: bool
    xforward: dict[str, str]
    rcpts: list[str] = field(default_factory=list)  # accepted by the next hop, in order
    upstream: NextHopConnection | None = None

    def mail_command(self, upstream: NextHopConnection) -> bytes:
        """MAIL FROM for this next hop: parameters it does not offer are left out (BODY, SIZE)."""
        needs = {"SMTPUTF8": "SMTPUTF8", "BODY": "8BITMIME", "SIZE": "SIZE"}  # parameter -> EHLO keyword
        params = [p for p in self.params if upstream.supports(needs[p.split("=", 1)[0].upper()])]
        return b" ".join([b"MAIL FROM:<" + _wire(self.mail_from) + b">", *(p.encode() for p in params)])

    def xforward_commands(self, upstream: NextHopConnection) -> list[bytes]:
        """XFORWARD lines with the attributes the next hop offers (none if it offers none)."""
        offered = set(upstream.extensions.get("XFORWARD", "").upper().split()[1:])
        items = [f"{k}={v}" for k, v in self.xforward.items() if k in offered]
        lines: list[str] = []
        for item in items:
            if lines and len(lines[-1]) + 1 + len(item) <= _XFORWARD_LINE:
                lines[-1] += " " + item
            else:
                lines.append("XFORWARD " + item)
        return [ln.encode("ascii", "replace") for ln in lines]

    async def begin(self, relay: Relay) -> Reply:
        """Connect, XFORWARD, MAIL FROM; the next hop's reply to MAIL (NextHopError if unreachable)."""
        self.upstream = upstream = await relay.open()
        if self.smtputf8 and not upstream.supports("SMTPUTF8"):
            return _UTF8_NOT_OFFERED
        for line in self.xforward_commands(upstream):
            r = await upstream.command(line)
            if not r.ok:
                log.warning("smtp: next hop refused XFORWARD (%d %s); relaying without it", r.code, r.text)
                break
        return await upstream.command(self.mail_command(upstream))

    async def rcpt(self, address: str) -> Reply:
        assert self.upstream is not None
        return await self.upstream.command(b"RCPT TO:<" + _wire(address) + b">")

    async def replay(self, relay: Relay, rcpts: tuple[str, ...]) -> Reply:
        """A fresh transaction for `rcpts` (after a lost connection, or for quarantine): the first
        refusal, or 250 when the next hop took the sender and every recipient."""
        self.abort()
        r = await self.begin(relay)
        if r is _UTF8_NOT_OFFERED:
            return Reply(451, "4.3.0 SMTPUTF8 no longer offered")
        for rcpt in rcpts if r.ok else ():
            r = await self.rcpt(rcpt)
            if not r.ok:
                break
        return r

    async def finish(self) -> None:
        """QUIT and close the next hop's connection (no transaction left open there)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            await upstream.quit()

    def abort(self) -> None:
        """Close the next hop's connection now: a transaction cut short is never delivered."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()


def _wire(address: str) -> bytes:
    return address.encode("utf-8", "surrogateescape")


def parse_path(arg: str) -> tuple[str | None, str]:
    """(address, parameters) from the text after `FROM:`/`TO:`, the address exactly as sent.

    The address is not decoded or normalised (RFC 2047 words stay words: `=?utf-8?b?...?=@x`
    goes on as is); a source route (`<@a,@b:user@c>`) is dropped as RFC 5321 allows. None when
    malformed: no closing `>`, control characters or blanks outside quotes, or not an address.
    """
    arg = arg.strip()
    if not arg.startswith("<"):  # Postfix takes a bare address too
        address, _, rest = arg.partition(" ")
    else:
        i, quoted = 1, False
        while i < len(arg):
            c = arg[i]
            if c == "\\" and quoted:
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                break
            i += 1
        else:
            return None, ""
        address, rest = arg[1:i], arg[i + 1 :]
        if address.startswith("@"):
            _, colon, address = address.partition(":")
            if not colon:
                return None, ""
    if address:
        unquoted = _QUOTED.sub("", address)
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in unquoted) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
            return None, ""
        try:
            _, left = get_addr_spec(address)
        except (HeaderParseError, IndexError, ValueError):
            return None, ""
        if left:
            return None, ""
    return address, rest.strip()


def _xtext_decoded(value: str) -> str:
    return _XTEXT.sub(lambda m: chr(int(m[1], 16)), value)


# --- the server side ---------------------------------------------------------------------------


class ByteBudget:
    """Message bytes held by all sessions together; a session that would exceed it gets a 4xx."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class _Server(SMTP):
    """aiosmtpd's SMTP session, with what a content filter needs on top: the envelope passed on
    as sent, DATA read in large chunks into one buffer, XFORWARD, connection caps, an idle timer
    that never fires while a message is being classified and relayed, and a total session deadline."""

    line_length_limit = LONGEST_LINE

    def __init__(self, handler: FilterHandler, ingress: SmtpIngress, **kw: Any) -> None:
        self._filter = handler
        self._ingress = ingress
        self._client = ""
        self._refused = False
        self._busy = False  # a message (or a next-hop step) is in progress: no idle timeout
        self._expire = False  # the session deadline passed while busy: close after the reply
        self._last_activity = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        self._held = 0  # bytes of the in-flight byte budget this session holds
        self.txn: Transaction | None = None
        self.xforward: dict[str, str] = {}
        super().__init__(handler, **kw)

    # -- connection caps and deadlines

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        problem = self._ingress.admit(self._client)
        if problem:
            self._refused = True
            transport.write(TOO_MANY_CONNECTIONS.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            self._filter.count_reply(TOO_MANY_CONNECTIONS)
            self._ingress.refused(self._client, problem)
            return
        self._ingress.register(self)
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self._filter.cfg.session_timeout, self._session_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._ingress.unregister(self)
        self._release()
        if self._deadline is not None:
            self._deadline.cancel()
        self._abort_transaction()
        super().connection_lost(exc)

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._last_activity = self.loop.time()
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        idle = self.loop.time() - self._last_activity
        if self._busy or idle < self._timeout_duration:  # data arrived meanwhile, or we are the slow one
            super()._reset_timeout(max(self._timeout_duration - idle, 0.01) if not self._busy else None)
            return
        self._hang_up(IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        if self._busy:
            self._expire = True
        else:
            self._hang_up(SESSION_EXPIRED)

    def _hang_up(self, reply: str) -> None:
        log.info("smtp: client %s: %s", self._client, reply[10:])
        if self.transport is not None:
            self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    # -- replies

    async def _busy_call(self, call: Awaitable[str]) -> str:
        self._busy = True
        try:
            return await call
        finally:
            self._busy = False
            self._reset_timeout()

    # -- transaction state

    def _abort_transaction(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.abort()

    def _set_rset_state(self) -> None:
        self._abort_transaction()  # HELO, EHLO: a new session state
        self.xforward = {}
        super()._set_rset_state()

    def _end_transaction(self) -> None:
        self.txn = None
        self.xforward = {}  # Postfix sends XFORWARD again before each MAIL
        self._set_post_data_state()

    # -- commands

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        assert self.envelope is not None
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = {}
        for item in arg.split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in XFORWARD_ATTRS or not value or not value.isascii():
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {_UNPRINTABLE.sub('?', item)[:60]}")
                return
            attrs[name.upper()] = value
        self.xforward.update(attrs)
        await self.push("250 2.0.0 Ok")

    async def smtp_RSET(self, arg: str) -> None:
        txn, self.txn = self.txn, None
        if txn is not None and not arg:
            await txn.finish()
        await super().smtp_RSET(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        syntaxerr = "501 5.5.4 Syntax: MAIL FROM:<address>" + (" [SP <mail-parameters>]" if self.session.extended_smtp else "")
        path = self._strip_command_keyword("FROM:", arg) if arg else None
        if path is None:
            await self.push(syntaxerr)
            return
        address, rest = parse_path(path)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if not self.session.extended_smtp and rest:
            await self.push(syntaxerr)
            return
        params = rest.split()
        parsed = self._getparams([p.upper() for p in params])
        if parsed is None:
            await self.push(syntaxerr)
            return
        if parsed.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = parsed.pop("SMTPUTF8", False)
        if smtputf8 is not False and smtputf8 is not True:
            await self.push("501 5.5.4 Error: SMTPUTF8 takes no arguments")
            return
        size = parsed.pop("SIZE", None)
        if size is not None and (isinstance(size, bool) or not size.isdigit()):
            await self.push(syntaxerr)
            return
        if parsed:
            await self.push("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        if size and self.data_size_limit and int(size) > self.data_size_limit:
            await self.push(TOO_BIG)
            self._filter.count_reply(TOO_BIG)
            return
        txn = Transaction(address, params, bool(smtputf8), dict(self.xforward))
        status = await self._busy_call(self._filter.mail(txn, int(size or 0)))
        if status.startswith("2"):
            self.txn = txn
            self.envelope.mail_from = address or "<>"  # aiosmtpd's own checks want a true value
            self.envelope.mail_options = [p.upper() for p in params]
            self.envelope.smtp_utf8 = bool(smtputf8)
        await self.push(status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.txn is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        path = self._strip_command_keyword("TO:", arg) if arg else None
        if path is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, rest = parse_path(path)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if not address:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if rest:  # no DSN: RCPT parameters are not offered
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        status = await self._busy_call(self._filter.rcpt(self.txn, address))
        if status.startswith("2"):
            self.envelope.rcpt_tos.append(address)
        await self.push(status)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        txn = self.txn
        if txn is None or not txn.rcpts:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw, problem = await self._read_message()
            if problem:
                txn.abort()
                self._end_transaction()
                self._filter.count_reply(problem)
                await self.push(problem)
                return
            status = await self._busy_call(self._filter.data(txn, raw, self.xforward_for_log(txn)))
            del raw
        finally:
            self._release()
        self._end_transaction()
        await self.push(status)
        if self._expire:
            self._hang_up(SESSION_EXPIRED)

    def xforward_for_log(self, txn: Transaction) -> list[tuple[str, str]]:
        x = txn.xforward
        fields = [("queue_id", _xtext_decoded(x.get("IDENT", "-")))]
        if "ADDR" in x or "NAME" in x:
            fields.append(("client", f"{x.get('NAME', '?')}[{x.get('ADDR', '?')}]"))
        return fields

    async def _read_message(self) -> tuple[bytes, str]:
        """The message (dot-unstuffed, CRLF as sent) and "" , or b"" and the reply for a refusal.

        Read in chunks of up to a megabyte (one C-level search each, not one Python step per line)
        into a single buffer, counted against the ingress's in-flight byte budget as it grows.
        """
        budget, limit = self._ingress.budget, self.data_size_limit
        buf, size, problem = io.BytesIO(), 0, ""
        # The end is CRLF "." CRLF; for a message with no lines at all the CRLF is the DATA
        # command's own: put one in front of the unread bytes so a single search finds both.
        self._reader._buffer[0:0] = b"\r\n"  # type: ignore[attr-defined]
        last2 = b""
        while True:
            try:
                chunk, done = await self._reader.readuntil(_DATA_END), True
                chunk = chunk[:-3]  # keep the last line's CRLF, drop ".\r\n"
            except asyncio.LimitOverrunError as e:
                chunk, done = await self._reader.readexactly(e.consumed), False
            self._last_activity = self.loop.time()
            if not last2:  # the CRLF put in front above
                chunk, last2 = chunk[2:], b"\r\n"
            # Undo dot-stuffing; the previous chunk's last two bytes join the search so a
            # "\r\n." split between chunks is still seen, and never change.
            unstuffed = (last2 + chunk).replace(b"\r\n.", b"\r\n")[len(last2) :]
            last2 = (last2 + chunk)[-2:]
            size += len(unstuffed)
            if not problem and limit and size > limit:
                problem = TOO_BIG
            if not problem and not budget.take(len(unstuffed)):
                problem = NO_MEMORY
                log.warning("smtp: client %s: in-flight bytes over max_inflight_bytes, message deferred", self._client)
            if problem:
                buf = io.BytesIO()  # keep reading to the end, keep nothing
                self._release()
            else:
                self._held += len(unstuffed)
                buf.write(unstuffed)
            if done:
                break
        raw = buf.getvalue()  # no copy: BytesIO hands over its buffer
        del buf
        return (b"", problem) if problem else (raw, "")

    def _release(self) -> None:
        """Give this session's share of the in-flight byte budget back (after the reply, or when the connection is gone)."""
        self._ingress.budget.give(self._held)
        self._held = 0


class FilterHandler:
    """The filter's side of the conversation: next-hop steps, the message path's decision carried out
    (`filterd.mail.headers.apply`: headers, Subject, recipients), the reply."""

    def __init__(
        self, cfg: SmtpConfig, path: MessagePath, metrics: FilterdMetrics | None = None, relay: Relay | None = None,
        budget: ByteBudget | None = None, headers: HeadersConfig | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.path = path
        self.budget = budget or ByteBudget(cfg.max_inflight_bytes)
        self.metrics = metrics
        self.policy = Policy.from_config(cfg, headers or HeadersConfig())  # how actions are carried out here ([headers] too)
        self.relay = relay or Relay(cfg.next_hop, cfg.timeout)
        self.in_flight = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def count_reply(self, reply: str) -> None:
        if self.metrics is not None:
            self.metrics.smtp_replies.labels(code=reply[:3]).inc()

    def _answer(self, reply: str) -> str:
        self.count_reply(reply)
        return reply

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return responses[:-1] + ["250-XFORWARD " + " ".join(XFORWARD_ATTRS), responses[-1]]

    async def mail(self, txn: Transaction, size: int) -> str:
        """MAIL FROM: open the next-hop transaction and answer as it did."""
        if self.closing:
            return self._answer(SHUTTING_DOWN)
        if size and self.budget.held + size > self.budget.limit:
            return self._answer(NO_MEMORY)
        try:
            r = await txn.begin(self.relay)
        except NextHopError as e:
            txn.abort()
            log.warning("smtp: from=<%s> deferred at MAIL: %s", txn.mail_from, e)
            return self._answer(NEXT_HOP_DOWN)
        if r is _UTF8_NOT_OFFERED:
            await txn.finish()
            return self._answer(NO_SMTPUTF8)
        if not r.ok:
            await txn.finish()
            log.info("smtp: from=<%s> refused by the next hop at MAIL: %d %s", txn.mail_from, r.code, r.text)
            return self._answer(passed_on(r))
        return "250 2.1.0 Ok"

    async def rcpt(self, txn: Transaction, address: str) -> str:
        """RCPT TO: passed to the next hop at once; its answer is this recipient's answer."""
        if len(txn.rcpts) >= self.cfg.max_recipients:
            return self._answer(TOO_MANY_RCPTS)
        if txn.upstream is None:
            return self._answer(NEXT_HOP_DOWN)
        try:
            r = await txn.rcpt(address)
        except NextHopError as e:
            txn.abort()
            log.warning("smtp: rcpt=<%s> deferred: %s", address, e)
            return self._answer(NEXT_HOP_DOWN)
        if not r.ok:
            log.info("smtp: rcpt=<%s> refused by the next hop: %d %s", address, r.code, r.text)
            return self._answer(passed_on(r))
        txn.rcpts.append(address)
        return "250 2.1.5 Ok"

    async def data(self, txn: Transaction, raw: bytes, origin: list[tuple[str, str]]) -> str:
        """End of DATA: classify, decide, relay, answer; all within `data_done_timeout`."""
        if self.closing:
            txn.abort()
            return self._answer(SHUTTING_DOWN)
        self.in_flight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self.cfg.data_done_timeout):
                reply = await self._filter(txn, raw, origin)
        except TimeoutError:
            txn.abort()
            log.warning("smtp: %s from=<%s> rcpts=%d: no verdict and next-hop reply within data_done_timeout; answered 451",
                        _origin(origin), txn.mail_from, len(txn.rcpts))  # fmt: skip
            reply = TIMED_OUT
        except Exception:  # a bug must not become aiosmtpd's 500: Postfix would bounce the mail
            txn.abort()
            log.exception("smtp: %s from=<%s>: failed, answered 451", _origin(origin), txn.mail_from)
            reply = NEXT_HOP_DOWN
        finally:
            await txn.finish()
            # The reply is written right after this returns, with no await in between: a shutdown
            # waiting for `drained` cannot hang up before the client has it.
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        return self._answer(reply)

    async def drained(self) -> None:
        await self._idle.wait()

    async def _filter(self, txn: Transaction, raw: bytes, origin: list[tuple[str, str]]) -> str:
        x = txn.xforward
        inbound = Inbound("smtp", raw=raw, sender=txn.mail_from, recipients=tuple(txn.rcpts),
                          client_address=_xtext_decoded(x.get("ADDR", "")), ref=_xtext_decoded(x.get("IDENT", "")))  # fmt: skip
        scan = await self.path.scan(inbound)
        if scan.busy:
            return BUSY
        # Rewriting stays off the event loop for large mail: a few ms of regex on the loop is a few ms of
        # stall for every other session.
        args = (raw, tuple(txn.rcpts), scan.decision, scan.model, self.policy, scan.error, scan.report)
        outcome, message_id = await asyncio.to_thread(_decide, *args) if len(raw) > THREAD_DECIDE_BYTES else _decide(*args)
        queued_as, reply = "", outcome.reply
        if outcome.relay:
            r = await self._relay(txn, outcome)
            if not r.ok:
                log.warning("smtp: %s message_id=%s from=<%s> rcpts=%d not relayed, answered %s: %d %s",
                            _origin(origin), message_id, txn.mail_from, len(txn.rcpts),
                            passed_on(r)[:3], r.code, r.text)  # fmt: skip
                return passed_on(r)
            m = _QUEUED_AS.search(r.text)
            queued_as = m[1] if m else ""
            if queued_as:
                reply += f" (next hop queued as {queued_as})"
        self.path.done(scan, outcome.action, ref=inbound.ref or queued_as, lead=[*origin, ("message_id", message_id)],
                       tail=[("reply", reply[:3]), ("queued_as", queued_as)])  # fmt: skip
        return reply

    async def _relay(self, txn: Transaction, outcome: Outcome) -> Reply:
        """DATA on the transaction the client built; for other recipients (quarantine) a new one.
        A connection the next hop dropped before DATA (its idle timeout during a slow upload) is
        replayed once: nothing was delivered on it. Anything but the final reply failing is 451."""
        try:
            replayed = False
            if outcome.recipients != tuple(txn.rcpts) or txn.upstream is None:
                r, replayed = await txn.replay(self.relay, outcome.recipients), True
                if not r.ok:
                    return Reply(451, f"4.3.0 new transaction for {outcome.action}: {r.code} {r.text}")
            assert txn.upstream is not None
            try:
                r = await txn.upstream.command(b"DATA")
            except NextHopError:
                r = Reply(421, "4.4.2 connection lost")
            if r.code == 421 and not replayed:
                r = await txn.replay(self.relay, outcome.recipients)
                if not r.ok:
                    return Reply(451, f"4.3.0 after reconnecting: {r.code} {r.text}")
                assert txn.upstream is not None
                r = await txn.upstream.command(b"DATA")
            if r.code != 354:  # a 503 here is a confused next hop, not a reason to bounce
                return r if r.code != 503 else Reply(451, f"4.3.0 {r.code} {r.text}")
            return await txn.upstream.send_message(outcome.data)
        except NextHopError as e:
            txn.abort()
            return Reply(451, f"4.3.0 {e}")

def _decide(raw: bytes, rcpts: tuple[str, ...], d: Decision | None, model: str, policy: Policy, error: str,
            report: str = "") -> tuple[Outcome, str]:  # fmt: skip
    """`actions.apply` plus the Message-ID for the log line (in the worker thread, with the parse)."""
    head = raw[: raw.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in raw[:1 << 20] else raw[: 1 << 16]
    m = _MESSAGE_ID.search(head)
    message_id = _CONTROL.sub("", m[1].decode("ascii", "replace"))[:200] if m else ""
    return apply(raw, rcpts, d, model, policy, error, report), message_id or "-"


def _origin(fields: list[tuple[str, str]]) -> str:
    return _UNPRINTABLE.sub("?", " ".join(f"{k}={v}" for k, v in fields))


def _log_warm_failure(f: asyncio.Future[str]) -> None:
    if not f.cancelled() and f.exception() is not None:
        log.error("smtp: the parser processes failed to start: %r (large messages will follow on_error)", f.exception())


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a unit's LimitNOFILE, or the shell's); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
    return soft


class SmtpIngress:
    """The listening socket and its sessions; `run(stop)` serves until `stop` is set, then drains."""

    def __init__(
        self, cfg: SmtpConfig, path: MessagePath, metrics: FilterdMetrics | None = None, relay: Relay | None = None,
        headers: HeadersConfig | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.budget = ByteBudget(cfg.max_inflight_bytes)
        self.handler = FilterHandler(cfg, path, metrics, relay, self.budget, headers)
        self.max_connections = cfg.max_connections
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_Server] = set()
        self._per_client: Counter[str] = Counter()
        self._refusals = 0
        self._last_refusal_log = 0.0
        self._warm: asyncio.Future[str] | None = None

    @property
    def up(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def _session(self) -> _Server:
        return _Server(
            self.handler, self, data_size_limit=self.cfg.max_message_bytes, enable_SMTPUTF8=True,
            decode_data=False, hostname="filterd", ident="filterd", timeout=self.cfg.timeout,
        )  # fmt: skip

    # -- connection accounting (called by the sessions)

    def admit(self, client: str) -> str:
        """"" when a new session from `client` may start, else why not."""
        if len(self._sessions) >= self.max_connections:
            return f"max_connections ({self.max_connections}) reached"
        if self._per_client[client] >= self.cfg.max_connections_per_client:
            return f"max_connections_per_client ({self.cfg.max_connections_per_client}) reached"
        return ""

    def register(self, s: _Server) -> None:
        self._sessions.add(s)
        self._per_client[s._client] += 1

    def unregister(self, s: _Server) -> None:
        if s in self._sessions:
            self._sessions.discard(s)
            self._per_client[s._client] -= 1
            if self._per_client[s._client] <= 0:
                del self._per_client[s._client]

    def refused(self, client: str, why: str) -> None:
        """One log line per refused connection would be a flood: at most one a second, with a count."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            log.warning("smtp: refused %d connection(s) with 421, e.g. from %s: %s", self._refusals, client, why)
            self._refusals, self._last_refusal_log = 0, now

    # -- lifecycle

    async def start(self, serving: bool = True) -> None:
        """Bind now, so a port in use is a startup error rather than a silent dead ingress.

        `serving=False` binds without accepting yet: the daemon binds before the (slow) model load
        and accepts once it can classify.
        """
        nofile = raise_fd_limit()
        # Each session may hold two descriptors (the client's and the next hop's).
        fits = max(1, (nofile - _FD_RESERVE) // 2) if nofile != resource.RLIM_INFINITY else self.cfg.max_connections
        if fits < self.cfg.max_connections:
            log.warning("smtp: max_connections %d lowered to %d: the open files limit is %d (LimitNOFILE)",
                        self.cfg.max_connections, fits, nofile)  # fmt: skip
            self.max_connections = fits
        loop = asyncio.get_running_loop()
        # Start the parser processes now (a fraction of a second), not at the first large message.
        self._warm = self.handler.path.extractor.warm()
        self._warm.add_done_callback(_log_warm_failure)
        self._server = await loop.create_server(
            self._session, host=self.cfg.listen.host, port=self.cfg.listen.port, start_serving=serving
        )

    async def run(self, stop: asyncio.Event) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.start_serving()
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        """Stop accepting, let every message already in DATA finish (relayed and answered), then hang up.

        Sessions between messages are closed: Postfix reconnects later. A message whose bytes were
        still arriving is never answered, so Postfix keeps it queued and retries.
        """
        if self._server is None:
            return
        self._server.close()
        self.handler.closing = True
        await self.handler.drained()
        for s in list(self._sessions):
            if s.transport is not None:
                s.transport.close()
        await self._server.wait_closed()
