"""`filterd-trainer pretrain`: held-out LM loss, the checkpoint fit loads, bad input, interruption and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from filterd.errors import DataError
from filterd.model.bases import build_model, resolve_base
from trainer.cli import main
from trainer.pretrain import MAX_DOC_CHARS, PretrainConfig, PretrainInterrupted, pretrain, read_corpus, state_dir_for

from tests.conftest import REPO, SMS_FILE

# Small and fast: the tiny model's cost is its 50,257-way LM head, so blocks and batches stay small.
FAST = dict(base="random:tiny", block_size=32, batch_size=4, lr=1e-3, eval_every=1000, checkpoint_every=1000, progress=False)


@pytest.fixture(scope="module")
def sms_lines(tmp_path_factory) -> Path:
    """300 UCI SMS texts, one per line (the labels dropped)."""
    path = tmp_path_factory.mktemp("corpus") / "sms.txt"
    lines = SMS_FILE.read_text(encoding="utf-8").splitlines()[:300]
    path.write_text("\n".join(line.split("\t", 1)[1] for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sms_lines):
    out = tmp_path_factory.mktemp("pretrained") / "tiny-sms"
    return pretrain(PretrainConfig(out=out, text=[sms_lines], steps=40, val_fraction=0.1, **{**FAST, "batch_size": 8}))


def _no_leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == name]


def test_held_out_loss_goes_down(pretrained):
    r = pretrained
    assert r.steps == 40 and r.tokens_seen == 40 * 8 * 32
    assert r.val_loss_before is not None and r.val_loss_after is not None
    assert r.val_loss_after < r.val_loss_before - 1.0, (r.val_loss_before, r.val_loss_after)
    record = json.loads((r.out / "pretrain.json").read_text())
    assert record["val_loss_after"] == r.val_loss_after and record["corpus"]["documents"] == {"text": 300}
    assert record["corpus"]["held_out_documents"] > 0 and record["base_kind"] == "random"
    assert sorted(p.name for p in r.out.iterdir()) == ["config.json", "model.safetensors", "pretrain.json"]
    assert not state_dir_for(r.out).exists()  # a finished run leaves nothing to resume


def test_checkpoint_matches_the_reference_implementation(pretrained):
    """Hugging Face's GPT2LMHeadModel reads OUT and computes our logits: the Conv1D transposes are right."""
    from transformers import GPT2LMHeadModel

    ours = build_model(resolve_base(str(pretrained.out))).eval()  # what `fit --base OUT` loads
    hf = GPT2LMHeadModel.from_pretrained(str(pretrained.out)).eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 286, 262, 50256, 1110]])
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_logits(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_fit_accepts_the_result(pretrained, tmp_path, sms_data):
    from trainer.data import read_split, write_split
    from trainer.fit import FitConfig, fit

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        examples = read_split(sms_data / f"{split}.csv")
        write_split(
            data / f"{split}.csv",
            [e for e in examples if e.label == "ham"][: n // 2] + [e for e in examples if e.label == "spam"][: n // 2],
        )
    result = fit(FitConfig(data=data, base=str(pretrained.out), out=tmp_path / "model", trainable="all", epochs=1,
                           max_length=32, progress=False))  # fmt: skip
    # grown here from random:tiny: recorded as such, never as GPT-2
    assert result.meta.base == str(pretrained.out.resolve()) and result.meta.base_kind == "self-pretrained"
    assert (tmp_path / "model" / "filterd.json").is_file()
    assert "SELF-PRETRAINED HERE FROM RANDOM INITIALISATION" in (tmp_path / "model" / "report.md").read_text()


def test_empty_corpus_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    rc = main(["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "out"), "--text", str(tmp_path / "empty.txt"),
               "--mail", str(tmp_path / "mail"), "--steps", "5"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == "filterd-trainer: error: pretrain: the corpus has no text (skipped: 1 binary)"
    assert _no_leftovers(tmp_path, "out") == []


def test_missing_source_and_bad_budget_are_errors(tmp_path, capsys):
    assert main(["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "o"), "--text", str(tmp_path / "nope")]) == 1
    assert "nope: no such file or directory" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello\n")
    assert main(["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "o"), "--text", str(tmp_path / "t.txt"),
                 "--steps", "3", "--time", "1m"]) == 1  # fmt: skip
    assert "--steps or --time" in capsys.readouterr().err
    (tmp_path / "f").write_text("not a directory")
    assert main(["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "f"), "--text", str(tmp_path / "t.txt")]) == 1
    assert "f: exists and is not a directory" in capsys.readouterr().err and (tmp_path / "f").read_text() == "not a directory"
    assert _no_leftovers(tmp_path, "o") == []


def test_binary_files_are_skipped_and_counted(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_bytes("caf\xe9 menu\n".encode("latin-1") + b"free prize now\n")  # not UTF-8: replacement
    (text / "b.bin").write_bytes(bytes(range(256)) * 4)
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "1").write_bytes(b"Subject: hello\r\n\r\nlunch at noon?\r\n")
    (mail / "2").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    corpus = read_corpus(PretrainConfig(base="random:tiny", out=tmp_path / "o", text=[text], mail=[mail], val_fraction=0))
    assert corpus.documents == {"text": 2, "mail": 1}
    assert corpus.skipped == {"binary": 2}
    assert corpus.train[0] == 50256 and int((corpus.train == 50256).sum()) == 4  # one leading, one after each document


def test_a_50_mb_mail_is_clipped(tmp_path):
    big = tmp_path / "big.eml"
    with open(big, "wb") as f:
        f.write(b"From: a@example.org\r\nSubject: huge\r\nContent-Type: text/plain\r\n\r\n")
        line = b"cheap watches and more cheap watches for everyone today\r\n"
        f.write(line * (50 * 2**20 // len(line) + 1))
    assert big.stat().st_size > 50 * 2**20
    corpus = read_corpus(PretrainConfig(base="random:tiny", out=tmp_path / "o", mail=[big], val_fraction=0))
    assert corpus.documents == {"mail": 1} and corpus.clipped == 1
    assert len(corpus.train) <= MAX_DOC_CHARS // 2  # one document's worth of tokens, not 50 MB's


def test_interrupted_run_resumes_at_the_saved_step(tmp_path, sms_lines):
    """SIGINT mid-run: the step finishes, the state is saved, OUT does not appear; --resume continues exactly."""
    out = tmp_path / "out"
    cfg = dict(FAST, out=out, text=[sms_lines], steps=10, batch_size=2, block_size=16)

    def interrupt(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(PretrainInterrupted, match="stopped by SIGINT at step 4.*--resume"):
        pretrain(PretrainConfig(**cfg, on_step=interrupt))
    assert not out.exists() and json.loads((state_dir_for(out) / "state.json").read_text())["step"] == 4
    with pytest.raises(DataError, match="--resume"):  # a fresh start must not silently discard the saved run
        pretrain(PretrainConfig(**cfg))
    with pytest.raises(DataError, match="different run .*corpus_sha256"):
        pretrain(PretrainConfig(**{**cfg, "text": [sms_lines, sms_lines]}, resume=True))

    resumed = pretrain(PretrainConfig(**cfg, resume=True))
    assert resumed.resumed_from == 4 and resumed.steps == 10 and resumed.tokens_seen == 10 * 2 * 16
    assert not state_dir_for(out).exists()
    straight = pretrain(PretrainConfig(**{**cfg, "out": tmp_path / "straight"}))
    a, b = resolve_base(str(out)).state, resolve_base(str(tmp_path / "straight")).state
    for k in a:  # same weights as a run that was never interrupted
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert resumed.val_loss_before == straight.val_loss_before


def test_crash_resumes_from_the_last_checkpoint(tmp_path, sms_lines):
    out = tmp_path / "out"
    cfg = dict(FAST, out=out, text=[sms_lines], steps=8, batch_size=2, block_size=16, checkpoint_every=3)

    def crash(step: int) -> None:
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        pretrain(PretrainConfig(**cfg, on_step=crash))
    assert not out.exists() and _no_leftovers(tmp_path, "out") == [".out.pretrain-state"]  # no staging debris
    resumed = pretrain(PretrainConfig(**cfg, resume=True))
    assert resumed.resumed_from == 3 and resumed.steps == 8 and out.is_dir()


def test_sigterm_from_outside_then_cli_resume(tmp_path, sms_lines, capsys):
    """The real thing: the CLI in its own process, killed with SIGTERM, resumed from the command line."""
    out = tmp_path / "out"
    args = ["pretrain", "--base", "random:tiny", "--out", str(out), "--text", str(sms_lines), "--block-size", "16",
            "--batch-size", "2", "--eval-every", "2", "--checkpoint-every", "1000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(  # cwd: `python -m` puts the working directory first on sys.path
        [sys.executable, "-m", "trainer", *args, "--steps", "100000"], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    seen: list[str] = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if "step 2:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        err = "".join(seen) + proc.stderr.read()  # type: ignore[union-attr]
        rc = proc.wait(timeout=60)
        assert rc == 1, (rc, err[-2000:])
    finally:
        proc.kill()
    last = err.strip().splitlines()[-1]
    assert last.startswith("filterd-trainer: error: pretrain: stopped by SIGTERM at step ") and "--resume" in last
    saved = json.loads((state_dir_for(out) / "state.json").read_text())["step"]
    assert not out.exists() and saved >= 2
    assert main([*args, "--steps", str(saved + 2), "--resume"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resumed_from"] == saved and result["steps"] == saved + 2
    assert (out / "model.safetensors").is_file() and not state_dir_for(out).exists()


def test_time_budget(tmp_path, sms_lines, capsys):
    assert main(["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "o"), "--text", str(sms_lines),
                 "--block-size", "16", "--batch-size", "2", "--time", "1s"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] >= 1 and json.loads((tmp_path / "o" / "pretrain.json").read_text())["steps"] == result["steps"]


def test_csv_directory_leaves_test_out_and_store_is_read(tmp_path, sms_data):
    from trainer.data import Manifest
    from filterd.store.labels import LabelStore

    counts = Manifest.load(sms_data).counts
    with LabelStore(tmp_path / "labels.sqlite") as store:
        store.add("win a prize", "spam", "learn")
        store.add("see you at lunch", "ham", "learn")
    cfg = PretrainConfig(
        base="random:tiny", out=tmp_path / "o", csv=[sms_data], store=tmp_path / "labels.sqlite", val_fraction=0.05
    )
    corpus = read_corpus(cfg)
    assert corpus.documents == {"csv": sum(sum(counts[s].values()) for s in ("train", "val", "holdout")), "store": 2}
    assert corpus.val_docs > 0 and corpus.train_docs + corpus.val_docs == sum(corpus.documents.values())


def test_reservoirs_are_read(tmp_path, capsys):
    """`--reservoir` (repeatable): the texts the daemon sampled are documents, labels never needed."""
    from filterd.store.reservoir import Reservoir

    for name, n in (("a", 12), ("b", 5)):
        with Reservoir(tmp_path / f"{name}.sqlite", size=10, max_age=86400) as r:
            r.add_many((f"{name} message number {i} about the weekly meeting", "smtp", None) for i in range(n))
    corpus = read_corpus(PretrainConfig(base="random:tiny", out=tmp_path / "o", reservoir=[tmp_path / "a.sqlite"], val_fraction=0))
    assert corpus.documents == {"reservoir": 10}  # the reservoir kept 10 of its 12
    args = ["pretrain", "--base", "random:tiny", "--out", str(tmp_path / "out"), "--block-size", "16", "--batch-size", "2",
            "--steps", "2", "--reservoir", str(tmp_path / "a.sqlite"), "--reservoir", str(tmp_path / "b.sqlite")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "pretrain.json").read_text())["corpus"]["documents"] == {"reservoir": 15}
    (tmp_path / "labels.sqlite").write_bytes(b"")  # an empty SQLite file is no reservoir: one line, nothing written
    assert main([*args[:4], str(tmp_path / "o2"), "--reservoir", str(tmp_path / "labels.sqlite")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("labels.sqlite: not a reservoir")
    assert not (tmp_path / "o2").exists()


def test_repeated_source_flags_add_up():
    from trainer.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--base", "random:tiny", "--out", "o", "--csv", "a", "--csv", "b", "c",
                                      "--text", "t1", "--text", "t2", "--mail", "m1", "--mail", "m2"])  # fmt: skip
    assert [str(p) for p in args.csv] == ["a", "b", "c"]
    assert [str(p) for p in args.text] == ["t1", "t2"] and [str(p) for p in args.mail] == ["m1", "m2"]
