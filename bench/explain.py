"""Explanations: faithfulness and cost of each method, and the daemon's throughput with them on.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.explain --model /work/sa/model \
        --data /work/sa/data --json bench/results/explain.json --md bench/results/explain.md

Faithfulness (each spam of the split): delete the k words with the largest positive weight (the words
the method says raised P(spam)) and score what is left; the drop in P(spam) and in the spam logit, next
to the drop when deleting k words drawn at random (seeded per message). Means with 95% bootstrap
intervals (trainer.evaluate.bootstrap_ci). A method that names no raising word for a spam deletes
nothing there (drop 0: counted, not skipped). Cost: ms per message for `explain` on CPU at 1 and 2
torch threads. Daemon: bench.daemon_redis's run_daemon (filterd serve over a real redis-server) with
[explain] enabled = off | spam | all: a flood (all at once) and an open-loop steady rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.daemon_redis import run_daemon
from filterd.model.engine import Engine
from filterd.model.explain import METHODS, _sigmoid, attribute, delete_words, explain, logits_of, words_of
from filterd.model.tokenizer import CHARS_PER_TOKEN_BOUND
from trainer.data import read_split
from trainer.evaluate import bootstrap_ci


def mean_ci(values: list[float]) -> dict:
    ci = bootstrap_ci([0] * len(values), values, lambda y, s: float(np.mean(s)), n=1000, seed=0)
    return {"mean": float(np.mean(values)) if values else None, "ci95": list(ci) if ci else None, "n": len(values)}


def faithfulness(engine: Engine, texts: list[str], method: str, k: int, seed: int) -> dict:
    drops = {"top_p": [], "top_logit": [], "random_p": [], "random_logit": []}
    no_raising, flipped, t0 = 0, 0, time.perf_counter()
    for n, text in enumerate(texts):
        full, words, weights = attribute(engine, text, method)
        ids = engine.tokenizer.encode(text)
        every = words_of(text[: engine.tokenizer.max_length * CHARS_PER_TOKEN_BOUND], ids)
        at = {(w.first, w.last): i for i, w in enumerate(every)}
        raising = sorted((i for i in range(len(words)) if weights[i] > 0), key=lambda i: (-weights[i], i))[:k]
        top = [at[(words[i].first, words[i].last)] for i in raising]
        no_raising += not top
        rng = random.Random(seed * 1_000_003 + n)
        rand = rng.sample(range(len(every)), min(k, len(every)))
        base = full
        after_top, after_random = logits_of(
            engine.model, [delete_words(ids, every, top), delete_words(ids, every, rand)], engine.device
        )
        for name, after in (("top", after_top), ("random", after_random)):
            drops[f"{name}_p"].append(_sigmoid(base) - _sigmoid(after))
            drops[f"{name}_logit"].append(base - after)
        flipped += _sigmoid(base) >= engine.threshold > _sigmoid(after_top)
    return {"method": method, "k": k, "spam": len(texts), "no_raising_word": no_raising,
            "flipped_to_ham": flipped, "seconds": time.perf_counter() - t0, "per_message_top_logit": drops["top_logit"],
            **{name: mean_ci(v) for name, v in drops.items()}}  # fmt: skip


def paired(results: list[dict], reference: str) -> list[dict]:
    """Per-message difference of the top-k logit drop, each method minus `reference` (same messages only)."""
    ref = next((f for f in results if f["method"] == reference), None)
    out = []
    for f in results:
        if ref is None or f is ref:
            continue
        n = min(f["spam"], ref["spam"])
        diff = [a - b for a, b in zip(f["per_message_top_logit"][:n], ref["per_message_top_logit"][:n])]
        out.append({"method": f["method"], "reference": reference, "n": n, "top_logit_minus_reference": mean_ci(diff)})
    return out


def cost(engine: Engine, texts: list[str], method: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    explain(engine, texts[0], method=method)  # warm-up
    ms = []
    for text in texts:
        t0 = time.perf_counter()
        explain(engine, text, method=method)
        ms.append(1000 * (time.perf_counter() - t0))
    ms.sort()
    return {"method": method, "threads": threads, "messages": len(ms), "mean_ms": statistics.fmean(ms),
            "p50_ms": ms[len(ms) // 2], "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}  # fmt: skip


OUTCOMES = ("explained", "busy", "queue-full", "deadline", "error")
EXPLAIN_METRICS = tuple(f'filterd_explanations_total{{outcome="{o}",source="redis"}}' for o in OUTCOMES)


def daemon(model: Path, texts: list[str], modes: list[str], rate: float, threads: int) -> list[dict]:
    rows = []
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the daemon's torch threads (the bench's own are set apart)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for arrival in (None, rate):
                work = Path(tmp) / f"{mode}-{arrival}"
                work.mkdir()
                r = run_daemon(model, texts, work, arrival, metrics=EXPLAIN_METRICS, explain__enabled=mode)
                r = {re.search(r'outcome="([^"]+)"', k)[1] if k in EXPLAIN_METRICS else k: v for k, v in r.items()}
                rows.append({"explain": mode, "arrivals": "flood" if arrival is None else arrival, **r})
                shutil.rmtree(work, ignore_errors=True)
                print(f"daemon explain={mode} arrivals={rows[-1]['arrivals']}: {r['messages_per_s']:.1f} msg/s, "
                      f"p99 {r['p99_ms']:.0f} ms, explained {r.get('explained', 0):.0f}", flush=True)  # fmt: skip
    return rows


def _ci(d: dict, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    if d["mean"] is None:
        return "–"
    lo, hi = d["ci95"] or (float("nan"), float("nan"))
    return f"{fmt.format(d['mean'] * scale)} [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"


def markdown(out: dict) -> str:
    lines = [f"Model `{out['model']}` ({out['base']}, max_length {out['max_length']}), split `{out['split']}`: "
             f"{out['spam']} spam. Command: `{out['command']}`. Load average at start: {out['loadavg']}.", "",
             ]  # fmt: skip
    if out["faithfulness"]:
        lines += [f"### Faithfulness: delete the top-{out['k']} raising words vs {out['k']} random words (means, 95% bootstrap CI)", "",
                  "| method | spam | ΔP(spam) top-k | ΔP(spam) random | Δlogit top-k | Δlogit random | flipped to ham | no raising word |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for f in out["faithfulness"]:
        lines.append(f"| {f['method']} | {f['spam']} | {_ci(f['top_p'])} | {_ci(f['random_p'])} | {_ci(f['top_logit'], fmt='{:.2f}')} | "
                     f"{_ci(f['random_logit'], fmt='{:.2f}')} | {f['flipped_to_ham']} | {f['no_raising_word']} |")  # fmt: skip
    if out.get("paired"):
        lines += [
            "",
            "Paired, on the same spam (the first n): Δlogit top-k of each method minus that of "
            f"{out['paired'][0]['reference']} (mean, 95% bootstrap CI):",
            "",
        ]
        lines += [f"- {p['method']}: {_ci(p['top_logit_minus_reference'], fmt='{:+.2f}')} (n = {p['n']})" for p in out["paired"]]
    if out["cost"]:
        lines += [
            "",
            "### Cost per message on CPU (ms)",
            "",
            "| method | threads | messages | mean | p50 | p95 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    for c in out["cost"]:
        lines.append(
            f"| {c['method']} | {c['threads']} | {c['messages']} | {c['mean_ms']:.1f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} |"
        )
    if out.get("daemon"):
        lines += ["", f"### Daemon over Redis ({out['daemon_messages']} test mails, [explain] defaults otherwise)", "",
                  "| [explain] enabled | arrivals/s | messages/s | p50 ms | p99 ms | explained | skipped: busy | skipped: queue full | skipped: deadline |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in out["daemon"]:
            a = r["arrivals"] if r["arrivals"] == "flood" else f"{r['arrivals']:.1f}"
            lines.append(f"| {r['explain']} | {a} | {r['messages_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                         f"{r.get('explained', 0):.0f} | {r.get('busy', 0):.0f} | {r.get('queue-full', 0):.0f} | {r.get('deadline', 0):.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="spam messages for faithfulness (0: all)")
    ap.add_argument("--occlusion-limit", type=int, default=150, help="full occlusion is slow: at most this many spam")
    ap.add_argument("--cost-messages", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--daemon-messages", type=int, default=400, help="test mails fed to the daemon")
    ap.add_argument("--rate", type=float, default=10.0, help="steady arrival rate for the daemon runs (messages/s)")
    ap.add_argument("--sections", nargs="+", default=["faithfulness", "cost"], choices=("faithfulness", "cost", "daemon"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    loadavg = os.getloadavg()
    torch.set_num_threads(1)
    engine = Engine.load(args.model, device="cpu")
    examples = read_split(args.data / f"{args.split}.csv")
    spam = [e.text for e in examples if e.label == "spam"]
    if args.limit:
        spam = spam[: args.limit]
    out: dict = {"model": engine.version, "base": engine.meta.base, "max_length": engine.meta.max_length, "split": args.split,
                 "spam": len(spam), "k": args.k, "loadavg": [round(x, 2) for x in loadavg], "cores": os.cpu_count(),
                 "torch": torch.__version__, "command": "python -m bench.explain " + " ".join(os.sys.argv[1:]),
                 "faithfulness": [], "cost": []}  # fmt: skip
    for method in args.methods if "faithfulness" in args.sections else []:
        texts = spam[: args.occlusion_limit] if method == "occlusion" else spam
        f = faithfulness(engine, texts, method, args.k, args.seed)
        out["faithfulness"].append(f)
        print(f"{method}: top-{args.k} ΔP {_ci(f['top_p'])} vs random {_ci(f['random_p'])} ({f['seconds']:.0f}s)", flush=True)
    out["paired"] = paired(out["faithfulness"], "integrated-gradients")
    for threads in args.threads if "cost" in args.sections else []:
        for method in args.methods:
            out["cost"].append(cost(engine, spam[: args.cost_messages], method, threads))
            print(f"cost {method} x{threads}: {out['cost'][-1]['mean_ms']:.1f} ms", flush=True)
    torch.set_num_threads(1)
    if "daemon" in args.sections:
        mails = [e.text for e in examples][: args.daemon_messages]
        out["daemon_messages"] = len(mails)
        out["daemon"] = daemon(args.model, mails, ["off", "spam", "all"], args.rate, 1)
    text = markdown(out)
    print(text)
    for path, data in ((args.json, json.dumps(out, indent=2) + "\n"), (args.md, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data)


if __name__ == "__main__":
    main()
