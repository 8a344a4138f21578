"""An SMTP server that keeps what it is sent: the next hop (or final destination) in SMTP tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .services import free_port

REFUSE_REPLY = "451 4.3.0 sink refusing"


@dataclass(frozen=True)
class Received:
    """One delivered message: the envelope and the exact bytes after DATA (dot-unstuffed, CRLF kept)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class _LongLines(SMTP):
    line_length_limit = 1 << 20  # like Postfix, take lines over RFC 5321's 1000 bytes rather than 500 them


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _LongLines(self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, sink: "SmtpSink") -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.refuse:
            return REFUSE_REPLY
        data = envelope.original_content if envelope.original_content is not None else envelope.content
        assert isinstance(data, bytes)
        self.sink._record(Received(envelope.mail_from or "", tuple(envelope.rcpt_tos), bytes(data)))
        return "250 2.0.0 OK: stored"


class SmtpSink:
    """aiosmtpd in its own thread on 127.0.0.1. restart() keeps the port, so a test can take the
    next hop down and bring it back; `refuse` (settable at any time) answers DATA with a 451."""

    def __init__(self, port: int | None = None, *, refuse: bool = False, ready_timeout: float = 10.0) -> None:
        self.port = port or free_port()
        self.refuse = refuse
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
            enable_SMTPUTF8=True,  # 8BITMIME is advertised by default
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
