"""The promotion rule of a refit: a candidate replaces the live model only if it is no worse where it counts."""

from __future__ import annotations

from trainer.evaluate import Metrics

EPS = 1e-9  # accuracies are ratios of counts: compare without float noise


def gate(
    candidate: dict[str, Metrics],
    current: dict[str, Metrics],
    max_regression: float,
    max_ham_fpr: float,
    *,
    live: bool = True,
    golden_tolerance: float | None = None,
) -> tuple[bool, str]:
    """Promote iff, on every evaluated set, the candidate is no worse than the current model.

    No worse: accuracy >= current - max_regression, and ham FPR <= max(max_ham_fpr, current's ham FPR):
    under the absolute bound the candidate may use the room up to it, over it the candidate must not
    be higher than the live model. So a site whose live model is over `max_ham_fpr` still gets a better
    candidate (the bound is an alert then, see `over_bound`) instead of staying stuck on the worse model.
    `live=False` (the current model is only the base a first model starts from, nothing serves it):
    the absolute bound is the gate, a first model must pass it.
    On the "golden" set, whose labels are trusted, `golden_tolerance` (when given) also caps how much
    accuracy may drop and ham FPR may rise against the current model: poisoned labels show there first.
    """
    for name, cand in candidate.items():
        if name not in current:
            continue
        cur = current[name]
        if cand.accuracy < cur.accuracy - max_regression - EPS:
            return False, f"{name} accuracy {cand.accuracy:.2%} < current {cur.accuracy:.2%} - {max_regression:.2%}"
        if cand.ham_fpr > max_ham_fpr + EPS and (not live or cand.ham_fpr > cur.ham_fpr + EPS):
            if not live:
                return False, f"{name} ham-FPR {cand.ham_fpr:.2%} > max {max_ham_fpr:.2%} (no live model yet)"
            return False, f"{name} ham-FPR {cand.ham_fpr:.2%} > max {max_ham_fpr:.2%} and > current {cur.ham_fpr:.2%}"
        if name == "golden" and golden_tolerance is not None:
            if cand.accuracy < cur.accuracy - golden_tolerance - EPS:
                return False, f"golden accuracy {cand.accuracy:.2%} < current {cur.accuracy:.2%} - {golden_tolerance:.2%}"
            if cand.ham_fpr > cur.ham_fpr + golden_tolerance + EPS:
                return False, f"golden ham-FPR {cand.ham_fpr:.2%} > current {cur.ham_fpr:.2%} + {golden_tolerance:.2%}"
    shown = ", ".join(
        f"{n} acc {candidate[n].accuracy:.2%} (current {current[n].accuracy:.2%}) ham-FPR {candidate[n].ham_fpr:.2%}"
        for n in candidate
        if n in current
    )
    return True, shown


def over_bound(metrics: dict[str, Metrics], max_ham_fpr: float) -> list[str]:
    """The evaluated sets on which a model's ham FPR exceeds the absolute bound (an alert, not a gate, for a live model)."""
    return [name for name, m in metrics.items() if m.ham_fpr > max_ham_fpr + EPS]


# -- the data ----------------------------------------------------------------------------------
