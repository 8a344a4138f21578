"""What the reservoir of classified texts costs: the event loop's share per message, the writer's rate, the file.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.reservoir --json bench/results/reservoir.json

- `offer` is all a verdict pays on the event loop (a put on a bounded queue): timed over 200,000 calls.
- The writer (`Reservoir.add_many`, batches of 500 as the daemon's writer hands them over, from one thread)
  is timed while the reservoir fills (texts 1..size) and once full (every text a draw, size/i of them
  written), with UCI SMS texts and SpamAssassin mail text (what the SMTP ingress extracts).
- The file's size with `size` texts in it.
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

from filterd.mail.text import extract_text
from filterd.obs.metrics import FilterdMetrics
from filterd.store.queued_writes import BATCH_MAX
from filterd.store.reservoir import Reservoir, ReservoirWriter
from testing.corpus import SMS_FILE, SPAMASSASSIN


def corpus(kind: str, n: int) -> list[str]:
    if kind == "sms":
        base = [line.split("\t", 1)[1] for line in SMS_FILE.read_text(encoding="utf-8").splitlines()]
    else:
        files = sorted(p for d in ("easy_ham", "spam") for p in (SPAMASSASSIN / d).iterdir() if p.name != "cmds")[:3000]
        base = [extract_text(p.read_bytes()) for p in files]
    return [f"{base[i % len(base)]} #{i}" for i in range(n)]  # distinct texts


def offer_cost(calls: int) -> float:
    async def run() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            writer = ReservoirWriter(Reservoir(Path(tmp) / "r.sqlite", 100, 86400), FilterdMetrics(), max_queue=calls)
            t0 = time.perf_counter()
            for _ in range(calls):
                writer.offer("a short text message", "redis")
            took = time.perf_counter() - t0
            writer.reservoir.close()
            return took / calls

    return asyncio.run(run())


def writer_rate(texts: list[str], size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.sqlite"
        with Reservoir(path, size, 30 * 86400.0, seed=1) as r:
            phases = {}
            for name, part in (("filling", texts[:size]), ("full", texts[size:])):
                t0 = time.perf_counter()
                kept = 0
                for i in range(0, len(part), BATCH_MAX):
                    kept += r.add_many((t, "smtp", None) for t in part[i : i + BATCH_MAX])
                took = time.perf_counter() - t0
                phases[name] = {
                    "texts": len(part),
                    "kept": kept,
                    "seconds": round(took, 3),
                    "texts_per_s": round(len(part) / took),
                }
            files = sum(p.stat().st_size for p in Path(tmp).iterdir())
        return {"size": size, **phases, "file_mib": round(files / 2**20, 1),
                "mean_text_chars": round(sum(map(len, texts)) / len(texts))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--full-texts", type=int, default=80_000, help="texts offered once the reservoir is full")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {
        "command": " ".join(["python -m bench.reservoir", *sys.argv[1:]]),
        "load_average_before": os.getloadavg(),
        "offer_us_per_call": round(offer_cost(200_000) * 1e6, 2),
        "writer": {kind: writer_rate(corpus(kind, args.size + args.full_texts), args.size) for kind in ("sms", "mail")},
    }
    result["load_average_after"] = os.getloadavg()
    rows = [
        "| corpus | mean chars | filling: texts/s | full: texts/s (kept) | file MiB at size |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, w in result["writer"].items():
        rows.append(f"| {kind} | {w['mean_text_chars']} | {w['filling']['texts_per_s']:,} | {w['full']['texts_per_s']:,} "
                    f"({w['full']['kept']:,} of {w['full']['texts']:,}) | {w['file_mib']} |")  # fmt: skip
    result["table"] = "\n".join(rows)
    print(json.dumps(result, indent=2))
    print(f"\noffer() on the event loop: {result['offer_us_per_call']} µs per message (size {args.size})\n")
    print(result["table"])
    if args.json:  # and the table beside it, as Markdown
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(
            f"`{result['command']}` (load average {result['load_average_before'][0]:.1f} on 2 cores)\n\n"
            f"`offer()` on the event loop: {result['offer_us_per_call']} µs per message.\n\n{result['table']}\n"
        )


if __name__ == "__main__":
    main()
