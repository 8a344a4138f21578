"""The MTA side of the milter protocol, as Postfix's milter8.c speaks it: for tests and bench/.

Independent of filterd/doors/milter/ except for the protocol constants; the real Postfix tests
in tests/test_milter.py check that both sides agree with Postfix itself."""

from __future__ import annotations

import asyncio
import re
import struct

from filterd.config import UnixSocket
from filterd.doors.milter import protocol as m
from filterd.doors.milter import MilterServer

ALL_ACTIONS = 0x1FF  # what Postfix 3.x offers (SMFIF_ADDHDRS .. SMFIF_SETSYMLIST)
ALL_STEPS = 0x1FFFFF  # every SMFIP_* bit of version 6
FINAL = (m.SMFIR_ACCEPT, m.SMFIR_CONTINUE, m.SMFIR_REJECT, m.SMFIR_TEMPFAIL, m.SMFIR_DISCARD, m.SMFIR_REPLYCODE)

def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # 8-bit header bytes go back out as they came


class Mta:
    """One MTA->milter connection. `steps` are the negotiated SMFIP_* bits: a command whose reply
    was waived is not waited for, exactly as Postfix does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.actions = self.steps = 0

    @classmethod
    async def open(cls, server: MilterServer) -> "Mta":
        listen = server.cfg.listen
        if isinstance(listen, UnixSocket):
            r, w = await asyncio.open_unix_connection(str(listen.path))
        else:
            r, w = await asyncio.open_connection(listen.host, listen.port)
        return cls(r, w)

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.writer.write(struct.pack("!I", len(data) + 1) + cmd + data)

    async def recv(self, timeout: float = 10) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        (n,) = struct.unpack("!I", head)
        payload = await asyncio.wait_for(self.reader.readexactly(n), timeout)
        return payload[:1], payload[1:]

    async def optneg(self, actions: int = ALL_ACTIONS, steps: int = ALL_STEPS, version: int = 6) -> tuple[int, int, int]:
        self.send(m.SMFIC_OPTNEG, struct.pack("!III", version, actions, steps))
        cmd, data = await self.recv()
        assert cmd == m.SMFIC_OPTNEG
        v, self.actions, self.steps = struct.unpack("!III", data[:12])
        return v, self.actions, self.steps

    async def event(self, cmd: bytes, data: bytes = b"") -> tuple[bytes, bytes] | None:
        """Send an event; its reply, or None when the milter asked not to reply to it."""
        self.send(cmd, data)
        if self.steps & m._NO_REPLY_BIT.get(cmd, 0):
            await self.writer.drain()
            return None
        return await self.recv()

    async def envelope(self, sender: str = "alice@example.org", rcpts: tuple[str, ...] = ("bob@example.net",),
                       queue_id: str = "4ABCDEF", client: str = "192.0.2.7", auth: str = "") -> None:  # fmt: skip
        """`auth`: the SASL login Postfix would send as {auth_authen} with MAIL ("" = not authenticated)."""
        self.send(m.SMFIC_MACRO, b"C" + b"j\0mx.test\0")
        await self.event(m.SMFIC_CONNECT, b"client.example\0" + b"4" + struct.pack("!H", 40000) + client.encode() + b"\0")
        login = b"{auth_authen}\0" + auth.encode() + b"\0" if auth else b""
        self.send(m.SMFIC_MACRO, b"M" + b"i\0" + queue_id.encode() + b"\0" + login)
        await self.event(m.SMFIC_MAIL, f"<{sender}>\0SIZE=100\0".encode())
        for r in rcpts:
            await self.event(m.SMFIC_RCPT, f"<{r}>\0".encode())

    async def message(self, headers: list[tuple[str, str]], body: bytes, chunk: int = 65535) -> list[tuple[bytes, bytes]]:
        """Headers, body chunks and end of message; the replies to the end (modifications, verdict)."""
        for name, value in headers:
            if not self.steps & m.SMFIP_HDR_LEADSPC:
                value = value[1:] if value.startswith(" ") else value  # as Postfix strips one space
            reply = await self.event(m.SMFIC_HEADER, _b(name) + b"\0" + _b(value) + b"\0")
            assert reply in (None, (m.SMFIR_CONTINUE, b""))
        await self.event(m.SMFIC_EOH)
        for i in range(0, len(body), chunk):
            reply = await self.event(m.SMFIC_BODY, body[i : i + chunk])
            if reply and reply[0] == m.SMFIR_SKIP:
                break
        return await self.end()

    async def end(self) -> list[tuple[bytes, bytes]]:
        self.send(m.SMFIC_BODYEOB)
        out = []
        while True:
            cmd, data = await self.recv()
            out.append((cmd, data))
            if cmd in FINAL:
                return out

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(headers, body) as Postfix hands them to a milter: each header's value with the space after
    the colon kept (HDR_LEADSPC) and folded lines joined by LF; the body with CRLF line ends."""
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + text)
        elif ":" in text:
            name, _, value = text.partition(":")
            headers.append((name.rstrip(), value))
    return headers, body
