"""SMTP ingress: filterd as a Postfix after-queue content filter (aiosmtpd server, aiosmtplib relay).

Postfix hands each queued message to `[smtp] listen`; filterd classifies it through the shared
batcher, applies the action (`filterd/actions.py` decides, nothing here does), re-injects the
result to `[smtp] next_hop`, and only then answers 250. Any failure before the next hop has
accepted the whole message is answered 451, so the message stays in Postfix's queue and nothing
is lost or half-delivered. The destination is always the configured next hop, never derived from
the recipients: filterd cannot be used as an open relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from ..actions import Classification, Outcome, Policy, decide
from ..batcher import QueueFull, Scored
from ..config import HostPort, SmtpConfig
from ..mail import extract_text
from ..metrics import FilterdMetrics

log = logging.getLogger("filterd")

ScoreFn = Callable[[str], Awaitable[Scored]]

TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
BUSY = "451 4.3.2 filterd is busy, try again later"
NEXT_HOP_DOWN = "451 4.3.0 Next hop unavailable, try again later"
SHUTTING_DOWN = "421 4.3.2 filterd shutting down"
LONGEST_LINE = 1 << 20
# Parsing or rewriting a large mail takes long enough to stall every other session: do it in a thread.
THREAD_PARSE_BYTES = 256 * 1024


class RelayError(Exception):
    """The next hop did not take the whole message; `reply` is what the client is told."""

    def __init__(self, why: str, reply: str = NEXT_HOP_DOWN) -> None:
        super().__init__(why)
        self.reply = reply


@dataclass(frozen=True)
class Relay:
    """The SMTP client side: one connection per message to the configured next hop, no TLS (loopback)."""

    next_hop: HostPort
    timeout: float
    local_hostname: str = "filterd"

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool, body: str | None) -> None:
        """All recipients accepted, then DATA; a refused recipient aborts the whole transaction (RSET).

        aiosmtplib's sendmail would deliver to the accepted recipients and report the others,
        which here would be half a delivery that the client then retries in full.
        """
        client = aiosmtplib.SMTP(
            hostname=self.next_hop.host, port=self.next_hop.port, timeout=self.timeout,
            start_tls=False, use_tls=False, local_hostname=self.local_hostname,
        )  # fmt: skip
        try:
            await client.connect()
            await client.ehlo()
            options = []
            if body == "8BITMIME" and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            if smtputf8:
                if not client.supports_extension("smtputf8"):
                    raise RelayError("next hop does not support SMTPUTF8")
                options.append("SMTPUTF8")
            enc = "utf-8" if smtputf8 else "ascii"
            await client.mail(mail_from, options=options, encoding=enc)
            for rcpt in recipients:
                await client.rcpt(rcpt, encoding=enc)
            await client.data(data)
        except aiosmtplib.SMTPResponseException as e:
            raise RelayError(f"next hop refused: {e.code} {e.message}") from None
        except (aiosmtplib.SMTPException, OSError, UnicodeEncodeError) as e:
            raise RelayError(f"next hop {self.next_hop}: {e}") from None
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()


class _Server(SMTP):
    """aiosmtpd's SMTP session with enhanced status codes on its own size refusals."""

    # RFC 5321 says 1000 bytes a line, but real mail breaks it (24 of the 6,046 SpamAssassin
    # messages do) and Postfix passes such lines on. aiosmtpd would answer 500, and Postfix would
    # bounce the message: a filter must not lose mail over line length.
    line_length_limit = LONGEST_LINE

    def __init__(self, handler: "FilterHandler", sessions: set["_Server"], **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._filter = handler
        self._sessions = sessions  # the ingress closes what is left of them at shutdown
        sessions.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(exc)

    async def push(self, status: Any) -> None:
        # aiosmtpd answers an oversize message itself (at MAIL SIZE= and during DATA) without an
        # RFC 3463 code; clients and logs expect 552 5.3.4.
        if isinstance(status, str) and status.startswith("552 Error"):
            status = TOO_BIG
            self._filter.count_reply(status)
        await super().push(status)


class FilterHandler:
    """aiosmtpd handler hooks: the SMTP conversation; the decision itself is `actions.decide`."""

    def __init__(self, cfg: SmtpConfig, score: ScoreFn, metrics: FilterdMetrics | None = None, relay: Relay | None = None) -> None:
        self.cfg = cfg
        self.score = score
        self.metrics = metrics
        self.policy = Policy.from_config(cfg)
        self.relay = relay or Relay(cfg.next_hop, cfg.timeout)
        self.in_flight = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def count_reply(self, reply: str) -> None:
        if self.metrics is not None:
            self.metrics.smtp_replies.labels(code=reply[:3]).inc()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.cfg.max_recipients:
            self.count_reply(TOO_MANY_RCPTS)
            return TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.closing:
            self.count_reply(SHUTTING_DOWN)
            return SHUTTING_DOWN
        self.in_flight += 1
        self._idle.clear()
        try:
            reply = await self._filter(envelope)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        self.count_reply(reply)
        return reply

    async def drained(self) -> None:
        await self._idle.wait()

    async def _filter(self, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        t0 = time.perf_counter()
        c, error = await self._classify(raw)
        if error == "busy":
            self._observe("error", None, t0)
            log.warning("smtp: batcher queue full, message from <%s> deferred", envelope.mail_from)
            return BUSY
        self._observe(c.verdict if c else "error", c.score if c else None, t0)
        args = (raw, envelope.rcpt_tos, c, self.policy, error)
        outcome = await asyncio.to_thread(decide, *args) if len(raw) > THREAD_PARSE_BYTES else decide(*args)
        if outcome.relay:
            try:
                await self.relay.send(
                    envelope.mail_from, outcome.recipients, outcome.data,
                    smtputf8=envelope.smtp_utf8, body=_body_type(envelope.mail_options),
                )  # fmt: skip
            except RelayError as e:
                log.warning("smtp: from=<%s> rcpts=%d not relayed, answered %s: %s", envelope.mail_from,
                            len(envelope.rcpt_tos), e.reply[:3], e)  # fmt: skip
                return e.reply
        self._log(envelope, raw, c, outcome)
        return outcome.reply

    async def _classify(self, raw: bytes) -> tuple[Classification | None, str]:
        """The verdict, or None with a short reason ("busy" when the batcher's queue is full)."""
        try:
            text = await asyncio.to_thread(extract_text, raw) if len(raw) > THREAD_PARSE_BYTES else extract_text(raw)
            scored = await self.score(text)
        except QueueFull:
            return None, "busy"
        except Exception as e:  # the model failed: on_error decides between relaying untagged and 451
            log.error("smtp: classification failed: %r", e)
            return None, type(e).__name__
        return Classification(scored.verdict, scored.score, scored.threshold, scored.model), ""

    def _observe(self, verdict: str, score: float | None, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_result(source="smtp", verdict=verdict, score=score, seconds=time.perf_counter() - t0)

    def _log(self, envelope: Envelope, raw: bytes, c: Classification | None, outcome: Outcome) -> None:
        verdict = f"verdict={c.verdict} score={c.score:.4f}" if c else "verdict=unknown"
        log.info("smtp: from=<%s> rcpts=%d size=%d %s action=%s reply=%s", envelope.mail_from, len(envelope.rcpt_tos),
                 len(raw), verdict, outcome.action, outcome.reply[:3])  # fmt: skip


def _body_type(mail_options: Sequence[str]) -> str | None:
    for opt in mail_options:
        if opt.upper().startswith("BODY="):
            return opt.split("=", 1)[1].upper()
    return None


class SmtpIngress:
    """The listening socket and its sessions; `run(stop)` serves until `stop` is set, then drains."""

    def __init__(self, cfg: SmtpConfig, score: ScoreFn, metrics: FilterdMetrics | None = None, relay: Relay | None = None) -> None:
        self.cfg = cfg
        self.handler = FilterHandler(cfg, score, metrics, relay)
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_Server] = set()

    @property
    def up(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def _session(self) -> _Server:
        return _Server(
            self.handler, self._sessions, data_size_limit=self.cfg.max_message_bytes, enable_SMTPUTF8=True,
            decode_data=False, hostname="filterd", ident="filterd", timeout=self.cfg.timeout,
        )  # fmt: skip

    async def start(self, serving: bool = True) -> None:
        """Bind now, so a port in use is a startup error rather than a silent dead ingress.

        `serving=False` binds without accepting yet: the daemon binds before the (slow) model load
        and accepts once it can classify.
        """
        loop = asyncio.get_running_loop()
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

