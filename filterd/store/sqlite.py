"""Opening the SQLite files filterd and the trainer keep: the verdict history, the reservoir, the label store
and the trainer's feature cache. Each holds real users' mail (texts, addresses, subjects, vectors made
from them), so every one is opened the same way, here.

- Private: the file is created 0600 whatever the umask, and a file that exists with group or other bits
  (an older version, a copy, a restore) is made 0600, with one log line. SQLite creates `-wal` and `-shm`
  with the main file's mode, so fixing the main file before the first write covers new ones; ones left
  from before are fixed after opening.
- WAL (readers never block the one writer), a busy timeout, `synchronous` as the caller needs it.
- A versioned schema (`PRAGMA user_version`): a new file gets the tables; a newer format, an SQLite file
  of something else or a file that is not SQLite at all is refused with one line naming the file.

`identity` and `replaced` let a long-running writer notice that its file was deleted or replaced under it
(an operator clearing the history): it then reopens rather than write on into a file nobody can read.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from filterd.errors import DataError

log = logging.getLogger("filterd")

PRIVATE = 0o600
BUSY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Schema:
    """What a file holds, for `open_db`."""

    name: str  # for errors: "verdict history", "reservoir", "label store"
    sql: str  # CREATE ... IF NOT EXISTS statements
    version: int | None = 1  # the user_version written; None: unversioned, `sql` runs at every writable open
    synchronous: str | None = "NORMAL"  # FULL where a commit is acknowledged to someone; None: SQLite's default
    table: str = ""  # a table a file opened read-only must have
    missing: str = ""  # appended to "no such ... file" for a read-only open (a hint where it comes from)


def open_db(path: Path | str, schema: Schema, *, readonly: bool = False, mode: int = PRIVATE,
            error: type[DataError] = DataError) -> sqlite3.Connection:  # fmt: skip
    """A connection (autocommit: callers write `BEGIN IMMEDIATE` themselves, usable from any thread) to `path`.

    Writable (default): the file and its parent directories are created, the mode fixed, WAL set and the schema
    created or checked. `readonly`: the file must exist and be one of ours; nothing is created or changed.
    Raises `DataError` for an unusable path and `error` (a DataError) when SQLite refuses the file.
    """
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise DataError(f"{path}: no such {schema.name} file{schema.missing}")
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                                 isolation_level=None, check_same_thread=False)  # fmt: skip
        except sqlite3.Error as e:
            raise error(f"{path}: cannot open the {schema.name}: {e}") from None
    else:
        fixed = {"": _prepare_file(path, schema.name, mode)}
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise error(f"{path}: cannot open the {schema.name}: {e}") from None
    try:
        _check_schema(db, path, schema, readonly)
    except sqlite3.DatabaseError as e:  # not a database, locked for too long, read-only file...
        db.close()
        raise error(f"{path}: not a usable {schema.name}: {e}") from None
    except BaseException:
        db.close()
        raise
    if not readonly:
        for suffix in ("-wal", "-shm"):  # left by a connection from before the main file was fixed
            fixed[suffix] = _make_private(Path(f"{path}{suffix}"), mode)
        if was := [f"{suffix or 'file'} {old:04o}" for suffix, old in fixed.items() if old is not None]:
            log.warning("%s: was readable by others (%s): made it %04o", path, ", ".join(was), mode)
    return db


def _prepare_file(path: Path, name: str, mode: int) -> int | None:
    """Create the file `mode`, or fix an existing one's mode (returned when it was changed). A -wal or -journal that a
    deleted predecessor left is no danger to a new, empty file: SQLite deletes it rather than replay it.

    An existing file is only stat'ed and chmod'ed, never opened: closing a descriptor drops every POSIX lock this
    process holds on the file, SQLite's included (another connection here, or this one's on -shm after opening),
    and a connection that finds -shm unlocked rebuilds it under the others' feet (SIGBUS).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)) from None
            if not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES)) from None
            return _make_private(path, mode)
    except OSError as e:
        raise DataError(f"{path}: cannot create the {name}: {e.strerror or e}") from None
    os.chmod(path, mode)  # the umask may have taken bits O_CREAT asked for; SQLite copies this mode to -wal/-shm
    return None


def _make_private(path: Path, mode: int) -> int | None:
    """chmod `path` to `mode` when group or other may read it; returns the old mode then (a warning if it failed)."""
    try:
        old = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    if not old & 0o077:
        return None
    try:
        os.chmod(path, mode)
    except OSError as e:
        log.warning("%s: mode %04o is readable by others and cannot be changed (%s)", path, old, e.strerror or e)
        return None
    return old


def _check_schema(db: sqlite3.Connection, path: Path, schema: Schema, readonly: bool) -> None:
    if schema.version is None:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # "file is not a database" here, not later
        if not readonly:
            _set_pragmas(db, schema)
            db.executescript(schema.sql)
        return
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > schema.version:
        raise DataError(f"{path}: {schema.name} format {version} is newer than this filterd's ({schema.version})")
    if readonly:
        if version < schema.version or (
            schema.table and db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (schema.table,)).fetchone() is None
        ):
            raise DataError(f"{path}: not a {schema.name}")
        return
    _set_pragmas(db, schema)
    if version < schema.version:  # a new file: opening an existing one never takes the write lock here
        if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise DataError(f"{path}: not a {schema.name} (an SQLite file of something else)")
        db.executescript(f"BEGIN IMMEDIATE;{schema.sql}PRAGMA user_version = {schema.version};COMMIT;")


def _set_pragmas(db: sqlite3.Connection, schema: Schema) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    if schema.synchronous is not None:
        db.execute(f"PRAGMA synchronous = {schema.synchronous}")


def identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of the file now at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def replaced(path: Path | str, opened: tuple[int, int] | None) -> bool:
    """True when the file at `path` is no longer the one that had identity `opened` (deleted, or another put there)."""
    return identity(path) != opened
