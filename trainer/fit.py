"""Fine-tuning GPT-2 for spam classification (the chapter's recipe, with last-real-token pooling).

The vocabulary head is replaced by Linear(d_model, 2); by default only the last transformer
block, the final layer norm and the head are trained (AdamW, lr 5e-5, weight decay 0.1, 5
epochs, batch 8). Each batch is padded to its longest message. The model with the best
validation accuracy is kept, evaluated on every split, and published as a model directory,
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
import torch.nn.functional as F
from tqdm import tqdm

from filterd.model.engine import Engine, pick_device, score_in_length_batches
from filterd.errors import ConfigError, DataError
from filterd.model.gpt2 import LABELS, GPT2Classifier
from filterd.model.tokenizer import Tokenizer, max_length_from, pad_batch
from filterd.model.weights import ModelMeta, build_model, publish_directory, resolve_base, staging_dir, write_model_files

from trainer.data import Example, manifest_sha256, read_split, write_split
from trainer.evaluate import Metrics, SplitReport, choose_threshold, compute_metrics, format_metrics_line, write_report
from trainer.plots import plot_history, plot_roc, plot_score_histogram

TRAINABLE = ("head", "last-block", "last-2-blocks", "all")
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


@dataclass
class _Encoded:
    tokens: list[list[int]]
    labels: list[int]


def set_trainable(model: GPT2Classifier, trainable: str) -> int:
    """Freeze everything except the chosen top of the model; returns how many blocks stay frozen."""
    n = model.config.n_layer
    top_blocks = {"head": 0, "last-block": 1, "last-2-blocks": 2, "all": n}[trainable]
    frozen_blocks = n - min(top_blocks, n)
    for name, p in model.named_parameters():
        if trainable == "all":
            p.requires_grad = True
        elif name.startswith("head."):
            p.requires_grad = True
        elif name.startswith("ln_f."):
            p.requires_grad = trainable != "head"
        elif name.startswith("h."):
            p.requires_grad = int(name.split(".")[1]) >= frozen_blocks
        else:
            p.requires_grad = False
    return frozen_blocks


def _encode(examples: Sequence[Example], tokenizer: Tokenizer) -> _Encoded:
    return _Encoded(tokenizer.encode_batch([e.text for e in examples]), [LABELS.index(e.label) for e in examples])


@torch.inference_mode()
def score(model: GPT2Classifier, tokens: Sequence[Sequence[int]], device: torch.device, batch_tokens: int = 8192) -> list[float]:
    """P(spam) per sequence, batched by length (the engine's code path)."""
    with _autocast(device):
        return score_in_length_batches(model, tokens, device, 64, batch_tokens)


def _autocast(device: torch.device):  # type: ignore[no-untyped-def]
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train_step(
    model: GPT2Classifier,
    optimizer: torch.optim.Optimizer,
    data: _Encoded,
    idx: list[int],
    device: torch.device,
    frozen_blocks: int,
) -> tuple[float, int]:
    """One optimiser step on the examples `idx` (padded to their longest); their mean loss and how many were right."""
    ids, lengths = pad_batch([data.tokens[i] for i in idx])
    target = torch.tensor([data.labels[i] for i in idx], device=device)
    with _autocast(device):
        logits = model(ids.to(device), lengths.to(device), frozen_blocks=frozen_blocks)
    loss = F.cross_entropy(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=-1) == target).sum().item())


def _val_loss_acc(model: GPT2Classifier, enc: _Encoded, device: torch.device) -> tuple[float, float]:
    scores = score(model, enc.tokens, device)
    eps = 1e-7
    loss = -sum(math.log(max(s if y else 1 - s, eps)) for s, y in zip(scores, enc.labels)) / max(len(scores), 1)
    acc = sum((s >= 0.5) == bool(y) for s, y in zip(scores, enc.labels)) / max(len(scores), 1)
    return loss, acc


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
    frozen_blocks = set_trainable(model, cfg.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    counts = [Tokenizer.count(e.text) for e in splits["train"]]
    max_length = cfg.max_length or max_length_from(counts, cap=base.config.n_positions)
    tokenizer = Tokenizer(max_length)
    enc = {name: _encode(ex, tokenizer) for name, ex in splits.items()}
    train, val = enc["train"], enc["val"]
    _log(
        f"fit: base {base.name} ({base.kind}), trainable {cfg.trainable} ({n_trainable:,} parameters), "
        f"max_length {max_length}, train {len(train.labels)} / val {len(val.labels)}, device {device}"
    )

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict = {"epoch": [], "train_loss": [], "val_loss": [], "train_acc": [], "val_acc": [], "seconds": [],
                     "steps": {"step": [], "examples_seen": [], "train_loss": [], "val_loss": []}}  # fmt: skip
    best = (-1.0, math.inf)  # (val accuracy, val loss): higher accuracy, then lower loss
    best_state: dict[str, torch.Tensor] = {}
    best_epoch = 0
    step = seen = 0
    n_batches = math.ceil(len(train.labels) / cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(train.labels), generator=gen).tolist()
        loss_sum = correct = count = 0.0
        window: list[float] = []
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=_no_bar(cfg), leave=False, file=sys.stderr)
        for b in range(n_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss, right = train_step(model, optimizer, train, idx, device, frozen_blocks)
            step += 1
            seen += len(idx)
            loss_sum += loss * len(idx)
            correct += right
            count += len(idx)
            window.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
            if step % cfg.eval_every == 0:
                model.eval()
                v_loss, _ = _val_loss_acc(model, val, device)
                model.train()
                steps = history["steps"]
                for k, v in (
                    ("step", step),
                    ("examples_seen", seen),
                    ("train_loss", sum(window) / len(window)),
                    ("val_loss", v_loss),
                ):
                    steps[k].append(v)
                window = []
                if bar.disable:  # no terminal (a log file, a service): a line per evaluation instead
                    _log(f"step {step}/{n_batches * cfg.epochs}: train loss {steps['train_loss'][-1]:.4f} val loss {v_loss:.4f}")
        bar.close()
        model.eval()
        v_loss, v_acc = _val_loss_acc(model, val, device)
        for k, v in (("epoch", epoch), ("train_loss", loss_sum / count), ("val_loss", v_loss),
                     ("train_acc", correct / count), ("val_acc", v_acc), ("seconds", time.perf_counter() - t_epoch)):  # fmt: skip
            history[k].append(v)
        marker = ""
        if (v_acc, -v_loss) > (best[0], -best[1]):
            best, best_epoch, marker = (v_acc, v_loss), epoch, "  *best"
            best_state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        _log(
            f"epoch {epoch}/{cfg.epochs}: train loss {loss_sum / count:.4f} acc {correct / count:.2%} | "
            f"val loss {v_loss:.4f} acc {v_acc:.2%} | {history['seconds'][-1]:.1f}s{marker}"
        )
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in best_state:
                p.copy_(best_state[k])
    model.eval()

    scores = {name: score(model, e.tokens, device) for name, e in enc.items()}
    threshold = choose_threshold(val.labels, scores["val"], cfg.target_ham_fpr)
    metrics = {name: compute_metrics(enc[name].labels, scores[name], threshold) for name in enc}
    for name in enc:
        _log(format_metrics_line(name, metrics[name]))

    meta = ModelMeta(
        version="",
        base=base.name,
        base_kind=base.kind,
        config=base.config,
        max_length=max_length,
        threshold=threshold,
        trainable=cfg.trainable,
        metrics={name: m.to_dict() for name, m in metrics.items()},
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


def _no_bar(cfg: FitConfig) -> bool | None:
    return None if cfg.progress is None else not cfg.progress


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
