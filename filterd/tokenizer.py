"""GPT-2 byte-pair encoding (tiktoken), truncation and right padding.

Offline use: tiktoken reads its GPT-2 files from `$TIKTOKEN_CACHE_DIR` when they are cached there.
Text is encoded as ordinary text, so a message containing the literal string "<|endoftext|>"
cannot inject the special token that we pad with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .errors import ModelError
from .model import PAD_TOKEN_ID

MAX_POSITIONS = 1024
# BPE cost grows badly with very long runs of characters that form one pre-token, and a message
# never needs more characters than this per kept token to fill max_length (GPT-2 averages ~4).
CHARS_PER_TOKEN_BOUND = 16


@lru_cache(maxsize=1)
def _encoding():  # type: ignore[no-untyped-def]
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken tries a download when its cache is missing
        raise ModelError(
            f"cannot load the GPT-2 tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "offline, set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached GPT-2 files"
        ) from None


@dataclass(frozen=True)
class Tokenizer:
    """Encodes text to at most `max_length` GPT-2 token ids (the head of the message is kept)."""

    max_length: int = MAX_POSITIONS

    def __post_init__(self) -> None:
        if not 1 <= self.max_length <= MAX_POSITIONS:
            raise ValueError(f"max_length must be within 1..{MAX_POSITIONS}, got {self.max_length}")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text; an empty text becomes [PAD_TOKEN_ID] so it still gets a score."""
        limit = self.max_length * CHARS_PER_TOKEN_BOUND
        clipped = [t[:limit] for t in texts]
        enc = _encoding()
        ids = [enc.encode_ordinary(clipped[0])] if len(clipped) == 1 else enc.encode_ordinary_batch(clipped)
        return [x[: self.max_length] or [PAD_TOKEN_ID] for x in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return _encoding().decode(list(ids))

    @staticmethod
    def count(text: str) -> int:
        """Untruncated token count (for choosing max_length from training data)."""
        return len(_encoding().encode_ordinary(text))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = PAD_TOKEN_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (ids (B, T) int64, lengths (B,) int64)."""
    if not sequences:
        raise ValueError("empty batch")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids, lengths


def max_length_from(token_counts: Sequence[int], cap: int = MAX_POSITIONS) -> int:
    """The chapter's default: the longest training message, capped by the model's positions."""
    return max(1, min(max(token_counts, default=1), cap))
