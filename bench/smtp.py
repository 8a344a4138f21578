"""Mail through the SMTP path: the verdicts' accuracy on a labelled split, and messages/s.

    python -m bench.smtp --model work/sa/model --data work/sa/data --split test --concurrency 16 \\
        --json bench/results/smtp_spamassassin.json

`filterd serve` (SMTP ingress only) relays to an in-process SMTP sink. Each raw message of the
split (the split's ids are the corpus-relative file names) goes in its own SMTP session, at most
`--concurrency` at a time (Postfix's `scan` maxproc plays this role in production). The verdict is
read back from the relayed message's X-Spam-Flag and X-Spam-Score headers, and compared with the
split's labels and with the in-process engine scoring the same split's text. (SMTP carries lines
ending in CRLF: a file with stray bare CRs reaches filterd with extra line breaks, and its text,
hence its score, can differ a little from the file's.)
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import aiosmtplib
import torch

from filterd.model.engine import Engine
from testing.daemon import FilterdProcess
from testing.services import free_port
from testing.smtp_sink import SmtpSink
from trainer.data import read_split
from trainer.evaluate import compute_metrics

from bench.daemon_redis import SHARED, pct


async def send_all(
    port: int, raws: list[bytes], concurrency: int, starts: list[float] | None = None,
) -> tuple[list[int], list[float]]:  # fmt: skip
    """Message i to m{i}@example.net, one session each: reply codes and session seconds; `starts`
    (as long as `raws`), if given, gets each session's start (time.perf_counter)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, raw: bytes) -> tuple[int, float]:
        async with gate:
            t0 = time.perf_counter()
            if starts is not None:
                starts[i] = t0
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=300, start_tls=False)
            await client.connect()
            try:
                await client.sendmail("bench@example.org", [f"m{i}@example.net"], raw)
                code = 250
            except aiosmtplib.SMTPResponseException as e:
                code = e.code
            finally:
                client.close()
            return code, time.perf_counter() - t0

    out = await asyncio.gather(*(one(i, raw) for i, raw in enumerate(raws)))
    return [c for c, _ in out], [s for _, s in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a split prepared with --email-dir")
    ap.add_argument("--split", default="test")
    ap.add_argument("--corpus", type=Path, default=SHARED / "data/spamassassin-publiccorpus")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = read_split(args.data / f"{args.split}.csv")
    raws = [(args.corpus / r.id).read_bytes() for r in rows]
    labels = [1 if r.label == "spam" else 0 for r in rows]

    with tempfile.TemporaryDirectory() as tmp, SmtpSink() as sink:
        port = free_port()
        d = FilterdProcess(args.model, "redis://127.0.0.1:1/0", Path(tmp) / "filterd.log", redis__enabled="false",
                           smtp__enabled="true", smtp__listen=f"127.0.0.1:{port}", smtp__next_hop=sink.address)  # fmt: skip
        d.start(timeout=300)
        try:
            t0 = time.perf_counter()
            codes, session_s = asyncio.run(send_all(port, raws, args.concurrency))
            wall = time.perf_counter() - t0
            mean_batch = d.metric("filterd_batch_size_sum") / d.metric("filterd_batch_size_count")
        finally:
            d.stop()
        relayed = {r.rcpt_tos[0]: email.message_from_bytes(r.data, policy=email.policy.default) for r in sink.messages}

    missing = [i for i in range(len(rows)) if f"m{i}@example.net" not in relayed]
    if missing:
        raise SystemExit(f"{len(missing)} not relayed, e.g. {rows[missing[0]].id}: reply {codes[missing[0]]}; replies {sorted(set(codes))}")
    scores = [float(relayed[f"m{i}@example.net"]["X-Spam-Score"]) for i in range(len(rows))]
    flags = [relayed[f"m{i}@example.net"]["X-Spam-Flag"] for i in range(len(rows))]
    threshold = float(relayed["m0@example.net"]["X-Spam-Status"].split("threshold=")[1].split()[0])
    smtp = compute_metrics(labels, scores, threshold)
    assert sum(f == "YES" for f in flags) == smtp.tp + smtp.fp, "X-Spam-Flag disagrees with X-Spam-Score"
    engine = Engine.load(args.model, device="cpu")
    direct = engine.classify_texts([r.text for r in rows])
    direct_m = compute_metrics(labels, [v.score for v in direct], engine.threshold)
    result = {
        "model": engine.version, "base": engine.meta.base, "split": args.split, "messages": len(rows),
        "replies": {str(c): codes.count(c) for c in sorted(set(codes))}, "concurrency": args.concurrency,
        "seconds": wall, "messages_per_s": len(rows) / wall, "session_p50_ms": 1000 * pct(session_s, 0.5),
        "session_p99_ms": 1000 * pct(session_s, 0.99), "mean_batch_size": mean_batch,
        "smtp": smtp.to_dict(), "engine_on_split_text": direct_m.to_dict(),
        "max_abs_score_diff_vs_engine": max(abs(a - b.score) for a, b in zip(scores, direct)),
        "differing_vs_engine": [r.id for a, b, r in zip(scores, direct, rows) if abs(a - b.score) > 1e-4],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
    }  # fmt: skip
    print(f"{result['base']} ({result['model']}), {len(rows)} {args.split} messages, concurrency {args.concurrency}")
    print("| path | accuracy | spam recall | ham FPR | messages/s | session p50 | session p99 | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| SMTP (filterd serve) | {100 * smtp.accuracy:.2f}% | {100 * smtp.spam_recall:.2f}% | {100 * smtp.ham_fpr:.2f}% | "
          f"{result['messages_per_s']:.1f} | {result['session_p50_ms']:.0f} ms | {result['session_p99_ms']:.0f} ms | {mean_batch:.1f} |")
    print(f"| engine on the split's text | {100 * direct_m.accuracy:.2f}% | {100 * direct_m.spam_recall:.2f}% | "
          f"{100 * direct_m.ham_fpr:.2f}% | | | | |")  # fmt: skip
    print(f"replies {result['replies']}; max |score diff| SMTP vs engine {result['max_abs_score_diff_vs_engine']:.2e}; "
          f"differing by > 1e-4: {result['differing_vs_engine']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
