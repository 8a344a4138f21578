"""Tests for trainer.plots: every function writes a real PNG and leaves no figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from trainer.plots import plot_history, plot_roc, plot_score_histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = {
    "epoch": [1, 2, 3],
    "train_loss": [0.69, 0.31, 0.12],
    "val_loss": [0.66, 0.35, 0.2],
    "train_acc": [0.55, 0.88, 0.97],
    "val_acc": [0.52, 0.85, 0.93],
}
STEPS = {
    "step": list(range(1, 31)),
    "examples_seen": [8 * i for i in range(1, 31)],
    "train_loss": list(np.linspace(0.7, 0.1, 30)),
    # Validation loss only every 10 steps; None elsewhere.
    "val_loss": [0.6 - 0.01 * i if i % 10 == 0 else None for i in range(1, 31)],
}


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # axes, labels and curves, not an empty canvas


@pytest.fixture(autouse=True)
def no_figures_left_open():
    yield
    assert plt.get_fignums() == []


def labelled_scores(n: int = 400) -> tuple[list[int], list[float]]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.beta(2, 8, n) * (1 - labels) + rng.beta(8, 2, n) * labels, 0, 1)
    return labels.tolist(), scores.tolist()


def test_plot_history_without_steps(tmp_path):
    paths = plot_history(HISTORY, tmp_path / "plots")
    assert paths == {"loss": tmp_path / "plots" / "loss.png", "accuracy": tmp_path / "plots" / "accuracy.png"}
    for p in paths.values():
        assert_png(p)


def test_plot_history_with_steps(tmp_path):
    plain = plot_history(HISTORY, tmp_path / "plain")["loss"].stat().st_size
    paths = plot_history({**HISTORY, "steps": STEPS}, tmp_path / "steps")
    for p in paths.values():
        assert_png(p)
    assert paths["loss"].stat().st_size > plain  # the extra per-step panel


def test_plot_history_single_epoch_and_missing_accuracy(tmp_path):
    paths = plot_history({"epoch": [1], "train_loss": [0.5], "val_loss": [0.6]}, tmp_path)
    for p in paths.values():
        assert Path(p).read_bytes()[:8] == PNG_SIGNATURE


def test_plot_roc(tmp_path):
    labels, scores = labelled_scores()
    path = plot_roc(labels, scores, tmp_path / "roc.png", title="ROC (test)")
    assert path == tmp_path / "roc.png"
    assert_png(path)


def test_plot_roc_single_class_still_renders(tmp_path):
    assert_png(plot_roc([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "roc.png"))
    assert_png(plot_roc([], [], tmp_path / "empty-roc.png"))


def test_plot_score_histogram(tmp_path):
    labels, scores = labelled_scores()
    path = plot_score_histogram(labels, scores, tmp_path / "sub" / "scores.png", threshold=0.42)
    assert path == tmp_path / "sub" / "scores.png"
    assert_png(path)


def test_plot_score_histogram_skewed_and_one_class(tmp_path):
    # Thousands of confident ham against a handful of errors: the log-y branch.
    labels = [0] * 3000 + [1] * 5
    scores = [0.01] * 2995 + [0.9] * 5 + [0.95] * 5
    assert_png(plot_score_histogram(labels, scores, tmp_path / "skewed.png"))
    assert_png(plot_score_histogram([1, 1], [0.7, 0.8], tmp_path / "spam-only.png"))
    empty = plot_score_histogram([], [], tmp_path / "empty.png")
    assert Path(empty).read_bytes()[:8] == PNG_SIGNATURE
