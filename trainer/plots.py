"""PNG plots for training reports: loss and accuracy curves, ROC curve, score histogram.

Figures are built as plain `matplotlib.figure.Figure` objects rendered by the Agg canvas, never
through pyplot: nothing is registered in pyplot's global figure list (so nothing can leak in the
long-lived refit service), no display is needed, the process-wide backend is left alone, and
plotting is safe from worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.evaluate import roc_auc, roc_curve

DPI = 110
# Above this ratio between the tallest and the shortest non-empty histogram bar, a linear y axis
# hides the minority bars (typically ham scores near 1 and spam scores near 0, the errors).
LOG_Y_RATIO = 50


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _seq(values: Sequence[Any] | None) -> list[Any]:
    """A history entry as a list; absent -> [] (lists, tuples and arrays all welcome)."""
    return [] if values is None else list(values)


def _floats(values: Sequence[Any] | None) -> np.ndarray:
    """Values as floats, None -> NaN (a metric not measured at that point)."""
    return np.array([np.nan if v is None else float(v) for v in _seq(values)], dtype=np.float64)


def _plot_series(ax: Axes, x: Sequence[Any], y: Sequence[Any] | None, label: str, **kw: Any) -> None:
    """Plot y against x, skipping missing points; markers so a single epoch still shows."""
    xs, ys = _floats(x), _floats(y)
    n = min(len(xs), len(ys))
    keep = ~np.isnan(ys[:n])
    if keep.any():
        ax.plot(xs[:n][keep], ys[:n][keep], label=label, **kw)


def _epoch_axes(ax: Axes, ylabel: str, title: str) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()


def _plot_steps(ax: Axes, steps: dict[str, Any]) -> None:
    """Per-step losses against examples seen, with the optimizer step on a second x axis."""
    train_loss = _seq(steps.get("train_loss"))
    step = _seq(steps.get("step")) or list(range(1, len(train_loss) + 1))
    examples = _seq(steps.get("examples_seen"))
    x = examples or step
    _plot_series(ax, x, train_loss, "train loss", lw=1)
    _plot_series(ax, x, steps.get("val_loss"), "val loss", marker="o", ms=3, linestyle="-.")
    ax.set_xlabel("examples seen" if examples else "step")
    ax.set_ylabel("loss")
    ax.set_title("Loss during training")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    if len(examples) >= 2 and len(step) >= 2:
        _step_axis(ax, _floats(examples), _floats(step))


def _step_axis(ax: Axes, examples: np.ndarray, step: np.ndarray) -> None:
    """A top x axis in optimizer steps; steps are linear in examples seen (fixed batch size, bar
    a short last batch per epoch), so a least-squares line maps one axis onto the other."""
    n = min(len(examples), len(step))
    if np.ptp(examples[:n]) == 0:  # no spread to fit a line through
        return
    slope, intercept = np.polyfit(examples[:n], step[:n], 1)
    lo, hi = ax.get_xlim()
    top = ax.twiny()
    top.set_xlim(slope * lo + intercept, slope * hi + intercept)
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel("step")


def plot_history(history: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``loss.png`` and ``accuracy.png`` into out_dir; returns {"loss": ..., "accuracy": ...}.

    Accuracies are fractions (plotted as %). With a non-empty ``steps`` entry the loss figure
    gains a second panel with the per-step curves.
    """
    out_dir = Path(out_dir)
    epochs = _seq(history.get("epoch")) or list(range(1, len(_seq(history.get("train_loss"))) + 1))
    steps = history.get("steps") or {}
    has_steps = len(_seq(steps.get("train_loss"))) > 0

    fig = Figure(figsize=(11 if has_steps else 6.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2) if has_steps else [fig.subplots()]
    _plot_series(axes[0], epochs, history.get("train_loss"), "train loss", marker="o")
    _plot_series(axes[0], epochs, history.get("val_loss"), "val loss", marker="o", linestyle="-.")
    _epoch_axes(axes[0], "loss", "Loss per epoch")
    if has_steps:
        _plot_steps(axes[1], steps)
    loss = _save(fig, out_dir / "loss.png")

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _plot_series(ax, epochs, 100 * _floats(history.get("train_acc")), "train accuracy", marker="o")
    _plot_series(ax, epochs, 100 * _floats(history.get("val_acc")), "val accuracy", marker="o", linestyle="-.")
    _epoch_axes(ax, "accuracy (%)", "Accuracy per epoch")
    accuracy = _save(fig, out_dir / "accuracy.png")
    return {"loss": loss, "accuracy": accuracy}


def plot_roc(labels: Sequence[int], scores: Sequence[float], path: Path, *, title: str = "ROC") -> Path:
    """ROC curve with its AUC in the legend and the chance diagonal.

    With only one class present the ROC is undefined; the figure says so instead of failing, so
    a report for a one-class split still renders.
    """
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", lw=1, label="chance")
    auc = roc_auc(labels, scores)
    if auc is None:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("ham false-positive rate")
    ax.set_ylabel("spam recall (true-positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_score_histogram(labels: Sequence[int], scores: Sequence[float], path: Path, *, threshold: float = 0.5) -> Path:
    """Ham and spam P(spam) distributions overlaid, with the decision threshold marked.

    The y axis turns logarithmic when the bars span more than LOG_Y_RATIO, as they do for a good
    model whose few mistakes would otherwise be invisible.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if len(y) != len(s):
        raise ValueError(f"labels and scores differ in length ({len(y)} != {len(s)})")
    lo = min(0.0, float(s.min())) if len(s) else 0.0
    hi = max(1.0, float(s.max())) if len(s) else 1.0
    bins = np.linspace(lo, hi, 51)

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    counts = []
    for value, name, color in ((0, "ham", "tab:blue"), (1, "spam", "tab:red")):
        class_scores = s[y == value]
        if len(class_scores):
            c, _, _ = ax.hist(class_scores, bins=bins, alpha=0.55, color=color, label=f"{name} (n={len(class_scores)})")
            counts.append(c)
    ax.axvline(threshold, color="black", linestyle="--", lw=1.2, label=f"threshold {threshold:.4f}")
    bars = np.concatenate(counts) if counts else np.zeros(0)
    bars = bars[bars > 0]
    if len(bars) and bars.max() / bars.min() > LOG_Y_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("P(spam)")
    ax.set_ylabel("messages")
    ax.set_title("Score distribution")
    ax.legend()
    return _save(fig, path)
