"""Cached backbone features and head-only training on them: a head refit without a forward pass over old messages.

In head mode only `head` (Linear(n_embd, 2)) changes; everything under it is frozen, so each
message's input to the head, `model.pooled()` (ln_f at its last real token), is a fixed vector for
a given backbone. It is computed once and kept in a `FeatureCache`, keyed by (backbone key,
message id); a refit then fits a regularised logistic regression on those vectors in seconds.

The backbone key is `backbone_hash(model)` (sha256 over every tensor but the head) plus the
`max_length` the messages were truncated to: both change the vector, nothing else does. A
last-block refit changes the backbone, hence the key, so stale vectors are never read back.

Storage is one SQLite file, not a .npy per backbone: labels arrive a few at a time and a .npy would
be rewritten whole for each, while SQLite appends rows in a transaction (a crash leaves the old
file, never a torn one), looks rows up by id without loading the rest, and lets a `refit --once`
and the `serve` loop share the file. Vectors are float16 (1.5 KiB per message for GPT-2 small):
the rounding (~1e-3 relative) is far below what decides a verdict.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from filterd.model.engine import length_batches
from filterd.model.gpt2 import GPT2Classifier
from filterd.model.tokenizer import Tokenizer, pad_batch
from filterd.store.sqlite import Schema, open_db

log = logging.getLogger("filterd.trainer")

CHUNK = 500  # ids per SELECT ... IN (...): below SQLite's host-parameter limit on every build
STORED = np.float16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    backbone TEXT NOT NULL,
    id       TEXT NOT NULL,
    vec      BLOB NOT NULL,
    PRIMARY KEY (backbone, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backbones (backbone TEXT PRIMARY KEY, dim INTEGER NOT NULL, last_used REAL NOT NULL);
"""
SCHEMA = Schema("feature cache", _SCHEMA, version=None, synchronous=None)  # unversioned: a stale cache is only slower


class HasText(Protocol):
    """A LabelRow, a trainer.data.Example, or anything with an id and a text."""

    id: str
    text: str


# -- keys ---------------------------------------------------------------------------------------
def backbone_hash(model: GPT2Classifier, exclude: Sequence[str] = ("head.",)) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor not under `exclude`; first 16 hex."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(tuple(exclude)):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def feature_key(model: GPT2Classifier, max_length: int) -> str:
    """What a cached vector depends on: the frozen backbone and the truncation length."""
    return f"{backbone_hash(model)}:L{max_length}"


# -- the cache ----------------------------------------------------------------------------------
class FeatureCache:
    """float16 vectors keyed by (backbone key, message id), in one SQLite file at `path`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path, SCHEMA)  # vectors derived from private mail: 0600, -wal and -shm too

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_many(self, key: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `ids` (float16, read-only); absent ids are simply missing."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(ids))
        with self._lock:
            for i in range(0, len(unique), CHUNK):
                part = unique[i : i + CHUNK]
                marks = ",".join("?" * len(part))
                sql = f"SELECT id, vec FROM features WHERE backbone = ? AND id IN ({marks})"
                found.update((k, np.frombuffer(v, dtype=STORED)) for k, v in self._db.execute(sql, (key, *part)))
            if found:
                self._db.execute("UPDATE backbones SET last_used = ? WHERE backbone = ?", (time.time(), key))
        return found

    def put_many(self, key: str, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Store vectors (cast to float16) in one transaction; returns how many."""
        rows = [(key, k, np.ascontiguousarray(v, dtype=STORED).tobytes()) for k, v in items]
        if not rows:
            return 0
        dim = len(rows[0][2]) // np.dtype(STORED).itemsize
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO features (backbone, id, vec) VALUES (?, ?, ?)", rows)
                self._db.execute(
                    "INSERT OR REPLACE INTO backbones (backbone, dim, last_used) VALUES (?, ?, ?)", (key, dim, time.time())
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def count(self, key: str | None = None) -> int:
        with self._lock:
            if key is None:
                return self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM features WHERE backbone = ?", (key,)).fetchone()[0]

    def keys(self) -> list[str]:
        """Backbone keys, most recently used first."""
        with self._lock:
            return [k for (k,) in self._db.execute("SELECT backbone FROM backbones ORDER BY last_used DESC")]

    def prune(self, keep: int) -> int:
        """Drop the vectors of all but the `keep` most recently used backbones; returns rows deleted."""
        old = self.keys()[keep:]
        if not old:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = sum(self._db.execute("DELETE FROM features WHERE backbone = ?", (k,)).rowcount for k in old)
                self._db.executemany("DELETE FROM backbones WHERE backbone = ?", [(k,) for k in old])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info("features: dropped %d vectors of %d old backbones", deleted, len(old))
        return deleted


# -- computing features -------------------------------------------------------------------------
def _unpack(
    engine_or_model: Any, device: torch.device | str | None, max_length: int | None
) -> tuple[GPT2Classifier, int, torch.device]:
    if isinstance(engine_or_model, GPT2Classifier):
        model = engine_or_model
        length = max_length or model.config.n_positions
        dev = torch.device(device) if device is not None else next(model.parameters()).device
    else:  # a filterd.model.engine.Engine
        model = engine_or_model.model
        length = max_length or engine_or_model.meta.max_length
        dev = torch.device(device) if device is not None else engine_or_model.device
    return model, length, dev


@torch.inference_mode()
def compute_features(
    model: GPT2Classifier, tokens: Sequence[Sequence[int]], device: torch.device, batch_tokens: int = 8192, batch_size: int = 64
) -> np.ndarray:
    """float32 (n, n_embd): model.pooled() per sequence, in input order, batched by similar length."""
    out = np.zeros((len(tokens), model.config.n_embd), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for batch in length_batches([len(t) for t in tokens], batch_size, batch_tokens):
            ids, lengths = pad_batch([tokens[i] for i in batch])
            pooled = model.pooled(ids.to(device), lengths.to(device))
            out[batch] = pooled.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def features_for(
    engine_or_model: Any,
    rows: Sequence[HasText],
    cache: FeatureCache | None,
    device: torch.device | str | None = None,
    batch_tokens: int = 8192,
    *,
    max_length: int | None = None,
    key: str | None = None,
) -> np.ndarray:
    """(len(rows), n_embd) head inputs, in row order, computing only the vectors the cache lacks.

    With a cache the result is float16, exactly what the cache holds (a hit and a miss give the same
    numbers); without one (`cache=None`) it is the float32 computation. `max_length` defaults to the
    engine's model max_length (or the model's positions); `key` skips re-hashing the backbone.
    """
    model, length, dev = _unpack(engine_or_model, device, max_length)
    if cache is None:
        tokens = Tokenizer(length).encode_batch([r.text for r in rows])
        return compute_features(model, tokens, dev, batch_tokens)
    key = key or feature_key(model, length)
    found = cache.get_many(key, [r.id for r in rows])
    todo = list({r.id: r for r in rows if r.id not in found}.values())
    if todo:
        t0 = time.perf_counter()
        tokens = Tokenizer(length).encode_batch([r.text for r in todo])
        vecs = compute_features(model, tokens, dev, batch_tokens).astype(STORED)
        cache.put_many(key, zip((r.id for r in todo), vecs))
        found.update(zip((r.id for r in todo), vecs))
        log.info("features: computed %d, reused %d (backbone %s) in %.1fs", len(todo), len(rows) - len(todo), key,
                 time.perf_counter() - t0)  # fmt: skip
    if not rows:
        return np.zeros((0, model.config.n_embd), dtype=STORED)
    return np.stack([found[r.id] for r in rows])


# -- the head -----------------------------------------------------------------------------------
def head_logits(X: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(n, 2) logits of a head on features, in float32: what GPT2Classifier.forward computes after pooled()."""
    return F.linear(torch.as_tensor(np.asarray(X, dtype=np.float32)), weight.float().cpu(), bias.float().cpu())


def spam_probabilities(X: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> list[float]:
    """P(spam) per row, as filterd.model.engine.spam_scores computes it from logits."""
    return torch.softmax(head_logits(X, weight, bias), dim=-1)[:, 1].tolist()


def fit_head(
    X: np.ndarray,
    y: Sequence[int],
    init_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    seed: int = 123,
    batch_size: int = 16384,
    class_weight: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train Linear(n_embd, 2) with cross-entropy on features; returns (weight (2, n_embd), bias (2,)) in float32.

    Full-batch Adam (shuffled mini-batches of `batch_size` beyond that many rows), starting from
    `init_head` (the current model's head) or from zero. `weight_decay` is an L2 penalty pulling the
    weights back toward that start (toward zero without one): a refit on a few hundred new labels
    adjusts the live head instead of forgetting what it learnt from the data before, while labels
    that really disagree with it (a flipped set moves it all the way) still win. Features are
    standardised per dimension while training and the scaling folded back into the returned
    weights, so one learning rate and one penalty suit GPT-2's few large-magnitude dimensions as
    well as the rest; the bias is not penalised. `class_weight` (ham, spam) weighs each class's loss
    (an imbalanced set trained on every label instead of an undersampled one).
    """
    with _one_thread():
        return _fit_head(X, y, init_head, epochs, lr, weight_decay, seed, batch_size, class_weight)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The head's matrices are small: OpenMP's fork/join per op costs more than it saves, and on a busy
    2-core host spinning threads made a 10k-example fit 10x slower. torch's setting is process-wide, so it is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_head(
    X: np.ndarray,
    y: Sequence[int],
    init_head: tuple[torch.Tensor, torch.Tensor] | None,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    batch_size: int,
    class_weight: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    cw = torch.tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if Xt.ndim != 2 or len(Xt) != len(yt) or len(yt) == 0:
        raise ValueError(f"need a non-empty (n, n_embd) feature matrix and n labels, got {tuple(Xt.shape)} and {len(yt)}")
    mu, sigma = Xt.mean(0), Xt.std(0, unbiased=False).clamp_min(1e-6)
    Z = (Xt - mu) / sigma
    w0, b0 = torch.zeros(2, Xt.shape[1]), torch.zeros(2)
    if init_head is not None:  # the same function of x, in standardised coordinates
        w_init, b_init = (t.detach().float().cpu() for t in init_head)
        w0, b0 = w_init * sigma, b_init + w_init @ mu
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(yt), max(1, batch_size)
    for _ in range(epochs):
        if n > bs:  # one gather per epoch, then contiguous slices
            order = torch.randperm(n, generator=gen)
            Z, yt = Z[order], yt[order]
        for start in range(0, n, bs):
            zb, yb = Z[start : start + bs], yt[start : start + bs]
            loss = F.cross_entropy(F.linear(zb, w, b), yb, weight=cw) + weight_decay * (w - w0).square().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        weight = w / sigma
        bias = b - weight @ mu
    if not (math.isfinite(float(weight.abs().sum())) and math.isfinite(float(bias.abs().sum()))):
        raise ValueError("head training diverged (non-finite weights)")
    return weight.detach().contiguous(), bias.detach().contiguous()
