"""The one fine-tuning loop: `filterd-trainer fit` and the refit's top modes both train through `train()`.

An epoch shuffles the train split (a `torch.Generator` seeded with `seed`, apart from the global RNG
that dropout draws from), takes batches of `batch_size` padded to their longest message, and makes one
AdamW step per batch on the cross-entropy of the classifier's logits (bfloat16 autocast on CUDA, float32
on CPU). Every `eval_every` steps the validation loss is recorded (the progress plot's resolution); at
each epoch's end the validation loss and accuracy are, and the state of the epoch with the best
validation accuracy (then the lowest loss) is what the model holds when `train()` returns. Without
validation messages (a refit's final fit) there is nothing to choose by and the last epoch is kept.
`deadline` (a `time.perf_counter()` value) ends training after the step that reaches it; the epoch
so far is evaluated and the best state so far kept.

Pretraining (trainer.pretrain) is not trained here: next-token loss on random blocks, counted in steps
with warm-up, gradient clipping and resumable state, it shares no more than the optimiser with this
loop. The refit's head mode neither: it fits a linear head on cached features (trainer.features.fit_head).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from filterd.model.engine import score_in_length_batches
from filterd.model.gpt2 import GPT2Classifier
from filterd.model.tokenizer import pad_batch

TRAINABLE = ("head", "last-block", "last-2-blocks", "all")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class LoopSettings:
    """How `train()` trains; `log` gets one line per epoch (and per evaluation when no progress bar shows)."""

    trainable: str = "last-block"  # one of TRAINABLE: the top of the model that is trained, the rest frozen
    epochs: int = 5
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    seed: int = 123  # the shuffling generator's seed
    eval_every: int | None = None  # steps between validation losses in history["steps"]; None: no step history
    deadline: float | None = None  # time.perf_counter() value after which no further step starts
    progress: bool | None = False  # a tqdm bar on stderr; None: only when stderr is a terminal
    log: Callable[[str], None] = _stderr
    log_prefix: str = ""  # e.g. "refit: "


@dataclass
class LoopResult:
    history: dict[str, Any]  # per epoch: epoch, train_loss, val_loss, train_acc, val_acc, seconds (+ "steps" with eval_every)
    best_epoch: int = 0  # the epoch whose state the model holds (the last one without validation messages)
    epochs_run: int = 0  # epochs begun
    steps: int = 0
    stopped: bool = False  # the deadline ended training early
    seconds: float = 0.0
    trainable_params: int = 0


@dataclass
class Encoded:
    """A split as token ids and label indexes (LABELS order)."""

    tokens: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def _is_trained(name: str, trainable: str, frozen_blocks: int) -> bool:
    if trainable == "all" or name.startswith("head."):
        return True
    if name.startswith("ln_f."):
        return trainable != "head"
    if name.startswith("h."):
        return int(name.split(".")[1]) >= frozen_blocks
    return False


def _frozen_blocks(model: GPT2Classifier, trainable: str) -> int:
    n = model.config.n_layer
    return n - min({"head": 0, "last-block": 1, "last-2-blocks": 2, "all": n}[trainable], n)


def set_trainable(model: GPT2Classifier, trainable: str) -> int:
    """Freeze everything except the chosen top of the model; returns how many blocks stay frozen."""
    frozen_blocks = _frozen_blocks(model, trainable)
    for name, p in model.named_parameters():
        p.requires_grad = _is_trained(name, trainable, frozen_blocks)
    return frozen_blocks


def count_trainable(model: GPT2Classifier, trainable: str) -> int:
    """How many parameters `set_trainable(model, trainable)` leaves trainable (the model is not changed)."""
    frozen_blocks = _frozen_blocks(model, trainable)
    return sum(p.numel() for name, p in model.named_parameters() if _is_trained(name, trainable, frozen_blocks))


def autocast(device: torch.device):  # type: ignore[no-untyped-def]
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def score(model: GPT2Classifier, tokens: Sequence[Sequence[int]], device: torch.device, batch_tokens: int = 8192) -> list[float]:
    """P(spam) per sequence, batched by length (the engine's code path)."""
    with autocast(device):
        return score_in_length_batches(model, tokens, device, 64, batch_tokens)


def train_step(
    model: GPT2Classifier,
    optimizer: torch.optim.Optimizer,
    data: Encoded,
    idx: list[int],
    device: torch.device,
    frozen_blocks: int,
) -> tuple[float, int]:
    """One optimiser step on the examples `idx` (padded to their longest); their mean loss and how many were right."""
    ids, lengths = pad_batch([data.tokens[i] for i in idx])
    target = torch.tensor([data.labels[i] for i in idx], device=device)
    with autocast(device):
        logits = model(ids.to(device), lengths.to(device), frozen_blocks=frozen_blocks)
    loss = F.cross_entropy(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=-1) == target).sum().item())


def val_loss_acc(model: GPT2Classifier, enc: Encoded, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (at 0.5) of the model's scores; the model should be in eval mode."""
    scores = score(model, enc.tokens, device)
    eps = 1e-7
    loss = -sum(math.log(max(s if y else 1 - s, eps)) for s, y in zip(scores, enc.labels)) / max(len(scores), 1)
    acc = sum((s >= 0.5) == bool(y) for s, y in zip(scores, enc.labels)) / max(len(scores), 1)
    return loss, acc


def train(model: GPT2Classifier, train_data: Encoded, val: Encoded, device: torch.device, s: LoopSettings) -> LoopResult:
    """Fine-tune `model` in place (on `device`) as the module docstring says; it is left in eval mode holding the kept state."""
    t_start = time.perf_counter()
    frozen_blocks = set_trainable(model, s.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    history: dict[str, Any] = {k: [] for k in ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "seconds")}
    if s.eval_every is not None:
        history["steps"] = {"step": [], "examples_seen": [], "train_loss": [], "val_loss": []}
    run = LoopResult(history, trainable_params=sum(p.numel() for p in params))
    best = (-1.0, math.inf)  # (val accuracy, val loss): higher accuracy, then lower loss
    best_state: dict[str, torch.Tensor] = {}
    seen = 0
    n_batches = math.ceil(len(train_data.labels) / s.batch_size)
    for epoch in range(1, s.epochs + 1):
        if run.stopped:
            break
        t_epoch = time.perf_counter()
        run.epochs_run = epoch
        model.train()
        order = torch.randperm(len(train_data.labels), generator=gen).tolist()
        loss_sum = correct = count = 0.0
        window: list[float] = []
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{s.epochs}", disable=None if s.progress is None else not s.progress,
                   leave=False, file=sys.stderr)  # fmt: skip
        for b in range(n_batches):
            idx = order[b * s.batch_size : (b + 1) * s.batch_size]
            loss, right = train_step(model, optimizer, train_data, idx, device, frozen_blocks)
            run.steps += 1
            seen += len(idx)
            loss_sum += loss * len(idx)
            correct += right
            count += len(idx)
            window.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
            if s.eval_every is not None and run.steps % s.eval_every == 0:
                model.eval()
                v_loss, _ = val_loss_acc(model, val, device)
                model.train()
                steps = history["steps"]
                for k, v in (("step", run.steps), ("examples_seen", seen), ("train_loss", sum(window) / len(window)),
                             ("val_loss", v_loss)):  # fmt: skip
                    steps[k].append(v)
                window = []
                if bar.disable:  # no terminal (a log file, a service): a line per evaluation instead
                    s.log(f"{s.log_prefix}step {run.steps}/{n_batches * s.epochs}: train loss {steps['train_loss'][-1]:.4f} "
                          f"val loss {v_loss:.4f}")  # fmt: skip
            if s.deadline is not None and time.perf_counter() >= s.deadline:
                run.stopped = True
                break
        bar.close()
        model.eval()
        v_loss, v_acc = val_loss_acc(model, val, device) if val.labels else (0.0, 0.0)
        for k, v in (("epoch", epoch), ("train_loss", loss_sum / count), ("val_loss", v_loss), ("train_acc", correct / count),
                     ("val_acc", v_acc), ("seconds", time.perf_counter() - t_epoch)):  # fmt: skip
            history[k].append(v)
        marker = ""
        if not val.labels:  # nothing to choose by: the last state stays
            run.best_epoch = epoch
        elif (v_acc, -v_loss) > (best[0], -best[1]):
            best, run.best_epoch, marker = (v_acc, v_loss), epoch, "  *best"
            best_state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        shown = f"val loss {v_loss:.4f} acc {v_acc:.2%}" if val.labels else "no val split"
        s.log(f"{s.log_prefix}epoch {epoch}/{s.epochs}: train loss {loss_sum / count:.4f} acc {correct / count:.2%} | "
              f"{shown} | {history['seconds'][-1]:.1f}s{marker}")  # fmt: skip
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in best_state:
                p.copy_(best_state[k])
    model.eval()
    run.seconds = time.perf_counter() - t_start
    return run
