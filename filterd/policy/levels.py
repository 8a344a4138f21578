"""The words [policy] is written in, shared by the config (which checks the keys) and the decision
(which acts on them): the doors, the levels in order, what each door can carry out, the key of a
level, and how an allow/deny list entry is written. It imports nothing from filterd but the doors' names (filterd.sources), so
`filterd.config` reads [policy] without importing the decision code; see filterd/policy/decision.py
for what the levels mean.
"""

from __future__ import annotations

from typing import Mapping

from filterd.sources import SOURCES  # noqa: F401  (the doors: one home for every module)
LEVELS = ("tag", "subject", "quarantine", "discard", "reject")  # ordered: each at or above the one before
SOFT_REJECT = "soft-reject"
ACTIONS = ("pass", SOFT_REJECT, *LEVELS)  # every action a Decision can carry

# What each door can carry out. milter and http are the doors before the queue (being added).
CAN: Mapping[str, frozenset[str]] = {
    "smtp": frozenset(LEVELS),  # no soft reject: a 451 after the queue only makes Postfix retry the same mail
    "milter": frozenset((SOFT_REJECT, *LEVELS)),
    "http": frozenset((SOFT_REJECT, *LEVELS)),
    "redis": frozenset(("tag", "subject", "quarantine", "discard")),  # advice for the producer; nobody to refuse
}
OWN_ONLY: Mapping[str, frozenset[str]] = {"smtp": frozenset(("reject",))}  # taken only from the door's own section

Level = float | str  # a P(spam), "model" (the model's own threshold), "fpr:<share>" or "off"
FPR = "fpr:"  # "fpr:0.005": the threshold the model measured for flagging 0.5% of ham (its operating points)


def fpr_target(level: Level) -> float | None:
    """The ham-FPR target of a level written "fpr:0.005", else None."""
    return float(level[len(FPR) :]) if isinstance(level, str) and level.startswith(FPR) else None


def level_key(action: str) -> str:
    """The config key of a level: "soft-reject" -> "soft_reject_score"."""
    return action.replace("-", "_") + "_score"
