"""Markdown evaluation reports: a split's metrics line, report.md (model, metrics, confusion, training
history, plots) and the explained errors of `evaluate --explain`; escaped so no message text becomes
Markdown or HTML."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trainer.evaluate import Metrics


@dataclass
class SplitReport:
    """One evaluated split: its metrics plus the raw labels and scores (for plots)."""

    split: str
    metrics: Metrics
    labels: list[int]
    scores: list[float]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _auc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_metrics_line(split: str, m: Metrics) -> str:
    """One terminal line, e.g. ``test     n=300  acc 95.67%  ...  AUC 0.9911``."""
    # A split without spam (the ham holdout) has no recall, precision or F1 to speak of.
    spam_stats = m.tp + m.fn > 0

    def shown(x: float, defined: bool) -> str:
        return _pct(x) if defined else "n/a"

    return (
        f"{split:<7}  n={m.n}  acc {_pct(m.accuracy)}  precision {shown(m.precision, spam_stats)}  "
        f"spam-recall {shown(m.spam_recall, spam_stats)}  F1 {shown(m.f1, spam_stats)}  "
        f"ham-FPR {shown(m.ham_fpr, m.tn + m.fp > 0)}  AUC {_auc(m.roc_auc)}"
    )


def _cell(value: Any) -> str:
    """A Markdown table cell: short floats, JSON for containers, pipes escaped."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    elif value is None:
        text = "–"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _metrics_section(reports: list[SplitReport]) -> list[str]:
    header = ["split", "n", "accuracy", "precision", "spam recall", "F1", "ham FPR", "ROC AUC"]
    rows = [
        [
            r.split,
            str(r.metrics.n),
            _pct(r.metrics.accuracy),
            _pct(r.metrics.precision),
            _pct(r.metrics.spam_recall),
            _pct(r.metrics.f1),
            _pct(r.metrics.ham_fpr),
            _auc(r.metrics.roc_auc),
        ]
        for r in reports
    ]
    return ["## Metrics", "", *_table(header, rows), ""]


def _confusion_section(r: SplitReport) -> list[str]:
    m = r.metrics
    rows = [["**actual ham**", str(m.tn), str(m.fp)], ["**actual spam**", str(m.fn), str(m.tp)]]
    return [
        f"### Confusion matrix: {r.split} (threshold {m.threshold:.4f})",
        "",
        *_table(["", "predicted ham", "predicted spam"], rows),
        "",
    ]


def _history_section(history: dict[str, Any]) -> list[str]:
    """Per-epoch table; accuracies are fractions shown as percentages, missing values as '–'."""
    epochs = list(history.get("epoch", []))

    def col(key: str, fmt: Any) -> list[str]:
        values = list(history.get(key) or [])
        return [fmt(values[i]) if i < len(values) and values[i] is not None else "–" for i in range(len(epochs))]

    columns = [
        [str(e) for e in epochs],
        col("train_loss", lambda v: f"{v:.4f}"),
        col("val_loss", lambda v: f"{v:.4f}"),
        col("train_acc", _pct),
        col("val_acc", _pct),
        col("seconds", lambda v: f"{v:.1f}"),
    ]
    header = ["epoch", "train loss", "val loss", "train acc", "val acc", "seconds"]
    return ["## Training history", "", *_table(header, [list(r) for r in zip(*columns)]), ""]


_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")  # ASCII punctuation: CommonMark lets any of it be backslash-escaped
_MD_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def md_escape(text: str) -> str:
    """Text shown literally in Markdown (and in a table cell): punctuation escaped, controls and line breaks as U+FFFD."""
    return _MD_PUNCT.sub(r"\\\1", _MD_CONTROL.sub("\ufffd", text))


def errors_section(split: str, errors: Sequence[tuple[str, str, float, Any]]) -> list[str]:
    """False positives and false negatives of a split with their explanations (filterd.model.explain.Explanation).

    `errors`: (kind "fp"|"fn", message id, P(spam), explanation). Words are escaped: a message's text
    never becomes Markdown (links, HTML, tables) in the report."""

    def words(cs: Sequence[Any]) -> str:
        return ", ".join(f"{md_escape(c.word)} ({c.weight:+.3f})" for c in cs) or "–"

    lines = [f"## Errors explained: {split}", "",
             "Words that raised (+) and lowered (−) P(spam) most, with their weight in spam log-odds "
             f"(method: {errors[0][3].method if errors else 'n/a'}; `filterd-trainer evaluate --explain`).", ""]  # fmt: skip
    for kind, title in (("fp", "False positives (ham scored spam)"), ("fn", "False negatives (spam scored ham)")):
        rows = [[md_escape(i), f"{score:.4f}", words(e.raising), words(e.lowering)] for k, i, score, e in errors if k == kind]
        lines += [f"### {title}: {len(rows)}", ""]
        if rows:
            lines += [*_table(["id", "P(spam)", "raised by", "lowered by"], rows), ""]
    return lines


def write_report(
    path: Path,
    *,
    title: str,
    model_info: dict[str, Any],
    reports: list[SplitReport],
    history: dict[str, Any] | None = None,
    plots: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Write a Markdown evaluation report (`extra`: more Markdown lines at the end, e.g. `errors_section`).

    ``plots`` maps a caption to an image path relative to the report (e.g.
    ``{"loss": "plots/loss.png"}``); ``history`` uses the keys of `trainer.plots.plot_history`
    plus an optional per-epoch ``seconds``.
    """
    lines = [f"# {title}", ""]
    if model_info:
        rows = [[_cell(k), _cell(v)] for k, v in model_info.items()]
        lines += ["## Model", "", *_table(["key", "value"], rows), ""]
    if reports:
        lines += _metrics_section(reports)
        for r in reports:
            lines += _confusion_section(r)
    if history and history.get("epoch"):
        lines += _history_section(history)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({rel})\n" for name, rel in plots.items()]
    lines += list(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
