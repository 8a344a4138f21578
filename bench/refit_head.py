"""Head-only refit on cached features: is it fast enough to run often? (target: 10,000 examples in <= 10 s on a CPU)

    python -m bench.refit_head                          # random 10k x 768 features + a UCI refit with work/demo/model
    python -m bench.refit_head --model DIR --json bench/results/refit_head.json

Part 1 times what a head refit of GPT-2 small does with 10,000 cached messages: read the float16
vectors from the FeatureCache and fit the head (trainer.features.fit_head, default settings).
Random vectors of GPT-2 small's width (768) with a weak signal in a few dimensions stand in for
real ones: the cost depends on the shape, not the values.

Part 2 is a real cycle: every UCI message in a label store, `refit_once` in head mode from a tiny
model (`--model`, default work/demo/model; trained here for 2 epochs when absent), run twice: the
first computes and caches the features, the second finds them all cached. Caveat: that model was
trained on a random 70% of UCI, so the hash-split test set overlaps its training data and the
"current" accuracy is optimistic; the comparison is still like for like.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from filterd.config import load_config
from trainer.data import read_sms
from trainer.features import FeatureCache, fit_head
from trainer.refit import refit_once
from filterd.store.labels import LabelStore

from bench.daemon_redis import SHARED

SMS = SHARED / "data/sms-spam-collection/SMSSpamCollection"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "work/demo/model"


def random_features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(0.0, 1.0, (n, dim))
    X[:, :8] += 0.8 * (2 * y[:, None] - 1)  # some signal, so the fit has something to find
    X[:, 8:11] *= 100.0  # GPT-2's few large-magnitude dimensions
    return X.astype(np.float16), y


def bench_random(n: int, dim: int, repeats: int, tmp: Path) -> dict:
    X, y = random_features(n, dim)
    ids = [f"m{i:06d}" for i in range(n)]
    with FeatureCache(tmp / "features.sqlite") as cache:
        t0 = time.perf_counter()
        cache.put_many("bench", zip(ids, X))
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = cache.get_many("bench", ids)
        Xc = np.stack([got[i] for i in ids])
        read_s = time.perf_counter() - t0
    init = (torch.zeros(2, dim), torch.zeros(2))
    fits = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        w, b = fit_head(Xc, y, init)
        fits.append(time.perf_counter() - t0)
    acc = float(((Xc.astype(np.float32) @ w.numpy().T + b.numpy()).argmax(1) == y).mean())
    return {
        "n": n, "dim": dim, "cache_write_s": write_s, "cache_read_s": read_s, "fit_s": fits,
        "fit_s_median": statistics.median(fits), "read_plus_fit_s": read_s + statistics.median(fits), "train_accuracy": acc,
    }  # fmt: skip


def ensure_model(path: Path | None, tmp: Path) -> Path:
    if path is not None:
        return path
    if (DEMO_MODEL / "filterd.json").is_file():
        return DEMO_MODEL
    from trainer.data import prepare
    from trainer.fit import FitConfig, fit

    prepare(tmp / "sms", sms=SMS, seed=123)
    cfg = FitConfig(data=tmp / "sms", base="random:tiny", out=tmp / "tiny", trainable="all", epochs=2, progress=False)
    return fit(cfg).model_dir


def bench_uci(model: Path, tmp: Path) -> dict:
    store = LabelStore(tmp / "labels.sqlite")
    store.add_many([(e.text, e.label, "bench") for e in read_sms(SMS)])
    cfg = load_config(None, [f"trainer.store={tmp / 'labels.sqlite'}", f"trainer.models_dir={tmp / 'models'}",
                             "trainer.max_ham_fpr=1", "trainer.max_regression=1", "redis.enabled=false", "model.device=cpu"])  # fmt: skip
    cycles = []
    for _ in range(2):
        out = refit_once(cfg, store, base_model_dir=model)
        c, k = out.candidate["test"], out.current["test"]
        cycles.append({
            "outcome": out.outcome, "seconds": out.seconds, "from": out.current_version,
            "candidate_test": {"accuracy": c.accuracy, "ham_fpr": c.ham_fpr, "spam_recall": c.spam_recall, "n": c.n},
            "current_test": {"accuracy": k.accuracy, "ham_fpr": k.ham_fpr, "spam_recall": k.spam_recall, "n": k.n},
        })  # fmt: skip
    return {"model": str(model), "store": store.counts(), "split_counts": out.counts, "cycles": cycles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, help="a tiny model directory for the UCI run (default work/demo/model)")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results/refit_head.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rand = bench_random(args.n, args.dim, args.repeats, tmp)
        uci = bench_uci(ensure_model(args.model, tmp), tmp)
    print(f"head refit on {rand['n']:,} cached examples (dim {rand['dim']}), {os.cpu_count()} CPU cores")
    print("| step | seconds |\n| --- | --- |")
    print(f"| cache write (float16, SQLite) | {rand['cache_write_s']:.2f} |")
    print(f"| cache read | {rand['cache_read_s']:.2f} |")
    print(f"| fit_head, first of {args.repeats} | {rand['fit_s'][0]:.2f} |")
    print(f"| fit_head, median | {rand['fit_s_median']:.2f} |")
    print(f"| **read + fit** | **{rand['read_plus_fit_s']:.2f}** |")
    print(f"\nUCI refit cycles (head mode, {uci['store']['spam']} spam / {uci['store']['ham']} ham in the store):")
    print("| cycle | outcome | seconds | candidate test acc | current test acc | candidate ham-FPR | current ham-FPR |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, c in enumerate(uci["cycles"], 1):
        ct, kt = c["candidate_test"], c["current_test"]
        print(f"| {i} | {c['outcome']} | {c['seconds']:.1f} | {ct['accuracy']:.2%} | {kt['accuracy']:.2%} "
              f"| {ct['ham_fpr']:.2%} | {kt['ham_fpr']:.2%} |")  # fmt: skip
    result = {
        "random": rand, "uci": uci,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "load_avg": os.getloadavg()},
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
