"""The milter server: the listening socket, one session per MTA connection, Postfix's timing rules.

Each session collects one message per transaction into a `MilterMessage` (bounded by
`max_message_bytes`, a frame limit and capped lists; fields in our namespaces and the Subject are
kept apart, whatever comes before them), calls the injected `on_message(msg) -> MilterReply` under
`reply_timeout`, and encodes the reply. Deciding what to answer is `filterd.doors.milter.door`'s.
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
from typing import Awaitable, Callable

from filterd.config import MilterConfig, UnixSocket
from filterd.doors.milter.protocol import (
    Accept, AddHeader, ChangeSubject, DeleteHeader, Discard, FORGED_PREFIXES, MAX_FRAME, MAX_HEADERS, MAX_MACROS,
    MAX_RECIPIENTS, MilterMessage, MilterReply, Modification, ProtocolError, Quarantine, Reject, SMFIC_ABORT,
    SMFIC_BODY, SMFIC_BODYEOB, SMFIC_CONNECT, SMFIC_DATA, SMFIC_EOH, SMFIC_HEADER, SMFIC_HELO, SMFIC_MACRO, SMFIC_MAIL,
    SMFIC_OPTNEG, SMFIC_QUIT, SMFIC_QUIT_NC, SMFIC_RCPT, SMFIC_UNKNOWN, SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_QUARANTINE,
    SMFIP_HDR_LEADSPC, SMFIP_NODATA, SMFIP_NOEOH, SMFIP_NOHELO, SMFIP_NOUNKNOWN, SMFIP_SKIP, SMFIR_ACCEPT,
    SMFIR_ADDHEADER, SMFIR_CHGHEADER, SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_QUARANTINE, SMFIR_REPLYCODE, SMFIR_SKIP,
    Tempfail, VERSION, WANTED_ACTIONS, WANTED_STEPS, _NO_REPLY_BIT, _address, _cstrings, _frame, _text, _wire,
)
from filterd.mail.budget import FIELD_BYTES, NEEDED_FIELD, header_limit
from filterd.policy.replies import reply_parts

log = logging.getLogger("filterd.doors.milter")

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
        """(command, data), or None on a clean end of stream between packets.

        One deadline per packet, its length and payload together: an MTA sends them at once, and
        a timer per read was a tenth of this door's CPU (a message is ~30 packets)."""
        async with asyncio.timeout(self.cfg.idle_timeout):  # cheaper than wait_for: no task per read
            try:
                head = await self.reader.readexactly(4)
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    return None
                raise
            (length,) = struct.unpack("!I", head)
            if not 1 <= length <= MAX_FRAME:
                raise ProtocolError(f"packet length {length} out of range 1..{MAX_FRAME}")
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
                if not self.writer.transport.get_write_buffer_size():
                    await self.writer.drain()  # all sent: returns at once (a timer here cost more than the reply)
                    continue
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
        if msg.size > header_limit(self.cfg.max_message_bytes) and not msg.headers_cut:
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

