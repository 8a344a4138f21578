"""trainer.mailbox: the one reader `prepare`, `learn` and `pretrain --mail` share, and the rules it reads by."""

from __future__ import annotations

import mailbox as stdlib_mailbox
from pathlib import Path

import pytest

from filterd.errors import DataError
from tests.conftest import SPAMASSASSIN
from trainer import data
from trainer import mailbox as reader
from trainer.learn import learn
from filterd.store.labels import LabelStore

MSG = b"From: a@example.org\nSubject: message %d\n\nbody of message %d\n"
FROM_LINE = b"From a@example.org Thu Dec  8 01:00:00 2026\n"


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def relative(root: Path, path: Path) -> list[str]:
    return [where for where, _ in reader.iter_messages(path, root=root)]


def test_mbox_members_are_split_at_from_lines_as_pythons_mailbox_reads_them(tmp_path):
    box = stdlib_mailbox.mbox(tmp_path / "ham.mbox")
    for f in sorted((SPAMASSASSIN / "easy_ham").iterdir())[:20]:
        box.add(f.read_bytes())
    box.close()
    box = stdlib_mailbox.mbox(tmp_path / "ham.mbox")
    expected = [box.get_bytes(k) for k in box.keys()]
    box.close()
    got = list(reader.iter_messages(tmp_path / "ham.mbox"))
    assert [raw for _, raw in got] == expected
    assert [where for where, _ in got] == [f"{tmp_path / 'ham.mbox'}#{i}" for i in range(20)]


def test_a_body_line_starting_with_from_is_not_a_separator(tmp_path):
    """A corpus file: one message after its From_ line, a body line "From ..." left unescaped."""
    body = b"Subject: hi\n\nFrom here on, all is fine.\nFrom: someone quoted\nbye\n"
    f = write(tmp_path / "spam" / "00001.abc", FROM_LINE + body)
    assert list(reader.iter_messages(f)) == [(str(f), body)]
    # a real separator (sender and date) still splits, the blank line before it belongs to neither message
    two = write(tmp_path / "two", FROM_LINE + MSG % (1, 1) + b"\n" + b"From - Fri Dec 09 10:11:12 2026\n" + MSG % (2, 2))
    assert [raw for _, raw in reader.iter_messages(two)] == [MSG % (1, 1), MSG % (2, 2)]


def test_which_files_count(tmp_path):
    root = tmp_path / "spam"
    for name in ("z_last", "a_first", "sub/inner"):
        write(root / name, MSG % (1, 1))
    for name in (".DS_Store", ",12", "cmds", "spam_2.cmds", "Inbox.msf", "cyrus.index", ".Junk/cur/1:2,S"):
        write(root / name, MSG % (2, 2))  # not messages: dotfiles, MH deleted, corpus renames, index files
    (root / "loop").symlink_to(root, target_is_directory=True)  # not followed
    assert relative(tmp_path, root) == ["spam/a_first", "spam/sub/inner", "spam/z_last"]
    assert relative(tmp_path, root / "cmds") == ["spam/cmds"]  # a file named on its own is read


def test_maildir_with_cur_only_reads_neither_tmp_nor_subfolders(tmp_path):
    box = tmp_path / "Junk"
    write(box / "cur" / "2.host:2,S", MSG % (2, 2))
    write(box / "cur" / "1.host:2,S", FROM_LINE + MSG % (1, 1))  # a Maildir file is one message, kept as it is
    write(box / "tmp" / "3.host", b"Subject: half deliv")
    write(box / "dovecot-uidlist", b"3 V1 N4\n")
    write(box / ".Sub" / "cur" / "4.host:2,", MSG % (4, 4))  # Maildir++ sub-folder
    got = list(reader.iter_messages(box, root=tmp_path))
    assert got == [("Junk/cur/1.host:2,S", FROM_LINE + MSG % (1, 1)), ("Junk/cur/2.host:2,S", MSG % (2, 2))]


def test_messages_over_the_limit_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_MESSAGE_BYTES", 100)
    big = MSG % (1, 1) + b"x" * 100 + b"\n"
    write(tmp_path / "dir" / "big", big)
    write(tmp_path / "dir" / "small", MSG % (2, 2))
    box = write(tmp_path / "box", FROM_LINE + big + b"\n" + FROM_LINE + MSG % (3, 3))
    skipped: list[tuple[str, str]] = []
    got = [w for w, _ in reader.iter_messages(tmp_path / "dir", lambda w, r: skipped.append((w, r)))]
    got += [w for w, _ in reader.iter_messages(box, lambda w, r: skipped.append((w, r)))]
    assert got == [str(tmp_path / "dir" / "small"), f"{box}#1"]  # the mbox's numbering counts the skipped member
    assert [w for w, _ in skipped] == [str(tmp_path / "dir" / "big"), f"{box}#0"]
    assert all(r.startswith(reader.TOO_LARGE) for _, r in skipped)
    with pytest.raises(DataError, match="too large"):
        list(reader.iter_messages(tmp_path / "dir"))
    # clip (pretraining): the first max_bytes + 1 bytes of a big message instead of nothing
    clipped = dict(reader.iter_messages(tmp_path, max_bytes=100, clip=True, root=tmp_path))
    assert clipped == {"box#0": big[:101], "box#1": MSG % (3, 3), "dir/big": big[:101], "dir/small": MSG % (2, 2)}


def test_prepare_and_learn_read_the_same_messages(tmp_path):
    root = tmp_path / "corpus"
    write(root / "spam" / "00001.a", FROM_LINE + MSG % (1, 1))
    write(root / "spam" / "old" / "00002.b", MSG % (2, 2))  # sub-directories are read by both
    write(root / "spam" / "box", FROM_LINE + MSG % (3, 3) + b"\n" + FROM_LINE + MSG % (4, 4))
    write(root / "spam" / "cmds", b"mv 00001.a 00001.b\n")
    write(root / "ham.mbox", FROM_LINE + MSG % (5, 5))  # an mbox of one message: no #0
    write(root / "ham_maildir" / "new" / "6.host", MSG % (6, 6))
    write(root / "ham_maildir" / "tmp" / "7.host", MSG % (7, 7))
    write(root / "spam_2.cmds", b"mv 1 2\n")  # named for a label, but not a message
    ids = sorted(e.id for e in data.read_email_dir(root))
    assert ids == ["ham.mbox", "ham_maildir/new/6.host", "spam/00001.a", "spam/box#0", "spam/box#1", "spam/old/00002.b"]
    with LabelStore(tmp_path / "labels.sqlite") as store:
        spam = learn(store, [root / "spam"], "spam")
        ham = learn(store, [root / "ham.mbox", root / "ham_maildir"], "ham")
        assert (spam.added, ham.added, spam.skipped, ham.skipped) == (4, 2, [], [])
        texts = {r.text for r in store.rows()}
    assert texts == {e.text for e in data.read_email_dir(root)}
