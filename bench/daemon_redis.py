"""Daemon throughput and latency over a real redis-server, next to a one-message-at-a-time loop.

    python -m bench.daemon_redis --base random:gpt2 --messages 2000 --single 300 --steady 600 \
        --json bench/results/daemon_redis.json

All contenders use the same model directory (random weights are fine for speed) and the same UCI
messages. `daemon`: `filterd serve` as a process, all messages added to the stream at once (a
flood: latency there is mostly time spent queued). `daemon-steady`: the same daemon fed at a fixed
arrival rate, `--load` times the flood's throughput (open loop: the producer does not wait for
results), which is the latency a gateway below saturation sees. Latency is end to end, from the
input entry's id to the result entry's id (both Redis clock). `single`: Engine.score_tokens on one
message at a time, in process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from filterd.model.engine import Engine
from filterd.model.tokenizer import Tokenizer
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import ModelMeta, publish_directory, staging_dir, write_model_files
from testing.daemon import FilterdProcess
from testing.services import RedisServer
from trainer.data import read_sms

from testing.corpus import SHARED  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_model(base: str, out: Path, max_length: int) -> Path:
    model = build_model(resolve_base(base), seed=1)
    meta = ModelMeta(version="", base=base, base_kind="random", config=model.config, max_length=max_length)
    staged = staging_dir(out)
    write_model_files(model, meta, staged)
    publish_directory(staged, out)
    return out


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def run_daemon(model: Path, texts: list[str], work: Path, rate: float | None, *, metrics: tuple[str, ...] = (),
               **overrides: object) -> dict:  # fmt: skip
    """Feed `texts` to a fresh filterd + redis-server: all at once (rate None) or `rate` per second.

    `overrides`: config keys for FilterdProcess (explain__enabled="spam"); `metrics`: series read at the end."""
    redis = RedisServer(work / "redis").start()
    try:
        d = FilterdProcess(model, redis.url, work / "filterd.log", **overrides).start(timeout=300)
        r = redis.client()
        t0 = time.perf_counter()
        if rate is None:
            pipe = r.pipeline(transaction=False)
            for i, t in enumerate(texts):
                pipe.xadd("filterd:in", {"text": t, "id": str(i)})
            pipe.execute()
        else:
            for i, t in enumerate(texts):  # open loop: arrival i is due at t0 + i/rate, whatever the results do
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                r.xadd("filterd:in", {"text": t, "id": str(i)})
        while r.xlen("filterd:out") < len(texts):
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out = r.xrange("filterd:out")
        mean_batch = d.metric("filterd_batch_size_sum") / d.metric("filterd_batch_size_count")
        padding = d.metric("filterd_padding_ratio_sum") / d.metric("filterd_padding_ratio_count")
        extra = {name: d.metric(name) for name in metrics}
        d.stop()
    finally:
        redis.stop()
        shutil.rmtree(work / "redis", ignore_errors=True)
    lat = [(entry_ms(oid) - entry_ms(f[b"entry"])) / 1000 for oid, f in out]
    return {"messages": len(texts), "seconds": wall, "messages_per_s": len(texts) / wall,
            "arrival_rate": rate, "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
            "mean_batch_size": mean_batch, "mean_padding_ratio": padding, **extra}  # fmt: skip


def bench_single(model: Path, texts: list[str]) -> dict:
    engine = Engine.load(model, device="cpu")
    engine.score_tokens([[50256] * 8])
    tokens = engine.tokenizer.encode_batch(texts)
    lat = []
    t0 = time.perf_counter()
    for t in tokens:
        s = time.perf_counter()
        engine.score_tokens([t])
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {"messages": len(texts), "seconds": wall, "messages_per_s": len(texts) / wall,
            "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99), "mean_batch_size": 1.0, "mean_padding_ratio": 0.0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="random:gpt2")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--single", type=int, default=300, help="messages for the one-at-a-time loop")
    ap.add_argument("--steady", type=int, default=600, help="messages for the steady-rate run (0: skip)")
    ap.add_argument("--load", type=float, default=0.5, help="steady arrival rate as a share of the flood's messages/s")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="keep the model, Redis data and filterd log here (default: a temp dir)")
    args = ap.parse_args()
    texts = [e.text for e in read_sms(SHARED / "data/sms-spam-collection/SMSSpamCollection")][: args.messages]
    max_length = min(1024, max(Tokenizer.count(t) for t in texts))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = make_model(args.base, work / "model", max_length)
        results = {"single": bench_single(model, texts[: args.single]), "daemon": run_daemon(model, texts, work, None)}
        if args.steady:
            rate = args.load * results["daemon"]["messages_per_s"]
            results["daemon-steady"] = run_daemon(model, texts[: args.steady], work, rate)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "base": args.base, "max_length": max_length}  # fmt: skip
    print(f"{args.base} on {machine['cores']} cores, torch {machine['torch']}")
    print("| contender | messages | arrivals/s | messages/s | p50 ms | p99 ms | mean batch | padding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        arrivals = {"single": "one at a time", "daemon": "all at once"}.get(name) or f"{r['arrival_rate']:.1f}"
        print(f"| {name} | {r['messages']} | {arrivals} | {r['messages_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['mean_batch_size']:.1f} | {r['mean_padding_ratio']:.3f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
