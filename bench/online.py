"""The TREC spam-track online protocol, run through filterd's own learning loop, against TF-IDF + LR.

    python -m bench.online --scenario sa-newer --arms head all tfidf tfidf-site \\
        --json bench/results/online_sa-newer.json --md bench/results/online_sa-newer.md --plot bench/results/online_sa-newer.png

Messages arrive in order (SpamAssassin by their `Date:` header; UCI in file order). The live model
scores each one; its label comes back `--delay` messages later and goes into a real `LabelStore`;
every `--refit-every` labels the product's `refit_once` runs (the same gate, balance, golden set and
publication as `filterd-trainer`), and whatever is `current` afterwards scores what comes next.
Every message's score is kept, so each measure is computed over exactly the messages a model
scored before it learnt their labels.

Scenarios (a scenario = the first model + the stream it meets):

* `sa-newer`: a model fitted on the older SpamAssassin folders (`spam`, `easy_ham`; balanced and
  split 70/10/20 as `prepare` does) meets the newer ones (`spam_2`, `easy_ham_2`, `hard_ham`).
* `sms-to-mail`: a model fitted on the UCI SMS corpus meets all SpamAssassin mail.
* `cold`: a base with an untrained head (no classifier training) meets all SpamAssassin mail.
* `uci-cold`: the same, meeting the UCI SMS corpus in file order.

Arms: filterd refit modes (`head`, `last-block`, `last-2-blocks`, `all`), and the baseline,
TF-IDF (word 1-2 + char 2-5 grams) + logistic regression, retrained from scratch at every refit
point on the same labels: `tfidf` also on the first model's training data (what filterd has),
`tfidf-site` on the site's labels only. Before its first refit the cold baseline scores 0.5.

Reported per arm: on the messages after the first `--after` labels (the next `--window-after`
messages), accuracy, ham FPR and spam recall at the model's threshold; on the whole stream and on
that window, (1-ROCA)%, lam%, and the ham FPR at 95% and 99% spam recall, each with a bootstrap 95%
interval; accuracy per `--window` messages (the learning curve, also as a plot); every refit's
outcome and wall time.

`--base` selects the backbone (default random:tiny; a `filterd-trainer pretrain` directory makes the
"with pretrain" arm); `--set trainer.KEY=VALUE` passes refit settings (e.g. trainer.epochs=4).
First models are cached under `--work` (keyed by scenario, base and seed), so arms and reruns share them.

    python -m bench.online --report bench/results/online_*.json --plot-dir bench/results  # runs' arms side by side
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from filterd.config import load_config
from filterd.model.engine import Engine
from filterd.mail.text import extract_text
from filterd.model.gpt2 import LABELS
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import ModelMeta, write_model_files
from trainer.data import Example, balance, read_messages, read_sms, split, write_split
from trainer.evaluate import accuracy_at, bootstrap_ci, compute_metrics, ham_fpr_at, ham_fpr_at_recall, lam_pct, roca_pct
from trainer.fit import FitConfig, fit
from trainer.publish import ModelStore
from trainer.refit import refit_once
from trainer.refit_data import split_of
from filterd.store.labels import MAX_TEXT_CHARS, LabelStore

from bench.accuracy import train_tfidf_lr

from testing.corpus import SHARED  # noqa: E402
SA = SHARED / "data/spamassassin-publiccorpus"
UCI = SHARED / "data/sms-spam-collection/SMSSpamCollection"
SCENARIOS = ("sa-newer", "sms-to-mail", "cold", "uci-cold")
MODES = ("head", "last-block", "last-2-blocks", "all")
BASELINES = ("tfidf", "tfidf-site")
MAIL_MAX_LENGTH = 256  # what bench.accuracy and the demo's mail models read


def log(line: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the streams


def _date_of(raw: bytes) -> float | None:
    head = raw.split(b"\n\n", 1)[0].decode("latin-1")
    for line in head.splitlines():
        if line[:5].lower() == "date:":
            try:
                return email.utils.parsedate_to_datetime(line[5:].strip()).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    return None


def read_sa(folders: Sequence[str]) -> list[Example]:
    """SpamAssassin messages of `folders` in `Date:` order (undated ones keep their place after the dated ones of
    their folder; ties by folder and file name), text as the daemon sees it (`extract_text`)."""
    rows = []
    for folder in folders:
        label = "spam" if folder.startswith("spam") else "ham"
        last = 0.0
        for name, raw in read_messages(SA / folder):
            when = _date_of(raw)
            last = when if when is not None else last
            text = extract_text(raw)[:MAX_TEXT_CHARS]
            if text.strip():
                rows.append((last, folder, name, Example(f"{folder}/{name}", label, text)))
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows]


def read_uci() -> list[Example]:
    return [Example(f"uci/{i}", e.label, e.text) for i, e in enumerate(read_sms(UCI))]


@dataclass
class Scenario:
    name: str
    stream: list[Example]
    initial: dict[str, list[Example]] = field(default_factory=dict)  # train/val/test of the first model; {} = cold
    max_length: int | None = None


def load_scenario(name: str, seed: int) -> Scenario:
    if name == "sa-newer":
        older = read_sa(["spam", "easy_ham"])
        balanced, _ = balance(older, "undersample", seed)
        return Scenario(name, read_sa(["spam_2", "easy_ham_2", "hard_ham"]), _splits(balanced, seed), MAIL_MAX_LENGTH)
    if name == "sms-to-mail":
        balanced, _ = balance(read_uci(), "undersample", seed)
        return Scenario(name, read_sa(["spam", "spam_2", "easy_ham", "easy_ham_2", "hard_ham"]), _splits(balanced, seed))
    if name == "cold":
        return Scenario(name, read_sa(["spam", "spam_2", "easy_ham", "easy_ham_2", "hard_ham"]), {}, MAIL_MAX_LENGTH)
    if name == "uci-cold":
        return Scenario(name, read_uci(), {}, None)
    raise SystemExit(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})")


def _splits(examples: list[Example], seed: int) -> dict[str, list[Example]]:
    return dict(zip(("train", "val", "test"), split(examples, seed)))


# --------------------------------------------------------------------------- the first model


def first_model(sc: Scenario, base: str, seed: int, work: Path, epochs: int) -> Path:
    """The model the site starts with (cached): fitted on the scenario's initial data, or a base with an untrained head."""
    key = hashlib.sha256(f"{sc.name}|{base}|{seed}|{epochs}|{sc.max_length}".encode()).hexdigest()[:12]
    out = work / f"first-{sc.name}-{key}"
    if (out / "filterd.json").is_file():
        return out
    if not sc.initial:
        b = resolve_base(base)
        model = build_model(b, seed=seed)
        meta = ModelMeta(version="", base=b.name, base_kind=b.kind, config=b.config,
                         max_length=sc.max_length or 256, trainable="none", extra={"bench": "cold start: untrained head"})  # fmt: skip
        staged = out.with_name(out.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        write_model_files(model, meta, staged)
        staged.rename(out)
        return out
    data = work / f"data-{sc.name}-{seed}"
    data.mkdir(parents=True, exist_ok=True)
    for name, items in sc.initial.items():
        write_split(data / f"{name}.csv", items)
    t0 = time.perf_counter()
    fit(FitConfig(data=data, base=base, out=out, trainable="all", epochs=epochs, max_length=sc.max_length, seed=seed,
                  progress=False, eval_every=10**9))  # fmt: skip
    log(f"first model for {sc.name}: fitted in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


# --------------------------------------------------------------------------- the protocol


def segments(n: int, every: int, delay: int) -> list[tuple[int, int]]:
    """[start, end) ranges of messages scored by one model: the k-th refit runs once the label of message
    k*every - 1 is back, i.e. after message k*every - 1 + delay has been scored."""
    cuts = [0] + [k * every + delay for k in range(1, n) if k * every + delay < n] + [n]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass
class ArmRun:
    arm: str
    scores: list[float]
    threshold: float
    refits: list[dict]
    seconds: float


def run_filterd(sc: Scenario, mode: str, first: Path, args: argparse.Namespace, tmp: Path) -> ArmRun:
    root = tmp / f"arm-{mode}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    shutil.copytree(first, root / "models" / "current")
    overrides = [f"trainer.store={root / 'labels.sqlite'}", f"trainer.models_dir={root / 'models'}", f"trainer.mode={mode}",
                 "redis.enabled=false", f"trainer.min_per_class={args.min_per_class}", *args.set]  # fmt: skip
    cfg = load_config(None, overrides)
    models = ModelStore(cfg.trainer.models_dir)
    scores: list[float] = []
    refits: list[dict] = []
    t0 = time.perf_counter()
    threshold = 0.5
    with LabelStore(cfg.trainer.store) as store:
        labelled = 0
        for start, end in segments(len(sc.stream), args.refit_every, args.delay):
            live = models.current()
            engine = Engine.load(live, device="cpu")
            threshold = engine.threshold
            scores += [v.score for v in engine.classify_texts([e.text for e in sc.stream[start:end]])]
            del engine
            if end == len(sc.stream):
                break
            back = min(end - args.delay, len(sc.stream))  # labels of messages [labelled, back) are back now
            store.add_many([(e.text, e.label, "bench", None, None) for e in sc.stream[labelled:back]])
            labelled = back
            r = refit_once(cfg, store)
            refits.append({"after_labels": labelled, "at_message": end, "outcome": r.outcome, "reason": r.reason[:300],
                           "seconds": round(r.seconds, 1), "trained_share": round(r.trained_share, 4),
                           "version": r.version, "over_ham_fpr_bound": r.over_ham_fpr_bound})  # fmt: skip
            log(f"{sc.name}/{mode}: {labelled} labels -> {r.outcome} in {r.seconds:.0f} s ({r.reason[:120]})")
    return ArmRun(mode, scores, threshold, refits, time.perf_counter() - t0)


def run_tfidf(sc: Scenario, arm: str, args: argparse.Namespace) -> ArmRun:
    """The baseline retrained from scratch at each of filterd's refit points; C chosen on a hash fold of the labels."""
    scores: list[float] = []
    refits: list[dict] = []
    t0 = time.perf_counter()
    prior = [] if arm == "tfidf-site" else [e for name in ("train", "val") for e in sc.initial.get(name, [])]
    scorer: Callable[[Sequence[str]], list[float]] | None = _train_tfidf(prior, args.seed) if prior else None
    labelled = 0
    for start, end in segments(len(sc.stream), args.refit_every, args.delay):
        texts = [e.text for e in sc.stream[start:end]]
        scores += scorer(texts) if scorer else [0.5] * len(texts)
        if end == len(sc.stream):
            break
        labelled = min(end - args.delay, len(sc.stream))
        site = sc.stream[:labelled]
        t1 = time.perf_counter()
        scorer = _train_tfidf(prior + site, args.seed) or scorer
        refits.append(
            {"after_labels": labelled, "at_message": end, "outcome": "retrained", "seconds": round(time.perf_counter() - t1, 1)}
        )
    return ArmRun(arm, scores, 0.5, refits, time.perf_counter() - t0)


def _train_tfidf(examples: Sequence[Example], seed: int) -> Callable[[Sequence[str]], list[float]] | None:
    if len({e.label for e in examples}) < 2:
        return None
    train = [e for e in examples if split_of(e.id) != "val"]
    val = [e for e in examples if split_of(e.id) == "val"]
    c_fixed = None if len({e.label for e in val}) == 2 and len(val) >= 20 else 10.0
    scorer, _ = train_tfidf_lr(train, val, seed, c_fixed, (1.0, 10.0, 100.0))
    return scorer


# --------------------------------------------------------------------------- measures


def measures(labels: Sequence[int], scores: Sequence[float], threshold: float, n_boot: int, seed: int) -> dict:
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    m = compute_metrics(y, s, threshold)
    stats: dict[str, Callable] = {
        "accuracy": lambda a, b: accuracy_at(a, b, threshold),
        "ham_fpr": lambda a, b: ham_fpr_at(a, b, threshold),
        "roca_pct": roca_pct,
        "lam_pct": lambda a, b: lam_pct(a, b, threshold),
        "ham_fpr_at_95_recall": lambda a, b: ham_fpr_at_recall(a, b, 0.95),
        "ham_fpr_at_99_recall": lambda a, b: ham_fpr_at_recall(a, b, 0.99),
    }
    out: dict = {"n": int(len(y)), "spam": int(y.sum()), "spam_recall": m.spam_recall}
    for name, fn in stats.items():
        out[name] = fn(y, s) if len(y) else None
        out[name + "_ci95"] = bootstrap_ci(y, s, fn, n=n_boot, seed=seed) if len(y) else None
    return out


def curve(labels: Sequence[int], scores: Sequence[float], threshold: float, window: int) -> list[dict]:
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    return [{"end": min(i + window, len(y)), "accuracy": accuracy_at(y[i : i + window], s[i : i + window], threshold),
             "ham_fpr": ham_fpr_at(y[i : i + window], s[i : i + window], threshold)}
            for i in range(0, len(y), window)]  # fmt: skip


def summarise(sc: Scenario, run: ArmRun, args: argparse.Namespace) -> dict:
    y = [LABELS.index(e.label) for e in sc.stream]
    a, b = args.after + args.delay, min(args.after + args.delay + args.window_after, len(y))
    return {
        "arm": run.arm, "threshold": run.threshold, "seconds": round(run.seconds, 1), "refits": run.refits,
        "all": measures(y, run.scores, run.threshold, args.bootstrap, args.seed),
        "after": measures(y[a:b], run.scores[a:b], run.threshold, args.bootstrap, args.seed) | {"range": [a, b]},
        "curve": curve(y, run.scores, run.threshold, args.window),
        "scores": [round(x, 5) for x in run.scores],
    }  # fmt: skip


# --------------------------------------------------------------------------- output


def _pct(x: float | None, ci: Sequence[float] | None = None, scale: float = 100.0) -> str:
    if x is None:
        return "n/a"
    s = f"{scale * x:.2f}"
    return s + (f" [{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]" if ci else "")


def table(doc: dict) -> str:
    a, b = doc["arms"][0]["after"]["range"] if doc["arms"] else (0, 0)
    lines = [
        f"Scenario `{doc['scenario']}`, base `{doc['base']}`: {doc['stream']['n']} messages ({doc['stream']['spam']} spam), "
        f"refit every {doc['refit_every']} labels, label delay {doc['delay']}. 'after' = messages {a}-{b} "
        f"(after the first {doc['after']} labels). 95% bootstrap intervals in brackets.",
        "",
        "| arm | after: accuracy % | after: ham FPR % | after: spam recall % | after: ham FPR @95% recall | "
        "after: ham FPR @99% recall | after: (1-ROCA)% | all: accuracy % | all: (1-ROCA)% | all: lam% | refits (promoted) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["arms"]:
        af, al = r["after"], r["all"]
        promoted = sum(x["outcome"] in ("promoted", "retrained") for x in r["refits"])
        lines.append(
            f"| {r['arm']} | {_pct(af['accuracy'], af['accuracy_ci95'])} | {_pct(af['ham_fpr'], af['ham_fpr_ci95'])} | "
            f"{_pct(af['spam_recall'])} | {_pct(af['ham_fpr_at_95_recall'], af['ham_fpr_at_95_recall_ci95'])} | "
            f"{_pct(af['ham_fpr_at_99_recall'], af['ham_fpr_at_99_recall_ci95'])} | "
            f"{_pct(af['roca_pct'], af['roca_pct_ci95'], 1.0)} | {_pct(al['accuracy'], al['accuracy_ci95'])} | "
            f"{_pct(al['roca_pct'], al['roca_pct_ci95'], 1.0)} | {_pct(al['lam_pct'], al['lam_pct_ci95'], 1.0)} | "
            f"{len(r['refits'])} ({promoted}) | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in doc["arms"]:
        ax.plot([p["end"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], marker=".", label=r["arm"])
    ax.axvline(doc["arms"][0]["after"]["range"][0], color="grey", linestyle=":", label=f"{doc['after']} labels")
    ax.set_xlabel("messages seen (arrival order)")
    ax.set_ylabel(f"accuracy % per {doc['window']} messages")
    bases = " / ".join(Path(b).name for b in doc["base"].split(" / "))
    ax.set_title(f"{doc['scenario']} ({bases}), refit every {doc['refit_every']} labels", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: Sequence[Path], plot_dir: Path | None = None) -> str:
    """One table per (scenario, base, schedule) over the arms of several runs (e.g. arms run separately), with their commands."""
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        groups.setdefault((doc["scenario"], doc["refit_every"], doc["delay"], doc["after"]), []).append(doc)
    out = []
    for docs in groups.values():
        bases = sorted({d["base"] for d in docs})
        seeds = {d.get("seed") for d in docs}
        merged = dict(docs[0], arms=[], base=" / ".join(bases))
        for doc in docs:
            notes = doc.get("overrides", []) + ([f"seed={doc.get('seed')}"] if len(seeds) > 1 else [])
            length = [f"max_length={doc['max_length']}"] if doc.get("max_length") else []  # filterd's arms only
            base_note = f" [{Path(doc['base']).name}]" if len(bases) > 1 else ""

            def label(arm: str, notes: list[str] = notes, length: list[str] = length, base_note: str = base_note) -> str:
                n = notes if arm in BASELINES else length + notes
                return arm + (f" ({', '.join(n)})" if n else "") + base_note

            merged["arms"] += [dict(a, arm=label(a["arm"])) for a in doc["arms"]]
        out.append(table(merged) + "\n" + "\n".join(f"- `{d['command']}`" for d in docs) + "\n")
        if plot_dir is not None:
            plot(merged, plot_dir / f"online_{merged['scenario']}_every{merged['refit_every']}.png")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    if (argv if argv is not None else sys.argv[1:])[:1] == ["--report"]:
        rp = argparse.ArgumentParser(prog="bench.online --report")
        rp.add_argument("--report", nargs="+", type=Path, required=True)
        rp.add_argument("--plot-dir", type=Path)
        ra = rp.parse_args(argv)
        print(report(ra.report, ra.plot_dir))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=SCENARIOS, required=True)
    ap.add_argument("--arms", nargs="+", default=["head", "all", "tfidf", "tfidf-site"], choices=MODES + BASELINES)
    ap.add_argument("--base", default="random:tiny", help="backbone of the first model (random:NAME, gpt2, a pretrain directory)")
    ap.add_argument("--first-epochs", type=int, default=5, help="epochs of the first model's fit (trainable all)")
    ap.add_argument("--refit-every", type=int, default=500, help="labels between refits (the trainer's min_new_labels)")
    ap.add_argument("--delay", type=int, default=0, help="messages between a message's verdict and its label coming back")
    ap.add_argument("--after", type=int, default=2000, help="the 'after' window starts once this many labels are back")
    ap.add_argument("--window-after", type=int, default=3000, help="size of the 'after' window")
    ap.add_argument("--window", type=int, default=250, help="learning-curve window")
    ap.add_argument("--limit", type=int, default=0, help="only the first N messages of the stream (0: all)")
    ap.add_argument("--min-per-class", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for the refits")
    ap.add_argument("--max-length", type=int, help="tokens the models read (default: 256 for mail, the longest message for SMS)")
    ap.add_argument("--work", type=Path, default=Path("work/online"))
    ap.add_argument(
        "--write-pretrain-corpus",
        type=Path,
        metavar="DIR",
        help="write DIR/train.csv: the texts the site holds before the 'after' window (the first model's "
        "train/val data and the first --after stream messages), for `filterd-trainer pretrain --csv DIR`; then exit",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)

    load0 = os.getloadavg()
    sc = load_scenario(args.scenario, args.seed)
    if args.max_length:  # the first model's max_length, which every refit keeps
        sc.max_length = args.max_length
    if args.limit:
        sc.stream = sc.stream[: args.limit]
    y = [LABELS.index(e.label) for e in sc.stream]
    if args.write_pretrain_corpus:
        seen = [e for name in ("train", "val") for e in sc.initial.get(name, [])] + sc.stream[: args.after]
        args.write_pretrain_corpus.mkdir(parents=True, exist_ok=True)
        write_split(args.write_pretrain_corpus / "train.csv", seen)
        log(f"{args.write_pretrain_corpus}/train.csv: {len(seen)} texts (labels are ignored by pretrain)")
        return
    log(f"{sc.name}: stream {len(y)} messages ({sum(y)} spam); first model from {args.base}")
    args.work.mkdir(parents=True, exist_ok=True)
    first = first_model(sc, args.base, args.seed, args.work, args.first_epochs) if any(a in MODES for a in args.arms) else None
    doc: dict = {
        "command": "python -m bench.online " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenario": sc.name, "base": args.base, "first_model": str(first) if first else None,
        "first_model_meta": json.loads((first / "filterd.json").read_text()).get("metrics", {}).get("test") if first else None,
        "stream": {"n": len(y), "spam": sum(y)}, "initial": {k: len(v) for k, v in sc.initial.items()},
        "refit_every": args.refit_every, "delay": args.delay, "after": args.after, "window": args.window,
        "overrides": args.set, "max_length": args.max_length, "seed": args.seed, "bootstrap": args.bootstrap,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": load0},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arms": [],
    }  # fmt: skip
    tmp = args.work / f"run-{sc.name}-{os.getpid()}"
    try:
        for arm in args.arms:
            log(f"{sc.name}: arm {arm}")
            run = run_tfidf(sc, arm, args) if arm in BASELINES else run_filterd(sc, arm, first, args, tmp)
            doc["arms"].append(summarise(sc, run, args))
            a = doc["arms"][-1]["after"]
            log(
                f"{sc.name}/{arm}: after {args.after} labels: accuracy {100 * a['accuracy']:.2f}% ham FPR {100 * (a['ham_fpr'] or 0):.2f}%"
            )
            doc["machine"]["load_end"] = os.getloadavg()
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(doc) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(doc)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(f"`{doc['command']}`\n\n{text}")
    if args.plot:
        plot(doc, args.plot)


if __name__ == "__main__":
    main()
