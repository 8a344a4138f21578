"""Refit cycle wall time and accuracy, head vs last-block, on UCI labels in a real label store.

    python -m bench.refit_modes --model work/demo/model --labels 2000 --json bench/results/refit_modes.json

A fresh store gets `--labels` distinct UCI messages (spam first, as many as exist, then ham); the
given model directory is the current model. Each mode runs two cycles with `refit_once`: the
first computes (head: caches) the features, the second shows the steady-state cost. Every cycle
evaluates candidate and current on the same hash-split test set; promotions are published.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from filterd.config import load_config
from trainer.data import read_sms
from trainer.refit import refit_once
from filterd.store.labels import LabelStore, message_id

from bench.daemon_redis import SHARED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the current model directory")
    ap.add_argument("--labels", type=int, default=2000)
    ap.add_argument("--modes", nargs="+", default=["head", "last-block"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    seen, texts = set(), {"spam": [], "ham": []}
    for e in read_sms(SHARED / "data/sms-spam-collection/SMSSpamCollection"):
        if message_id(e.text) not in seen:
            seen.add(message_id(e.text))
            texts[e.label].append(e.text)
    n_spam = min(len(texts["spam"]), args.labels // 2)
    labelled = [("spam", t) for t in texts["spam"][:n_spam]] + [("ham", t) for t in texts["ham"][: args.labels - n_spam]]
    rows = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "models").mkdir()
            shutil.copytree(args.model, tmp / "models" / "current")
            cfg = load_config(None, [f"trainer.store={tmp / 'labels.sqlite'}", f"trainer.models_dir={tmp / 'models'}",
                                     f"trainer.mode={mode}", "redis.enabled=false", "trainer.max_ham_fpr=0.2"])  # fmt: skip
            with LabelStore(cfg.trainer.store) as store:
                store.add_many([(t, label, "bench") for label, t in labelled])
                for cycle in (1, 2):
                    r = refit_once(cfg, store)
                    cand, cur = r.candidate.get("test"), r.current.get("test")
                    rows.append({"mode": mode, "cycle": cycle, "outcome": r.outcome, "seconds": r.seconds,
                                 "candidate_test_accuracy": cand.accuracy if cand else None,
                                 "current_test_accuracy": cur.accuracy if cur else None,
                                 "candidate_ham_fpr": cand.ham_fpr if cand else None, "test_n": cand.n if cand else None,
                                 "counts": r.counts, "reason": r.reason})  # fmt: skip
                    print(json.dumps(rows[-1]))
    print(f"\n{len(labelled)} UCI labels ({n_spam} spam), current model {args.model}, {os.cpu_count()} cores")
    print("| mode | cycle | outcome | wall time | candidate test acc | current test acc | candidate ham FPR | test n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pct = lambda x: f"{100 * x:.2f}%" if x is not None else "n/a"
        print(f"| {r['mode']} | {r['cycle']} | {r['outcome']} | {r['seconds']:.1f} s | {pct(r['candidate_test_accuracy'])} | "
              f"{pct(r['current_test_accuracy'])} | {pct(r['candidate_ham_fpr'])} | {r['test_n']} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "labels": len(labelled), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
