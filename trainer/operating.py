"""Operating points: the P(spam) thresholds that meet ham false-positive targets, and what each costs in spam.

An operator chooses a level by the good mail it costs. For each target (1%, 0.5%, 0.1% of ham by
default) the threshold is set on natural-prior ham the model was not trained on (a fit's holdout and
validation ham; the balancing leaves the holdout out, so it is ham at the rate it arrives) and then
checked on a split nobody chose anything on (the test split): its spam recall and its ham FPR there,
each with a 95% Wilson interval.

A target is estimated only where the ham is plentiful enough: at least `MIN_HAM_ABOVE` ham must lie
above its threshold (n x target >= 5), so that the threshold is not one message's score. 0.1% needs
5,000 ham; with fewer, the point says so instead of printing a number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

TARGETS = (0.01, 0.005, 0.001)
MIN_HAM_ABOVE = 5
Z95 = 1.959964


@dataclass(frozen=True)
class OperatingPoint:
    """One ham-FPR target: its threshold (None where the ham is too few, `reason` says why) and its check."""

    ham_fpr_target: float
    threshold: float | None
    estimated_on: int  # ham messages the threshold was set on
    reason: str = ""
    spam_recall: float | None = None  # on the check split's spam
    spam_recall_ci: tuple[float, float] | None = None
    check_spam: int = 0
    check_ham_fpr: float | None = None  # on the check split's ham
    check_ham_fpr_ci: tuple[float, float] | None = None
    check_ham: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("spam_recall_ci", "check_ham_fpr_ci"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials (None when n is 0)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_for(ham_scores: Sequence[float], target: float) -> float | None:
    """The lowest threshold ("spam when P >= t") flagging at most `target` of these ham; None when too few ham,
    or when no threshold within [0, 1] can (more than `target` of them score exactly 1.0)."""
    n = len(ham_scores)
    allowed = math.floor(target * n + 1e-9)  # ham that may score at or above the threshold
    if allowed < MIN_HAM_ABOVE:
        return None
    ranked = sorted(ham_scores, reverse=True)
    below = ranked[allowed]  # the highest ham score that must stay under the threshold
    above = next((s for s in reversed(ranked[:allowed]) if s > below), None)  # the lowest ham score allowed over it
    if above is None:  # every allowed ham ties with `below`: none of them can be flagged
        return math.nextafter(below, math.inf) if below < 1.0 else None
    return (below + above) / 2  # midway: a check score equal to a ham score here is not on a knife edge


def operating_points(estimation_ham: Sequence[float], check_labels: Sequence[int], check_scores: Sequence[float],
                     targets: Sequence[float] = TARGETS) -> list[OperatingPoint]:  # fmt: skip
    """A point per target: the threshold set on `estimation_ham`, checked on (labels, scores) (1 = spam)."""
    spam = [s for y, s in zip(check_labels, check_scores) if y == 1]
    ham = [s for y, s in zip(check_labels, check_scores) if y == 0]
    points = []
    for target in targets:
        t = threshold_for(estimation_ham, target)
        if t is None:
            need = math.ceil(MIN_HAM_ABOVE / target)
            why = (f"{len(estimation_ham):,} ham: a {target:.1%} target needs at least {need:,}" if len(estimation_ham) < need
                   else f"more than {target:.1%} of the {len(estimation_ham):,} ham score 1.0: no threshold in [0, 1] meets it")  # fmt: skip
            points.append(OperatingPoint(target, None, len(estimation_ham), why))
            continue
        caught = sum(s >= t for s in spam)
        flagged = sum(s >= t for s in ham)
        points.append(OperatingPoint(
            target, t, len(estimation_ham),
            spam_recall=caught / len(spam) if spam else None, spam_recall_ci=wilson(caught, len(spam)), check_spam=len(spam),
            check_ham_fpr=flagged / len(ham) if ham else None, check_ham_fpr_ci=wilson(flagged, len(ham)), check_ham=len(ham),
        ))  # fmt: skip
    return points


def split_points(splits: Mapping[str, tuple[Sequence[int], Sequence[float]]], targets: Sequence[float] = TARGETS) -> list[OperatingPoint]:
    """A prepared data set's points: thresholds set on the ham of its holdout and val splits (never trained on;
    the holdout keeps ham's natural rate), checked on its test split. [] without test or such ham."""
    ham = [s for name in ("holdout", "val") if name in splits for y, s in zip(*splits[name]) if y == 0]
    if "test" not in splits or not ham:
        return []
    return operating_points(ham, *splits["test"], targets=targets)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" ({100 * ci[0]:.2f}-{100 * ci[1]:.2f})"


def format_points(points: Sequence[OperatingPoint], check: str = "test") -> list[str]:
    """A Markdown table: target, threshold, the check split's spam recall and ham FPR with 95% intervals."""
    rows = [f"| ham FPR target | threshold P(spam) >= | set on ham | {check} spam recall (95% CI) | {check} ham FPR (95% CI) |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in points:
        if p.threshold is None:
            rows.append(f"| {p.ham_fpr_target:.1%} | not estimated | {p.estimated_on:,} | {p.reason} | |")
            continue
        rows.append(f"| {p.ham_fpr_target:.1%} | {p.threshold:.6f} | {p.estimated_on:,} | "
                    f"{_pct(p.spam_recall)}{_ci(p.spam_recall_ci)} of {p.check_spam:,} | "
                    f"{_pct(p.check_ham_fpr)}{_ci(p.check_ham_fpr_ci)} of {p.check_ham:,} |")  # fmt: skip
    return rows
