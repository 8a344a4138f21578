"""trainer.features: cached pooled features reproduce the model's logits, are computed once, keyed by the backbone."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from filterd.model.engine import Engine
from filterd.model.gpt2 import CONFIGS, GPT2Classifier
from filterd.model.tokenizer import Tokenizer, pad_batch
from filterd.model.weights import ModelMeta, write_model_files
from trainer.features import (
    FeatureCache,
    backbone_hash,
    feature_key,
    features_for,
    fit_head,
    head_logits,
)

TEXTS = [
    "WINNER!! You have won a 1000 prize. Call 09061701461 now to claim",
    "ok see you at 5",
    "Sorry, I'll call later",
    "URGENT! Your mobile number has been awarded a bonus. Text CLAIM to 81010 before midnight, T&Cs apply",
    "Are we still on for dinner tonight? I can bring the wine if you want",
    "k",
]


@dataclass(frozen=True)
class Row:
    id: str
    text: str


ROWS = [Row(f"m{i}", t) for i, t in enumerate(TEXTS)]


def tiny(seed: int = 0) -> GPT2Classifier:
    """Random tiny GPT-2 with a head big enough that a wrong input to it would show in the logits."""
    model = GPT2Classifier(CONFIGS["tiny"])
    model.reset_parameters(seed=seed)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        model.head.bias.copy_(torch.tensor([0.3, -0.2]))
    return model.eval()


def model_logits(model: GPT2Classifier, rows, max_length: int = 1024) -> torch.Tensor:
    tokens = Tokenizer(max_length).encode_batch([r.text for r in rows])
    ids, lengths = pad_batch(tokens)  # one padded batch: the short messages carry padding
    with torch.inference_mode():
        return model(ids, lengths)


def test_pooled_features_are_what_the_head_reads():
    model = tiny()
    X = features_for(model, ROWS, None, "cpu")  # no cache: float32, batched by length
    assert X.dtype == np.float32 and X.shape == (len(ROWS), 64)
    expected = model_logits(model, ROWS)
    assert torch.allclose(head_logits(X, model.head.weight, model.head.bias), expected, atol=1e-4)
    assert float(expected.std()) > 0.1  # the head is not ~0: a wrong pooled vector would be caught


def test_cached_features_are_float16_and_close(tmp_path):
    model = tiny()
    with FeatureCache(tmp_path / "f.sqlite") as cache:
        X16 = features_for(model, ROWS, cache, "cpu")
        assert X16.dtype == np.float16
        X32 = features_for(model, ROWS, None, "cpu")
        np.testing.assert_allclose(X16.astype(np.float32), X32, rtol=1e-3, atol=1e-3)
        logits = head_logits(X16, model.head.weight, model.head.bias)
        assert torch.allclose(logits, model_logits(model, ROWS), atol=2e-2)  # fp16 rounding of the inputs only
    with sqlite3.connect(tmp_path / "f.sqlite") as db:
        sizes = {n for (n,) in db.execute("SELECT length(vec) FROM features")}
    assert sizes == {64 * 2}  # n_embd float16 values per message


def test_engine_and_model_give_the_same_features(tmp_path):
    model = tiny()
    meta = write_model_files(
        model, ModelMeta(version="", base="random:tiny", base_kind="random", config=model.config, max_length=8), tmp_path / "m"
    )
    engine = Engine.load(tmp_path / "m", device="cpu", dtype="float32")
    from_engine = features_for(engine, ROWS, None)  # the engine's max_length (8) truncates
    np.testing.assert_allclose(from_engine, features_for(model, ROWS, None, "cpu", max_length=meta.max_length), atol=1e-6)
    assert torch.allclose(head_logits(from_engine, model.head.weight, model.head.bias), model_logits(model, ROWS, 8), atol=1e-4)


def test_cache_hit_avoids_the_forward_pass(tmp_path):
    model = tiny()
    seen: list[int] = []
    original = model.pooled

    def counting(ids, *args, **kwargs):
        seen.append(ids.shape[0])
        return original(ids, *args, **kwargs)

    model.pooled = counting  # type: ignore[method-assign]
    with FeatureCache(tmp_path / "f.sqlite") as cache:
        first = features_for(model, ROWS[:4], cache, "cpu")
        assert sum(seen) == 4 and cache.count() == 4
        seen.clear()
        again = features_for(model, list(reversed(ROWS[:4])), cache, "cpu")
        assert seen == []  # all four from the cache: no forward pass
        np.testing.assert_array_equal(again, first[::-1])
        more = features_for(model, ROWS, cache, "cpu")
        assert sum(seen) == 2  # only the two new messages
        np.testing.assert_array_equal(more[:4], first)


def test_backbone_hash_follows_the_backbone_not_the_head():
    model = tiny()
    h = backbone_hash(model)
    assert len(h) == 16 and int(h, 16) >= 0
    assert backbone_hash(tiny()) == h  # same weights, same hash
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert backbone_hash(model) == h  # a head-only refit keeps the cached features valid
    with torch.no_grad():
        model.h[-1].mlp.c_fc.weight[0, 0] += 1e-3
    assert backbone_hash(model) != h  # a last-block refit does not
    with torch.no_grad():
        model.h[-1].mlp.c_fc.weight[0, 0] -= 1e-3
        model.ln_f.bias[0] += 1e-3
    assert backbone_hash(model) != h  # ln_f is applied before the head: part of the backbone
    assert feature_key(tiny(), 32) != feature_key(tiny(), 64)  # truncation changes the vectors too


def test_new_backbone_misses_and_prune_keeps_recent(tmp_path):
    with FeatureCache(tmp_path / "f.sqlite") as cache:
        features_for(tiny(0), ROWS, cache, "cpu")
        features_for(tiny(1), ROWS[:2], cache, "cpu")
        assert cache.count() == len(ROWS) + 2 and len(cache.keys()) == 2
        assert cache.keys()[0] == feature_key(tiny(1), 1024)
        assert cache.prune(1) == len(ROWS)
        assert cache.keys() == [feature_key(tiny(1), 1024)] and cache.count() == 2


def test_fit_head_learns_from_features_and_starts_from_the_current_head():
    rng = np.random.default_rng(0)
    n, d = 400, 32
    y = rng.integers(0, 2, n)
    X = rng.normal(0, 1, (n, d)).astype(np.float32)
    X[:, 3] += 3.0 * (2 * y - 1)  # one informative dimension
    X[:, 5] *= 300.0  # and one huge uninformative one, as GPT-2 has
    w, b = fit_head(X, y, None, seed=1)
    assert w.shape == (2, d) and b.shape == (2,) and w.dtype == torch.float32
    assert float((head_logits(X, w, b).argmax(1).numpy() == y).mean()) > 0.97
    assert torch.equal(fit_head(X, y, None, seed=1)[0], w)  # seeded: the same head again

    init = (torch.randn(2, d), torch.randn(2))
    w0, b0 = fit_head(X, y, init, epochs=0)  # no training: the current head, through the standardisation
    assert torch.allclose(head_logits(X, w0, b0), head_logits(X, *init), atol=1e-3)


def test_a_fitted_head_in_the_model_scores_like_the_features(tmp_path):
    model = tiny()
    X = features_for(model, ROWS, None, "cpu")
    y = [1, 0, 0, 1, 0, 0]
    w, b = fit_head(X, y, (model.head.weight, model.head.bias), epochs=50)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    assert torch.allclose(model_logits(model, ROWS), head_logits(X, w, b), atol=1e-4)
    with pytest.raises(ValueError, match="non-empty"):
        fit_head(X[:0], [], None)


def test_cache_file_is_private_whatever_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with FeatureCache(tmp_path / "features.sqlite") as cache:
            cache.put_many("k", [("a", np.ones(4, dtype=np.float32))])
            files = sorted(tmp_path.iterdir())  # the database, and SQLite's -wal/-shm beside it while open
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        legacy = tmp_path / "legacy.sqlite"
        legacy.touch(mode=0o644)
        FeatureCache(legacy).close()
        modes["legacy.sqlite"] = stat.S_IMODE(legacy.stat().st_mode)
    finally:
        os.umask(old)
    assert "features.sqlite-wal" in modes and set(modes.values()) == {0o600}, {k: oct(v) for k, v in modes.items()}
