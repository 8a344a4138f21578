"""Tests for trainer.evaluate: metrics by hand, ROC/AUC against brute force, threshold choice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainer.evaluate import Metrics, choose_threshold, compute_metrics, roc_auc, roc_curve
from trainer.report import SplitReport, format_metrics_line, write_report

# 4 spam, 6 ham. At 0.5: spam 0.9 0.8 0.6 caught, 0.3 missed; ham 0.7 and 0.5 (>=) flagged.
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.5]


def brute_force_auc(labels, scores) -> float:
    """P(spam score > ham score) + 1/2 P(equal), over every (spam, ham) pair."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def random_case(rng: np.random.Generator, n: int, decimals: int | None) -> tuple[list, list]:
    """Random labels (both classes present) and scores that separate them somewhat."""
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1)
    if decimals is not None:  # coarse rounding makes many ties, within and across classes
        s = np.round(s, decimals)
    return y.tolist(), s.tolist()


# --------------------------------------------------------------------------- compute_metrics


def test_metrics_by_hand():
    m = compute_metrics(LABELS, SCORES, threshold=0.5)
    assert (m.tn, m.fp, m.fn, m.tp) == (4, 2, 1, 3)
    assert m.n == 10 and m.threshold == 0.5
    assert m.accuracy == pytest.approx(0.7)
    assert m.precision == pytest.approx(3 / 5)
    assert m.spam_recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.ham_fpr == pytest.approx(2 / 6)
    assert m.roc_auc == pytest.approx(20 / 24)


def test_score_equal_to_threshold_is_spam():
    m = compute_metrics([0, 1], [0.5, 0.5], threshold=0.5)
    assert (m.tn, m.fp, m.fn, m.tp) == (0, 1, 0, 1)


def test_all_ham_defines_zero_over_zero_as_zero():
    m = compute_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert (m.tn, m.fp, m.fn, m.tp) == (3, 0, 0, 0)
    assert m.accuracy == 1.0
    assert m.precision == 0.0  # no predicted spam
    assert m.spam_recall == 0.0  # no spam
    assert m.f1 == 0.0
    assert m.ham_fpr == 0.0
    assert m.roc_auc is None


def test_all_spam():
    m = compute_metrics([1, 1], [0.9, 0.2])
    assert (m.tn, m.fp, m.fn, m.tp) == (0, 0, 1, 1)
    assert m.ham_fpr == 0.0  # no ham
    assert m.precision == 1.0 and m.spam_recall == 0.5
    assert m.roc_auc is None


def test_all_scores_equal():
    m = compute_metrics([0, 1, 0, 1], [0.3] * 4, threshold=0.5)
    assert (m.tn, m.fp, m.fn, m.tp) == (2, 0, 2, 0)
    assert m.roc_auc == 0.5


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.5], "length"),
        ([0, 2], [0.1, 0.2], "0 \\(ham\\) or 1"),
        ([0, 1], [0.1, float("nan")], "finite"),
    ],
)
def test_invalid_input_raises(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(labels, scores)


def test_empty_input_is_a_defined_result():
    m = compute_metrics([], [])
    assert (m.n, m.tn, m.fp, m.fn, m.tp) == (0, 0, 0, 0, 0)
    assert (m.accuracy, m.precision, m.spam_recall, m.f1, m.ham_fpr) == (0.0,) * 5
    assert m.roc_auc is None and roc_auc([], []) is None
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([], [])
    with pytest.raises(ValueError, match="no validation examples"):
        choose_threshold([], [], 0.01)


def test_to_dict_is_json_ready_and_round_trips():
    m = compute_metrics(np.array(LABELS), np.array(SCORES, dtype=np.float32))
    d = json.loads(json.dumps(m.to_dict()))
    assert d["confusion"] == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    assert d["spam_recall"] == pytest.approx(0.75)
    assert Metrics.from_dict(d) == m
    assert json.loads(json.dumps(compute_metrics([0], [0.1]).to_dict()))["roc_auc"] is None


# --------------------------------------------------------------------------- ROC / AUC


def test_roc_curve_one_point_per_distinct_score():
    fpr, tpr, thr = roc_curve([0, 1, 0, 1, 1], [0.2, 0.8, 0.8, 0.5, 0.2])
    assert thr[0] == math.inf and thr[1:].tolist() == [0.8, 0.5, 0.2]
    assert fpr.tolist() == [0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 1], [0.2, 0.4])


@pytest.mark.parametrize("n", [2, 3, 10, 57, 400])
@pytest.mark.parametrize("decimals", [None, 1])
def test_auc_equals_brute_force_pairwise(n, decimals):
    rng = np.random.default_rng(1000 * n + (decimals or 0))
    for _ in range(5):
        labels, scores = random_case(rng, n, decimals)
        assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)
        fpr, tpr, thr = roc_curve(labels, scores)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert len(thr) == len(set(scores)) + 1


def test_auc_perfect_reversed_and_single_class():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([0, 0, 0], [0.1, 0.2, 0.3]) is None


# --------------------------------------------------------------------------- choose_threshold


def test_choose_threshold_default():
    assert choose_threshold(LABELS, SCORES) == 0.5
    assert choose_threshold(LABELS, SCORES, None) == 0.5


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.0, 0.75),  # 0.9, 0.8 (spam) flagged; the next score, 0.7, is ham
        (1 / 6, 0.55),  # one ham (0.7) allowed: down to spam 0.6, above ham 0.5
        (0.5, 0.25),  # three ham allowed: catches all spam (0.3) with FPR 3/6
        (1.0, 0.25),  # recall is already 1 at 0.25: flagging more ham gains nothing
    ],
)
def test_choose_threshold_by_hand(target, expected):
    assert choose_threshold(LABELS, SCORES, target) == pytest.approx(expected)


def brute_force_best(labels, scores, target) -> tuple[float, float]:
    """(best recall, its lowest FPR) over every threshold that can change a prediction."""
    candidates = sorted(set(scores)) + [max(scores) + 1]
    points = [compute_metrics(labels, scores, t) for t in candidates]
    feasible = [(m.spam_recall, -m.ham_fpr) for m in points if m.ham_fpr <= target]
    recall, neg_fpr = max(feasible)
    return recall, -neg_fpr


@pytest.mark.parametrize("n", [5, 30, 200])
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_choose_threshold_maximises_recall_under_fpr_bound(n, decimals):
    rng = np.random.default_rng(n + 7 * (decimals or 0))
    for _ in range(4):
        labels, scores = random_case(rng, n, decimals)
        for target in (0.0, 0.01, 0.05, 0.1, 0.25, 1.0):
            t = choose_threshold(labels, scores, target)
            m = compute_metrics(labels, scores, t)
            assert m.ham_fpr <= target
            assert (m.spam_recall, m.ham_fpr) == brute_force_best(labels, scores, target)
            # Midway between scores, not on one; except "flag everything" when a score is 0.
            assert t not in scores or t == min(scores) == 0.0


def test_choose_threshold_ends_of_the_range():
    # Nothing can be flagged (top score is ham): a threshold above every score.
    assert choose_threshold([0, 1], [0.8, 0.4], 0.0) == pytest.approx(0.9)
    t = choose_threshold([0, 1], [1.0, 0.4], 0.0)
    assert t > 1.0 and compute_metrics([0, 1], [1.0, 0.4], t).fp == 0
    # No ham: flag everything, halfway down to 0.
    assert choose_threshold([1, 1], [0.6, 0.2], 0.0) == pytest.approx(0.1)
    assert choose_threshold([1, 1], [0.6, 0.0], 0.0) == 0.0
    # No spam: recall is 0 everywhere, so flag nothing (lowest FPR).
    assert choose_threshold([0, 0], [0.6, 0.2], 1.0) == pytest.approx(0.8)


def test_choose_threshold_rejects_bad_target():
    with pytest.raises(ValueError, match="target_ham_fpr"):
        choose_threshold(LABELS, SCORES, 1.5)


# --------------------------------------------------------------------------- reports


def test_format_metrics_line():
    line = format_metrics_line("test", compute_metrics(LABELS, SCORES))
    assert line.startswith("test ")
    for part in ("n=10", "acc 70.00%", "spam-recall 75.00%", "ham-FPR 33.33%", "AUC 0.8333"):
        assert part in line
    assert "AUC n/a" in format_metrics_line("val", compute_metrics([0], [0.2]))


def test_write_report(tmp_path):
    reports = [
        SplitReport("val", compute_metrics(LABELS, SCORES), LABELS, SCORES),
        SplitReport("holdout", compute_metrics([0, 0, 0], [0.1, 0.7, 0.2]), [0, 0, 0], [0.1, 0.7, 0.2]),
        SplitReport("empty", compute_metrics([], []), [], []),
    ]
    history = {
        "epoch": [1, 2],
        "train_loss": [0.6931, 0.2],
        "val_loss": [0.65, 0.25],
        "train_acc": [0.5, 0.9],
        "val_acc": [0.55, 0.875],
        "seconds": [12.34, 11.0],
    }
    path = tmp_path / "model" / "report.md"
    write_report(
        path,
        title="filterd model v1",
        model_info={"version": "v1", "base": "gpt2", "trainable": "last-block", "threshold": 0.5, "note": "a|b"},
        reports=reports,
        history=history,
        plots={"loss": "plots/loss.png", "roc": "plots/roc.png"},
    )
    text = path.read_text()
    assert text.startswith("# filterd model v1\n")
    assert "| version | v1 |" in text and "| trainable | last-block |" in text
    assert "| note | a\\|b |" in text  # a pipe in a value must not break the table
    assert "| val | 10 | 70.00% | 60.00% | 75.00% | 66.67% | 33.33% | 0.8333 |" in text
    assert "| holdout | 3 | 66.67% | 0.00% | 0.00% | 0.00% | 33.33% | n/a |" in text
    # Confusion matrices: rows actual ham / spam, columns predicted ham / spam.
    assert "| **actual ham** | 4 | 2 |" in text and "| **actual spam** | 1 | 3 |" in text
    assert "| empty | 0 | 0.00% | 0.00% | 0.00% | 0.00% | 0.00% | n/a |" in text
    assert "| **actual ham** | 2 | 1 |" in text and "| **actual spam** | 0 | 0 |" in text
    assert "| 1 | 0.6931 | 0.6500 | 50.00% | 55.00% | 12.3 |" in text
    assert "| 2 | 0.2000 | 0.2500 | 90.00% | 87.50% | 11.0 |" in text
    assert "![loss](plots/loss.png)" in text and "![roc](plots/roc.png)" in text


def test_write_report_minimal(tmp_path):
    path = tmp_path / "report.md"
    m = compute_metrics(LABELS, SCORES)
    write_report(path, title="t", model_info={}, reports=[SplitReport("test", m, LABELS, SCORES)])
    text = path.read_text()
    assert "| test | 10 |" in text
    assert "Training history" not in text and "![" not in text


# -- spam-track measures --------------------------------------------------------------------------
from trainer.evaluate import bootstrap_ci, ham_fpr_at_recall, lam_pct, roca_pct  # noqa: E402


def test_ham_fpr_at_recall():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.2, 0.75, 0.3, 0.1, 0.05]
    assert ham_fpr_at_recall(labels, scores, 0.5) == 0.0  # cut 0.8: no ham above
    assert ham_fpr_at_recall(labels, scores, 0.75) == 0.25  # cut 0.7: the 0.75 ham
    assert ham_fpr_at_recall(labels, scores, 1.0) == 0.5  # cut 0.2: 0.75 and 0.3
    assert ham_fpr_at_recall([1, 1], [0.5, 0.6], 0.9) is None


def test_roca_and_lam():
    assert roca_pct([0, 1], [0.1, 0.9]) == 0.0
    assert roca_pct([0, 1], [0.9, 0.1]) == 100.0
    # 1 of 10 ham and 1 of 10 spam wrong: lam is 10%, as for equal error rates
    labels = [0] * 10 + [1] * 10
    scores = [0.9] + [0.1] * 9 + [0.1] + [0.9] * 9
    assert abs(lam_pct(labels, scores) - 10.0) < 1e-9
    # no errors: 0.5 counts -> 5%
    assert abs(lam_pct(labels, [0.1] * 10 + [0.9] * 10) - 5.0) < 1e-9


def test_bootstrap_ci_brackets_the_statistic():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1)
    acc = lambda y, s: float(np.mean((s >= 0.5) == y))  # noqa: E731
    lo, hi = bootstrap_ci(labels, scores, acc, n=300, seed=2)
    point = acc(labels, scores)
    assert lo < point < hi and hi - lo < 0.15
    assert bootstrap_ci([], [], acc) is None
