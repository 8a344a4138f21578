"""SMS and mail in one deployment: one joint model, or a model per source? (issue 13, item 5)

Three `random:tiny --trainable all` models (the demo's recipe, `--max-length` capped for mail) are
trained on `filterd-trainer prepare` splits of (a) the UCI SMS corpus, (b) the SpamAssassin corpus,
(c) both (`prepare --sms … --email-dir …`: each source balanced and split 70/10/20 on its own, so
the SMS and mail parts of (c)'s splits are exactly (a)'s and (b)'s). Each model is scored on the SMS
test split and the mail test split (balanced, ~half spam), and for the ham FPR also on each source's
holdout (the ham that balancing left out, never trained on); plus the demo's example messages.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.one_deployment --work work/one_deployment \\
        --models sms mail --train-only                          # one run per model or two keeps each run short
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python -m bench.one_deployment --work work/one_deployment \\
        --models sms mail both --json bench/results/one_deployment.json --md bench/results/one_deployment.md

A model directory in `--work` that is already complete (it has `bench_fit.json`) is reused, not retrained.
Intervals: percentile bootstrap over messages (`trainer.evaluate.bootstrap_ci`, 1000 resamples), one seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from filterd.model.engine import Engine
from trainer.data import LABELS, prepare, read_split
from trainer.evaluate import accuracy_at, bootstrap_ci, compute_metrics, ham_fpr_at, roca_pct, spam_recall_at
from trainer.fit import FitConfig, fit

from bench.daemon_redis import SHARED

SMS = SHARED / "data/sms-spam-collection/SMSSpamCollection"
MAIL = SHARED / "data/spamassassin-publiccorpus"
MODELS = ("sms", "mail", "both")
SOURCES = {"sms": {"sms": SMS}, "mail": {"email_dir": MAIL}, "both": {"sms": SMS, "email_dir": MAIL}}
# Test sets: (name, data dir, split). The SMS and mail splits of `both` are those of `sms` and `mail`.
TEST_SETS = (("sms test", "sms", "test"), ("mail test", "mail", "test"),
             ("sms holdout (ham)", "sms", "holdout"), ("mail holdout (ham)", "mail", "holdout"))  # fmt: skip
DEMO_SMS = {  # scripts/demo_serve.py's SMS, with their true labels
    "WINNER!! As a valued customer you have been selected to receive a £900 prize reward! Call 09061701461": "spam",
    "Are we still on for dinner tonight? I'll be there at 7": "ham",
    "URGENT! Your mobile number has won a 2000 bonus caller prize. Text CLAIM to 81010 now": "spam",
    "Sorry, I'll call you later, in a meeting": "ham",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121": "spam",
    "Ok lar... Joking wif u oni...": "ham",
}
DEMO_MAIL = ("spam/00001", "spam/00002", "easy_ham/00001", "easy_ham/00002")  # what `make demo` sends


def _command(argv: Sequence[str] | None = None) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    return f"{env} python -m bench.one_deployment " + shlex.join(sys.argv[1:] if argv is None else list(argv))


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train(work: Path, name: str, args: argparse.Namespace) -> dict:
    """Prepare `name`'s data and fit its model unless a finished one is in `work`; returns its fit record."""
    data, model = work / name, work / f"model-{name}"
    done = model / "bench_fit.json"
    if done.is_file():
        return json.loads(done.read_text())
    prepare(data, seed=args.seed, **SOURCES[name])
    log(f"fit {name} ...")
    load0 = os.getloadavg()[0]
    cfg = FitConfig(data=data, base="random:tiny", out=model, trainable="all", epochs=args.epochs,
                    max_length=args.max_length, seed=args.seed, device="cpu", progress=False)  # fmt: skip
    result = fit(cfg)
    record = {"fit_s": round(result.seconds, 1), "best_epoch": result.best_epoch, "threshold": result.meta.threshold,
              "train_n": sum(1 for _ in read_split(data / "train.csv")), "load_avg_1m_start": round(load0, 2),
              "load_avg_1m_end": round(os.getloadavg()[0], 2), "command": _command()}  # fmt: skip
    done.write_text(json.dumps(record, indent=2) + "\n")
    log(f"fit {name}: {record}")
    return record


def score(engine: Engine, labels: list[int], texts: list[str]) -> dict:
    t0 = time.perf_counter()
    scores = [v.score for v in engine.classify_texts(texts)]
    thr = engine.threshold
    m = compute_metrics(labels, scores, thr)
    row: dict = {
        "n": m.n,
        "spam": sum(labels),
        "score_s": round(time.perf_counter() - t0, 1),
        "roca_pct": roca_pct(labels, scores),
    }
    for key, value, at in (("accuracy", m.accuracy, accuracy_at), ("ham_fpr", m.ham_fpr, ham_fpr_at),
                           ("spam_recall", m.spam_recall, spam_recall_at)):  # fmt: skip
        stat = functools.partial(at, threshold=thr)
        defined = (key != "ham_fpr" or m.n > sum(labels)) and (key != "spam_recall" or sum(labels) > 0)
        row[key] = value if defined else None
        row[f"{key}_ci95"] = bootstrap_ci(labels, scores, stat) if defined else None
    return row


def demo_verdicts(engine: Engine) -> dict:
    from filterd.mail.text import extract_text

    out = {}
    for text, label in DEMO_SMS.items():
        v = engine.classify_texts([text])[0]
        out[text[:40]] = {
            "label": label,
            "score": round(v.score, 4),
            "correct": (v.score >= engine.threshold) == (label == "spam"),
        }
    for stem in DEMO_MAIL:
        folder, prefix = stem.split("/")
        path = next((MAIL / folder).glob(f"{prefix}.*"))
        label = "spam" if folder.startswith("spam") else "ham"
        v = engine.classify_texts([extract_text(path.read_bytes())])[0]
        out[stem] = {"label": label, "score": round(v.score, 4), "correct": (v.score >= engine.threshold) == (label == "spam")}
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(doc: dict) -> str:
    lines = [
        "# SMS and mail in one deployment (`bench/one_deployment.py`)", "",
        f"Commands: {'; '.join(f'`{c}`' for c in doc['commands'])}", "",
        f"Machine: {doc['machine']}. One seed ({doc['seed']}); 95% bootstrap intervals in brackets.", "",
        "| trained on | train n | fit time | test set | n | accuracy | ham FPR | spam recall | (1-ROCA)% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, model in doc["models"].items():
        for test, r in model["scores"].items():
            roca = "–" if r["roca_pct"] is None else f"{r['roca_pct']:.2f}"
            lines.append(
                f"| {name} | {model['fit']['train_n']} | {model['fit']['fit_s']:.0f} s | {test} | {r['n']} | "
                f"{_pct(r['accuracy'])}{_ci(r['accuracy_ci95'])} | {_pct(r['ham_fpr'])}{_ci(r['ham_fpr_ci95'])} | "
                f"{_pct(r['spam_recall'])}{_ci(r['spam_recall_ci95'])} | {roca} |"
            )
    lines += ["", "Demo messages (score; ✗ = wrong verdict at the model's threshold):", "",
              "| message | label | " + " | ".join(doc["models"]) + " |", "| --- | --- |" + " --- |" * len(doc["models"])]  # fmt: skip
    first = next(iter(doc["models"].values()))["demo"]
    for key, d in first.items():
        cells = [f"{m['demo'][key]['score']:.3f}{'' if m['demo'][key]['correct'] else ' ✗'}" for m in doc["models"].values()]
        lines.append(f"| {key} | {d['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work/one_deployment"))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=256, help="fit's --max-length (mail is cut there)")
    ap.add_argument("--train-only", action="store_true", help="train the missing models and stop")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fits = {name: train(args.work, name, args) for name in args.models}
    if args.train_only:
        return
    for name in ("sms", "mail"):  # the test sets, also when only `both` is scored
        if not (args.work / name / "test.csv").is_file():
            prepare(args.work / name, seed=args.seed, **SOURCES[name])
    tests = {}
    for test, data, split_name in TEST_SETS:
        examples = read_split(args.work / data / f"{split_name}.csv")
        tests[test] = ([LABELS.index(e.label) for e in examples], [e.text for e in examples])
    doc: dict = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "seed": args.seed, "epochs": args.epochs,
        "max_length": args.max_length, "base": "random:tiny", "trainable": "all",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU fp32",
        "commands": [], "models": {},
    }  # fmt: skip
    for name in args.models:
        engine = Engine.load(args.work / f"model-{name}", device="cpu")
        load0 = os.getloadavg()[0]
        scores = {test: score(engine, labels, texts) for test, (labels, texts) in tests.items()}
        doc["models"][name] = {"fit": fits[name], "scores": scores, "demo": demo_verdicts(engine),
                               "load_avg_1m_scoring": [round(load0, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
        log(f"scored {name}")
    doc["commands"] = sorted({f["command"] for f in fits.values()} | {_command(argv)})
    text = markdown(doc)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
