"""What the verdict history costs: the doors' `record` call on the event loop, and rows written per second.

    OMP_NUM_THREADS=1 nice -n 5 python -m bench.history_write --rows 20000 --json bench/results/history_write.json

For each setting (store_text off/on), `--rows` decisions of a SpamAssassin-sized mail (2 KiB header
block, a 3 KB text, an explanation of 10 words) are recorded through `HistoryWriter.record` while its
writer task runs, as in the daemon. Reported: the time each `record` call holds the event loop
(median and p99, what a door pays per message), the rows per second the writer sustains into a
fresh SQLite file on this disk, and the file's size per row. A Markdown table goes next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from filterd.policy.decision import Decision, Message
from filterd.store.history import History, HistoryWriter
from filterd.obs.metrics import FilterdMetrics

HEAD = (b"Received: from mx.example.net by mail.example.com\r\n" * 30 + b"Subject: =?utf-8?q?Re=3A_your_invoice?=\r\n"
        b"From: someone@example.net\r\nTo: user@example.com\r\n\r\n")  # fmt: skip
TEXT = ("Dear customer, please find the invoice attached. " * 60)[:3000]
EXPLANATION = {"score": 0.93, "method": "occlusion",
               "words": [{"word": "invoice", "start": 24 + 50 * i, "end": 31 + 50 * i, "weight": 0.1 / (i + 1)} for i in range(10)]}  # fmt: skip


async def one_setting(path: Path, rows: int, store_text: bool) -> dict:
    writer = HistoryWriter(History(path, max_rows=rows * 2), FilterdMetrics(), store_text=store_text, max_queue=rows + 1)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    d = Decision("spam", "tag", 0.93, ("score",), 0.5)
    message = Message("smtp", "someone@example.net", ("user@example.com",))
    costs = []
    t0 = time.perf_counter()
    for i in range(rows):
        c0 = time.perf_counter_ns()
        writer.record("smtp", message, d, "v1", ref=f"Q{i}", text=TEXT, head=HEAD, explanation=EXPLANATION)
        costs.append(time.perf_counter_ns() - c0)
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the writer take batches, as the doors' awaits do
    while writer.metrics.history_written._value.get() < rows:
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - t0
    stop.set()
    await task
    await writer.close()
    costs.sort()
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return {"store_text": store_text, "rows": rows, "record_us_median": costs[len(costs) // 2] / 1000,
            "record_us_p99": costs[int(len(costs) * 0.99)] / 1000, "rows_per_s": rows / seconds,
            "bytes_per_row": size / rows}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for store_text in (False, True):
            results.append(asyncio.run(one_setting(Path(tmp) / f"h-{store_text}.sqlite", args.rows, store_text)))
    out = {"command": "python -m bench.history_write " + " ".join(sys.argv[1:]), "loadavg": os.getloadavg(),
           "results": results}  # fmt: skip
    lines = ["| store_text | rows | record() on the loop, median | p99 | rows/s written | bytes/row |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['store_text']} | {r['rows']} | {r['record_us_median']:.1f} µs | {r['record_us_p99']:.1f} µs | "
                     f"{r['rows_per_s']:,.0f} | {r['bytes_per_row']:,.0f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(f"`{out['command']}` (load average {out['loadavg'][0]:.2f})\n\n{table}\n")


if __name__ == "__main__":
    main()
