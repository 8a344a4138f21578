"""The label store: every labelled message the trainer has been given, in one SQLite file.

Labels arrive from `filterd-trainer learn` and from the Redis label stream; the refit cycle reads
them back. One row per message, keyed by `message_id(text)`, a hash of the normalised text: the
same SMS forwarded twice, or a mail labelled once as ham and later re-labelled as spam, is one
training example, not two that disagree. The latest label wins, in arrival order, and each change
of mind is counted (`flips`): many flips point at a confused labeller or an ambiguous message.

Every change (a new row, or a row whose label flipped) takes the next value of a store-wide
sequence number, so "how many labels changed since the last refit" is `new_since(seq)` with the
seq the refit recorded (`meta_set`). Re-adding a message with the label it already has only
updates its time: nothing new to learn.

Concurrency: one writer and any number of readers, across processes. The file is in WAL mode (a
reader never blocks the writer nor sees half a transaction), writes take the lock up front
(`BEGIN IMMEDIATE`) and wait up to filterd.store.sqlite.BUSY_TIMEOUT_S for it. A connection is
guarded by a lock, so one `LabelStore` may be used from several threads (the intake writes from a
worker thread). Commits are synchronous (fsync) because the intake acknowledges Redis entries right
after them. The file is private (0600, -wal and -shm too), opened by filterd.store.sqlite.

It lives in filterd, not in the trainer, because the console's learn buttons write it too, exactly as
`filterd-trainer learn` does, and the daemon never imports the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from filterd.errors import DataError
from filterd.store.sqlite import Schema, open_db

log = logging.getLogger("filterd.trainer")  # its writers are the trainer's commands, and the console's learn buttons

LABELS = ("ham", "spam")  # as trainer.data.LABELS (filterd does not import trainer)
MAX_TEXT_CHARS = 16_000  # as trainer.data.MAX_TEXT_CHARS: longer texts are clipped, the model reads far less
SCHEMA_VERSION = 1
PAGE_ROWS = 1000  # rows fetched per query while iterating: memory stays flat, the lock is held briefly
_WHITESPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id      TEXT PRIMARY KEY,
    label   TEXT NOT NULL CHECK (label IN ('spam', 'ham')),
    source  TEXT NOT NULL,
    text    TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    flips   INTEGER NOT NULL DEFAULT 0,
    seq     INTEGER NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS labels_updated ON labels (updated);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('seq', 0), ('flips', 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# FULL: the intake acknowledges Redis entries right after a commit
SCHEMA = Schema("label store", _SCHEMA, SCHEMA_VERSION, synchronous="FULL", table="labels")
_COLUMNS = "id, label, source, text, created, updated, flips, seq"


def _clean(text: str) -> str:
    """Lone surrogates (from lenient decoders) cannot be stored as UTF-8: make them U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def normalise(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped: what `message_id` hashes."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", _clean(text))).strip()


def message_id(text: str) -> str:
    """A stable id for a message's text: sha256 of the normalised text, first 32 hex digits.

    Content, not a sender's or client's id, decides identity: the same SMS forwarded twice, or a
    mail re-wrapped by a different MTA (line breaks, NFD accents) and labelled again, is one row.
    """
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:32]


def check_label(label: str) -> str:
    if label not in LABELS:
        raise DataError(f"unknown label {str(label)[:40]!r} (expected spam or ham)")
    return label


class NewLabel(NamedTuple):
    """One item for `LabelStore.add_many` (a plain tuple in this order works too)."""

    text: str
    label: str
    source: str
    at: float | None = None
    msg_id: str | None = None


@dataclass(frozen=True)
class AddResult:
    id: str
    label: str
    previous: str | None  # the label before this add; None for a new row
    flipped: bool  # the row existed with the other label
    new: bool  # the row did not exist

    @property
    def changed(self) -> bool:
        return self.new or self.flipped


@dataclass(frozen=True)
class LabelRow:
    id: str
    label: str
    source: str  # who set the current label: "learn", "redis", ...
    text: str
    created: float  # Unix time of the first add
    updated: float  # Unix time of the latest add
    flips: int  # how many times the label changed
    seq: int  # the change number of the latest new-or-flip


class LabelStore:
    """The SQLite label store at `path` (created 0600, with its parent directories, if missing)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = self._open(self.path)

    # -- opening ----------------------------------------------------------------------------
    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        return open_db(path, SCHEMA, error=StoreError)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def add(self, text: str, label: str, source: str, *, at: float | None = None, msg_id: str | None = None) -> AddResult:
        """Store one label; see the module docstring for what happens to an existing row."""
        return self.add_many([NewLabel(text, label, source, at, msg_id)])[0]

    def add_many(self, items: Iterable[NewLabel | tuple]) -> list[AddResult]:
        """Store many labels in one transaction, in order (a later item for the same message wins)."""
        prepared = [self._prepare(NewLabel(*item)) for item in items]  # validate all before writing any
        if not prepared:
            return []
        with self._write() as db:
            return [self._apply(db, *p) for p in prepared]

    @staticmethod
    def _prepare(item: NewLabel) -> tuple[str, str, str, str, float]:
        label = check_label(item.label)
        text = _clean(item.text)
        if not text.strip():
            raise DataError("empty text: nothing to learn from")
        msg_id = item.msg_id or message_id(text)
        at = time.time() if item.at is None else float(item.at)
        return msg_id, label, str(item.source), text[:MAX_TEXT_CHARS], at

    def _apply(self, db: sqlite3.Connection, msg_id: str, label: str, source: str, text: str, at: float) -> AddResult:
        old = db.execute("SELECT label FROM labels WHERE id = ?", (msg_id,)).fetchone()
        if old is None:
            db.execute(
                f"INSERT INTO labels ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (msg_id, label, source, text, at, at, self._next_seq(db)),
            )
            return AddResult(msg_id, label, None, flipped=False, new=True)
        previous = old[0]
        if previous == label:
            db.execute("UPDATE labels SET updated = ? WHERE id = ?", (at, msg_id))
            return AddResult(msg_id, label, previous, flipped=False, new=False)
        db.execute(
            "UPDATE labels SET label = ?, source = ?, updated = ?, flips = flips + 1, seq = ? WHERE id = ?",
            (label, source, at, self._next_seq(db), msg_id),
        )
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'flips'")
        log.info("store: %s flipped %s -> %s (by %s)", msg_id, previous, label, source)
        return AddResult(msg_id, label, previous, flipped=True, new=False)

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        return db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value").fetchone()[0]

    def meta_set(self, key: str, value: Any) -> None:
        """Remember a small JSON-serialisable value (e.g. the seq of the last refit)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, the lock taken up front (`BEGIN IMMEDIATE`), not half-way through."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except sqlite3.Error as e:
                _rollback(db)
                raise _store_error(self.path, e) from None
            except BaseException:
                _rollback(db)
                raise

    # -- reading ----------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise _store_error(self.path, e) from None

    def counts(self) -> dict[str, int]:
        """Rows per label, both labels always present."""
        counts = dict.fromkeys(("spam", "ham"), 0)
        counts.update(dict(self._query("SELECT label, COUNT(*) FROM labels GROUP BY label")))
        return counts

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM labels")[0][0]

    def flips(self) -> int:
        """How many times any message's label changed, over the store's life."""
        return self._counter("flips")

    def last_seq(self) -> int:
        """The latest change number (0 for an empty store); only ever grows."""
        return self._counter("seq")

    def _counter(self, name: str) -> int:
        return self._query("SELECT value FROM counters WHERE name = ?", (name,))[0][0]

    def new_since(self, seq: int) -> int:
        """Messages added or re-labelled after change number `seq` (each message counted once)."""
        return self._query("SELECT COUNT(*) FROM labels WHERE seq > ?", (seq,))[0][0]

    def get(self, msg_id: str) -> LabelRow | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM labels WHERE id = ?", (msg_id,))
        return LabelRow(*rows[0]) if rows else None

    def rows(self, since: float | None = None) -> Iterator[LabelRow]:
        """Every row (updated at or after `since`, if given), in insertion order, fetched page by page."""
        where, args = ("AND updated >= ?", (since,)) if since is not None else ("", ())
        return self._pages(f"SELECT rowid, {_COLUMNS} FROM labels WHERE rowid > ? {where} ORDER BY rowid LIMIT {PAGE_ROWS}", args)

    def changed_since(self, seq: int) -> Iterator[LabelRow]:
        """The rows that are new or flipped after change number `seq`, in change order."""
        return self._pages(f"SELECT seq, {_COLUMNS} FROM labels WHERE seq > ? ORDER BY seq LIMIT {PAGE_ROWS}", (), start=seq)

    def _pages(self, sql: str, args: tuple, start: int = 0) -> Iterator[LabelRow]:
        """Rows of `sql`, whose first column is the paging key and first parameter the key to start after."""
        key = start
        while True:
            page = self._query(sql, (key, *args))
            for row in page:
                yield LabelRow(*row[1:])
            if len(page) < PAGE_ROWS:
                return
            key = page[-1][0]

    def meta_get(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default


class StoreError(DataError):
    """SQLite failed (locked for too long, disk full, I/O error): the write did not happen; retrying may work."""


def _store_error(path: Path, e: sqlite3.Error) -> StoreError:
    return StoreError(f"{path}: label store: {e}")


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")
