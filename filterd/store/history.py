"""The verdict history: a bounded, privacy-aware record of the daemon's recent decisions, for the console.

Optional and off unless `[history] enabled`. One row per decision, from every door at the point where
the door has its Decision: time, door, the queue id (SMTP/milter/HTTP) or Redis entry id, envelope
sender and recipients when the door knows them, Subject, P(spam), verdict, action, model version and
the explanation (JSON, when there is one). The text the model read is stored only with `store_text`
(then the console highlights the explanation in it and can send it to the label store); otherwise
only the explanation's word list is kept.

Bounds: rows older than `max_age_days` and all but the newest `max_rows` are deleted (at most once a
minute, in the writer). Each field is clipped (`MAX_*`). The file is private, 0600 with its -wal and -shm
(it holds addresses and subjects), WAL so the console reads while the daemon writes (filterd.store.sqlite).
Deleted while the daemon runs (an operator clearing it), it is started again with the next batch.

`HistoryWriter` is the daemon's side, as the reservoir's: `record` never blocks and never raises (a full
queue drops the row and counts it); one task writes batches from a worker thread, so a slow disk never
delays mail; a failed write is logged (at most once a minute) and counted, and the message it describes
is not affected. The daemon is the only writer; the console opens its own connection to read.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filterd.errors import ConfigError, DataError
from filterd.store.queued_writes import QueuedWriter
from filterd.store.sqlite import Schema, identity, open_db, replaced

log = logging.getLogger("filterd")

SCHEMA_VERSION = 1
PURGE_EVERY_S = 60.0
QUEUE_MAX = 2000  # rows waiting for the writer; more are dropped and counted
MAX_TEXT_CHARS = 65_536  # the text the model read is far shorter (max_length tokens); this only bounds a row
MAX_FIELD_CHARS = 512  # sender, one recipient, subject, reference
MAX_RECIPIENTS = 50
MAX_HEAD_BYTES = 65_536  # of raw mail handed to `record`, for the Subject
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    source      TEXT NOT NULL,
    ref         TEXT NOT NULL,
    sender      TEXT NOT NULL,
    recipients  TEXT NOT NULL,
    subject     TEXT NOT NULL,
    score       REAL,
    verdict     TEXT NOT NULL,
    action      TEXT NOT NULL,
    model       TEXT NOT NULL,
    listed      TEXT NOT NULL,
    explanation TEXT,
    text        TEXT
);
CREATE INDEX IF NOT EXISTS verdicts_at ON verdicts (at);
"""
SCHEMA = Schema(
    "verdict history", _SCHEMA, SCHEMA_VERSION,
    synchronous="NORMAL",  # a power cut may lose the last batch: harmless for a history
    table="verdicts", missing=" (is [history] enabled in the daemon?)",
)  # fmt: skip
_COLUMNS = "id, at, source, ref, sender, recipients, subject, score, verdict, action, model, listed, explanation, text"


@dataclass(frozen=True)
class Verdict:
    """One recorded decision."""

    id: int
    at: float  # Unix time of the decision
    source: str  # smtp | milter | http | redis
    ref: str  # queue id or Redis entry id, "" when unknown
    sender: str
    recipients: tuple[str, ...]
    subject: str
    score: float | None  # None: a list decided without the model
    verdict: str  # spam | ham
    action: str  # what the door did
    model: str  # model version, "" when not scored
    listed: str  # the list that decided, else ""
    explanation: dict[str, Any] | None  # {"score", "method", "words": [{"word", "start", "end", "weight"}]}
    text: str | None  # the text the model read; None unless [history] store_text


@dataclass(frozen=True)
class Filter:
    """What the console asks for: every field optional; `before` is the id to page back from."""

    verdict: str = ""  # spam | ham
    action: str = ""
    source: str = ""
    since: float | None = None
    until: float | None = None
    before: int | None = None
    limit: int = 50


def _clip(s: str, n: int = MAX_FIELD_CHARS) -> str:
    return _CONTROL.sub("?", s[:n])


def subject_of(head: bytes) -> str:
    """The decoded, unfolded Subject of a raw message's header block, "" when there is none or it is unreadable."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head[:MAX_HEAD_BYTES])
        value = msg.get("subject")
        return " ".join(str(value).split()) if value is not None else ""
    except Exception:  # a malformed encoded word must not cost the row
        return ""


def _explanation_json(explanation: Any) -> str | None:
    if explanation is None:
        return None
    if hasattr(explanation, "to_json"):  # filterd.model.explain's Explanation
        explanation = explanation.to_json()
    try:
        return json.dumps(explanation, ensure_ascii=False, allow_nan=False)[: 4 * MAX_TEXT_CHARS]
    except (TypeError, ValueError):
        return None


class History:
    """The history file at `path`. `writer=True` (the daemon): created 0600 with its directories; else read-only."""

    def __init__(self, path: Path | str, *, max_rows: int = 100_000, max_age_days: float = 30.0, writer: bool = True,
                 clock: Any = time.time) -> None:  # fmt: skip
        self.path = Path(path)
        self.max_rows, self.max_age_s = max_rows, max_age_days * 86400.0
        self._clock = clock
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._last_purge = -math.inf
        self._db = _open(self.path, create=writer)
        self._identity = identity(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing (the daemon) --------------------------------------------------------------------

    def add_many(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert rows (keys as `record` builds them) in one transaction, then apply retention; returns rows added."""
        values = [_row_values(r) for r in rows]
        if not values:
            return 0
        with self._lock:
            self._reopen_if_replaced()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(f"INSERT INTO verdicts ({_COLUMNS.partition(', ')[2]}) VALUES ({', '.join('?' * 13)})", values)
                now = self._clock()
                if now - self._last_purge >= PURGE_EVERY_S:
                    self._purge(db, now)
                    self._last_purge = now
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return len(values)

    def _reopen_if_replaced(self) -> None:
        """An operator deleted (or replaced) the file: start a new one rather than write on into the deleted one,
        which nobody can read (the console would stay empty until a restart). Called with the lock held."""
        if not replaced(self.path, self._identity):
            return
        self._db.close()
        self._db = _open(self.path, create=True)  # fails (DataError) while the directory cannot be written: retried
        self._identity = identity(self.path)
        log.info("history: %s was deleted or replaced; recording into a new file", self.path)

    def purge(self) -> int:
        """Apply retention now; returns rows deleted."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._purge(self._db, self._clock())
            self._db.execute("COMMIT")
            return n

    def _purge(self, db: sqlite3.Connection, now: float) -> int:
        n = db.execute("DELETE FROM verdicts WHERE at < ?", (now - self.max_age_s,)).rowcount
        n += db.execute("DELETE FROM verdicts WHERE id <= (SELECT id FROM verdicts ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (self.max_rows,)).rowcount  # fmt: skip
        return n

    # -- reading (the console) ---------------------------------------------------------------------

    def query(self, f: Filter = Filter()) -> list[Verdict]:
        """Newest first, at most `f.limit` rows."""
        where, args = [], []
        for column, value in (("verdict", f.verdict), ("action", f.action), ("source", f.source)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if f.since is not None:
            where.append("at >= ?")
            args.append(f.since)
        if f.until is not None:
            where.append("at < ?")
            args.append(f.until)
        if f.before is not None:
            where.append("id < ?")
            args.append(f.before)
        sql = f"SELECT {_COLUMNS} FROM verdicts {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, max(1, min(f.limit, 1000)))).fetchall()
        return [_verdict(r) for r in rows]

    def get(self, id: int) -> Verdict | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM verdicts WHERE id = ?", (id,)).fetchone()
        return _verdict(row) if row else None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]


def _row_values(r: Mapping[str, Any]) -> tuple:
    rcpts = [_clip(x) for x in r.get("recipients", ())][:MAX_RECIPIENTS]
    text = r.get("text")
    return (float(r["at"]), r["source"], _clip(r.get("ref", "")), _clip(r.get("sender", "")), json.dumps(rcpts),
            _clip(r.get("subject", "")), r.get("score"), r["verdict"], r["action"], _clip(r.get("model", "")),
            _clip(r.get("listed", "")), r.get("explanation"),
            None if text is None else _CONTROL.sub("\ufffd", text[:MAX_TEXT_CHARS]))  # fmt: skip


def _verdict(row: tuple) -> Verdict:
    explanation = None
    if row[12]:
        try:
            explanation = json.loads(row[12])
        except ValueError:
            explanation = None
    return Verdict(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5])), row[6], row[7], row[8], row[9],
                   row[10], row[11], explanation if isinstance(explanation, dict) else None, row[13])  # fmt: skip


def _open(path: Path, *, create: bool) -> sqlite3.Connection:
    return open_db(path, SCHEMA, readonly=not create)


def open_history(cfg: Any) -> History:
    """For `filterd serve`: a history that cannot be opened is a failed start (one line, exit 1)."""
    try:
        return History(cfg.path, max_rows=cfg.max_rows, max_age_days=cfg.max_age_days)
    except DataError as e:
        raise ConfigError(f"[history] path: {e}") from None


class HistoryWriter(QueuedWriter[dict[str, Any]]):
    """The daemon's side: `record` is what the doors call (never blocks, never raises); `run` writes batches from a
    worker thread until `stop`; `close` writes what is still queued."""

    def __init__(self, history: History, metrics: Any, *, store_text: bool = False, max_queue: int = QUEUE_MAX) -> None:
        super().__init__(self._prepare_and_add, history.close, dropped=metrics.history_dropped, written=metrics.history_written,
                         max_queue=max_queue, failed="history: write failed, %d verdicts not recorded")  # fmt: skip
        self.history = history
        self.metrics = metrics
        self.store_text = store_text

    def record(self, source: str, message: Any, decision: Any, model: str, action: str | None = None, *, ref: str = "",
               text: str | None = None, head: bytes = b"", subject: str = "",
               explanation: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Queue one decision. `message`: decision.Message (envelope); `head`: the raw message's first bytes, for the
        Subject (parsed in the writer's thread); `action`: what the door did, when not `decision.action`."""
        try:
            row = {
                "at": time.time(), "source": source, "ref": ref or "", "sender": getattr(message, "sender", "") or "",
                "recipients": tuple(getattr(message, "recipients", ()))[:MAX_RECIPIENTS], "subject": subject,
                "head": bytes(head[:MAX_HEAD_BYTES]), "score": decision.score, "verdict": decision.verdict,
                "action": action or decision.action, "model": model or "", "listed": decision.listed,
                "explanation": explanation, "text": text if self.store_text else None,
            }  # fmt: skip
        except Exception:  # a history bug must never reach mail handling
            log.exception("history: could not record a %s verdict", source)
            self.metrics.history_dropped.labels("write-error").inc()
            return
        self.put(row)

    def _prepare_and_add(self, batch: list[dict[str, Any]]) -> int:
        for row in batch:  # in the worker thread: header parsing and JSON stay off the event loop
            head = row.pop("head", b"")
            if not row["subject"] and head:
                row["subject"] = subject_of(head)
            row["explanation"] = _explanation_json(row["explanation"])
        return self.history.add_many(batch)
