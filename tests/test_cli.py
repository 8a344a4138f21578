"""`filterd classify` and `filterd-trainer prepare` from the outside: JSON lines, clear one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_fit import run


def _lines(r: subprocess.CompletedProcess) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_classify_stdin_one_message_per_line_with_hostile_input(tiny_model):
    stdin = (
        b"WINNER!! Claim your free prize now, call 09061701461\n\n\xff\xfe invalid utf-8 \xc3\n"
        + b"x" * 100_000
        + b"\nsee you at 6?\n"
    )
    lines = _lines(run("-m", "filterd", "classify", "--model", str(tiny_model.model_dir), stdin=stdin))
    assert len(lines) == 5
    assert all(0.0 <= x["score"] <= 1.0 and x["verdict"] in ("spam", "ham") for x in lines)
    max_length = json.loads((tiny_model.model_dir / "filterd.json").read_text())["max_length"]
    assert lines[1]["tokens"] == 1  # empty line: scored as the lone end-of-text token
    assert lines[3]["tokens"] == max_length  # 100,000 characters: truncated


def test_classify_threshold_overrides_verdict(tiny_model):
    m = str(tiny_model.model_dir)
    assert _lines(run("-m", "filterd", "classify", "--model", m, "--threshold", "0", "hello"))[0]["verdict"] == "spam"
    assert _lines(run("-m", "filterd", "classify", "--model", m, "--threshold", "1", "hello"))[0]["verdict"] == "ham"


def test_classify_email_files(tiny_model, spamassassin_dir, tmp_path):
    files = sorted((spamassassin_dir / "spam").iterdir())[:3] + sorted((spamassassin_dir / "easy_ham").iterdir())[:3]
    broken = tmp_path / "broken.eml"
    broken.write_bytes(
        b"Content-Type: multipart/mixed; boundary=zz\n\n--zz\nContent-Type: text/plain; charset=bogus\n\n\xff oops"
    )
    lines = _lines(
        run("-m", "filterd", "classify", "--model", str(tiny_model.model_dir), "--email", *map(str, files), str(broken))
    )
    assert len(lines) == 7 and all(x["tokens"] >= 1 for x in lines)


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["classify", "--model", "/nonexistent", "hi"], "/nonexistent: no such model directory"),
        (["classify", "--model", ".", "--threshold", "2", "hi"], "--threshold must be within 0..1"),
        (["classify", "--model", "MODEL", "--email", "/nonexistent.eml"], "/nonexistent.eml: cannot read"),
    ],
)
def test_classify_errors_are_one_line(argv, expect, tiny_model):
    argv = [str(tiny_model.model_dir) if a == "MODEL" else a for a in argv]
    r = run("-m", "filterd", *argv)
    assert r.returncode == 1 and expect.encode() in r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr


def test_prepare_reports_counts_and_malformed_lines(sms_file, tmp_path):
    r = run("-m", "trainer", "prepare", "--sms", str(sms_file), "--out", str(tmp_path / "d"), "--seed", "123")
    assert r.returncode == 0, r.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in r.stdout.decode().splitlines()[:4]}
    assert counts == {"train": 1045, "val": 149, "test": 300, "holdout": 4080}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ham\tfine\nspam no tab here\n")
    r = run("-m", "trainer", "prepare", "--sms", str(bad), "--out", str(tmp_path / "e"))
    assert r.returncode == 1 and b"bad.txt:2" in r.stderr and r.stderr.count(b"\n") == 1


def test_console_scripts_installed():
    for script in ("filterd", "filterd-trainer"):
        r = subprocess.run([sys.executable.replace("python", script), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def test_version_on_both_commands():
    from importlib.metadata import version

    import filterd

    assert filterd.__version__ == version("filterd")  # one version: the package's
    for module, prog in (("filterd", "filterd"), ("trainer", "filterd-trainer")):
        r = run("-m", module, "--version")
        assert r.returncode == 0 and r.stdout.decode() == f"{prog} {filterd.__version__}\n", r


@pytest.mark.parametrize("how", ["io-error", "directory", "name-too-long"])
def test_unreadable_model_directory_exits_1_with_one_line(tiny_model, tmp_path, how):
    """Root ignores mode bits (these tests run as root), so the access is made to fail another way:
    filterd.json a link to /proc/self/mem (stat says regular file, read gives EIO), a directory, or
    a path the kernel refuses to look up (ENAMETOOLONG, raised where EACCES on a parent would be)."""
    import shutil

    from testing.services import free_port

    d = tmp_path / "model"
    shutil.copytree(tiny_model.model_dir, d)
    (d / "filterd.json").unlink()
    if how == "io-error":
        (d / "filterd.json").symlink_to("/proc/self/mem")
    elif how == "directory":
        (d / "filterd.json").mkdir()
    else:
        d = tmp_path / ("m" * 300)
    r = run("-m", "filterd", "serve", "--set", f"model.path={d}", "--set", "model.device=cpu", "--set", "redis.enabled=false",
            "--set", f"smtp.listen=127.0.0.1:{free_port()}", "--set", f"metrics.listen=127.0.0.1:{free_port()}")  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 1, err
    last = err.strip().splitlines()[-1]  # log lines of what did start may come first
    expect = {
        "io-error": f"{d / 'filterd.json'}: cannot read (Input/output error)",
        "directory": f"{d / 'filterd.json'}: cannot read (Is a directory)",
        "name-too-long": f"{d}: cannot open the model directory (File name too long)",
    }[how]
    assert last == f"filterd: error: {expect}", err
    assert "Traceback" not in err and "internal error" not in err


def test_serve_without_tokenizer_files_exits_1_without_network(tiny_model, tmp_path):
    """TIKTOKEN_CACHE_DIR empty: one line naming the directory and the file; no connection attempted
    (the child refuses and reports any connect, as a machine with network would let it happen)."""
    import os

    from testing.services import free_port

    guard = (
        "import socket, sys\n"
        "def refuse(*a, **k):\n"
        "    sys.stderr.write('NETWORK ATTEMPT %r\\n' % (a[1:2] or a[:1],)); raise OSError('no network')\n"
        "socket.create_connection = refuse\n"
        "local = socket.socket.connect\n"  # AF_UNIX (multiprocessing's forkserver) is not the network
        "socket.socket.connect = lambda s, a: local(s, a) if s.family == socket.AF_UNIX else refuse(s, a)\n"
        "resolve = socket.getaddrinfo\n"  # our own listeners resolve 127.0.0.1; anything else is a fetch
        "socket.getaddrinfo = lambda host, *a, **k: resolve(host, *a, **k) if host in ('127.0.0.1', None) else refuse(0, host)\n"
        "from filterd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    empty = tmp_path / "tiktoken"
    empty.mkdir()
    env = os.environ | {"TIKTOKEN_CACHE_DIR": str(empty)}
    argv = ["serve", "--set", f"model.path={tiny_model.model_dir}", "--set", "model.device=cpu", "--set", "redis.enabled=false",
            "--set", f"smtp.listen=127.0.0.1:{free_port()}", "--set", f"metrics.listen=127.0.0.1:{free_port()}"]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", guard, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "NETWORK ATTEMPT" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("filterd: error: GPT-2 tokenizer file vocab.bpe not found in " + str(empty)), r.stderr
    assert "TIKTOKEN_CACHE_DIR" in last


def test_classify_explain_adds_the_words_with_offsets(tiny_model):
    texts = ["WINNER!! Claim your free prize now, call 09061701461", "Héllo <b>bob</b>\tsee you at 6?"]
    lines = _lines(run("-m", "filterd", "classify", "--model", str(tiny_model.model_dir), "--explain", "--top", "2", *texts))
    for text, line in zip(texts, lines):
        e = line["explanation"]
        assert e["method"] == "integrated-gradients" and abs(e["score"] - line["score"]) < 1e-5
        assert 0 < len(e["words"]) <= 4
        for w in e["words"]:
            assert text[w["start"] : w["end"]] == w["word"] and w["weight"] != 0
    plain = _lines(run("-m", "filterd", "classify", "--model", str(tiny_model.model_dir), texts[0]))
    assert "explanation" not in plain[0]


def test_trainer_evaluate_explain_writes_errors_to_report(tiny_model, sms_data, tmp_path):
    """False positives and false negatives of the split with their top words, escaped for Markdown."""
    import csv

    data = tmp_path / "data"
    data.mkdir()
    from filterd.model.engine import Engine

    rows = [r for r in csv.DictReader((sms_data / "test.csv").open())][:120]
    # text no Markdown reader may interpret, labelled against the model's verdict so that it is an error
    hostile = "[click](http://evil.example) <script>alert(1)</script> | **FREE** prize `call` now WIN"
    verdict = Engine.load(tiny_model.model_dir, device="cpu").classify_texts([hostile])[0].verdict
    rows.append({"id": "x|1", "label": "ham" if verdict == "spam" else "spam", "text": hostile})
    with (data / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "label", "text"])
        w.writeheader()
        w.writerows(rows)
    report = tmp_path / "report.md"
    argv = ["evaluate", "--model", str(tiny_model.model_dir), "--data", str(data), "--explain", "--report", str(report)]
    r = run("-m", "trainer", *argv, "--top", "3")
    assert r.returncode == 0, r.stderr
    md = report.read_text()
    assert "## Metrics" in md and "## Errors explained: test" in md
    assert "### False positives (ham scored spam):" in md and "### False negatives (spam scored ham):" in md
    n_errors = sum(
        int(line.rsplit(": ", 1)[1])
        for line in md.splitlines()
        if line.startswith(("### False positives", "### False negatives"))
    )
    assert n_errors > 0  # the tiny model makes mistakes on 121 messages: the section is not empty
    assert "x\\|1" in md  # the hostile message is listed (its id escaped)...
    assert "<script>" not in md and "](http" not in md and "**FREE**" not in md  # ...and its words escaped
