"""The reservoir: a bounded, time-limited random sample of the texts the daemon classified.

Optional and off unless `[trainer] reservoir` names a file. It lets a site's own traffic feed
`filterd-trainer pretrain --reservoir FILE` without anyone labelling it. It holds real users'
message content, so it is bounded (`reservoir_size` texts, each clipped to MAX_TEXT_CHARS), created
0600, and texts older than `reservoir_max_age` are deleted.

Sampling is Algorithm R (Vitter 1985) over a sliding window: the i-th text of the window replaces a
random one of the `size` slots with probability size/i. Plain Algorithm R counts every text since the
file was created; once old texts are purged that count keeps growing, so fewer and fewer new texts
are taken in and the reservoir empties. So `i` is the number of texts that arrived within max_age,
kept per arrival bucket in the file (a restart keeps the sample uniform) and decreased as buckets
age out. The result is close to a uniform sample of the last max_age of traffic.

SQLite, opened as the label store is (filterd.store.sqlite): private (0600, -wal and -shm too), WAL (the
trainer reads while the daemon writes), `BEGIN IMMEDIATE` writes. Commits are not fsynced one by one
(synchronous=NORMAL): losing the last batch on a power cut is harmless for a random sample. A file
deleted while the daemon runs is started again with the next batch.

`ReservoirWriter` is the daemon's side: a bounded in-memory queue, drained by one task that writes
batches from a worker thread, so verdicts never wait for the disk.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filterd.errors import ConfigError, DataError
from filterd.sources import SOURCES  # every door's texts are the site's mail
from filterd.store.labels import MAX_TEXT_CHARS  # capped like the label store the texts may end up in
from filterd.store.queued_writes import QueuedWriter
from filterd.store.sqlite import Schema, identity, open_db, replaced

log = logging.getLogger("filterd")

PURGE_EVERY_S = 60.0  # purge on add, at most this often
BUCKETS = 1000  # arrival counts are kept per max_age/BUCKETS (at least a minute): the window is that precise
SCHEMA_VERSION = 1
QUEUE_MAX = 1000  # texts waiting for the writer; more are dropped and counted
_SURROGATE = re.compile("[\ud800-\udfff]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    slot    INTEGER PRIMARY KEY,
    text    TEXT NOT NULL,
    source  TEXT NOT NULL,
    at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS texts_at ON texts (at);
CREATE TABLE IF NOT EXISTS arrivals (until REAL PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('window', 0), ('total', 0), ('max_age', 0);
"""
SCHEMA = Schema("reservoir", _SCHEMA, SCHEMA_VERSION, synchronous="NORMAL", table="texts")


@dataclass(frozen=True)
class Sampled:
    """One text kept in the reservoir."""

    text: str
    source: str  # the door it came through (filterd.sources.SOURCES)
    at: float  # Unix time it arrived


class Reservoir:
    """The reservoir file at `path` (created 0600, with its parent directories, if missing)."""

    def __init__(
        self, path: Path | str, size: int, max_age: float, *, clock: Callable[[], float] = time.time, seed: int | None = None
    ) -> None:
        if size < 1 or not (max_age > 0 and math.isfinite(max_age)):
            raise ValueError(f"reservoir: size must be >= 1 and max_age > 0, got {size}, {max_age}")
        self.path, self.size, self.max_age = Path(path), size, float(max_age)
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # one connection, used from the writer's worker threads
        self._last_purge = -math.inf
        self._bucket = max(60.0, self.max_age / BUCKETS)
        self._db = _open(self.path, create=True)
        self._identity = identity(self.path)
        self._start()

    def _start(self) -> None:
        with self._write() as db:  # readers use max_age to skip texts the writer has not purged yet
            db.execute("UPDATE counters SET value = ? WHERE name = 'max_age'", (self.max_age,))
            # reservoir_size lowered since the file was written: keep a random `size` of its texts
            if db.execute("DELETE FROM texts WHERE slot NOT IN (SELECT slot FROM texts ORDER BY random() LIMIT ?)",
                          (self.size,)).rowcount:  # fmt: skip
                _renumber(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Reservoir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_many(self, items: Iterable[tuple[str, str, float | None]]) -> int:
        """Offer (text, source, arrival time or None for now) items to the sample, in one transaction.

        Returns how many were kept (each one is kept with probability size/i, i its rank in the window).
        """
        prepared = [_prepare(*item, now=self._clock) for item in items]
        if not prepared:
            return 0
        self._reopen_if_replaced()
        kept = 0
        with self._write() as db:
            now = self._clock()
            if now - self._last_purge >= PURGE_EVERY_S:
                self._purge(db, now)
            window = int(_counter(db, "window"))
            rows = db.execute("SELECT COUNT(*) FROM texts").fetchone()[0]
            arrivals: dict[float, int] = {}
            for text, source, at in prepared:
                window += 1
                until = (math.floor(at / self._bucket) + 1) * self._bucket
                arrivals[until] = arrivals.get(until, 0) + 1
                # Algorithm R: the window's i-th text takes slot j < size with probability size/i (all of
                # them while i <= size). Slots are 0..rows-1 (a purge renumbers them): j past the last one
                # fills a hole that a purge left, j before it replaces a text.
                slot = self._rng.randrange(max(window, self.size))
                if slot >= self.size:
                    continue
                if slot >= rows or window <= self.size:
                    slot, rows = (rows, rows + 1) if rows < self.size else (slot, rows)
                db.execute("INSERT OR REPLACE INTO texts (slot, text, source, at) VALUES (?, ?, ?, ?)", (slot, text, source, at))
                kept += 1
            db.executemany(
                "INSERT INTO arrivals (until, count) VALUES (?, ?) ON CONFLICT (until) DO UPDATE SET count = count + excluded.count",
                arrivals.items(),
            )
            db.execute("UPDATE counters SET value = ? WHERE name = 'window'", (window,))
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'total'", (len(prepared),))
        return kept

    def _reopen_if_replaced(self) -> None:
        """An operator deleted (or replaced) the file: start a new one rather than write into the deleted one."""
        with self._lock:
            if not replaced(self.path, self._identity):
                return
            self._db.close()
            self._db = _open(self.path, create=True)  # fails (DataError) while the directory cannot be written: retried
            self._identity = identity(self.path)
        self._start()
        log.info("reservoir: %s was deleted or replaced; sampling into the new file", self.path)

    def purge(self) -> int:
        """Delete texts (and arrival counts) older than max_age now; returns the texts deleted."""
        with self._write() as db:
            return self._purge(db, self._clock())

    def _purge(self, db: sqlite3.Connection, now: float) -> int:
        cutoff = now - self.max_age
        gone = db.execute("DELETE FROM texts WHERE at < ?", (cutoff,)).rowcount
        if gone:
            _renumber(db)
        aged = db.execute("DELETE FROM arrivals WHERE until <= ? RETURNING count", (cutoff,)).fetchall()
        if aged:
            db.execute("UPDATE counters SET value = max(0, value - ?) WHERE name = 'window'", (sum(c for (c,) in aged),))
        self._last_purge = now
        if gone:
            log.info("reservoir: purged %d texts older than %s", gone, _days(self.max_age))
        return gone

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0]

    @property
    def window(self) -> int:
        """Texts offered within max_age: Algorithm R's running count."""
        with self._lock:
            return int(_counter(self._db, "window"))

    @property
    def total(self) -> int:
        """Texts offered over the file's life."""
        with self._lock:
            return int(_counter(self._db, "total"))

    def _write(self) -> Any:
        return _Transaction(self._db, self._lock, self.path)


def read_reservoir(path: Path | str, *, now: float | None = None) -> Iterator[Sampled]:
    """The texts of an existing reservoir, oldest first, read-only; texts past the writer's max_age are skipped."""
    db = _open(Path(path), create=False)
    try:
        max_age = _counter(db, "max_age")
        cutoff = (time.time() if now is None else now) - max_age if max_age > 0 else -math.inf
        for text, source, at in db.execute("SELECT text, source, at FROM texts WHERE at >= ? ORDER BY at", (cutoff,)):
            yield Sampled(text, source, at)
    except sqlite3.Error as e:
        raise DataError(f"{path}: reservoir: {e}") from None
    finally:
        db.close()


def _open(path: Path, *, create: bool) -> sqlite3.Connection:
    return open_db(path, SCHEMA, readonly=not create)


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT` under the lock; a SQLite error rolls back and becomes one-line DataError."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, path: Path) -> None:
        self.db, self.lock, self.path = db, lock, path

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self.lock.release()
            raise DataError(f"{self.path}: reservoir: {e}") from None
        return self.db

    def __exit__(self, kind: type | None, e: BaseException | None, tb: object) -> bool:
        try:
            if kind is None:
                try:
                    self.db.execute("COMMIT")
                    return False
                except sqlite3.Error as err:
                    e = err
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise DataError(f"{self.path}: reservoir: {e}") from None
            return False
        finally:
            self.lock.release()


def _prepare(text: str, source: str, at: float | None = None, *, now: Callable[[], float]) -> tuple[str, str, float]:
    if source not in SOURCES:
        raise ValueError(f"reservoir: unknown source {source!r}")
    return _SURROGATE.sub("\ufffd", text[:MAX_TEXT_CHARS]), source, now() if at is None else float(at)


def _renumber(db: sqlite3.Connection) -> None:
    """Slots 0..rows-1 again after deletions (moved out of the way first: slot is the primary key)."""
    db.execute("UPDATE texts SET slot = slot + (SELECT MAX(slot) + 1 FROM texts)")
    db.execute(
        "UPDATE texts SET slot = r.n FROM (SELECT slot AS old, row_number() OVER (ORDER BY slot) - 1 AS n FROM texts) AS r "
        "WHERE texts.slot = r.old"
    )


def _counter(db: sqlite3.Connection, name: str) -> float:
    return db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g}d" if seconds >= 86400 else f"{seconds:g}s"


def open_reservoir(path: Path, size: int, max_age: float) -> Reservoir:
    """For `filterd serve`: a reservoir that cannot be opened is a failed start (one line, exit 1)."""
    try:
        return Reservoir(path, size, max_age)
    except DataError as e:
        raise ConfigError(f"[trainer] reservoir: {e}") from None


class ReservoirWriter(QueuedWriter[tuple[str, str, float]]):
    """The daemon's side: `offer` never blocks (a full queue drops the text and counts it); `run` writes batches
    from a worker thread until `stop`, then writes what is queued (filterd.store.queued_writes)."""

    def __init__(self, reservoir: Reservoir, metrics: Any, max_queue: int = QUEUE_MAX) -> None:
        super().__init__(reservoir.add_many, reservoir.close, dropped=metrics.reservoir_dropped,
                         written=metrics.reservoir_written, max_queue=max_queue,
                         failed="reservoir: write failed, %d texts dropped")  # fmt: skip
        self.reservoir = reservoir
        self.metrics = metrics

    def offer(self, text: str, source: str) -> None:
        """Queue a classified message's text (already extracted: never raw mail bytes or addresses)."""
        self.put((text[:MAX_TEXT_CHARS], source, time.time()))
