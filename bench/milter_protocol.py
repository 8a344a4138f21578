"""The milter door's own cost, without the model: messages/s and latency through the protocol.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.milter_protocol --messages 1210 \\
        --concurrency 16 --json bench/results/milter_protocol.json

Two paths, with an `on_message` that answers at once (forged X-Spam-*/X-Filterd-* deleted, two
X-Spam-* headers added), so what is measured is the door, not the classifier:
- `protocol`: testing/milter_mta.py plays Postfix's side (same negotiation, one connection per
  concurrent session, many messages per connection); latency is MAIL to the final reply.
- `postfix`: SMTP clients -> a real Postfix (testing/postfix.py, deploy/postfix/milter.main.cf) ->
  filterd's milter -> delivery to an SMTP sink; latency is the client's whole SMTP transaction,
  and `postfix-no-milter` is the same Postfix without smtpd_milters, for the difference.
Messages: the SpamAssassin corpus (easy_ham, hard_ham, spam, spam_2), every k-th file.
Writes JSON (with the command and the load average) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from filterd.config import HostPort, MilterConfig
from filterd.doors.milter import Accept, AddHeader, MilterMessage, MilterReply, MilterServer
from testing.milter_mta import Mta, split_message
from testing.services import free_port

from testing.corpus import CORPUS, wire


def corpus(n: int) -> list[bytes]:
    files = sorted(p for d in ("easy_ham", "hard_ham", "spam", "spam_2") for p in (CORPUS / d).iterdir() if p.is_file())
    step = max(1, len(files) // n)
    return [wire(f.read_bytes()) for f in files[::step][:n]]


async def answer(msg: MilterMessage) -> MilterReply:
    mods = (*msg.forged_header_deletions(), AddHeader("X-Spam-Flag", "NO"), AddHeader("X-Spam-Score", "0.0100"))
    return MilterReply(Accept(), mods)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(path: str, lat: list[float], wall: float, n: int, concurrency: int, extra: dict | None = None) -> dict:
    return {"path": path, "messages": n, "concurrency": concurrency, "wall_s": round(wall, 3),
            "msg_per_s": round(n / wall, 1), "p50_ms": round(1000 * pct(lat, 0.5), 2),
            "p99_ms": round(1000 * pct(lat, 0.99), 2), "mean_ms": round(1000 * statistics.fmean(lat), 2),
            **(extra or {})}  # fmt: skip


async def run_sessions(
    open_mta: Callable[[], Awaitable[Mta]], raws: list[bytes], concurrency: int,
) -> tuple[list[list[tuple[bytes, bytes]]], list[float], float]:  # fmt: skip
    """`concurrency` MTA connections, each taking the next message until none is left (envelope,
    headers, body, end of message). Per message (in `raws` order) the replies to its end (header
    modifications, final verdict) and its latency from MAIL to the final reply; the wall time."""
    replies: list[list[tuple[bytes, bytes]]] = [[] for _ in raws]
    lat: list[float] = [0.0] * len(raws)
    queue = list(enumerate(raws))

    async def connection() -> None:
        mta = await open_mta()
        await mta.optneg()
        while queue:
            i, raw = queue.pop()
            t0 = time.perf_counter()
            await mta.envelope(queue_id=f"Q{i}")
            headers, body = split_message(raw)
            replies[i] = await mta.message(headers, body)
            lat[i] = time.perf_counter() - t0
        await mta.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return replies, lat, time.perf_counter() - t0


async def protocol_path(raws: list[bytes], concurrency: int) -> dict:
    cfg = MilterConfig(enabled=True, listen=HostPort("127.0.0.1", free_port()))
    async with MilterServer(cfg, answer) as server:
        replies, lat, wall = await run_sessions(lambda: Mta.open(server), raws, concurrency)
        stats = server.stats
    for r in replies:
        assert r[-1][0] == b"a", r
    return summary("protocol", lat, wall, len(raws), concurrency, {"truncated": stats.truncated})


def postfix_path(raws: list[bytes], concurrency: int, milter: bool) -> dict:
    from testing.postfix import PostfixServer
    from testing.smtp_sink import SmtpSink, send_concurrently

    port = free_port()
    server = MilterServer(MilterConfig(enabled=True, listen=HostPort("127.0.0.1", port)), answer)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        with SmtpSink() as sink, tempfile.TemporaryDirectory() as tmp:
            pf = PostfixServer(Path(tmp) / "postfix", relay_port=sink.port, content_filter=False, milter_port=port if milter else None)
            with pf:
                t0 = time.perf_counter()
                lat: list[float] = []

                async def timed() -> list[int]:
                    # one SMTP session per message, `concurrency` at a time, each timed by itself
                    gate = asyncio.Semaphore(concurrency)

                    async def one(raw: bytes) -> int:
                        async with gate:
                            s = time.perf_counter()
                            (code,) = await send_concurrently(pf.smtpd_port, [raw], timeout=300)
                            lat.append(time.perf_counter() - s)
                            return code

                    return await asyncio.gather(*(one(r) for r in raws))

                codes = asyncio.run(timed())
                accepted = time.perf_counter() - t0
                sink.wait_for(len(raws), timeout=600)
                delivered = time.perf_counter() - t0
                bad = [c for c in codes if c != 250]
                tagged = sum(b"X-Spam-Score: 0.0100" in m.data for m in sink.messages)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    name = "postfix+milter" if milter else "postfix-no-milter"
    return summary(name, lat, accepted, len(raws), concurrency,
                   {"refused": len(bad), "all_delivered_s": round(delivered, 3), "tagged": tagged})  # fmt: skip


def markdown(doc: dict) -> str:
    rows = ["| path | messages | concurrency | msg/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        rows.append(f"| {r['path']} | {r['messages']} | {r['concurrency']} | {r['msg_per_s']} | {r['p50_ms']} | {r['p99_ms']} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1210)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-postfix", action="store_true", help="only the protocol path")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    raws = corpus(args.messages)
    load0 = os.getloadavg()
    results = [asyncio.run(protocol_path(raws, args.concurrency))]
    if not args.no_postfix:
        results.append(postfix_path(raws, args.concurrency, milter=True))
        results.append(postfix_path(raws, args.concurrency, milter=False))
    doc = {"command": " ".join(["python -m bench.milter_protocol", *sys.argv[1:]]), "results": results,
           "bytes": sum(map(len, raws)), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(f"`{doc['command']}`\n\n" + markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
