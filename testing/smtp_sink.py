"""An SMTP server that keeps what it is sent: the next hop (or final destination) in SMTP tests.

Besides aiosmtpd's view of the envelope (which decodes RFC 2047 words in addresses), it records
the addresses exactly as they were on the command line, and the XFORWARD attributes it was given.
It can refuse chosen recipients, refuse or delay the final reply to DATA, and be started without
SMTPUTF8 or with XFORWARD."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from testing.services import free_port

REFUSE_REPLY = "451 4.3.0 sink refusing"


@dataclass(frozen=True)
class Received:
    """One delivered message: the envelope and the exact bytes after DATA (dot-unstuffed, CRLF kept)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    raw_from: str = ""  # the address as sent on the MAIL command line, undecoded
    raw_rcpts: tuple[str, ...] = ()  # likewise for RCPT
    xforward: dict[str, str] = field(default_factory=dict)
    queue_id: str = ""


_PATH = re.compile(r"(?i)^\s*(?:FROM|TO):\s*<(.*)>(?:\s.*)?$")


def _raw_path(arg: str | None) -> str:
    m = _PATH.match(arg or "")
    return m[1] if m else (arg or "")


class _LongLines(SMTP):
    line_length_limit = 1 << 20  # like Postfix, take lines over RFC 5321's 1000 bytes rather than 500 them

    def __init__(self, *a, **kw) -> None:
        self.raw_path = ""
        self.xforward: dict[str, str] = {}
        super().__init__(*a, **kw)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.raw_path = _raw_path(arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.raw_path = _raw_path(arg)
        await super().smtp_RCPT(arg)

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if not self.event_handler.sink.xforward:
            await self.push('500 Error: command "XFORWARD" not recognized')
            return
        for item in (arg or "").split():
            name, _, value = item.partition("=")
            self.xforward[name.upper()] = value
        self.event_handler.sink.xforward_commands.append(arg or "")
        await self.push("250 2.0.0 Ok")


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _LongLines(self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, sink: "SmtpSink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.xforward:
            responses.insert(-1, "250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.raw_from = server.raw_path  # type: ignore[attr-defined]
        envelope.raw_rcpts = []  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        raw = server.raw_path  # type: ignore[attr-defined]
        refusal = self.sink.refuse_rcpts.get(raw)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.raw_rcpts.append(raw)  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.refuse:
            return self.sink.refuse_reply
        data = envelope.original_content if envelope.original_content is not None else envelope.content
        assert isinstance(data, bytes)
        queue_id = f"SINK{len(self.sink.messages) + 1:04d}"
        self.sink._record(Received(envelope.mail_from or "", tuple(envelope.rcpt_tos), bytes(data), envelope.raw_from,
                                   tuple(envelope.raw_rcpts), dict(server.xforward), queue_id))  # type: ignore[attr-defined]  # fmt: skip
        if self.sink.data_delay:  # the message is stored; the reply is late (a slow next hop)
            await asyncio.sleep(self.sink.data_delay)
        return f"250 2.0.0 OK: queued as {queue_id}"


class SmtpSink:
    """aiosmtpd in its own thread on 127.0.0.1. restart() keeps the port, so a test can take the
    next hop down and bring it back; `refuse` (settable at any time) answers DATA with `refuse_reply`
    (a 451 unless changed); `refuse_rcpts` maps a recipient (as sent) to the reply refusing it;
    `data_delay` holds the reply to DATA back that many seconds after the message is stored.
    `smtputf8` and `xforward` say what EHLO offers (set them before start)."""

    def __init__(
        self, port: int | None = None, *, refuse: bool = False, ready_timeout: float = 10.0, smtputf8: bool = True,
        xforward: bool = False,
    ) -> None:  # fmt: skip
        self.port = port or free_port()
        self.refuse = refuse
        self.refuse_reply = REFUSE_REPLY
        self.refuse_rcpts: dict[str, str] = {}
        self.data_delay = 0.0
        self.smtputf8 = smtputf8
        self.xforward = xforward
        self.xforward_commands: list[str] = []
        self.ready_timeout = ready_timeout
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._controller: Controller | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> "SmtpSink":
        if self._controller is not None:
            return self
        # A new Controller each time: a stopped one has closed its event loop.
        controller = _Controller(
            _Handler(self),
            hostname="127.0.0.1",  # not "localhost": that may resolve to ::1 first
            port=self.port,
            ready_timeout=self.ready_timeout,
            server_hostname="sink.test",
            decode_data=False,  # keep the bytes exactly as received
            enable_SMTPUTF8=self.smtputf8,  # 8BITMIME is advertised by default
            data_size_limit=None,
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:  # the port may linger briefly after a restart
            try:
                controller.start()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._controller = controller
        return self

    def stop(self) -> None:
        """Close the listener (connections in flight are cut); safe to call when stopped."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def restart(self, downtime_s: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime_s)
        self.start()

    def _record(self, message: Received) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    @property
    def messages(self) -> list[Received]:
        """A copy of everything received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least n messages have arrived; returns them all (a copy)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= n, timeout):
                got = [(m.mail_from, m.rcpt_tos) for m in self._messages]
                raise AssertionError(f"sink {self.address}: expected {n} message(s) within {timeout}s, got {len(got)}: {got}")
            return list(self._messages)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def send_concurrently(
    port: int, messages: Sequence[bytes | Path], *, timeout: float = 120, concurrency: int | None = None,
    sender: str = "sender@example.org",
) -> list[int]:
    """Each message in its own SMTP session to 127.0.0.1:`port`, at most `concurrency` at a time (None: all
    at once); the final reply code of each. A Path is read only when its session starts."""
    import aiosmtplib

    gate = asyncio.Semaphore(concurrency or max(len(messages), 1))

    async def one(i: int, message: bytes | Path) -> int:
        async with gate:
            raw = message.read_bytes() if isinstance(message, Path) else message
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout, start_tls=False)
            await client.connect()
            try:
                await client.sendmail(sender, [f"user{i}@example.net"], raw)
                return 250
            except aiosmtplib.SMTPResponseException as e:
                return e.code
            finally:
                client.close()

    return await asyncio.gather(*(one(i, m) for i, m in enumerate(messages)))
