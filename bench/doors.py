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
- `postfix-only`: the same Postfix with no filter at all (no model): the MTA's own cost;
- `rspamd`, `rspamd+bayes`: the peer, a private Rspamd 3.x (testing/rspamd.py: stock rules, every
  network check off) sent the same raws by the same HTTP client (`POST /checkv2` to its normal
  worker), rules only, or with its Bayes classifier on a private Redis, learned first through
  `rspamc learn_spam` / `learn_ham` on the `--learn-split` (learning timed apart, not in the CPU
  figure). Its verdict is spam when its action is not "no action" (greylisting is off, so from
  the "add header" score); `rspamc` itself then scans the same files at the same `-n` parallelism,
  for what its own client does.
Per path: messages/s and p50/p99 of the *verdict latency* (from the start of a message's session
to the moment its verdict is applied: the final SMTP/milter/HTTP reply, or, after the queue, its
arrival at the sink), the mean batch (filterd_batch_size), the verdicts' accuracy / spam recall /
ham FPR (trainer/evaluate.py at the model's threshold), and the scores' agreement: with each other
and with the engine scoring the same bytes' text in-process (SMTP and milter carry the score with
4 decimals in X-Spam-Score; HTTP its full value). For the Postfix paths the client's own session
time (queued) and the time until all are delivered are reported too. And the CPU each party used
per message (filterd's, Postfix's and Rspamd's process trees, Rspamd's Redis, this process: clients
and sink), which a
shared machine's load changes less than the rates; the load average at each path's start.
Needs root and postfix for the Postfix paths, rspamd and rspamc for the Rspamd ones (`--paths` picks paths).
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
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from filterd.model.engine import Engine
from filterd.doors.milter import protocol as m
from filterd.mail.text import extract_text
from testing.daemon import FilterdProcess
from testing.milter_mta import Mta
from testing.postfix import PostfixServer
from testing.rspamd import RspamdServer
from testing.services import RedisServer, free_port, tree_cpu_s, thread_cpu_s
from testing.smtp_sink import Received, SmtpSink
from trainer.data import read_split
from trainer.evaluate import compute_metrics

from testing.corpus import CORPUS, wire
from bench.daemon_redis import pct
from bench.http_checkv2 import post_all
from bench.milter_protocol import run_sessions
from bench.smtp import send_all

PATHS = ("smtp", "postfix+content_filter", "postfix+milter", "milter-protocol", "http", "postfix-only", "rspamd", "rspamd+bayes")
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
    spam_score: float | None = None  # a peer's scores are its own points, spam from this one; None: P(spam)


def cpu_seconds(filterd: FilterdProcess | None, postfix: PostfixServer | None, rspamd: RspamdServer | None = None,
                redis: RedisServer | None = None) -> dict[str, float]:  # fmt: skip
    """CPU used so far by filterd (process tree), Postfix (its master's tree), Rspamd (main process
    and workers), Rspamd's Redis and this process (the clients, the sink): on a shared machine a
    fairer figure than messages/s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pid = filterd.proc.pid if filterd is not None and filterd.proc is not None else None
    return {
        "filterd": tree_cpu_s(pid),
        **thread_cpu_s(pid),
        "postfix": tree_cpu_s(postfix.master_pid()) if postfix is not None else 0.0,
        "rspamd": rspamd.cpu_s() if rspamd is not None else 0.0,
        "rspamd_redis": tree_cpu_s(redis.proc.pid if redis is not None and redis.proc is not None else None),
        "bench_client_and_sink": usage.ru_utime + usage.ru_stime,
    }


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


def by_thread(cpu_ms: dict[str, float], pid_thread: str | None) -> dict[str, float]:
    """filterd's per-thread CPU folded into the event loop (its main thread), the model worker (the busiest
    other thread: the forward passes) and the rest (the extraction thread pool, the writers)."""
    threads = {k: v for k, v in cpu_ms.items() if k.startswith("thread:")}
    if not threads or pid_thread not in threads:
        return {}
    loop = threads.pop(pid_thread)
    worker = max(threads.values(), default=0.0)
    return {"event loop": round(loop, 2), "model worker": round(worker, 2), "other threads": round(sum(threads.values()) - worker, 2)}


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
        run.extra["main_thread"] = f"thread:{d.proc.pid}" if d.proc is not None else None
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


def rspamc_scan(rs: RspamdServer, raws: list[bytes], concurrency: int, directory: Path) -> dict:
    """The same raws scanned by `rspamc -n concurrency DIR`, Rspamd's own client: its wall time,
    Rspamd's and rspamc's CPU, and each file's score (None: no result for it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, raw in enumerate(raws):
        (directory / f"{i:06d}.eml").write_bytes(raw)
    # rspamc is the only child reaped meanwhile, so the children's rusage delta is its CPU.
    k0, c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), rs.cpu_s(), time.perf_counter()
    envelope = ("-F", "sender@bench.example", "-r", "rcpt@bench.example")  # what post_all sends (From:, Rcpt:)
    proc = subprocess.run(rs.rspamc_argv(*envelope, str(directory), parallel=concurrency), capture_output=True, timeout=600)
    wall, cpu, k1 = time.perf_counter() - t0, rs.cpu_s() - c0, resource.getrusage(resource.RUSAGE_CHILDREN)
    rspamc_cpu = k1.ru_utime + k1.ru_stime - k0.ru_utime - k0.ru_stime
    out = proc.stdout.decode(errors="replace")
    scores: list[float | None] = [None] * len(raws)
    actions: Counter[str] = Counter()
    for block in out.split("Results for file: ")[1:]:
        i, action = re.match(r"\S+/(\d+)\.eml ", block), re.search(r"^Action: (.*)$", block, re.M)
        score = re.search(r"^Score: (-?[\d.]+) /", block, re.M)
        if i and action and score:
            scores[int(i[1])] = float(score[1])
            actions[action[1]] += 1
    return {
        "rc": proc.returncode, "results": sum(s is not None for s in scores), "wall_s": round(wall, 3),
        "msg_per_s": round(len(raws) / wall, 1), "rspamd_cpu_ms_per_msg": round(1000 * cpu / len(raws), 2),
        "rspamc_cpu_ms_per_msg": round(1000 * rspamc_cpu / len(raws), 2),
        "actions": dict(actions), "scores": scores,
    }  # fmt: skip


def rspamd_path(name: str, raws: list[bytes], concurrency: int, tmp: Path,
                learn: tuple[list[bytes], list[bytes]] | None) -> PathRun:  # fmt: skip
    """The same raws through a private Rspamd's normal worker (`POST /checkv2`, the bench's HTTP
    client), rules only or (rspamd+bayes) with Bayes learned first on `learn` (spam, ham)."""
    slug = name.replace("+", "-")
    redis = RedisServer(tmp / f"{slug}-redis").start() if name == "rspamd+bayes" else None
    try:
        rs = RspamdServer(tmp / slug, redis_url=redis.url if redis else None, redis_pid=redis.proc.pid if redis else None)
        with rs:
            actions = rs.actions()
            extra: dict = {"rspamd_actions": actions, "rspamd_normal_workers": len(rs.workers_named("normal"))}
            if redis is not None:
                if not learn or not learn[0] or not learn[1]:
                    raise ValueError("rspamd+bayes needs spam and ham to learn from")
                extra["learn"] = asdict(rs.learn(*learn, parallel=concurrency))
                extra["learn"]["rspamd_cpu_ms_per_msg"] = round(1000 * extra["learn"]["rspamd_cpu_s"] / sum(map(len, learn)), 2)
            c0, t0 = cpu_seconds(None, None, rs, redis), time.perf_counter()
            out = asyncio.run(post_all(rs.normal_port, raws, concurrency))
            run = PathRun(name, [], [r[2] for r in out], [], time.perf_counter() - t0, extra=extra)
            run.cpu_s = cpu_delta(c0, cpu_seconds(None, None, rs, redis))
            scan = rspamc_scan(rs, raws, concurrency, rs.root / "scan")
    finally:
        if redis is not None:
            redis.stop()
    shutil.rmtree(rs.root, ignore_errors=True)
    run.replies = [f"{status} {body.get('action')}" for status, body, _ in out]
    run.scores = [float(body["score"]) if status == 200 and "score" in body else None for status, body, _ in out]
    # Greylisting is off (testing/rspamd.py), so the lowest action left is where spam starts.
    run.spam_score = min(actions.values())
    run.extra["action_vs_score_differ"] = sum(
        s is not None and (body.get("action") != "no action") != (s >= run.spam_score) for s, (_, body, _) in zip(run.scores, out)
    )
    theirs = scan.pop("scores")
    scan["verdicts_differ_from_http_client"] = sum(
        a is not None and b is not None and (a >= run.spam_score) != (b >= run.spam_score) for a, b in zip(run.scores, theirs)
    )
    run.extra["rspamc"] = scan
    return run


def run_path(name: str, model: Path, raws: list[bytes], concurrency: int, tmp: Path,
             learn: tuple[list[bytes], list[bytes]] | None = None) -> PathRun:  # fmt: skip
    load = os.getloadavg()
    if name.startswith("rspamd"):
        run = rspamd_path(name, raws, concurrency, tmp, learn)
    elif name == "smtp":
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
        "cpu_ms_per_msg": {k: round(1000 * v / n, 2) for k, v in run.cpu_s.items() if not k.startswith("thread:")},
        "filterd_threads_ms_per_msg": by_thread({k: 1000 * v / n for k, v in run.cpu_s.items()}, run.extra.pop("main_thread", None)),
        **run.extra,
    }  # fmt: skip
    if got and run.spam_score is not None:  # a peer: its verdicts, and how many differ from the engine's
        metrics = compute_metrics([labels[i] for i in got], [run.scores[i] for i in got], run.spam_score)
        out.update(accuracy=metrics.accuracy, spam_recall=metrics.spam_recall, ham_fpr=metrics.ham_fpr, spam_score=run.spam_score,
                   metrics=metrics.to_dict(), verdicts_differ_vs_engine=sum((run.scores[i] >= run.spam_score) != (engine[i] >= threshold)
                                                                            for i in got))  # fmt: skip
    elif got:
        metrics = compute_metrics([labels[i] for i in got], [run.scores[i] for i in got], threshold)
        diffs = [abs(run.scores[i] - engine[i]) for i in got]
        out.update(accuracy=metrics.accuracy, spam_recall=metrics.spam_recall, ham_fpr=metrics.ham_fpr,
                   metrics=metrics.to_dict(), max_abs_diff_vs_engine=max(diffs),
                   differing_vs_engine_over_1e_4=sum(x > 1e-4 for x in diffs))  # fmt: skip
    return out


def agreement(runs: list[PathRun], threshold: float) -> dict:
    """Per pair of filterd's paths with scores: max |score difference| over messages both scored, and
    how many messages get a different verdict."""
    out = {}
    ours = [r for r in runs if r.spam_score is None and any(s is not None for s in r.scores)]  # P(spam), not a peer's points
    for a, b in itertools.combinations(ours, 2):
        both = [(x, y) for x, y in zip(a.scores, b.scores) if x is not None and y is not None]
        out[f"{a.path} vs {b.path}"] = {
            "messages": len(both), "max_abs_diff": max((abs(x - y) for x, y in both), default=None),
            "verdicts_differ": sum((x >= threshold) != (y >= threshold) for x, y in both),
        }  # fmt: skip
    return out


def pc(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def cell(x: object) -> str:
    return "" if x is None else str(x)


def markdown(doc: dict) -> str:
    rows = [
        "| path | msg/s | p50 ms | p99 ms | mean batch | in filterd, mean ms | accuracy | spam recall | ham FPR | max \\|diff\\| vs engine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["paths"]:
        if r["path"] == "postfix-only":
            continue
        diff = (
            f"{r['max_abs_diff_vs_engine']:.1e}" if "max_abs_diff_vs_engine" in r else "(own score)" if "spam_score" in r else ""
        )
        rows.append(f"| {r['path']} | {r['msg_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {cell(r['mean_batch'])} | "
                    f"{cell(r['mean_classify_ms'])} | {pc(r.get('accuracy'))} | {pc(r.get('spam_recall'))} | {pc(r.get('ham_fpr'))} | "
                    f"{diff} |")  # fmt: skip
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
             "| path | filterd ms | Postfix ms | Rspamd ms | Rspamd's Redis ms | bench clients + sink ms | load at start |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in doc["paths"]:
        c = r["cpu_ms_per_msg"]
        rows.append(f"| {r['path']} | {c.get('filterd') or ''} | {c.get('postfix') or ''} | {c.get('rspamd') or ''} | "
                    f"{c.get('rspamd_redis') or ''} | {c.get('bench_client_and_sink', '')} | {r['load_start'][0]:.2f} |")  # fmt: skip
    threads = [r for r in doc["paths"] if r.get("filterd_threads_ms_per_msg")]
    if threads:
        rows += ["", "filterd's own process by thread, ms per message (the main thread runs the event loop: protocols, the "
                 "message path, tokens; the model worker the forward passes; the others are the extraction thread pool and "
                 "the writers):", "", "| path | event loop | model worker | other threads |", "| --- | --- | --- | --- |"]  # fmt: skip
        rows += [f"| {r['path']} | {t['event loop']} | {t['model worker']} | {t['other threads']} |"
                 for r in threads if (t := r["filterd_threads_ms_per_msg"])]  # fmt: skip
    rows += rspamd_markdown(doc)
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


def rspamd_markdown(doc: dict) -> list[str]:
    """The peer's own figures: learning (apart from the CPU above), rspamc's run, and filterd's CPU
    per message against Rspamd's with Bayes."""
    peers = [r for r in doc["paths"] if r["path"].startswith("rspamd")]
    if not peers:
        return []
    rows = ["", "Rspamd: spam when its action is not \"no action\" (score >= the lowest action threshold, "
            "greylisting off); learning before the scan, and `rspamc -n <concurrency> DIR` scanning the same files after it:", "",
            "| path | normal workers | spam from | learned spam / ham (sent) | learning s | learning Rspamd ms/msg | "
            "rspamc: msg/s | Rspamd ms | rspamc ms | verdicts unlike the HTTP client's |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in peers:
        lr, sc = r.get("learn"), r["rspamc"]
        learned = f"{lr['learned_spam']} / {lr['learned_ham']} ({lr['sent_spam']} / {lr['sent_ham']})" if lr else ""
        rows.append(f"| {r['path']} | {r['rspamd_normal_workers']} | {r.get('spam_score', '')} | {learned} | "
                    f"{lr['wall_s'] if lr else ''} | {lr['rspamd_cpu_ms_per_msg'] if lr else ''} | {sc['msg_per_s']} | "
                    f"{sc['rspamd_cpu_ms_per_msg']} | {sc['rspamc_cpu_ms_per_msg']} | {sc['verdicts_differ_from_http_client']} |")  # fmt: skip
    declined = [
        f"{r['path']}: " + ", ".join(f"{n} {why}" for why, n in r["learn"]["declined"].items()) for r in peers if r.get("learn")
    ]
    if any(r["learn"]["declined"] for r in peers if r.get("learn")):
        rows += ["", "Not learned, by Rspamd's reason: " + "; ".join(declined) + "."]
    bayes = next((r for r in peers if r["path"] == "rspamd+bayes"), None)
    ours = [r for r in doc["paths"] if r["cpu_ms_per_msg"].get("filterd")]
    if bayes and ours:
        theirs = bayes["cpu_ms_per_msg"]["rspamd"] + bayes["cpu_ms_per_msg"].get("rspamd_redis", 0)
        rows += ["", f"filterd's CPU per message against Rspamd+Bayes's ({theirs:.2f} ms with its Redis): "
                 + "; ".join(f"{r['path']} {r['cpu_ms_per_msg']['filterd']:.2f} ms ({r['cpu_ms_per_msg']['filterd'] / theirs:.2f}x)"
                             for r in ours) + "."]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a prepare directory whose ids name corpus files")
    ap.add_argument("--split", default="test")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--limit", type=int, help="only the first N messages of the split (a quick try)")
    ap.add_argument("--learn-split", default="train", help="what rspamd+bayes learns from first")
    ap.add_argument("--learn-limit", type=int, help="only the first N messages of --learn-split")
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
    learn = None
    if "rspamd+bayes" in paths:
        learn_rows = read_split(args.data / f"{args.learn_split}.csv")[: args.learn_limit]
        if {r.id for r in learn_rows} & {r.id for r in rows}:
            ap.error(f"--learn-split {args.learn_split} shares messages with --split {args.split}")
        learn = tuple(
            [wire((args.corpus / r.id).read_bytes()) for r in learn_rows if r.label == label] for label in ("spam", "ham")
        )
    engine = Engine.load(args.model, device="cpu")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-doors-") as tmp:
        for name in paths:
            run = run_path(name, args.model, raws, args.concurrency, Path(tmp), learn)
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
        "learn_split": args.learn_split if learn else None, "learned_from": len(learn[0]) + len(learn[1]) if learn else None,
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
