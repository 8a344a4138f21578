"""Fine-tuning GPT-2 for spam classification (the chapter's recipe, with last-real-token pooling).

The vocabulary head is replaced by Linear(d_model, 2); by default only the last transformer
block, the final layer norm and the head are trained (AdamW, lr 5e-5, weight decay 0.1, 5
epochs, batch 8) by trainer.loop, the loop refits train through too. Each batch is padded to its
longest message. The model with the best validation accuracy is kept, evaluated on every split, and published as a model directory,
with golden.csv (a sample of the test split: the golden set refits gate on) and replay.csv (a
sample of the train split: what refits mix back in so as not to forget it).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from filterd.model.engine import Engine, pick_device
from filterd.errors import ConfigError, DataError
from filterd.model.gpt2 import LABELS
from filterd.model.tokenizer import Tokenizer, max_length_from
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import ModelMeta, publish_directory, staging_dir, write_model_files

from trainer.data import Example, manifest_sha256, read_split, write_split
from trainer.evaluate import Metrics, choose_threshold, compute_metrics
from trainer.report import SplitReport, format_metrics_line, write_report
from trainer.loop import TRAINABLE, Encoded, LoopSettings, count_trainable, score, train
from trainer.operating import format_points, split_points
from trainer.plots import plot_history, plot_roc, plot_score_histogram

SPLITS = ("train", "val", "test", "holdout")
GOLDEN_FILE = "golden.csv"  # in a model directory: a sample of the fit's test split, the golden set refits gate on
GOLDEN_PER_CLASS = 200
REPLAY_FILE = "replay.csv"  # in a model directory: a sample of the fit's train split, which refits mix back in
REPLAY_PER_CLASS = 1000


@dataclass
class FitConfig:
    data: Path
    base: str
    out: Path
    trainable: str = "last-block"
    epochs: int = 5
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    max_length: int | None = None  # None: the longest training message, capped at the model's positions
    seed: int = 123
    device: str = "auto"
    eval_every: int = 50  # steps between validation passes (the progress plot's resolution)
    target_ham_fpr: float | None = None  # None: threshold 0.5; else the val threshold meeting this FPR
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def validate(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.max_length is not None and not 1 <= self.max_length <= 1024:
            raise ConfigError(f"--max-length must be within 1..1024, got {self.max_length}")
        if self.target_ham_fpr is not None and not 0.0 <= self.target_ham_fpr < 1.0:
            raise ConfigError(f"--target-ham-fpr must be within [0, 1), got {self.target_ham_fpr}")


@dataclass
class FitResult:
    model_dir: Path
    meta: ModelMeta
    metrics: dict[str, Metrics]
    history: dict
    seconds: float
    trainable_params: int
    best_epoch: int


def _encode(examples: Sequence[Example], tokenizer: Tokenizer) -> Encoded:
    return Encoded(tokenizer.encode_batch([e.text for e in examples]), [LABELS.index(e.label) for e in examples])


def _read_splits(data: Path) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {}
    for name in SPLITS:
        path = data / f"{name}.csv"
        if path.is_file():
            splits[name] = read_split(path)
        elif name != "holdout":
            raise DataError(f"{data}: no {name}.csv (run `filterd-trainer prepare` first)")
    for name in ("train", "val"):
        labels = {e.label for e in splits[name]}
        if labels != set(LABELS):
            raise DataError(f"{data / (name + '.csv')}: needs both ham and spam examples, has {sorted(labels) or 'none'}")
    return splits


def fit(cfg: FitConfig) -> FitResult:
    cfg.validate()
    t_start = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    splits = _read_splits(cfg.data)
    base = resolve_base(cfg.base)
    model = build_model(base, seed=cfg.seed).to(device)
    n_trainable = count_trainable(model, cfg.trainable)

    counts = [Tokenizer.count(e.text) for e in splits["train"]]
    max_length = cfg.max_length or max_length_from(counts, cap=base.config.n_positions)
    tokenizer = Tokenizer(max_length)
    enc = {name: _encode(ex, tokenizer) for name, ex in splits.items()}
    train_data, val = enc["train"], enc["val"]
    _log(
        f"fit: base {base.name} ({base.kind}), trainable {cfg.trainable} ({n_trainable:,} parameters), "
        f"max_length {max_length}, train {len(train_data.labels)} / val {len(val.labels)}, device {device}"
    )

    settings = LoopSettings(trainable=cfg.trainable, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            batch_size=cfg.batch_size, seed=cfg.seed, eval_every=cfg.eval_every, progress=cfg.progress)  # fmt: skip
    run = train(model, train_data, val, device, settings)
    history, best_epoch = run.history, run.best_epoch

    scores = {name: score(model, e.tokens, device) for name, e in enc.items()}
    threshold = choose_threshold(val.labels, scores["val"], cfg.target_ham_fpr)
    metrics = {name: compute_metrics(enc[name].labels, scores[name], threshold) for name in enc}
    for name in enc:
        _log(format_metrics_line(name, metrics[name]))
    points = split_points({name: (e.labels, scores[name]) for name, e in enc.items()})
    for line in format_points(points):
        _log(f"fit: {line}")

    meta = ModelMeta(
        version="",
        base=base.name,
        base_kind=base.kind,
        config=base.config,
        max_length=max_length,
        threshold=threshold,
        trainable=cfg.trainable,
        metrics={name: m.to_dict() for name, m in metrics.items()},
        operating_points=[p.to_dict() for p in points],
        data_manifest_sha256=manifest_sha256(cfg.data) if (cfg.data / "manifest.json").is_file() else None,
        extra={
            "epochs": cfg.epochs,
            "best_epoch": best_epoch,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "train_seconds": round(time.perf_counter() - t_start, 1),
            "device": str(device),
            "trainable_params": n_trainable,
        },  # fmt: skip
    )
    staged = staging_dir(cfg.out)
    try:
        meta = write_model_files(model.cpu(), meta, staged)
        reports = [SplitReport(name, metrics[name], enc[name].labels, scores[name]) for name in enc]
        write_artifacts(staged, meta, reports, history)
        write_split(staged / GOLDEN_FILE, golden_sample(splits["test"], cfg.seed))
        write_split(staged / REPLAY_FILE, replay_sample(splits["train"], cfg.seed))
        publish_directory(staged, cfg.out)
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t_start
    _log(f"fit: wrote {cfg.out} (version {meta.version}) in {seconds:.1f}s")
    return FitResult(cfg.out, meta, metrics, history, seconds, n_trainable, best_epoch)


def golden_sample(test: Sequence[Example], seed: int, per_class: int = GOLDEN_PER_CLASS) -> list[Example]:
    """A seeded sample of the test split, up to `per_class` per label: the trusted set refits of this model gate on."""
    return _stratified_sample(test, random.Random(seed), per_class)


def replay_sample(train: Sequence[Example], seed: int, per_class: int = REPLAY_PER_CLASS) -> list[Example]:
    """A seeded sample of the train split (never test/holdout), up to `per_class` per label: refits replay it so as not to forget."""
    return _stratified_sample(train, random.Random(f"replay:{seed}"), per_class)


def _stratified_sample(examples: Sequence[Example], rng: random.Random, per_class: int) -> list[Example]:
    out: list[Example] = []
    for label in LABELS:
        of_label = [e for e in examples if e.label == label]
        out += rng.sample(of_label, min(per_class, len(of_label)))
    return out


def write_artifacts(directory: Path, meta: ModelMeta, reports: list[SplitReport], history: dict | None) -> None:
    """report.md and plots/*.png beside the weights."""
    plots_dir = directory / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: dict[str, str] = {}
    if history and history.get("epoch"):
        plots.update({k: f"plots/{p.name}" for k, p in plot_history(history, plots_dir).items()})
    test = next((r for r in reports if r.split == "test"), reports[-1])
    plots["roc"] = f"plots/{plot_roc(test.labels, test.scores, plots_dir / 'roc.png', title=f'ROC ({test.split})').name}"
    hist = plot_score_histogram(test.labels, test.scores, plots_dir / "scores.png", threshold=meta.threshold)
    plots["scores"] = f"plots/{hist.name}"
    info = {
        "version": meta.version, "base": f"{meta.base} ({meta.base_kind})", "trainable": meta.trainable,
        "max_length": meta.max_length, "threshold": f"{meta.threshold:.4f}", "pooling": meta.pooling,
        "best epoch": meta.extra.get("best_epoch"), "train seconds": meta.extra.get("train_seconds"),
    }  # fmt: skip
    title = "filterd model report" + {
        "random": " — RANDOM INITIALISATION (not pretrained GPT-2)",
        "self-pretrained": " — SELF-PRETRAINED HERE FROM RANDOM INITIALISATION (not GPT-2)",
    }.get(meta.base_kind, "")
    write_report(directory / "report.md", title=title, model_info=info, reports=reports, history=history, plots=plots)


def evaluate_model(engine: Engine, data: Path, splits: Sequence[str]) -> list[SplitReport]:
    """Score the chosen splits of a prepared data directory with a loaded model."""
    reports = []
    for name in splits:
        examples = read_split(data / f"{name}.csv")
        verdicts = engine.classify_texts([e.text for e in examples])
        labels = [LABELS.index(e.label) for e in examples]
        scores = [v.score for v in verdicts]
        reports.append(SplitReport(name, compute_metrics(labels, scores, engine.threshold), labels, scores))
    return reports


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
