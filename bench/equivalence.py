"""The same mails through all four doors of one `filterd serve`: every verdict, score and wire reply, to
compare two versions of filterd on the same model (a redesign must not change what users see).

    FILTERD_SHARED=/work/shared python -m bench.equivalence --model /work/sa/model --data /work/sa/data \\
        --out /tmp/after.json [--compare /tmp/before.json]

One daemon with the SMTP content filter (relaying to a sink), the milter, HTTP and Redis Streams doors
and the verdict history on; each message of the split goes through each door, `--concurrency` at a
time. Per door and message: the history row (score at full precision, verdict, action), and what the
door's client got: the X-Spam-* fields of the relayed copy (SMTP), the milter's header edits and final
reply, the /checkv2 JSON (less `time_real`), the Redis result (less `latency_ms`). `--compare` lists
every difference with an earlier run's file: a score apart by more than `--tolerance` or any other
field that differs. Exit status 1 when something differs.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import redis

from filterd.mail.text import extract_text
from testing.daemon import FilterdProcess
from testing.milter_mta import Mta, split_message
from testing.services import RedisServer, free_port
from testing.smtp_sink import SmtpSink
from trainer.data import read_split

from testing.corpus import CORPUS, wire
from bench.smtp import send_all

DOORS = ("smtp", "milter", "http", "redis")


def rcpt(i: int) -> str:
    return f"m{i}@example.net"  # what bench.smtp.send_all sends message i to


async def milter_all(port: int, raws: list[bytes], concurrency: int) -> list[list[tuple[bytes, bytes]]]:
    replies: list[list[tuple[bytes, bytes]]] = [[] for _ in raws]
    queue = list(enumerate(raws))

    async def connection() -> None:
        mta = Mta(*await asyncio.open_connection("127.0.0.1", port))
        await mta.optneg()
        while queue:
            i, raw = queue.pop()
            await mta.envelope(sender="bench@example.org", rcpts=(rcpt(i),), queue_id=f"Q{i}")
            headers, body = split_message(raw)
            replies[i] = await mta.message(headers, body)
        await mta.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return replies


async def http_all(port: int, raws: list[bytes], concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, raw: bytes) -> dict:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /checkv2 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nFrom: <bench@example.org>\r\n"
                         b"Rcpt: <%s>\r\nQueue-Id: H%d\r\nContent-Length: %d\r\n\r\n%s"
                         % (rcpt(i).encode(), i, len(raw), raw))  # fmt: skip
            data = await reader.read()
            writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            reply = json.loads(body)
            reply.pop("time_real", None)
            return {"status": int(head.split()[1]), "reply": reply}

    return await asyncio.gather(*(one(i, r) for i, r in enumerate(raws)))


def redis_all(client: redis.Redis, texts: list[str], timeout: float = 600) -> list[dict]:
    for i, text in enumerate(texts):
        client.xadd("filterd:in", {"id": f"R{i}", "text": text})
    deadline = time.monotonic() + timeout
    while client.xlen("filterd:out") + client.xlen("filterd:dead") < len(texts) and time.monotonic() < deadline:
        time.sleep(0.2)
    out: dict[int, dict] = {}
    for stream in ("filterd:out", "filterd:dead"):
        for _, fields in client.xrange(stream):
            f = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items() if k != b"latency_ms"}
            out[int(f["id"][1:])] = f | ({"dead": "1"} if stream == "filterd:dead" else {})
    return [out.get(i, {}) for i in range(len(texts))]


def history_rows(path: Path) -> dict[str, dict[str, dict]]:
    """door -> message key -> the recorded row (score, verdict, action, model, listed)."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows: dict[str, dict[str, dict]] = {d: {} for d in DOORS}
    for r in db.execute("SELECT source, ref, recipients, score, verdict, action, model, listed FROM verdicts"):
        key = r["ref"] if r["source"] in ("milter", "http") else r["recipients"].strip("[]\"") if r["source"] == "smtp" else r["ref"]
        rows[r["source"]][key] = {k: r[k] for k in ("score", "verdict", "action", "model", "listed")}
    return rows


def spam_fields(data: bytes | None) -> list[list[str]]:
    if data is None:
        return []
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [[k, " ".join(str(v).split())] for k, v in msg.items() if k.lower().startswith(("x-spam-", "x-filterd-"))]


def run(model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> dict[str, list[dict]]:
    texts = [extract_text(r) for r in raws]
    smtp_port, milter_port, http_port = free_port(), free_port(), free_port()
    history = tmp / "history.sqlite"
    with SmtpSink() as sink:
        server = RedisServer(tmp / "redis").start()
        d = FilterdProcess(model, server.url, tmp / "filterd.log", smtp__enabled="true", smtp__listen=f"127.0.0.1:{smtp_port}",
                           smtp__next_hop=sink.address, milter__enabled="true", milter__listen=f"127.0.0.1:{milter_port}",
                           http__enabled="true", http__listen=f"127.0.0.1:{http_port}", history__enabled="true",
                           history__path=str(history)).start(timeout=300)  # fmt: skip
        try:
            codes, _ = asyncio.run(send_all(smtp_port, raws, concurrency))
            sink.wait_for(sum(c == 250 for c in codes), timeout=300)
            milter = asyncio.run(milter_all(milter_port, raws, concurrency))
            http = asyncio.run(http_all(http_port, raws, concurrency))
            red = redis_all(server.client(), texts)
        finally:
            d.stop()
            server.stop()
        relayed = {r.rcpt_tos[0]: r.data for r in sink.messages}
    rows = history_rows(history)
    out: dict[str, list[dict]] = {door: [] for door in DOORS}
    for i in range(len(raws)):
        out["smtp"].append({"history": rows["smtp"].get(rcpt(i)), "reply": codes[i], "fields": spam_fields(relayed.get(rcpt(i)))})
        out["milter"].append({"history": rows["milter"].get(f"Q{i}"),
                              "replies": [[c.decode(), data.decode("utf-8", "replace")] for c, data in milter[i]]})  # fmt: skip
        out["http"].append({"history": rows["http"].get(f"H{i}"), **http[i]})
        result = dict(red[i])
        entry = result.pop("entry", "")  # differs run to run: the history row is found by it, then it is left out
        out["redis"].append({"history": rows["redis"].get(entry), "result": result})
    return out


def differences(before: dict, after: dict, tolerance: float) -> list[str]:
    out = []
    for door in DOORS:
        a, b = before["doors"][door], after["doors"][door]
        if len(a) != len(b):
            out.append(f"{door}: {len(a)} messages before, {len(b)} after")
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            out += [f"{door} #{i} ({before['ids'][i]}): {p}" for p in _diff(x, y, tolerance, "")]
    return out


def _diff(x: object, y: object, tolerance: float, where: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        return [p for k in sorted(set(x) | set(y)) for p in _diff(x.get(k), y.get(k), tolerance, f"{where}.{k}")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [p for i, (u, v) in enumerate(zip(x, y)) for p in _diff(u, v, tolerance, f"{where}[{i}]")]
    if x == y:
        return []
    if isinstance(x, (float, str)) and isinstance(y, (float, str)) and (gap := _number_gap(x, y)) is not None:
        # A number shown rounded (a header's 4 decimals, Redis's 6) may move by one unit in its last
        # place when the full score moved by less than `tolerance`: that is not a change.
        return [] if gap <= max(tolerance, _last_place(x), _last_place(y)) + 1e-12 else [f"{where}: {x!r} -> {y!r}"]
    return [f"{where}: {x!r} -> {y!r}"]


def _number_gap(x: float | str, y: float | str) -> float | None:
    try:
        return abs(float(x) - float(y))
    except ValueError:
        return None


def _last_place(x: float | str) -> float:
    """One unit in the last decimal shown: 1e-4 for "0.0389" or 28.8225; 0 for a full-precision float."""
    text = x if isinstance(x, str) else repr(x)
    decimals = len(text.partition(".")[2]) if "." in text else 0
    return 10.0**-decimals if 0 < decimals <= 6 else 0.0


def max_score_gap(before: dict, after: dict) -> dict[str, float]:
    gaps = {}
    for door in DOORS:
        gap = 0.0
        for x, y in zip(before["doors"][door], after["doors"][door]):
            hx, hy = (x.get("history") or {}), (y.get("history") or {})
            if isinstance(hx.get("score"), float) and isinstance(hy.get("score"), float):
                gap = max(gap, abs(hx["score"] - hy["score"]))
            rx, ry = x.get("result", {}).get("score"), y.get("result", {}).get("score")
            if rx and ry:
                gap = max(gap, abs(float(rx) - float(ry)))
        gaps[door] = gap
    return gaps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a prepare directory whose ids name corpus files")
    ap.add_argument("--split", default="test")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier run's --out file")
    ap.add_argument("--tolerance", type=float, default=1e-6)
    args = ap.parse_args(argv)
    ids = [m.id for m in read_split(args.data / f"{args.split}.csv")][: args.limit]
    raws = [wire((args.corpus / i).read_bytes()) for i in ids]
    with tempfile.TemporaryDirectory(prefix="equivalence-") as tmp:
        doors = run(args.model, raws, args.concurrency, Path(tmp))
    doc = {"model": str(args.model), "split": args.split, "ids": ids, "doors": doors}
    args.out.write_text(json.dumps(doc))
    missing = {d: sum(1 for r in rows if not (r.get("history") or r.get("result"))) for d, rows in doors.items()}
    print(f"{len(ids)} messages through {', '.join(DOORS)}; without a verdict: {missing}")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    diffs = differences(before, doc, args.tolerance)
    print(f"largest score gap per door: {max_score_gap(before, doc)}")
    for line in diffs[:50]:
        print(line)
    print(f"{len(diffs)} differences (tolerance {args.tolerance:g} on numbers)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
