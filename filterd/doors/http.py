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

HTTP layer: asyncio streams and a small HTTP/1.1 parser of our own. The deps have no HTTP server
(aiohttp and friends would be a new heavy dependency for four routes), and MetricsServer's layer
serves one bodiless GET per connection. Supported: keep-alive (HTTP/1.1 default, HTTP/1.0 with
`Connection: keep-alive`), `Content-Length` and chunked bodies (Node clients such as Haraka's send
chunked), `Expect: 100-continue`. Bounds: request head `MAX_HEAD_BYTES` (431), body
`max_body_bytes` (413, also while a chunked body grows), head and body within `read_timeout`
(408), a keep-alive connection idle `idle_timeout` is closed, verdict within `reply_timeout` (503).
Errors are one-line JSON `{"error": ...}`: 400 malformed, 401 no password, 403 wrong password,
404/405, 503 busy (full batcher queue, with `Retry-After`), 500 classification failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.parser
import email.policy
import hmac
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filterd.config import HttpConfig
from filterd.doors.path import Inbound, MessagePath, Scan, verdict_line
from filterd.mail.headers import subject_prefix
from filterd.policy.decision import Decision, Message, Policy
from filterd.policy.decision import scaled_score as rspamd_score  # one mapping for every door (the SpamAssassin headers use it too)

if TYPE_CHECKING:
    from filterd.obs.metrics import FilterdMetrics

log = logging.getLogger(__name__)

__all__ = ["RSPAMD_ACTION", "HttpDoor", "HttpServer", "rspamd_score"]

MAX_HEAD_BYTES = 65536  # request line + headers: room for a few hundred Rcpt headers
MAX_HEADERS = 1000
LINGER_BYTES = 1 << 20  # input discarded after refusing a request, before hanging up
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
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}  # fmt: skip
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HttpError(Exception):
    """A request that gets an error reply; `close` when its input was left unread."""

    def __init__(self, status: int, message: str, *, close: bool = False, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.close, self.retry_after = status, close, retry_after


@dataclass
class Request:
    method: str
    path: str
    version: str  # "HTTP/1.1", "HTTP/1.0" or "RSPAMC/1.3" (legacy)
    headers: list[tuple[str, str]]  # (lower-case name, value) in order
    body: bytes = b""
    query: str = ""  # after "?" in the target (the console's filters)

    @property
    def legacy(self) -> bool:
        return self.version.startswith("RSPAMC/")

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def keep_alive(self) -> bool:
        if self.legacy:
            return False  # Exim reads until we close
        conn = (self.header("connection") or "").lower()
        return "keep-alive" in conn if self.version == "HTTP/1.0" else "close" not in conn


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

    def reject_level(self, model_threshold: float) -> float:
        """Where this door rejects on Rspamd's scale (0 when it never does), for the legacy Metric line."""
        threshold, steps = self.policy.tables["http"].resolved(model_threshold)
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
            f" / {self.reject_level(d.threshold):.2f}",
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
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:MAX_HEAD_BYTES])
    except Exception:  # never let a header oddity cost the reply
        return {}
    out = {}
    for name in ("subject", "message-id"):
        value = msg.get(name)
        if isinstance(value, str):
            out[name] = " ".join(value.split())
    return out


# --------------------------------------------------------------------------------------------
# The server


class HttpServer:
    """Connections, the HTTP/1.1 (and RSPAMC) framing, authentication and routing for `HttpDoor`."""

    def __init__(self, cfg: HttpConfig, door: HttpDoor) -> None:
        self.cfg = cfg
        self.door = door
        self.host, self.port = cfg.listen.host, cfg.listen.port
        self.up = False
        self.in_flight = 0  # requests read and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False
        self._password = cfg.password.encode()
        self.refused = 0  # connections refused over max_connections
        self._refusal_logged = -math.inf

    async def start(self) -> None:
        """Bind (an OSError here is the daemon's one-line start failure)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        self.up = True
        log.info("http: scan API listening on %s:%d", self.host, self.port)

    async def drained(self) -> None:
        await self._idle.wait()

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, let the requests being decided get their replies (up to `drain_timeout`), then
        close every connection (a keep-alive client between requests reconnects elsewhere or later)."""
        if self._server is None:
            return
        self.up = False
        self._stopping = True
        self._server.close()
        if self.in_flight:
            try:
                await asyncio.wait_for(self.drained(), timeout=drain_timeout)
            except TimeoutError:
                log.warning("http: %d requests still undecided at shutdown; their clients get no reply", self.in_flight)
        for writer in list(self._writers):  # Python 3.11's wait_closed() does not wait for open connections
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._writers) >= self.cfg.max_connections:
            await self._refuse(reader, writer)
            return
        self._writers.add(writer)
        try:
            first = True
            while not self._stopping:
                keep, linger = await self._one(reader, writer, first)
                first = False
                if not keep:
                    if linger:
                        await self._linger(reader, writer)
                    break
            writer.close()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("http: client %s dropped: %r", peer, exc)
            writer.transport.abort()
        except Exception:  # a bug here must cost one connection, not the server
            log.exception("http: request from %s failed", peer)
            writer.transport.abort()
        finally:
            self._writers.discard(writer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Over [http] max_connections: 503 with Retry-After at once, without reading the request, and close."""
        self.refused += 1
        if time.monotonic() - self._refusal_logged >= 10:  # one line per 10 s, not one per connection of a flood
            self._refusal_logged = time.monotonic()
            log.warning("http: %d connections open ([http] max_connections); refusing new ones (%d so far)",
                        len(self._writers), self.refused)  # fmt: skip
        try:
            await self._send(writer, _error(503, "too many connections; retry later", None, retry_after=1))
            await self._linger(reader, writer)  # the request the client is sending must not turn into a reset
            writer.close()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool) -> tuple[bool, bool]:
        """Serve one request: (keep the connection, discard unread input before closing)."""
        req: Request | None = None
        try:
            try:
                # Between requests a client may be silent for idle_timeout; a new connection must start its request.
                async with asyncio.timeout(self.cfg.read_timeout if first else self.cfg.idle_timeout):
                    line = await reader.readline()
            except TimeoutError:
                if first:
                    raise HttpError(408, f"no request within read_timeout ({self.cfg.read_timeout:g}s)") from None
                return False, False
            if not line:
                return False, False
            async with asyncio.timeout(self.cfg.read_timeout):
                req = await self._read_head(line, reader)
                self._authorize(req)
                await self._read_body(req, reader, writer)
        except TimeoutError:
            await self._send(writer, _error(408, f"request not received within read_timeout ({self.cfg.read_timeout:g}s)", req))
            return False, False
        except ValueError:  # StreamReader: one line over MAX_HEAD_BYTES
            await self._send(writer, _error(431, "request head too large", req))
            return False, True
        except HttpError as e:
            await self._send(writer, _error(e.status, str(e), req))
            return False, True
        self.in_flight += 1
        self._idle.clear()
        t0 = time.perf_counter()
        try:
            reply = await self._route(req)
            await self._send(writer, reply)  # counted until sent: stop() must not abort a reply on its way
        finally:
            self._observe(req, time.perf_counter() - t0)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        closes = b"\r\nConnection: close\r\n" in reply.partition(b"\r\n\r\n")[0] + b"\r\n"
        return req.keep_alive and not closes and not self._stopping, False

    def _observe(self, req: Request, seconds: float) -> None:
        """Scans only, request read to reply written (a subclass serving other pages overrides it)."""
        if self.door.metrics is not None and req.path != "/ping" and req.method != "PING":
            self.door.metrics.observe_request("http", seconds)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.cfg.read_timeout):  # a client that never reads cannot pin the buffer
            await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (bounded): closing with unread input makes
        the kernel send a reset, which can destroy the error reply before the client reads it."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            if writer.can_write_eof():
                writer.write_eof()
            discarded = 0
            async with asyncio.timeout(1.0):
                while discarded < LINGER_BYTES and (chunk := await reader.read(65536)):
                    discarded += len(chunk)

    # --- framing ---------------------------------------------------------------------

    async def _read_head(self, first: bytes, reader: asyncio.StreamReader) -> Request:
        if not first.endswith(b"\n"):
            raise HttpError(400, "incomplete request line")
        parts = first.rstrip(b"\r\n").split(b" ")
        if len(parts) == 2 and parts[1].startswith(b"RSPAMC/"):  # "CHECK RSPAMC/1.3": no target
            parts.insert(1, b"-")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise HttpError(400, "malformed request line")
        method, target, version = (p.decode("latin-1") for p in parts)
        if version.startswith("RSPAMC/"):  # legacy: "CHECK RSPAMC/1.3" has the command where HTTP has the method
            path = "/legacy"
        elif version in ("HTTP/1.0", "HTTP/1.1") and target.startswith("/"):
            path = target.split("?", 1)[0]
        else:
            raise HttpError(400, "malformed request line")
        req = Request(method.upper() if path == "/legacy" else method, path, version, [], query=target.partition("?")[2])
        total = len(first)
        while True:
            line = await reader.readline()
            total += len(line)
            if total > MAX_HEAD_BYTES or len(req.headers) >= MAX_HEADERS:
                raise HttpError(431, "request head too large")
            if not line.endswith(b"\n"):
                raise HttpError(400, "incomplete request head")
            if line in (b"\r\n", b"\n"):
                return req
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):  # also refuses obsolete folding (a line starting with space)
                raise HttpError(400, "malformed header line")
            req.headers.append((name.decode("ascii").lower(), value.strip().decode("utf-8", "replace")))

    def _authorize(self, req: Request) -> None:
        if not self._password or req.path == "/ping":
            return
        given = req.header("password")
        if given is None:
            raise HttpError(401, "a Password header is required")
        if not hmac.compare_digest(given.encode(), self._password):  # constant time: no guessing by timing
            raise HttpError(403, "wrong password")

    async def _read_body(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        te = (req.header("transfer-encoding") or "").strip().lower()
        length = req.header("content-length")
        limit = self.cfg.max_body_bytes
        if te and te != "chunked":
            raise HttpError(501, f"transfer-encoding {te!r} is not supported (use chunked or Content-Length)")
        if te and length is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if length is not None:
            if len(set(req.all("content-length"))) > 1 or not re.fullmatch(r"[0-9]{1,18}", length):
                raise HttpError(400, "malformed Content-Length")
            n = int(length)
            if n > limit:
                raise HttpError(413, f"body of {n} bytes is over max_body_bytes ({limit})")
            self._continue(req, writer)
            req.body = await reader.readexactly(n)
        elif te == "chunked":
            self._continue(req, writer)
            req.body = await _read_chunked(reader, limit)

    @staticmethod
    def _continue(req: Request, writer: asyncio.StreamWriter) -> None:
        if req.version == "HTTP/1.1" and (req.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
        scan = dataclasses.replace(o.scan, inbound=dataclasses.replace(o.scan.inbound, size=size))
        log.info("%s", verdict_line(scan, o.decision.action, lead=[("", req.path.lstrip("/") or "-"),
                                                                   ("queue_id", (req.header("queue-id") or "-")[:64])]))  # fmt: skip


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readline()
        size_text = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
            raise HttpError(400, "malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise HttpError(413, f"body over max_body_bytes ({limit})")
        body += await reader.readexactly(size)
        if await reader.readline() not in (b"\r\n", b"\n"):
            raise HttpError(400, "malformed chunk")
    for _ in range(MAX_HEADERS):  # trailers, ignored
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return bytes(body)
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
    raise HttpError(431, "too many trailer lines")


def _response(status: int, body: bytes, content_type: str, req: Request | None, *, head: bool = False,
              retry_after: int | None = None, close: bool = False) -> bytes:  # fmt: skip
    version = "HTTP/1.0" if req is not None and req.version == "HTTP/1.0" else "HTTP/1.1"
    keep = req is not None and req.keep_alive and not close
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head_text = (f"{version} {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                 f"{extra}Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")  # fmt: skip
    return head_text.encode("ascii") + (b"" if head else body)


def _json(status: int, obj: Any, req: Request | None, **kw: Any) -> bytes:
    return _response(status, json.dumps(obj, ensure_ascii=False).encode() + b"\n", "application/json", req, **kw)


def _error(status: int, message: str, req: Request | None, *, retry_after: int | None = None) -> bytes:
    """One-line JSON error; errors before the request was fully read close the connection."""
    if req is not None and req.legacy:
        return f"RSPAMD/1.3 {status} {_one_line(message)}\r\n\r\n".encode()
    close = status in (400, 401, 403, 408, 411, 413, 431, 501)
    return _json(status, {"error": _one_line(message)}, req, retry_after=retry_after, close=close)
