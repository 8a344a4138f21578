"""SpamAssassin mail through filterd's HTTP door (`POST /checkv2`, Rspamd's protocol; issue 14's must-show).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.http_checkv2 --model work/demo/model-mail \\
        --data work/demo/data-mail --n 50 --concurrency 16 --json bench/results/http_checkv2.json --md bench/results/http_checkv2.md

N spam and N ham from the model's *test* split (`--data`: a `prepare` directory; ids name the corpus
files) are posted raw to `filterd serve` ([http] enabled, nothing else), at most `--concurrency`
at a time, each on its own connection. Reported: messages/s, request p50/p99, the mean batch, the
replies' actions, and P(spam) from the reply (`filterd.p_spam`) against the engine scoring the
same files' extracted text in-process (what the SMTP and milter doors score too: one
`extract_text`, one model), max |difference| and how many differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from filterd.model.engine import Engine
from filterd.mail.text import extract_text
from testing.daemon import FilterdProcess
from testing.services import free_port

from bench.daemon_redis import pct
from bench.milter_postfix import CORPUS, test_ids


async def post_all(port: int, raws: list[bytes], concurrency: int) -> list[tuple[int, dict, float]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(raw: bytes) -> tuple[int, dict, float]:
        async with gate:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /checkv2 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nFrom: <sender@bench.example>\r\n"
                         b"Rcpt: <rcpt@bench.example>\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))  # fmt: skip
            data = await reader.read()
            writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body), time.perf_counter() - t0

    return await asyncio.gather(*(one(r) for r in raws))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the model's prepare directory (its test split is used)")
    ap.add_argument("--n", type=int, default=50, help="messages per class")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    ids = test_ids(args.data, args.n)
    names = ids["spam"] + ids["ham"]
    labels = ["spam"] * len(ids["spam"]) + ["ham"] * len(ids["ham"])
    raws = [(CORPUS / n).read_bytes() for n in names]
    with tempfile.TemporaryDirectory(prefix="http-checkv2-") as tmp:
        port = free_port()
        d = FilterdProcess(args.model, "redis://127.0.0.1:1/0", Path(tmp) / "filterd.log", redis__enabled="false",
                           http__enabled="true", http__listen=f"127.0.0.1:{port}").start(timeout=300)  # fmt: skip
        try:
            t0 = time.perf_counter()
            replies = asyncio.run(post_all(port, raws, args.concurrency))
            seconds = time.perf_counter() - t0
            mean_batch = d.metric("filterd_batch_size_sum") / d.metric("filterd_batch_size_count")
        finally:
            d.stop()
    engine = Engine.load(args.model, device="cpu")
    direct = [v.score for v in engine.classify_texts([extract_text(r) for r in raws])]
    p = [r[1]["filterd"]["p_spam"] for r in replies]
    diffs = [abs(a - b) for a, b in zip(p, direct)]
    lat = [r[2] for r in replies]
    doc = {
        "command": "python -m bench.http_checkv2 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": engine.version, "messages": len(raws), "concurrency": args.concurrency, "seconds": round(seconds, 2),
        "messages_per_s": round(len(raws) / seconds, 1), "request_p50_ms": round(1000 * pct(lat, 0.5), 1),
        "request_p99_ms": round(1000 * pct(lat, 0.99), 1), "mean_batch_size": round(mean_batch, 2),
        "statuses": dict(Counter(r[0] for r in replies)),
        "actions": {label: dict(Counter(r[1]["action"] for r, x in zip(replies, labels) if x == label)) for label in ("spam", "ham")},
        "spam_verdicts": {label: sum(r[1]["filterd"]["verdict"] == "spam" for r, x in zip(replies, labels) if x == label)
                          for label in ("spam", "ham")},
        "max_abs_p_diff_vs_engine": max(diffs), "differing_by_more_than_1e-4": [n for n, x in zip(names, diffs) if x > 1e-4],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": load0, "load_end": os.getloadavg()},
    }  # fmt: skip
    text = (
        "| messages | concurrency | messages/s | request p50 | request p99 | mean batch | spam flagged (of spam / of ham) "
        "| max \\|P(spam) diff\\| vs engine |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {len(raws)} | {args.concurrency} | {doc['messages_per_s']} | {doc['request_p50_ms']} ms | {doc['request_p99_ms']} ms | "
        f"{doc['mean_batch_size']} | {doc['spam_verdicts']['spam']} / {doc['spam_verdicts']['ham']} | "
        f"{doc['max_abs_p_diff_vs_engine']:.1e} |\n"
    )  # fmt: skip
    print(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.md:
        args.md.write_text(f"`{doc['command']}`\n\n{text}\nstatuses {doc['statuses']}; actions {doc['actions']}; load "
                           f"{load0[0]:.2f} at start.\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
