"""The one mailbox reader: every raw message under a path, for `prepare`, `learn` and `pretrain --mail`.

The rules, one set for every caller (they follow sa-learn's habits):

- A file is one message, or an mbox when its first line starts with "From ". An mbox's members
  are split at From_ lines, "From <sender> <date>" with an asctime-style date (weekday, month, day,
  hh:mm[:ss], year), the line mbox writers put before each message. Other body lines that start
  with "From " stay in the message: writers escape them (">From "), but a file that never went
  through one (a SpamAssassin corpus file: one message after a From_ line) need not have. A member
  is the bytes after its From_ line, without the blank line that separates it from the next one
  (as Python's `mailbox.mbox` reads it); ">From " lines are left as they are.
- A directory holding `cur/` or `new/` is a Maildir: the files in cur/ and then new/, each one
  message (never an mbox). tmp/ holds deliveries in progress and is not read, nor is anything else
  in the Maildir (Maildir++ sub-folders are dot-directories, index files sit beside cur/).
- Any other directory: its entries in name order, sub-directories recursively (symlinked
  directories are not followed: a link back up would loop forever), each file read as above.
- Inside a directory these are not messages and are skipped without a word: names starting with
  "." (dotfiles: .DS_Store, .mh_sequences, Maildir++ folders) or "," (MH's deleted messages), the
  SpamAssassin corpus' `cmds` files (`cmds`, `spam_2.cmds`: the upstream renames), Cyrus' index
  files (`cyrus.header`, `cyrus.index`, ...), Thunderbird's `.msf` summaries, and anything that is
  not a regular file. A file named on its own is always read.
- A message over `max_bytes` (MAX_MESSAGE_BYTES, the SMTP door's default `max_message_bytes`:
  larger mail is refused there, so never scored) is skipped, as is anything that cannot be listed
  or read: both go to `on_error(where, reason)` (`where` is the file's path, `#i` for an mbox
  member; the reason starts with TOO_LARGE for the former), which raises DataError by default.
  With `clip=True` (pretraining, which wants the text of big mail too) a message over `max_bytes`
  is not skipped but cut to its first `max_bytes + 1` bytes, so the caller can tell; either way a
  big message never costs more memory than that.
- Nothing is de-duplicated here: `learn`'s store is keyed by the text, `prepare` counts duplicate
  texts in its manifest and keeps them.

Where a message came from: the file's path (relative to `root` when given, else as built from the
path passed in), with `#i` (from 0) for the members of an mbox that holds more than one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from filterd.errors import DataError

MAX_MESSAGE_BYTES = 25 * 1024 * 1024  # = [smtp] max_message_bytes' default
TOO_LARGE = "too large"  # how the reason for a message over MAX_MESSAGE_BYTES starts
_NOT_MESSAGES = frozenset({"cmds", "cyrus.header", "cyrus.index", "cyrus.cache", "cyrus.seen", "cyrus.squat"})
_NOT_MESSAGE_SUFFIXES = (".cmds", ".msf")
_FROM_LINE = re.compile(
    rb"From [^\r\n]*?\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)\w*,? +(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\w* +\d{1,2},? +"
    rb"\d{1,2}:\d\d(?::\d\d)?\b[^\r\n]*?\b\d{4}\b"
)
_CHUNK = 1 << 20  # lines are read in pieces of at most this much, so one huge line costs no more memory

OnError = Callable[[str, str], None]  # (where, reason)


def _raise(where: str, reason: str) -> None:
    raise DataError(f"{where}: {reason}")


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() or (path / "new").is_dir()


def skipped_name(name: str) -> bool:
    """A directory entry that is not a message (see the module docstring)."""
    return name.startswith((".", ",")) or name in _NOT_MESSAGES or name.endswith(_NOT_MESSAGE_SUFFIXES)


def iter_messages(
    path: Path,
    on_error: OnError = _raise,
    *,
    root: Path | None = None,
    max_bytes: int | None = None,
    clip: bool = False,
) -> Iterator[tuple[str, bytes]]:
    """(where, raw bytes) of every message under `path`, in a stable order, by the rules above.

    `max_bytes` None: MAX_MESSAGE_BYTES (looked up now, so tests can lower it)."""
    limit = _Limit(MAX_MESSAGE_BYTES if max_bytes is None else max_bytes, clip)
    for f, maildir_file in message_files(Path(path), on_error):
        where = f.relative_to(root).as_posix() if root is not None else str(f)
        yield from _read_file(f, where, on_error, limit, single=maildir_file)


@dataclass(frozen=True)
class _Limit:
    max_bytes: int
    clip: bool  # keep the first max_bytes + 1 bytes of a bigger message instead of skipping it

    def too_large(self, where: str, on_error: OnError) -> None:
        on_error(where, f"{TOO_LARGE} (over {self.max_bytes} bytes)")


def message_files(path: Path, on_error: OnError = _raise) -> Iterator[tuple[Path, bool]]:
    """(file, is a Maildir file) for every file `iter_messages` reads under `path`, in its order."""
    if path.is_dir():
        yield from _dir_files(path, on_error)
    elif path.exists():
        yield path, False
    else:
        on_error(str(path), "no such file or directory")


def _dir_files(path: Path, on_error: OnError) -> Iterator[tuple[Path, bool]]:
    if is_maildir(path):
        for sub in ("cur", "new"):
            if (path / sub).is_dir():
                yield from ((f, True) for f in _listing(path / sub, on_error) if not skipped_name(f.name) and f.is_file())
        return
    for entry in _listing(path, on_error):
        if skipped_name(entry.name):
            continue
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _dir_files(entry, on_error)
        elif entry.is_file():
            yield entry, False


def _listing(path: Path, on_error: OnError) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as e:
        on_error(str(path), f"cannot list: {e.strerror or e}")
        return []


def _read_file(path: Path, where: str, on_error: OnError, limit: _Limit, *, single: bool) -> Iterator[tuple[str, bytes]]:
    try:
        with open(path, "rb") as f:
            if single or f.read(5) != b"From ":
                f.seek(0)
                raw = f.read(limit.max_bytes + 1)
                if len(raw) > limit.max_bytes and not limit.clip:
                    limit.too_large(str(path), on_error)
                else:
                    yield where, raw
                return
            f.seek(0)
            yield from _mbox_members(f, where, str(path), on_error, limit)
    except OSError as e:
        on_error(str(path), f"cannot read: {e.strerror or e}")


def _mbox_members(f: BinaryIO, where: str, path: str, on_error: OnError, limit: _Limit) -> Iterator[tuple[str, bytes]]:
    """The members of an mbox (positioned at its first From_ line), `where#i`, or `where` alone when there is only one."""
    first: bytes | None = None
    n = 0
    for member in _split_mbox(f, limit):
        if n == 0:
            first = member
        else:
            if n == 1:
                yield from _member(f"{where}#0", first, f"{path}#0", on_error, limit)
            yield from _member(f"{where}#{n}", member, f"{path}#{n}", on_error, limit)
        n += 1
    if n == 1:  # an mbox of one message: a SpamAssassin corpus file, a message saved with its From_ line
        yield from _member(where, first, path, on_error, limit)


def _member(where: str, member: bytes | None, path: str, on_error: OnError, limit: _Limit) -> Iterator[tuple[str, bytes]]:
    if member is None:
        limit.too_large(path, on_error)
    else:
        yield where, member


def _split_mbox(f: BinaryIO, limit: _Limit) -> Iterator[bytes | None]:
    """Each member's bytes, or None for one over the limit (not kept in memory; clipped instead with `limit.clip`)."""
    parts: list[bytes] = []
    size = 0
    last_was_empty = False  # the previous whole line was empty: the blank line before a From_ line is not the message's
    at_line_start = True
    f.readline()  # the first From_ line

    def member() -> bytes | None:
        if size > limit.max_bytes:
            return b"".join(parts)[: limit.max_bytes + 1] if limit.clip else None
        data = b"".join(parts)
        return data[:-1] if last_was_empty else data

    while piece := f.readline(_CHUNK):
        if at_line_start and piece.startswith(b"From ") and _FROM_LINE.match(piece):
            yield member()
            parts, size, last_was_empty = [], 0, False
            while not piece.endswith(b"\n") and (piece := f.readline(_CHUNK)):  # the rest of a long From_ line
                pass
            continue
        last_was_empty = at_line_start and piece == b"\n"
        at_line_start = piece.endswith(b"\n")
        if size <= limit.max_bytes:  # past the limit nothing more is kept (a clipped member keeps what it has)
            parts.append(piece)
        elif not limit.clip:
            parts = []
        size += len(piece)
    yield member()
