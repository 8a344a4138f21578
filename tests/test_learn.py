"""`learn`: messages from files, mbox, Maildir and directory trees into the label store (SpamAssassin corpus)."""

from __future__ import annotations

import mailbox
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from filterd.errors import DataError
from filterd.mail.text import extract_text
from tests.conftest import REPO, SPAMASSASSIN
from trainer.learn import learn
from trainer.mailbox import iter_messages
from filterd.store.labels import LabelStore, message_id

N = 30  # messages per label


def corpus_files(folder: str, n: int = N) -> list[Path]:
    return sorted((SPAMASSASSIN / folder).iterdir())[:n]


def distinct_ids(files: list[Path]) -> set[str]:
    """What the store should hold: the corpus has duplicates (spam/ 00001..00030 has one) that collapse to one id."""
    return {message_id(extract_text(f.read_bytes())) for f in files}


EMPTY_MESSAGE = b"From: a@example.org\nTo: b@example.org\n\n   \n"


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> dict[str, Path]:
    """A Maildir of spam (half in cur/, half in new/, one empty message, junk in tmp/) and an mbox of ham."""
    root = tmp_path_factory.mktemp("boxes")
    maildir = mailbox.Maildir(root / "Spam", create=True)
    for i, f in enumerate(corpus_files("spam")):
        msg = mailbox.MaildirMessage(f.read_bytes())
        msg.set_subdir("cur" if i % 2 else "new")
        maildir.add(msg)
    maildir.add(EMPTY_MESSAGE)
    (root / "Spam" / "tmp" / "half-delivered").write_bytes(b"Subject: not yet\n\nhalf a messa")
    mbox = mailbox.mbox(root / "ham.mbox", create=True)
    for f in corpus_files("easy_ham"):
        mbox.add(f.read_bytes())
    mbox.close()
    return {"maildir": root / "Spam", "mbox": root / "ham.mbox"}


def test_maildir_and_mbox_counts(boxes, tmp_path):
    spam_ids, ham_ids = distinct_ids(corpus_files("spam")), distinct_ids(corpus_files("easy_ham"))
    assert (len(spam_ids), len(ham_ids)) == (29, 30)  # reported: one duplicate among the first 30 spam
    with LabelStore(tmp_path / "labels.sqlite") as store:
        spam = learn(store, [boxes["maildir"]], "spam")
        assert (spam.added, spam.relabelled, spam.unchanged) == (len(spam_ids), 0, N - len(spam_ids))
        assert len(spam.skipped) == 1 and "no text" in spam.skipped[0][1]  # the empty message; tmp/ is not read
        ham = learn(store, [boxes["mbox"]], "ham")
        assert (ham.added, ham.relabelled, ham.unchanged, ham.skipped) == (len(ham_ids), 0, 0, [])
        assert store.counts() == {"spam": len(spam_ids), "ham": len(ham_ids)}
        assert {r.id for r in store.rows() if r.label == "spam"} == spam_ids  # same text as the original files
        assert {r.id for r in store.rows() if r.label == "ham"} == ham_ids
        assert {r.source for r in store.rows()} == {"learn"}

        again = learn(store, [boxes["mbox"]], "spam")  # a user re-labels the whole mbox
        assert (again.added, again.relabelled, again.unchanged) == (0, len(ham_ids), 0)
        assert store.counts() == {"spam": len(spam_ids) + len(ham_ids), "ham": 0} and store.flips() == len(ham_ids)


def test_iter_messages_layouts(boxes, tmp_path):
    maildir = list(iter_messages(boxes["maildir"]))
    assert len(maildir) == N + 1 and all(Path(where).parent.name != "tmp" for where, _ in maildir)
    assert [w.split("/")[-2] for w, _ in maildir] == ["cur"] * (N // 2) + ["new"] * (N // 2 + 1)
    mbox = list(iter_messages(boxes["mbox"]))
    assert [w for w, _ in mbox[:2]] == [f"{boxes['mbox']}#0", f"{boxes['mbox']}#1"] and len(mbox) == N
    assert not mbox[0][1].startswith(b"From ")  # the separator line is not part of the message

    # a corpus-style tree: sorted, recursive, hidden and `cmds` files skipped, a Maildir and an mbox inside
    tree = tmp_path / "tree"
    (tree / "b_sub").mkdir(parents=True)
    files = corpus_files("hard_ham", 3)
    shutil.copy(files[0], tree / "z_last")
    shutil.copy(files[1], tree / "b_sub" / "one")
    (tree / "a_single").write_bytes(files[2].read_bytes().split(b"\n", 1)[1])  # no "From " line: one message
    (tree / ".hidden").write_bytes(b"Subject: x\n\nhidden")
    (tree / "cmds").write_bytes(b"mv 00001.a 00001.b\n")
    (tree / "spam_2.cmds").write_bytes(b"mv 00001.a 00001.b\n")
    shutil.copytree(boxes["maildir"], tree / "c_maildir")
    shutil.copy(boxes["mbox"], tree / "d.mbox")
    wheres = [w for w, _ in iter_messages(tree)]
    rel = [Path(w.split("#")[0]).relative_to(tree).parts[0] for w in wheres]
    assert rel == ["a_single", "b_sub"] + ["c_maildir"] * (N + 1) + ["d.mbox"] * N + ["z_last"]

    spam_file = corpus_files("spam", 1)[0]  # starts with "From ": a one-message mbox
    assert spam_file.read_bytes().startswith(b"From ")
    [(where, raw)] = iter_messages(spam_file)
    assert where == str(spam_file) and raw.rstrip(b"\n") == spam_file.read_bytes().split(b"\n", 1)[1].rstrip(b"\n")
    with pytest.raises(DataError, match="no such file"):
        list(iter_messages(tmp_path / "missing"))


def test_skips_unreadable_files(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    for f in corpus_files("spam_2", 3):
        shutil.copy(f, tree / f.name)
    broken = tree / corpus_files("spam_2", 3)[1].name
    real_open = open

    def fake_open(file, *args, **kwargs):
        if Path(file) == broken:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)  # root reads any file: fake the refusal instead
    with LabelStore(tmp_path / "labels.sqlite") as store:
        report = learn(store, [tree], "spam")
    assert report.added == 2 and report.skipped == [(str(broken), "cannot read: Permission denied")]
    with LabelStore(tmp_path / "labels.sqlite") as store, pytest.raises(DataError, match="no such file"):
        learn(store, [tree, tmp_path / "typo"], "spam")


def test_cli_learn(boxes, tmp_path):
    cfg = tmp_path / "filterd.toml"
    cfg.write_text('[trainer]\nstore = "state/labels.sqlite"\n')  # relative to the config file
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "learn",
        "--config",
        str(cfg),
        "--spam",
        str(boxes["maildir"]),
        "--ham",
        str(boxes["mbox"]),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"spam: {N + 1} messages: 29 added, 0 relabelled, 1 unchanged, 1 skipped"
    assert lines[1] == f"ham: {N} messages: 30 added, 0 relabelled, 0 unchanged, 0 skipped"
    assert lines[2] == f"store {tmp_path / 'state' / 'labels.sqlite'}: 29 spam, 30 ham"
    assert "skipped" in out.stderr and "no text" in out.stderr

    other = tmp_path / "other.sqlite"
    out = subprocess.run(cmd[:6] + ["--set", f"trainer.store={other}", "--ham", str(boxes["mbox"])],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"store {other}: 0 spam, 30 ham"

    out = subprocess.run(cmd[:6] + ["--spam", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == f"filterd-trainer: error: {tmp_path / 'nope'}: no such file or directory"
