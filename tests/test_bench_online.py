"""bench/online.py's protocol arithmetic: which model scores which message, and the measures it reports."""

from __future__ import annotations

import numpy as np

from bench.online import curve, measures, segments


def test_segments_switch_models_when_labels_are_back():
    # refit every 3 labels, labels back at once: models change after messages 3 and 6
    assert segments(8, 3, 0) == [(0, 3), (3, 6), (6, 8)]
    # labels two messages late: the label of message 2 is back after message 4 is scored
    assert segments(8, 3, 2) == [(0, 5), (5, 8)]
    assert segments(3, 5, 0) == [(0, 3)]
    # every message is scored exactly once, in order
    cuts = segments(1000, 77, 13)
    assert cuts[0][0] == 0 and cuts[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_measures_and_curve():
    labels = [0] * 50 + [1] * 50
    scores = [0.1] * 45 + [0.9] * 5 + [0.8] * 50  # 5 ham lost, no spam missed
    m = measures(labels, scores, 0.5, n_boot=100, seed=1)
    assert m["accuracy"] == 0.95 and m["ham_fpr"] == 0.10 and m["spam_recall"] == 1.0
    lo, hi = m["accuracy_ci95"]
    assert lo <= 0.95 <= hi
    assert m["ham_fpr_at_95_recall"] == 0.10  # the 0.9-scored ham sit above every spam
    c = curve(labels, scores, 0.5, 25)
    assert [p["end"] for p in c] == [25, 50, 75, 100]
    assert [p["accuracy"] for p in c] == [1.0, 0.8, 1.0, 1.0]
    assert c[2]["ham_fpr"] is None and np.isclose(c[1]["ham_fpr"], 0.2)
