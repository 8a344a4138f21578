"""GPT-2 byte-pair encoding (tiktoken), truncation and right padding.

Offline only: the GPT-2 files are read from tiktoken's cache (`$TIKTOKEN_CACHE_DIR`), checked against
their sha256, and never downloaded: a missing file is a one-line error naming the directory and file.
Text is encoded as ordinary text, so a message containing the literal string "<|endoftext|>"
cannot inject the special token that we pad with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from filterd.errors import ModelError
from filterd.model.gpt2 import PAD_TOKEN_ID

MAX_POSITIONS = 1024
# BPE cost grows badly with very long runs of characters that form one pre-token, and a message
# never needs more characters than this per kept token to fill max_length (GPT-2 averages ~4).
CHARS_PER_TOKEN_BOUND = 16


# tiktoken's GPT-2 files: where it would download them from (its cache names a file by sha1 of
# the URL) and their sha256 (from tiktoken_ext.openai_public.gpt2). tiktoken downloads a file that
# is missing or fails its hash; filterd reads the cached copies itself and never does.
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}


def tiktoken_cache_dir() -> tuple[Path, str]:
    """The directory tiktoken's cache lives in, and what chose it (as tiktoken.load decides)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]), var
    return Path(tempfile.gettempdir()) / "data-gym-cache", "default, TIKTOKEN_CACHE_DIR unset"


def cached_gpt2_files() -> dict[str, Path]:
    """The cached GPT-2 tokenizer files, checked; ModelError naming the directory and file otherwise."""
    directory, origin = tiktoken_cache_dir()
    found: dict[str, Path] = {}
    for name, (url, sha256) in GPT2_FILES.items():
        path = directory / hashlib.sha1(url.encode()).hexdigest()
        try:
            ok = hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        except OSError as e:
            raise ModelError(
                f"GPT-2 tokenizer file {name} not found in {directory} ({origin}): expected {path.name} ({e.strerror}); "
                "copy tiktoken's cached GPT-2 files there and set TIKTOKEN_CACHE_DIR (filterd never downloads them)"
            ) from None
        if not ok:
            raise ModelError(f"GPT-2 tokenizer file {name} at {path} does not match its sha256 (corrupt or another file)")
        found[name] = path
    return found


@lru_cache(maxsize=1)
def _encoding():  # type: ignore[no-untyped-def]
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    files = cached_gpt2_files()  # local paths only: tiktoken's read_file opens them, no URL reaches it
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]))
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: PAD_TOKEN_ID}, explicit_n_vocab=50257
    )


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
