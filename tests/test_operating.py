"""Operating points (trainer/operating.py): thresholds that meet ham-FPR targets, and their check."""

from __future__ import annotations

import json
import random

import pytest

from filterd.errors import ModelError
from filterd.model.weights import ModelMeta
from trainer.operating import MIN_HAM_ABOVE, OperatingPoint, format_points, operating_points, split_points, threshold_for, wilson


def test_threshold_flags_at_most_the_target_share_of_ham() -> None:
    rng = random.Random(3)
    ham = [rng.random() ** 3 for _ in range(2000)]
    for target in (0.01, 0.005):
        t = threshold_for(ham, target)
        assert t is not None
        flagged = sum(s >= t for s in ham)
        assert flagged == int(target * len(ham))  # distinct scores: exactly the allowed number, not one fewer
        assert not any(t - 1e-12 <= s <= t + 1e-12 for s in ham)  # midway between two scores


def test_too_few_ham_is_said_not_guessed() -> None:
    ham = [i / 1000 for i in range(1000)]
    assert threshold_for(ham, 0.001) is None  # 1 ham above: one message's score is no estimate
    (point,) = operating_points(ham, [1, 0], [0.9, 0.1], targets=(0.001,))
    assert point.threshold is None and "needs at least 5,000" in point.reason
    assert "not estimated" in "\n".join(format_points([point]))
    assert threshold_for(ham, MIN_HAM_ABOVE / 1000) is not None


def test_tied_ham_scores_are_never_split() -> None:
    ham = [0.9] * 20 + [0.1] * 980  # 2% tie at 0.9: a 1% target cannot flag half of them
    t = threshold_for(ham, 0.01)
    assert t is not None and sum(s >= t for s in ham) == 0


def test_ham_at_one_cannot_be_cut_below_one() -> None:
    ham = [1.0] * 20 + [0.1] * 980
    assert threshold_for(ham, 0.01) is None
    (point,) = operating_points(ham, [1], [1.0], targets=(0.01,))
    assert point.threshold is None and "score 1.0" in point.reason


def test_wilson_interval() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 0) is None


def test_the_check_split_reports_recall_and_fpr() -> None:
    estimation = [i / 2000 for i in range(2000)]  # ham up to 0.9995: 1% -> between 0.9895 and 0.99
    labels = [1] * 10 + [0] * 10
    scores = [0.999] * 6 + [0.5] * 4 + [0.995] + [0.1] * 9
    (point,) = operating_points(estimation, labels, scores, targets=(0.01,))
    assert point.spam_recall == 0.6 and point.check_spam == 10
    assert point.check_ham_fpr == 0.1 and point.check_ham == 10
    assert point.spam_recall_ci is not None and point.spam_recall_ci[0] < 0.6 < point.spam_recall_ci[1]


def test_points_of_prepared_splits_use_unseen_ham_only() -> None:
    splits = {"train": ([0] * 5, [0.99] * 5), "val": ([0, 1], [0.2, 0.9]), "holdout": ([0] * 999, [0.3] * 999), "test": ([1, 0], [0.95, 0.05])}
    (point,) = split_points(splits, targets=(0.005,))
    assert point.estimated_on == 1000  # holdout + val ham; the train split's ham never counts
    assert split_points({"val": ([0], [0.1])}) == []  # no test split: nothing to check on


def test_points_travel_in_filterd_json() -> None:
    point = operating_points([i / 1000 for i in range(1000)], [1, 0], [0.999, 0.2], targets=(0.01,))[0]
    meta = ModelMeta.from_json(json.dumps({"format": "filterd-model/1", "version": "v1", "base": "random:tiny", "base_kind": "random",
                                           "config": {"n_embd": 64, "n_layer": 2, "n_head": 2}, "max_length": 8,
                                           "operating_points": [point.to_dict()]}), "t")  # fmt: skip
    assert OperatingPoint.from_dict(meta.operating_points[0]) == point
    with pytest.raises(ModelError, match="operating point threshold"):
        ModelMeta.from_json(json.dumps({"format": "filterd-model/1", "version": "v1", "base": "random:tiny", "base_kind": "random",
                                        "config": {"n_embd": 64, "n_layer": 2, "n_head": 2}, "max_length": 8,
                                        "operating_points": [{"threshold": 1.5}]}), "t")  # fmt: skip
