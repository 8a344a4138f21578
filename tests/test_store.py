"""The SQLite label store: one row per message text, latest label wins, flips and change numbers counted."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import stat

import pytest

from filterd.errors import DataError
from filterd.store.labels import LabelStore, NewLabel, message_id


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "labels.sqlite") as s:
        yield s


def test_message_id_normalises_text():
    a = message_id("Caf\u00e9  offer\r\n\tnow ")
    assert a == message_id(" Cafe\u0301 offer now")  # NFD accent, other whitespace: the same message
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != message_id("Cafe offer now")
    assert message_id("lone \ud800 surrogate") == message_id("lone \ufffd surrogate")  # no UnicodeEncodeError


def test_new_same_label_and_flip(store):
    first = store.add("WIN a prize now", "spam", "learn", at=100.0)
    assert (first.new, first.flipped, first.previous, first.label) == (True, False, None, "spam")
    seq = store.last_seq()

    again = store.add("WIN  a prize now ", "spam", "redis", at=200.0)  # same text modulo whitespace
    assert (again.id, again.new, again.flipped, again.previous) == (first.id, False, False, "spam")
    assert store.last_seq() == seq and store.new_since(seq) == 0  # nothing new to learn
    row = store.get(first.id)
    assert (row.label, row.source, row.created, row.updated, row.flips) == ("spam", "learn", 100.0, 200.0, 0)

    flip = store.add("WIN a prize now", "ham", "redis", at=300.0)
    assert (flip.flipped, flip.previous, flip.label) == (True, "spam", "ham")
    back = store.add("WIN a prize now", "spam", "learn", at=50.0)  # arrival order wins, not the timestamp
    assert back.flipped and store.get(first.id).label == "spam"
    assert store.get(first.id).flips == 2 and store.flips() == 2
    assert store.counts() == {"spam": 1, "ham": 0} and len(store) == 1


def test_counts_new_since_and_changed_since(store):
    results = store.add_many([("spam one", "spam", "t"), ("ham one", "ham", "t"), NewLabel("ham two", "ham", "t")])
    assert [r.new for r in results] == [True, True, True]
    mark = store.last_seq()
    assert mark == 3 and store.new_since(0) == 3 and store.new_since(mark) == 0
    store.add("ham one", "ham", "t")  # unchanged
    store.add("ham two", "spam", "t")  # flipped
    store.add("spam two", "spam", "t")  # new
    assert store.new_since(mark) == 2
    assert [r.text for r in store.changed_since(mark)] == ["ham two", "spam two"]
    assert store.counts() == {"spam": 3, "ham": 1} and store.flips() == 1
    assert [r.text for r in store.rows()] == ["spam one", "ham one", "ham two", "spam two"]


def test_add_many_is_one_transaction_and_later_items_win(store):
    results = store.add_many([("x msg", "spam", "t"), ("x msg", "ham", "t")])
    assert results[1].flipped and store.counts() == {"spam": 0, "ham": 1}
    with pytest.raises(DataError, match="unknown label 'junk'"):
        store.add_many([("good", "spam", "t"), ("bad", "junk", "t")])
    assert store.get(message_id("good")) is None  # nothing of a failed batch is written
    assert store.add_many([]) == []


def test_bad_label_and_empty_text(store):
    with pytest.raises(DataError, match="expected spam or ham"):
        store.add("text", "SPAM", "t")
    with pytest.raises(DataError, match="empty text"):
        store.add(" \n ", "spam", "t")


def test_rows_since_and_paging(store, monkeypatch):
    monkeypatch.setattr("filterd.store.labels.PAGE_ROWS", 3)
    store.add_many([(f"msg {i}", "spam" if i % 2 else "ham", "t", float(i)) for i in range(10)])
    assert [r.text for r in store.rows()] == [f"msg {i}" for i in range(10)]
    assert [r.text for r in store.rows(since=7.0)] == ["msg 7", "msg 8", "msg 9"]
    assert [r.seq for r in store.changed_since(4)] == list(range(5, 11))


def test_explicit_id_and_meta(store):
    r = store.add("some text", "ham", "t", msg_id="sms:42")
    assert r.id == "sms:42" and store.get("sms:42").text == "some text"
    assert store.meta_get("last_refit_seq") is None and store.meta_get("x", 7) == 7
    store.meta_set("last_refit_seq", 12)
    store.meta_set("model", {"version": "v1"})
    assert store.meta_get("last_refit_seq") == 12 and store.meta_get("model") == {"version": "v1"}


def test_file_mode_parents_and_reopen(tmp_path):
    path = tmp_path / "a" / "b" / "labels.sqlite"
    with LabelStore(path) as s:
        s.add("hello", "ham", "t")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with LabelStore(path) as s:
        assert s.counts() == {"spam": 0, "ham": 1} and s.last_seq() == 1
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_not_a_database(tmp_path):
    path = tmp_path / "labels.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not a usable label store"):
        LabelStore(path)


def _reader(path: str, q) -> None:
    """Another process: reads the store while the writer holds an open transaction."""
    with LabelStore(path) as s:
        q.put((s.counts(), s.last_seq()))


def test_reader_in_another_process_during_a_write(tmp_path):
    path = tmp_path / "labels.sqlite"
    with LabelStore(path) as writer:
        writer.add("committed", "spam", "t")
        with writer._write() as db:  # a write transaction in progress, not committed
            db.execute("INSERT INTO labels VALUES ('x', 'ham', 't', 'uncommitted', 0, 0, 0, 99)")
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_reader, args=(str(path), q))
            p.start()
            counts, seq = q.get(timeout=20)  # WAL: the reader is not blocked and sees the committed state only
            p.join(10)
        assert counts == {"spam": 1, "ham": 0} and seq == 1
        assert writer.counts() == {"spam": 1, "ham": 1}

    # and a plain sqlite3 reader sees new commits as they happen
    with LabelStore(path) as writer:
        reader = sqlite3.connect(path)
        before = reader.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        writer.add("another", "ham", "t")
        assert reader.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == before + 1
        reader.close()


def test_a_world_readable_store_is_made_private_and_unusable_paths_are_one_line(tmp_path, caplog):
    path = tmp_path / "labels.sqlite"
    with LabelStore(path) as s:
        s.add("hello", "ham", "t")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="filterd"), LabelStore(path) as s:
        s.add("again", "spam", "t")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("labels.sqlite*")}
        assert modes == {"labels.sqlite": 0o600, "labels.sqlite-wal": 0o600, "labels.sqlite-shm": 0o600}
    assert [r.getMessage() for r in caplog.records] == [f"{path}: was readable by others (file 0644): made it 0600"]
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"^\S+/file/labels.sqlite: cannot create the label store: "):
        LabelStore(tmp_path / "file" / "labels.sqlite")
    with pytest.raises(DataError, match=r"^\S+/dir: cannot create the label store: Is a directory$"):
        LabelStore((tmp_path / "dir").mkdir() or tmp_path / "dir")
    other = tmp_path / "reservoir.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE texts (slot INTEGER)").connection.commit()
    with pytest.raises(DataError, match="reservoir.sqlite: not a label store \\(an SQLite file of something else\\)"):
        LabelStore(other)
    newer = tmp_path / "newer.sqlite"
    sqlite3.connect(newer).execute("PRAGMA user_version = 9").connection.commit()
    with pytest.raises(DataError, match=r"newer.sqlite: label store format 9 is newer than this filterd's \(1\)"):
        LabelStore(newer)


def test_the_store_keeps_what_the_trainer_expects():
    from filterd.store import labels
    from trainer import data

    assert labels.LABELS == data.LABELS and labels.MAX_TEXT_CHARS == data.MAX_TEXT_CHARS  # filterd cannot import trainer.data


def test_filterd_never_imports_the_trainer():
    """The daemon (console included) runs without the trainer package: the label and model stores live in filterd."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "filterd"
    found = []
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            found += [f"{file.relative_to(root.parent)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "trainer"]
    assert found == []
