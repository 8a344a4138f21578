"""One small HTTP/1.1 server for every HTTP port of filterd: the scan API (filterd/doors/http.py), the
metrics endpoint (filterd/obs/metrics.py) and the web console (filterd/console/). The routes are the
user's: a handler `async (Request) -> Response | bytes`; this module owns the rest.

Why our own: the deps have no HTTP server, and aiohttp and friends would be a heavy new dependency
for a dozen routes on three loopback ports.

Framing: keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`; off for a server
with `keep_alive=False`), `Content-Length` and chunked bodies, `Expect: 100-continue`, HEAD (the
headers of GET, no body). A body sent zstd-compressed (`Compression: zstd`, as `rspamc --compressed`
sends it, or `Content-Encoding: zstd`) is decompressed before the handler sees it; any other coding
is refused (415) rather than handed on as if it were the text.

A protocol of its own on the same port (Rspamd's legacy `CHECK RSPAMC/1.3`) is a `LineProtocol`:
told from HTTP by its first line, then read like HTTP (headers, a Content-Length body); its replies
are the handler's bytes and the connection is closed after each.

Bounds, each with its reply: request head `max_head_bytes` and `max_headers` (431); body
`max_body_bytes` (413, also while a chunked body grows and while a zstd body is decompressed: a bomb
costs at most that much memory); one deadline per request, `read_timeout`, from its first byte (the
connection's start for the first request) over request line, head and body (408); a keep-alive
connection silent `idle_timeout` between requests is closed; `max_connections` at once (more get 503
with `Retry-After` at once and are closed). Errors are rendered by the user's `errors` function
(JSON for the scan API, plain text by default); a request refused before its body was read closes
the connection, after discarding (bounded) what the client still sends, so the reply is not lost to
a reset.

Password: with `password` and `password_header` set, every request but `open_paths` needs that header
(401 without, 403 wrong, compared in constant time). A user that checks it itself (the console's
HTTP Basic, whose 401 carries its own headers) leaves `password_header` None. Listening off loopback
without a password is refused at start when `password_off_loopback` (check-config refuses it first,
naming the key; this is the second wall).

Stop: no new connections, the requests being handled get their replies (up to `drain_timeout`), then
every connection is closed (a keep-alive client between requests reconnects later or elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, Sequence

from filterd.config import is_loopback
from filterd.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["HttpError", "LineProtocol", "Request", "Response", "Server", "ServerSettings", "password_ok", "text_error"]

MAX_HEAD_BYTES = 65536  # request line + headers: room for a few hundred Rcpt headers
MAX_HEADERS = 1000
LINGER_BYTES = 1 << 20  # input discarded after refusing a request, before hanging up
LINGER_S = 1.0
REASONS = {
    100: "Continue", 200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}  # fmt: skip
TEXT = "text/plain; charset=utf-8"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_IDENTITY = ("", "identity")


class HttpError(Exception):
    """A request that gets an error reply; `close` when the connection must not be kept after it."""

    def __init__(self, status: int, message: str, *, close: bool = False, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.close, self.retry_after = status, close, retry_after


@dataclass
class Request:
    method: str
    path: str
    version: str  # "HTTP/1.1", "HTTP/1.0", or a LineProtocol's (e.g. "RSPAMC/1.3")
    headers: list[tuple[str, str]]  # (lower-case name, value) in order
    body: bytes = b""
    query: str = ""  # after "?" in the target
    protocol: str = "http"  # or the LineProtocol's name

    @property
    def legacy(self) -> bool:
        """Not HTTP: a LineProtocol's request (one per connection, its own reply format)."""
        return self.protocol != "http"

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


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)  # more header lines, in order
    close: bool = False  # close the connection after this reply
    retry_after: int | None = None

    def encode(self, req: Request | None, *, keep: bool | None = None) -> bytes:
        """Status line, headers and body (none for HEAD: Content-Length still that of GET's)."""
        version = "HTTP/1.0" if req is not None and req.version == "HTTP/1.0" else "HTTP/1.1"
        if keep is None:
            keep = req is not None and req.keep_alive and not self.close
        extra = list(self.headers) + ([("Retry-After", str(self.retry_after))] if self.retry_after is not None else [])
        head = (f"{version} {self.status} {REASONS.get(self.status, 'Error')}\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra) +
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")  # fmt: skip
        return head.encode("latin-1") + (b"" if req is not None and req.method == "HEAD" else self.body)


Handler = Callable[[Request], Awaitable["Response | bytes"]]
ErrorReply = Callable[[HttpError, "Request | None"], "Response | bytes"]


class LineProtocol(Protocol):
    """A framing of its own served on an HTTP port, told from HTTP by the first line."""

    name: str

    def request_line(self, line: bytes) -> tuple[str, str, str] | None:
        """(method, path, version) when `line` (without its line end) is this protocol's, else None."""
        ...

    def error(self, status: int, message: str) -> bytes:
        """The whole error reply in this protocol."""
        ...


def one_line(s: str) -> str:
    return re.sub(r"[\r\n]+", " ", s)


def text_error(e: HttpError, req: Request | None) -> Response:
    """The default error reply: the reason on one line of plain text."""
    return Response(e.status, f"{one_line(str(e))}\n".encode(), TEXT, close=e.close, retry_after=e.retry_after)


def password_ok(given: str | bytes | None, password: str | bytes) -> bool:
    """Constant-time comparison (no guessing by timing); False when nothing was given."""
    if given is None:
        return False
    g = given.encode() if isinstance(given, str) else given
    p = password.encode() if isinstance(password, str) else password
    return hmac.compare_digest(g, p)


@dataclass(frozen=True)
class ServerSettings:
    name: str  # in log lines: "http", "console", "metrics"
    host: str
    port: int
    max_body_bytes: int = 1 << 20  # after decompression too
    read_timeout: float = 30.0  # one request: first byte to the end of its body; also writing a reply
    idle_timeout: float = 60.0  # a keep-alive connection between requests
    max_connections: int = 256
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    keep_alive: bool = True  # False: one request per connection
    password: str = ""
    password_header: str | None = None  # e.g. "password" (Rspamd's); None: no check here (the handler's own)
    open_paths: tuple[str, ...] = ()  # served without the password (liveness probes)
    password_off_loopback: bool = True  # listening off loopback needs a password
    listening: str = "listening on {host}:{port}"  # the start log line, after "<name>: "


class Server:
    """Connections, framing, bounds, password and graceful stop; routes by `handler`. See the module docstring."""

    def __init__(self, settings: ServerSettings, handler: Handler, *, errors: ErrorReply = text_error,
                 protocols: Sequence[LineProtocol] = (), observe: Callable[[Request, float], None] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.handler = handler
        self.errors = errors
        self.protocols = tuple(protocols)
        self.observe = observe  # (request, seconds from read to reply written), after every handled request
        self.host, self.port = settings.host, settings.port
        self.up = False
        self.in_flight = 0  # requests read and not yet answered
        self.refused = 0  # connections refused over max_connections
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False
        self._refusal_logged = -math.inf

    async def start(self) -> None:
        """Bind (an OSError here is the daemon's one-line start failure)."""
        s = self.settings
        if s.password_off_loopback and not s.password and not is_loopback(self.host):
            raise ConfigError(f"{s.name}: listening on {self.host} (not loopback) needs a password")
        # limit: one line longer than the head budget fails readline() instead of being buffered
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=s.max_head_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        self.up = True
        self._stopping = False
        log.info("%s: %s", s.name, s.listening.format(host=self.host, port=self.port))

    async def drained(self) -> None:
        await self._idle.wait()

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, let the requests being handled get their replies (up to `drain_timeout`), then
        close every connection."""
        if self._server is None:
            return
        self.up = False
        self._stopping = True
        self._server.close()
        if self.in_flight:
            try:
                await asyncio.wait_for(self.drained(), timeout=drain_timeout)
            except TimeoutError:
                log.warning("%s: %d requests still unanswered at shutdown; their clients get no reply",
                            self.settings.name, self.in_flight)  # fmt: skip
        for writer in list(self._writers):  # Python 3.11's wait_closed() does not wait for open connections
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    # --- connections -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._writers) >= self.settings.max_connections:
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
            log.debug("%s: client %s dropped: %r", self.settings.name, peer, exc)
            writer.transport.abort()
        except Exception:  # a bug here must cost one connection, not the server
            log.exception("%s: request from %s failed", self.settings.name, peer)
            writer.transport.abort()
        finally:
            self._writers.discard(writer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Over max_connections: 503 with Retry-After at once, without reading the request, and close."""
        self.refused += 1
        if time.monotonic() - self._refusal_logged >= 10:  # one line per 10 s, not one per connection of a flood
            self._refusal_logged = time.monotonic()
            log.warning("%s: %d connections open (max_connections); refusing new ones (%d so far)", self.settings.name,
                        len(self._writers), self.refused)  # fmt: skip
        try:
            await self._send(writer, self._error(HttpError(503, "too many connections; retry later", retry_after=1), None))
            await self._linger(reader, writer)  # the request the client is sending must not turn into a reset
            writer.close()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool) -> tuple[bool, bool]:
        """Serve one request: (keep the connection, discard unread input before closing)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        req: Request | None = None
        start = b""
        if not first:  # between requests a client may be silent for idle_timeout; its request's deadline starts with it
            try:
                async with asyncio.timeout(s.idle_timeout):
                    start = await reader.read(1)
            except TimeoutError:
                return False, False
            if not start:
                return False, False
        try:
            # One deadline for the whole request: request line, head and body (never one per part).
            async with asyncio.timeout_at(loop.time() + s.read_timeout):
                line = start + await reader.readline()
                if not line:
                    return False, False
                req = self._request_line(line)
                await self._read_head(req, reader, len(line))
                self._authorize(req)
                coding = self._coding(req)
                await self._read_body(req, reader, writer)
            if coding == "zstd":  # off the event loop: up to two passes over max_body_bytes
                req.body = await asyncio.to_thread(unzstd, req.body, s.max_body_bytes)
        except TimeoutError:
            what = "request not received" if req is not None or start else "no request"
            await self._send(writer, self._error(HttpError(408, f"{what} within read_timeout ({s.read_timeout:g}s)"), req))
            return False, True
        except ValueError:  # StreamReader: one line over max_head_bytes
            await self._send(writer, self._error(HttpError(431, "request head too large"), req))
            return False, True
        except HttpError as e:
            await self._send(writer, self._error(e, req))
            return False, True
        self.in_flight += 1
        self._idle.clear()
        t0 = time.perf_counter()
        try:
            try:
                reply = await self.handler(req)
            except HttpError as e:
                reply = self._reply_error(e, req)
            data = (
                reply.encode(req, keep=req.keep_alive and not reply.close and s.keep_alive)
                if isinstance(reply, Response)
                else reply
            )
            await self._send(writer, data)  # counted until sent: stop() must not abort a reply on its way
        finally:
            if self.observe is not None:
                self.observe(req, time.perf_counter() - t0)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        closes = b"\r\nConnection: close\r\n" in data.partition(b"\r\n\r\n")[0] + b"\r\n"
        return s.keep_alive and req.keep_alive and not closes and not self._stopping, False

    def _reply_error(self, e: HttpError, req: Request | None) -> Response | bytes:
        if req is not None and req.legacy:
            proto = next(p for p in self.protocols if p.name == req.protocol)
            return proto.error(e.status, str(e))
        return self.errors(e, req)

    def _error(self, e: HttpError, req: Request | None) -> bytes:
        """An error before the request was read whole: the connection is closed after it."""
        reply = self._reply_error(e, req)
        return reply.encode(req, keep=False) if isinstance(reply, Response) else reply

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.settings.read_timeout):  # a client that never reads cannot pin the buffer
            await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (bounded): closing with unread input makes
        the kernel send a reset, which can destroy the error reply before the client reads it."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            if writer.can_write_eof():
                writer.write_eof()
            discarded = 0
            async with asyncio.timeout(min(LINGER_S, self.settings.read_timeout)):
                while discarded < LINGER_BYTES and (chunk := await reader.read(65536)):
                    discarded += len(chunk)

    # --- framing ---------------------------------------------------------------------

    def _request_line(self, line: bytes) -> Request:
        if not line.endswith(b"\n"):
            raise HttpError(400, "incomplete request line")
        text = line.rstrip(b"\r\n")
        for proto in self.protocols:
            got = proto.request_line(text)
            if got is not None:
                return Request(*got, [], protocol=proto.name)
        parts = text.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise HttpError(400, "malformed request line")
        method, target, version = (p.decode("latin-1") for p in parts)
        if version not in ("HTTP/1.0", "HTTP/1.1") or not target.startswith("/"):
            raise HttpError(400, "malformed request line")
        path, _, query = target.partition("?")
        return Request(method, path, version, [], query=query)

    async def _read_head(self, req: Request, reader: asyncio.StreamReader, total: int) -> None:
        s = self.settings
        while True:
            line = await reader.readline()
            total += len(line)
            if total > s.max_head_bytes or len(req.headers) >= s.max_headers:
                raise HttpError(431, "request head too large")
            if not line.endswith(b"\n"):
                raise HttpError(400, "incomplete request head")
            if line in (b"\r\n", b"\n"):
                return
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):  # also refuses obsolete folding (a line starting with space)
                raise HttpError(400, "malformed header line")
            req.headers.append((name.decode("ascii").lower(), value.strip().decode("utf-8", "replace")))

    def _authorize(self, req: Request) -> None:
        s = self.settings
        if not s.password or s.password_header is None or req.path in s.open_paths:
            return
        given = req.header(s.password_header)
        if given is None:
            raise HttpError(401, f"a {s.password_header.capitalize()} header is required")
        if not password_ok(given, s.password):
            raise HttpError(403, "wrong password")

    @staticmethod
    def _coding(req: Request) -> str:
        """ "zstd" or "" (none): Rspamd's `Compression` header and the standard `Content-Encoding`, 415 for others."""
        codings = {c.strip().lower() for h in ("compression", "content-encoding") for v in req.all(h) for c in v.split(",")}
        codings -= set(_IDENTITY)
        if not codings:
            return ""
        if codings == {"zstd"}:
            return "zstd"
        other = sorted(codings - {"zstd"})[0]
        raise HttpError(415, f"body compression {other[:40]!r} is not supported (send it as is, or zstd)")

    async def _read_body(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        te = (req.header("transfer-encoding") or "").strip().lower()
        length = req.header("content-length")
        limit = self.settings.max_body_bytes
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
            req.body = await _read_chunked(reader, limit, self.settings.max_headers)

    @staticmethod
    def _continue(req: Request, writer: asyncio.StreamWriter) -> None:
        if req.version == "HTTP/1.1" and (req.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _read_chunked(reader: asyncio.StreamReader, limit: int, max_trailers: int) -> bytes:
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
    for _ in range(max_trailers):  # trailers, ignored
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return bytes(body)
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
    raise HttpError(431, "too many trailer lines")


def unzstd(data: bytes, limit: int) -> bytes:
    """A zstd body decompressed, at most `limit` bytes (413 past it, having held no more than that), 400 when
    it is not a complete zstd stream."""
    import zstandard  # here: only a compressed request needs it

    too_large = HttpError(413, f"body over max_body_bytes ({limit}) once decompressed")
    try:
        declared = zstandard.frame_content_size(data)  # -1: not declared (a streaming compressor)
    except zstandard.ZstdError:
        raise HttpError(400, "body is not zstd-compressed (malformed frame)") from None
    if declared > limit:
        raise too_large
    # The window is the decoder's buffer: bounded by the limit (rounded up to a power of two), or 8 MiB, what
    # zstd's levels up to 19 use for a stream that does not declare its size.
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << max(23, (limit - 1).bit_length()))
    try:
        # Counted first, in bounded reads (output never past limit + 1 bytes): a bomb stops here.
        total = 0
        with dctx.stream_reader(data, read_across_frames=True, read_size=65536) as r:
            while total <= limit and (chunk := r.read(min(limit + 1 - total, 1 << 20))):
                total += len(chunk)
        if total > limit:
            raise too_large
        # Then decoded frame by frame, each checked complete (the stream reader stops quietly at a cut).
        out, rest = bytearray(), data
        while rest:
            d = dctx.decompressobj()
            out += d.decompress(rest)
            if not d.eof:
                raise HttpError(400, "zstd body is truncated")
            rest = d.unused_data
    except zstandard.ZstdError as e:
        if "too much memory" in str(e):  # a window over max_window_size
            raise HttpError(413, f"zstd window over what max_body_bytes ({limit}) allows") from None
        raise HttpError(400, f"malformed zstd body ({one_line(str(e))[:80]})") from None
    return bytes(out)
