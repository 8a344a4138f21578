"""The three mail doors on one model and the same mails: messages/s, p50/p99, batch and verdicts (issue 14).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FILTERD_SHARED=/work/shared nice -n 5 python -m bench.doors \\
        --model /work/sa/model --data /work/sa/data --split test --concurrency 16 \\
        --json bench/results/doors.json --md bench/results/doors.md

Every raw message of the split (ids name the corpus files; the mbox From_ line removed, CRLF line
ends, as an MTA carries it: testing/corpus.py) goes through each path below, `--concurrency` at a
time, each path with its own fresh `filterd serve` (testing/daemon.py) on the same model and the
default [policy] (tag only: every message gets its score back, none is refused):
- `smtp`: the content filter alone: one SMTP session per message straight to filterd's SMTP
  ingress, which relays to an SMTP sink (as bench/smtp.py);
- `postfix+content_filter`: a real Postfix (testing/postfix.py) with the shipped deploy/postfix/
  main.cf + master.cf: client -> Postfix (queued) -> scan (16 processes) -> filterd -> Postfix's
  re-injection listener -> sink;
- `postfix+milter`: the same Postfix with the shipped deploy/postfix/milter.main.cf instead:
  filterd answers during the SMTP session, Postfix queues and delivers to the sink;
- `milter-protocol`: the milter protocol alone, testing/milter_mta.py as the MTA side (one
  connection per concurrent session, the next message when one is done; as bench/milter_protocol.py);
- `http`: `POST /checkv2` (Rspamd's protocol), one connection per request (as bench/http_checkv2.py);
- `postfix-only`: the same Postfix with no filter at all (no model): the MTA's own cost.
Per path: messages/s and p50/p99 of the *verdict latency* (from the start of a message's session
to the moment its verdict is applied: the final SMTP/milter/HTTP reply, or, after the queue, its
arrival at the sink), the mean batch (filterd_batch_size), the verdicts' accuracy / spam recall /
ham FPR (trainer/evaluate.py at the model's threshold), and the scores' agreement: with each other
and with the engine scoring the same bytes' text in-process (SMTP and milter carry the score with
4 decimals in X-Spam-Score; HTTP its full value). For the Postfix paths the client's own session
time (queued) and the time until all are delivered are reported too. And the CPU each party used
per message (filterd's and Postfix's process trees, this process: clients and sink), which a
shared machine's load changes less than the rates; the load average at each path's start.
Needs root and postfix for the Postfix paths (`--paths` picks paths).
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import itertools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from filterd.model.engine import Engine
from filterd.doors import milter as m
from filterd.mail.text import extract_text
from testing.daemon import FilterdProcess
from testing.milter_mta import Mta
from testing.postfix import PostfixServer
from testing.services import free_port
from testing.smtp_sink import Received, SmtpSink
from trainer.data import read_split
from trainer.evaluate import compute_metrics

from testing.corpus import CORPUS, wire
from bench.daemon_redis import pct
from bench.http_checkv2 import post_all
from bench.milter_protocol import run_sessions
from bench.smtp import send_all

PATHS = ("smtp", "postfix+content_filter", "postfix+milter", "milter-protocol", "http", "postfix-only")
NO_REDIS = "redis://127.0.0.1:1/0"  # [redis] is disabled; the URL is never used


@dataclass
class PathRun:
    """One path's raw outcome: per message (split order) its score (None: no verdict came back),
    verdict latency and reply; the wall time until every verdict was applied."""

    path: str
    scores: list[float | None]
    latency_s: list[float]
    replies: list[str]
    wall_s: float
    mean_batch: float | None = None
    mean_classify_ms: float | None = None  # filterd_classify_seconds: arrival in filterd to verdict
    extra: dict = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds while sending, per party (see cpu_seconds)
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process and its live descendants have used so far, their reaped
    children included (Postfix's master reaps its smtpd/cleanup/smtp processes; filterd its parsers)."""
    if pid is None:
        return 0.0
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            f = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(f[1]), []).append(int(p.name))
        ticks[int(p.name)] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        total += ticks.get(q, 0)
        todo += children.get(q, [])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds(filterd: FilterdProcess | None, postfix: PostfixServer | None) -> dict[str, float]:
    """CPU used so far by filterd (process tree), Postfix (its master's tree) and this process (the
    clients, the sink): on a shared machine a fairer figure than messages/s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "filterd": tree_cpu_s(filterd.proc.pid if filterd is not None and filterd.proc is not None else None),
        "postfix": tree_cpu_s(postfix.master_pid()) if postfix is not None else 0.0,
        "bench_client_and_sink": usage.ru_utime + usage.ru_stime,
    }


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 3) for k in before}


class TimedSink(SmtpSink):
    """An SmtpSink that also notes when each message arrived (time.perf_counter, by first recipient)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}

    def _record(self, message: Received) -> None:
        self.arrived[message.rcpt_tos[0]] = time.perf_counter()
        super()._record(message)


def rcpt(i: int) -> str:
    return f"m{i}@example.net"  # what bench.smtp.send_all sends message i to


def header_score(values: list[str]) -> float | None:
    """P(spam) from a message's X-Spam-Score fields: exactly one (ours) or no verdict."""
    return float(values[0]) if len(values) == 1 else None


def relayed_scores(sink: SmtpSink, n: int) -> tuple[list[float | None], int]:
    """Scores read back from the X-Spam-Score of each delivered message; and how many had not exactly one."""
    got = {r.rcpt_tos[0]: r.data for r in sink.messages}
    scores: list[float | None] = []
    odd = 0
    for i in range(n):
        data = got.get(rcpt(i))
        values = email.message_from_bytes(data, policy=email.policy.compat32).get_all("X-Spam-Score", []) if data else []
        odd += bool(data) and len(values) != 1
        scores.append(header_score([str(v).strip() for v in values]))
    return scores, odd


def milter_added_headers(replies: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The headers a milter's end-of-message replies add (SMFIR_ADDHEADER), value stripped."""
    out = []
    for cmd, data in replies:
        if cmd == m.SMFIR_ADDHEADER:
            name, value = data.split(b"\0")[:2]
            out.append((name.decode(), value.decode().strip()))
    return out


def daemon(model: Path, log: Path, **doors: object) -> FilterdProcess:
    return FilterdProcess(model, NO_REDIS, log, redis__enabled="false", **doors).start(timeout=300)


def finish(run: PathRun, d: FilterdProcess | None) -> PathRun:
    if d is not None:
        run.mean_batch = d.metric("filterd_batch_size_sum") / max(d.metric("filterd_batch_size_count"), 1)
        run.mean_classify_ms = (
            1000 * d.metric("filterd_classify_seconds_sum") / max(d.metric("filterd_classify_seconds_count"), 1)
        )
    return run


def smtp_path(model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> PathRun:
    with TimedSink() as sink:
        port = free_port()
        d = daemon(model, tmp / "filterd-smtp.log", smtp__enabled="true", smtp__listen=f"127.0.0.1:{port}",
                   smtp__next_hop=sink.address)  # fmt: skip
        try:
            c0, t0 = cpu_seconds(d, None), time.perf_counter()
            codes, session_s = asyncio.run(send_all(port, raws, concurrency))
            run = finish(PathRun("smtp", [], session_s, [str(c) for c in codes], time.perf_counter() - t0), d)
            run.cpu_s = cpu_delta(c0, cpu_seconds(d, None))
        finally:
            d.stop()
        run.scores, run.extra["not_one_x_spam_score"] = relayed_scores(sink, len(raws))
    return run


def postfix_path(name: str, model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> PathRun:
    """SMTP clients -> a private Postfix -> (filterd as content filter | as milter | nothing) -> sink."""
    filter_port, reinject_port, milter_port = free_port(), free_port(), free_port()
    starts = [0.0] * len(raws)
    with TimedSink() as sink:
        pf = PostfixServer(tmp / name.replace("+", "-"), filter_port=filter_port, reinject_port=reinject_port,
                           relay_port=sink.port, content_filter=name == "postfix+content_filter",
                           milter_port=milter_port if name == "postfix+milter" else None)  # fmt: skip
        d = None
        with pf:
            if name == "postfix+content_filter":
                d = daemon(model, tmp / "filterd-cf.log", smtp__enabled="true", smtp__listen=f"127.0.0.1:{filter_port}",
                           smtp__next_hop=f"127.0.0.1:{reinject_port}")  # fmt: skip
            elif name == "postfix+milter":
                d = daemon(model, tmp / "filterd-milter.log", milter__enabled="true", milter__listen=f"127.0.0.1:{milter_port}")
            try:
                c0, t0 = cpu_seconds(d, pf), time.perf_counter()
                codes, session_s = asyncio.run(send_all(pf.smtpd_port, raws, concurrency, starts))
                sessions_done = time.perf_counter() - t0
                try:
                    sink.wait_for(sum(c == 250 for c in codes), timeout=600)
                except AssertionError as e:  # reported below as messages without a verdict
                    print(f"{name}: {str(e)[:300]}", file=sys.stderr)
                run = finish(PathRun(name, [], [], [str(c) for c in codes], time.perf_counter() - t0), d)
                run.cpu_s = cpu_delta(c0, cpu_seconds(d, pf))
                time.sleep(0.5)
                queue = pf.queue()
            finally:
                if d is not None:
                    d.stop()
        shutil.rmtree(pf.root, ignore_errors=True)  # PostfixServer keeps its /tmp directory; a bench has no use for it
        scores, odd = relayed_scores(sink, len(raws))
        arrived = [sink.arrived.get(rcpt(i)) for i in range(len(raws))]
    delivery_s = [a - s for a, s in zip(arrived, starts) if a is not None]
    # The verdict is applied at the end of the client's session for a milter, on delivery for a
    # content filter; with no filter the whole pass through Postfix is what is timed.
    in_session = name == "postfix+milter"
    run.latency_s = session_s if in_session else delivery_s
    run.wall_s = sessions_done if in_session else run.wall_s
    run.scores = scores if name != "postfix-only" else [None] * len(raws)
    run.extra.update(
        sessions_done_s=round(sessions_done, 3), session_msg_per_s=round(len(raws) / sessions_done, 1),
        session_p50_ms=round(1000 * pct(session_s, 0.5), 1), session_p99_ms=round(1000 * pct(session_s, 0.99), 1),
        all_delivered_s=round(max(arrived_ok := [a for a in arrived if a is not None], default=t0) - t0, 3),
        delivered=len(arrived_ok), delivery_p50_ms=round(1000 * pct(delivery_s, 0.5), 1) if delivery_s else None,
        delivery_p99_ms=round(1000 * pct(delivery_s, 0.99), 1) if delivery_s else None, queue_after=len(queue),
        not_one_x_spam_score=odd,
    )  # fmt: skip
    return run


def milter_protocol_path(model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> PathRun:
    port = free_port()
    d = daemon(model, tmp / "filterd-mp.log", milter__enabled="true", milter__listen=f"127.0.0.1:{port}")

    async def open_mta() -> Mta:
        return Mta(*await asyncio.open_connection("127.0.0.1", port))

    try:
        c0 = cpu_seconds(d, None)
        replies, lat, wall = asyncio.run(run_sessions(open_mta, raws, concurrency))
        run = finish(PathRun("milter-protocol", [], lat, [], wall), d)
        run.cpu_s = cpu_delta(c0, cpu_seconds(d, None))
    finally:
        d.stop()
    for r in replies:
        run.scores.append(header_score([v for k, v in milter_added_headers(r) if k == "X-Spam-Score"]))
        run.replies.append(r[-1][0].decode() if r else "none")
    return run


def http_path(model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> PathRun:
    port = free_port()
    d = daemon(model, tmp / "filterd-http.log", http__enabled="true", http__listen=f"127.0.0.1:{port}")
    try:
        c0, t0 = cpu_seconds(d, None), time.perf_counter()
        out = asyncio.run(post_all(port, raws, concurrency))
        run = finish(PathRun("http", [], [r[2] for r in out], [], time.perf_counter() - t0), d)
        run.cpu_s = cpu_delta(c0, cpu_seconds(d, None))
    finally:
        d.stop()
    run.replies = [f"{status} {body.get('action')}" for status, body, _ in out]
    run.scores = [body["filterd"]["p_spam"] if status == 200 else None for status, body, _ in out]
    return run


def run_path(name: str, model: Path, raws: list[bytes], concurrency: int, tmp: Path) -> PathRun:
    load = os.getloadavg()
    if name == "smtp":
        run = smtp_path(model, raws, concurrency, tmp)
    elif name == "milter-protocol":
        run = milter_protocol_path(model, raws, concurrency, tmp)
    elif name == "http":
        run = http_path(model, raws, concurrency, tmp)
    else:
        run = postfix_path(name, model, raws, concurrency, tmp)
    run.load_start = load
    return run


def summarize(run: PathRun, labels: list[int], threshold: float, engine: list[float]) -> dict:
    """A path's figures: speed, latency, batch, verdict quality, agreement with the engine."""
    n = len(labels)
    got = [i for i, s in enumerate(run.scores) if s is not None]
    out = {
        "path": run.path, "messages": n, "verdicts": len(got), "wall_s": round(run.wall_s, 3),
        "msg_per_s": round(n / run.wall_s, 1), "p50_ms": round(1000 * pct(run.latency_s, 0.5), 1),
        "p99_ms": round(1000 * pct(run.latency_s, 0.99), 1),
        "mean_batch": round(run.mean_batch, 2) if run.mean_batch is not None else None,
        "mean_classify_ms": round(run.mean_classify_ms, 1) if run.mean_classify_ms is not None else None,
        "replies": dict(Counter(run.replies)), "load_start": run.load_start, "cpu_s": run.cpu_s,
        "cpu_ms_per_msg": {k: round(1000 * v / n, 2) for k, v in run.cpu_s.items()}, **run.extra,
    }  # fmt: skip
    if got:
        metrics = compute_metrics([labels[i] for i in got], [run.scores[i] for i in got], threshold)
        diffs = [abs(run.scores[i] - engine[i]) for i in got]
        out.update(accuracy=metrics.accuracy, spam_recall=metrics.spam_recall, ham_fpr=metrics.ham_fpr,
                   metrics=metrics.to_dict(), max_abs_diff_vs_engine=max(diffs),
                   differing_vs_engine_over_1e_4=sum(x > 1e-4 for x in diffs))  # fmt: skip
    return out


def agreement(runs: list[PathRun], threshold: float) -> dict:
    """Per pair of paths with scores: max |score difference| over messages both scored, and how many
    messages get a different verdict."""
    out = {}
    for a, b in itertools.combinations([r for r in runs if any(s is not None for s in r.scores)], 2):
        both = [(x, y) for x, y in zip(a.scores, b.scores) if x is not None and y is not None]
        out[f"{a.path} vs {b.path}"] = {
            "messages": len(both), "max_abs_diff": max((abs(x - y) for x, y in both), default=None),
            "verdicts_differ": sum((x >= threshold) != (y >= threshold) for x, y in both),
        }  # fmt: skip
    return out


def pc(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def markdown(doc: dict) -> str:
    rows = [
        "| path | msg/s | p50 ms | p99 ms | mean batch | in filterd, mean ms | accuracy | spam recall | ham FPR | max \\|diff\\| vs engine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["paths"]:
        if r["path"] == "postfix-only":
            continue
        rows.append(f"| {r['path']} | {r['msg_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | "
                    f"{r['mean_classify_ms']} | {pc(r.get('accuracy'))} | {pc(r.get('spam_recall'))} | {pc(r.get('ham_fpr'))} | "
                    f"{r.get('max_abs_diff_vs_engine', float('nan')):.1e} |")  # fmt: skip
    e = doc["engine"]
    rows.append(
        f"| engine, in process (reference) | | | | | | {pc(e['accuracy'])} | {pc(e['spam_recall'])} | {pc(e['ham_fpr'])} | |"
    )
    pf = [r for r in doc["paths"] if r["path"].startswith("postfix")]
    if pf:
        rows += ["", "Through Postfix: what the sending client waits for, and the pass until delivery to the sink.", "",
                 "| path | client sessions: msg/s | session p50 ms | p99 ms | all delivered: msg/s | delivery p50 ms | p99 ms | queue after |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in pf:
            rows.append(f"| {r['path']} | {r['session_msg_per_s']} | {r['session_p50_ms']} | {r['session_p99_ms']} | "
                        f"{round(r['messages'] / r['all_delivered_s'], 1) if r['all_delivered_s'] else ''} | "
                        f"{r['delivery_p50_ms']} | {r['delivery_p99_ms']} | {r['queue_after']} |")  # fmt: skip
    rows += ["", "CPU per message while the path ran (user + system, all processes of each party), and the load average "
             "(1 min) when it started:", "",
             "| path | filterd ms | Postfix ms | bench clients + sink ms | load at start |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in doc["paths"]:
        c = r["cpu_ms_per_msg"]
        rows.append(f"| {r['path']} | {c.get('filterd') or ''} | {c.get('postfix') or ''} | {c.get('bench_client_and_sink', '')} | "
                    f"{r['load_start'][0]:.2f} |")  # fmt: skip
    worst = max(doc["agreement"].items(), key=lambda kv: kv[1]["max_abs_diff"] or 0, default=None)
    differ = sum(v["verdicts_differ"] for v in doc["agreement"].values())
    m = doc["machine"]
    notes = [
        "", f"{doc['messages']} messages ({doc['split']} split), concurrency {doc['concurrency']}, model {doc['model']} "
        f"({doc['base']}, threshold {doc['threshold']}); {m['cpus']} CPUs, load average {m['load_start'][0]:.2f} at start, "
        f"{m['load_end'][0]:.2f} at the end.",
        f"Scores across doors: largest |difference| {worst[1]['max_abs_diff']:.1e} ({worst[0]}); pairs of doors giving a "
        f"different verdict to the same message: {differ}." if worst else "",
        "Replies: " + "; ".join(f"{r['path']} {r['replies']}" for r in doc["paths"]) + ".",
    ]  # fmt: skip
    return "\n".join(rows + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a prepare directory whose ids name corpus files")
    ap.add_argument("--split", default="test")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--limit", type=int, help="only the first N messages of the split (a quick try)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        ap.error(f"unknown path(s) {sorted(unknown)}; known: {', '.join(PATHS)}")
    load0 = os.getloadavg()
    rows = read_split(args.data / f"{args.split}.csv")[: args.limit]
    raws = [wire((args.corpus / r.id).read_bytes()) for r in rows]
    labels = [1 if r.label == "spam" else 0 for r in rows]
    engine = Engine.load(args.model, device="cpu")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-doors-") as tmp:
        for name in paths:
            run = run_path(name, args.model, raws, args.concurrency, Path(tmp))
            print(f"{name}: {len(raws) / run.wall_s:.1f} msg/s", file=sys.stderr)
            runs.append(run)
    t0 = time.perf_counter()
    direct = [v.score for v in engine.classify_texts([extract_text(r) for r in raws])]
    engine_s = time.perf_counter() - t0
    em = compute_metrics(labels, direct, engine.threshold)
    doc = {
        "command": "python -m bench.doors " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": engine.version, "base": engine.meta.base, "threshold": engine.threshold, "split": args.split,
        "messages": len(rows), "spam": sum(labels), "concurrency": args.concurrency,
        "paths": [summarize(r, labels, engine.threshold, direct) for r in runs],
        "agreement": agreement(runs, engine.threshold),
        "engine": {"accuracy": em.accuracy, "spam_recall": em.spam_recall, "ham_fpr": em.ham_fpr, "metrics": em.to_dict(),
                   "seconds": round(engine_s, 2), "note": "Engine.classify_texts on extract_text of the same bytes, in process"},
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "load_start": load0, "load_end": os.getloadavg(),
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
        "ids": [r.id for r in rows],
        "scores": {r.path: r.scores for r in runs if any(s is not None for s in r.scores)} | {"engine": direct},
    }  # fmt: skip
    text = markdown(doc)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.md:
        args.md.write_text(f"`OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 {doc['command']}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
