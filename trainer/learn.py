"""`filterd-trainer learn`: feed labelled mail to the label store, like SpamAssassin's sa-learn.

Users point it at whatever their mail client or server keeps: a single message file, an mbox, a
Maildir, or a directory tree of message files (the SpamAssassin corpus layout), read by the rules of
trainer.mailbox (those `prepare` reads a corpus by). The text stored
is what the classifier sees (`filterd.mail.text.extract_text`), so a message learnt here and the same
message later scored by the daemon are read the same way. Directories are streamed and written
in chunks of `CHUNK` messages, so a corpus of any size needs little memory and an interrupted run
keeps what it committed (re-running is harmless: the store is keyed by the text).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filterd.cli import chunks
from filterd.errors import DataError
from filterd.mail.text import extract_text

from filterd.store.labels import AddResult, LabelStore, NewLabel, check_label
from trainer.mailbox import OnError, iter_messages

log = logging.getLogger("filterd.trainer")

CHUNK = 500  # messages per store transaction


@dataclass
class LearnReport:
    label: str
    added: int = 0  # new messages
    relabelled: int = 0  # known messages whose label flipped to `label`
    unchanged: int = 0  # known messages that already had `label` (including duplicates within this run)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    @property
    def messages(self) -> int:
        return self.added + self.relabelled + self.unchanged + len(self.skipped)

    def count(self, result: AddResult) -> None:
        if result.new:
            self.added += 1
        elif result.flipped:
            self.relabelled += 1
        else:
            self.unchanged += 1

    def merge(self, other: LearnReport) -> None:
        self.added += other.added
        self.relabelled += other.relabelled
        self.unchanged += other.unchanged
        self.skipped += other.skipped

    def summary(self) -> str:
        return (f"{self.label}: {self.messages} messages: {self.added} added, {self.relabelled} relabelled, "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped")  # fmt: skip


# --------------------------------------------------------------------------- storing them


def learn(store: LabelStore, paths: Sequence[Path | str], label: str, source: str = "learn") -> LearnReport:
    """Store every message under `paths` with `label`; unreadable files and messages without text are skipped."""
    check_label(label)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:  # a typo on the command line: say so before writing anything
        raise DataError(f"{missing[0]}: no such file or directory")
    report = LearnReport(label)

    def skip(where: str, reason: str) -> None:
        log.warning("learn: skipped %s: %s", where, reason)
        report.skipped.append((where, reason))

    for chunk in chunks(_texts(paths, skip), CHUNK):
        for result in store.add_many(NewLabel(text, label, source) for text in chunk):
            report.count(result)
    log.info("learn: %s", report.summary())
    return report


def _texts(paths: Sequence[Path | str], skip: OnError) -> Iterator[str]:
    for path in paths:
        for where, raw in iter_messages(Path(path), skip):
            text = extract_text(raw)
            if text.strip():
                yield text
            else:
                skip(where, "no text (empty after extracting subject and body)")

            chunk = []
    if chunk:
        yield chunk
