"""Inference engine: a loaded model directory that turns token lists into P(spam).

Used by `filterd classify`, the trainer's evaluation and (through the batcher) the daemon, so
every path scores a message with the same code. Batches are padded to their longest message;
`classify_texts` sorts by length first so that padding stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import ConfigError
from .model import LABELS, GPT2Classifier
from .tokenizer import Tokenizer, pad_batch
from .weights import ModelMeta, load_model_dir


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "spam" | "ham"
    score: float  # P(spam)
    tokens: int  # tokens the model read (after truncation)


DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


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


def length_batches(lengths: Sequence[int], max_batch_size: int = 64, max_batch_tokens: int = 8192) -> Iterator[list[int]]:
    """Indices grouped by similar length; each batch padded to its longest stays within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        # sorted ascending, so the newcomer is the longest: the padded size is its length * count
        if batch and (len(batch) >= max_batch_size or lengths[i] * (len(batch) + 1) > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_in_length_batches(
    model: GPT2Classifier,
    sequences: Sequence[Sequence[int]],
    device: torch.device,
    max_batch_size: int = 64,
    max_batch_tokens: int = 8192,
) -> list[float]:
    """P(spam) per sequence, in input order, scored in batches of similar length."""
    out = [0.0] * len(sequences)
    for batch in length_batches([len(t) for t in sequences], max_batch_size, max_batch_tokens):
        for i, s in zip(batch, spam_scores(model, [sequences[i] for i in batch], device)):
            out[i] = s
    return out


class Engine:
    """A model directory loaded for inference on one device."""

    def __init__(self, model: GPT2Classifier, meta: ModelMeta, device: torch.device, path: Path | None = None) -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = device
        self.path = path
        self.tokenizer = Tokenizer(meta.max_length)
        self.threshold = meta.threshold

    @classmethod
    def load(cls, path: Path | str, device: str = "auto", dtype: str = "auto") -> "Engine":
        """`dtype` auto: bf16 on CUDA, fp32 on CPU (bf16 on CPU only when asked for)."""
        dev = pick_device(device)
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, meta = load_model_dir(Path(path))
        chosen = DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        return cls(model.to(device=dev, dtype=chosen), meta, dev, Path(path))

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        return spam_scores(self.model, sequences, self.device)

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
        scores = score_in_length_batches(self.model, tokens, self.device, max_batch_size, max_batch_tokens)
        return [Verdict("spam" if s >= thr else "ham", s, len(t)) for s, t in zip(scores, tokens)]
