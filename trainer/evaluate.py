"""Classification metrics, ROC analysis and threshold selection (the Markdown reports are trainer/report.py).

Pure metric code: it sees only labels and scores, never a model, so it is cheap to test and
shared by `filterd-trainer evaluate`, `fit` and the refit gate.

Conventions
-----------
* Labels: 1 = spam (the positive class), 0 = ham. Scores: P(spam), normally in [0, 1] (any
  finite number works; only `choose_threshold` uses the [0, 1] range, to bound its result).
* A message is predicted spam iff ``score >= threshold``.
* 0/0 ratios are defined as 0.0 (the convention of scikit-learn's ``zero_division=0``):
  precision with no predicted spam, spam recall with no spam, F1 when precision + recall = 0,
  ham FPR with no ham, and accuracy of an empty split. ROC AUC is ``None`` unless both classes
  are present (it is undefined, and 0.0 or 0.5 would read as a real, bad result).
* Empty input is a defined result, not an error: ``compute_metrics([], [])`` gives n=0, zero
  counts and rates, AUC None. `prepare --balance none` writes an empty holdout.csv, and a report
  row "n=0" says more than a crashed evaluation. Only `roc_curve` and a `choose_threshold` with a
  target, which cannot answer without data, raise ``ValueError``.
* Other bad input raises ``ValueError``: lengths differ, a label not in {0, 1}, a NaN or
  infinite score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------- input checks


def _as_arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int64 labels in {0,1}, float64 finite scores)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError("labels and scores must be one-dimensional")
    if len(y) != len(s):
        raise ValueError(f"labels and scores differ in length ({len(y)} != {len(s)})")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (ham) or 1 (spam)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers (found NaN or infinity)")
    return y.astype(np.int64), s


def _ratio(num: int, den: int) -> float:
    """num/den with 0/0 defined as 0.0 (see module docstring)."""
    return num / den if den else 0.0


# --------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Binary classification metrics at one threshold; rates are fractions in [0, 1]."""

    n: int
    threshold: float
    accuracy: float
    precision: float
    spam_recall: float
    f1: float
    ham_fpr: float
    roc_auc: float | None  # None unless both classes are present
    tn: int
    fp: int
    fn: int
    tp: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field plus a nested ``confusion`` {tn, fp, fn, tp}."""
        d = asdict(self)
        d["confusion"] = {"tn": self.tn, "fp": self.fp, "fn": self.fn, "tp": self.tp}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        """Inverse of `to_dict` (e.g. metrics read back from a model's filterd.json)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def compute_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> Metrics:
    """Metrics of the rule "spam iff score >= threshold"; ROC AUC is threshold-free."""
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    y, s = _as_arrays(labels, scores)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(
        n=len(y),
        threshold=float(threshold),
        accuracy=_ratio(tp + tn, len(y)),
        precision=precision,
        spam_recall=recall,
        f1=f1,
        ham_fpr=_ratio(fp, fp + tn),
        roc_auc=roc_auc(y, s),
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )


# --------------------------------------------------------------------------- ROC


def _cuts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in descending order, with the cumulative (tp, fp) of "score >= that score".

    Tied scores form one group, so each distinct score is one operating point: a threshold can't
    separate messages with equal scores.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    return s_sorted[last_of_group], tps, fps


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds), one per distinct score, from (0, 0) to (1, 1).

    ``thresholds[i]`` is the threshold giving point i under "score >= threshold"; the first is
    ``inf`` (nothing predicted spam). Raises ValueError unless both classes are present.
    """
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC curve needs both classes (spam and ham) in the labels")
    thresholds, tps, fps = _cuts(y, s)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve, or None unless both classes are present.

    Trapezoids over the tie-grouped curve give each tied (spam, ham) pair half credit, so this
    equals the Mann-Whitney U statistic / (n_spam * n_ham).
    """
    y, s = _as_arrays(labels, scores)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


# --------------------------------------------------------------------------- spam-track measures


def accuracy_at(labels: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Accuracy of "spam iff score >= threshold" (0.0 for no messages): cheap enough to be a bootstrap statistic."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return float(np.mean((s >= threshold) == (y == 1))) if len(y) else 0.0


def ham_fpr_at(labels: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float | None:
    """Share of ham scored at or above `threshold` (None without ham, so a bootstrap skips that resample)."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return float(np.mean(s[y == 0] >= threshold)) if np.any(y == 0) else None


def spam_recall_at(labels: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float | None:
    """Share of spam scored at or above `threshold` (None without spam)."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return float(np.mean(s[y == 1] >= threshold)) if np.any(y == 1) else None


def ham_fpr_at_recall(labels: Sequence[int], scores: Sequence[float], recall: float) -> float | None:
    """The lowest ham FPR of any threshold that keeps at least `recall` of the spam (None without both classes).

    The operating point a spam filter is tuned to: "at 99% spam caught, how much ham is lost?".
    Ties count against the filter: every ham scored at or above the cut is a false positive.
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be within (0, 1], got {recall}")
    y, s = _as_arrays(labels, scores)
    spam, ham = s[y == 1], s[y == 0]
    if len(spam) == 0 or len(ham) == 0:
        return None
    k = math.ceil(recall * len(spam) - 1e-9)  # spam that must score at or above the cut
    cut = np.sort(spam)[::-1][k - 1]
    return float(np.mean(ham >= cut))


def roca_pct(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """(1 - ROC AUC) in percent, the TREC spam track's headline measure (lower is better)."""
    auc = roc_auc(labels, scores)
    return None if auc is None else 100.0 * (1.0 - auc)


def lam_pct(labels: Sequence[int], scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float | None:
    """Logistic average misclassification in percent (TREC): logit^-1 of the mean logit of the ham and spam error rates.

    A zero error count is taken as 0.5 (as the TREC tools do), so a perfect class does not make it 0 or undefined.
    """
    y, s = _as_arrays(labels, scores)
    n_spam, n_ham = int(y.sum()), int(len(y) - y.sum())
    if n_spam == 0 or n_ham == 0:
        return None
    pred = s >= threshold
    ham_err = max(int(np.sum(pred & (y == 0))), 0.5) / n_ham
    spam_err = max(int(np.sum(~pred & (y == 1))), 0.5) / n_spam

    def logit(p: float) -> float:
        p = min(max(p, 1e-12), 1 - 1e-12)
        return math.log(p / (1 - p))

    z = (logit(ham_err) + logit(spam_err)) / 2
    return 100.0 / (1.0 + math.exp(-z))


def bootstrap_ci(
    labels: Sequence[int],
    scores: Sequence[float],
    statistic: Any,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(labels, scores)` over messages resampled with replacement.

    Resamples where the statistic is undefined (None, e.g. one class drawn) are skipped; None if all are.
    """
    y, s = _as_arrays(labels, scores)
    if len(y) == 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        v = statistic(y[idx], s[idx])
        if v is not None:
            values.append(float(v))
    if not values:
        return None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- threshold


def choose_threshold(labels: Sequence[int], scores: Sequence[float], target_ham_fpr: float | None = None) -> float:
    """Pick a decision threshold on validation data.

    ``target_ham_fpr=None`` returns 0.5. Otherwise, among the operating points of "score >= t"
    (one per distinct score, plus "nothing is spam"), keep those with ham FPR <= target, take the
    one with the highest spam recall and, on a recall tie, the lowest FPR (i.e. the highest such
    threshold: lowering it further would only flag more ham). The returned value lies strictly
    between the lowest score flagged and the highest score not flagged (their midpoint), so a
    test score equal to a validation score is not on a knife edge. At the ends the [0, 1] score
    range bounds the midpoint: nothing flagged gives (max score + 1) / 2, or the next float above
    the max score when that is >= 1.0; everything flagged gives min score / 2, or the min score
    itself when it is <= 0.
    """
    if target_ham_fpr is None:
        return DEFAULT_THRESHOLD
    if not 0.0 <= target_ham_fpr <= 1.0:
        raise ValueError(f"target_ham_fpr must be in [0, 1], got {target_ham_fpr}")
    y, s = _as_arrays(labels, scores)
    if len(y) == 0:
        raise ValueError("no validation examples to choose a threshold from")
    n_neg = int(np.sum(y == 0))
    distinct, tps, fps = _cuts(y, s)
    # Point 0 flags nothing; point i (1..k) flags every score >= distinct[i-1].
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    fpr = np.array([_ratio(int(f), n_neg) for f in fps])  # same arithmetic as Metrics.ham_fpr
    feasible = fpr <= target_ham_fpr  # never empty: point 0 has FPR 0
    best_tp = tps[feasible].max()
    i = int(np.flatnonzero(feasible & (tps == best_tp))[0])  # first = fewest false positives
    return _midpoint_threshold(distinct, i)


def _midpoint_threshold(distinct: np.ndarray, i: int) -> float:
    """A threshold flagging exactly distinct[:i] (descending scores), midway into the gap below."""
    if i == 0:  # flag nothing
        top = float(distinct[0])
        mid = (top + 1.0) / 2
        return mid if mid > top else float(np.nextafter(top, np.inf))
    flagged = float(distinct[i - 1])
    if i == len(distinct):  # flag everything
        return flagged / 2 if flagged > 0.0 else flagged
    unflagged = float(distinct[i])
    mid = (flagged + unflagged) / 2
    # Adjacent floats can round the midpoint onto the unflagged score; fall back to the boundary.
    return mid if unflagged < mid <= flagged else flagged
