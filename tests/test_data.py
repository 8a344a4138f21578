"""trainer.data: reading corpora, balancing, splitting, CSV splits, manifest, download check."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import mailbox
import re
import shutil
import socket
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from filterd.errors import DataError
from filterd.mail.text import extract_text
from trainer import data
from trainer.data import Example

SPLIT_FILES = ("train.csv", "val.csv", "test.csv", "holdout.csv")


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, line: int) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert f"{path}:{line}:" in message


def _counts(examples: list[Example]) -> Counter:
    return Counter(e.label for e in examples)


# --------------------------------------------------------------------------- SMS, real file


@pytest.fixture(scope="module")
def sms_prepared(sms_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sms123")
    data.prepare(out, sms=sms_file, seed=123)
    return out


def test_read_sms_real_file(sms_file):
    examples = data.read_sms(sms_file)
    assert _counts(examples) == {"ham": 4827, "spam": 747}
    assert examples[0].id == "sms:1" and examples[-1].id == "sms:5574"
    assert len({e.id for e in examples}) == len(examples)


def test_prepare_sms_seed_123_reference_counts(sms_prepared):
    splits = {name: data.read_split(sms_prepared / f"{name}.csv") for name in data.SPLITS}
    assert [len(splits[n]) for n in data.SPLITS] == [1045, 149, 300, 4080]
    balanced = splits["train"] + splits["val"] + splits["test"]
    assert _counts(balanced) == {"ham": 747, "spam": 747}
    assert _counts(splits["holdout"]) == {"ham": 4080}
    # Every message is in exactly one file.
    ids = [e.id for part in splits.values() for e in part]
    assert len(ids) == len(set(ids)) == 5574


def test_manifest_matches_files(sms_prepared, sms_file):
    manifest = data.Manifest.load(sms_prepared)
    assert manifest.source == "sms" and manifest.seed == 123 and manifest.balance == "undersample"
    assert manifest.source_sha256 == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
    assert manifest.created.endswith("Z")
    for name in data.SPLITS:
        path = sms_prepared / f"{name}.csv"
        counts = _counts(data.read_split(path))
        assert manifest.counts[name] == {label: counts[label] for label in data.LABELS}
        assert manifest.files[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    raw = (sms_prepared / "manifest.json").read_bytes()
    assert data.manifest_sha256(sms_prepared) == hashlib.sha256(raw).hexdigest()


def test_same_seed_same_files_other_seed_other_members(sms_prepared, sms_file, tmp_path):
    again = tmp_path / "again"
    data.prepare(again, sms=sms_file, seed=123)
    for name in SPLIT_FILES:
        assert (again / name).read_bytes() == (sms_prepared / name).read_bytes(), name

    other = tmp_path / "other"
    manifest = data.prepare(other, sms=sms_file, seed=7)
    assert [sum(manifest.counts[n].values()) for n in data.SPLITS] == [1045, 149, 300, 4080]
    for name in SPLIT_FILES:
        ids = {e.id for e in data.read_split(other / name)}
        assert ids != {e.id for e in data.read_split(sms_prepared / name)}, name


def test_prepare_balance_none_writes_empty_holdout(sms_file, tmp_path):
    manifest = data.prepare(tmp_path, sms=sms_file, balance="none")
    assert manifest.counts["holdout"] == {"ham": 0, "spam": 0}
    assert (tmp_path / "holdout.csv").read_bytes() == b"id,label,text\r\n"
    n = 5574
    assert [sum(manifest.counts[s].values()) for s in ("train", "val", "test")] == [3901, 557, n - 3901 - 557]


# --------------------------------------------------------------------------- SMS, bad files


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        (b"ham\tfine\nspam without a tab\n", 2, "no tab"),
        (b"ham\tfine\n\nspam\tfine too\nSPAM\tshouting\n", 4, "unknown label 'SPAM'"),
        (b"ham\tfine\nham\tcaf\xe9 latin-1\n", 2, "invalid UTF-8"),
        (b"ham\tfine\nspam\t  \n", 2, "empty text"),
    ],
)
def test_read_sms_rejects_malformed_lines(tmp_path, content, line, fragment):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        data.read_sms(path)
    _assert_one_line_naming(exc, path, line)
    assert fragment in str(exc.value)


def test_read_sms_skips_blank_lines_and_keeps_quotes(tmp_path):
    path = tmp_path / "ok.tsv"
    path.write_bytes(b'ham\tHe said "hi\n\nspam\tWIN\ta prize, "now"\r\n')
    assert data.read_sms(path) == [
        Example("sms:1", "ham", 'He said "hi'),
        Example("sms:3", "spam", 'WIN\ta prize, "now"'),
    ]


def test_read_sms_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        data.read_sms(tmp_path / "nope")


# --------------------------------------------------------------------------- balance and split


def test_balance_undersample_and_none():
    examples = [Example(str(i), "ham" if i % 4 else "spam", f"t{i}") for i in range(40)]
    balanced, left_out = data.balance(examples, "undersample", seed=1)
    assert _counts(balanced) == {"ham": 10, "spam": 10} and _counts(left_out) == {"ham": 20}
    assert set(balanced) | set(left_out) == set(examples)
    assert balanced == sorted(balanced, key=lambda e: int(e.id))  # input order kept
    assert data.balance(examples, "undersample", seed=1) == (balanced, left_out)
    assert data.balance(examples, "undersample", seed=2)[0] != balanced
    assert data.balance(examples, "none", seed=1) == (examples, [])
    with pytest.raises(DataError, match="unknown balance method"):
        data.balance(examples, "oversample", seed=1)
    with pytest.raises(DataError, match="no spam"):
        data.balance([Example("1", "ham", "x")], "undersample", seed=1)


def test_split_uses_the_book_arithmetic():
    examples = [Example(str(i), "ham", "x") for i in range(1494)]
    train, val, test = data.split(examples, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train + val + test, key=lambda e: int(e.id)) == examples
    assert data.split(examples, seed=123) == (train, val, test)


# --------------------------------------------------------------------------- CSV splits


def test_split_csv_round_trip(tmp_path):
    tricky = [
        Example("a", "ham", 'commas, "quotes", and ""doubled"" ones'),
        Example("b", "spam", "line one\nline two\r\nline three\rend"),
        Example("c", "ham", "unicode: 日本語 ☃ \u2028 tab\there, NUL\x00"),
        Example("d,e", "spam", "   leading and trailing spaces   "),
        Example("long", "spam", "x" * (data.MAX_TEXT_CHARS + 500)),
    ]
    path = tmp_path / "split.csv"
    data.write_split(path, tricky)
    back = data.read_split(path)
    assert back[:-1] == tricky[:-1]
    assert back[-1].text == "x" * data.MAX_TEXT_CHARS
    assert not [p for p in tmp_path.iterdir() if p.name != "split.csv"]  # no temp files left behind


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "split.csv"
    path.write_text(text, encoding="utf-8", newline="")
    return path


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("id,text,label\r\n1,hi,ham\r\n", 1, "expected the header"),
        ("", 1, "empty file"),
        ('id,label,text\r\n1,ham,"multi\nline"\r\n2,maybe,hi\r\n', 4, "unknown label 'maybe'"),
        ('id,label,text\r\n1,ham,"a\nb\nc"\r\n2,spam,hi,extra\r\n', 5, "expected 3 columns"),
        ("id,label,text\r\n1,ham\r\n", 2, "found 2"),
        ("id,label,text\r\n,ham,hi\r\n", 2, "empty id"),
        ("id,label,text\r\n1,ham,hi\r\n1,spam,ho\r\n", 3, "duplicate id '1' (first on line 2)"),
        ("id,label,text\r\n1,ham,\r\n", 2, "empty text"),
    ],
)
def test_read_split_rejects_bad_rows(tmp_path, text, line, fragment):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as exc:
        data.read_split(path)
    _assert_one_line_naming(exc, path, line)
    assert fragment in str(exc.value)


def test_read_split_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "split.csv"
    path.write_bytes(b"id,label,text\n1,ham,ok\n2,spam,caf\xe9\n")
    with pytest.raises(DataError) as exc:
        data.read_split(path)
    _assert_one_line_naming(exc, path, 3)


# --------------------------------------------------------------------------- e-mail


def _real_files(corpus: Path, folder: str, n: int) -> list[Path]:
    # Messages whose body has no "From " line: mbox storage would escape it, changing the text.
    files = sorted((corpus / folder).iterdir())
    return [f for f in files if b"\nFrom " not in f.read_bytes()][:n]


@pytest.fixture()
def small_corpus(spamassassin_dir, tmp_path) -> tuple[Path, dict[str, str]]:
    """A corpus with every supported layout; returns it and the expected {id: label}."""
    root = tmp_path / "corpus"
    expected: dict[str, str] = {}
    for folder, label, src in (("spam", "spam", "spam"), ("ham", "ham", "easy_ham")):
        (root / folder).mkdir(parents=True)
        for f in _real_files(spamassassin_dir, src, 10):
            shutil.copy(f, root / folder / f.name)
            expected[f"{folder}/{f.name}"] = label
    (root / "spam" / "cmds").write_text("mv 1 1\n")  # upstream tarball noise
    (root / "ham" / ".DS_Store").write_bytes(b"\0\0")
    (root / "ham" / "00000.empty").write_bytes(b"From: nobody@example.com\n\n")  # no text: skipped

    maildir = root / "ham_maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    hams = _real_files(spamassassin_dir, "hard_ham", 4)
    for sub, f in zip(("cur", "cur", "new", "tmp"), hams):
        name = f"{f.name[:5]}.host" + (":2,S" if sub == "cur" else "")
        shutil.copy(f, maildir / sub / name)
        if sub != "tmp":  # tmp/ holds deliveries in progress
            expected[f"ham_maildir/{sub}/{name}"] = "ham"

    box = mailbox.mbox(root / "spam.mbox")
    for i, f in enumerate(_real_files(spamassassin_dir, "spam_2", 3)):
        box.add(f.read_bytes())
        expected[f"spam.mbox#{i}"] = "spam"
    box.close()
    (root / "README.txt").write_text("not a label entry\n")
    return root, expected


def test_read_email_dir_layouts(small_corpus, spamassassin_dir):
    root, expected = small_corpus
    examples = data.read_email_dir(root)
    assert {e.id: e.label for e in examples} == expected
    assert _counts(examples) == {"spam": 13, "ham": 13}
    entries = [re.split("[/#]", e.id)[0] for e in examples]
    assert entries == sorted(entries)  # entries in name order, whatever the layout
    by_id = {e.id: e for e in examples}
    for ex_id in [i for i in expected if "/" in i and "maildir" not in i]:
        assert by_id[ex_id].text == extract_text((root / ex_id).read_bytes())
    mbox_sources = _real_files(spamassassin_dir, "spam_2", 3)
    for i, f in enumerate(mbox_sources):
        assert by_id[f"spam.mbox#{i}"].text == extract_text(f.read_bytes())
    assert data.read_email_dir(root) == examples  # deterministic


def test_prepare_email_dir_small(small_corpus, tmp_path):
    root, expected = small_corpus
    manifest = data.prepare(tmp_path / "out", email_dir=root, seed=5)
    assert manifest.source == "email-dir" and manifest.skipped_empty == 1
    assert sum(sum(c.values()) for c in manifest.counts.values()) == len(expected)
    assert [sum(manifest.counts[s].values()) for s in ("train", "val", "test")] == [18, 2, 6]
    first_sha = manifest.source_sha256
    assert data.prepare(tmp_path / "again", email_dir=root, seed=5).source_sha256 == first_sha
    with open(root / "spam.mbox", "ab") as f:
        f.write(b"\n")
    assert data.prepare(tmp_path / "changed", email_dir=root, seed=5).source_sha256 != first_sha


def test_read_messages_file_mbox_maildir(small_corpus, spamassassin_dir, tmp_path):
    root, _ = small_corpus
    real = sorted((spamassassin_dir / "spam").iterdir())[0]  # starts with an mbox "From " line: an mbox of one message
    assert [i for i, _ in data.read_messages(real)] == [real.name]
    bare = tmp_path / "bare.eml"
    bare.write_bytes(b"Subject: hi\n\nbody\n")
    assert data.read_messages(bare) == [("bare.eml", b"Subject: hi\n\nbody\n")]
    mbox_ids = [i for i, _ in data.read_messages(root / "spam.mbox")]
    assert mbox_ids == ["spam.mbox#0", "spam.mbox#1", "spam.mbox#2"]
    maildir_ids = [i for i, _ in data.read_messages(root / "ham_maildir")]
    assert len(maildir_ids) == 3 and all(i.startswith(("cur/", "new/")) for i in maildir_ids)
    assert len(data.read_messages(root / "spam")) == 10  # cmds skipped
    with pytest.raises(DataError, match="no such file"):
        data.read_messages(tmp_path / "missing")


def test_email_dir_without_label_entries(tmp_path):
    (tmp_path / "inbox").mkdir()
    with pytest.raises(DataError, match="no entries named for a label"):
        data.read_email_dir(tmp_path)


def test_prepare_full_spamassassin_corpus(spamassassin_dir, tmp_path):
    manifest = data.prepare(tmp_path, email_dir=spamassassin_dir, balance="none", seed=123)
    assert manifest.skipped_empty == 0
    total = {label: sum(manifest.counts[s][label] for s in data.SPLITS) for label in data.LABELS}
    assert total == {"ham": 4150, "spam": 1896}
    n = 6046 - manifest.skipped_empty
    sizes = [sum(manifest.counts[s].values()) for s in data.SPLITS]
    assert sizes == [int(n * 0.7), int(n * 0.1), n - int(n * 0.7) - int(n * 0.1), 0]  # 4232/604/1210/0
    test = data.read_split(tmp_path / "test.csv")
    folders = {"easy_ham": "ham", "easy_ham_2": "ham", "hard_ham": "ham", "spam": "spam", "spam_2": "spam"}
    assert len(test) == sizes[2]
    assert all(folders[e.id.split("/")[0]] == e.label for e in test)


# --------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_dir(tmp_path):
    """A directory served on 127.0.0.1; yields (dir, base URL)."""
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buf.getvalue()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/sms.zip"


def test_download_sms_rejects_wrong_hash(http_dir, tmp_path):
    served, base = http_dir
    payload = _zip_bytes({"SMSSpamCollection": b"ham\tnot the real file\n"})
    (served / "sms.zip").write_bytes(payload)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as exc:
        data.download_sms(dest, url=f"{base}/sms.zip")
    message = str(exc.value)
    assert data.SMS_ZIP_SHA256 in message and hashlib.sha256(payload).hexdigest() in message
    assert "\n" not in message
    assert not list(dest.iterdir())  # nothing kept from a bad download


def test_download_sms_extracts_and_reuses_verified_zip(http_dir, tmp_path, monkeypatch):
    served, base = http_dir
    content = b"ham\thello\nspam\twin\n"
    payload = _zip_bytes({"SMSSpamCollection": content, "readme": b"about"})
    (served / "sms.zip").write_bytes(payload)
    monkeypatch.setattr(data, "SMS_ZIP_SHA256", hashlib.sha256(payload).hexdigest())
    path = data.download_sms(tmp_path, url=f"{base}/sms.zip")
    assert path == tmp_path / "SMSSpamCollection" and path.read_bytes() == content
    path.unlink()
    # A verified zip already there is used without the network.
    assert data.download_sms(tmp_path, url=_closed_port_url()).read_bytes() == content


def test_download_sms_offline_is_one_line(tmp_path):
    with pytest.raises(DataError) as exc:
        data.download_sms(tmp_path, url=_closed_port_url())
    message = str(exc.value)
    assert "\n" not in message and "offline" in message and "--sms FILE" in message


def test_prepare_download_sms(http_dir, tmp_path, monkeypatch):
    served, base = http_dir
    lines = [f"{'spam' if i % 2 else 'ham'}\tmessage {i}" for i in range(30)]
    payload = _zip_bytes({"SMSSpamCollection": "\n".join(lines).encode() + b"\n"})
    (served / "sms.zip").write_bytes(payload)
    monkeypatch.setattr(data, "SMS_URL", f"{base}/sms.zip")
    monkeypatch.setattr(data, "SMS_ZIP_SHA256", hashlib.sha256(payload).hexdigest())
    manifest = data.prepare(tmp_path, download_sms=True)
    assert manifest.source_url == f"{base}/sms.zip"
    assert [sum(manifest.counts[s].values()) for s in data.SPLITS] == [21, 3, 6, 0]


# --------------------------------------------------------------------------- prepare arguments


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({}, "needs a source"), ({"sms": Path("a"), "download_sms": True}, "not both")],
)
def test_prepare_needs_a_source(tmp_path, kwargs, fragment):
    with pytest.raises(DataError, match=fragment):
        data.prepare(tmp_path, **kwargs)


def test_cli_prepare_without_source_is_one_line_exit_1(tmp_path, capsys):
    from trainer.cli import main

    assert main(["prepare", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a source" in err and "--email-dir" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- several sources

# sha256 of the CSVs `prepare --sms SMSSpamCollection --seed 123` wrote before several sources were
# accepted: one source must give the same bytes as it always did.
SMS_SEED_123_FILES = {
    "train.csv": "aef59af83277d4e93970787eec455c0e9b9aa84e64d1eb21b892fb005eb4b769",
    "val.csv": "205ce2f29a6c8babe2a9ddd98841e9b27950425cd9b4ff3456cc1d202cf1a6f9",
    "test.csv": "df21350814b502f598321005b8efaddf38b4c7f1cff9f8534c3f7afa6a3c2f0b",
    "holdout.csv": "38fb2c65a28264cf3fc6e844f1bbae0799615daa97cbd6250443e491719a4121",
}
ONE_SOURCE_MANIFEST_KEYS = {"balance", "counts", "created", "duplicate_texts", "files", "format", "seed",
                            "skipped_empty", "source", "source_path", "source_sha256", "source_url"}  # fmt: skip


def test_one_source_output_unchanged(sms_prepared):
    assert data.Manifest.load(sms_prepared).files == SMS_SEED_123_FILES
    assert set(json.loads((sms_prepared / "manifest.json").read_text())) == ONE_SOURCE_MANIFEST_KEYS


def test_prepare_two_sources_splits_each_source(sms_file, sms_prepared, small_corpus, tmp_path):
    root, expected = small_corpus
    mail_only = tmp_path / "mail"
    data.prepare(mail_only, email_dir=root, seed=123)
    both = tmp_path / "both"
    manifest = data.prepare(both, sms=sms_file, email_dir=root, seed=123)

    for name in data.SPLITS:
        merged = data.read_split(both / f"{name}.csv")
        sms_part = data.read_split(sms_prepared / f"{name}.csv")
        mail_part = data.read_split(mail_only / f"{name}.csv")
        # Each source balanced and split on its own, exactly as a one-source prepare; then concatenated.
        assert merged == sms_part + mail_part, name
        if name != "holdout":  # every source is in every split
            assert sms_part and mail_part and {e.id[:4] == "sms:" for e in merged} == {True, False}

    assert manifest.source == "sms+email-dir"
    assert str(sms_file.resolve()) in manifest.source_path and str(root.resolve()) in manifest.source_path
    on_disk = data.Manifest.load(both)
    assert on_disk.sources == manifest.sources
    sms_rec, mail_rec = on_disk.sources
    assert (sms_rec["source"], sms_rec["path"]) == ("sms", str(sms_file.resolve()))
    assert sms_rec["sha256"] == data.Manifest.load(sms_prepared).source_sha256
    assert sms_rec["counts"] == data.Manifest.load(sms_prepared).counts
    assert (mail_rec["source"], mail_rec["path"]) == ("email-dir", str(root.resolve()))
    assert mail_rec["sha256"] == data.Manifest.load(mail_only).source_sha256
    assert mail_rec["counts"] == data.Manifest.load(mail_only).counts and mail_rec["skipped_empty"] == 1
    for name in data.SPLITS:
        for label in data.LABELS:
            assert on_disk.counts[name][label] == sms_rec["counts"][name][label] + mail_rec["counts"][name][label]
        path = both / f"{name}.csv"
        assert on_disk.files[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sum(sum(c.values()) for c in on_disk.counts.values()) == 5574 + len(expected)


def test_prepare_two_sources_bad_source_names_it(small_corpus, tmp_path):
    root, _ = small_corpus
    only_ham = tmp_path / "ham.tsv"
    only_ham.write_text("".join(f"ham\tmsg {i}\n" for i in range(20)))
    with pytest.raises(DataError, match=f"{only_ham}: no spam messages"):
        data.prepare(tmp_path / "out", sms=only_ham, email_dir=root)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_rejects_unknown_balance_and_one_class(sms_file, tmp_path):
    with pytest.raises(DataError, match="unknown balance method"):
        data.prepare(tmp_path, sms=sms_file, balance="smote")
    only_ham = tmp_path / "ham.tsv"
    only_ham.write_text("".join(f"ham\tmsg {i}\n" for i in range(20)))
    with pytest.raises(DataError, match="no spam messages"):
        data.prepare(tmp_path / "out", sms=only_ham, balance="none")
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("ham\ta\nspam\tb\nham\tc\n")
    with pytest.raises(DataError, match="too few"):
        data.prepare(tmp_path / "out", sms=tiny)
