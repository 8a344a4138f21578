"""The content filter's next hop: a minimal SMTP client, and one mail transaction passed on as it arrives.

The envelope travels byte for byte (addresses are the exact text the client sent); the next hop's
verdict on each step is the client's answer; the destination is always the configured next hop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec
from email.errors import HeaderParseError
from typing import Iterator


from filterd.config import HostPort

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


