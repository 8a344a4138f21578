"""Inference engine: a loaded model directory that turns token lists into P(spam).

Used by `filterd classify`, the trainer's evaluation and (through the batcher) the daemon, so
every path scores a message with the same code. Batches are padded to their longest message;
`classify_texts` sorts by length first so that padding stays small.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import torch

from filterd.errors import ConfigError, ModelError
from filterd.model.grouping import DEFAULT_OVERHEAD_TOKENS, partition
from filterd.model.gpt2 import LABELS, GPT2Classifier
from filterd.model.tokenizer import Tokenizer, pad_batch
from filterd.model.weights import ModelMeta, load_model_dir

log = logging.getLogger("filterd")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "spam" | "ham"
    score: float  # P(spam)
    tokens: int  # tokens the model read (after truncation)


DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


# bf16 keeps fp32's exponent but only 8 bits of mantissa: scores move a little. A model whose
# probe scores move more than this is served in fp32 instead (a wrong verdict costs more than speed).
BF16_MAX_SCORE_DIFF = 0.02
PROBES = 24


@dataclass(frozen=True)
class PrecisionCheck:
    """How bf16 scores compared with fp32 on probe inputs when the model was loaded."""

    dtype: str  # what the engine serves in after the check
    probes: int
    max_abs_diff: float
    mean_abs_diff: float
    reason: str  # why bf16 was kept or refused, for the log


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def probe_sequences(max_length: int, n: int = PROBES, seed: int = 0) -> list[list[int]]:
    """Deterministic token sequences of spread-out lengths: the same probes for every model and machine."""
    g = torch.Generator().manual_seed(seed)
    top = max(2, min(max_length, 256))
    lengths = torch.linspace(1, top, n).round().int().tolist()
    return [torch.randint(0, 50256, (length,), generator=g).tolist() for length in lengths]


def check_bf16(model: GPT2Classifier, max_length: int, device: torch.device) -> tuple[GPT2Classifier, PrecisionCheck]:
    """Score the probes with the fp32 model and a bf16 copy; the model to serve and why.

    The copy (not an in-place cast) matters: casting back to fp32 would not restore the rounded weights.
    """
    if device.type == "cpu" and not cpu_supports_bf16():
        return model, PrecisionCheck("float32", 0, 0.0, 0.0, "this CPU has no native bf16 (AVX512-BF16/AMX): serving float32")
    probes = probe_sequences(max_length)
    ref = torch.tensor(score_in_length_batches(model, probes, device))
    half = copy.deepcopy(model).to(torch.bfloat16)
    diff = (torch.tensor(score_in_length_batches(half, probes, device)) - ref).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    if worst > BF16_MAX_SCORE_DIFF:
        reason = f"bf16 scores differ from fp32 by up to {worst:.4f} (> {BF16_MAX_SCORE_DIFF}): serving float32"
        return model, PrecisionCheck("float32", len(probes), worst, mean, reason)
    return half, PrecisionCheck(
        "bfloat16", len(probes), worst, mean, f"bf16 agrees with fp32 within {worst:.4f} on {len(probes)} probes"
    )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


@torch.inference_mode()
def spam_scores(model: GPT2Classifier, sequences: Sequence[Sequence[int]], device: torch.device) -> list[float]:
    """P(spam) for one padded batch."""
    ids, lengths = pad_batch(sequences)
    logits = model(ids.to(device, non_blocking=True), lengths.to(device, non_blocking=True))
    return torch.softmax(logits.float(), dim=-1)[:, LABELS.index("spam")].tolist()


def length_batches(
    lengths: Sequence[int],
    max_batch_size: int = 64,
    max_batch_tokens: int = 8192,
    overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
) -> Iterator[list[int]]:
    """Indices grouped by similar length (filterd.model.grouping); each batch padded to its longest stays within the token budget."""
    yield from partition(lengths, overhead_tokens, max_batch_size, max_batch_tokens)


PROBE_TOKEN = 262  # " the": any ordinary token; timing does not depend on which
MAX_OVERHEAD_TOKENS = 65536.0


def measure_overhead_tokens(model: GPT2Classifier, device: torch.device, max_length: int, repeats: int = 2) -> float:
    """A forward pass's fixed cost in tokens: time a short pass and a long one and fit `a + b * tokens`.

    The batch planner weighs padding against passes with it: on a CPU it is tens of tokens (padding
    costs about what it computes), on a GPU thousands (one big pass beats several tight ones).
    """
    t = min(64, max_length)
    shapes = ((1, min(16, t)), (max(1, 512 // t), t))
    best = []
    for b, n in shapes:
        seqs = [[PROBE_TOKEN] * n for _ in range(b)]
        spam_scores(model, seqs, device)  # warm-up: kernels chosen, caches filled
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            spam_scores(model, seqs, device)
            runs.append(time.perf_counter() - t0)
        best.append(min(runs))
    (b1, n1), (b2, n2) = shapes
    per_token = (best[1] - best[0]) / (b2 * n2 - b1 * n1)
    if per_token <= 0:  # the long pass was no slower: overhead dominates (a GPU), group as much as allowed
        return MAX_OVERHEAD_TOKENS
    return float(min(MAX_OVERHEAD_TOKENS, max(1.0, best[0] / per_token - b1 * n1)))


def score_in_length_batches(
    model: GPT2Classifier,
    sequences: Sequence[Sequence[int]],
    device: torch.device,
    max_batch_size: int = 64,
    max_batch_tokens: int = 8192,
    overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS,
) -> list[float]:
    """P(spam) per sequence, in input order, scored in batches of similar length."""
    out = [0.0] * len(sequences)
    for batch in length_batches([len(t) for t in sequences], max_batch_size, max_batch_tokens, overhead_tokens):
        for i, s in zip(batch, spam_scores(model, [sequences[i] for i in batch], device)):
            out[i] = s
    return out


SANITY_PROBES = 8
SANITY_TOLERANCE = 1e-3  # two passes over the same probes; bf16 kernels on a GPU may differ in the last bits


def sanity_check(engine: "Engine") -> None:
    """Score probe inputs twice before a model serves; ModelError when the scores cannot be trusted.

    Weights can be finite and still give NaN (an overflow to inf in the head, say); such a model
    would answer every message with a NaN score. Checked: one score per probe, each finite and in
    [0, 1], and the same both times.
    """
    probes = probe_sequences(engine.meta.max_length, n=SANITY_PROBES)
    first = score_in_length_batches(engine.model, probes, engine.device)
    second = score_in_length_batches(engine.model, probes, engine.device)
    where = f"model {engine.version}" + (f" ({engine.path})" if engine.path else "")
    if len(first) != len(probes) or len(second) != len(probes):
        raise ModelError(f"{where}: sanity check: {len(first)} scores for {len(probes)} probe inputs")
    bad = next((s for s in first if not (math.isfinite(s) and 0.0 <= s <= 1.0)), None)
    if bad is not None:
        raise ModelError(f"{where}: sanity check: probe score {bad} is not a probability in [0, 1]")
    drift = max(abs(a - b) for a, b in zip(first, second))
    if not drift <= SANITY_TOLERANCE:
        raise ModelError(f"{where}: sanity check: the same probes scored {drift:.4g} apart on two passes")


class Engine:
    """A model directory loaded for inference on one device."""

    def __init__(
        self,
        model: GPT2Classifier,
        meta: ModelMeta,
        device: torch.device,
        path: Path | None = None,
        precision: PrecisionCheck | None = None,
    ) -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = device
        self.path = path
        self.precision = precision
        self.tokenizer = Tokenizer(meta.max_length)
        self.threshold = meta.threshold

    @classmethod
    def load(cls, path: Path | str, device: str = "auto", dtype: str = "auto") -> "Engine":
        """`dtype` auto: bf16 on CUDA, fp32 on CPU (bf16 on CPU only when asked for).

        bf16 is checked against fp32 on probe inputs first and refused (fp32 served, a warning
        logged) where scores drift or the CPU lacks native bf16.
        """
        dev = pick_device(device)
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, meta = load_model_dir(Path(path))
        model = model.to(device=dev, dtype=torch.float32).eval()
        precision = None
        if (DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)) == torch.bfloat16:
            model, precision = check_bf16(model, meta.max_length, dev)
            (log.info if precision.dtype == "bfloat16" else log.warning)("model %s: %s", meta.version, precision.reason)
        return cls(model, meta, dev, Path(path), precision)

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        return spam_scores(self.model, sequences, self.device)

    @cached_property
    def operating_points(self) -> dict[float, float]:
        """Ham-FPR target -> the threshold the fit measured for it (filterd.json; targets it could not estimate left out)."""
        return self.meta.fpr_thresholds()

    @cached_property
    def overhead_tokens(self) -> float:
        """This model's per-pass overhead on this device, in tokens (measured on first use, ~1 s for 124M on a CPU)."""
        value = measure_overhead_tokens(self.model, self.device, self.meta.max_length)
        log.info("model %s: a forward pass costs %.0f tokens' worth beyond its tokens (batch planning)", self.version, value)
        return value

    def measure_overhead(self) -> float:
        """Measure `overhead_tokens` now (once): loaders call it so the batcher never pays for it on the event loop."""
        return self.overhead_tokens

    def classify_texts(
        self,
        texts: Sequence[str],
        threshold: float | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
    ) -> list[Verdict]:
        """Verdicts in input order; batches grouped by length within the token budget."""
        thr = self.threshold if threshold is None else threshold
        tokens = self.tokenizer.encode_batch(texts)
        # measuring the overhead (~1 s for 124M on a CPU) pays only when there is more than one batch to plan
        overhead = self.overhead_tokens if len(tokens) > max_batch_size else DEFAULT_OVERHEAD_TOKENS
        scores = score_in_length_batches(self.model, tokens, self.device, max_batch_size, max_batch_tokens, overhead)
        return [Verdict("spam" if s >= thr else "ham", s, len(t)) for s, t in zip(scores, tokens)]
