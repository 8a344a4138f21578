"""The one message path: everything between a door's protocol and its reply, written once for every door.

A door turns its protocol into an `Inbound` (the raw mail, or a text, the envelope, client facts),
calls `MessagePath.scan`, carries out the `Scan`'s decision in its own protocol (header edits
through `filterd.mail.headers`, Subject, reply code), then calls `done` with the action it took.
Everything else happens here, in this order, the same for every door:

    allow/deny lists -> scan budget (filterd.mail.budget) -> bounded text extraction
    (filterd.doors.extraction) -> tokens -> the batcher -> the decision ([policy]) -> the explanation
    (only through the bounded explainer) -> metrics -> reservoir; and at `done`: the action count,
    the verdict history, one log line.

A message without a verdict gets `Scan.error`: "busy" (the batcher's queue or the parser processes
are full, or no score within the door's timeout: the client should retry) or the failure's name; the
door applies its `on_error` to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

from filterd.doors.extraction import ExtractionBusy, Extractor, ParserDied
from filterd.mail.budget import HEADER_BYTES, HEADERS_CUT, scan_view
from filterd.mail.head import head_of
from filterd.mail.spam_fields import explanation_header
from filterd.model.batcher import QueueFull, Scored
from filterd.policy.decision import Decision, Message, Policy

log = logging.getLogger("filterd")

BUSY = "busy"  # Scan.error when the message should be retried later
HEAD_BYTES = 65536  # of the raw mail kept for the history's Subject
_UNPRINTABLE = re.compile(r"[^ -~]")

# text, wait_when_full -> the score. Raises QueueFull when the batcher's queue is full and not waiting.
ScoreFn = Callable[[str, bool], Awaitable[Scored]]


@dataclass(frozen=True)
class Inbound:
    """One message as a door received it."""

    door: str  # smtp | milter | http | redis
    raw: bytes | None = None  # the mail as received (only what the door kept, for the milter)
    text: str | None = None  # a text to score as is, instead of `raw` (Redis, /classify with "text")
    sender: str = ""  # envelope sender, "" for <> or unknown
    recipients: tuple[str, ...] = ()
    client_address: str = ""  # the SMTP client's IP address, as the MTA saw it
    authenticated: str = ""  # the client's SASL login name, "" when not authenticated
    ref: str = ""  # the MTA's queue id, the Redis entry id: history and log line
    size: int | None = None  # bytes received, for the log line (default len(raw))
    headers_cut: bool = False  # the door itself kept only part of an overlong header block (milter)

    def message(self) -> Message:
        return Message(self.door, self.sender, self.recipients, self.client_address, self.authenticated)


@dataclass(frozen=True)
class Scan:
    """What `scan` found: the decision, or why there is none."""

    inbound: Inbound
    decision: Decision | None
    model: str = ""  # the version of the model that scored it ("" when a list decided)
    error: str = ""  # no decision: BUSY, or what failed (an exception's name, "nan-score", "parser-died")
    text: str | None = None  # what the model read
    explanation: Any = None  # filterd.model.explain.Explanation, when [explain] gave one
    report: str = ""  # the X-Spam-Report value for it ("" unless [explain] header is on)
    started: float = 0.0  # time.perf_counter() when the door handed the message over
    points: Mapping[float, float] | None = None  # the scoring model's operating points (None: not scored)

    @property
    def busy(self) -> bool:
        return self.error == BUSY


class MessagePath:
    """The path (see the module docstring). `history` and `reservoir` are set by the daemon when enabled."""

    def __init__(self, policy: Policy, score: ScoreFn, *, metrics: Any = None, explainer: Any = None,
                 extractor: Extractor | None = None, scan_bytes: Mapping[str, int] | None = None,
                 header_bytes: int = HEADER_BYTES) -> None:  # fmt: skip
        self.policy = policy
        self.score = score
        self.metrics = metrics
        self.explainer = explainer  # filterd.model.explainer.Explainer
        self.extractor = extractor or Extractor()
        self.scan_bytes = dict(scan_bytes or {})  # door -> bytes of a mail parsed for its text (default: all)
        self.header_bytes = header_bytes
        self.history: Any = None  # filterd.store.history.HistoryWriter
        self.reservoir: Any = None  # filterd.store.reservoir.ReservoirWriter

    @classmethod
    def of(cls, score: Callable[[str], Awaitable[Scored]], policy: Policy | None = None, **kw: Any) -> MessagePath:
        """A path around a plain `score(text)` (embedding a door, tests): waits for no queue."""

        async def scored(text: str, wait_when_full: bool) -> Scored:
            return await score(text)

        return cls(policy or Policy.default(), scored, **kw)

    async def scan(self, inbound: Inbound, *, wait_when_full: bool = False, timeout: float | None = None) -> Scan:
        """Lists, text, score, decision, explanation, the door's result metrics. `wait_when_full`: wait for room
        in the batcher's queue instead of answering busy (Redis, which simply reads more slowly); `timeout`: no
        score within it is busy."""
        t0 = time.perf_counter()
        message = inbound.message()
        d, model, error, text, explanation, report = self.policy.listed(message), "", "", None, None, ""
        points: Mapping[float, float] | None = None
        if d is None:
            try:
                text, cut = await self._text(inbound)
                if timeout is None:
                    scored = await self.score(text, wait_when_full)
                else:
                    async with asyncio.timeout(timeout):
                        scored = await self.score(text, wait_when_full)
                if math.isnan(scored.score):  # a broken model: on_error, as for any failed classification
                    raise _NanScore()
                points = getattr(scored, "points", None) or {}  # a scorer given to MessagePath.of may know no operating points
                d, model = self.policy.decide(message, scored.score, scored.threshold, points), scored.model
                if cut:
                    d = dataclasses.replace(d, reasons=(*d.reasons, HEADERS_CUT))
                if self.reservoir is not None:
                    self.reservoir.offer(text, inbound.door)
                if self.explainer is not None:  # bounded: queue, deadline, nice; None when skipped
                    explanation = await self.explainer.explain(inbound.door, text, d)
                    report = explanation_header(explanation, self.explainer.cfg)
            except (QueueFull, ExtractionBusy, TimeoutError) as e:
                error = BUSY
                log.warning("%s: %s deferred as busy: %s", inbound.door, _ref(inbound), _why_busy(e))
            except ParserDied:
                error = "parser-died"
            except _NanScore:
                error = "nan-score"
                log.error("%s: the model scored NaN", inbound.door)
            except Exception as e:  # the model failed: the door's on_error decides
                error = type(e).__name__
                log.error("%s: %s classification failed: %r", inbound.door, _ref(inbound), e)
            if error:
                d = None
        if self.metrics is not None:
            self.metrics.observe_result(source=inbound.door, verdict=d.verdict if d else "error", score=d.score if d else None,
                                        seconds=time.perf_counter() - t0)  # fmt: skip
        return Scan(inbound, d, model, error, text, explanation, report, t0, points)

    async def _text(self, inbound: Inbound) -> tuple[str, bool]:
        if inbound.text is not None:
            return inbound.text, False
        raw = inbound.raw or b""
        view = scan_view(raw, self.scan_bytes.get(inbound.door, len(raw) or 1), self.header_bytes)
        text = await self.extractor.extract(view.raw, inbound.door, inbound.client_address)
        return text, view.headers_cut or inbound.headers_cut

    def done(self, scan: Scan, action: str, *, ref: str = "", lead: Sequence[tuple[str, str]] = (),
             tail: Sequence[tuple[str, str]] = (), log_line: bool = True) -> None:  # fmt: skip
        """The door carried out `action`: count it, record the verdict, write the log line. `lead` and `tail` are
        the door's own `key=value` fields before and after the common ones (a bare word when the key is "")."""
        inbound, d = scan.inbound, scan.decision
        if self.metrics is not None:
            self.metrics.count_action(inbound.door, action)
        if self.history is not None and d is not None:
            head = head_of(inbound.raw or b"", HEAD_BYTES)  # the Subject's block, not the body
            self.history.record(inbound.door, inbound.message(), d, scan.model, action, ref=ref or inbound.ref, text=scan.text,
                                head=head, explanation=scan.explanation)  # fmt: skip
        if log_line:
            log.info("%s", verdict_line(scan, action, lead, tail))


def verdict_line(scan: Scan, action: str, lead: Sequence[tuple[str, str]] = (), tail: Sequence[tuple[str, str]] = (),
                 size: int | None = None) -> str:  # fmt: skip
    """The one log line per message: `door: [lead] from=<..> rcpts=N size=N verdict=.. action=.. [tail]`; `size`: the
    bytes received, when the door knows better than the message (an HTTP request's body)."""
    inbound, d = scan.inbound, scan.decision
    if size is None:
        size = inbound.size if inbound.size is not None else len(inbound.raw or b"") if inbound.text is None else len(inbound.text)
    if d is None:
        verdict = "verdict=unknown"
    elif d.score is None:
        verdict = f"verdict={d.verdict} listed={d.listed}"
    else:
        verdict = f"verdict={d.verdict} score={d.score:.4f}"
    words = [inbound.door + ":", *(_field(k, v) for k, v in lead)]
    words += [f"from=<{_safe(inbound.sender, 256)}>", f"rcpts={len(inbound.recipients)}", f"size={size}", verdict, f"action={action}"]
    words += [_field(k, v) for k, v in tail]
    return " ".join(words)


def _field(key: str, value: str) -> str:
    return _safe(value, 256) if not key else f"{key}={_safe(value, 256) or '-'}"


def _safe(text: str, limit: int) -> str:
    """A log field cannot add a line or pass for another field's text: printable ASCII only."""
    return _UNPRINTABLE.sub("?", text)[:limit]


def _ref(inbound: Inbound) -> str:
    return f"message {_safe(inbound.ref, 64)}" if inbound.ref else "a message"


def _why_busy(e: Exception) -> str:
    if isinstance(e, QueueFull):
        return "the classifier's queue is full"
    if isinstance(e, TimeoutError):
        return "no score within the door's timeout"
    return str(e)


class _NanScore(Exception):
    pass
