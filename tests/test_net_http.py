"""The one HTTP/1.1 server (filterd/net/http.py) with routes of the test's own, over real sockets: keep-alive and
HEAD, one request per connection, Expect: 100-continue, a line protocol told by its first line, the password,
the idle and read deadlines of a keep-alive connection, and bounded zstd bodies. The scan API, metrics and
console on top of it are in tests/test_http.py, tests/test_metrics.py and tests/test_console.py."""

from __future__ import annotations

import asyncio
import time

import pytest
import zstandard

from filterd.errors import ConfigError
from filterd.net.http import HttpError, Request, Response, Server, ServerSettings, unzstd


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise HttpError(409, "no such thing")
    return Response(200, f"{req.method} {req.path} q={req.query} n={len(req.body)} {req.body[:20]!r}".encode())


class Toy:
    """A line protocol: `HELLO TOY/1`, headers and a Content-Length body, a bare reply line."""

    name = "toy"

    def request_line(self, line: bytes) -> tuple[str, str, str] | None:
        return ("HELLO", "/toy", "TOY/1") if line == b"HELLO TOY/1" else None

    def error(self, status: int, message: str) -> bytes:
        return f"TOY {status} {message}\n".encode()


async def toy_or_echo(req: Request) -> Response | bytes:
    return b"TOY 0 hello %d\n" % len(req.body) if req.legacy else await echo(req)


def serve(scenario, handler=echo, **kw) -> None:
    async def main() -> None:
        protocols = kw.pop("protocols", ())
        server = Server(ServerSettings(name="test", host="127.0.0.1", port=0, **kw), handler, protocols=protocols)
        await server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    asyncio.run(main())


async def reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP reply off a kept connection (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    n = int(headers.get("content-length", 0))
    body = await asyncio.wait_for(reader.readexactly(n), 5) if n else b""
    return int(lines[0].split()[1]), headers, body


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


def test_keep_alive_head_query_and_handler_errors():
    async def scenario(server: Server) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = await reply(reader)
        assert (status, headers["connection"], body) == (200, "keep-alive", b"POST /a q=x=1 n=5 b'hello'")
        writer.write(b"HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n")  # GET's headers, no body: the next reply follows at once
        writer.write(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 18\r\n" in head
        status, _, body = await reply(reader)
        assert (status, body) == (409, b"no such thing\n")  # a handler's HttpError, rendered, connection kept
        writer.write(b"GET /c HTTP/1.0\r\n\r\n")  # HTTP/1.0 without keep-alive: answered, then closed
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 200 OK\r\n")
        writer.close()

    serve(scenario)


def test_one_request_per_connection_when_keep_alive_is_off():
    async def scenario(server: Server) -> None:
        out = await exchange(server.port, b"GET /a HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        assert out.count(b"HTTP/1.1 200") == 1 and b"Connection: close\r\n" in out

    serve(scenario, keep_alive=False)


def test_expect_100_continue_then_the_body():
    async def scenario(server: Server) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /up HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"n=3 b'abc'")
        writer.close()

    serve(scenario)


def test_a_line_protocol_is_told_by_its_first_line_and_answers_in_its_own_format():
    async def scenario(server: Server) -> None:
        assert await exchange(server.port, b"HELLO TOY/1\r\nContent-Length: 4\r\n\r\nabcd") == b"TOY 0 hello 4\n"
        assert await exchange(server.port, b"HELLO TOY/1\r\nContent-Length: 99999\r\n\r\n") == (
            b"TOY 413 body of 99999 bytes is over max_body_bytes (1024)\n"
        )
        assert (await exchange(server.port, b"HELLO TOY/2\r\n\r\n")).startswith(b"HTTP/1.1 400 ")  # not the toy's: HTTP's
        assert b"n=0" in await exchange(server.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")

    serve(scenario, toy_or_echo, protocols=[Toy()], max_body_bytes=1024)


def test_password_header_open_paths_and_off_loopback_refusal():
    async def scenario(server: Server) -> None:
        assert (await exchange(server.port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 401 ")
        assert (await exchange(server.port, b"GET /x HTTP/1.1\r\nX-Key: pw \r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert (await exchange(server.port, b"GET /x HTTP/1.1\r\nX-Key: pW\r\n\r\n")).startswith(b"HTTP/1.1 403 ")
        assert (await exchange(server.port, b"GET /live HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")

    serve(scenario, password="pw", password_header="x-key", open_paths=("/live",), keep_alive=False)

    async def off_loopback() -> None:
        with pytest.raises(ConfigError, match="needs a password"):
            await Server(ServerSettings(name="test", host="0.0.0.0", port=0), echo).start()
        server = Server(ServerSettings(name="test", host="0.0.0.0", port=0, password_off_loopback=False), echo)
        await server.start()  # the metrics endpoint: no password asked
        await server.stop()

    asyncio.run(off_loopback())


def test_idle_wait_is_not_charged_to_the_next_requests_read_timeout():
    async def scenario(server: Server) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /1 HTTP/1.1\r\n\r\n")
        assert (await reply(reader))[0] == 200
        await asyncio.sleep(0.8)  # idle longer than read_timeout, within idle_timeout
        writer.write(b"GET /2 HTTP/1.1\r\n\r\n")
        assert (await reply(reader))[0] == 200
        writer.write(b"GET /3 HTTP/1.1\r\n")  # then a request that stalls after its first line: 408 at read_timeout
        t0 = time.monotonic()
        status, headers, _ = await reply(reader)
        assert (status, headers["connection"]) == (408, "close") and 0.4 < time.monotonic() - t0 < 1.5
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /1 HTTP/1.1\r\n\r\n")
        assert (await reply(reader))[0] == 200
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # silent past idle_timeout: closed without a word
        assert 1.0 < time.monotonic() - t0 < 2.5
        writer.close()

    serve(scenario, read_timeout=0.5, idle_timeout=1.5)


def test_unzstd_is_exact_at_the_limit_and_reads_every_frame():
    data = bytes(range(256)) * 16  # 4096 bytes
    z = zstandard.ZstdCompressor().compress(data)
    assert unzstd(z, 4096) == data and unzstd(z + z, 8192) == data + data
    with pytest.raises(HttpError) as e:
        unzstd(z + z, 8191)
    assert e.value.status == 413
    for bad in (b"", b"\x28\xb5\x2f\xfd", z[:-1]):
        with pytest.raises(HttpError) as e:
            unzstd(bad, 8192)
        assert e.value.status == 400, bad
