"""`filterd-trainer learn`: feed labelled mail to the label store, like SpamAssassin's sa-learn.

Users point it at whatever their mail client or server keeps: a single message file, an mbox, a
Maildir, or a directory tree of message files (the SpamAssassin corpus layout). The text stored
is what the classifier sees (`filterd.mail.text.extract_text`), so a message learnt here and the same
message later scored by the daemon are read the same way. Directories are streamed and written
in chunks of `CHUNK` messages, so a corpus of any size needs little memory and an interrupted run
keeps what it committed (re-running is harmless: the store is keyed by the text).
"""

from __future__ import annotations

import logging
import mailbox
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filterd.cli import chunks
from filterd.errors import DataError
from filterd.mail.text import extract_text

from filterd.store.labels import AddResult, LabelStore, NewLabel, check_label

log = logging.getLogger("filterd.trainer")

CHUNK = 500  # messages per store transaction
# Not messages: the SpamAssassin corpus tarballs ship a `cmds` file (the renames) in each folder;
# the shared copy keeps it as `_meta/spam_2.cmds`.
_NOT_MESSAGES = frozenset({"cmds"})

OnError = Callable[[str, str], None]  # (where, reason)


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


# --------------------------------------------------------------------------- finding messages


def _raise(where: str, reason: str) -> None:
    raise DataError(f"{where}: {reason}")


def iter_messages(path: Path, on_error: OnError = _raise) -> Iterator[tuple[str, bytes]]:
    """(where, raw bytes) of every message under `path`, in a stable order.

    - a file: one raw RFC 822 message, or an mbox when its first line starts with "From "
      (members are `FILE#0`, `FILE#1`, ..., or just `FILE` for a one-message mbox such as a
      SpamAssassin corpus file; the "From " line itself is not part of a message);
    - a Maildir (a directory with cur/ and new/): the files in cur/ then new/ (tmp/ holds
      deliveries in progress);
    - any other directory: its entries, sorted by name and recursively, each read as above;
      hidden files and directories, SpamAssassin `cmds` files and symlinked directories are skipped.

    A file that cannot be read is passed to `on_error(where, reason)` (default: raise DataError).
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_dir(path, on_error)
    elif path.exists():
        yield from _iter_file(path, on_error)
    else:
        on_error(str(path), "no such file or directory")


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _iter_dir(path: Path, on_error: OnError) -> Iterator[tuple[str, bytes]]:
    if is_maildir(path):
        for sub in ("cur", "new"):
            for f in _listing(path / sub, on_error):
                if _is_message_file(f):
                    yield from _read_one(f, on_error)  # Maildir files are single messages, never mboxes
        return
    for entry in _listing(path, on_error):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not entry.is_symlink():  # a link back up would loop forever
                yield from _iter_dir(entry, on_error)
        elif _is_message_file(entry):
            yield from _iter_file(entry, on_error)


def _listing(path: Path, on_error: OnError) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as e:
        on_error(str(path), f"cannot list: {e.strerror or e}")
        return []


def _is_message_file(path: Path) -> bool:
    name = path.name
    return not name.startswith(".") and name not in _NOT_MESSAGES and not name.endswith(".cmds") and path.is_file()


def _iter_file(path: Path, on_error: OnError) -> Iterator[tuple[str, bytes]]:
    try:
        with open(path, "rb") as f:
            head = f.read(5)
    except OSError as e:
        on_error(str(path), f"cannot read: {e.strerror or e}")
        return
    if head == b"From ":
        yield from _iter_mbox(path, on_error)
    else:
        yield from _read_one(path, on_error)


def _read_one(path: Path, on_error: OnError) -> Iterator[tuple[str, bytes]]:
    try:
        yield str(path), path.read_bytes()
    except OSError as e:
        on_error(str(path), f"cannot read: {e.strerror or e}")


def _iter_mbox(path: Path, on_error: OnError) -> Iterator[tuple[str, bytes]]:
    """Members one at a time: mailbox indexes the file's "From " lines, then reads each member on demand."""
    try:
        box = mailbox.mbox(path, create=False)
    except (OSError, mailbox.Error) as e:
        on_error(str(path), f"cannot read mbox: {e}")
        return
    try:
        keys = box.keys()
        for i, key in enumerate(keys):
            yield (f"{path}#{i}" if len(keys) > 1 else str(path)), box.get_bytes(key)
    except (OSError, mailbox.Error) as e:
        on_error(str(path), f"cannot read mbox: {e}")
    finally:
        box.close()


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
