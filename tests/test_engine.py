"""Engine precision: bf16 is served only after it agrees with fp32 on probe inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from filterd.model import engine as engine_mod
from filterd.model.engine import BF16_MAX_SCORE_DIFF, Engine, check_bf16, probe_sequences
from filterd.model.gpt2 import GPT2Classifier
from trainer.data import read_split


def test_probes_are_deterministic_and_spread():
    a, b = probe_sequences(120), probe_sequences(120)
    assert a == b
    lengths = [len(p) for p in a]
    assert lengths[0] == 1 and lengths[-1] == 120 and lengths == sorted(lengths)
    assert all(0 <= t < 50256 for p in a for t in p)  # never the pad token


def test_fp32_on_cpu_by_default_runs_no_check(tiny_model):
    e = Engine.load(tiny_model.model_dir, device="cpu")
    assert e.dtype == "float32" and e.precision is None


@pytest.mark.skipif(not engine_mod.cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_on_cpu_is_checked_and_agrees_with_fp32_on_real_messages(tiny_model, sms_data):
    fp32 = Engine.load(tiny_model.model_dir, device="cpu")
    bf16 = Engine.load(tiny_model.model_dir, device="cpu", dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    check = bf16.precision
    assert check is not None and check.dtype == "bfloat16" and check.probes > 0
    assert 0 < check.max_abs_diff <= BF16_MAX_SCORE_DIFF  # > 0: the model really ran in bf16
    texts = [r.text for r in read_split(sms_data / "test.csv")]
    a, b = fp32.classify_texts(texts), bf16.classify_texts(texts)
    agree = sum(x.verdict == y.verdict for x, y in zip(a, b)) / len(texts)
    assert agree >= 0.995, agree


def test_bf16_refused_when_scores_drift(monkeypatch, caplog, tiny_model):
    monkeypatch.setattr(engine_mod, "BF16_MAX_SCORE_DIFF", 0.0)  # any drift at all is too much
    monkeypatch.setattr(engine_mod, "cpu_supports_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="filterd"):
        e = Engine.load(tiny_model.model_dir, device="cpu", dtype="bfloat16")
    assert e.dtype == "float32" and e.precision.dtype == "float32"
    assert "serving float32" in caplog.text
    # and it still scores exactly like a plain fp32 load
    plain = Engine.load(tiny_model.model_dir, device="cpu")
    assert e.classify_texts(["win a prize now"])[0].score == pytest.approx(plain.classify_texts(["win a prize now"])[0].score, abs=1e-6)


def test_bf16_refused_on_cpu_without_native_support(monkeypatch, tiny_model):
    monkeypatch.setattr(engine_mod, "cpu_supports_bf16", lambda: False)
    e = Engine.load(tiny_model.model_dir, device="cpu", dtype="bfloat16")
    assert e.dtype == "float32" and "no native bf16" in e.precision.reason


def test_check_bf16_returns_model_in_chosen_dtype_and_leaves_fp32_untouched():
    from filterd.model.gpt2 import CONFIGS

    torch.manual_seed(0)
    m = GPT2Classifier(CONFIGS["tiny"]).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    served, c = check_bf16(m, 64, torch.device("cpu"))
    assert str(next(served.parameters()).dtype).removeprefix("torch.") == c.dtype
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_overhead_is_measured_once_and_guides_offline_batches(monkeypatch, tiny_model):
    engine = Engine.load(tiny_model.model_dir, device="cpu")
    calls = []
    real = engine_mod.measure_overhead_tokens
    monkeypatch.setattr(engine_mod, "measure_overhead_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    value = engine.measure_overhead()
    assert 1.0 <= value <= engine_mod.MAX_OVERHEAD_TOKENS and engine.overhead_tokens == value and len(calls) == 1
    # classify_texts plans with it only when there is more than one batch to plan
    seen = []
    monkeypatch.setattr(engine_mod, "partition", lambda lengths, overhead, *a: seen.append(overhead) or [list(range(len(lengths)))])
    engine.classify_texts(["one", "two"], max_batch_size=64)
    engine.classify_texts(["short"] * 3 + ["a much longer message " * 5], max_batch_size=2)
    assert seen == [engine_mod.DEFAULT_OVERHEAD_TOKENS, value]
