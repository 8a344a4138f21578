"""The HTTP scan door: Rspamd's scan protocol (so Exim, Haraka and Amavis work unchanged) and a plain
JSON `/classify` for applications and SMS gateways that do not use Redis.

Endpoints
    `POST /checkv2`  the raw message is the body; envelope in request headers (`From`, `Rcpt`
                     repeatable, `IP`, `Helo`, `Queue-Id`), as Rspamd takes them. JSON reply: `score`,
                     `required_score`, `action` (Rspamd's words), `symbols.FILTERD_GPT2`, `is_skipped`,
                     `message-id`, `subject` (rewrite subject), and `filterd` (our exact decision).
    `CHECK RSPAMC/1.3` the legacy line protocol Exim's `spamd_address = ... variant=rspamd` speaks (no
                     HTTP: `CHECK RSPAMC/1.3`, `Content-length`, envelope headers, the message; reply
                     `RSPAMD/1.3 0 EX_OK`, `Metric: default; True; score / required / reject`,
                     `Action: ...`, then the connection is closed, which is how Exim knows it has all).
    `GET /ping`      `pong` (text), as Rspamd; needs no password (a liveness probe reveals nothing).
    `POST /classify` JSON `{"text": ...}` or `{"email": base64 raw}`, optional `sender`, `recipients`;
                     reply `verdict`, `score` (P(spam)), `action` (ours), `reasons`, `model`, `threshold`.

Scale: Rspamd clients compare `score` with `required_score` (Exim's `spam = user` is true at
`score >= required_score`), so P(spam) maps piecewise-linearly with the spam threshold t at
`required_score`: [0, t] -> [0, R] and [t, 1] -> [R, 2R]. The order of scores is kept, so every
[policy] level is a fixed point on that scale too.

Actions: pass -> "no action", tag -> "add header", subject -> "rewrite subject", soft-reject ->
"soft reject", reject -> "reject"; quarantine -> "add header" and discard -> "reject", because the
clients act only on Rspamd's five words (Exim's ACL reads `$spam_action`, Haraka refuses on
"reject" and tags on "add header"): quarantined mail is at least tagged, and mail to discard is
refused before the queue, where the sender learns of it, rather than passed as clean.
`filterd.action` carries our own word for clients that can hold or drop mail themselves.

HTTP layer: filterd/net/http.py (the one server of the scan API, the metrics and the console):
keep-alive, Content-Length and chunked bodies (Node clients such as Haraka's send chunked),
`Expect: 100-continue`, zstd bodies (`rspamc --compressed`; other codings get 415). Bounds: request
head (431), body `max_body_bytes` (413, also while a chunked body grows or a zstd body is
decompressed), one `read_timeout` per request over request line, head and body (408), a keep-alive
connection idle `idle_timeout` is closed, `max_connections` (503 with Retry-After), verdict within
`reply_timeout` (503). The RSPAMC line protocol is a `LineProtocol` of that server, told by its
first line. Errors are one-line JSON `{"error": ...}`: 400 malformed, 401 no password, 403 wrong
password, 404/405, 415 unknown compression, 503 busy (full batcher queue, with `Retry-After`), 500
classification failure.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from filterd.config import HttpConfig
from filterd.doors.path import Inbound, MessagePath, Scan, verdict_line
from filterd.mail.head import first_fields
from filterd.mail.headers import subject_prefix
from filterd.policy.decision import Decision, Message, Policy
from filterd.policy.decision import scaled_score as rspamd_score  # one mapping for every door (the SpamAssassin headers use it too)
from filterd.net.http import MAX_HEAD_BYTES, HttpError, Request, Response, Server, ServerSettings

if TYPE_CHECKING:
    from filterd.obs.metrics import FilterdMetrics

log = logging.getLogger(__name__)

__all__ = ["RSPAMD_ACTION", "HttpDoor", "HttpError", "HttpServer", "Request", "rspamd_score"]

SYMBOL = "FILTERD_GPT2"

RSPAMD_ACTION = {
    "pass": "no action",
    "tag": "add header",
    "subject": "rewrite subject",
    "quarantine": "add header",  # see the module docstring
    "discard": "reject",
    "soft-reject": "soft reject",
    "reject": "reject",
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    model: str
    explanation: Any = None  # filterd.model.explain.Explanation, when [explain] gave one
    scan: Scan | None = None  # the message path's result (for the log line)


class Busy(Exception):
    """No verdict in time, or the batcher's queue is full: the client should retry (503)."""


class ClassificationFailed(Exception):
    """The model gave no verdict (500); the message is what failed."""


# --------------------------------------------------------------------------------------------
# The door: lists, text, score, decide


class HttpDoor:
    """One decision per request through the message path and [policy]'s "http" table."""

    def __init__(self, cfg: HttpConfig, path: MessagePath, policy: Policy, subject_prefix: str,
                 metrics: FilterdMetrics | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.path = path
        self.policy = policy
        self.prefix = subject_prefix
        self.metrics = metrics

    async def decide(self, message: Message, *, raw: bytes | None = None, text: str | None = None, ref: str = "",
                     client_address: str = "", authenticated: str = "") -> Outcome:  # fmt: skip
        """Busy (503) or another exception (500) when the model gives no verdict; metrics counted either way."""
        inbound = Inbound("http", raw=raw if text is None else None, text=text, sender=message.sender,
                          recipients=message.recipients, client_address=client_address, authenticated=authenticated,
                          ref=ref)  # fmt: skip
        scan = await self.path.scan(inbound, timeout=self.cfg.reply_timeout)
        if scan.busy:
            raise Busy("no verdict in time, or the classifier is full")
        if scan.decision is None:
            raise ClassificationFailed(scan.error)
        self.path.done(scan, scan.decision.action, log_line=False)  # the route writes the line: it knows the endpoint
        return Outcome(scan.decision, scan.model, scan.explanation, scan)

    # --- replies ---------------------------------------------------------------------

    def _scaled(self, d: Decision) -> float:
        r = self.cfg.required_score
        if d.score is None:  # a list decided: the ends of the scale
            return 2 * r if d.spam else 0.0
        return round(rspamd_score(d.score, d.threshold, r), 4)

    def reject_level(self, model_threshold: float, points: Mapping[float, float] | None = None) -> float:
        """Where this door rejects on Rspamd's scale (0 when it never does), for the legacy Metric line."""
        threshold, steps = self.policy.tables["http"].resolved(model_threshold, points)
        at = [s for s, _, a in steps if a == "reject"]
        return round(rspamd_score(at[0], threshold, self.cfg.required_score), 2) if at else 0.0

    def checkv2(self, o: Outcome, raw: bytes, elapsed: float) -> dict[str, Any]:
        d = o.decision
        score = self._scaled(d)
        desc = (f"GPT-2 classifier: P(spam)={d.score:.4f}, threshold {d.threshold:.4f}" if d.score is not None
                else f"not scored: {d.reasons[0]}")  # fmt: skip
        reply: dict[str, Any] = {
            "is_skipped": d.score is None,
            "score": score,
            "required_score": self.cfg.required_score,
            "action": RSPAMD_ACTION[d.action],
            "symbols": {SYMBOL: {"name": SYMBOL, "score": score, "metric_score": score, "description": desc,
                                 "options": [f"p={d.score:.4f}" if d.score is not None else d.listed, f"model={o.model or '-'}"]}},
            "messages": {},
            "time_real": round(elapsed, 6),
            "filterd": {"verdict": d.verdict, "action": d.action, "p_spam": d.score, "threshold": d.threshold,
                        "reasons": list(d.reasons), "model": o.model, "listed": d.listed},
        }  # fmt: skip
        if o.explanation is not None:  # the top words as symbol options too, for Rspamd-style consumers
            reply["filterd_explanation"] = o.explanation.to_json()
            reply["symbols"][SYMBOL]["options"] += [f"{c.word}({c.weight:+.3f})" for c in o.explanation.words]
        head = _headers_of(raw)
        if head.get("message-id"):
            reply["message-id"] = head["message-id"].strip().strip("<>")
        if d.action == "subject":
            reply["subject"] = subject_prefix(self.prefix) + head.get("subject", "")
        return reply

    def legacy(self, o: Outcome, raw: bytes) -> bytes:
        """Rspamd's RSPAMC/1.3 reply, in the shape Exim's spam.c scans (`Metric: default; %s %lf / %lf / %lf`)."""
        d = o.decision
        lines = [
            "RSPAMD/1.3 0 EX_OK",
            f"Metric: default; {'True' if d.spam else 'False'}; {self._scaled(d):.2f} / {self.cfg.required_score:.2f}"
            f" / {self.reject_level(d.threshold, o.scan.points if o.scan else None):.2f}",
            f"Action: {RSPAMD_ACTION[d.action]}",
            f"Symbol: {SYMBOL}({self._scaled(d):.2f})",
        ]
        head = _headers_of(raw)
        if head.get("message-id"):
            lines.append(f"Message-ID: {head['message-id'].strip().strip('<>')}")
        if d.action == "subject":
            lines.append(f"Subject: {subject_prefix(self.prefix)}{head.get('subject', '')}")
        return ("\r\n".join(_one_line(x) for x in lines) + "\r\n\r\n").encode("utf-8", "replace")


def _client(req: Request) -> dict[str, str]:
    """Client facts from Rspamd's request headers: `IP` (the SMTP client's address), `User` (its SASL login)."""
    return {"client_address": (req.header("ip") or "").strip(), "authenticated": (req.header("user") or "").strip()}


def _one_line(s: str) -> str:
    return re.sub(r"[\r\n]+", " ", s)


def _headers_of(raw: bytes) -> dict[str, str]:
    """Subject and Message-ID of a raw message (headers only, unfolded); {} when there are none."""
    return first_fields(raw, ("subject", "message-id"), MAX_HEAD_BYTES)


# --------------------------------------------------------------------------------------------
# The server: filterd.net.http's, with the scan routes and the legacy line protocol


class Rspamc:
    """Rspamd's legacy line protocol (`CHECK RSPAMC/1.3`), for Exim's `variant=rspamd`: HTTP-like headers and a
    Content-length body, but no target on the request line, and a reply of its own after which we close."""

    name = "rspamc"

    def request_line(self, line: bytes) -> tuple[str, str, str] | None:
        parts = line.split(b" ")  # "CHECK RSPAMC/1.3": no target
        if len(parts) not in (2, 3) or not parts[-1].startswith(b"RSPAMC/") or not _TOKEN.fullmatch(parts[0]):
            return None
        return parts[0].decode("latin-1").upper(), "/legacy", parts[-1].decode("latin-1")  # the command where HTTP has the method

    def error(self, status: int, message: str) -> bytes:
        return f"RSPAMD/1.3 {status} {_one_line(message)}\r\n\r\n".encode()


def settings_of(cfg: HttpConfig, name: str = "http") -> ServerSettings:
    """[http] as the server's settings: the Password header on every route but /ping."""
    return ServerSettings(name=name, host=cfg.listen.host, port=cfg.listen.port, max_body_bytes=cfg.max_body_bytes,
                          read_timeout=cfg.read_timeout, idle_timeout=cfg.idle_timeout, max_connections=cfg.max_connections,
                          password=cfg.password, password_header="password", open_paths=("/ping",),
                          listening="scan API listening on {host}:{port}")  # fmt: skip


class HttpServer(Server):
    """The scan API: `HttpDoor` behind filterd.net.http's server, routes /checkv2, /classify, /ping and RSPAMC."""

    def __init__(self, cfg: HttpConfig, door: HttpDoor) -> None:
        super().__init__(settings_of(cfg), self._route, errors=_error_reply, protocols=[Rspamc()], observe=self._observe)
        self.cfg = cfg
        self.door = door

    def _observe(self, req: Request, seconds: float) -> None:
        """Scans only, request read to reply written."""
        if self.door.metrics is not None and req.path != "/ping" and req.method != "PING":
            self.door.metrics.observe_request("http", seconds)

    # --- routes ----------------------------------------------------------------------

    async def _route(self, req: Request) -> bytes:
        routes = {"/ping": ("GET", "HEAD"), "/checkv2": ("POST",), "/classify": ("POST",)}
        try:
            if req.path == "/legacy":
                return await self._legacy(req)
            if req.path not in routes:
                raise HttpError(404, f"no such endpoint {req.path!r} (try /checkv2, /classify, /ping)")
            if req.method not in routes[req.path]:
                raise HttpError(405, f"{req.path} takes {' or '.join(routes[req.path])}")
            if req.path == "/ping":
                return _response(200, b"pong\r\n", "text/plain", req, head=req.method == "HEAD")
            if req.path == "/checkv2":
                return await self._checkv2(req)
            return await self._classify(req)
        except HttpError as e:
            return _error(e.status, str(e), req, retry_after=e.retry_after)

    def _envelope(self, req: Request) -> Message:
        rcpts = [r for v in req.all("rcpt") for r in v.split(",") if r.strip()]
        return Message("http", (req.header("from") or "").strip(), tuple(r.strip() for r in rcpts))

    async def _scan(self, message: Message, **what: Any) -> Outcome:
        try:
            return await self.door.decide(message, **what)
        except Busy as e:
            raise HttpError(503, f"busy: {e}; retry later", retry_after=1) from None
        except ClassificationFailed as e:  # the message path logged why
            raise HttpError(500, f"classification failed ({e})") from None
        except Exception as e:
            log.warning("http: classification failed: %s: %s", type(e).__name__, _one_line(str(e))[:200])
            raise HttpError(500, f"classification failed ({type(e).__name__})") from None

    async def _checkv2(self, req: Request) -> bytes:
        t0 = time.perf_counter()
        message = self._envelope(req)
        o = await self._scan(message, raw=req.body, ref=req.header("queue-id") or "", **_client(req))
        reply = self.door.checkv2(o, req.body, time.perf_counter() - t0)
        self._log(req, message, o, len(req.body))
        return _json(200, reply, req)

    async def _legacy(self, req: Request) -> bytes:
        if req.method == "PING":
            return b"RSPAMD/1.3 0 PONG\r\n\r\n"
        if req.method not in ("CHECK", "SYMBOLS", "REPORT"):
            return f"RSPAMD/1.3 1 unsupported command {req.method[:20]}\r\n\r\n".encode()
        message = self._envelope(req)
        try:
            o = await self._scan(message, raw=req.body, ref=req.header("queue-id") or "", **_client(req))
        except HttpError as e:  # Exim cannot parse this line, and defers the message (or not, with defer_ok)
            return f"RSPAMD/1.3 {e.status} {_one_line(str(e))}\r\n\r\n".encode()
        self._log(req, message, o, len(req.body))
        return self.door.legacy(o, req.body)

    async def _classify(self, req: Request) -> bytes:
        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"body is not JSON: {_one_line(str(e))[:120]}") from None
        if not isinstance(body, dict):
            raise HttpError(400, 'body must be a JSON object: {"text": ...} or {"email": base64}')
        unknown = set(body) - {"text", "email", "sender", "recipients"}
        if unknown:
            raise HttpError(400, f"unknown field {sorted(unknown)[0]!r} (known: text, email, sender, recipients)")
        if ("text" in body) == ("email" in body):
            raise HttpError(400, 'give exactly one of "text" (a string) or "email" (base64 raw message)')
        sender, rcpts = body.get("sender", ""), body.get("recipients", [])
        if not isinstance(sender, str) or not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
            raise HttpError(400, '"sender" must be a string and "recipients" a list of strings')
        message = Message("http", sender, tuple(rcpts))
        if "text" in body:
            if not isinstance(body["text"], str):
                raise HttpError(400, '"text" must be a string')
            o = await self._scan(message, text=body["text"])
        else:
            try:
                raw = base64.b64decode(body["email"], validate=True) if isinstance(body["email"], str) else None
            except (binascii.Error, ValueError):
                raw = None
            if raw is None:
                raise HttpError(400, '"email" must be the raw message in base64')
            o = await self._scan(message, raw=raw)
        d = o.decision
        self._log(req, message, o, len(req.body))
        reply = {"verdict": d.verdict, "score": d.score, "action": d.action, "reasons": list(d.reasons),
                 "model": o.model, "threshold": d.threshold, "listed": d.listed}  # fmt: skip
        if o.explanation is not None:  # `reasons` already names the policy's reasons; the words go beside them
            reply["explanation"] = o.explanation.to_json()
        return _json(200, reply, req)

    @staticmethod
    def _log(req: Request, m: Message, o: Outcome, size: int) -> None:
        assert o.scan is not None
        log.info("%s", verdict_line(o.scan, o.decision.action, lead=[("", req.path.lstrip("/") or "-"),
                                    ("queue_id", (req.header("queue-id") or "-")[:64])], size=size))  # fmt: skip


def _response(status: int, body: bytes, content_type: str, req: Request | None, *, head: bool = False,
              retry_after: int | None = None, close: bool = False) -> bytes:  # fmt: skip
    """Framed by filterd.net.http (HEAD gets no body there: `head` is kept for the callers' sake)."""
    return Response(status, body, content_type, close=close, retry_after=retry_after).encode(req)


def _json(status: int, obj: Any, req: Request | None, **kw: Any) -> bytes:
    return _response(status, json.dumps(obj, ensure_ascii=False).encode() + b"\n", "application/json", req, **kw)


_CLOSING = (400, 401, 403, 408, 411, 413, 415, 431, 501)  # errors of a request whose input may be left unread


def _error(status: int, message: str, req: Request | None, *, retry_after: int | None = None) -> bytes:
    """One-line JSON error (RSPAMC's error line for a legacy request); errors of reading close the connection."""
    if req is not None and req.legacy:
        return Rspamc().error(status, message)
    return _json(status, {"error": _one_line(message)}, req, retry_after=retry_after, close=status in _CLOSING)


def _error_reply(e: HttpError, req: Request | None) -> bytes:
    return _error(e.status, str(e), req, retry_after=e.retry_after)
