"""One SMTP session of the content filter (aiosmtpd underneath): the envelope as sent, DATA read in large chunks
within the in-flight byte budget, XFORWARD, connection caps, idle and session deadlines."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING, Any, Awaitable

from aiosmtpd.smtp import SMTP

from filterd.doors.smtp.nexthop import (
    IDLE_TIMEOUT,
    LONGEST_LINE,
    NO_MEMORY,
    SESSION_EXPIRED,
    TOO_BIG,
    TOO_MANY_CONNECTIONS,
    Transaction,
    XFORWARD_ATTRS,
    _DATA_END,
    _UNPRINTABLE,
    _xtext_decoded,
    parse_path,
)

log = logging.getLogger("filterd")

if TYPE_CHECKING:
    from filterd.doors.smtp.door import FilterHandler, SmtpIngress

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


