"""The refit's use of labels and the gate's decisions, on UCI labels in a real label store.

    python -m bench.refit_gate --model DIR --json bench/results/refit_gate.json --md bench/results/refit_gate.md

DIR is a fitted model directory with its golden.csv and replay.csv (`filterd-trainer fit` writes them; the
`tiny_model` test fixture is such a model). It is copied in as the live model of a fresh models_dir for every
run, and no `[trainer] golden_set` is configured: the golden set is the live model's own golden.csv.

1. Labels used: a 2.5:1 spam-heavy store (UCI messages not in the golden set), one cycle per `balance`,
   each with `final_fit = "fold"` (the gated candidate is published) and `"all"` (the default: it is
   trained again on every label and that is published). Replay (`[trainer] replay`, default) is on.
2. The gate: one cycle each on clean labels, on 15% of the labels flipped (all spam->ham, all ham->spam,
   at random), and on clean labels with `max_ham_fpr = 0` (live model and candidate both over the bound).
3. One `last-block` cycle on the clean labels: the candidate's and the final fit's training times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from filterd.config import load_config
from trainer.data import read_sms, read_split
from trainer.refit import refit_once
from filterd.store.labels import LabelStore, message_id

from bench.daemon_redis import SHARED


def cycle(model: Path, labelled: list[tuple[str, str]], *keys: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        shutil.copytree(model, tmp / "models" / "current")
        cfg = load_config(None, [f"trainer.store={tmp / 'labels.sqlite'}", f"trainer.models_dir={tmp / 'models'}",
                                 "redis.enabled=false", "model.device=cpu", "trainer.golden_set=", *keys])  # fmt: skip
        with LabelStore(cfg.trainer.store) as store:
            store.add_many([(t, label, "bench") for label, t in labelled])
            r = refit_once(cfg, store)
    g_c, g_l = r.candidate.get("golden"), r.current.get("golden")
    return {"outcome": r.outcome, "reason": r.reason, "seconds": round(r.seconds, 2), "final_fit": r.final_fit,
            "train_seconds": r.train_seconds, "replay": sum(r.counts.get("replay", {}).values()),
            "stored": sum(r.counts["store"].values()), "trained": sum(r.counts.get("trained", {}).values()),
            "trained_share": round(r.trained_share, 3), "over_ham_fpr_bound": r.over_ham_fpr_bound,
            "golden_acc": [g_c.accuracy if g_c else None, g_l.accuracy if g_l else None],
            "golden_ham_fpr": [g_c.ham_fpr if g_c else None, g_l.ham_fpr if g_l else None]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--sms", type=Path, default=SHARED / "data/sms-spam-collection/SMSSpamCollection")
    ap.add_argument("--spam", type=int, default=500)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    golden = {message_id(e.text) for e in read_split(args.model / "golden.csv")}
    seen, texts = set(golden), {"spam": [], "ham": []}
    for e in read_sms(args.sms):
        if message_id(e.text) not in seen:
            seen.add(message_id(e.text))
            texts[e.label].append(e.text)
    heavy = [("spam", t) for t in texts["spam"][: args.spam]] + [("ham", t) for t in texts["ham"][: args.spam * 2 // 5]]
    rows = []
    for method in ("undersample", "weight", "oversample"):
        for final_fit in ("fold", "all"):
            rows.append({"run": f"2.5:1 store, balance={method}, final_fit={final_fit}"}
                        | cycle(args.model, heavy, f"trainer.balance={method}", f"trainer.final_fit={final_fit}"))  # fmt: skip
            print(json.dumps(rows[-1]))
    clean = [("spam", t) for t in texts["spam"][:300]] + [("ham", t) for t in texts["ham"][:300]]
    swap = {"spam": "ham", "ham": "spam"}
    n = len(clean) * 15 // 100
    rng = random.Random(5)
    runs = {"clean labels": clean}
    for target in ("spam", "ham", None):
        pool = [i for i, (label, _) in enumerate(clean) if target is None or label == target]
        flipped = set(rng.sample(pool, n))
        name = f"15% flipped ({target}->{swap[target]})" if target else "15% flipped at random"
        runs[name] = [(swap[label] if i in flipped else label, t) for i, (label, t) in enumerate(clean)]
    for name, labelled in runs.items():
        rows.append({"run": name} | cycle(args.model, labelled))
        print(json.dumps(rows[-1]))
    rows.append({"run": "clean labels, max_ham_fpr=0 (both over the bound)"} | cycle(args.model, clean, "trainer.max_ham_fpr=0"))
    print(json.dumps(rows[-1]))
    # A top mode: the final fit trains the block again on every label (+ replay); the gate's bounds lifted to time both.
    rows.append({"run": "clean labels, mode=last-block (bounds lifted)"}
                | cycle(args.model, clean, "trainer.mode=last-block", "trainer.max_regression=1", "trainer.max_ham_fpr=1",
                        "trainer.golden_tolerance=1"))  # fmt: skip
    print(json.dumps(rows[-1]))
    cmd = f"python -m bench.refit_gate --model {args.model} --sms {args.sms} --spam {args.spam}"
    if args.json:
        args.json.write_text(json.dumps({"command": cmd, "loadavg": os.getloadavg(), "model": str(args.model), "rows": rows},
                                        indent=1) + "\n")  # fmt: skip
    if args.md:
        lines = ["| run | outcome | published | trained / stored | replay | cycle s (candidate + final fit) | golden acc cand / live | "
                 "golden ham-FPR cand / live | alert | reason |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        for r in rows:
            ts = r["train_seconds"]
            times = f"{r['seconds']} ({ts.get('candidate', 0)} + {ts['final_fit']})" if "final_fit" in ts else f"{r['seconds']}"
            lines.append(f"| {r['run']} | {r['outcome']} | {r['final_fit'] if r['outcome'] == 'promoted' else '-'} | {r['trained']} / {r['stored']} ({r['trained_share']:.0%}) | "
                         f"{r['replay']} | {times} | "
                         f"{pct(r['golden_acc'][0])} / {pct(r['golden_acc'][1])} | {pct(r['golden_ham_fpr'][0])} / {pct(r['golden_ham_fpr'][1])} | "
                         f"{'over ' + ', '.join(r['over_ham_fpr_bound']) if r['over_ham_fpr_bound'] else ''} | {r['reason']} |")  # fmt: skip
        args.md.write_text("\n".join([f"`{cmd}` (live model's golden.csv as the golden set, no golden_set configured)", "", *lines]) + "\n")


if __name__ == "__main__":
    main()
