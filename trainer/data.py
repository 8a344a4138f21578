"""Labelled corpora for fine-tuning: read, balance, split, write CSV splits and a manifest.

`filterd-trainer prepare` is built on `prepare()`. It reads one or two sources (the UCI SMS Spam
Collection, a directory of raw e-mail in the SpamAssassin layout), undersamples the majority class,
splits 70/10/20 and writes `train.csv`, `val.csv`, `test.csv`, `holdout.csv` (the majority-class
messages that balancing left out) and `manifest.json` into a data directory. With two sources each
one is balanced and split on its own and the splits are then concatenated, so every source is in
every split in its own proportions (a pooled split would let the larger source crowd out the other).

The arithmetic follows the classification chapter of "Build a Large Language Model (From Scratch)":
undersample ham to the number of spam, shuffle, `train_end = int(n * 0.7)`,
`val_end = train_end + int(n * 0.1)`. Both steps use `random.Random(seed)`, so a seed fixes the
membership of every split; the counts (1045/149/300 for SMS) match the book, the members do not
(pandas' sampler is a different generator).

Every user-facing failure is a one-line `DataError` that names the file and, where there is one,
the line.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from filterd.errors import DataError
from filterd.mail.text import extract_text

from trainer.mailbox import MAX_MESSAGE_BYTES, TOO_LARGE, iter_messages, message_files, skipped_name

log = logging.getLogger(__name__)

LABELS = ("ham", "spam")
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_ZIP_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"
SMS_MEMBER = "SMSSpamCollection"
# Texts longer than this are cut when stored (the tokenizer truncates far earlier anyway).
MAX_TEXT_CHARS = 16_000

BALANCE_METHODS = ("undersample", "none")
SPLITS = ("train", "val", "test", "holdout")
CSV_HEADER = ["id", "label", "text"]
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class Example:
    id: str
    label: str
    text: str


# --------------------------------------------------------------------------- small helpers


def _one_line(text: object, limit: int = 200) -> str:
    """Errors are printed as one line: squash whitespace and cap the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc.strerror or exc)}") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc.strerror or exc)}") from None
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see half a file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DataError(f"{path}: cannot write: {_one_line(exc.strerror or exc)}") from None


def _is_empty(text: str) -> bool:
    return not text.strip()


# --------------------------------------------------------------------------- SMS Spam Collection


def read_sms(path: Path) -> list[Example]:
    """Read the UCI file: `label<TAB>text` per line, no header, no quoting; ids are `sms:<line>`."""
    path = Path(path)
    examples = []
    for lineno, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if lineno == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        examples.append(_parse_sms_line(path, lineno, raw))
    if not examples:
        raise DataError(f"{path}: no messages (expected lines of 'ham<TAB>text' or 'spam<TAB>text')")
    return examples


def _parse_sms_line(path: Path, lineno: int, raw: bytes) -> Example:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} of the line") from None
    label, tab, text = line.partition("\t")
    if not tab:
        raise DataError(f"{path}:{lineno}: no tab: expected 'ham<TAB>text' or 'spam<TAB>text'")
    if label not in LABELS:
        raise DataError(f"{path}:{lineno}: unknown label {_one_line(label, 40)!r} (expected ham or spam)")
    if _is_empty(text):
        raise DataError(f"{path}:{lineno}: empty text")
    return Example(f"sms:{lineno}", label, text)


def download_sms(dest_dir: Path, url: str = SMS_URL) -> Path:
    """Download the UCI zip into `dest_dir`, check its sha256, extract `SMSSpamCollection`.

    A zip already in `dest_dir` with the right hash is reused, so a re-run works offline.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest_dir}: cannot create: {_one_line(exc.strerror or exc)}") from None
    zip_path = dest_dir / "sms+spam+collection.zip"
    if not (zip_path.is_file() and _file_sha256(zip_path) == SMS_ZIP_SHA256):
        _fetch_verified(url, zip_path, SMS_ZIP_SHA256)
    return _extract_member(zip_path, SMS_MEMBER, dest_dir / SMS_MEMBER)


def _fetch_verified(url: str, dest: Path, expected_sha256: str) -> None:
    digest = hashlib.sha256()
    buf = io.BytesIO()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 16):
                digest.update(chunk)
                buf.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"cannot download {url}: {_one_line(reason)}; offline? download the file elsewhere and use --sms FILE"
        ) from None
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise DataError(f"{url}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    _write_atomic(dest, buf.getvalue())


def _extract_member(zip_path: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == member]
            if not names:
                raise DataError(f"{zip_path}: no member named {member}")
            data = archive.read(names[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{zip_path}: cannot extract {member}: {_one_line(exc)}") from None
    _write_atomic(dest, data)
    return dest


# --------------------------------------------------------------------------- raw e-mail


def read_messages(path: Path) -> list[tuple[str, bytes]]:
    """Raw messages from a file (one message, or an mbox), a Maildir, or a directory tree (trainer.mailbox's rules).

    Ids are relative to `path`: a file's name (`NAME#i`, counting from 0, for the members of an mbox
    holding several), or a directory member's relative path (`cur/1234.host:2,S`, `sub/00001.abc`).
    """
    path = Path(path)
    return list(iter_messages(path, root=path.parent if path.is_file() else path))


def _label_of(entry: Path) -> str | None:
    """The label an entry's name gives: a `_`/`-`/`.`-separated part starting with spam or ham.

    A bare prefix test would miss the SpamAssassin folders `easy_ham` and `hard_ham`.
    """
    parts = re.split(r"[^a-z0-9]+", entry.name.lower())
    found = {label for part in parts for label in LABELS if part.startswith(label)}
    if len(found) > 1:
        raise DataError(f"{entry}: the name says both ham and spam; rename it")
    return found.pop() if found else None


def _label_entries(path: Path) -> list[tuple[str, Path]]:
    """(label, entry) for the entries directly under a corpus dir that `_label_of` names, sorted."""
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise DataError(f"{path}: cannot list: {_one_line(exc.strerror or exc)}") from None
    found = [(label, e) for e in entries if not skipped_name(e.name) and (label := _label_of(e))]
    if not found:
        raise DataError(f"{path}: no entries named for a label (e.g. spam/, easy_ham/, spam_2/, ham.mbox)")
    return found


def _read_email_corpus(path: Path) -> tuple[list[Example], list[str]]:
    """Examples and the ids of the messages skipped because they have no text."""
    examples, skipped, too_large = [], [], []

    def on_error(where: str, reason: str) -> None:
        if not reason.startswith(TOO_LARGE):  # an unreadable corpus is an error; mail the daemon would refuse is not
            raise DataError(f"{where}: {reason}")
        too_large.append(where)

    for label, entry in _label_entries(path):
        for msg_id, raw in iter_messages(entry, on_error, root=path):  # ids relative to the corpus: `easy_ham/00001.…`
            text = extract_text(raw)
            if _is_empty(text):
                skipped.append(msg_id)
            else:
                examples.append(Example(msg_id, label, text))
    if skipped:
        log.warning("%s: skipped %d messages without text (first: %s)", path, len(skipped), skipped[0])
    if too_large:
        log.warning("%s: skipped %d messages over %d bytes (first: %s)", path, len(too_large), MAX_MESSAGE_BYTES, too_large[0])
    if not examples:
        raise DataError(f"{path}: no messages with text under its ham and spam entries")
    return examples, skipped


def read_email_dir(path: Path) -> list[Example]:
    """Labelled e-mail from a corpus directory; an entry's name gives its label.

    `spam`, `spam_2`, `spam.mbox` are spam; `ham`, `easy_ham`, `hard_ham`, `ham_maildir` are ham:
    a part of the name, split at `_`, `-` or `.`, starts with the label. Other entries are ignored.

    An entry may be a directory tree of raw messages, a Maildir or an mbox file, read by trainer.mailbox's
    rules (those of `filterd-trainer learn`). The text is `extract_text` (Subject + body); ids are paths
    relative to `path` (`#i` for the members of an mbox holding several). Messages without text are skipped
    (and logged).
    """
    return _read_email_corpus(Path(path))[0]


def _email_source_sha256(path: Path) -> str:
    """One hash for the corpus: sha256 over the sorted `relative path<TAB>file sha256` lines."""
    listing = sorted(
        (f.relative_to(path).as_posix(), _file_sha256(f)) for _, entry in _label_entries(path) for f, _ in message_files(entry)
    )
    return hashlib.sha256("".join(f"{rel}\t{sha}\n" for rel, sha in listing).encode()).hexdigest()


# --------------------------------------------------------------------------- balance and split


def balance(examples: Sequence[Example], method: str, seed: int) -> tuple[list[Example], list[Example]]:
    """Return (balanced, left_out).

    "undersample": all of the minority class plus a `random.Random(seed)` sample of the same size
    from the majority; both lists keep the input order. "none": (examples, []).
    """
    if method == "none":
        return list(examples), []
    if method != "undersample":
        raise DataError(f"unknown balance method {method!r} (expected {' or '.join(BALANCE_METHODS)})")
    by_label = {label: [i for i, e in enumerate(examples) if e.label == label] for label in LABELS}
    minority, majority = sorted(LABELS, key=lambda label: len(by_label[label]))  # stable: a tie keeps all
    n = len(by_label[minority])
    if n == 0:
        raise DataError(f"cannot undersample: no {minority} examples")
    keep = set(random.Random(seed).sample(by_label[majority], n))
    dropped = set(by_label[majority]) - keep
    balanced = [e for i, e in enumerate(examples) if i not in dropped]
    left_out = [e for i, e in enumerate(examples) if i in dropped]
    return balanced, left_out


def split(
    examples: Sequence[Example], seed: int, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with `random.Random(seed)` and cut into train/val/test; test takes the remainder."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    items = list(examples)
    random.Random(seed).shuffle(items)
    train_end = int(len(items) * fractions[0])
    val_end = train_end + int(len(items) * fractions[1])
    return items[:train_end], items[train_end:val_end], items[val_end:]


# --------------------------------------------------------------------------- CSV splits


def _storable(text: str) -> str:
    text = text[:MAX_TEXT_CHARS]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a lenient decoder: not representable in UTF-8
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def write_split(path: Path, examples: Iterable[Example]) -> None:
    """Write `id,label,text` CSV (UTF-8, RFC 4180 quoting, CRLF records) atomically."""
    buf = io.StringIO(newline="")
    # The default excel dialect ends records with \r\n, which makes the writer quote any field
    # holding \r or \n; with lineterminator="\n" a lone \r would be written bare and split the row.
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    writer.writerows([e.id, e.label, _storable(e.text)] for e in examples)
    _write_atomic(Path(path), buf.getvalue().encode("utf-8"))


def read_split(path: Path) -> list[Example]:
    """Read and validate a split CSV; errors name the line where the offending record starts."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1
    try:
        header = next(reader, None)
        if header != CSV_HEADER:
            found = "an empty file" if header is None else repr(_one_line(",".join(header), 80))
            raise DataError(f"{path}:1: expected the header id,label,text, found {found}")
        examples: list[Example] = []
        first_line: dict[str, int] = {}
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines carry no record
                examples.append(_parse_row(path, line, row, first_line))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{line}: {_one_line(exc)}") from None
    return examples


def _parse_row(path: Path, line: int, row: list[str], first_line: dict[str, int]) -> Example:
    if len(row) != 3:
        raise DataError(f"{path}:{line}: expected 3 columns (id,label,text), found {len(row)}")
    ex_id, label, text = row
    if not ex_id:
        raise DataError(f"{path}:{line}: empty id")
    if label not in LABELS:
        raise DataError(f"{path}:{line}: unknown label {_one_line(label, 40)!r} (expected ham or spam)")
    if _is_empty(text):
        raise DataError(f"{path}:{line}: empty text")
    if ex_id in first_line:
        first = first_line[ex_id]
        raise DataError(f"{path}:{line}: duplicate id {_one_line(ex_id, 80)!r} (first on line {first})")
    first_line[ex_id] = line
    return Example(ex_id, label, text)


# --------------------------------------------------------------------------- prepare and manifest


@dataclass
class SourceRecord:
    """One source of a several-source `prepare`, as recorded in `Manifest.sources`."""

    source: str  # "sms" or "email-dir"
    path: str
    sha256: str
    counts: dict[str, dict[str, int]]  # split -> label -> n, this source's share of each CSV
    url: str | None = None
    skipped_empty: int = 0
    duplicate_texts: int = 0


@dataclass
class Manifest:
    """What `prepare` wrote and from what; `manifest.json` in the data directory."""

    source: str  # "sms", "email-dir", or "sms+email-dir" for both
    source_path: str  # both: the two paths joined by " + "
    source_sha256: str  # SMS: the file's sha256; e-mail: see _email_source_sha256; both: over "kind<TAB>sha256" lines
    seed: int
    balance: str
    counts: dict[str, dict[str, int]]  # split -> label -> n
    files: dict[str, str]  # CSV name -> sha256
    created: str  # UTC, ISO 8601
    source_url: str | None = None  # set for --download-sms
    skipped_empty: int = 0  # e-mail messages without any text
    duplicate_texts: int = 0  # examples whose text equals an earlier one's (kept; reported only)
    format: int = MANIFEST_FORMAT
    # Several sources: one SourceRecord dict each; `source` is then e.g. "sms+email-dir". None (and
    # not written) for one source, so a one-source manifest reads as it always did.
    sources: list[dict] | None = None

    def to_json(self) -> str:
        fields_ = {k: v for k, v in asdict(self).items() if not (k == "sources" and v is None)}
        return json.dumps(fields_, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, data_dir: Path) -> Manifest:
        path = Path(data_dir) / MANIFEST_NAME
        try:
            raw = json.loads(_read_bytes(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON: {_one_line(exc)}") from None
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a filterd data manifest: {_one_line(exc)}") from None


def manifest_sha256(data_dir: Path) -> str:
    """sha256 of `manifest.json`'s bytes: identifies the data a model was trained on."""
    return hashlib.sha256(_read_bytes(Path(data_dir) / MANIFEST_NAME)).hexdigest()


# `prepare` takes keyword arguments named like these functions; keep handles on the functions.
_balance = balance
_download_sms = download_sms


def _count(examples: Iterable[Example]) -> dict[str, int]:
    counts = dict.fromkeys(LABELS, 0)
    for e in examples:
        counts[e.label] += 1
    return counts


def _duplicate_texts(examples: Iterable[Example]) -> int:
    seen: set[str] = set()
    dupes = 0
    for e in examples:
        dupes += e.text in seen
        seen.add(e.text)
    return dupes


@dataclass
class _Source:
    kind: str  # "sms" or "email-dir"
    path: Path
    sha256: str
    examples: list[Example]
    url: str | None = None
    skipped: int = 0


def _read_sources(out_dir: Path, sms: Path | None, download_sms: bool, email_dir: Path | None) -> list[_Source]:
    sources = []
    if sms is not None or download_sms:
        url = None
        if download_sms:
            url = SMS_URL  # looked up now, not bound as a default, so tests can point it elsewhere
            sms = _download_sms(out_dir, url)
        path = Path(sms)
        sources.append(_Source("sms", path, _file_sha256(path), read_sms(path), url))
    if email_dir is not None:
        path = Path(email_dir)
        examples, skipped = _read_email_corpus(path)
        sources.append(_Source("email-dir", path, _email_source_sha256(path), examples, skipped=len(skipped)))
    return sources


def _balance_and_split(source: _Source, method: str, seed: int) -> dict[str, list[Example]]:
    missing = [label for label, n in _count(source.examples).items() if n == 0]
    if missing:
        raise DataError(f"{source.path}: no {missing[0]} messages; training needs both ham and spam")
    balanced, left_out = _balance(source.examples, method, seed)
    train, val, test = split(balanced, seed)
    if not (train and val and test):
        raise DataError(f"{source.path}: {len(balanced)} messages after balancing: too few for a 70/10/20 split")
    return dict(zip(SPLITS, (train, val, test, left_out)))


def prepare(
    out_dir: Path,
    *,
    sms: Path | None = None,
    download_sms: bool = False,
    email_dir: Path | None = None,
    seed: int = 123,
    balance: str = "undersample",
) -> Manifest:
    """Read the sources, balance and split 70/10/20 each, write the four CSVs and then `manifest.json`.

    Sources: `sms` or `download_sms` (not both), and/or `email_dir`. With two, each is balanced and
    split on its own with `seed`, and each CSV holds the SMS part, then the e-mail part.
    """
    if sms is not None and download_sms:
        raise DataError("prepare takes --sms FILE or --download-sms, not both")
    if sms is None and not download_sms and email_dir is None:
        raise DataError("prepare needs a source: --sms FILE or --download-sms, and/or --email-dir DIR")
    if balance not in BALANCE_METHODS:
        raise DataError(f"unknown balance method {balance!r} (expected {' or '.join(BALANCE_METHODS)})")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create: {_one_line(exc.strerror or exc)}") from None

    sources = _read_sources(out_dir, sms, download_sms, email_dir)
    per_source = [_balance_and_split(src, balance, seed) for src in sources]
    # Ids stay unique across sources: SMS ids are `sms:N`, and every mail id starts with an entry
    # name that carries a label (`spam/…`, `easy_ham/…`, `ham.mbox#0`), which `sms:N` cannot.
    parts = {name: [e for p in per_source for e in p[name]] for name in SPLITS}

    files = {}
    for name, items in parts.items():
        csv_path = out_dir / f"{name}.csv"
        write_split(csv_path, items)
        files[csv_path.name] = _file_sha256(csv_path)
    if len(sources) == 1:
        one = sources[0]
        kind, path, sha, records = one.kind, str(one.path.resolve()), one.sha256, None
    else:
        kind = "+".join(src.kind for src in sources)
        path = " + ".join(str(src.path.resolve()) for src in sources)
        sha = hashlib.sha256("".join(f"{src.kind}\t{src.sha256}\n" for src in sources).encode()).hexdigest()
        records = [
            asdict(
                SourceRecord(
                    source=src.kind,
                    path=str(src.path.resolve()),
                    sha256=src.sha256,
                    counts={name: _count(items) for name, items in p.items()},
                    url=src.url,
                    skipped_empty=src.skipped,
                    duplicate_texts=_duplicate_texts(src.examples),
                )
            )  # fmt: skip
            for src, p in zip(sources, per_source)
        ]
    manifest = Manifest(
        source=kind,
        source_path=path,
        source_sha256=sha,
        seed=seed,
        balance=balance,
        counts={name: _count(items) for name, items in parts.items()},
        files=files,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source_url=next((src.url for src in sources if src.url), None),
        skipped_empty=sum(src.skipped for src in sources),
        duplicate_texts=_duplicate_texts(e for src in sources for e in src.examples),
        sources=records,
    )
    # Written last: a run that dies half-way leaves CSVs that do not match the (old) manifest's hashes.
    _write_atomic(out_dir / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    return manifest
