"""bench.accuracy's honest offline figures: deduplicated natural-prior set, spam-track columns, intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy
from trainer.data import Example


def _corpus() -> list[Example]:
    """A small SMS-like corpus with repeats: 40 spam (30 texts) and 200 ham (some repeated, one in odd case)."""
    spam = [Example(f"sms:{i}", "spam", f"WIN a prize {i % 30} call now") for i in range(40)]
    ham = [Example(f"sms:{100 + i}", "ham", f"see you at {i % 150} tonight") for i in range(200)]
    ham.append(Example("sms:999", "ham", "SEE  you at 3   TONIGHT"))  # a repeat after normalisation only
    return spam + ham


def _scorer(texts: list[str]) -> list[float]:
    """Spam words score high; a ham text about slot 7 is a false positive."""
    return [0.9 if "prize" in t else 0.7 if " 7 " in t else 0.1 + 0.001 * (len(t) % 7) for t in texts]


def test_unseen_removes_texts_seen_in_training_and_repeats_within() -> None:
    train = [Example("a", "ham", "Hello  there"), Example("b", "spam", "win")]
    evaluation = [
        Example("c", "ham", "hello there"),  # in train after normalisation
        Example("d", "ham", "new text"),
        Example("e", "ham", "New  TEXT"),  # repeats d
        Example("f", "spam", "other"),
        Example("g", "spam", "win"),  # in train
    ]
    kept, counts = accuracy.unseen(evaluation, train)
    assert [e.id for e in kept] == ["d", "f"]
    assert counts == {"from": 5, "in_train_or_val": 2, "repeated_within": 1}


def test_uci_split_has_a_deduplicated_natural_prior_set_with_counts() -> None:
    examples = _corpus()
    assert accuracy.corpus_duplicates(examples) == {"messages": 241, "exact_repeats": 10 + 50, "normalised_repeats": 10 + 51}
    sets, stats = accuracy.make_split("uci", examples, seed=1)
    assert "test+holdout-unseen" in accuracy.TEST_SETS["uci"]
    seen = {accuracy.norm(e.text) for e in sets["train"] + sets["val"]}
    unseen = sets["test+holdout-unseen"]
    texts = [accuracy.norm(e.text) for e in unseen]
    assert unseen and not seen & set(texts) and len(texts) == len(set(texts))
    d = stats["dedupe"]["test+holdout-unseen"]
    assert d["from"] == len(sets["test+holdout"]) == len(sets["test"]) + 241 - 80
    assert d["from"] - d["in_train_or_val"] - d["repeated_within"] == len(unseen)
    assert d["in_train_or_val"] > 0 and d["repeated_within"] > 0  # both steps removed something here
    assert stats["counts"]["test+holdout-unseen"]["spam"] + stats["counts"]["test+holdout-unseen"]["ham"] == len(unseen)
    assert stats["test_exact_text_in_train"] <= stats["text_in_train"]["test"]


def test_evaluate_reports_spam_track_measures_with_bootstrap_intervals() -> None:
    sets, _ = accuracy.make_split("uci", _corpus(), seed=1)
    names = accuracy.TEST_SETS["uci"]
    metrics, _ = accuracy.evaluate(_scorer, sets, names, n_boot=200)
    m = metrics["test+holdout"]
    # Every spam scores 0.9; the ham texts "see you at 7 ..." score 0.7, the rest < 0.2.
    n_ham = m["tn"] + m["fp"]
    assert m["fp"] > 0 and m["ham_fpr"] == pytest.approx(m["fp"] / n_ham)
    assert m["ham_fpr_at_95"] == m["ham_fpr_at_99"] == 0.0  # a cut at 0.9 keeps all spam and no ham
    assert m["roca_pct"] == 0.0
    for key in ("accuracy", "ham_fpr", "ham_fpr_at_95", "ham_fpr_at_99", "roca_pct"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi, key
    assert m["ham_fpr_ci"][1] > m["ham_fpr_ci"][0]  # the few false positives are resampled: a real interval
    assert metrics["test+holdout-unseen"]["n"] < m["n"]


def _doc(n_boot: int) -> dict:
    doc = accuracy.new_doc()
    doc["commands"].append("test")
    for seed in (1, 2):
        sets, _ = accuracy.make_split("uci", _corpus(), seed)
        metrics, _ = accuracy.evaluate(_scorer, sets, accuracy.TEST_SETS["uci"], n_boot=n_boot)
        doc["runs"].append({"corpus": "uci", "model": "tfidf-lr", "seed": seed, "wall_s": 1.0, "tests": metrics})
    return doc


def test_table_has_the_new_columns_and_reads_old_result_files(tmp_path: Path) -> None:
    doc = _doc(n_boot=100)
    text = accuracy.finish(doc)
    header = text.splitlines()[0]
    for column in ("accuracy % [95% CI]", "ham FPR % [95% CI]", "at 95% spam recall", "at 99% spam recall", "(1-ROCA)%"):
        assert column in header
    rows = [line for line in text.splitlines() if line.startswith("| uci | test+holdout-unseen")]
    assert len(rows) == 1 and "[" in rows[0] and "| – |" not in rows[0]
    row = next(r for r in doc["summary"] if r["test"] == "test+holdout-unseen")
    assert row["ham_fpr_at_99"]["n"] == 2 and len(row["ham_fpr_ci"]) == 2
    assert doc["table_per_seed"].count("| uci | test+holdout-unseen |") == 2

    # A result file written before these measures (no intervals, no test+holdout-unseen) still merges.
    old = _doc(n_boot=0)
    for run in old["runs"]:
        del run["tests"]["test+holdout-unseen"]
        for t in run["tests"].values():
            for key in [k for k in t if k.startswith(("ham_fpr_at", "roca")) or k.endswith("_ci")]:
                del t[key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    merged = accuracy.merge([tmp_path / "old.json"])
    text = accuracy.finish(merged)
    assert "test+holdout-unseen" not in text and "| uci | test (balanced) |" in text


def test_baseline_only_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")  # the baseline's dependency (the `bench` extra)
    sms = tmp_path / "SMSSpamCollection"
    sms.write_text("".join(f"{e.label}\t{e.text}\n" for e in _corpus()))
    monkeypatch.setitem(accuracy.SOURCES, "uci", sms)
    out = tmp_path / "acc.json"
    accuracy.main(["--corpus", "uci", "--seeds", "1", "--skip-filterd", "--bootstrap", "50", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["corpora"]["uci"]["exact_repeats"] == 60
    assert doc["settings"][0]["bootstrap"] == 50
    t = doc["runs"][0]["tests"]["test+holdout-unseen"]
    assert t["ham_fpr_at_99"] is not None and len(t["accuracy_ci"]) == 2


def test_write_pretrain_corpus_holds_train_and_val_never_test_or_holdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.data import read_split
    from trainer.pretrain import PretrainConfig, read_corpus

    sms = tmp_path / "SMSSpamCollection"
    sms.write_text("".join(f"{e.label}\t{e.text}\n" for e in _corpus()))
    monkeypatch.setitem(accuracy.SOURCES, "uci", sms)
    out = tmp_path / "pt"
    accuracy.main(["--corpus", "uci", "--seeds", "2", "--write-pretrain-corpus", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["uci-seed1", "uci-seed2"]
    assert not (tmp_path / "acc.json").exists()  # it writes the corpus and exits: no training, no result file
    for seed in (1, 2):
        sets, _ = accuracy.make_split("uci", accuracy.load_corpus("uci"), seed)
        d = out / f"uci-seed{seed}"
        assert sorted(p.name for p in d.iterdir()) == ["train.csv", "val.csv"]
        ids = {e.id for name in ("train", "val") for e in read_split(d / f"{name}.csv")}
        assert ids == {e.id for e in sets["train"] + sets["val"]}
        assert not ids & {e.id for e in sets["test+holdout"]}  # neither test nor the ham that balancing left out
        corpus = read_corpus(PretrainConfig(base="random:tiny", out=tmp_path / "unused", csv=[d]))
        assert corpus.documents == {"csv": len(sets["train"]) + len(sets["val"])}


def test_pretrain_effect_tabulates_runs_with_their_pretrain_record(tmp_path: Path) -> None:
    from bench import pretrain_effect

    sets, _ = accuracy.make_split("uci", _corpus(), 1)
    metrics, _ = accuracy.evaluate(_scorer, sets, accuracy.TEST_SETS["uci"], n_boot=50)
    for name, base in (("plain", "random:tiny"), ("pt", str(tmp_path / "base"))):
        doc = accuracy.new_doc()
        doc["commands"].append(f"run {name}")
        doc["runs"] = [
            {
                "corpus": "uci",
                "model": model,
                "seed": 1,
                "train_s": 3.0,
                "load_avg_1m": 1.0,
                "info": {"base": base},
                "tests": metrics,
            }
            for model in ("tfidf-lr", "filterd")
        ]
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "base").mkdir()
    record = {
        "steps": 400,
        "tokens_seen": 409600,
        "val_loss_before": 10.83,
        "val_loss_after": 6.64,
        "seconds": 523.3,
        "config": {},
    }
    (tmp_path / "base" / "pretrain.json").write_text(json.dumps(record))
    out = tmp_path / "effect.json"
    pretrain_effect.main(["--run", "tiny", str(tmp_path / "plain.json"), "--run", "tiny+pt", str(tmp_path / "pt.json"),
                          str(tmp_path / "base"), "--json", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert [(r["label"], r["pretrain"] is not None) for r in doc["rows"]] == [
        ("tfidf-lr", False), ("tiny", False), ("tfidf-lr", False), ("tiny+pt", True)
    ]  # fmt: skip
    assert set(doc["rows"][3]["tests"]) == {"test", "test+holdout-unseen"}
    rows = doc["table"].splitlines()[2:]
    assert len(rows) == 3 * 2  # one TF-IDF row pair per corpus, then each filterd run on both test sets
    assert "| 400 (409,600) | 10.83 → 6.64 | 523 |" in rows[-1]
    pretrain_effect.main(["--run", "tiny", str(tmp_path / "plain.json"), "--seeds", "2", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == []  # the files hold seed 1 only
