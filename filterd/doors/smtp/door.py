"""The content filter door: the message path's decision carried out on the bytes, relayed to the next hop, answered.

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
import logging
import resource
import time
from collections import Counter

from aiosmtpd.smtp import SMTP, Envelope, Session

from filterd.config import HeadersConfig, SmtpConfig
from filterd.doors.smtp.nexthop import (
    BUSY,
    NEXT_HOP_DOWN,
    NO_MEMORY,
    NO_SMTPUTF8,
    NextHopError,
    Relay,
    Reply,
    SHUTTING_DOWN,
    THREAD_DECIDE_BYTES,
    TIMED_OUT,
    TOO_MANY_RCPTS,
    Transaction,
    XFORWARD_ATTRS,
    _CONTROL,
    _FD_RESERVE,
    _MESSAGE_ID,
    _QUEUED_AS,
    _UNPRINTABLE,
    _UTF8_NOT_OFFERED,
    _xtext_decoded,
    passed_on,
)
from filterd.doors.smtp.session import (
    ByteBudget,
    _Server,
)
from filterd.doors.path import Inbound, MessagePath
from filterd.mail.headers import Outcome, Policy, apply
from filterd.obs.metrics import FilterdMetrics
from filterd.policy.decision import Decision

log = logging.getLogger("filterd")


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

