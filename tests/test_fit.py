"""Fine-tuning end to end on the real UCI split with a small random model, and the model it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from filterd.model.engine import Engine
from filterd.errors import ConfigError, DataError
from filterd.model.bases import build_model, resolve_base
from filterd.model.weights import load_model_dir
from trainer.data import read_split
from trainer.fit import FitConfig, fit


def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], input=stdin, capture_output=True)


def test_fit_learns_and_writes_a_complete_model_dir(tiny_model):
    d = tiny_model.model_dir
    meta = json.loads((d / "filterd.json").read_text())
    assert meta["base"] == "random:tiny" and meta["base_kind"] == "random"
    assert meta["pad_token_id"] == 50256 and meta["pooling"] == "last-token" and meta["labels"] == ["ham", "spam"]
    assert set(meta["metrics"]) == {"train", "val", "test", "holdout"}
    assert meta["data_manifest_sha256"] and meta["max_length"] <= 1024
    # operating points: set on the ~3,900 unseen ham (holdout + val), so 1% and 0.5% but not 0.1% (needs 5,000)
    points = {p["ham_fpr_target"]: p for p in meta["operating_points"]}
    assert set(points) == {0.01, 0.005, 0.001}
    assert points[0.01]["threshold"] <= points[0.005]["threshold"] and points[0.001]["threshold"] is None
    assert "needs at least 5,000" in points[0.001]["reason"]
    assert 0 < points[0.005]["spam_recall"] <= points[0.01]["spam_recall"] <= 1
    # a random 2-layer model still learns SMS spam well above chance in two epochs
    assert meta["metrics"]["test"]["accuracy"] > 0.85
    assert (d / "report.md").read_text().count("| test |") == 1
    for png in ("loss", "accuracy", "roc", "scores"):
        assert (d / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = tiny_model.history
    assert tiny_model.best_epoch == 1 + max(range(2), key=lambda i: (history["val_acc"][i], -history["val_loss"][i]))


def test_fit_writes_a_golden_set_sampled_from_its_test_split(tiny_model, sms_data):
    """golden.csv: the trusted set refits gate on when no [trainer] golden_set is configured."""
    golden = read_split(tiny_model.model_dir / "golden.csv")
    test = read_split(sms_data / "test.csv")
    assert {e.id for e in golden} <= {e.id for e in test}
    for label in ("ham", "spam"):
        assert sum(e.label == label for e in golden) == min(200, sum(e.label == label for e in test)) > 0


def test_evaluate_and_classify_reproduce_fit_scores(tiny_model, sms_data):
    d = tiny_model.model_dir
    r = run("-m", "trainer", "evaluate", "--model", str(d), "--data", str(sms_data), "--split", "all", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    got = doc["splits"]
    for now, then in zip(doc["operating_points"], doc["recorded_operating_points"], strict=True):  # the same data: the fit's points
        assert now["ham_fpr_target"] == then["ham_fpr_target"] and now["spam_recall"] == then["spam_recall"]
        assert now["threshold"] == pytest.approx(then["threshold"], abs=1e-5) if then["threshold"] is not None else now["threshold"] is None
    for split, m in tiny_model.metrics.items():
        assert got[split]["confusion"] == m.to_dict()["confusion"]
        assert got[split]["roc_auc"] == pytest.approx(m.roc_auc, abs=1e-9) if m.roc_auc is not None else True
    test = read_split(sms_data / "test.csv")[:20]
    r = run("-m", "filterd", "classify", "--model", str(d), *[e.text for e in test])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    engine = Engine.load(d, device="cpu")
    expected = engine.classify_texts([e.text for e in test])
    assert len(lines) == 20
    for line, v in zip(lines, expected):
        assert set(line) == {"verdict", "score", "model", "tokens"}
        assert line["model"] == engine.version and line["verdict"] == v.verdict and line["tokens"] == v.tokens
        assert abs(line["score"] - v.score) <= 1e-6


def test_head_only_training_leaves_the_backbone_untouched(sms_data, tmp_path):
    fit(FitConfig(data=sms_data, base="random:tiny", out=tmp_path / "m", trainable="head", epochs=1, progress=False))
    trained, _ = load_model_dir(tmp_path / "m")
    fresh = build_model(resolve_base("random:tiny"), seed=123)
    for k, v in fresh.state_dict().items():
        same = torch.equal(v, trained.state_dict()[k])
        assert same != k.startswith("head."), k


def test_bad_training_data_names_file_and_line(sms_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("val", "test"):
        (data / f"{name}.csv").write_bytes((sms_data / f"{name}.csv").read_bytes())
    (data / "train.csv").write_text('id,label,text\nsms:1,ham,"fine"\nsms:2,maybe,"what"\n')
    with pytest.raises(DataError, match=r"train\.csv:3"):
        fit(FitConfig(data=data, base="random:tiny", out=tmp_path / "m", progress=False))
    r = run("-m", "trainer", "fit", "--data", str(data), "--base", "random:tiny", "--out", str(tmp_path / "m"))
    assert r.returncode == 1 and b"train.csv:3" in r.stderr and r.stderr.count(b"\n") == 1
    assert not (tmp_path / "m").exists()


def test_bad_fit_options():
    with pytest.raises(ConfigError, match="--epochs"):
        FitConfig(data=Path("."), base="random:tiny", out=Path("x"), epochs=0).validate()
    with pytest.raises(ConfigError, match="--max-length"):
        FitConfig(data=Path("."), base="random:tiny", out=Path("x"), max_length=2048).validate()
